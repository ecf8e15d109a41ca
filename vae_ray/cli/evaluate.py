"""`vae-ray evaluate`, `vae-ray classifier train` and `vae-ray report`
(code: vae_ray/evaluate.py, vae_ray/judge.py, vae_ray/report.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from . import options as opt
from .jobs import submit_spec
from .output import EXIT_CODES, console, handles_errors, labelled, result, say

classifier_app = typer.Typer(
    help="The judge classifier used to measure sample quality.",
    no_args_is_help=True,
    epilog="Code: vae_ray/judge.py. " + EXIT_CODES,
)
RunArg = Annotated[str, typer.Argument(help="A run folder, or a checkpoint folder (local or s3://).")]
DataOpt = Annotated[
    str | None, typer.Option("--data", "-d", help="Prepared dataset (default: the one it was trained on).")
]


def register(app: typer.Typer) -> None:
    app.command(
        "evaluate",
        epilog="Code: vae_ray/cli/evaluate.py -> vae_ray/commands.py (evaluate) -> "
        "vae_ray/evaluate.py, vae_ray/metrics.py. " + EXIT_CODES,
    )(evaluate)
    app.command("evaluate-set", epilog="Code: vae_ray/quality.py, vae_ray/judge.py. " + EXIT_CODES)(evaluate_set)
    app.command("report", epilog="Code: vae_ray/report.py, vae_ray/plots.py. " + EXIT_CODES)(report)
    app.add_typer(classifier_app, name="classifier")


@handles_errors
def evaluate(
    checkpoint: RunArg,
    data: DataOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split to score.")] = "test",
    iw_samples: Annotated[
        int,
        typer.Option(
            "--iw-samples", "-k", help="Posterior samples per image for the ELBO and the importance-weighted NLL."
        ),
    ] = 100,
    samples: Annotated[int, typer.Option("--samples", help="Generated images for sample quality (0 = skip).")] = 10000,
    limit: Annotated[int | None, typer.Option("--limit", help="Score only the first N images of the split.")] = None,
    tstr: Annotated[
        bool, typer.Option("--tstr", help="Conditional models: Train-on-Synthetic-Test-on-Real accuracy.")
    ] = False,
    tstr_samples: Annotated[int, typer.Option("--tstr-samples", help="Generated training images for --tstr.")] = 20000,
    actors: Annotated[
        int | None, typer.Option("--actors", help="Scoring actors (default: one per CPU, or one per GPU).")
    ] = None,
    gpu: Annotated[
        bool | None,
        typer.Option(
            "--gpu/--no-gpu",
            help="Score on GPUs (default: when the cluster has them: this machine's, or the cluster's with --address).",
            metavar="",
            show_default="auto",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of posterior samples and generated images.", min=0)] = 0,
    address: opt.Address = None,
    submit: opt.Submit = False,
    wait: opt.Wait = True,
    install_requirements: opt.InstallRequirements = False,
    driver_cpus: opt.DriverCpus = 0.0,
    driver_gpus: opt.DriverGpus = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Likelihoods (ELBO, importance-weighted NLL, bits/dim) and sample quality of a model."""
    from .. import commands

    options = dict(
        checkpoint=checkpoint,
        data=data,
        split=split,
        iw_samples=iw_samples,
        samples=samples,
        limit=limit,
        actors=actors,
        seed=seed,
        tstr=tstr,
        tstr_samples=tstr_samples,
        gpu=gpu,
    )
    spec = {"command": "evaluate", "kwargs": {"options": options}}
    if submit:
        submit_spec(spec, address, wait, install_requirements, [checkpoint, data or ""], driver_cpus, driver_gpus)
        return
    summary = commands.evaluate(options, show=not as_json, address=address)
    saved = summary.pop("saved", None)
    if as_json:
        result(json.dumps(summary))
        return
    _metrics_table(summary)
    say(f"checkpoint: {summary['checkpoint']}")
    if saved:
        say(f"saved {saved}")


def _metrics_table(summary: dict) -> None:
    from ..evaluate import KEYS

    table = Table(title=f"{summary['split']} split, {summary['images']:,} images, K={summary['iw_samples']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in KEYS:
        value = summary.get(key)
        text = "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        if key == "inception_score_mean" and value is not None and summary.get("inception_score_std") is not None:
            text = f"{value:.4f} ± {summary['inception_score_std']:.4f} (10 splits)"
        if key != "inception_score_std":
            table.add_row(key, text)
    console.print(table)
    say(f"judge: {summary.get('judge')}")


@classifier_app.command("train")
@handles_errors
def classifier_train(
    data: Annotated[str, typer.Option("--data", "-d", help="Prepared, labelled dataset folder.")],
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs (3 reach 99.3% on MNIST).")] = 3,
    seed: opt.Seed = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Retrain when one is already cached.")] = False,
) -> None:
    """Train the dataset's judge classifier and cache it in DATA/classifier.

    Seed 0 (the default) is the judge `evaluate` and `evaluate-set` use; a
    judge of another seed is kept in DATA/classifier/seed-S, for
    `generate --min-confidence` (filter with one judge, judge with another)."""
    from .. import judge
    from ..progress import Stages

    with Stages() as stages:
        info = judge.train(
            data,
            epochs=epochs,
            seed=seed,
            overwrite=overwrite,
            progress=lambda step, steps, loss: stages("training classifier", step, steps),
        )
    labelled("test accuracy", f"{info['test_accuracy']:.4f} after {epochs} epochs ({info['seconds']:.0f} s)", "green")
    result(info["path"])


@handles_errors
def report(
    run: RunArg,
    out_dir: Annotated[
        str | None, typer.Option("--out", "-o", help="Folder for index.html and its PNGs (default: RUN/report).")
    ] = None,
    data: DataOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the images picked and sampled.", min=0)] = 0,
    quality: Annotated[
        list[str] | None,
        typer.Option(
            "--quality",
            help="An `evaluate-set --out` folder to show: the set's figures, grids per class and mixing curve "
            "(repeatable).",
        ),
    ] = None,
) -> None:
    """A self-contained HTML report: curves, reconstructions, samples, latent maps, interpolations."""
    from ..report import Report

    page_report = Report(run, out_dir, data, seed, tuple(quality or ()))
    with console.status("report") as status:
        page = page_report.build(lambda stage: status.update(f"report: {stage}"))
    labelled("wrote", page, "green")
    result(page)


@handles_errors
def evaluate_set(
    generated: Annotated[str, typer.Argument(help="A set `vae-ray generate` wrote (any format); local or s3://.")],
    data: Annotated[
        str, typer.Option("--data", "-d", help="The real prepared dataset, with its judge (vae-ray classifier train).")
    ],
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", help="Folder for quality.json and sample grids (new, or an earlier one)."),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Judge only the set's first N images.")] = None,
    copy_percentile: Annotated[
        float,
        typer.Option(
            "--copy-percentile", help="A near-copy is closer to a training image than this % of real test images are."
        ),
    ] = 1.0,
    tstr: Annotated[
        bool, typer.Option("--tstr/--no-tstr", help="Train-on-synthetic figures (labelled sets).", metavar="")
    ] = True,
    mixing: Annotated[
        bool,
        typer.Option("--mixing/--no-mixing", help="Also the real:synthetic mixes between TRTR and TSTR.", metavar=""),
    ] = True,
    steps: Annotated[
        int, typer.Option("--steps", help="Batches of 128 each TSTR/TRTR classifier trains on (the judge's: 450).")
    ] = 450,
    seed: opt.Seed = 0,
    card: Annotated[
        bool,
        typer.Option(
            "--card",
            help="Also write the figures into the set's dataset card (README.md of a --format hf set), "
            "in place of earlier ones.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="A Ray cluster (host:port, auto): the TSTR, TRTR and mixing classifiers train there at once, "
            "one Ray task each. Default: RAY_ADDRESS, else one after another here.",
        ),
    ] = None,
) -> None:
    """Quality of a generated set against real data: Frechet distance, precision/recall, Inception
    Score in the judge's features, near-copies of training images, TSTR against TRTR."""
    from ..progress import Stages
    from ..quality import evaluate_set as run

    with Stages(enabled=not as_json) as stages:
        summary = run(
            generated,
            data,
            limit=limit,
            seed=seed,
            copy_percentile=copy_percentile,
            tstr=tstr,
            mixing=mixing,
            steps=steps,
            out=out,
            card=card,
            progress=stages,
            address=address,
        )
    if as_json:
        result(json.dumps(summary))
        return
    table = Table(title=f"{summary['images']:,} generated images against {summary['data']}")
    for column in ("figure", "set", "real"):
        table.add_column(column, justify="right" if column != "figure" else "left")

    def cell(value) -> str:
        return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

    rows = [
        ("Frechet distance", summary["fd"], summary["fd_real"]),
        ("precision", summary["precision"], summary["precision_real"]),
        ("recall", summary["recall"], summary["recall_real"]),
        ("Inception Score", summary["inception_score"], summary["inception_score_real"]),
        (
            "near-copies (pixels)",
            summary["near_copies_pixels"]["fraction"],
            summary["near_copies_pixels"]["fraction_real"],
        ),
        (
            "near-copies (features)",
            summary["near_copies_features"]["fraction"],
            summary["near_copies_features"]["fraction_real"],
        ),
        ("classifier accuracy (TSTR / TRTR)", summary["tstr_accuracy"], summary["trtr_accuracy"]),
    ]
    for name, ours, real in rows:
        table.add_row(name, cell(ours), cell(real))
    console.print(table)
    if summary["mixing"]:
        say(
            "mixing: "
            + ", ".join(f"{m['synthetic_share']:.0%} synthetic {m['accuracy']:.4f}" for m in summary["mixing"])
        )
    say(f"judge: {summary['judge']}")
    if summary.get("filter"):
        say(f"the set was filtered: {summary['filter']['acceptance_rate']:.1%} of candidates kept")
    if summary.get("warning"):
        say(f"warning: {summary['warning']}", "yellow")
    if summary.get("card"):
        say(f"card: the figures are in {summary['card']}")
    if summary.get("out"):
        result(summary["out"])
