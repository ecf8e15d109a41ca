"""What a training worker asks of whatever runs it: Ray Train, or this process.

`train_loop` (worker.py) asks its session for its rank, device, checkpoint to
resume from and data shard, and reports each epoch to it. Three sessions:

- `RaySession`: a Ray Train worker. Ray Train persists the checkpoints into
  the run folder and calls `RunDirRecorder` on its controller.
- `LocalSession`: one process, no Ray. A run of one worker with no cluster
  named (no --address, no RAY_ADDRESS, no Ray in the process) trains in the
  command's own process: no local cluster, Train controller or worker actor
  to start, each importing torch. The session does what Ray Train and the
  callback do: writes each checkpoint into the run, appends the epoch to
  metrics.jsonl, points `latest` (and `best`) at it, and keeps the newest
  --keep-checkpoints. The same files, so either kind of run resumes the other.
- `TrialSession`: a LocalSession in a search's Tune trial actor (a trial of
  one worker on the search's own machine), which also reports each epoch to Tune.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

from . import storage
from .errors import UserError
from .rundir import CHECKPOINT_DIR, CHECKPOINT_PREFIX, RAY_SNAPSHOT, RunDir


class RaySession:
    """A Ray Train worker's view (ray.train's functions)."""

    def rank_world(self) -> tuple[int, int]:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        """The folder of the checkpoint Ray Train resumes from (after a
        restart, or from the run's record of its checkpoints), or None."""
        import ray.train

        found = ray.train.get_checkpoint()
        if not found:
            yield None
            return
        with found.as_directory() as directory:
            yield directory

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def board(self, name: str | None):
        """The driver's progress board (a named actor), or None."""
        import ray

        if not name:
            return None
        try:
            return ray.get_actor(name)
        except ValueError:
            return None

    def report(self, metrics: dict, folder: str | None, name: str) -> bool:
        """Report an epoch (every rank; a barrier). Where Ray Train can, the
        checkpoint is uploaded in its background thread while the next epoch
        trains, and Ray deletes `folder` after the upload: returns True when
        the folder is Ray's to delete, False when the caller still owns it."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        background = async_upload()
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, **background)
        return bool(folder and background)


@functools.cache  # the Ray release does not change within a process; asked at every report
def async_upload() -> dict[str, Any]:
    """ray.train.report's arguments for a checkpoint uploaded in the
    background (Ray Train V2), or none where this Ray has no such mode: its
    ranks then wait for rank 0's upload at every report."""
    import inspect

    import ray.train

    if "checkpoint_upload_mode" not in inspect.signature(ray.train.report).parameters:
        return {}
    return {
        "checkpoint_upload_mode": ray.train.CheckpointUploadMode.ASYNC,
        "delete_local_checkpoint_after_upload": True,
    }


class Stopped(Exception):
    """Raised in the training thread of a one-process run the command is ending (Ctrl-C, a stall)."""


class LocalBoard:
    """The progress board in this process, called as the worker calls the
    actor's. The worker updates it every few steps, which is where a run
    being stopped ends its training thread."""

    def __init__(self) -> None:
        from .progress import ProgressBoard

        self._board, self._lock = ProgressBoard(), threading.Lock()
        self.stopping = threading.Event()
        self.update = SimpleNamespace(remote=self._update)

    def _update(self, **values: Any) -> None:
        if self.stopping.is_set():
            raise Stopped
        with self._lock:
            self._board.update(**values)

    def get(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return self._board.get()


class LocalSession:
    """Rank 0 of 1 in this process, writing the run folder itself."""

    def __init__(self, run: RunDir, device: torch.device, board: LocalBoard, callback, keep: int, lock_token: str = ""):
        self.run, self._device, self._board, self.callback, self.keep = run, device, board, callback, keep
        self.lock_token = lock_token
        self.reported = 0

    def rank_world(self) -> tuple[int, int]:
        return 0, 1

    def device(self) -> torch.device:
        return self._device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self._device)

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        """The run's latest checkpoint (this session writes no other record)."""
        from .checkpoint import local_copy

        latest = self.run.latest()
        yield str(local_copy(latest)) if latest else None

    def dataset_shard(self, name: str):
        raise RuntimeError("one-process training reads its split into memory; a streamed split needs Ray")

    def board(self, name: str | None) -> LocalBoard:
        return self._board

    def stop(self) -> None:
        """End the training thread at its next progress update or report."""
        self._board.stopping.set()

    def report(self, metrics: dict, folder: str | None, name: str) -> bool:
        """Write the checkpoint into the run, then the metrics; the caller
        keeps `folder` (returns False, as RaySession does for a synchronous upload)."""
        self._write(metrics, folder, name)
        return False

    def _write(self, metrics: dict, folder: str | None, name: str) -> str | None:
        """What report() does: the run folder's files; returns the checkpoint's path (or None)."""
        if self._board.stopping.is_set():
            raise Stopped
        if self.lock_token:  # before anything is removed: the run is still this command's
            storage.ensure_lock_held(self.run.uri, self.lock_token)
        if self.reported == 0 and storage.is_file(self.run.path(RAY_SNAPSHOT)):
            # Ray Train's record of the run's checkpoints no longer lists the
            # newest: a later Ray run resumes from `latest` instead (worker.py, step 3).
            self._remove(self.run.path(RAY_SNAPSHOT))
        self.reported += 1
        target = None
        if folder:
            target = self.run.path(name)
            self._remove(target)  # this epoch's checkpoint from a run that ended before pointing at it
            storage.upload(folder, target)
        # `latest` moves only once the checkpoint is whole, as after Ray Train's upload.
        self.callback.after_report(None, [metrics], SimpleNamespace(path=target) if target else None)
        if target:
            self._prune()
        return target

    def _prune(self) -> None:
        """Keep the newest `keep` checkpoints, as Ray Train's num_to_keep does
        (the best one has its own copy: RunDir.keep_best)."""
        names = sorted(
            (int(n[len(CHECKPOINT_PREFIX) :]), n)
            for n in storage.list_dir(self.run.uri)
            if CHECKPOINT_DIR.match(n) and storage.is_dir(self.run.path(n))
        )
        for _, old in names[: max(len(names) - self.keep, 0)]:
            self._remove(self.run.path(old))

    def _remove(self, uri: str) -> None:
        """Delete what this run wrote; a link planted under its name is refused, not followed."""
        if not self.run.remote and os.path.islink(uri):
            raise UserError(f"{uri}: is a link; vae-ray writes checkpoints and their record there, not links")
        storage.delete(uri)


TUNE_CHECKPOINT_KEY = "checkpoint_path"  # as ray.tune.integration.ray_train names it
SEARCH_METRICS = ("test_matlab_elbo", "test_neg_elbo_nats")  # what a search ranks trials by (lower is better)


def tune_result(metrics: dict) -> dict:
    """What Tune is told of an epoch. The report of a run that stopped itself
    (a non-finite loss) has no test figures, and Tune answers a result without
    its metric by ending the whole search: they are reported as the worst."""
    if "stopped" in metrics:
        return {**{k: math.inf for k in SEARCH_METRICS}, **metrics}
    return metrics


class TrialSession(LocalSession):
    """A search's trial of one worker, trained in its Tune trial actor: no
    Train controller or worker actor to start (each importing torch) for
    every trial. The run folder is written as LocalSession writes it, and
    each epoch is also reported to Tune, as TuneReportCallback reports a Ray
    Train trial's (the metrics, and the checkpoint's path), so ASHA and the
    search's display see the same results either way."""

    def __init__(self, run: RunDir, device: torch.device, callback, keep: int, lock_token: str = ""):
        super().__init__(run, device, LocalBoard(), callback, keep, lock_token)

    def board(self, name: str | None):
        """The search's progress board (a named actor), as a Ray Train worker finds it."""
        return RaySession().board(name)

    def report(self, metrics: dict, folder: str | None, name: str) -> bool:
        import ray.tune

        target = self._write(metrics, folder, name)
        # Tune may stop this trial while report() waits (ASHA): the checkpoint and its record are written by then.
        ray.tune.report(tune_result({**metrics, **({TUNE_CHECKPOINT_KEY: target} if target else {})}))
        return False
