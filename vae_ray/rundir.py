"""The run folder: everything a training run leaves, on local disk or S3.

    RUN/config.json                {"config": TrainConfig, "dataset": what workers need to know}
    RUN/metrics.jsonl              one line per epoch, appended once per epoch
    RUN/checkpoint_epoch_0007/     checkpoints persisted by Ray Train (the newest few kept)
    RUN/latest                     -> checkpoint_epoch_0007 (a symlink; on S3 an object naming it)
    RUN/stopped.json               why a run stopped early (a non-finite loss), until it is resumed
    RUN/plots/, RUN/samples/       pictures written when the run ends
    RUN/tensorboard/               TensorBoard event files (scalars and images per epoch)
    RUN/ray-logs/                  Ray's logs, kept only when a run on a private cluster failed

Only this module knows these names. The driver writes config.json; the Train
controller (`trainer.RunDirCallback`) appends metrics and moves `latest`.
"""

from __future__ import annotations

from typing import Any

from . import storage
from .errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LATEST = "latest"
STOPPED = "stopped.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


class RunDir:
    def __init__(self, uri: str):
        self.uri = storage.check_uri(uri)

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.uri)

    @property
    def name(self) -> str:
        return storage.name_of(self.uri)

    @property
    def parent(self) -> str:
        return storage.parent_of(self.uri)

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def lock(self) -> storage.Lock:
        return storage.Lock(self.uri)

    # -- what is there ------------------------------------------------------
    def check_folder(self) -> None:
        if storage.is_file(self.uri):
            raise UserError(f"{self.uri}: exists and is not a folder")

    def holds_run(self) -> bool:
        names = storage.list_dir(self.uri)
        return METRICS in names or CONFIG in names or any(n.startswith(CHECKPOINT_PREFIX) for n in names)

    def is_empty(self) -> bool:
        return not [n for n in storage.list_dir(self.uri) if not n.startswith(".")]

    # -- config -------------------------------------------------------------
    def read_config(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(config, dataset) as saved by the run, or None when there is none."""
        try:
            blob = storage.read_json(self.path(CONFIG))
        except FileNotFoundError:
            return None
        except ValueError:
            raise UserError(f"{self.path(CONFIG)}: not valid JSON (corrupt run folder)") from None
        if not isinstance(blob, dict) or not isinstance(blob.get("config"), dict):
            raise UserError(f"{self.path(CONFIG)}: not a vae-ray run config")
        return blob["config"], blob.get("dataset", {})

    def write_config(self, config: dict[str, Any], dataset: dict[str, Any]) -> None:
        storage.write_json(self.path(CONFIG), {"config": config, "dataset": dataset})

    # -- metrics --------------------------------------------------------------
    def history(self) -> list[dict[str, Any]]:
        """One record per finished epoch, in order (a torn last line is skipped)."""
        return storage.read_jsonl(self.path(METRICS))

    def last_epoch(self) -> int:
        return max((h.get("epoch", 0) for h in self.history()), default=0)

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        storage.append_jsonl(self.path(METRICS), metrics)

    # -- checkpoints ----------------------------------------------------------
    def point_latest(self, checkpoint: str) -> None:
        storage.set_pointer(self.uri, LATEST, checkpoint)

    def latest(self) -> str | None:
        """The URI of the newest checkpoint, or None."""
        target = storage.read_pointer(self.uri, LATEST)
        if target is not None:
            return self.path(target)
        if storage.is_file(self.path(LATEST, "model.pt")):  # a copied run: latest is a folder
            return self.path(LATEST)
        return None

    # -- early stops ----------------------------------------------------------
    def mark_stopped(self, record: dict[str, Any]) -> None:
        storage.write_json(self.path(STOPPED), record)

    def stopped(self) -> dict[str, Any] | None:
        try:
            return storage.read_json(self.path(STOPPED))
        except (FileNotFoundError, ValueError):
            return None

    def clear_stopped(self) -> None:
        storage.delete(self.path(STOPPED))
