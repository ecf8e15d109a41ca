"""Hyperparameter search with Ray Tune; every trial is a distributed Ray
Train run built exactly as `vae-ray train` builds one.

    OUT/tune/                Tune's experiment state (what --resume reads)
    OUT/trials/<trial id>/   each trial's run folder (config, metrics.jsonl, checkpoints, latest)
    OUT/results.csv          one row per trial
    OUT/best -> trials/<id>/checkpoint_epoch_...   the best trial's checkpoint
    OUT/curves.png           the metric per epoch for every trial

Trials are Tune *function* trainables that start their own TorchTrainer
(not the deprecated `Tuner(trainer)` form) and pass `TuneReportCallback`,
so ASHA sees each epoch's metric and stops weak trials early.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import TrainConfig
from .errors import RunFailed, UserError

METRICS = ("test_matlab_elbo", "test_neg_elbo_nats")
SEARCHED = ("latent_dim", "lr", "beta", "recon_weight")
TRIAL_DRIVER_MEMORY = 256 * 1024**2
STOPPED_TRIAL_GRACE_S = 5


@dataclass
class SearchSpec:
    latent_dims: list[int]
    lrs: Optional[list[float]] = None
    lr_range: Optional[tuple[float, float]] = None
    num_samples: int = 1
    betas: list[float] = field(default_factory=lambda: [1.0])
    recon_weights: list[float] = field(default_factory=lambda: [1.0])
    # (recon_weight, beta) pairs searched together instead of as a grid
    weight_pairs: Optional[list[tuple[float, float]]] = None

    def validate(self, base: TrainConfig) -> "SearchSpec":
        if (self.lrs is None) == (self.lr_range is None):
            raise UserError("give either --lrs (a grid) or --lr-min and --lr-max (random search)")
        if self.num_samples < 1:
            raise UserError(f"--num-samples must be at least 1 (got {self.num_samples})")
        if self.lr_range is not None:
            low, high = self.lr_range
            if not (0 < low < high and math.isfinite(high)):
                raise UserError(f"--lr-min and --lr-max must satisfy 0 < min < max (got {low}, {high})")
        # Every combination must make a valid run config.
        lrs = self.lrs or list(self.lr_range)
        for k, lr, (rw, beta) in itertools.product(self.latent_dims, lrs, self.weights()):
            base.replace(latent_dim=k, lr=lr, beta=beta, recon_weight=rw)
        return self

    def weights(self) -> list[tuple[float, float]]:
        """Every (recon_weight, beta) a trial may get."""
        return self.weight_pairs or list(itertools.product(self.recon_weights, self.betas))

    def param_space(self) -> dict[str, Any]:
        from ray import tune

        def grid(values: list) -> Any:
            return tune.grid_search(values) if len(values) > 1 else values[0]

        lr = grid(self.lrs) if self.lrs is not None else tune.loguniform(*self.lr_range)
        space = {"latent_dim": grid(self.latent_dims), "lr": lr}
        if self.weight_pairs:
            return space | {"weights": grid([list(pair) for pair in self.weight_pairs])}
        return space | {"beta": grid(self.betas), "recon_weight": grid(self.recon_weights)}

    def trial_count(self) -> int:
        grid = len(self.latent_dims) * len(self.weights()) * len(self.lrs or [0])
        return grid * self.num_samples


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched settings, with (recon_weight, beta) pairs unpacked."""
    params = {k: config[k] for k in SEARCHED if k in config}
    if "weights" in config:
        params["recon_weight"], params["beta"] = config["weights"]
    return params


def parse_list(text: Optional[str], kind: type, option: str) -> Optional[list]:
    """'2,5,10' -> [2, 5, 10], with a one-line error naming the option."""
    if text is None:
        return None
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option}: expected comma-separated {kind.__name__} values (got {text!r})") from None
    if not values:
        raise UserError(f"{option}: no values given")
    return values


# ---------------------------------------------------------------------------
# One trial (runs in a Tune trial actor)
# ---------------------------------------------------------------------------
def trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """A Tune function trainable: one TorchTrainer for this trial's config."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = Path(setup["trials_dir"]) / trial_id  # deterministic: resume finds the same run
    params = trial_params(config)
    cfg = TrainConfig.from_dict({**setup["base"], **params, "out": str(run_dir)})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "dataset": setup["dataset"]},
                                                    indent=2) + "\n")
    trainer = build_trainer(cfg, setup["dataset"], run_dir, setup["meta"], setup["use_gpu"],
                            callbacks=[TuneReportCallback()])
    trainer.fit()


# ---------------------------------------------------------------------------
# The search (driver)
# ---------------------------------------------------------------------------
def search(base: TrainConfig, spec: SearchSpec, out: str | Path, *, grace_period: int = 1,
           metric: str = "test_matlab_elbo", max_concurrent: Optional[int] = None,
           gpus_per_trial: float = 0, resume: bool = False, show: bool = True,
           address: Optional[str] = None) -> list[dict[str, Any]]:
    """Run (or resume) a search; return the trial rows sorted by the metric."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .cluster import ensure_ray
    from .data import read_meta
    from .train import dataset_summary, resolve

    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)} (got {metric!r})")
    if grace_period < 1 or grace_period > base.epochs:
        raise UserError(f"--grace-period must be between 1 and --epochs ({base.epochs}); got {grace_period}")
    if gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be >= 0 (got {gpus_per_trial})")
    meta = read_meta(base.data)
    base = resolve(base.replace(gpu=gpus_per_trial > 0), meta)
    spec.validate(base)
    out = Path(out).expanduser().resolve()
    tune_dir, trials_dir = out / "tune", out / "trials"
    if resume and not tune_dir.is_dir():
        raise UserError(f"{out}: no search to resume (no tune/ folder)")
    if not resume and tune_dir.exists():
        raise UserError(f"{out}: already holds a search; pass --resume to continue it or choose a new --out")

    per_trial_cpus = base.workers * base.cpus_per_worker
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent must be at least 1 (got {max_concurrent})")
    # A local cluster is sized for the requested concurrency plus one CPU for
    # Ray Data; a running cluster must already have that room.
    # One trial's worth more: a finished trial's placement group can take a
    # while to be released, and the next trial must not wait on it.
    resources = ensure_ray(per_trial_cpus * ((max_concurrent or 1) + 1) + 1, address)
    gpus = base.workers if gpus_per_trial else 0
    concurrency = max_concurrent or derive_concurrency(resources, per_trial_cpus, gpus)
    if concurrency * per_trial_cpus > resources.get("CPU", 0) - 1:
        raise UserError(f"{concurrency} concurrent trials x {per_trial_cpus} CPUs leave no CPU for Ray Data "
                        f"on a cluster with {int(resources.get('CPU', 0))} CPUs; lower --max-concurrent")
    setup = {"base": base.to_dict(), "dataset": dataset_summary(meta), "meta": meta,
             "trials_dir": str(trials_dir), "use_gpu": gpus_per_trial > 0}
    # The trial actor only drives its TorchTrainer, which reserves the workers'
    # CPUs. It reserves memory but no CPU: even a fraction of one would leave
    # Ray Data's whole-CPU read tasks unschedulable (Tune refuses an empty request).
    trainable = tune.with_resources(tune.with_parameters(trial, setup=setup),
                                    {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    from .progress import SearchDisplay

    display = SearchDisplay(total=spec.trial_count(), epochs=base.epochs, metric=metric, enabled=show)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=base.epochs, grace_period=grace_period,
                                  reduction_factor=2)
        tuner = tune.Tuner(
            trainable, param_space=spec.param_space(),
            tune_config=tune.TuneConfig(metric=metric, mode="min", scheduler=scheduler,
                                        num_samples=spec.num_samples, max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0, callbacks=[display.callback]))
    import logging

    # A trial stopped by ASHA is blocked inside trainer.fit(), so it never
    # returns on its own; Tune force-kills such a trial actor only after this
    # many seconds (600 by default), and until then its Train workers keep
    # their CPUs and the search stalls. Killing the trial actor takes its Train
    # controller with it, and Train's placement-group cleaner frees the workers.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(STOPPED_TRIAL_GRACE_S))
    # Failed trials are reported in results.csv and the table, with the
    # traceback in the trial's folder; Tune's own logging stays off the terminal.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    with display:
        results = tuner.fit()
    release_leftover_placement_groups()
    rows = collect(results, trials_dir, metric, base.epochs)
    write_outputs(rows, out, metric)
    if rows and all(r["status"] == "error" for r in rows):
        raise RunFailed(f"search failed: all {len(rows)} trials errored; first error: {rows[0]['error']}")
    return rows


def release_leftover_placement_groups() -> int:
    """Remove the placement groups this driver's job still holds once the
    search is over. Train workers of trials that ASHA stopped are killed with
    their trial, but their reservations can outlive them on the cluster;
    with no trial left running, anything still reserved by this job is such a
    leftover. (A placement group's ID ends with its creator's job ID.)"""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for pg_id, info in ray.util.placement_group_table().items():
        if info["state"] == "CREATED" and pg_id.endswith(job):
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    return removed


def derive_concurrency(resources: dict, cpus_per_trial: int, gpus_per_trial: int) -> int:
    """Trials that fit at once, leaving one CPU for Ray Data's read tasks."""
    by_cpu = max(1, int(resources.get("CPU", 1) - 1) // max(cpus_per_trial, 1))
    if gpus_per_trial:
        return max(1, min(by_cpu, int(resources.get("GPU", 0)) // gpus_per_trial))
    return by_cpu


def collect(results, trials_dir: Path, metric: str, epochs: int) -> list[dict[str, Any]]:
    from .train import read_history, root_cause

    rows = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("_")[-2]
        run_dir = trials_dir / str(trial_id)
        history = read_history(run_dir)
        values = [h[metric] for h in history]
        latest = run_dir / "latest"
        status = "error" if result.error else ("completed" if len(history) >= epochs else "stopped early")
        if result.error:
            (run_dir).mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(f"{result.error!r}\n")
        rows.append({
            "trial_id": trial_id,
            **{k: None for k in SEARCHED}, **trial_params(result.config),
            f"final_{metric}": values[-1] if values else None,
            f"best_{metric}": min(values) if values else None,
            "epochs": len(history), "status": status,
            "checkpoint": str(latest.resolve()) if latest.exists() else "",
            "history": values,
            "error": root_cause(result.error) if result.error else "",
        })
    rows.sort(key=lambda r: (r[f"final_{metric}"] is None, r[f"final_{metric}"] or 0.0))
    return rows


def write_outputs(rows: list[dict[str, Any]], out: Path, metric: str) -> None:
    from .checkpoint import point_latest
    from .plots import trial_curves

    columns = ["trial_id", *SEARCHED, f"final_{metric}", f"best_{metric}", "epochs", "status", "checkpoint",
               "error"]
    tmp = out / ".results.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "results.csv")
    best = next((r for r in rows if r["checkpoint"]), None)
    if best is not None:
        point_latest(out, Path(best["checkpoint"]), name="best")
    trial_curves(rows, metric, out / "curves.png")
