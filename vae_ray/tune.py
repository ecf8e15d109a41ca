"""Hyperparameter search with Ray Tune; every trial is a training run that
leaves the run folder `vae-ray train` leaves.

    OUT/search.json            what was searched, and how, where its trials train (and "complete" once it all ran)
    OUT/tune/                  Tune's experiment state, the Optuna searcher's too (what --resume reads)
    OUT/tune.seal.json         proof that this user's vae-ray wrote that state (seal.py)
    OUT/trials/<trial id>/     each trial's run folder (config, metrics.jsonl, checkpoints, latest)
    OUT/results.csv            one row per trial
    OUT/best -> trials/<id>/checkpoint_epoch_...   the best trial's checkpoint (a complete search only)
    OUT/curves.png             the metric per epoch for every trial

The search strategy (`--search`): grid (every combination of the lists),
random (the grid of lists, times --num-samples learning rates drawn
log-uniformly), or optuna (Tune's OptunaSearch: --num-samples trials, each
choosing a latent size, a learning rate and a KL weight from the results so
far; seeded by --seed). ASHA stops weak trials early in all three.

Trials are Tune *function* trainables (not the deprecated `Tuner(trainer)`
form). On a machine of its own (no --address), a trial of one worker whose
split fits in memory trains in its own trial actor, which holds the worker's
CPUs and GPU share (session.TrialSession): no Train controller and worker
actor to start per trial, each importing torch. Any other trial (several
workers, elastic, streamed by Ray Data, or on a cluster the search joined)
starts its own TorchTrainer, built as `vae-ray train` builds one, and passes
`TuneReportCallback`. Either way ASHA sees each epoch's metric and stops weak
trials early, and either kind of trial resumes from the run folder.

Ctrl-C or SIGTERM stops the search gracefully (Tune saves its state), writes
results.csv with the trials' status and no `best`, and exits 130 or 143;
`--resume` continues it. A search that makes no progress for
`stall_timeout` seconds stops the same way, saying what it waited for.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import re
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from . import cluster as clusters
from . import seal, storage
from . import trials as trial_plan
from .api import callable_module
from .config import TrainConfig
from .data import dataset_read_lock, read_meta, summary
from .errors import Interrupted, RunFailed, UserError, root_cause
from .ingest import choose_ingest
from .plots import trial_curves
from .progress import SearchDisplay
from .rundir import RunDir, check_resumable
from .session import SEARCH_METRICS, tune_result
from .tracking import Tracking, mlflow_uri, search_group, wandb_target
from .trainer import build_trainer, private_cluster_cpus, resolve

METRICS = SEARCH_METRICS
SEARCHED = ("latent_dim", "lr", "beta", "recon_weight")
TRIAL_DRIVER_MEMORY = 256 * 1024**2
STOPPED_TRIAL_GRACE_S = 5
SEARCH_FILE = "search.json"
SEAL_FILE = "tune.seal.json"
# All a search stopped before Tune began holds: our search.json and seal,
# the Tuner's pickle and Ray's storage check (a new Tuner writes them again).
NEVER_BEGAN = {SEARCH_FILE, SEAL_FILE, "tune/", "tune/tuner.pkl", "tune/.validate_storage_marker"}
SEAL_EVERY_S = 2.0  # at most this often while Tune runs (a step of its loop is much shorter)
STRATEGIES = ("grid", "random", "optuna")
ENGINES = ("actor", "ray")  # where a search's trials train (trial_engine)


@dataclass
class SearchSpec:
    latent_dims: list[int]
    lrs: list[float] | None = None
    lr_range: tuple[float, float] | None = None
    num_samples: int = 1
    betas: list[float] = field(default_factory=lambda: [1.0])
    recon_weights: list[float] = field(default_factory=lambda: [1.0])
    # (recon_weight, beta) pairs searched together instead of as a grid
    weight_pairs: list[tuple[float, float]] | None = None
    # grid, random or optuna; "auto": grid with --lrs, random with --lr-min/--lr-max
    strategy: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy == "auto":  # search.json records what ran, so --resume continues it as it was
            self.strategy = "random" if self.lr_range is not None else "grid"

    def validate(self, base: TrainConfig) -> SearchSpec:
        if (self.lrs is None) == (self.lr_range is None):
            raise UserError("give either --lrs (a grid) or --lr-min and --lr-max (random search)")
        if self.strategy not in STRATEGIES:
            raise UserError(f"--search must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        if self.strategy == "grid" and self.lrs is None:
            raise UserError("--search grid takes a grid of learning rates (--lrs), not --lr-min/--lr-max")
        if self.strategy == "random" and self.lr_range is None:
            raise UserError("--search random draws learning rates between --lr-min and --lr-max (not --lrs)")
        if self.strategy == "optuna":
            if self.weight_pairs:
                raise UserError(
                    "--search optuna searches latent sizes, learning rates and KL weights, not weight pairs"
                )
            need_optuna()
        if not 1 <= self.num_samples <= 10_000:
            raise UserError(f"--num-samples must be between 1 and 10000 (got {self.num_samples})")
        if self.lr_range is not None:
            low, high = self.lr_range
            if not (0 < low < high and math.isfinite(high)):
                raise UserError(f"--lr-min and --lr-max must satisfy 0 < min < max (got {low}, {high})")
        if self.trial_count() > 10_000:
            raise UserError(f"the search has {self.trial_count():,} trials; at most 10000")
        # Every combination must make a valid run config.
        lrs = self.lrs or list(self.lr_range)
        for k, lr, (rw, beta) in itertools.product(self.latent_dims, lrs, self.weights()):
            base.replace(latent_dim=k, lr=lr, beta=beta, recon_weight=rw)
        return self

    def weights(self) -> list[tuple[float, float]]:
        """Every (recon_weight, beta) a trial may get."""
        return self.weight_pairs or list(itertools.product(self.recon_weights, self.betas))

    def param_space(self) -> dict[str, Any]:
        if self.strategy == "optuna":
            return self._optuna_space()

        def grid(values: list) -> Any:
            return tune.grid_search(values) if len(values) > 1 else values[0]

        lr = grid(self.lrs) if self.lrs is not None else tune.loguniform(*self.lr_range)
        space = {"latent_dim": grid(self.latent_dims), "lr": lr}
        if self.weight_pairs:
            return space | {"weights": grid([list(pair) for pair in self.weight_pairs])}
        return space | {"beta": grid(self.betas), "recon_weight": grid(self.recon_weights)}

    def _optuna_space(self) -> dict[str, Any]:
        """The same space for Optuna: lists are categorical (Optuna has no
        grid), the learning rate range log-uniform."""

        def choice(values: list) -> Any:
            return tune.choice(values) if len(values) > 1 else values[0]

        lr = choice(self.lrs) if self.lrs is not None else tune.loguniform(*self.lr_range)
        return {
            "latent_dim": choice(self.latent_dims),
            "lr": lr,
            "beta": choice(self.betas),
            "recon_weight": choice(self.recon_weights),
        }

    def searcher(self, seed: int):
        """Tune's OptunaSearch for --search optuna (TPE, seeded: the same
        results suggest the same trials), else None: Tune's own variant
        generator expands the grid and draws the random samples."""
        if self.strategy != "optuna":
            return None
        need_optuna().logging.set_verbosity(logging.WARNING)  # not a line per trial on the terminal
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)

    def trial_count(self) -> int:
        if self.strategy == "optuna":
            return self.num_samples  # trials, each drawn from the whole space
        grid = len(self.latent_dims) * len(self.weights()) * len(self.lrs or [0])
        return grid * self.num_samples


def need_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("--search optuna needs the optuna package: pip install 'vae-ray[optuna]'") from None
    return optuna


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched settings, with (recon_weight, beta) pairs unpacked."""
    params = {k: config[k] for k in SEARCHED if k in config}
    if "weights" in config:
        params["recon_weight"], params["beta"] = config["weights"]
    return params


class SearchRows(list):
    """The trial rows, best first; `already_complete` when nothing had to run."""

    def __init__(self, rows, already_complete: bool = False):
        super().__init__(rows)
        self.already_complete = already_complete


def parse_list(text: str | None, kind: type, option: str) -> list | None:
    """'2,5,10' -> [2, 5, 10], with a one-line error naming the option."""
    if text is None:
        return None
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option}: expected comma-separated {kind.__name__} values (got {text!r})") from None
    if not values:
        raise UserError(f"{option}: no values given")
    if kind is float and any(not math.isfinite(v) for v in values):
        raise UserError(f"{option}: values must be finite numbers (got {text!r})")
    return values


# ---------------------------------------------------------------------------
# One trial (runs in a Tune trial actor)
# ---------------------------------------------------------------------------
def trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """A Tune function trainable: this trial's run, trained here or by a TorchTrainer (trial_engine)."""
    trial_id = ray.tune.get_context().get_trial_id()
    run = RunDir(storage.join(setup["trials_dir"], trial_id))  # deterministic: resume finds the same run
    cfg = TrainConfig.from_dict({**setup["base"], **trial_params(config), "out": run.uri})
    with run.lock("vae-ray tune", as_trial=True) as lock:
        if run.read_config() is None:
            run.write_config(cfg.to_dict(), setup["dataset"])
        else:
            check_resumable(run)  # a resumed trial: Ray will read its snapshot
        if run.last_epoch() >= cfg.epochs:
            # It ended before Tune recorded so (the search was stopped right
            # after its last report): nothing to train, and a trial that
            # reports nothing ends the search; its last epoch, once more.
            ray.tune.report(tune_result(run.history()[-1]))
            return
        _run_trial(cfg, run, trial_id, setup, lock.token)


def _run_trial(cfg: TrainConfig, run: RunDir, trial_id: str, setup: dict[str, Any], lock_token: str) -> None:
    tracking, info = None, {}
    if setup.get("mlflow_parent") or setup.get("wandb"):
        tracking = Tracking(
            setup.get("mlflow_uri", ""),
            parent_run_id=setup.get("mlflow_parent", ""),
            run_name=trial_id,
            wandb=setup.get("wandb"),
            group=setup.get("wandb_group", ""),
            job_type="trial",
        )
        info = tracking.start(cfg, run)
    train = _train_here if setup.get("engine") == "actor" else _train_with_ray
    try:
        train(cfg, run, trial_id, setup, lock_token, info)
    except SystemExit:
        # Tune stopped the trial while its report waited (ASHA): not a
        # failure. ASHA's last rung is at the last epoch, so a trial stopped
        # there has run all its epochs: finished, with its checkpoint.
        if tracking is not None and tracking.mlflow is not None:
            tracking.mlflow.finish(run, status="FINISHED" if run.last_epoch() >= cfg.epochs else "KILLED")
        raise
    except BaseException:
        if tracking is not None:
            tracking.finish(run, status="FAILED")
        raise
    if tracking is not None and tracking.mlflow is not None:
        # Not the W&B run: it ends with rank 0's last epoch. Tune stops this
        # actor within seconds of the trial's last report, and a W&B session
        # cut off there would leave an unreadable folder behind.
        tracking.mlflow.finish(run)


def _train_with_ray(
    cfg: TrainConfig, run: RunDir, trial_id: str, setup: dict[str, Any], lock_token: str, info: dict
) -> None:
    """A TorchTrainer of the trial's own, built as `vae-ray train` builds one."""
    # The share of a GPU the search planned (one whole GPU in searches saved before shares existed).
    placing = trial_plan.TrialPlan(
        setup.get("gpus_per_worker", 1.0) if setup["use_gpu"] else 0.0,
        cfg.cpus_per_worker,
        1,
        setup.get("gpu_resource", "GPU"),
    )
    build_trainer(
        cfg,
        setup["dataset"],
        run,
        setup["ingest"],
        placing.on_device,
        resources=placing.worker_resources(),
        callbacks=[TrialReport()],
        board=setup["board"],
        board_key=trial_id,
        tracking=info,
        lock_token=lock_token,
        resume_from=run.latest(),  # when Ray Train's record lacks it (a `train --resume` of the trial in one process)
        trial=True,
    ).fit()


class TrialReport(TuneReportCallback):
    """TuneReportCallback, with the worst figures in the report of a run that
    stopped itself (session.tune_result): Tune ends the whole search on a
    result without its metric. The run folder records the stop."""

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, [tune_result(m) for m in metrics], checkpoint)


def _train_here(
    cfg: TrainConfig, run: RunDir, trial_id: str, setup: dict[str, Any], lock_token: str, info: dict
) -> None:
    """A trial of one worker trains in this trial actor, which holds the
    worker's CPUs and GPU share (Ray sets CUDA_VISIBLE_DEVICES to its GPU)."""
    import torch

    from .session import TrialSession
    from .trainer import RunDirRecorder, forget_eval_cache, loop_config, train_loop

    device = torch.device("cuda", 0) if cfg.gpu else torch.device("cpu")
    recorder = RunDirRecorder(run.uri, lock_token, cfg.keep_best)
    session = TrialSession(run, device, recorder, cfg.keep_checkpoints, lock_token)
    config = loop_config(cfg, setup["dataset"], run, "memory", setup["board"], trial_id, info) | {"trial": True}
    try:
        train_loop(config, session)
    finally:
        forget_eval_cache()


def trial_engine(base: TrainConfig, ingest: str, private: bool) -> str:
    """Where a trial trains: "actor", in its Tune trial actor, else "ray", a
    TorchTrainer of its own. The rule `vae-ray train` follows for one process
    (trainer.one_process): one worker, not elastic, its split in memory, and
    a machine of its own (the search's private cluster, not one it joined)."""
    one = base.workers == 1 and not base.min_workers and ingest == "memory"
    return "actor" if one and private else "ray"


def trial_resources(setup: dict[str, Any], placing: trial_plan.TrialPlan) -> dict[str, float]:
    """What each trial actor reserves. Training in the actor, it holds the
    worker's CPUs and GPU share. Driving a TorchTrainer (which reserves the
    workers'), it reserves memory but no CPU: even a fraction of one would
    leave Ray Data's whole-CPU read tasks unschedulable (Tune refuses an empty request)."""
    if setup["engine"] == "actor":
        return {**placing.worker_resources(), "memory": TRIAL_DRIVER_MEMORY}
    return {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}


# ---------------------------------------------------------------------------
# The search (driver)
# ---------------------------------------------------------------------------
def check_options(
    metric: str, grace_period: int, base: TrainConfig, max_concurrent: int | None, gpus_per_trial: float | None
) -> None:
    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)} (got {metric!r})")
    if grace_period < 1 or grace_period > base.epochs:
        raise UserError(f"--grace-period must be between 1 and --epochs ({base.epochs}); got {grace_period}")
    if gpus_per_trial is not None:  # what no cluster can change: before one is asked
        trial_plan.gpus_per_worker(base.workers, math.inf, float(gpus_per_trial), base.gpu)
    if max_concurrent is not None and not 1 <= max_concurrent <= 10_000:
        raise UserError(f"--max-concurrent must be at least 1 (got {max_concurrent})")


def search(
    base: TrainConfig,
    spec: SearchSpec,
    out: str | Path,
    *,
    grace_period: int = 1,
    metric: str = "test_matlab_elbo",
    max_concurrent: int | None = None,
    gpus_per_trial: float | None = None,
    resume: bool = False,
    show: bool = True,
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) a search; return the trial rows sorted by the metric."""
    check_options(metric, grace_period, base, max_concurrent, gpus_per_trial)
    meta = read_meta(base.data)
    base = resolve(base, meta)
    spec.validate(base)
    wandb_target(base.wandb)  # wandb missing: one line before anything is written
    out = storage.check_uri(str(out))
    identity = {
        "base": {k: v for k, v in base.to_dict().items() if k != "out"},
        "search": asdict(spec),
        "grace_period": grace_period,
        "metric": metric,
    }
    identity = json.loads(json.dumps(identity))  # as search.json reads back: a tuple (--lr-min/max) is a list
    with dataset_read_lock(base.data), storage.Lock(out, "vae-ray tune"):
        state = _check_folder(out, identity, resume)
        if state == "complete":
            return SearchRows(read_rows(out, metric), already_complete=True)
        return _run(
            base,
            spec,
            out,
            meta,
            identity,
            grace_period,
            metric,
            max_concurrent,
            gpus_per_trial,
            state == "resume",
            show,
            address,
        )


def _same_search(saved: dict, identity: dict) -> bool:
    """Whether search.json describes this search. A setting added since it
    was written (absent there) counts as its default: the search it ran."""
    saved = {k: v for k, v in saved.items() if k not in ("status", "engine")}
    if isinstance(saved.get("base"), dict):
        defaults = TrainConfig().to_dict()
        added = {k: defaults[k] for k in identity["base"] if k not in saved["base"] and k in defaults}
        saved["base"] = {**added, **saved["base"]}
    return saved == identity


def _check_folder(out: str, identity: dict, resume: bool) -> str:
    tune_dir = storage.join(out, "tune")
    saved = _read_json(storage.join(out, SEARCH_FILE))
    held = set(storage.leaves(out))
    if saved and held <= NEVER_BEGAN:
        # Stopped before Tune saved its first state: nothing of the search ran,
        # and Tune would restore its trials from no state (with no settings).
        # The new Tuner writes over its pickle: only if this user's vae-ray wrote it.
        if "tune/tuner.pkl" in held:
            seal.check(tune_dir, storage.join(out, SEAL_FILE), "a search's saved state")
        if resume or _same_search(saved, identity):
            return "new"
        raise UserError(
            f"{out}: holds a search that never began, with other settings; pass --resume to begin it or choose a new --out"
        )
    if resume:
        if not storage.is_dir(tune_dir):
            raise UserError(f"{out}: no search to resume (no tune/ folder)")
        # Tune's resume state is pickles: nothing of it is read unless sealed by this user.
        seal.check(tune_dir, storage.join(out, SEAL_FILE), "a search's saved state")
        return "resume"
    if storage.is_dir(tune_dir):
        same = _same_search(saved, identity)
        if same and saved.get("status") == "complete":
            return "complete"
        raise UserError(f"{out}: already holds a search; pass --resume to continue it or choose a new --out")
    if storage.is_file(out):
        raise UserError(f"{out}: exists and is not a folder")
    if storage.leaves(out):  # hidden names count: a home directory is not an empty folder
        shown = storage.some(storage.leaves(out))
        raise UserError(f"{out}: holds other files, not a vae-ray search ({shown}); choose a new or empty --out")
    return "new"


def _read_json(uri: str) -> dict:
    try:
        value = storage.read_json(uri)
        return value if isinstance(value, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def _run(
    base: TrainConfig,
    spec: SearchSpec,
    out: str,
    meta: dict,
    identity: dict,
    grace_period: int,
    metric: str,
    max_concurrent: int | None,
    gpus_per_trial: float | None,
    resume: bool,
    show: bool,
    address: str | None,
) -> list[dict[str, Any]]:
    cluster = clusters.connect(address, cpus_needed=private_cluster_cpus(base))
    placing = trial_plan.plan(
        [n["resources"] for n in cluster.nodes] or [cluster.resources],
        workers=base.workers,
        gpus_per_trial=gpus_per_trial,
        gpu=base.gpu,
        cpus_per_worker=base.cpus_per_worker,
        max_concurrent=max_concurrent,
        local_cpus=(os.cpu_count() or 1) if cluster.private else None,
        resource=trial_plan.gpu_resource(),
    )
    base = base.replace(cpus_per_worker=placing.cpus_per_worker, gpu=placing.on_device)
    use_gpu = placing.use_gpu
    train_bytes = meta["splits"]["train"]["count"] * int(math.prod(meta["shape"]))
    board_name = f"vae-ray-search-{uuid.uuid4().hex[:8]}"
    board, _ = clusters.start_board(board_name)
    parent = None
    uri = mlflow_uri(base.mlflow)
    setup = {
        "base": base.to_dict(),
        "dataset": summary(meta),
        "trials_dir": storage.join(out, "trials"),
        "use_gpu": use_gpu,
        "gpus_per_worker": placing.gpus_per_worker,
        "gpu_resource": placing.resource,
        "ingest": choose_ingest(base.cache, train_bytes, cluster.node_memory),
        "board": board_name,
    }
    if resume:
        # Where its trials train, as the search began: Tune restores each
        # trial's resources and failure settings as they were saved. (No
        # record: a search from before trials trained in their actors.)
        saved = _read_json(storage.join(out, SEARCH_FILE)).get("engine")
        setup["engine"] = saved if saved in ENGINES else "ray"
    else:
        setup["engine"] = trial_engine(base, setup["ingest"], cluster.private)
    storage.write_json(storage.join(out, SEARCH_FILE), identity | {"status": "running", "engine": setup["engine"]})
    if uri:
        parent = Tracking(uri, run_name=f"search {storage.name_of(out)}")
        setup |= {"mlflow_uri": uri, "mlflow_parent": parent.start(base, RunDir(out))["mlflow_run_id"]}
    target = wandb_target(base.wandb)
    if target:  # W&B has no parent runs: the trials' runs share a group
        setup |= {"wandb": target, "wandb_group": search_group(RunDir(out))}
    trainable = tune.with_resources(tune.with_parameters(trial, setup=setup), trial_resources(setup, placing))
    display = SearchDisplay(total=spec.trial_count(), epochs=base.epochs, metric=metric, enabled=show)
    # A trial stopped by ASHA while its TorchTrainer runs is blocked inside
    # trainer.fit(), so it never returns on its own; Tune force-kills such a
    # trial actor only after this many seconds (600 by default), and until
    # then its workers keep their CPUs and the search stalls. Killing the trial
    # actor takes its Train controller with it, and Train's placement-group
    # cleaner frees the workers. (A trial trained in its actor waits in its
    # report, which Tune's stop ends at once.)
    os.environ["TUNE_FORCE_TRIAL_CLEANUP_S"] = str(STOPPED_TRIAL_GRACE_S)
    # Failed trials are reported in results.csv and the table, with the
    # traceback in the trial's folder; Tune's own logging stays off the terminal.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    stop = _GracefulStop(board, display, base.stall_timeout)
    sealer = SealCallback(out)
    try:
        # From before the Tuner pickles itself: a Ctrl-C from here on stops the
        # search as Tune stops one, with its state saved and sealed for --resume.
        with stop:
            tuner = _tuner(trainable, base, spec, placing, setup, out, metric, grace_period, resume, display)
            sealer.seal()  # the Tuner has written tuner.pkl already
            with display:
                results = tuner.fit()
    finally:
        sealer.seal()  # whatever Tune saved last, however the search ended
        try:
            ray.kill(board)
        except Exception:  # noqa: BLE001
            pass
    rows = collect(results, setup["trials_dir"], metric, base.epochs)
    finished = stop.signum is None and stop.stalled is None
    write_outputs(rows, out, metric, best=finished)
    if parent is not None:
        parent.finish(RunDir(out), status="FINISHED" if finished else "KILLED", folders=())
    if stop.signum is not None:
        raise Interrupted(
            stop.signum,
            f"search interrupted; {len(rows)} trial(s) recorded in results.csv, no best; continue it with --resume",
        )
    if stop.stalled is not None:
        raise RunFailed(
            f"no progress for {base.stall_timeout} s: {clusters.diagnose_stall(base, use_gpu, placing.worker_resources())}; "
            f"the search's state is kept: continue it with --resume"
        )
    storage.write_json(storage.join(out, SEARCH_FILE), identity | {"status": "complete", "engine": setup["engine"]})
    if rows and all(r["status"] == "error" for r in rows):
        raise RunFailed(f"search failed: all {len(rows)} trials errored; first error: {rows[0]['error']}")
    return SearchRows(rows)


def _tuner(
    trainable,
    base: TrainConfig,
    spec: SearchSpec,
    placing: trial_plan.TrialPlan,
    setup: dict,
    out: str,
    metric: str,
    grace_period: int,
    resume: bool,
    display,
) -> tune.Tuner:
    """The search's Tuner: restored from its saved state, or a new one."""
    fs, out_path = storage.filesystem(out)
    if resume:
        tuner = tune.Tuner.restore(
            storage.join(out_path, "tune"),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
    else:
        # A trial that reaches its last epoch ends on its own (its tracking
        # runs close as finished), instead of being stopped after its last report.
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=base.epochs,
            grace_period=grace_period,
            reduction_factor=2,
            stop_last_trials=False,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=spec.param_space(),
            tune_config=tune.TuneConfig(
                metric=metric,
                mode="min",
                scheduler=scheduler,
                search_alg=spec.searcher(base.seed),
                num_samples=spec.num_samples,
                max_concurrent_trials=placing.concurrency,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=out_path,
                storage_filesystem=fs,
                verbose=0,
                # Ray Train restarts a failed TorchTrainer's workers; a trial
                # trained in its actor is restarted by Tune, from its `latest`.
                failure_config=tune.FailureConfig(max_failures=base.max_failures if setup["engine"] == "actor" else 0),
                callbacks=[DisplayCallback(display), SealCallback(out)],
            ),
        )
    return tuner


class DisplayCallback(tune.Callback):
    """Forwards trial events (in the driver) to the search's display. Tune
    pickles its run config, callbacks included, into the experiment state, so
    the display itself (a live terminal) is left out of the pickle."""

    def __init__(self, display: SearchDisplay):
        self.display: SearchDisplay | None = display

    def __getstate__(self) -> dict:
        return {"display": None}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.display:
            self.display.result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.display:
            self.display.finished(trial.trial_id, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.display:
            self.display.finished(trial.trial_id, "failed")


class SealCallback(tune.Callback):
    """Seals Tune's state (OUT/tune) whenever Tune has rewritten it, so that
    `--resume` can tell this user's state from a planted one (seal.py). Runs
    in the driver; pickled into tuner.pkl by name with the folder's URI."""

    def __init__(self, out: str):
        self.out = out
        self._seen: Any = None
        self._checked = 0.0

    def __getstate__(self) -> dict:
        return {"out": self.out, "_seen": None, "_checked": 0.0}

    def seal(self) -> None:
        seal.seal(storage.join(self.out, "tune"), storage.join(self.out, SEAL_FILE))

    def _state(self) -> Any:
        fs, path = storage.filesystem(storage.join(self.out, "tune"))
        from pyarrow import fs as pafs

        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted((i.base_name, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._checked < SEAL_EVERY_S:
            return
        self._checked = time.monotonic()
        state = self._state()
        if state != self._seen:
            self.seal()
            self._seen = state

    def on_experiment_end(self, trials, **info):
        self.seal()


class _GracefulStop:
    """While a search runs: Ctrl-C and SIGTERM, and a stall of `stall_timeout`
    seconds, ask Tune to stop gracefully (its SIGUSR1: the experiment state is
    saved, running trials stay resumable). A second signal stops at once."""

    def __init__(self, board, display: SearchDisplay, stall_timeout: float):
        self.board, self.display, self.stall_timeout = board, display, stall_timeout
        self.signum: int | None = None
        self.stalled: str | None = None
        self._done = threading.Event()
        self._saved: dict = {}
        self._pending = False  # a stop Tune has not heard yet

    def __enter__(self) -> _GracefulStop:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours below, forwarded as Tune's own graceful stop
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._on_signal)
            # Until Tune listens for its stop, a SIGUSR1 would end the process.
            self._saved[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._before_tune)
        threading.Thread(target=self._watch, daemon=True, name="vae-ray-watchdog").start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self._stop_tune()

    def _before_tune(self, signum, frame) -> None:
        self._pending = True  # asked before Tune listened: _watch asks again once it does

    def _stop_tune(self) -> None:
        """Tune's graceful stop, asked now if Tune listens for it, else as soon as it does."""
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler) and handler != self._before_tune:
            self._pending = False
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            self._pending = True

    def _watch(self) -> None:
        last_seen = None
        while not self._done.wait(0.5 if self._pending else 1.0):
            if self._pending:
                self._stop_tune()
                continue
            try:
                state = ray.get(self.board.get.remote(), timeout=5)
                mark = max((v.get("at", 0) for v in state.values()), default=None)
            except Exception:  # noqa: BLE001 - a missed poll
                mark = last_seen
            if mark != last_seen:
                last_seen = mark
                self.display.touch()
            quiet_s = time.monotonic() - self.display.last_change
            if quiet_s > self.stall_timeout and self.signum is None and self.stalled is None:
                self.stalled = "no progress"
                self._stop_tune()


def collect(results, trials_dir: str, metric: str, epochs: int) -> list[dict[str, Any]]:
    rows, saved = [], None
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_of(result.path)
        config = result.config
        if not config:
            saved = _saved_configs(results) if saved is None else saved
            config = saved.get(trial_id, {})
        run = RunDir(storage.join(trials_dir, str(trial_id)))
        history = run.history()
        values = [h[metric] for h in history if metric in h]
        latest = run.latest()
        status = _status(result, run, len(history), epochs)
        if result.error:
            storage.write_text(run.path("error.txt"), f"{result.error!r}\n")
        rows.append(
            {
                "trial_id": trial_id,
                **{k: None for k in SEARCHED},
                **trial_params(config),
                f"final_{metric}": values[-1] if values else None,
                f"best_{metric}": min(values) if values else None,
                "epochs": len(history),
                "status": status,
                "checkpoint": latest or "",
                "history": values,
                "error": root_cause(result.error) if result.error else "",
            }
        )
    rows.sort(key=lambda r: (r[f"final_{metric}"] is None, r[f"final_{metric}"] or 0.0))
    return rows


def _trial_id_of(path: str) -> str:
    """The trial id in the name of a trial's Tune folder,
    trial_<experiment>_<index>_<tag>_<date>_<time> (a trial that reported nothing)."""
    found = re.match(r"[^_]+_([0-9a-f]+_[0-9]+)", Path(path).name)
    return found.group(1) if found else Path(path).name


def _saved_configs(results) -> dict[str, dict[str, Any]]:
    """Every trial's settings by trial id, from the search's saved state:
    Tune keeps a trial's settings with its reports, so a trial that reported
    nothing (a search stopped while it started) has them only there."""
    try:
        analysis = tune.ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem)
        return analysis.get_all_configs()
    except (OSError, ValueError):  # no state saved yet: nothing of it ran
        return {}


def _status(result, run: RunDir, epochs_run: int, epochs: int) -> str:
    if result.error:
        return "error"
    if epochs_run >= epochs:
        return "completed"
    if run.stopped():  # it stopped itself (a non-finite loss); RUN/stopped.json says where
        return "diverged"
    return "stopped early"  # by ASHA, or by the search's end


def write_outputs(rows: list[dict[str, Any]], out: str, metric: str, best: bool = True) -> None:
    """results.csv and curves.png; `best` only for a search that ran to its end."""
    columns = ["trial_id", *SEARCHED, f"final_{metric}", f"best_{metric}", "epochs", "status", "checkpoint", "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(out, "results.csv"), text.getvalue())
    winner = next((r for r in rows if r["checkpoint"]), None)
    if best and winner is not None:
        storage.set_pointer(out, "best", winner["checkpoint"][len(out.rstrip("/")) + 1 :])
    with tempfile.TemporaryDirectory() as tmp:
        trial_curves(rows, metric, Path(tmp) / "curves.png")
        storage.write_bytes(storage.join(out, "curves.png"), (Path(tmp) / "curves.png").read_bytes())


def read_rows(out: str, metric: str) -> list[dict[str, Any]]:
    """The rows of a finished search, from its results.csv (nothing is rerun)."""
    text = storage.read_bytes(storage.join(out, "results.csv")).decode()
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row: dict[str, Any] = dict(raw)
        for key in ("latent_dim", "epochs"):
            row[key] = int(row[key]) if row.get(key) else None
        for key in ("lr", "beta", "recon_weight", f"final_{metric}", f"best_{metric}"):
            row[key] = float(row[key]) if row.get(key) else None
        row["history"] = [h[metric] for h in RunDir(storage.join(out, "trials", row["trial_id"])).history()]
        rows.append(row)
    return rows


# `vae_ray.tune(...)` is the Python API's function (api.py): this module is callable as it.
callable_module(__name__)
