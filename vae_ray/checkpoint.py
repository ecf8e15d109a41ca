"""Checkpoints: fixed file names, the resolved config inside, safe to load.

    model.pt      the model's state_dict (tensors only)
    optimizer.pt  the optimizer's state_dict
    state.json    epoch, global step, the epoch's metrics
    config.json   {"config": TrainConfig, "dataset": shape/classes/name}
    training.pt   with --ema only: the optimizer's own weights, to resume from
                  (model.pt then holds the weight average)

Everything is loaded with `torch.load(weights_only=True)`: no code from a
checkpoint file ever runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .errors import UserError
from .model import VAE, build_model

FILES = ("model.pt", "optimizer.pt", "state.json", "config.json")
TRAINING_WEIGHTS = "training.pt"


def save(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         state: dict[str, Any], config: dict[str, Any], dataset: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "model.pt")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps({"config": config, "dataset": dataset}, indent=2) + "\n")
    return directory


@dataclass
class Loaded:
    model: VAE
    config: TrainConfig
    dataset: dict[str, Any]
    state: dict[str, Any]
    path: Path


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (whose `latest` is followed)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or run folder")
    if (path / "model.pt").is_file():
        return path
    latest = path / "latest"
    if latest.exists() and (latest / "model.pt").is_file():
        return latest.resolve()
    raise UserError(f"{path}: neither a checkpoint (no model.pt) nor a run with a checkpoint (no latest)")


def read_config(path: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    directory = resolve(path)
    try:
        blob = json.loads((directory / "config.json").read_text())
        return TrainConfig.from_dict(blob["config"], source=str(directory / "config.json")), blob["dataset"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{directory}: unreadable config.json ({exc.__class__.__name__})") from None


def load(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Rebuild the model from a checkpoint (or a run's latest) on `device`."""
    directory = resolve(path)
    config, dataset = read_config(directory)
    try:
        state = json.loads((directory / "state.json").read_text())
        weights = torch.load(directory / "model.pt", map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for damaged files
        raise UserError(f"{directory}: corrupt checkpoint ({_first_line(exc)})") from None
    model = build_model(config.arch, dataset["shape"], config.latent_dim,
                        dataset["num_classes"] if config.conditional else 0, config.loss)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as exc:
        raise UserError(f"{directory}: weights do not match the config ({_first_line(exc)})") from None
    return Loaded(model.to(device).eval(), config, dataset, state, directory)


def load_blob(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one picklable dict for Ray workers: weights (loaded
    safely), config, dataset description and the weights' digest."""
    import hashlib

    loaded = load(path)
    sha = hashlib.sha256((loaded.path / "model.pt").read_bytes()).hexdigest()
    return {"weights": loaded.model.state_dict(), "config": loaded.config.to_dict(),
            "dataset": loaded.dataset, "sha256": sha, "path": str(loaded.path)}


def model_from_blob(blob: dict[str, Any]) -> VAE:
    cfg, dataset = blob["config"], blob["dataset"]
    model = build_model(cfg["arch"], dataset["shape"], cfg["latent_dim"],
                        dataset["num_classes"] if cfg["conditional"] else 0, cfg["loss"])
    model.load_state_dict(blob["weights"])
    return model.eval()


def point_latest(run_dir: Path, checkpoint_dir: Path, name: str = "latest") -> None:
    """Atomically make RUN/<name> a relative symlink to `checkpoint_dir`."""
    link = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(checkpoint_dir, run_dir), tmp)
    os.replace(tmp, link)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
