"""Evaluation metrics. Plain PyTorch and NumPy, no Ray: usable on their own.

Likelihoods (per image, in nats):
- `neg_elbo_nats` = -E_q[log p(x,z) - log q(z|x)], averaged over K posterior
  samples;
- `nll_iw_nats` = -log (1/K) sum_k p(x,z_k) / q(z_k|x) (Burda et al. 2016),
  from the same K samples, so by Jensen's inequality it is never above
  `neg_elbo_nats`, and it tightens towards -log p(x) as K grows;
- `matlab_elbo` = 0.5 * summed squared error of the decoder mean + KL: the
  source documents' unit, for any likelihood.

Sample quality (in a judge classifier's feature space, see `judge.py`):
Frechet distance, Inception Score, and k-NN precision / recall
(Kynkaanniemi et al. 2019).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .model import LOG_2PI, VAE, kl_divergence, matlab_error, recon_nll
from .spec import DISCRETE_LOSSES

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.: Cov_x(E_q[z_u]) above this counts as active
MAX_DECODE_ROWS = 4096  # images decoded at once when drawing K samples each


@torch.no_grad()
def likelihood_terms(
    model: VAE, x: torch.Tensor, y: torch.Tensor | None, target: torch.Tensor, eps: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-image metrics of a batch from K posterior samples.

    x: inputs in [0, 1] (N, C, H, W); target: what the likelihood scores (x,
    or its binarisation); eps: (K, N, latent) standard normals.
    """
    mu, logvar = model.encode(x, y)
    mu, logvar = mu.float(), logvar.float()
    std = torch.exp(0.5 * logvar)
    k, n = eps.shape[0], x.shape[0]
    log_w, matlab = [], []
    step = max(1, MAX_DECODE_ROWS // max(n, 1))  # samples decoded together
    for start in range(0, k, step):
        e = eps[start : start + step].to(x.device)
        kk = e.shape[0]
        yy = y.repeat(kk) if y is not None else None
        rep = (kk,) + (1,) * (x.dim() - 1)
        if model.hierarchical:  # each group's posterior depends on the groups drawn above it
            logits, z, path_logvar = model.posterior(x.repeat(rep), yy, e.reshape(kk * n, -1))
            z, path_logvar = z.float().view(kk, n, -1), path_logvar.float().view(kk, n, -1)
        else:
            z, path_logvar = mu.unsqueeze(0) + e * std.unsqueeze(0), logvar.unsqueeze(0)  # (kk, N, latent)
            logits = model.decode(z.reshape(kk * n, -1), yy)
        log_px = -recon_nll(model, logits, target.repeat(rep)).view(kk, n)
        log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
        log_qz = -0.5 * (e.pow(2) + LOG_2PI + path_logvar).sum(-1)
        log_w.append(log_px + log_pz - log_qz)
        matlab.append(matlab_error(model, logits, x.repeat(rep)).view(kk, n))
    log_w = torch.cat(log_w)
    mean_pixels = model.mean_image(model.decode(mu, y))
    return {
        "matlab_elbo": torch.cat(matlab).mean(0) + kl_divergence(mu, logvar),
        "neg_elbo_nats": -log_w.mean(0),
        "nll_iw_nats": -(torch.logsumexp(log_w, 0) - math.log(k)),
        "recon_mse": (mean_pixels - x.float()).pow(2).flatten(1).mean(1),
        "kl": kl_divergence(mu, logvar),
        "mu": mu,
    }


def active_units(mu: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dimensions whose posterior mean varies over the data (Burda et al. 2016)."""
    if len(mu) < 2:
        return 0
    return int((np.var(mu.astype(np.float64), axis=0) > threshold).sum())


def bits_per_dim(nll_nats: float, loss: str, dims: int) -> float | None:
    """nats per image -> bits per dimension, for likelihoods of 8-bit data only."""
    if loss not in DISCRETE_LOSSES:
        return None
    return nll_nats / (dims * math.log(2))


# ---------------------------------------------------------------------------
# Sample quality
# ---------------------------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||m_a - m_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric PSD matrix.
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def inception_score(probs: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with the judge's class probabilities, over all images at once."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    marginal = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))


def inception_score_splits(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """The conventional report (Salimans et al. 2016): the score on each of
    `splits` equal parts of the images, as mean and standard deviation."""
    parts = [part for part in np.array_split(probs, splits) if len(part)]
    scores = np.array([inception_score(part) for part in parts])
    return float(scores.mean()), float(scores.std())


def knn_radii(features: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = []
    for start in range(0, len(features), chunk):
        d = torch.cdist(features[start : start + chunk], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """For each point: does it lie inside any centre's k-NN ball?"""
    inside = []
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start : start + chunk], centres)
        inside.append((d <= radii.unsqueeze(0)).any(1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is
    the share of generated points inside the real manifold (union of k-NN
    balls), recall the share of real points inside the generated one."""
    r, f = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    precision = covered(f, r, knn_radii(r, k)).double().mean().item()
    recall = covered(r, f, knn_radii(f, k)).double().mean().item()
    return precision, recall
