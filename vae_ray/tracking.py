"""Experiment tracking: TensorBoard event files in every run, MLflow on request.

Following Ray Train's experiment-tracking guide, rank 0 logs: every epoch
it writes the scalars (loss terms, test metrics, learning rate, images/s,
world size) and two pictures (64 samples from fixed latent vectors, and test
images above their reconstructions) to `RUN/tensorboard/`, and, with an
MLflow run, the same scalars to it. The driver opens the MLflow run (params,
tags) before training and closes it afterwards with the final checkpoint and
the pictures as artifacts. A search opens one parent run; every trial is a
child run.

Weights & Biases, on request, the same way: a run is a W&B run (its config
the run's settings), rank 0 logs each epoch's scalars and pictures at
step = epoch, and the driver adds the final checkpoint (a "model" artifact)
and pictures. A search is a W&B group with a run per trial (a trial's run
ends with its last epoch: Tune stops the trial right after it). W&B lets one
process at a time write a run, so the driver opens it and closes it again,
rank 0 continues it (`resume="allow"`), and the driver continues it once more
at the end; in offline mode each of these is a folder of its own under
WANDB_DIR/wandb/ (else the driver's working directory), and `wandb sync`
uploads them in order as the one run.

    tensorboard --logdir RUN/tensorboard
    vae-ray train ... --mlflow http://127.0.0.1:5000     (or MLFLOW_TRACKING_URI)
    vae-ray train ... --wandb my-project                 (or WANDB_PROJECT; WANDB_MODE=offline)

RUN/tracking.json records the MLflow run and the W&B run (OUT/tracking.json:
the search's parent run and W&B group), so a resumed run keeps logging to the
same ones.

Credentials never travel in the URI: `https://user:password@host` is stored,
logged and shown as `https://host`, and the user and password go through the
environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, see
`config.public_mlflow_uri`). Rank 0 gets the public URI in its loop config
and the credentials from its process environment: a private cluster's
workers inherit it (the cluster starts after the config is made), a joined
cluster's and a submitted job's get it in their runtime_env.

W&B's API key is never read, stored or passed on by vae-ray itself: W&B
reads it from WANDB_API_KEY or ~/.netrc in each process that logs (a joined
cluster's workers and a submitted job get WANDB_API_KEY in their
runtime_env, as MLflow's credentials). W&B's own record of the command line
is switched off (`x_disable_meta`): a password typed in `--mlflow` would
land in it, and from there on W&B's servers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import string
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage
from .cluster import mask
from .config import check_wandb_project, public_mlflow_uri, without_credentials
from .errors import UserError
from .images import to_float, to_uint8
from .keyed_random import latent_normals
from .spec import ModelSpec

TENSORBOARD = "tensorboard"
EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "vae-ray")
RECORD = "tracking.json"  # RUN/tracking.json: the MLflow and W&B runs a resumed run keeps logging to
RECORD_KEYS = ("mlflow_uri", "mlflow_run_id", "wandb_project", "wandb_entity", "wandb_run_id", "wandb_group")
# A record is data read back: a W&B id or group that is not one we make is not used (a new one is made).
WANDB_ID = re.compile(r"^[a-z0-9]{8,32}$")
WANDB_GROUP = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
log = logging.getLogger(__name__)

SCALARS = {  # metrics.jsonl key -> TensorBoard tag
    "train_loss": "train/loss",
    "train_recon": "train/recon",
    "train_kl": "train/kl",
    "test_loss": "test/loss",
    "test_recon": "test/recon",
    "test_kl": "test/kl",
    "test_matlab_elbo": "test/matlab_elbo",
    "test_neg_elbo_nats": "test/neg_elbo_nats",
    "lr": "optim/lr",
    "beta": "optim/beta",
    "train_images_per_s": "speed/train_images_per_s",
    "epoch_seconds": "speed/epoch_seconds",
    "workers": "scale/workers",
    "nodes": "scale/nodes",
}


def mlflow_uri(cfg_value: str = "") -> str:
    """The tracking URI to use, without credentials (they move to the environment)."""
    return public_mlflow_uri(cfg_value or os.environ.get("MLFLOW_TRACKING_URI", ""))


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError("--mlflow needs the mlflow package: pip install 'vae-ray[mlflow]'") from None
    return MlflowClient(tracking_uri=uri)


# ---------------------------------------------------------------------------
# Driver side: the run's trackers (a child run, or a run in a group, per trial)
# ---------------------------------------------------------------------------
class Tracking:
    """The MLflow run and the W&B run of a training run (either or both);
    `start` after the run's checks pass, `finish` when it has ended."""

    def __init__(
        self,
        uri: str = "",
        parent_run_id: str = "",
        run_name: str = "",
        *,
        wandb: dict[str, str] | None = None,
        group: str = "",
        job_type: str = "train",
    ):
        self.mlflow = MlflowRun(uri, parent_run_id, run_name) if uri else None
        self.wandb = WandbRun(wandb, run_name, group, job_type) if wandb else None

    @property
    def run_id(self) -> str:
        """The MLflow run's id ("" without MLflow)."""
        return self.mlflow.run_id if self.mlflow is not None else ""

    @classmethod
    def for_config(cls, cfg, parent_run_id: str = "", run_name: str = "") -> Tracking | None:
        uri, target = mlflow_uri(cfg.mlflow), wandb_target(cfg.wandb)
        return cls(uri, parent_run_id, run_name, wandb=target) if uri or target else None

    def start(self, cfg, run) -> dict[str, Any]:
        """Open (or, for a resumed run, reopen) the runs; returns what rank 0 needs."""
        previous = _read_record(run)
        info: dict[str, Any] = {}
        record: dict[str, str] = {}
        if self.mlflow is not None:
            record |= self.mlflow.start(cfg, run, previous)
            info |= record
        if self.wandb is not None:
            record |= self.wandb.start(cfg, run, previous)
            info |= {"wandb": self.wandb.target, "wandb_run_id": self.wandb.run_id}
        _write_record(run, previous, record)
        return info

    def finish(self, run, status: str = "FINISHED", folders: tuple[str, ...] = ()) -> None:
        """Add the final checkpoint and the pictures, then close the runs."""
        try:
            if self.wandb is not None:
                self.wandb.finish(run, status, folders)
        finally:
            if self.mlflow is not None:
                self.mlflow.finish(run, status, folders)


def _read_record(run) -> dict:
    try:
        record = storage.read_json(run.path(RECORD))
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    known = {k: v for k, v in record.items() if k in RECORD_KEYS and isinstance(v, str)}
    if "mlflow_uri" in known:  # a record from before URIs were stored without credentials
        known["mlflow_uri"] = without_credentials(known["mlflow_uri"])
    return known


def _write_record(run, previous: dict, record: dict) -> None:
    """The record with this command's trackers; a tracker not used this time
    keeps its entry, so a later resume that uses it again continues its run."""
    storage.write_json(run.path(RECORD), previous | record)


class MlflowRun:
    """An MLflow run for a training run."""

    def __init__(self, uri: str, parent_run_id: str = "", run_name: str = ""):
        self.uri, self.parent_run_id, self.run_name = public_mlflow_uri(uri), parent_run_id, run_name
        self.client = _client(self.uri)
        self.run_id = ""

    def start(self, cfg, run, previous: dict) -> dict[str, str]:
        """Open (or reopen) the MLflow run; returns its part of the record."""
        try:
            same_server = previous.get("mlflow_uri") == self.uri
            if previous.get("mlflow_run_id") and same_server:
                self.run_id = previous["mlflow_run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                experiment = self.client.get_experiment_by_name(EXPERIMENT)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
                tags = {"vae_ray.run": run.uri, "mlflow.runName": self.run_name or run.name}
                if self.parent_run_id:
                    tags["mlflow.parentRunId"] = self.parent_run_id
                self.run_id = self.client.create_run(experiment_id, tags=tags).info.run_id
                self.log_params(cfg.to_dict())
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - the server is down or refuses: say so in one line
            first = mask(str(exc)).splitlines()[0][:200] if str(exc) else ""
            raise UserError(f"MLflow at {self.uri}: {type(exc).__name__}: {first}") from None
        return {"mlflow_uri": self.uri, "mlflow_run_id": self.run_id}

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:500]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def finish(self, run, status: str = "FINISHED", folders: tuple[str, ...] = ()) -> None:
        """Log the final checkpoint and the pictures as artifacts, then close the run."""
        if not self.run_id:
            return
        try:
            latest = run.latest()
            if status == "FINISHED" and latest:
                self._log_folder(latest, "checkpoint")
            for folder in folders:
                if storage.is_dir(run.path(folder)):
                    self._log_folder(run.path(folder), folder)
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def _log_folder(self, uri: str, name: str) -> None:
        if storage.is_remote(uri):
            with tempfile.TemporaryDirectory() as tmp:
                self.client.log_artifacts(self.run_id, str(storage.download(uri, Path(tmp) / name)), name)
        else:
            self.client.log_artifacts(self.run_id, uri, name)


# ---------------------------------------------------------------------------
# Weights & Biases
# ---------------------------------------------------------------------------
def wandb_project(cfg_value: str = "") -> str:
    """The W&B project to log to ("" = none)."""
    return cfg_value or os.environ.get("WANDB_PROJECT", "")


def wandb_target(cfg_value: str = "") -> dict[str, str] | None:
    """Where W&B logs, decided on the driver: the processes that log later (a
    trial's driver, rank 0) may have another environment (a cluster started
    before WANDB_MODE was set, another machine's working directory)."""
    project = wandb_project(cfg_value)
    if not project:
        return None
    check_wandb_project(project)
    need_wandb()
    return {
        "project": project,
        "entity": os.environ.get("WANDB_ENTITY", ""),
        "mode": os.environ.get("WANDB_MODE", ""),
        "dir": os.path.abspath(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else "",
        "cwd": os.getcwd(),  # W&B's default without WANDB_DIR: the driver's, for every process of the run
    }


def need_wandb():
    """The wandb module, or one line saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install 'vae-ray[wandb]'") from None
    return wandb


def search_group(out) -> str:
    """A search's W&B group: its folder's name and a random suffix (two
    searches in folders of the same name stay apart), kept in
    OUT/tracking.json so a resumed search keeps its group."""
    previous = _read_record(out)
    group = previous.get("wandb_group", "")
    if not WANDB_GROUP.match(group):
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", out.name).strip("-")[:100] or "search"
        group = f"{name}-{secrets.token_hex(3)}"
        _write_record(out, previous, {"wandb_group": group})
    return group


def _open_wandb(target: dict[str, str], run_id: str, **init: Any):
    """Open (or continue) W&B run `run_id` in this process."""
    wandb = need_wandb()
    settings = wandb.Settings(
        console="off",  # the terminal is vae-ray's (and a cluster worker's log is Ray's)
        x_disable_meta=True,  # no command line, git remote or host record: they may hold secrets
        silent=True,
    )
    return wandb.init(
        project=target["project"],
        entity=target.get("entity") or None,
        id=run_id,
        resume="allow",
        mode=target.get("mode") or None,
        dir=_wandb_dir(target),
        reinit="create_new",  # never touches a W&B run of the program that uses vae-ray
        settings=settings,
        **init,
    )


def _wandb_dir(target: dict[str, str]) -> str | None:
    """The folder W&B writes under: the driver's WANDB_DIR (made, as W&B
    makes it), else the driver's working directory; None (W&B's default:
    this process's working directory) where neither can be had on this node."""
    if target.get("dir"):
        try:
            os.makedirs(target["dir"], exist_ok=True)
            return target["dir"]
        except OSError:
            return None
    return target["cwd"] if os.path.isdir(target.get("cwd", "")) else None


def _wandb_error(target: dict[str, str], exc: BaseException) -> str:
    text = mask(str(exc))
    key = os.environ.get("WANDB_API_KEY", "")
    if len(key) >= 6:
        text = text.replace(key, "***")
    first = text.splitlines()[0][:200] if text.strip() else ""
    return f"W&B project {target['project']}: {type(exc).__name__}: {first}"


def _new_wandb_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbRun:
    """A W&B run for a training run or a trial, driven from the driver."""

    def __init__(self, target: dict[str, str], run_name: str = "", group: str = "", job_type: str = "train"):
        need_wandb()
        self.target, self.run_name, self.group, self.job_type = target, run_name, group, job_type
        self.run_id = ""

    def start(self, cfg, run, previous: dict) -> dict[str, str]:
        """Open the run with the run's settings as its config, and close it for rank 0."""
        project, entity = self.target["project"], self.target.get("entity", "")
        same = (previous.get("wandb_project"), previous.get("wandb_entity", "")) == (project, entity)
        known = WANDB_ID.match(previous.get("wandb_run_id", ""))
        self.run_id = previous["wandb_run_id"] if same and known else _new_wandb_id()
        try:
            session = _open_wandb(
                self.target,
                self.run_id,
                name=self.run_name or run.name,
                group=self.group or None,
                job_type=self.job_type,
                config={**cfg.to_dict(), "run_folder": run.uri},
            )
            session.finish()
        except Exception as exc:  # noqa: BLE001 - no key, no server: one line, nothing recorded
            raise UserError(_wandb_error(self.target, exc)) from None
        return {"wandb_project": project, "wandb_entity": entity, "wandb_run_id": self.run_id}

    def finish(self, run, status: str = "FINISHED", folders: tuple[str, ...] = ()) -> None:
        """Continue the run once more: the final checkpoint as a "model" artifact,
        each folder's pictures in the run's summary; then close it.
        The run has trained by now: W&B failing here is a warning, not a failure."""
        if not self.run_id:
            return
        try:
            with tempfile.TemporaryDirectory() as tmp:
                session = _open_wandb(self.target, self.run_id)
                try:
                    self._add_results(session, run, status, folders, Path(tmp))
                finally:
                    session.finish(exit_code=0 if status == "FINISHED" else 1)
        except Exception as exc:  # noqa: BLE001
            storage.warn_user(f"{_wandb_error(self.target, exc)} (the run's files are complete)")

    def _add_results(self, session, run, status: str, folders: tuple[str, ...], tmp: Path) -> None:
        wandb = need_wandb()
        latest = run.latest()
        if status == "FINISHED" and latest:
            artifact = wandb.Artifact(f"model-{self.run_id}", type="model", metadata={"checkpoint": latest})
            artifact.add_dir(str(_local(latest, tmp / "checkpoint")))
            session.log_artifact(artifact)
        for folder in folders:
            if storage.is_dir(run.path(folder)):
                pictures = sorted(_local(run.path(folder), tmp / folder).glob("*.png"))
                if len({_size(p) for p in pictures}) == 1:  # W&B shows a gallery of pictures of one size
                    session.summary[folder] = [wandb.Image(str(p), caption=p.stem) for p in pictures]
                else:
                    for p in pictures:
                        session.summary[f"{folder}/{p.stem}"] = wandb.Image(str(p), caption=p.stem)


def _size(picture: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(picture) as image:
        return image.size


def _local(uri: str, tmp: Path) -> Path:
    """A folder as a local path (an s3:// one downloaded into `tmp`)."""
    return storage.download(uri, tmp) if storage.is_remote(uri) else Path(uri)


# ---------------------------------------------------------------------------
# Rank 0: per-epoch scalars and pictures
# ---------------------------------------------------------------------------
class EpochLogger:
    """TensorBoard (always), MLflow and W&B (when the driver opened their runs), on rank 0.

    Off the barrier: an epoch's pictures are drawn from the model as it is
    at the epoch's end (milliseconds), and everything that waits on disks
    and networks (TensorBoard's writes and, for a run on S3, its upload of
    the files that changed; MLflow; W&B) runs in one background thread
    while the next epoch trains, so the other ranks do not wait at the
    report for rank 0's uploads. At most one epoch's logging is pending: the
    next epoch (and `close`) waits for it and raises its error, as a
    synchronous logger would have one epoch earlier. With `background`
    False (a search's trials) each epoch is logged before `epoch` returns."""

    def __init__(self, run_uri: str, tracking: dict[str, Any], cfg, dataset: dict[str, Any], background: bool = True):
        from tensorboardX import SummaryWriter

        self.target = storage.join(run_uri, TENSORBOARD)
        self.remote = storage.is_remote(run_uri)
        self.logdir = tempfile.mkdtemp(prefix="vae-ray-tb-") if self.remote else storage.filesystem(self.target)[1]
        self.writer = SummaryWriter(self.logdir, flush_secs=3600)
        self.cfg, self.dataset = cfg, dataset
        self.mlflow = None
        if tracking.get("mlflow_run_id"):
            try:
                self.mlflow = (_client(tracking["mlflow_uri"]), tracking["mlflow_run_id"])
            except UserError as exc:  # mlflow missing on this node: training goes on without it
                log.warning("%s", exc)
        self.wandb = None
        if tracking.get("wandb_run_id"):
            try:  # continues the run the driver opened
                self.wandb = _open_wandb(tracking["wandb"], tracking["wandb_run_id"])
            except Exception as exc:  # noqa: BLE001 - wandb missing or unreachable here: training goes on
                log.warning("W&B logging is off on this node: %s", _wandb_error(tracking["wandb"], exc))
        z_dim = ModelSpec.from_config(cfg, dataset).z_dim
        self._fixed_z = torch.from_numpy(latent_normals(cfg.seed + 99, np.arange(64), z_dim))
        self._originals: np.ndarray | None = None
        self._uploaded: dict[str, tuple[int, int]] = {}  # TensorBoard file -> (size, mtime) last uploaded
        self._background = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="vae-ray-epoch-log") if background else None
        )
        self._pending: Future | None = None
        self.closed = False

    def epoch(self, metrics: dict[str, Any], model, device: torch.device) -> None:
        self.wait()  # the previous epoch's logging, and its error
        samples, pairs = self._pictures(model, device)  # this epoch's model, before training moves it on
        if self._background is None:
            self._log(metrics, samples, pairs)
        else:
            self._pending = self._background.submit(self._log, dict(metrics), samples, pairs)

    def wait(self) -> None:
        """Until the pending epoch's logging is done; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _log(self, metrics: dict[str, Any], samples: np.ndarray, pairs: np.ndarray) -> None:
        step = metrics["epoch"]
        for key, tag in SCALARS.items():
            if isinstance(metrics.get(key), (int, float)):
                self.writer.add_scalar(tag, metrics[key], step)
        self.writer.add_image("samples", samples, step, dataformats="HWC")
        self.writer.add_image("reconstructions", pairs, step, dataformats="HWC")
        self.writer.flush()
        if self.remote:
            self._upload_changed()
        if self.mlflow is not None:
            self._log_mlflow(metrics, step)
        if self.wandb is not None:
            self._log_wandb(metrics, step, samples, pairs)

    def _upload_changed(self) -> None:
        """Upload the TensorBoard files that changed since the last upload
        (an event file grows; the rest is sent once)."""
        for path in sorted(Path(self.logdir).rglob("*")):
            if not path.is_file():
                continue
            stat = path.stat()
            rel = path.relative_to(self.logdir).as_posix()
            if self._uploaded.get(rel) != (stat.st_size, stat.st_mtime_ns):
                storage.upload(path, storage.join(self.target, rel))
                self._uploaded[rel] = (stat.st_size, stat.st_mtime_ns)

    def _log_mlflow(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        client, run_id = self.mlflow
        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step) for k, v in _numbers(metrics).items() if k != "epoch"]
        try:
            client.log_batch(run_id, metrics=values)
        except Exception as exc:  # noqa: BLE001 - a tracking server hiccup must not stop training
            log.warning("MLflow logging failed: %s", exc)

    def _log_wandb(self, metrics: dict[str, Any], step: int, samples: np.ndarray, pairs: np.ndarray) -> None:
        import wandb

        values: dict[str, Any] = {k: v for k, v in _numbers(metrics).items() if k != "epoch"}
        values |= {"samples": wandb.Image(samples), "reconstructions": wandb.Image(pairs)}
        try:
            self.wandb.log(values, step=step)
        except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not stop training
            log.warning("W&B logging failed: %s", exc)

    @torch.no_grad()
    def _pictures(self, model, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        from .ingest import read_rows
        from .plots import image_grid, pairs_grid

        was_training = model.training
        model.eval()
        labels = None
        if model.num_classes:
            labels = (torch.arange(64) % model.num_classes).to(device)
        samples = to_uint8(model.mean_image(model.decode(self._fixed_z.to(device), labels)))
        if self._originals is None:
            images, labs, _ = read_rows(self.dataset, "test", 0, min(16, self.dataset["counts"]["test"]))
            self._originals, self._labels = images.numpy(), labs
        x = to_float(self._originals).to(device)
        y = self._labels.to(device) if model.num_classes else None
        mu, _ = model.encode(x, y)
        recon = to_uint8(model.mean_image(model.decode(mu, y)))
        if was_training:
            model.train()
        grid = image_grid(samples, cols=8)
        pairs = pairs_grid(self._originals, recon, cols=8)
        return _rgb(grid), _rgb(pairs)

    def close(self, failing: bool = False) -> None:
        """Finish the pending logging and close the writers. `failing`: the
        run is ending on an error of its own, which a logging error must not
        replace (it is logged instead)."""
        if self.closed:  # once: a stopped run closes before its last report, then again on the way out
            return
        self.closed = True
        try:
            with _unless_failing(failing, "epoch logging"):
                self.wait()
        finally:
            if self._background is not None:
                self._background.shutdown(wait=True)
            self._close_writers(failing)

    def _close_writers(self, failing: bool) -> None:
        self.writer.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B logging failed: %s", exc)
            self.wandb = None
        if self.remote:
            try:
                with _unless_failing(failing, "TensorBoard upload"):
                    self._upload_changed()
            finally:
                shutil.rmtree(self.logdir, ignore_errors=True)


@contextlib.contextmanager
def _unless_failing(failing: bool, what: str) -> Iterator[None]:
    """A logging error is raised, unless the run is already ending on an
    error of its own: that one is what the user must see, this one is logged."""
    try:
        yield
    except Exception as exc:
        if not failing:
            raise
        log.warning("%s failed: %s", what, exc)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics (the trackers take numbers; `ingest` is a word)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _rgb(grid: np.ndarray) -> np.ndarray:
    return np.repeat(grid, 3, axis=2) if grid.shape[2] == 1 else grid
