"""The commands that can run on a cluster, as plain functions of JSON-able
arguments. The CLI calls them on the user's machine; a Ray Job calls the very
same ones (`python -m vae_ray.jobs '{"command": ..., "kwargs": ...}'`).
Each returns a JSON-able summary.

`validate(spec)` runs every check that needs no files, so a bad value fails
on the user's machine before anything is submitted. Each command checks its
address (and token file) first, before its library takes a lock or makes a
folder: a mistake there leaves nothing behind.

Like the CLI, this dispatch layer imports a command's implementation when the
command runs: a one-shard `generate` never loads Ray, and a job loads only
what it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from .cluster import check_address
from .config import FIELD_TYPES, TrainConfig, _coerce
from .config import spec as field_spec
from .errors import Interrupted, UserError
from .progress import Stages
from .rundir import RunDir, describe_checkpoint, merge_for_resume


def train(
    settings: dict[str, Any],
    resume: bool = False,
    *,
    show: bool = False,
    address: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a run; write its pictures; return its summary."""
    from .pictures import write_run_pictures
    from .tracking import Tracking
    from .trainer import fit

    check_address(address)
    if not settings.get("out"):
        raise UserError("--out is required (the run folder)")
    cfg = merge_for_resume(RunDir(settings["out"]), settings) if resume else TrainConfig.from_dict(settings)
    if not cfg.data:
        raise UserError("--data is required (a folder made by `vae-ray data prepare`)")
    tracking = Tracking.for_config(cfg)

    def finish(run: RunDir) -> dict[str, Any]:  # while the run is still locked
        pictures = write_run_pictures(run, run.read_config()[0]["data"])
        if tracking is not None:
            tracking.finish(run, folders=("plots", "samples"))
            pictures["mlflow_run_id"] = tracking.run_id
        return pictures

    try:
        summary = fit(cfg, resume=resume, show=show, address=address, verbose=verbose, tracking=tracking, finish=finish)
    except BaseException as exc:
        if tracking is not None:
            tracking.finish(
                RunDir(cfg.out), status="KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED"
            )
        raise
    if summary.get("already_complete"):
        run = RunDir(summary["run_dir"])
        return summary | {"plots": run.path("plots"), "samples": run.path("samples")}
    return summary


def tune(
    settings: dict[str, Any],
    search: dict[str, Any],
    out: str,
    options: dict[str, Any],
    *,
    show: bool = False,
    address: str | None = None,
) -> dict[str, Any]:
    from . import tune as tuning

    check_address(address)
    rows = tuning.search(
        TrainConfig.from_dict(settings), tuning.SearchSpec(**search), out, show=show, address=address, **options
    )
    return {
        "out": out,
        "best": f"{out.rstrip('/')}/best",
        "already_complete": rows.already_complete,
        "trials": [{k: v for k, v in r.items() if k != "history"} for r in rows],
        "rows": rows,
    }


def generate(options: dict[str, Any], *, show: bool = False, address: str | None = None) -> dict[str, Any]:
    from . import generate as generation

    check_address(address)
    with Stages(enabled=show, rate=True) as stages, continued_by_the_same_command("generation"):
        fitting = lambda done, total: stages("fitting the prior: encoding the training split", done, total)  # noqa: E731
        job = generation.Generation(**options, address=address, fitting=fitting)
        manifest = job.run(address, lambda done, total: stages("generating", done, total))
    return {k: manifest.get(k) for k in ("count", "seconds", "image_format", "already_complete", "filter")} | {
        "prior": job.plan.prior,
        "pixel_temperature": job.plan.pixel_temperature,
        "pixel_distances": job.pixel_distances,
        "out": job.out,
        "path": job.path_taken,
        "checkpoint": describe_checkpoint(options["checkpoint"], job.blob["path"]),
    }


@contextlib.contextmanager
def continued_by_the_same_command(what: str) -> Iterator[None]:
    """A set stopped by Ctrl-C or SIGTERM keeps its finished shards: say how to go on."""
    try:
        yield
    except (KeyboardInterrupt, Interrupted) as exc:
        raise Interrupted.restated(
            exc,
            lambda by: f"{what} stopped by {by}; the shards written are kept: the same command again continues the set",
        ) from None


def encode(options: dict[str, Any], *, show: bool = False, address: str | None = None) -> dict[str, Any]:
    from . import encode as encoding

    check_address(address)
    job = encoding.Encoding(**options)
    with Stages(enabled=show, rate=True) as stages, continued_by_the_same_command("encoding"):
        manifest = job.run(address, lambda done, total: stages("encoding", done, total))
    return {k: manifest.get(k) for k in ("images", "latent_dim", "splits", "seconds", "already_complete")} | {
        "out": job.out,
        "path": job.path_taken,
        "checkpoint": describe_checkpoint(options["checkpoint"], job.blob["path"]),
    }


def evaluate(options: dict[str, Any], *, show: bool = False, address: str | None = None) -> dict[str, Any]:
    from . import evaluate as evaluation

    check_address(address)
    from .data import dataset_read_lock

    job = evaluation.Evaluation(**options)
    with dataset_read_lock(job.data), Stages(enabled=show) as stages:
        result = job.run(address, stages if show else None)
    saved = evaluation.save(result, options["checkpoint"])
    return result | {"saved": saved, "checkpoint": describe_checkpoint(options["checkpoint"], result["checkpoint"])}


def sampling(options: dict[str, Any], *, show: bool = False, address: str | None = None) -> dict[str, Any]:
    """`vae-ray tune-sampling` (vae_ray/sampling.py)."""
    from .sampling import search

    check_address(address)
    with Stages(enabled=show) as stages:
        return search(**options, address=address, progress=stages if show else None)


COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    "train": train,
    "tune": tune,
    "generate": generate,
    "encode": encode,
    "evaluate": evaluate,
    "sampling": sampling,
}


def run(spec: dict[str, Any], *, show: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run a job spec: {"command": name, "kwargs": arguments}."""
    command, kwargs = _parts(spec)
    result = COMMANDS[command](**kwargs, show=show, address=address)
    result.pop("rows", None)
    return result


def validate(spec: dict[str, Any]) -> None:
    """Every check that needs no files, before a spec is sent anywhere."""
    from . import evaluate as evaluation
    from . import tune as tuning
    from .genplan import GenerateOptions

    command, kwargs = _parts(spec)
    if command == "train":
        if kwargs.get("resume"):
            check_settings(kwargs["settings"])
        else:
            TrainConfig.from_dict(kwargs["settings"])
    elif command == "tune":
        base = TrainConfig.from_dict(kwargs["settings"])
        options = kwargs["options"]
        tuning.check_options(
            options.get("metric", "test_matlab_elbo"),
            options.get("grace_period", 1),
            base,
            options.get("max_concurrent"),
            options.get("gpus_per_trial"),
        )
    elif command == "generate":
        GenerateOptions.of(kwargs["options"])
    elif command == "encode":
        from . import encode as encoding

        encoding.check_options(**kwargs["options"])
    elif command == "evaluate":
        evaluation.check_options(**kwargs["options"])
    elif command == "sampling":
        from .sampling import check_grid

        check_grid(**kwargs["options"])


def check_settings(settings: dict[str, Any]) -> None:
    """Check the given settings one by one (a resume's changes, before they meet the saved config)."""
    for key, value in settings.items():
        name = key.replace("-", "_")
        if name not in FIELD_TYPES:
            raise UserError(f"unknown setting '{key}'")
        field_spec(name).check(name, _coerce(name, value, FIELD_TYPES[name], "config"))


def _parts(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, dict) or spec.get("command") not in COMMANDS or not isinstance(spec.get("kwargs"), dict):
        raise UserError(f"not a job spec: expected {{'command': one of {', '.join(COMMANDS)}, 'kwargs': {{...}}}}")
    return spec["command"], spec["kwargs"]
