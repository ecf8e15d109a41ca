import math

import pytest
import torch

from vae_ray.model import (
    LOG_2PI,
    LOG_SIGMA_INIT,
    batch_terms,
    build_model,
    kl_divergence,
    logistic_mixture_log_prob,
    logistic_mixture_mean,
    matlab_recon,
    recon_nll,
)


@pytest.mark.parametrize("arch, shape", [("mnist", (28, 28, 1)), ("cifar", (32, 32, 3)), ("mnist", (32, 48, 3))])
def test_shapes(arch, shape):
    model = build_model(arch, shape, latent_dim=7)
    h, w, c = shape
    x = torch.rand(5, c, h, w)
    logits, mu, logvar = model(x)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (5, 7)
    assert model.sample(3).shape == (3, c, h, w)


def test_mnist_network_is_the_matlab_example():
    model = build_model("mnist", (28, 28, 1), latent_dim=16)
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size, m.stride) for m in convs] == [(32, (3, 3), (2, 2)), (64, (3, 3), (2, 2))]
    assert model.head.out_features == 32  # 2K: means and log-variances
    assert model.decoder.project.out_features == 7 * 7 * 64
    assert torch.count_nonzero(model.decoder.project.bias) == 0


def test_bad_image_sides_are_refused():
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model("cifar", (28, 28, 1), 4)


def test_kl_by_hand():
    mu = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.0, math.log(4.0)]])
    # KL = 0.5 * sum(sigma^2 + mu^2 - 1 - log sigma^2)
    expected = torch.tensor([0.0, 0.5 * (1 + 0) + 0.5 * (4 - 1 - math.log(4.0))])
    assert torch.allclose(kl_divergence(mu, logvar), expected)


def test_matlab_units_and_nats():
    model = build_model("mnist", (28, 28, 1), 2, loss="matlab")
    x = torch.zeros(1, 1, 28, 28)
    logits = torch.zeros(1, 1, 28, 28)  # sigmoid(0) = 0.5 everywhere
    assert matlab_recon(logits, x).item() == pytest.approx(0.5 * 784 * 0.25)
    mu, logvar = torch.zeros(1, 2), torch.zeros(1, 2)
    terms = batch_terms(model, x, x, logits, mu, logvar)
    assert terms.matlab_elbo.item() == pytest.approx(98.0)
    assert terms.neg_elbo_nats.item() == pytest.approx(98.0 + 0.5 * 784 * LOG_2PI)  # ~720.5 nats apart


def test_bernoulli_and_weights():
    model = build_model("mnist", (28, 28, 1), 2, loss="bernoulli")
    x = torch.ones(2, 1, 28, 28)
    logits = torch.zeros(2, 1, 28, 28)
    mu, logvar = torch.ones(2, 2), torch.zeros(2, 2)
    t = batch_terms(model, x, x, logits, mu, logvar, beta=0.1, recon_weight=0.9)
    assert t.recon[0].item() == pytest.approx(784 * math.log(2))
    assert t.kl[0].item() == pytest.approx(1.0)
    assert t.loss[0].item() == pytest.approx(0.9 * 784 * math.log(2) + 0.1)


def test_gaussian_learned_sigma_is_a_density():
    model = build_model("cifar", (8, 8, 3), 2, loss="gaussian")
    x = torch.full((1, 3, 8, 8), 0.5)
    logits = torch.zeros(1, 3, 8, 8)
    t = batch_terms(model, x, x, logits, torch.zeros(1, 2), torch.zeros(1, 2))
    # zero error: -log N(0; 0, sigma^2) per pixel, sigma at its starting value
    assert t.neg_elbo_nats.item() == pytest.approx(192 * (0.5 * LOG_2PI + LOG_SIGMA_INIT), rel=1e-5)
    with torch.no_grad():
        model.log_sigma.zero_()
    t = batch_terms(model, x, x, logits, torch.zeros(1, 2), torch.zeros(1, 2))
    assert t.neg_elbo_nats.item() == pytest.approx(0.5 * 192 * LOG_2PI)  # sigma = 1


def test_conditional_model_needs_labels():
    model = build_model("mnist", (28, 28, 1), 4, num_classes=10)
    x = torch.rand(3, 1, 28, 28)
    y = torch.tensor([0, 5, 9])
    assert model(x, y)[0].shape == x.shape
    with pytest.raises(ValueError, match="pass labels"):
        model(x)


def test_antithetic_samples_pair_up():
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    z = build_model("mnist", (28, 28, 1), 3).reparameterize(mu, logvar, samples=2)
    assert z.shape == (8, 3)
    # the second draw mirrors the first about the posterior mean
    assert torch.allclose(z[4:] - mu, -(z[:4] - mu), atol=1e-6)
    assert not torch.allclose(z[:4], mu)
    odd = build_model("mnist", (28, 28, 1), 3).reparameterize(mu, logvar, samples=3)
    assert odd.shape == (12, 3) and torch.allclose(odd[8:] - mu, -(odd[:4] - mu), atol=1e-6)


@pytest.mark.parametrize("loss", ["matlab", "bernoulli"])
def test_several_samples_average_the_reconstruction(loss):
    torch.manual_seed(0)
    model = build_model("mnist", (28, 28, 1), 4, num_classes=10, loss=loss)
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3])
    logits, mu, logvar = model(x, y, samples=2)
    assert logits.shape == (6, 1, 28, 28)
    both = batch_terms(model, x, x, logits, mu, logvar, beta=0.5)
    first, second = (batch_terms(model, x, x, part, mu, logvar, beta=0.5) for part in logits.chunk(2))
    for name in ("loss", "recon", "kl", "neg_elbo_nats", "matlab_elbo"):
        expected = (getattr(first, name) + getattr(second, name)) / 2
        assert torch.allclose(getattr(both, name), expected, atol=1e-4), name
    assert not torch.allclose(first.recon, second.recon)  # two different draws were decoded


@pytest.mark.parametrize("loss", ["gaussian", "logistic"])
def test_learned_scales_start_near_where_colour_training_settles(loss):
    """A scale as wide as the whole intensity range (log 0) held the first
    epochs back; the scale starts at about 13 of the 255 steps instead, and
    the likelihood of a well-reconstructed image is then far higher."""
    torch.manual_seed(0)
    model = build_model("cifar", (32, 32, 3), 8, loss=loss)
    scale = model.log_sigma.exp()
    assert torch.all((scale > 1 / 255) & (scale < 0.1))
    x = torch.rand(4, 3, 32, 32).mul(255).round().div(255)
    close = torch.logit(x.clamp(0.02, 0.98)) + 0.01  # a decoder mean close to the image
    wide = build_model("cifar", (32, 32, 3), 8, loss=loss)
    with torch.no_grad():
        wide.log_sigma.zero_()
    assert torch.all(recon_nll(model, close, x) < recon_nll(wide, close, x))


def test_the_logistic_mixture_is_a_distribution_over_a_grey_pixels_values():
    """Summed over the 256 grey levels, the probabilities add up to 1:
    bits/dim under it are comparable with the literature's."""
    torch.manual_seed(0)
    grey = torch.randn(1, 30, 1, 1) * 2  # 10 components: weights, means, log scales
    levels = torch.arange(256.0).view(256, 1, 1, 1) / 255
    assert logistic_mixture_log_prob(grey.expand(256, -1, -1, -1), levels).double().exp().sum().item() == pytest.approx(
        1.0, abs=1e-5
    )


@pytest.mark.slow  # 16.7 million colours (a few seconds)
def test_the_logistic_mixture_is_a_distribution_over_a_colour_pixels_values():
    """The same over all 256^3 colours, green and blue coupled to the
    channels before them: a coupling that read a later channel would not sum to 1."""
    torch.manual_seed(0)
    levels = torch.arange(256.0).view(256, 1, 1, 1) / 255
    colour = torch.randn(1, 10, 1, 1) * 1.5  # one component: means, scales and three couplings far from 0
    v = levels.flatten()
    r, g, b = torch.meshgrid(v, v, v, indexing="ij")
    pixels = torch.stack([r, g, b], -1).reshape(-1, 3, 1, 1)
    total = sum(
        logistic_mixture_log_prob(colour.expand(len(part), -1, -1, -1), part).double().exp().sum().item()
        for part in pixels.split(1 << 21)
    )
    assert total == pytest.approx(1.0, abs=1e-5)


def test_the_logistic_mixtures_mean_image_is_its_expected_pixel():
    """Grey: the mean image is the mixture's expected value (a Monte Carlo
    check over its 256 levels), and a model's pictures read it."""
    torch.manual_seed(1)
    params = torch.randn(1, 30, 1, 1)
    params[:, 20:] = -4.0  # narrow components: their means are inside the pixel range
    levels = torch.arange(256.0).view(256, 1, 1, 1) / 255
    probs = logistic_mixture_log_prob(params.expand(256, -1, -1, -1), levels).exp().flatten()
    expected = (probs * levels.flatten()).sum().item()
    assert logistic_mixture_mean(params, 1).item() == pytest.approx(expected, abs=0.01)
    model = build_model("hvae", (8, 8, 3), 4, loss="logistic_mixture", width=8, depth=1)
    images = model.sample(2)
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_a_mixture_needs_a_network_with_room_for_its_components():
    from vae_ray.errors import UserError
    from vae_ray.spec import ModelSpec

    with pytest.raises(UserError, match="logistic_mixture likelihood needs --arch hvae"):
        ModelSpec("cifar", (32, 32, 3), 16, loss="logistic_mixture").check()
