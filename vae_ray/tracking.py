"""Experiment tracking: TensorBoard event files in every run, MLflow on request.

Following Ray Train's experiment-tracking guide, rank 0 logs: every epoch
it writes the scalars (loss terms, test metrics, learning rate, images/s,
world size) and two pictures (64 samples from fixed latent vectors, and test
images above their reconstructions) to `RUN/tensorboard/`, and, with an
MLflow run, the same scalars to it. The driver opens the MLflow run (params,
tags) before training and closes it afterwards with the final checkpoint and
the pictures as artifacts. A search opens one parent run; every trial is a
child run.

    tensorboard --logdir RUN/tensorboard
    vae-ray train ... --mlflow http://127.0.0.1:5000     (or MLFLOW_TRACKING_URI)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage
from .errors import UserError
from .images import to_float, to_uint8
from .keyed_random import latent_normals

TENSORBOARD = "tensorboard"
EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "vae-ray")
RECORD = "tracking.json"  # RUN/tracking.json: the MLflow run a resumed run keeps logging to
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
    return cfg_value or os.environ.get("MLFLOW_TRACKING_URI", "")


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError("--mlflow needs the mlflow package: pip install 'vae-ray[mlflow]'") from None
    return MlflowClient(tracking_uri=uri)


# ---------------------------------------------------------------------------
# Driver side: one MLflow run per training run (a child run per trial)
# ---------------------------------------------------------------------------
class Tracking:
    """An MLflow run for a training run; `start` after the run's checks pass."""

    def __init__(self, uri: str, parent_run_id: str = "", run_name: str = ""):
        self.uri, self.parent_run_id, self.run_name = uri, parent_run_id, run_name
        self.client = _client(uri)
        self.run_id = ""

    @classmethod
    def for_config(cls, cfg, parent_run_id: str = "", run_name: str = "") -> Tracking | None:
        uri = mlflow_uri(cfg.mlflow)
        return cls(uri, parent_run_id, run_name) if uri else None

    def start(self, cfg, run) -> dict[str, Any]:
        """Open (or, for a resumed run, reopen) the MLflow run; returns what rank 0 needs."""
        previous = _read_record(run)
        try:
            if previous.get("mlflow_run_id") and previous.get("mlflow_uri") == self.uri:
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
            raise UserError(f"MLflow at {self.uri}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        storage.write_json(run.path(RECORD), {"mlflow_uri": self.uri, "mlflow_run_id": self.run_id})
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


def _read_record(run) -> dict:
    try:
        return storage.read_json(run.path(RECORD))
    except (FileNotFoundError, ValueError):
        return {}


# ---------------------------------------------------------------------------
# Rank 0: per-epoch scalars and pictures
# ---------------------------------------------------------------------------
class EpochLogger:
    """TensorBoard (always) and MLflow (when the driver opened a run), on rank 0."""

    def __init__(self, run_uri: str, tracking: dict[str, Any], cfg, dataset: dict[str, Any]):
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
        self._fixed_z = torch.from_numpy(latent_normals(cfg.seed + 99, np.arange(64), cfg.latent_dim))
        self._originals: np.ndarray | None = None

    def epoch(self, metrics: dict[str, Any], model, device: torch.device) -> None:
        step = metrics["epoch"]
        for key, tag in SCALARS.items():
            if isinstance(metrics.get(key), (int, float)):
                self.writer.add_scalar(tag, metrics[key], step)
        samples, pairs = self._pictures(model, device)
        self.writer.add_image("samples", samples, step, dataformats="HWC")
        self.writer.add_image("reconstructions", pairs, step, dataformats="HWC")
        self.writer.flush()
        if self.remote:
            storage.upload(self.logdir, self.target)
        if self.mlflow is not None:
            self._log_mlflow(metrics, step)

    def _log_mlflow(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        client, run_id = self.mlflow
        now = int(time.time() * 1000)
        values = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"
        ]
        try:
            client.log_batch(run_id, metrics=values)
        except Exception as exc:  # noqa: BLE001 - a tracking server hiccup must not stop training
            log.warning("MLflow logging failed: %s", exc)

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

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            storage.upload(self.logdir, self.target)
            shutil.rmtree(self.logdir, ignore_errors=True)


def _rgb(grid: np.ndarray) -> np.ndarray:
    return np.repeat(grid, 3, axis=2) if grid.shape[2] == 1 else grid
