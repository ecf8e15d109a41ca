"""The pictures a finished run leaves behind (RUN/plots, RUN/samples).

As in the MATLAB example: the loss curves, two test images of each class
beside their reconstructions, and 64 images decoded from z ~ N(0, I).
Written locally, or built in a temporary folder and uploaded for s3:// runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import storage
from .data import read_arrays
from .images import to_float, to_uint8
from .plots import loss_curves, pairs_grid, save_grid, save_png
from .rundir import RunDir

MAX_TEST_ROWS = 5000


def two_per_class(labels: np.ndarray, num_classes: int, per_class: int = 2, seed: int = 0) -> np.ndarray:
    """Indices of `per_class` random examples of each class present, class by class."""
    rng = np.random.default_rng(seed)
    picks = []
    for k in range(num_classes):
        idx = np.flatnonzero(labels == k)
        if len(idx):
            picks.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return np.array(picks, dtype=np.int64)


@torch.no_grad()
def reconstruct(model, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Decode each image's posterior mean (the clearest picture of what the model keeps)."""
    y = torch.from_numpy(labels) if model.num_classes else None
    mu, _ = model.encode(to_float(images), y)
    return to_uint8(model.mean_image(model.decode(mu, y)))


@torch.no_grad()
def samples(model, n: int = 64, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % model.num_classes if model.num_classes else None
    return to_uint8(model.sample(n, labels, generator=gen))


def write_run_pictures(run: RunDir, data_uri: str) -> dict[str, Any]:
    """Loss curves, reconstructions and samples of a run's latest checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if run.remote else Path(run.uri)
        plots, sample_dir = local / "plots", local / "samples"
        history = run.history()
        if history:
            loss_curves(history, plots / "loss_curves.png", title=run.name)
        loaded = ckpt.load(run.uri)
        images, labels = read_arrays(data_uri, "test", limit=MAX_TEST_ROWS)
        pick = two_per_class(labels, loaded.dataset["num_classes"], seed=loaded.config.seed)
        recon = reconstruct(loaded.model, images[pick], labels[pick])
        scale = max(1, min(4, 96 // images.shape[1]))
        save_png(pairs_grid(images[pick], recon, cols=10, scale=scale), plots / "reconstructions.png")
        drawn = samples(loaded.model, 64, seed=loaded.config.seed)
        save_grid(drawn, plots / "samples.png", cols=8)
        sample_dir.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(drawn):
            save_png(img, sample_dir / f"sample_{i:02d}.png")
        if run.remote:
            storage.upload(plots, run.path("plots"))
            storage.upload(sample_dir, run.path("samples"))
    return {"plots": run.path("plots"), "samples": run.path("samples")}
