"""`vae-ray tune` and `vae-ray study latent-dims | loss-weights`
(code: vae_ray/tune.py, vae_ray/study.py). The settings every trial shares
are the train options, made from vae_ray/config.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from . import options as opt
from .jobs import submit_spec
from .output import EXIT_CODES, cell, console, handles_errors, labelled, result, say

SEARCH = "Search"
TUNE_EPILOG = (
    "Code: vae_ray/cli/tune.py -> vae_ray/commands.py (tune) -> vae_ray/tune.py (search, trial). " + EXIT_CODES
)
# Searched settings are the search's own options; the rest are the trials' shared settings.
NOT_SHARED = ("out", "latent_dim", "lr", "beta", "recon_weight", "min_workers")

study_app = typer.Typer(
    help="The source documents' two studies, as searches plus pictures.",
    no_args_is_help=True,
    epilog="Code: vae_ray/study.py. " + EXIT_CODES,
)


def register(app: typer.Typer) -> None:
    app.command(
        "tune",
        help="Search latent dimension, learning rate and KL weight with Ray Tune and ASHA early "
        "stopping; every trial is a Ray Train run.",
        epilog=TUNE_EPILOG,
    )(handles_errors(_tune_command()))
    app.command(
        "tune-sampling",
        epilog="Code: vae_ray/cli/tune.py -> vae_ray/sampling.py (search, trial). " + EXIT_CODES,
    )(tune_sampling)
    app.add_typer(study_app, name="study")


@handles_errors
def tune_sampling(
    checkpoint: Annotated[str, typer.Argument(help="A trained run (its latest checkpoint) or a checkpoint folder.")],
    out_dir: Annotated[
        str,
        typer.Option("--out", "-o", help="Search folder: results.csv, best.json, search.png (new, or an earlier one)."),
    ],
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="The real dataset, with its judge (default: the one the model trained on)."),
    ] = None,
    temperatures: Annotated[str, typer.Option("--temperatures", help="Grid of --temperature values.")] = "0.8,0.9,1.0",
    priors: Annotated[str, typer.Option("--priors", help="Grid of --prior values (normal, gmm).")] = "normal,gmm",
    min_confidences: Annotated[
        str,
        typer.Option("--min-confidences", help="Grid of --min-confidence values (0 = unfiltered, auto = per class)."),
    ] = "0",
    pixel_temperatures: Annotated[
        str, typer.Option("--pixel-temperatures", help="Grid of --pixel-temperature values (Bernoulli decoders).")
    ] = "1",
    group_temperatures: Annotated[
        str,
        typer.Option(
            "--group-temperatures",
            help="Grid of --group-temperatures settings, separated by semicolons: '1,1,1;1,1.3,1.3' (hvae).",
        ),
    ] = "",
    num: Annotated[int, typer.Option("--num", "-n", help="Images each trial draws and scores.")] = 2000,
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            help="fd: Frechet distance to real training images in the judge's features (lower is better); "
            "tstr: accuracy on them of a classifier trained on the trial's images (labelled sets).",
        ),
    ] = "fd",
    max_copy_distance: Annotated[
        str, typer.Option("--max-copy-distance", help="As generate's, the same for every trial (0 = off).")
    ] = "0",
    judge_seed: Annotated[int, typer.Option("--judge-seed", help="As generate's: the filtering judge.", min=0)] = 1,
    seed: opt.Seed = 0,
    address: opt.Address = None,
    submit: opt.Submit = False,
    wait: opt.Wait = True,
    install_requirements: opt.InstallRequirements = False,
    driver_cpus: opt.DriverCpus = 0.0,
    driver_gpus: opt.DriverGpus = 0.0,
    as_json: opt.Json = False,
) -> None:
    """Search how to sample a trained model (temperature, prior, confidence filter, pixel and group temperatures), without retraining.

    A Ray Tune grid: every trial draws a set as `generate` would and scores it against real training images."""
    import json

    from .. import commands
    from .generate import auto_or_number

    options = dict(
        checkpoint=checkpoint,
        out=out_dir,
        data=data,
        temperatures=temperatures,
        priors=priors,
        min_confidences=min_confidences,
        pixel_temperatures=pixel_temperatures,
        group_temperatures=group_temperatures,
        num=num,
        metric=metric,
        max_copy_distance=auto_or_number(max_copy_distance, "--max-copy-distance"),
        seed=seed,
        judge_seed=judge_seed,
    )
    spec = {"command": "sampling", "kwargs": {"options": options}}
    if submit:
        submit_spec(spec, address, wait, install_requirements, [checkpoint, out_dir, data], driver_cpus, driver_gpus)
        return
    summary = commands.sampling(options, show=not as_json, address=address)
    if as_json:
        result(json.dumps(summary, default=str))
        return
    key = "tstr_accuracy" if summary["metric"] == "tstr" else "fd"
    table = Table(title=f"{len(summary['trials'])} sampling settings, {summary['images_per_trial']:,} images each")
    columns = ["temperature", "prior", "min_confidence", "pixel_temperature", "group_temperatures"]
    columns += ["fd", "precision", "recall", "acceptance_rate"]
    columns += ["tstr_accuracy"] if key == "tstr_accuracy" else []
    for column in columns:
        table.add_column(column, justify="right")
    for row in summary["trials"]:
        table.add_row(*(cell(f"{row[c]:.4g}" if isinstance(row[c], float) else row[c]) for c in columns))
    console.print(table)
    labelled("best:", f"{summary['best']} ({key} {summary['best_value']:.4f})", "green")
    say(f"use it: {summary['command']}")
    result(summary["out"])


def _tune_own(
    out_dir: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Search folder (or s3:// URI): results.csv, best, trials/.", rich_help_panel=SEARCH
        ),
    ],
    config_file: opt.ConfigFile = None,
    latent_dims: Annotated[
        str, typer.Option("--latent-dims", help="Grid of latent sizes.", rich_help_panel=SEARCH)
    ] = "2,5,10,20",
    lrs: Annotated[
        str | None,
        typer.Option(
            "--lrs",
            help="Grid of learning rates, e.g. 1e-3,3e-3 (default 1e-3 without --lr-min/--lr-max).",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    lr_min: Annotated[
        float | None,
        typer.Option("--lr-min", help="Random or Optuna search: lowest learning rate.", rich_help_panel=SEARCH),
    ] = None,
    lr_max: Annotated[
        float | None,
        typer.Option("--lr-max", help="Random or Optuna search: highest learning rate.", rich_help_panel=SEARCH),
    ] = None,
    num_samples: Annotated[
        int,
        typer.Option(
            "--num-samples", help="Random draws, Optuna trials, or repeats of the grid.", rich_help_panel=SEARCH
        ),
    ] = 1,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--search",
            help="grid, random, or optuna (Tune's OptunaSearch: --num-samples trials chosen from the results so "
            "far, seeded by --seed; needs the optuna package). Default: grid with --lrs, random with "
            "--lr-min/--lr-max.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    betas: Annotated[str, typer.Option("--betas", help="Grid of KL weights.", rich_help_panel=SEARCH)] = "1.0",
    grace_period: Annotated[
        int, typer.Option("--grace-period", help="Epochs before ASHA may stop a trial.", rich_help_panel=SEARCH)
    ] = 1,
    gpus_per_trial: Annotated[
        float | None,
        typer.Option(
            "--gpus-per-trial",
            help="GPUs per trial; a fraction shares a GPU between one-worker trials. Default: on a cluster "
            "with GPUs, a quarter GPU per one-worker trial (four trials per GPU), a whole GPU per worker "
            "otherwise; 0 trains on CPUs.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    max_concurrent: Annotated[
        int | None,
        typer.Option("--max-concurrent", help="Trials at once (default: what fits).", rich_help_panel=SEARCH),
    ] = None,
    metric: Annotated[
        str, typer.Option("--metric", help="test_matlab_elbo or test_neg_elbo_nats.", rich_help_panel=SEARCH)
    ] = "test_matlab_elbo",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted search in --out.", rich_help_panel=SEARCH)
    ] = False,
) -> None: ...


def _tune_cluster(
    address: opt.Address = None,
    submit: opt.Submit = False,
    wait: opt.Wait = True,
    install_requirements: opt.InstallRequirements = False,
    driver_cpus: opt.DriverCpus = 0.0,
    driver_gpus: opt.DriverGpus = 0.0,
) -> None: ...


OWN = (
    "out_dir",
    "config_file",
    "latent_dims",
    "lrs",
    "lr_min",
    "lr_max",
    "num_samples",
    "strategy",
    "betas",
    "grace_period",
    "gpus_per_trial",
    "max_concurrent",
    "metric",
    "resume",
    "address",
    "submit",
    "wait",
    "install_requirements",
    "driver_cpus",
    "driver_gpus",
)


def _tune_command():
    def tune(ctx: typer.Context, **values: Any) -> None:
        own = {k: values.pop(k) for k in OWN}
        run_tune(opt.given(ctx, values), **own)

    generated = opt.config_parameters(exclude=NOT_SHARED, rename={"workers": "--workers-per-trial"})
    return opt.with_parameters(tune, opt.own_parameters(_tune_own), generated, opt.own_parameters(_tune_cluster))


def run_tune(
    flags: dict[str, Any],
    *,
    out_dir: str,
    config_file: Path | None,
    latent_dims: str,
    lrs: str | None,
    lr_min: float | None,
    lr_max: float | None,
    num_samples: int,
    strategy: str | None,
    betas: str,
    grace_period: int,
    gpus_per_trial: float | None,
    max_concurrent: int | None,
    metric: str,
    resume: bool,
    address: str | None,
    submit: bool,
    wait: bool,
    install_requirements: bool,
    driver_cpus: float,
    driver_gpus: float,
) -> None:
    from ..config import load_config, read_settings
    from ..errors import UserError
    from ..tracking import mlflow_uri, wandb_project
    from ..tune import SearchSpec, parse_list

    cluster = (address, submit, wait, install_requirements, driver_cpus, driver_gpus)
    options = {"max_concurrent": max_concurrent, "gpus_per_trial": gpus_per_trial, "resume": resume}
    saved = _saved_search(out_dir) if resume else None
    if saved is not None:  # continue exactly what was started: its settings, space and options
        settings = {**saved["base"], **flags, "out": out_dir}
        options |= {"grace_period": saved["grace_period"], "metric": saved["metric"]}
        _run_search(settings, saved["search"], out_dir, options, *cluster)
        return
    if lrs is None and lr_min is None and lr_max is None:
        lrs = "1e-3"
    if (lr_min is None) != (lr_max is None):
        raise UserError("random search needs both --lr-min and --lr-max")
    base = {**(read_settings(config_file) if config_file else {}), **flags, "out": out_dir}
    base.setdefault("mlflow", mlflow_uri())
    base.setdefault("wandb", wandb_project())
    if "epochs" not in flags and "epochs" not in base:
        base["epochs"] = 10  # a search's trials are short by default
    settings = load_config(None, **base).to_dict()
    if not settings.get("data"):
        if resume:
            raise UserError(
                f"{out_dir}: no search to resume (no search.json of a vae-ray search); start one with --data"
            )
        raise UserError("--data is required (a folder made by `vae-ray data prepare`)")
    spec = SearchSpec(
        latent_dims=parse_list(latent_dims, int, "--latent-dims"),
        lrs=parse_list(lrs, float, "--lrs"),
        lr_range=(lr_min, lr_max) if lr_min is not None else None,
        num_samples=num_samples,
        betas=parse_list(betas, float, "--betas"),
        strategy=strategy or "auto",
    )
    options |= {"grace_period": grace_period, "metric": metric}
    _run_search(settings, dict(spec.__dict__), out_dir, options, *cluster)


def _saved_search(out_dir: str) -> dict | None:
    from .. import storage
    from ..tune import SEARCH_FILE

    try:
        saved = storage.read_json(storage.join(storage.check_uri(out_dir), SEARCH_FILE))
    except (FileNotFoundError, ValueError):
        return None
    if not (isinstance(saved, dict) and {"base", "search", "grace_period", "metric"} <= set(saved)):
        return None
    from ..errors import UserError
    from ..tune import SearchSpec

    try:  # a search.json is data: a damaged or crafted one is one line, not a traceback
        SearchSpec(**saved["search"])
        if not isinstance(saved["base"], dict):
            raise TypeError("base")
    except TypeError:
        raise UserError(f"{out_dir}: {SEARCH_FILE} does not describe a vae-ray search (damaged or not ours)") from None
    return saved


def _run_search(
    settings: dict,
    search: dict,
    out_dir: str,
    options: dict,
    address: str | None,
    submit: bool,
    wait: bool,
    install_requirements: bool,
    driver_cpus: float,
    driver_gpus: float,
) -> None:
    from .. import commands

    job = {"command": "tune", "kwargs": {"settings": settings, "search": search, "out": out_dir, "options": options}}
    if submit:
        submit_spec(job, address, wait, install_requirements, [settings["data"], out_dir], driver_cpus, driver_gpus)
        return
    summary = commands.tune(**job["kwargs"], show=True, address=address)
    if summary["already_complete"]:
        labelled("complete:", f"{out_dir} already holds this search; nothing to do", "green")
    trial_table(summary["rows"], options["metric"])
    say(f"results {out_dir.rstrip('/')}/results.csv  curves {out_dir.rstrip('/')}/curves.png")
    result(summary["best"])


def trial_table(rows: list, metric: str) -> None:
    table = Table(title=f"trials by final {metric}")
    for column in ("trial", "latent", "lr", "beta", "final", "best", "epochs", "status"):
        table.add_column(column, justify="right" if column not in ("trial", "status") else "left", no_wrap=True)

    def number(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "-"

    for r in rows:
        table.add_row(
            cell(r["trial_id"]),
            str(r["latent_dim"]),
            f"{r['lr']:.2e}",
            f"{r['beta']:g}",
            number(r[f"final_{metric}"]),
            number(r[f"best_{metric}"]),
            str(r["epochs"]),
            cell(r["status"]),
        )
    console.print(table)


# ---------------------------------------------------------------------------
# Studies
# ---------------------------------------------------------------------------
Data = Annotated[str, typer.Option("--data", "-d", help="Prepared dataset folder.")]
StudyOut = Annotated[str, typer.Option("--out", "-o", help="Study folder (a search folder plus pictures).")]
Epochs = Annotated[int, typer.Option("--epochs", help="Epochs per trial.", min=1, max=100_000)]
Lr = Annotated[float, typer.Option("--lr", help="Learning rate of every trial.", min=1e-12)]
WorkersPerTrial = Annotated[int, typer.Option("--workers-per-trial", help="Ray Train workers per trial.", min=1)]
MaxConcurrent = Annotated[int | None, typer.Option("--max-concurrent", help="Trials at once (default: what fits).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted study in --out.")]


def _print_study(summary: dict) -> None:
    table = Table(title=f"study {summary['study']}: final test metrics")
    table.add_column("setting")
    for column in ("test_matlab_elbo", "test_kl"):
        table.add_column(column, justify="right")
    for name, values in summary["results"].items():
        table.add_row(cell(name), f"{values['test_matlab_elbo']:.3f}", f"{values['test_kl']:.3f}")
    console.print(table)
    for picture in summary["pictures"]:
        say(f"picture {picture}")
    result(summary["pictures"][0])


@study_app.command("latent-dims")
@handles_errors
def study_latent_dims(
    data: Data,
    out_dir: StudyOut,
    latent_dims: Annotated[str, typer.Option("--latent-dims", help="Latent sizes to compare.")] = "2,5,10,20",
    epochs: Epochs = 10,
    lr: Lr = 2e-3,
    workers_per_trial: WorkersPerTrial = 1,
    max_concurrent: MaxConcurrent = None,
    resume: Resume = False,
    address: opt.Address = None,
    config_file: opt.ConfigFile = None,
) -> None:
    """Latent size 2, 5, 10, 20 with loss 0.5*MSE + 0.5*KL: reconstructions and the metric per size."""
    from ..cluster import check_address
    from ..study import latent_dims as run_study
    from ..tune import parse_list

    check_address(address)  # before the search locks or makes anything
    dims = tuple(parse_list(latent_dims, int, "--latent-dims"))
    _print_study(
        run_study(
            data,
            out_dir,
            dims,
            epochs=epochs,
            lr=lr,
            workers_per_trial=workers_per_trial,
            max_concurrent=max_concurrent,
            resume=resume,
            address=address,
            config_file=config_file,
        )
    )


@study_app.command("loss-weights")
@handles_errors
def study_loss_weights(
    data: Data,
    out_dir: StudyOut,
    latent_dim: Annotated[int, typer.Option("--latent-dim", help="Latent size of both models.", min=1)] = 20,
    epochs: Epochs = 10,
    lr: Lr = 2e-3,
    workers_per_trial: WorkersPerTrial = 1,
    max_concurrent: MaxConcurrent = None,
    resume: Resume = False,
    address: opt.Address = None,
    config_file: opt.ConfigFile = None,
) -> None:
    """0.9*MSE + 0.1*KL against 0.1*MSE + 0.9*KL: reconstructions and t-SNE maps side by side."""
    from ..cluster import check_address
    from ..study import loss_weights as run_study

    check_address(address)  # before the search locks or makes anything
    _print_study(
        run_study(
            data,
            out_dir,
            latent_dim=latent_dim,
            epochs=epochs,
            lr=lr,
            workers_per_trial=workers_per_trial,
            max_concurrent=max_concurrent,
            resume=resume,
            address=address,
            config_file=config_file,
        )
    )
