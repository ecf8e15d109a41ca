"""The hierarchical network (`--arch hvae`) against the contract every other
part of vae-ray relies on: one flat latent vector z ~ N(0, I), deterministic
decoding, an analytic KL that is the hierarchy's KL, a sequential posterior
for the importance-weighted likelihood."""

import math

import pytest
import torch

from vae_ray.config import TrainConfig
from vae_ray.errors import UserError
from vae_ray.metrics import likelihood_terms
from vae_ray.model import batch_terms, build, build_model
from vae_ray.spec import ModelSpec, hvae_groups
from vae_ray.trainer import resolve


def small(shape=(28, 28, 1), classes=0, loss="bernoulli", width=16, depth=2, seed=0):
    torch.manual_seed(seed)
    model = build_model("hvae", shape, 5, classes, loss, width, depth).eval()
    with torch.no_grad():  # priors away from N(0, I): a zero-initialised prior would hide mistakes in the groups' order
        for group in [*model.quarter_groups, *model.half_groups]:
            group.prior.weight.normal_(0, 0.3)
            group.prior.bias.normal_(0, 0.3)
            group.after.last.weight.normal_(0, 0.1)
    return model


@pytest.mark.parametrize(
    "shape, loss",
    [
        ((28, 28, 1), "bernoulli"),
        ((32, 32, 3), "logistic"),
        ((16, 24, 3), "gaussian"),
        ((16, 16, 3), "logistic_mixture"),
        ((12, 12, 1), "logistic_mixture"),
    ],
)
@pytest.mark.parametrize("classes", [0, 3])
def test_shapes_grey_and_colour_conditional_or_not(shape, loss, classes):
    model = small(shape, classes, loss)
    h, w, c = shape
    assert model.groups == [(1, 1, 5), (h // 4, w // 4, 4), (h // 4, w // 4, 4), (h // 2, w // 2, 2)]
    assert model.latent_dim == model.spec.z_dim == 5 + 2 * (h // 4) * (w // 4) * 4 + (h // 2) * (w // 2) * 2
    assert model.spec.latent_dim == 5  # the spec keeps the dense top group's size, as configured
    x = torch.rand(3, c, h, w)
    y = torch.tensor([0, 1, 2]) if classes else None
    logits, mu, logvar = model(x, y)
    outputs = {"logistic_mixture": 10 * (1 + 2 * c + c * (c - 1) // 2)}.get(loss, c)  # 100 for colour, 30 grey
    assert logits.shape == (3, outputs, h, w) and mu.shape == logvar.shape == (3, model.latent_dim)
    terms = batch_terms(model, x, x, logits, mu, logvar)
    assert terms.neg_elbo_nats.shape == terms.matlab_elbo.shape == (3,) and torch.isfinite(terms.loss).all()
    labels = torch.tensor([2, 0]) if classes else None
    assert model.sample(2, labels).shape == (2, c, h, w)
    assert build(model.spec).latent_dim == model.latent_dim  # the spec rebuilds the same network


def test_decoding_a_posterior_mean_reconstructs_its_path():
    model = small(classes=3)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        mu, _ = model.encode(x, y)
        logits, z, _ = model.posterior(x, y, torch.zeros(4, model.latent_dim))
        assert torch.allclose(z, mu, atol=1e-5)
        assert torch.allclose(model.decode(mu, y), logits, atol=1e-4)
        noise = torch.randn(4, model.latent_dim)
        drawn_logits, drawn, _ = model.posterior(x, y, noise)
        assert torch.allclose(model.decode(drawn, y), drawn_logits, atol=1e-4)  # z alone decides the image
        assert not torch.allclose(drawn, mu)


def test_the_analytic_kl_is_the_hierarchys_kl():
    """batch_terms' KL (the groups' standardised Gaussians along the drawn
    path) and a Monte Carlo estimate of E_q[log q(z|x) - log p(z)] from the
    sequential posterior's density must estimate the same number."""
    model = small()
    x = torch.rand(1, 1, 28, 28)
    draws = 4000
    with torch.no_grad():
        logits, mu, logvar = model(x.expand(draws, -1, -1, -1))
        analytic = batch_terms(model, x.expand(draws, -1, -1, -1), x.expand(draws, -1, -1, -1), logits, mu, logvar).kl
        noise = torch.randn(draws, model.latent_dim)
        _, z, path_logvar = model.posterior(x.expand(draws, -1, -1, -1), None, noise)
        log_q = -0.5 * (noise.pow(2) + math.log(2 * math.pi) + path_logvar).sum(1)
        log_p = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
        monte_carlo = log_q - log_p
    assert analytic.mean().item() == pytest.approx(monte_carlo.mean().item(), rel=0.03)
    assert analytic.std() < monte_carlo.std()  # why the analytic form trains better


def test_several_samples_give_one_kl_per_image():
    model = small(classes=3)
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    logits, mu, logvar = model(x, y, samples=2)
    assert logits.shape == (6, 1, 28, 28) and mu.shape == (6, model.latent_dim)
    terms = batch_terms(model, x, x, logits, mu, logvar)
    assert terms.kl.shape == (3,) and torch.isfinite(terms.loss).all()


def test_importance_weighting_tightens_the_bound():
    model = small()
    x = (torch.rand(6, 1, 28, 28) > 0.6).float()
    terms = likelihood_terms(model, x, None, x, torch.randn(64, 6, model.latent_dim))
    assert torch.all(terms["nll_iw_nats"] <= terms["neg_elbo_nats"] + 1e-3)
    assert torch.all(terms["neg_elbo_nats"] - terms["nll_iw_nats"] < 0.5 * terms["neg_elbo_nats"])


def test_one_step_lowers_the_loss_and_gradients_reach_every_group():
    torch.manual_seed(0)
    model = build_model("hvae", (28, 28, 1), 5, 0, "bernoulli", 16, 1)
    x = (torch.rand(16, 1, 28, 28) > 0.7).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits, mu, logvar = model(x)
        loss = batch_terms(model, x, x, logits, mu, logvar).loss.mean()
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None for p in model.parameters()), "a parameter no loss reaches"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_spec_sizes_and_old_configs():
    spec = ModelSpec("hvae", (28, 28, 1), 16, 10, "bernoulli", 48, 2)
    assert spec.groups == hvae_groups((28, 28, 1), 16, 2) and spec.z_dim == 16 + 2 * 196 + 392
    assert ModelSpec("hvae", (28, 28, 1), 16).z_dim == spec.z_dim  # 0 = the network's default depth
    assert ModelSpec("mnist", (28, 28, 1), 16).z_dim == 16
    with pytest.raises(UserError, match="fixed size"):
        ModelSpec("mnist", (28, 28, 1), 16, width=32).check()
    with pytest.raises(UserError, match="latent vector would hold"):
        ModelSpec("hvae", (1024, 1024, 3), 16, depth=16).check()
    # a config written before width and depth existed describes the same model
    old = {"arch": "mnist", "latent_dim": 16, "conditional": False, "loss": "matlab"}
    assert ModelSpec.from_config(old, {"shape": [28, 28, 1], "num_classes": 0}).width == 0


def test_resolve_writes_the_defaults_down_and_refuses_sizes_for_fixed_networks():
    meta = {"shape": [28, 28, 1], "root": "/d", "num_classes": 10, "splits": {"train": {"count": 1000}}}
    cfg = resolve(TrainConfig(data="/d", arch="hvae"), meta)
    assert (cfg.width, cfg.depth, cfg.batch_size, cfg.grad_clip, cfg.loss) == (48, 2, 64, 200.0, "bernoulli")
    assert resolve(TrainConfig(data="/d", arch="hvae", grad_clip=0.0, width=32), meta).grad_clip == 0.0
    assert resolve(TrainConfig(data="/d", arch="mnist"), meta).grad_clip == 0.0
    with pytest.raises(UserError, match="fixed size"):
        resolve(TrainConfig(data="/d", arch="mnist", depth=3), meta)
    # The model's own rules, before any run folder exists.
    with pytest.raises(UserError, match="logistic_mixture likelihood needs --arch hvae"):
        resolve(TrainConfig(data="/d", arch="mnist", loss="logistic_mixture"), meta)
    assert resolve(TrainConfig(data="/d", arch="hvae", loss="logistic_mixture"), meta).loss == "logistic_mixture"
