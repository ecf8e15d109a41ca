"""The judge: a small CNN classifier per dataset, trained here because
Inception weights cannot be downloaded. Its 128-wide penultimate layer is
the feature space for Frechet distance and precision/recall; its class
probabilities give the Inception Score; trained on generated images only,
it measures Train-on-Synthetic-Test-on-Real.

Cached beside the dataset (`DATA/classifier/`) with the dataset's checksum,
so a changed dataset is never judged by a stale classifier.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import storage
from .data import dataset_read_lock, read_arrays, read_meta
from .errors import UserError
from .images import to_float

FEATURES = 128
FOLDER = "classifier"


class Judge(nn.Module):
    """conv32-pool-conv64-pool-conv128 (BatchNorm, ReLU) -> 128 features -> classes."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.body = nn.Sequential(
            *block(channels, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            nn.MaxPool2d(2),
            *block(64, 128),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128 * 4, FEATURES),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.out = nn.Linear(FEATURES, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [0, 1] (N, C, H, W) -> (features, logits)."""
        feats = self.body(x * 2 - 1)
        return feats, self.out(self.dropout(feats))


BATCH = 128


def fit(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    epochs: int = 3,
    batch_size: int = BATCH,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Judge:
    """Train a judge on uint8 images; `progress(step, steps, loss)` is called now and then."""
    torch.manual_seed(seed)
    model = Judge(images.shape[-1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = max(1, len(images) // batch_size)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    rng = np.random.default_rng(seed)
    step = 0
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for b in range(steps_per_epoch):
            pick = order[b * batch_size : (b + 1) * batch_size]
            _, logits = model(to_float(images[pick]))
            loss = F.cross_entropy(logits, torch.from_numpy(labels[pick]).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress and (step % 20 == 0 or step == total):
                progress(step, total, loss.item())
    return model.eval()


@torch.no_grad()
def features_and_probs(model: Judge, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        f, logits = model(to_float(images[start : start + batch_size]))
        feats.append(f.numpy())
        probs.append(torch.softmax(logits, 1).numpy())
    return np.concatenate(feats), np.concatenate(probs)


def accuracy(model: Judge, images: np.ndarray, labels: np.ndarray) -> float:
    _, probs = features_and_probs(model, images)
    return float((probs.argmax(1) == labels).mean())


# ---------------------------------------------------------------------------
# The cached judge of a dataset
# ---------------------------------------------------------------------------
def dataset_digest(meta: dict) -> str:
    """A digest of the dataset's shard checksums: the identity a judge is tied to."""
    sums = [s["sha256"] for split in sorted(meta["splits"]) for s in meta["splits"][split]["shards"]]
    return hashlib.sha256("".join(sums).encode()).hexdigest()


def folder_for(data: str, seed: int = 0) -> Path:
    """Seed 0 is the judge of evaluate and evaluate-set (DATA/classifier);
    other seeds are kept apart (DATA/classifier/seed-S), so a set filtered by
    one (generate --min-confidence) is never judged by the same network."""
    if storage.is_remote(str(data)):
        raise UserError(f"{data}: the judge classifier is cached beside a local dataset; copy it locally first")
    folder = Path(storage.check_uri(str(data))) / FOLDER
    folder = folder / f"seed-{seed}" if seed else folder
    for part in (folder.parent, folder) if seed else (folder,):
        if part.is_symlink():  # a planted link would send the judge's files (or its reads) elsewhere
            raise UserError(f"{part}: is a link; vae-ray keeps its judge there and never writes through one")
    return folder


def weights_digest(data: str, seed: int = 0) -> str:
    """SHA-256 of a cached judge's weights file: a filtered set's plan names the judge it was filtered by."""
    return hashlib.sha256((folder_for(data, seed) / "model.pt").read_bytes()).hexdigest()


def train(
    data: str,
    epochs: int = 3,
    batch_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Train and cache the judge of a prepared dataset (in its classifier/ folder); return its info."""
    with dataset_read_lock(data):  # it reads the dataset and writes inside it: prepare must wait
        return _train(data, epochs, batch_size, seed, overwrite, progress)


def _train(
    data: str,
    epochs: int,
    batch_size: int,
    seed: int,
    overwrite: bool,
    progress: Callable[[int, int, float], None] | None,
) -> dict:
    meta = read_meta(data)
    if meta["num_classes"] < 2:
        raise UserError(f"{data}: the judge needs labelled data with at least 2 classes")
    if not 1 <= epochs <= 1000:
        raise UserError(f"--epochs must be between 1 and 1000 (got {epochs})")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be between 0 and {2**32 - 1} (got {seed})")
    folder = folder_for(data, seed)
    if (folder / "info.json").exists() and not overwrite:
        info = json.loads((folder / "info.json").read_text())
        if info.get("dataset_sha256") == dataset_digest(meta):
            raise UserError(
                f"{folder}: a classifier is already cached "
                f"(test accuracy {info['test_accuracy']:.4f}); --overwrite to retrain"
            )
    started = time.time()
    images, labels = read_arrays(data, "train", meta=meta)
    model = fit(images, labels, meta["num_classes"], epochs, batch_size, seed=seed, progress=progress)
    test_images, test_labels = read_arrays(data, "test", meta=meta)
    info = {
        "dataset": meta["name"],
        "dataset_sha256": dataset_digest(meta),
        "channels": meta["shape"][2],
        "num_classes": meta["num_classes"],
        "epochs": epochs,
        "seed": seed,
        "train_images": len(images),
        "test_accuracy": accuracy(model, test_images, test_labels),
        "seconds": round(time.time() - started, 1),
    }
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    storage.write_local_atomic(folder / "model.pt", buffer.getvalue())
    storage.write_local_atomic(folder / "info.json", (json.dumps(info, indent=2) + "\n").encode())
    return info | {"path": str(folder)}


def load(data: str, meta: dict, seed: int = 0) -> tuple[Judge, dict] | None:
    """The dataset's cached judge of that seed, or None when there is none (or it is stale)."""
    folder = folder_for(data, seed)
    try:
        info = json.loads((folder / "info.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("dataset_sha256") != dataset_digest(meta):
        return None
    model = Judge(info["channels"], info["num_classes"])
    try:
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - damaged file
        raise UserError(
            f"{folder / 'model.pt'}: corrupt classifier ({type(exc).__name__}); "
            "retrain with `vae-ray classifier train --overwrite`"
        ) from None
    return model.eval(), info
