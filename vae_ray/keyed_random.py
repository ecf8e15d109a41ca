"""Random numbers keyed by (seed, index): the same image always gets the same
draws, whatever the batch sizes, actor counts, worker counts or the order Ray
Data delivers rows in. Used alike by training (the test binarisation),
evaluation (posterior samples, binarisation) and generation (latent vectors).

The generator is counter-based: splitmix64 of (key XOR counter) gives 64
random bits per counter value, turned into uniforms and, by Box-Muller, into
standard normals. No state is carried from one call to the next.
"""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _key(seed: int) -> np.uint64:
    return np.uint64((seed * _GOLDEN + 0x632BE59BD9B4E019) % 2**64)


def latent_normals(seed: int, indices: np.ndarray, dim: int) -> np.ndarray:
    """Standard normals (len(indices), dim), row i depending only on (seed, indices[i])."""
    idx = np.asarray(indices).astype(np.uint64)[:, None]
    pairs = (dim + 1) // 2
    counter = idx * np.uint64(2 * pairs) + np.arange(2 * pairs, dtype=np.uint64)[None, :]
    bits = _splitmix64(counter ^ _key(seed))
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
    u1, u2 = uniform[:, :pairs], uniform[:, pairs:]
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], axis=1)
    return z[:, :dim].astype(np.float32)


def keyed_uniforms(seed: int, indices: np.ndarray) -> np.ndarray:
    """A uniform in (0, 1) per index (float64), depending only on (seed, index)."""
    idx = np.asarray(indices).astype(np.uint64)
    bits = _splitmix64((idx * np.uint64(2) + np.uint64(1)) ^ _key(seed + 1))
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _signed(value: int) -> int:
    """A 64-bit constant as torch's int64 holds it (two's complement)."""
    return value - 2**64 if value >= 2**63 else value


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """A logical right shift of int64 bits (torch's >> copies the sign bit)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64_torch(x: torch.Tensor) -> torch.Tensor:
    """_splitmix64 on int64 tensors: the same bits (products wrap alike)."""
    x = x + _signed(_GOLDEN)
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def latent_normals_on(seed: int, indices: torch.Tensor, dim: int) -> torch.Tensor:
    """latent_normals computed where `indices` (int64) lie, a GPU for one: the
    same counters and bits, so the same normals up to the last float64 digits
    of log and cos (float32 results agree to about 1e-7). Scoring millions of
    posterior samples needs this: numpy makes about 4 million a second."""
    pairs = (dim + 1) // 2
    indices = indices.long()  # the counters are 64-bit: int32 would wrap
    counter = indices[:, None] * (2 * pairs) + torch.arange(2 * pairs, device=indices.device)[None, :]
    bits = _splitmix64_torch(counter ^ _signed(int(_key(seed))))
    uniform = (_shift_right(bits, 11).double() + 0.5) * 2.0**-53
    u1, u2 = uniform[:, :pairs], uniform[:, pairs:]
    radius = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.cat([radius * torch.cos(2 * torch.pi * u2), radius * torch.sin(2 * torch.pi * u2)], dim=1)
    return z[:, :dim].float()


def hashed_normals(
    seed: int, indices: np.ndarray, samples: int, dim: int, device: torch.device | None = None
) -> torch.Tensor:
    """(samples, len(indices), dim) standard normals keyed by (seed, image index, sample number);
    made on `device` when given (latent_normals_on), else by numpy on the CPU."""
    indices = np.asarray(indices, dtype=np.int64)
    idx = indices[None, :] * samples + np.arange(samples)[:, None]
    if device is not None:
        flat = torch.from_numpy(idx.reshape(-1)).to(device)
        return latent_normals_on(seed, flat, dim).view(samples, len(indices), dim)
    return torch.from_numpy(latent_normals(seed, idx.reshape(-1), dim)).view(samples, len(indices), dim)


def binarize(x: torch.Tensor, seed: int, indices: np.ndarray) -> torch.Tensor:
    """A fixed stochastic binarisation (x ~ Bernoulli(pixel)) keyed by image index,
    so every epoch and every evaluation scores the same binary images."""
    d = x[0].numel()
    noise = hashed_normals(seed + 7919, indices, 1, d)[0].view_as(x).to(x.device)
    return (torch.special.ndtr(noise) < x).to(x.dtype)
