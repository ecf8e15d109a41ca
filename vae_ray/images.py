"""Pixels between their two forms: uint8 (N, H, W, C) as stored, written and
shown, and float (N, C, H, W) in [0, 1] as the models take them."""

from __future__ import annotations

import numpy as np
import torch


def to_float(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), rounded to the nearest level."""
    return to_uint8_tensor(images).cpu().numpy()


def to_uint8_tensor(images: torch.Tensor) -> torch.Tensor:
    """to_uint8, left on the images' device."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
