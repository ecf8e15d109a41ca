"""Two-dimensional maps of latent codes: PCA and an exact t-SNE.

t-SNE (van der Maaten & Hinton 2008) is written out here rather than taken
from scikit-learn: a report maps at most a couple of thousand points, where
the exact O(n^2) algorithm in PyTorch takes seconds and needs no extra
dependency.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project onto the two principal axes (fewer dimensions are zero-padded)."""
    centred = torch.from_numpy(x).double()
    centred = centred - centred.mean(0)
    if centred.shape[1] < 2:
        return torch.cat([centred, torch.zeros(len(centred), 2 - centred.shape[1], dtype=centred.dtype)], 1).numpy()
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ v[:2].T).numpy()


def _affinities(sq_dist: torch.Tensor, perplexity: float, steps: int = 60) -> torch.Tensor:
    """Row-wise Gaussian affinities whose entropy matches log(perplexity),
    found by bisection on the precision beta = 1 / (2 sigma^2) of every row."""
    n = len(sq_dist)
    target = math.log(perplexity)
    lo = torch.full((n, 1), 1e-20, dtype=sq_dist.dtype)
    hi = torch.full((n, 1), 1e20, dtype=sq_dist.dtype)
    beta = torch.ones(n, 1, dtype=sq_dist.dtype)
    mask = ~torch.eye(n, dtype=torch.bool)
    for _ in range(steps):
        logits = -sq_dist * beta
        logits = logits.masked_fill(~mask, -float("inf"))
        p = torch.softmax(logits, 1)
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1, keepdim=True)
        too_flat = entropy > target  # entropy too high: sharpen (raise beta)
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.sqrt(lo * hi)  # bisection in log space
    return p


def tsne_2d(x: np.ndarray, perplexity: float = 30.0, iterations: int = 600, seed: int = 0) -> np.ndarray:
    """Exact t-SNE with early exaggeration, momentum and per-parameter gains."""
    data = torch.from_numpy(np.asarray(x, dtype=np.float64))
    n = len(data)
    if n < 4:
        return pca_2d(np.asarray(x, dtype=np.float64))
    perplexity = min(perplexity, (n - 1) / 3)
    p = _affinities(torch.cdist(data, data).pow(2), perplexity)
    p = ((p + p.T) / (2 * n)).clamp_min(1e-12).float()  # the descent runs in fp32: fast enough, precise enough
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, 2, generator=gen) * 1e-4
    update, gains = torch.zeros_like(y), torch.ones_like(y)
    lr = max(n / 12 / 4, 50.0)
    for it in range(iterations):
        exaggeration, momentum = (12.0, 0.5) if it < 250 else (1.0, 0.8)
        num = 1.0 / (1.0 + torch.cdist(y, y).pow(2))
        num.fill_diagonal_(0.0)
        q = (num / num.sum()).clamp_min(1e-12)
        pq = (exaggeration * p - q) * num
        grad = 4.0 * (pq.sum(1, keepdim=True) * y - pq @ y)
        same_sign = (grad > 0) == (update > 0)
        gains = torch.where(same_sign, gains * 0.8, gains + 0.2).clamp_min(0.01)
        update = momentum * update - lr * gains * grad
        y = y + update
        y = y - y.mean(0)
    return y.numpy()
