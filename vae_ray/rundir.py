"""The run folder: everything a training run leaves, on local disk or S3.

    RUN/config.json                {"config": TrainConfig, "dataset": what workers need to know}
    RUN/metrics.jsonl              one line per epoch, appended once per epoch
    RUN/checkpoint_epoch_0007/     checkpoints persisted by Ray Train (the newest few kept)
    RUN/latest                     -> checkpoint_epoch_0007 (a symlink; on S3 an object naming it)
    RUN/best_checkpoint_epoch_0005/ a copy of the best checkpoint by `keep_best` (Ray keeps the newest)
    RUN/best                       -> best_checkpoint_epoch_0005
    RUN/stopped.json               why a run stopped early (a non-finite loss), until it is resumed
    RUN/plots/, RUN/samples/       pictures written when the run ends
    RUN/tensorboard/               TensorBoard event files (scalars and images per epoch)
    RUN/ray-logs/                  Ray's logs, kept only when a run on a private cluster failed

Only this module knows these names. The driver writes config.json; the Train
controller (`trainer.RunDirRecorder`) appends metrics and moves `latest`.

Resume lives here too: whether a command may start, continue or skip a run
(`check_run`), which settings a resumed run keeps (`merge_for_resume`), and
which of Ray Train's own files in the folder may be trusted
(`check_resumable`).

What makes Ray Train hand a worker the run's latest checkpoint: the driver
builds its `TorchTrainer` with the same `RunConfig(storage_path=RUN's parent,
name=RUN's name)`. Train V2's controller then finds
`RUN/checkpoint_manager_snapshot.json`, which it rewrote after every
checkpoint, and `ray.train.get_checkpoint()` in every worker returns the
newest checkpoint that snapshot names (worker.py, step 3). A restart after a
failure (`FailureConfig`) goes through the same snapshot. Nothing else of the
folder is read by Ray, which is why that snapshot is checked before a resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import storage
from .config import TrainConfig
from .errors import UserError

# Settings that define the model and its data: a resumed run must keep them.
MODEL_FIELDS = ("arch", "latent_dim", "width", "depth", "conditional", "loss", "data")
# Settings that may differ between two commands for the same run.
OPERATIONAL = (
    "out",
    "max_failures",
    "keep_checkpoints",
    "keep_best",
    "stall_timeout",
    "mlflow",
    "wandb",
    "cpus_per_worker",
    "gpu",
    "cache",
)

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the run's checkpoints
RAY_MARKER = ".validate_storage_marker"  # Ray Train's probe that the storage is writable
MAX_RAY_SNAPSHOT_BYTES = 16 * 2**20
_CHECKPOINT_DIR = re.compile(r"^checkpoint_epoch_[0-9]{4,9}$")
CHECKPOINT_DIR = _CHECKPOINT_DIR  # the names of the checkpoint folders vae-ray writes

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LATEST = "latest"
BEST = "best"
BEST_PREFIX = "best_checkpoint_epoch_"  # our copy of the best checkpoint (Ray prunes its own)
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

    def search(self) -> str | None:
        """The search folder this run is a trial of (`SEARCH/trials/<id>`), or None."""
        if storage.name_of(self.parent) != "trials":
            return None
        search = storage.parent_of(self.parent)
        return search if storage.is_file(storage.join(search, "search.json")) else None

    @contextlib.contextmanager
    def lock(self, command: str = "", as_trial: bool = False) -> Iterator[storage.Lock]:
        """One writer for the run (yields the run's lock). A run that is a
        search's trial belongs to that search while it runs: a command outside
        it (`train --resume`, `evaluate`) also takes the search's lock, so it
        fails at once while `vae-ray tune` holds it; the search's own trials
        pass `as_trial`. A trial on S3 waits for its run's lock until a holder
        that died (a trial process Tune restarts) would have gone stale."""
        wait = storage.Lock.STALE_S + storage.Lock.HEARTBEAT_S if as_trial else 0
        with contextlib.ExitStack() as held:
            search = None if as_trial else self.search()
            if search is not None:
                held.enter_context(storage.Lock(search, command))
            yield held.enter_context(storage.Lock(self.uri, command, wait_s=wait))

    # -- what is there ------------------------------------------------------
    def check_folder(self) -> None:
        if storage.is_file(self.uri):
            raise UserError(f"{self.uri}: exists and is not a folder")

    def holds_run(self) -> bool:
        names = storage.list_dir(self.uri)
        return METRICS in names or CONFIG in names or any(n.startswith(CHECKPOINT_PREFIX) for n in names)

    def is_empty(self) -> bool:
        """Nothing at all in the folder, hidden names included (a home directory
        holding only `.ssh/` and `.bashrc` is not an empty folder)."""
        return not storage.leaves(self.uri)

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
        if any(storage.is_file(self.path(LATEST, name)) for name in ("model.safetensors", "model.pt")):
            # a copied run: latest is a folder
            return self.path(LATEST)
        return None

    def best(self) -> str | None:
        """The URI of the best checkpoint kept by `keep_best`, or None."""
        target = storage.read_pointer(self.uri, BEST)
        return self.path(target) if target is not None else None

    def best_value(self, metric: str) -> float | None:
        """The kept best checkpoint's `metric`, or None when there is none."""
        best = self.best()
        if best is None:
            return None
        try:
            value = storage.read_json(storage.join(best, "state.json")).get("metrics", {}).get(metric)
        except (FileNotFoundError, ValueError, AttributeError):
            return None
        return float(value) if isinstance(value, (int, float)) else None

    def keep_best(self, checkpoint: str, epoch: int) -> str:
        """Copy the checkpoint folder `checkpoint` (a name in the run) to
        best_checkpoint_epoch_NNNN, point `best` at it, then remove the copy it
        replaces. Ray Train keeps only the newest checkpoints, so the best one
        needs a copy of its own to outlive them."""
        name = f"{BEST_PREFIX}{epoch:04d}"
        before = storage.read_pointer(self.uri, BEST)
        storage.copy_folder(self.path(checkpoint), self.path(name))
        storage.set_pointer(self.uri, BEST, name)
        if before and before != name and before.startswith(BEST_PREFIX):
            storage.delete(self.path(before))
        return self.path(name)

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


def describe_checkpoint(given: str, used: str) -> str:
    """The checkpoint a command used, and which of the run's pointers led there:
    'RUN/checkpoint_epoch_0010 (the run's latest)'."""
    if str(given).startswith("hf://"):  # a model on the Hugging Face Hub: `used` is its URI
        return used
    name = storage.name_of(str(given).rstrip("/"))
    if name in (BEST, LATEST):
        return f"{used} (the run's {name})"
    if storage.check_uri(str(given)) != used:  # a run folder: its latest checkpoint
        return f"{used} (the run's {LATEST})"
    return used


# ---------------------------------------------------------------------------
# Resume: start, continue or skip a run
# ---------------------------------------------------------------------------
def check_run(run: RunDir, cfg: TrainConfig, resume: bool) -> str:
    """'new', 'resume' or 'complete' (the same run, already finished).
    Anything else in the way is a UserError, before anything is written."""
    run.check_folder()
    saved = run.read_config()
    if resume:
        if saved is None:
            raise UserError(f"{run.uri}: nothing to resume (no config.json); start it without --resume")
        check_resumable(run)
        return "resume"
    if saved is None:
        if run.holds_run():
            raise UserError(f"{run.uri}: holds checkpoints but no config.json; choose another --out")
        if not run.is_empty():
            shown = storage.some(storage.leaves(run.uri))
            raise UserError(f"{run.uri}: holds other files, not a vae-ray run ({shown}); choose a new or empty --out")
        return "new"
    same = _comparable(saved[0]) == _comparable(cfg.to_dict())
    if same and run.last_epoch() >= cfg.epochs:
        return "complete"
    raise UserError(f"{run.uri}: already holds a training run; pass --resume to continue it or choose a new --out")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in OPERATIONAL}


def merge_for_resume(run: RunDir, changes: dict[str, Any]) -> TrainConfig:
    """The saved config with `changes` on top; model-defining settings stay."""
    saved = run.read_config()
    if saved is None:
        raise UserError(f"{run.uri}: nothing to resume (no config.json)")
    before = TrainConfig.from_dict(saved[0], source=run.path(CONFIG))
    for name in MODEL_FIELDS:
        value = changes.get(name)
        if (
            value is not None
            and value != getattr(before, name)
            and not (name == "data" and storage.check_uri(str(value)) == storage.check_uri(before.data))
        ):
            raise UserError(
                f"--resume keeps the run's {name} ({getattr(before, name)!r}); start a new run to change it"
            )
    return before.replace(**{k: v for k, v in changes.items() if v is not None and k not in MODEL_FIELDS})


def check_resumable(run: RunDir) -> None:
    """What a resume trusts before it writes: no link planted in the folder
    (a write or a delete there would reach what it leads to), Ray's
    checkpoint record, and the checkpoint it continues from."""
    from .checkpoint import check_restorable

    _refuse_links(run)
    check_ray_state(run)
    latest = run.latest()
    if latest:
        check_restorable(latest)


def _refuse_links(run: RunDir) -> None:
    if run.remote:  # objects are not links
        return
    root = Path(storage.filesystem(run.uri)[1])
    for rel in storage.leaves(run.uri):
        rel = rel.rstrip("/")
        if rel not in (LATEST, BEST) and os.path.islink(root / rel):  # the pointers are links vae-ray made
            raise UserError(
                f"{storage.printable(run.path(rel))}: is a link; vae-ray writes only into files and folders "
                f"it made (remove the link to resume)"
            )
        if rel == METRICS and os.lstat(root / rel).st_nlink > 1:  # appended in place: the other name would change too
            raise UserError(f"{storage.printable(run.path(rel))}: is a hard link (another name shares the file)")


def check_ray_state(run: RunDir) -> None:
    """Refuse a run folder whose Ray Train snapshot names anything but one of
    our checkpoint folders inside it. Ray joins every name in the snapshot to
    the run's path and, when it prunes old checkpoints, deletes them: an
    absolute name or one holding '..' would delete a folder elsewhere."""
    uri = run.path(RAY_SNAPSHOT)
    fs, path = storage.filesystem(uri)
    if not run.remote and os.path.islink(uri):  # (filesystem() resolves links: ask about the name itself)
        raise UserError(f"{uri}: is a link; a run's checkpoint record is a plain file")
    size = fs.get_file_info(path).size
    if size is None:  # no snapshot: Ray starts from scratch, nothing of it is read
        return
    if size > MAX_RAY_SNAPSHOT_BYTES:
        raise UserError(f"{uri}: {size:,} bytes, too large for a run's checkpoint record (corrupt or not Ray's)")
    try:
        snapshot = json.loads(storage.read_bytes(uri))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{uri}: not valid JSON (a damaged run folder)") from None
    for name in _dir_names(snapshot):
        if not isinstance(name, str) or not _CHECKPOINT_DIR.match(name):
            raise UserError(
                f"{uri}: names the checkpoint folder {storage.printable(repr(name))}, which is not one of this "
                f"run's (checkpoint_epoch_NNNN); vae-ray will not resume from it"
            )


def _dir_names(node: Any) -> list[Any]:
    """Every checkpoint folder name anywhere in Ray's snapshot (keys
    `checkpoint_dir_name` and lists under `*_dir_names`)."""
    found: list[Any] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "checkpoint_dir_name":
                found.append(value)
            elif str(key).endswith("_dir_names"):
                found.extend(value if isinstance(value, list) else [value])
            else:
                found.extend(_dir_names(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_dir_names(item))
    return found
