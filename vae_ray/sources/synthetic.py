"""Synthetic digits: work offline with nothing downloaded (the demo's fallback).

Digits 0-9 drawn with Pillow's bundled font under random affine jitter,
stroke width and blur: 28x28 greyscale, MNIST-like but clearly synthetic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from . import Chunk, Source, Split

_FONT_CACHE: dict = {}


def synthetic_digits_source(train: int = 60000, test: int = 10000, seed: int = 0) -> Source:
    def chunks_for(count: int, split_seed: int) -> Callable[[], Iterator[Chunk]]:
        def chunks() -> Iterator[Chunk]:
            size = 2048
            for start in range(0, count, size):
                n = min(size, count - start)
                rng = np.random.default_rng([split_seed, start])
                labels = rng.integers(0, 10, n)
                images = np.stack([_render_digit(int(d), rng) for d in labels])[..., None]
                yield images, labels.astype(np.int64)

        return chunks

    splits = {
        "train": Split(train, chunks_for(train, seed * 2 + 1)),
        "test": Split(test, chunks_for(test, seed * 2 + 2)),
    }
    return Source(
        "synthetic-digits",
        (28, 28, 1),
        [str(d) for d in range(10)],
        splits,
        origin="generated (Pillow font rendering)",
        synthetic=True,
    )


def _render_digit(digit: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    size = int(rng.integers(30, 44))
    font = _FONT_CACHE.get(size)
    if font is None:
        font = _FONT_CACHE[size] = ImageFont.load_default(size=size)
    canvas = Image.new("L", (56, 56), 0)
    ImageDraw.Draw(canvas).text(
        (28, 28), str(digit), fill=255, font=font, anchor="mm", stroke_width=int(rng.integers(0, 3)), stroke_fill=255
    )
    angle = np.deg2rad(rng.uniform(-15, 15))
    shear, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.85, 1.15)
    dx, dy = rng.uniform(-3, 3, size=2)
    # Inverse affine map about the centre: rotation, shear, scale, shift.
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    a, b, d, e = c, s + shear * c, -s, c - shear * s
    cx = cy = 28
    coeffs = (a, b, cx - a * cx - b * cy - dx, d, e, cy - d * cx - e * cy - dy)
    canvas = canvas.transform((56, 56), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    return np.asarray(canvas.resize((28, 28), Image.Resampling.BILINEAR), dtype=np.uint8)
