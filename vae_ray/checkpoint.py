"""Checkpoints: fixed file names, the resolved config inside, safe to load.

    model.safetensors     the model's weights; the weight average with --ema
    optimizer.pt          the optimizer's state_dict (tensors, numbers, lists)
    state.json            epoch, global step, the epoch's metrics
    config.json           {"config": TrainConfig, "dataset": shape/classes/name/shards}
    training.safetensors  with --ema only: the optimizer's own weights, to resume from

Weights are safetensors files: a bounded JSON header and raw tensor bytes,
nothing a reader executes, the format model hubs and their scanners expect.
The optimizer's state is a nested dict of tensors and numbers, which
safetensors cannot hold; it is read with `torch.load(weights_only=True)`
(whose known escape was fixed in torch 2.6, the floor), and only by a worker
resuming its own run. Checkpoints written before safetensors (`model.pt`,
`training.pt`) still load, the same safe way.

`save` and `restore` run on training workers; `load` and `load_blob` serve
generate, evaluate, encode, report and the Python API, from a checkpoint
folder, a run (its `latest`), a folder `vae-ray export` wrote (its
config.json also holds the state), local, s3:// or hf://ORG/NAME (a remote
one is copied to a temporary folder first).
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

from . import hub, storage
from .config import TrainConfig
from .data import MAX_CLASSES
from .errors import UserError, first_line
from .model import VAE, build_model
from .rundir import RunDir
from .sources import MAX_IMAGE_SIZE

WEIGHTS = "model.safetensors"
TRAINING_WEIGHTS = "training.safetensors"
FILES = (WEIGHTS, "optimizer.pt", "state.json", "config.json")
# What checkpoints written before safetensors hold instead (still loaded).
LEGACY = {WEIGHTS: "model.pt", TRAINING_WEIGHTS: "training.pt"}
ALL_FILES = (*FILES, TRAINING_WEIGHTS, *LEGACY.values())


# ---------------------------------------------------------------------------
# Workers: save and restore
# ---------------------------------------------------------------------------
def _plain_layout(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights as every PyTorch reader expects them (contiguous), whatever
    layout the workers trained in (channels-last on the CPU)."""
    return {name: tensor.contiguous() for name, tensor in weights.items()}


def save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(_plain_layout(model.state_dict()), str(path), metadata={"format": "pt"})


def weights_file(directory: Path, name: str = WEIGHTS) -> Path | None:
    """The file holding `name`'s weights in a checkpoint folder: the
    safetensors file, else the one an older checkpoint wrote, else None."""
    for candidate in (name, LEGACY.get(name)):
        if candidate and (Path(directory) / candidate).is_file():
            return Path(directory) / candidate
    return None


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors only, from either format; nothing in the file is executed."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device))
    return torch.load(path, map_location=device, weights_only=True)


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
    save_weights(model, directory / WEIGHTS)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    if training_weights is not None:  # --ema: WEIGHTS is the average; these are what the optimizer moves
        save_weights(training_weights, directory / TRAINING_WEIGHTS)
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
    average = weights_file(directory)
    if average is None:
        raise FileNotFoundError(f"{directory}: no {WEIGHTS}")
    model.load_state_dict(read_weights(weights_file(directory, TRAINING_WEIGHTS) or average, device))
    if averaged is not None:
        averaged.load_state_dict(read_weights(average, device))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
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
    path: str  # the checkpoint's own URI (hf://ORG/NAME as given)
    local: Path  # where its files are on this machine
    exported: dict[str, Any] | None = None  # an exported model's config.json (its evaluation figures)


def is_checkpoint(uri: str) -> bool:
    return any(storage.is_file(storage.join(uri, name)) for name in (WEIGHTS, LEGACY[WEIGHTS]))


def resolve(path: str | Path) -> str:
    """A checkpoint folder, an exported model folder, or a run folder (whose
    `latest` is followed); local, s3:// or hf://ORG/NAME (downloaded first)."""
    if str(path).startswith(hub.SCHEME):
        return str(hub.download(str(path)))
    uri = storage.check_uri(str(path))
    if not storage.exists(uri):
        raise UserError(f"{path}: no such checkpoint, model or run folder")
    if is_checkpoint(uri):
        return uri
    latest = RunDir(uri).latest()
    if latest is not None and is_checkpoint(latest):
        return latest
    raise UserError(f"{path}: neither a checkpoint or exported model (no {WEIGHTS}) nor a run with a checkpoint")


_COPIES: dict[str, Path] = {}


def local_copy(uri: str) -> Path:
    """A checkpoint's files on this machine (remote ones copied once per process)."""
    if not storage.is_remote(uri):
        return Path(uri)
    if uri not in _COPIES:
        folder = Path(tempfile.mkdtemp(prefix="vae-ray-checkpoint-"))
        atexit.register(shutil.rmtree, folder, True)
        for name in ALL_FILES:
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
            f"but {weights.name} holds {held:,} bytes)"
        )


def _build(cfg: dict[str, Any], dataset: dict[str, Any]) -> VAE:
    return build_model(
        cfg["arch"],
        dataset["shape"],
        cfg["latent_dim"],
        dataset["num_classes"] if cfg["conditional"] else 0,
        cfg["loss"],
        int(cfg.get("width") or 0),
        int(cfg.get("depth") or 0),
    )


def read_state(directory: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The checkpoint's state.json, and the config.json of an exported model
    (which holds the state instead), else None."""
    meta = json.loads((directory / "config.json").read_text())
    exported = meta if isinstance(meta, dict) and meta.get("format") == hub.FORMAT else None
    if (directory / "state.json").is_file():
        state = json.loads((directory / "state.json").read_text())
    else:
        state = (exported or {}).get("state", {})
    if not isinstance(state, dict):
        raise ValueError("state is not an object")
    return state, exported


def load(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Rebuild the model from a checkpoint (or a run's latest, or an exported folder) on `device`."""
    uri = resolve(path)
    directory = local_copy(uri)
    config, dataset = read_config(uri)
    weights_path = weights_file(directory)
    try:
        _check_size(uri, config, dataset, weights_path)
        state, exported = read_state(directory)
        weights = read_weights(weights_path, device)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load and safetensors raise many types for damaged files
        raise UserError(f"{uri}: corrupt checkpoint ({first_line(exc, 200)})") from None
    try:
        model = _build(config.to_dict(), dataset)
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{uri}: weights do not match the config ({first_line(exc, 200)})") from None
    shown = str(path).rstrip("/") if str(path).startswith(hub.SCHEME) else uri
    return Loaded(model.to(device).eval(), config, dataset, state, shown, directory, exported)


def check_restorable(path: str | Path) -> None:
    """The checkpoint a resumed run will restore, checked before any worker
    starts: one line naming it when any of its files is damaged."""
    loaded = load(path)  # weights, config and state.json: one line when damaged
    try:
        int(loaded.state["epoch"]), int(loaded.state["global_step"])
        torch.load(loaded.local / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for damaged files
        raise UserError(f"{loaded.path}: corrupt checkpoint, cannot resume from it ({first_line(exc, 200)})") from None


def load_blob(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one picklable dict for Ray workers: weights (loaded
    safely), config, dataset description and the weights' digest."""
    loaded = load(path)
    return {"weights": loaded.model.state_dict(), **describe(loaded)}


def describe(loaded: Loaded) -> dict[str, Any]:
    """What a loaded checkpoint is, without its weights: config, dataset
    description, the weights file's digest, where it came from and where its
    files are on this machine (an exported model's folder also holds its mixture prior)."""
    return {
        "config": loaded.config.to_dict(),
        "dataset": loaded.dataset,
        "sha256": hashlib.sha256(weights_file(loaded.local).read_bytes()).hexdigest(),
        "path": loaded.path,
        "local": str(loaded.local),
        "exported": loaded.exported is not None,
        "evaluation": (loaded.exported or {}).get("evaluation") if loaded.exported else None,
    }


def model_from_blob(blob: dict[str, Any]) -> VAE:
    model = _build(blob["config"], blob["dataset"])
    model.load_state_dict(blob["weights"])
    return model.eval()
