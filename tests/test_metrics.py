"""Metric definitions on small cases that can be checked by hand."""

import math

import numpy as np
import pytest
import torch

from vae_ray.embedding import pca_2d, tsne_2d
from vae_ray.keyed_random import binarize, hashed_normals
from vae_ray.metrics import (
    active_units,
    bits_per_dim,
    frechet_distance,
    inception_score,
    likelihood_terms,
    precision_recall,
)
from vae_ray.model import HALF_BIN, build_model, discretized_logistic_log_prob, kl_divergence


def test_kl_term_by_hand():
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 * (mu^2 + s^2 - 1 - log s^2), summed over dimensions.
    mu = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(4.0), 0.0]])
    expected = torch.tensor([0.0, 0.5, 0.5 * (4 - 1 - math.log(4))])
    assert torch.allclose(kl_divergence(mu, logvar), expected, atol=1e-6)


def test_discretised_logistic_is_a_distribution_over_256_values():
    values = torch.arange(256, dtype=torch.float32) / 255
    for mean, log_scale in ((0.5, -3.0), (0.02, -6.0), (0.97, -1.0), (0.3, -8.0)):
        logp = discretized_logistic_log_prob(values, torch.tensor(mean), torch.tensor(log_scale))
        assert torch.isfinite(logp).all()
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)
    # A sharp logistic puts almost all mass on the nearest 8-bit value.
    logp = discretized_logistic_log_prob(torch.tensor(128 / 255), torch.tensor(128 / 255), torch.tensor(-8.0))
    assert logp.exp().item() > 0.99
    assert pytest.approx(0.5 / 255) == HALF_BIN
    assert bits_per_dim(784 * math.log(2) * 8, "logistic", 784) == pytest.approx(8.0)
    assert bits_per_dim(100.0, "bernoulli", 784) is None


def _terms(k: int, loss: str = "bernoulli"):
    torch.manual_seed(0)
    model = build_model("mnist", (28, 28, 1), 3, loss=loss).eval()
    # A posterior narrower than the prior and a decoder that depends strongly
    # on z, as after training: the ELBO then has a gap that more samples close.
    with torch.no_grad():
        model.decoder.project.weight.mul_(10)
        model.head.bias[3:] = -3.0
    x = torch.rand(16, 1, 28, 28)
    idx = np.arange(16)
    target = binarize(x, 0, idx) if loss == "bernoulli" else x
    return likelihood_terms(model, x, None, target, hashed_normals(0, idx, k, 3))


def test_importance_weighted_bound_is_below_the_elbo_and_tightens_with_k():
    one, few, many = _terms(1), _terms(10), _terms(200)
    # With one sample the two estimates are the same number.
    assert torch.allclose(one["nll_iw_nats"], one["neg_elbo_nats"])
    for t in (few, many):  # Jensen: never above, image by image
        assert (t["nll_iw_nats"] <= t["neg_elbo_nats"] + 1e-4).all()
    # More samples, a tighter (lower) bound on average; the ELBO estimate does not move that way.
    assert many["nll_iw_nats"].mean() < few["nll_iw_nats"].mean() < one["nll_iw_nats"].mean()
    assert (
        abs(many["neg_elbo_nats"].mean() - few["neg_elbo_nats"].mean())
        < few["neg_elbo_nats"].mean() - many["nll_iw_nats"].mean()
    )


def test_samples_and_binarisation_are_keyed_by_image_index():
    a = hashed_normals(3, np.array([5, 6, 7]), 4, 2)
    b = hashed_normals(3, np.array([7]), 4, 2)
    assert torch.equal(a[:, 2], b[:, 0])
    x = torch.full((2, 1, 4, 4), 0.3)
    bits = binarize(x, 0, np.array([0, 1]))
    assert set(bits.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(binarize(x[1:], 0, np.array([1])), bits[1:])
    assert 0.05 < binarize(torch.full((1, 1, 100, 100), 0.3), 0, np.array([0])).mean().item() < 0.55


def test_active_units_count_dimensions_whose_mean_varies():
    rng = np.random.default_rng(0)
    mu = np.stack(
        [rng.normal(0, 1, 1000), rng.normal(0, 0.03, 1000), np.full(1000, 2.0), rng.normal(0, 0.2, 1000)], axis=1
    )
    # variances: 1, 0.0009, 0, 0.04 -> dimensions 0 and 3 are active
    assert active_units(mu) == 2


def test_frechet_distance_by_hand():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-6)
    # Diagonal covariances: sum (sqrt(var_a) - sqrt(var_b))^2 = (1 - 3)^2 per dimension.
    assert frechet_distance(a, a * 3) == pytest.approx(12.0, rel=0.03)


def test_inception_score_by_hand():
    confident_balanced = np.eye(10)[np.arange(1000) % 10]
    assert inception_score(confident_balanced) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(np.eye(10)[np.zeros(1000, int)]) == pytest.approx(1.0, rel=1e-6)
    assert inception_score(np.full((1000, 10), 0.1)) == pytest.approx(1.0, rel=1e-6)


def test_precision_and_recall():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 4))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    precision, recall = precision_recall(real, real[:100] * 0.1)  # collapsed onto the centre
    assert precision > 0.9 and recall < 0.3
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_latent_maps_keep_clusters_apart():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 6
    x = np.concatenate([c + rng.normal(size=(60, 8)) for c in centres])
    labels = np.repeat(np.arange(4), 60)
    for y in (pca_2d(x), tsne_2d(x, iterations=400)):
        d = ((y[:, None] - y[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        assert (labels[d.argmin(1)] == labels).mean() > 0.95


def test_keyed_normals_made_by_torch_are_numpys_bits():
    """Evaluation on a GPU makes its posterior samples there: the same
    counter-based draws as numpy's, bit for bit on a CPU, and keyed by the
    index alone whatever the batch."""
    idx = np.array([0, 5, 2**40 + 3])
    for dim in (1, 4, 801):
        made_by_numpy = hashed_normals(7, idx, 3, dim)
        made_by_torch = hashed_normals(7, idx, 3, dim, device=torch.device("cpu"))
        assert torch.equal(made_by_numpy, made_by_torch), dim
    alone = hashed_normals(7, idx[1:2], 3, 801, device=torch.device("cpu"))
    assert torch.equal(alone[:, 0], hashed_normals(7, idx, 3, 801)[:, 1])
