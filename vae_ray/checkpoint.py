"""Checkpoints: fixed file names, the resolved config inside, safe to load.

    model.pt      the model's state_dict (tensors only); the weight average with --ema
    optimizer.pt  the optimizer's state_dict
    state.json    epoch, global step, the epoch's metrics
    config.json   {"config": TrainConfig, "dataset": shape/classes/name/shards}
    training.pt   with --ema only: the optimizer's own weights, to resume from

Everything is loaded with `torch.load(weights_only=True)`: no code from a
checkpoint file ever runs. `save` and `restore` run on training workers;
`load` and `load_blob` serve generate, evaluate and report, from a local
folder or s3:// (a remote checkpoint is copied to a temporary folder first).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import storage
from .config import TrainConfig
from .data import MAX_CLASSES
from .errors import UserError, first_line
from .model import VAE, build_model
from .rundir import RunDir
from .sources import MAX_IMAGE_SIZE

FILES = ("model.pt", "optimizer.pt", "state.json", "config.json")
TRAINING_WEIGHTS = "training.pt"


# ---------------------------------------------------------------------------
# Workers: save and restore
# ---------------------------------------------------------------------------
def _plain_layout(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights as every PyTorch reader expects them (contiguous), whatever
    layout the workers trained in (channels-last on the CPU)."""
    return {name: tensor.contiguous() for name, tensor in weights.items()}


def save(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    config: dict[str, Any],
    dataset: dict[str, Any],
    training_weights: torch.nn.Module | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_plain_layout(model.state_dict()), directory / "model.pt")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    if training_weights is not None:  # --ema: model.pt is the average; these are what the optimizer moves
        torch.save(_plain_layout(training_weights.state_dict()), directory / TRAINING_WEIGHTS)
    (directory / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps({"config": config, "dataset": dataset}, indent=2) + "\n")
    return directory


def restore(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    averaged: torch.nn.Module | None,
    device: torch.device,
) -> dict[str, Any]:
    """Load a checkpoint into a training worker's model, optimizer and weight
    average; return its state (epoch, global step)."""
    directory = Path(directory)

    def load(name: str):
        return torch.load(directory / name, map_location=device, weights_only=True)

    own = TRAINING_WEIGHTS if (directory / TRAINING_WEIGHTS).is_file() else "model.pt"
    model.load_state_dict(load(own))
    if averaged is not None:
        averaged.load_state_dict(load("model.pt"))
    optimizer.load_state_dict(load("optimizer.pt"))
    return json.loads((directory / "state.json").read_text())


# ---------------------------------------------------------------------------
# Readers: load a checkpoint or a run's latest one
# ---------------------------------------------------------------------------
@dataclass
class Loaded:
    model: VAE
    config: TrainConfig
    dataset: dict[str, Any]
    state: dict[str, Any]
    path: str  # the checkpoint's own URI
    local: Path  # where its files are on this machine


def resolve(path: str | Path) -> str:
    """A checkpoint folder, or a run folder (whose `latest` is followed); local or s3://."""
    uri = storage.check_uri(str(path))
    if not storage.exists(uri):
        raise UserError(f"{path}: no such checkpoint or run folder")
    if storage.is_file(storage.join(uri, "model.pt")):
        return uri
    latest = RunDir(uri).latest()
    if latest is not None and storage.is_file(storage.join(latest, "model.pt")):
        return latest
    raise UserError(f"{path}: neither a checkpoint (no model.pt) nor a run with a checkpoint (no latest)")


_COPIES: dict[str, Path] = {}


def local_copy(uri: str) -> Path:
    """A checkpoint's files on this machine (remote ones copied once per process)."""
    if not storage.is_remote(uri):
        return Path(uri)
    if uri not in _COPIES:
        folder = Path(tempfile.mkdtemp(prefix="vae-ray-checkpoint-"))
        atexit.register(shutil.rmtree, folder, True)
        for name in (*FILES, TRAINING_WEIGHTS):
            source = storage.join(uri, name)
            if storage.exists(source):
                (folder / name).write_bytes(storage.read_bytes(source))
        _COPIES[uri] = folder
    return _COPIES[uri]


def read_config(path: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    directory = local_copy(resolve(path))
    try:
        blob = json.loads((directory / "config.json").read_text())
        config, dataset = TrainConfig.from_dict(blob["config"], source=str(path)), blob["dataset"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable config.json ({exc.__class__.__name__})") from None
    check_dataset(path, dataset)
    return config, dataset


def check_dataset(path: str | Path, dataset: Any) -> None:
    """The image shape and class count a checkpoint's config.json describes,
    within the bounds `data prepare` applies (sides 1..MAX_IMAGE_SIZE, 1 or 3
    channels, at most MAX_CLASSES classes), before any model is built from
    them. (The latent size is TrainConfig's, checked by its own bounds.)"""
    shape = dataset.get("shape") if isinstance(dataset, dict) else None
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int for v in shape)):
        raise UserError(
            f"{path}: config.json's dataset shape {storage.printable(repr(shape))[:80]} is not [height, width, channels]"
        )
    h, w, c = shape
    if not (1 <= h <= MAX_IMAGE_SIZE and 1 <= w <= MAX_IMAGE_SIZE):
        raise UserError(f"{path}: config.json describes {h}x{w}x{c} images; sides must be 1 to {MAX_IMAGE_SIZE}")
    if c not in (1, 3):
        raise UserError(f"{path}: config.json describes {h}x{w}x{c} images; channels must be 1 or 3")
    count = dataset.get("num_classes")
    if not (type(count) is int and 0 <= count <= MAX_CLASSES):
        raise UserError(
            f"{path}: config.json's dataset num_classes {storage.printable(repr(count))[:40]} "
            f"is not a number of classes (0 to {MAX_CLASSES})"
        )


def _check_size(uri: str, config: TrainConfig, dataset: dict[str, Any], weights: Path) -> None:
    """The model the config describes, measured without memory (built on
    PyTorch's meta device), must fit in its weights file: a small file whose
    config.json promises a huge model is refused before a tensor is made."""
    try:
        with torch.device("meta"):
            model = _build(config.to_dict(), dataset)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{uri}: weights do not match the config ({first_line(exc, 200)})") from None
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    held = weights.stat().st_size
    if needed > held:
        raise UserError(
            f"{uri}: corrupt checkpoint (config.json describes a model of {needed:,} bytes, "
            f"but model.pt holds {held:,} bytes)"
        )


def _build(cfg: dict[str, Any], dataset: dict[str, Any]) -> VAE:
    return build_model(
        cfg["arch"],
        dataset["shape"],
        cfg["latent_dim"],
        dataset["num_classes"] if cfg["conditional"] else 0,
        cfg["loss"],
    )


def load(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Rebuild the model from a checkpoint (or a run's latest) on `device`."""
    uri = resolve(path)
    directory = local_copy(uri)
    config, dataset = read_config(uri)
    try:
        _check_size(uri, config, dataset, directory / "model.pt")
        state = json.loads((directory / "state.json").read_text())
        weights = torch.load(directory / "model.pt", map_location=device, weights_only=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for damaged files
        raise UserError(f"{uri}: corrupt checkpoint ({first_line(exc, 200)})") from None
    try:
        model = _build(config.to_dict(), dataset)
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{uri}: weights do not match the config ({first_line(exc, 200)})") from None
    return Loaded(model.to(device).eval(), config, dataset, state, uri, directory)


def load_blob(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one picklable dict for Ray workers: weights (loaded
    safely), config, dataset description and the weights' digest."""
    loaded = load(path)
    sha = hashlib.sha256((loaded.local / "model.pt").read_bytes()).hexdigest()
    return {
        "weights": loaded.model.state_dict(),
        "config": loaded.config.to_dict(),
        "dataset": loaded.dataset,
        "sha256": sha,
        "path": loaded.path,
    }


def model_from_blob(blob: dict[str, Any]) -> VAE:
    model = _build(blob["config"], blob["dataset"])
    model.load_state_dict(blob["weights"])
    return model.eval()
