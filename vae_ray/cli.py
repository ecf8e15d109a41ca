"""The `vae-ray` command line: one function per command (Typer), Rich output.

Human-facing progress and tables go to stderr; machine-readable results
(`--json`, final paths) go to stdout. A `UserError` anywhere ends the command
with one red line and exit status 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import RunFailed, UserError

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

app = typer.Typer(
    name="vae-ray",
    help="Variational autoencoders trained, tuned and sampled at cluster scale on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Prepare datasets as Parquet shards and look at them.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def user_errors(fn):
    """Turn a UserError into one line on stderr and exit status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2) from None
        except RunFailed as exc:
            console.print(f"[bold red]failed:[/] {exc}", soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"vae-ray {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Variational autoencoders trained, tuned and sampled at cluster scale on Ray."""


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
@data_app.command("prepare")
@user_errors
def data_prepare(
    dataset: str = typer.Argument(..., help="mnist, fashion-mnist, cifar10, imagefolder or synthetic."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write (must be new or empty)."),
    source: Optional[str] = typer.Option(None, "--source", "-s",
                                         help="Local files: a folder or .tar.gz (else env var, system path, cache, download)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Keep only the first N images of each split."),
    shards: Optional[int] = typer.Option(None, "--shards", help="Parquet files for the train split (default: one per 10,000 images)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="imagefolder: square size in pixels."),
    channels: Optional[int] = typer.Option(None, "--channels", help="imagefolder: 1 (grey) or 3 (RGB)."),
    test_fraction: float = typer.Option(0.1, "--test-fraction", help="imagefolder without train/test folders: share held out."),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help="imagefolder: skip unreadable images (counted) instead of failing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset at --out (only once the new one is complete)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the synthetic source and random splits."),
) -> None:
    """Turn dataset files into Parquet shards that Ray Data streams."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .data import prepare

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(split: str, done: int, total: int) -> None:
            if split not in tasks:
                tasks[split] = bar.add_task(f"{dataset} {split}", total=total)
            bar.update(tasks[split], completed=done)

        meta = prepare(dataset, out_dir, source, limit=limit, shards=shards, overwrite=overwrite,
                       image_size=image_size, channels=channels, test_fraction=test_fraction,
                       skip_corrupt=skip_corrupt, seed=seed, progress=progress)
    label = " (synthetic)" if meta["synthetic"] else ""
    h, w, c = meta["shape"]
    console.print(f"[green]prepared[/] {meta['name']}{label}: {meta['splits']['train']['count']:,} train + "
                  f"{meta['splits']['test']['count']:,} test images, {h}x{w}x{c}, from {meta['source']}")
    if meta.get("skipped_corrupt"):
        console.print(f"[yellow]skipped {len(meta['skipped_corrupt'])} corrupt image(s)[/], listed in dataset.json")
    out.print(str(out_dir))


@data_app.command("show")
@user_errors
def data_show(
    data_dir: str = typer.Argument(..., help="A prepared dataset folder (or s3:// URI)."),
    png: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: DIR/preview.png)."),
    split: str = typer.Option("train", "--split", help="train or test."),
    num: int = typer.Option(64, "--num", "-n", help="Images in the grid."),
) -> None:
    """Write a grid of sample images (PNG) and print the counts per class."""
    from .data import read_arrays, read_meta
    from .plots import save_grid

    if num < 1:
        raise UserError(f"--num must be at least 1 (got {num})")
    meta = read_meta(data_dir)
    images, _ = read_arrays(data_dir, split, limit=num, meta=meta)
    if png is None:
        if "://" in data_dir:
            raise UserError("--out is needed when the dataset is not on local disk")
        png = Path(data_dir) / "preview.png"
    save_grid(images, png)
    table = Table(title=f"{meta['name']}{' (synthetic)' if meta['synthetic'] else ''}  "
                        f"{'x'.join(map(str, meta['shape']))}")
    table.add_column("class")
    for s in meta["splits"]:
        table.add_column(s, justify="right")
    for name in meta["classes"]:
        table.add_row(name, *(f"{meta['splits'][s]['class_counts'].get(name, 0):,}" for s in meta["splits"]))
    table.add_row("[bold]total", *(f"[bold]{meta['splits'][s]['count']:,}" for s in meta["splits"]))
    console.print(table)
    out.print(str(png))


@data_app.command("verify")
@user_errors
def data_verify(data_dir: Path = typer.Argument(..., help="A prepared dataset folder.")) -> None:
    """Check every shard against the checksums in dataset.json."""
    from .data import verify

    meta = verify(data_dir)
    n = sum(len(s["shards"]) for s in meta["splits"].values())
    console.print(f"[green]ok[/] {data_dir}: {n} shards match dataset.json")


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------
# Settings that define the model: a resumed run must keep them.
MANIFEST_NAME = "manifest.json"
MODEL_FIELDS = ("arch", "latent_dim", "conditional", "loss", "data")


@app.command("train")
@user_errors
def train_cmd(
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Prepared dataset folder (or s3:// URI)."),
    out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder to create (or resume)."),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML or JSON file of settings; flags override it."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training split."),
    latent_dim: Optional[int] = typer.Option(None, "--latent-dim", help="Size K of the latent vector."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global mini-batch size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="constant, cosine or onecycle."),
    adam_beta2: Optional[float] = typer.Option(None, "--adam-beta2", help="Adam's second-moment decay (default 0.999)."),
    loss: Optional[str] = typer.Option(None, "--loss", help="matlab, bernoulli, gaussian, logistic (default: by channels)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="Weight of the KL term."),
    kl_warmup: Optional[int] = typer.Option(None, "--kl-warmup", help="Epochs of linear KL warm-up."),
    z_samples: Optional[int] = typer.Option(None, "--z-samples", help="Latent samples per training image, in antithetic pairs (default 1; 2 learns more per epoch at the cost of a second decoder pass)."),
    ema: Optional[float] = typer.Option(None, "--ema", help="Evaluate, save and sample an exponential moving average of the weights with this decay (e.g. 0.998)."),
    binarize: Optional[bool] = typer.Option(None, "--binarize/--no-binarize", help="Dynamic binarisation (bernoulli)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="mnist or cifar (default: by image shape)."),
    conditional: Optional[bool] = typer.Option(None, "--conditional/--unconditional", help="Class-conditional VAE."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Ray Train workers (DDP ranks)."),
    cpus_per_worker: Optional[int] = typer.Option(None, "--cpus-per-worker", help="CPUs (and torch threads) per worker."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="One GPU per worker (default: when the cluster has GPUs)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 or fp16."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)."),
    submit: bool = typer.Option(False, "--submit", help="Run as a Ray Job on the cluster at --address (or RAY_ADDRESS)."),
    wait: bool = typer.Option(False, "--wait", help="With --submit: stream the job's logs and exit with its outcome."),
    install_requirements: bool = typer.Option(False, "--install-requirements", help="With --submit: pip-install the package's requirements in the job's runtime environment."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Train the VAE with Ray Train: Ray Data streams the shards to DDP workers."""
    from .config import TrainConfig, load_config, read_mapping
    from .train import fit

    flags = dict(data=data, out=out_dir, epochs=epochs, latent_dim=latent_dim, batch_size=batch_size, lr=lr,
                 lr_schedule=lr_schedule, adam_beta2=adam_beta2, loss=loss, beta=beta, kl_warmup_epochs=kl_warmup,
                 z_samples=z_samples, ema=ema, binarize=binarize, arch=arch, conditional=conditional,
                 workers=workers, cpus_per_worker=cpus_per_worker,
                 gpu=gpu, precision=precision, seed=seed)
    if resume:
        if out_dir is None:
            raise UserError("--resume needs --out RUN")
        saved_path = Path(out_dir) / "config.json"
        if not saved_path.is_file():
            raise UserError(f"{out_dir}: nothing to resume (no config.json)")
        saved = TrainConfig.from_dict(read_mapping(saved_path).get("config", {}), source=str(saved_path))
        for name in MODEL_FIELDS:
            if flags.get(name) is not None and flags[name] != getattr(saved, name) \
                    and not (name == "data" and Path(flags[name]).resolve() == Path(saved.data).resolve()):
                raise UserError(f"--resume keeps the run's {name} ({getattr(saved, name)!r}); "
                                f"start a new run to change it")
        cfg = saved.replace(**flags)
    else:
        cfg = load_config(config_file, **flags)
        if not cfg.data:
            raise UserError("--data is required (a folder made by `vae-ray data prepare`)")
    if submit:
        _submit({"command": "train", "config": cfg.validate().to_dict(), "resume": resume}, address, wait,
                install_requirements, [cfg.data, cfg.out])
        return
    summary = fit(cfg, resume=resume, show=not as_json, address=address)
    if as_json:
        out.print(json.dumps(summary))
        return
    final = summary["final"]
    if final:
        console.print(f"[green]done[/] {summary['epochs']} epochs: test MATLAB ELBO "
                      f"{final['test_matlab_elbo']:.3f}, test -ELBO {final['test_neg_elbo_nats']:.2f} nats/image")
    console.print(f"checkpoint {summary['checkpoint']}")
    console.print(f"plots      {summary['plots']}")
    out.print(summary["samples"])


# ---------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------
@app.command("tune")
@user_errors
def tune_cmd(
    data: str = typer.Option(..., "--data", "-d", help="Prepared dataset folder (or s3:// URI)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Search folder: results.csv, best, trials/."),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="Base settings for every trial."),
    latent_dims: str = typer.Option("2,5,10,20", "--latent-dims", help="Grid of latent sizes."),
    lrs: Optional[str] = typer.Option(None, "--lrs", help="Grid of learning rates, e.g. 1e-3,3e-3."),
    lr_min: Optional[float] = typer.Option(None, "--lr-min", help="Random search: lowest learning rate."),
    lr_max: Optional[float] = typer.Option(None, "--lr-max", help="Random search: highest learning rate."),
    num_samples: int = typer.Option(1, "--num-samples", help="Random draws (or repeats of the grid)."),
    betas: str = typer.Option("1.0", "--betas", help="Grid of KL weights."),
    epochs: int = typer.Option(10, "--epochs", help="Epochs per trial (ASHA's maximum)."),
    grace_period: int = typer.Option(1, "--grace-period", help="Epochs before ASHA may stop a trial."),
    workers_per_trial: int = typer.Option(1, "--workers-per-trial", help="Ray Train workers per trial."),
    cpus_per_worker: int = typer.Option(1, "--cpus-per-worker", help="CPUs per worker."),
    gpus_per_trial: int = typer.Option(0, "--gpus-per-trial", help="GPUs per trial (one per worker)."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="Trials at once (default: what fits)."),
    metric: str = typer.Option("test_matlab_elbo", "--metric", help="test_matlab_elbo or test_neg_elbo_nats."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted search in --out."),
    submit: bool = typer.Option(False, "--submit", help="Run as a Ray Job on the cluster at --address (or RAY_ADDRESS)."),
    wait: bool = typer.Option(False, "--wait", help="With --submit: stream the job's logs and exit with its outcome."),
    install_requirements: bool = typer.Option(False, "--install-requirements", help="With --submit: pip-install the package's requirements in the job's runtime environment."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address."),
) -> None:
    """Search latent dimension, learning rate and KL weight with Ray Tune and ASHA early stopping."""
    from .config import load_config
    from .tune import SearchSpec, parse_list, search

    if lrs is None and lr_min is None and lr_max is None:
        lrs = "1e-3"
    if (lr_min is None) != (lr_max is None):
        raise UserError("random search needs both --lr-min and --lr-max")
    if gpus_per_trial and gpus_per_trial != workers_per_trial:
        raise UserError("--gpus-per-trial must equal --workers-per-trial (one GPU per worker)")
    base = load_config(config_file, data=data, out=str(out_dir), epochs=epochs, workers=workers_per_trial,
                       cpus_per_worker=cpus_per_worker, batch_size=None)
    spec = SearchSpec(latent_dims=parse_list(latent_dims, int, "--latent-dims"),
                      lrs=parse_list(lrs, float, "--lrs"),
                      lr_range=(lr_min, lr_max) if lr_min is not None else None,
                      num_samples=num_samples, betas=parse_list(betas, float, "--betas"))
    options = dict(grace_period=grace_period, metric=metric, max_concurrent=max_concurrent,
                   gpus_per_trial=gpus_per_trial, resume=resume)
    if submit:
        import dataclasses

        _submit({"command": "tune", "config": base.to_dict(), "search": dataclasses.asdict(spec),
                 "out": str(out_dir), "options": options}, address, wait, install_requirements, [data, str(out_dir)])
        return
    rows = search(base, spec, out_dir, address=address, **options)
    _trial_table(rows, metric)
    console.print(f"results {out_dir / 'results.csv'}  curves {out_dir / 'curves.png'}")
    out.print(str(out_dir / "best"))


study_app = typer.Typer(help="The source documents' two studies, as searches plus pictures.", no_args_is_help=True)
app.add_typer(study_app, name="study")


def _study_options(workers_per_trial: int, max_concurrent: Optional[int], resume: bool, address: Optional[str],
                   config_file: Optional[Path]) -> dict:
    return {"workers_per_trial": workers_per_trial, "max_concurrent": max_concurrent, "resume": resume,
            "address": address, "config_file": config_file}


def _print_study(summary: dict) -> None:
    table = Table(title=f"study {summary['study']}: final test metrics")
    table.add_column("setting")
    for column in ("test_matlab_elbo", "test_kl"):
        table.add_column(column, justify="right")
    for name, values in summary["results"].items():
        table.add_row(name, f"{values['test_matlab_elbo']:.3f}", f"{values['test_kl']:.3f}")
    console.print(table)
    for picture in summary["pictures"]:
        console.print(f"picture {picture}")
    out.print(summary["pictures"][0])


STUDY_OPTIONS = dict(
    workers_per_trial=typer.Option(1, "--workers-per-trial", help="Ray Train workers per trial."),
    max_concurrent=typer.Option(None, "--max-concurrent", help="Trials at once (default: what fits)."),
    resume=typer.Option(False, "--resume", help="Continue an interrupted study in --out."),
    address=typer.Option(None, "--address", help="Ray cluster address."),
    config_file=typer.Option(None, "--config", "-c", help="Base settings for every trial."),
)


@study_app.command("latent-dims")
@user_errors
def study_latent_dims(
    data: str = typer.Option(..., "--data", "-d", help="Prepared dataset folder."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Study folder (a search folder plus pictures)."),
    latent_dims: str = typer.Option("2,5,10,20", "--latent-dims", help="Latent sizes to compare."),
    epochs: int = typer.Option(10, "--epochs", help="Epochs per trial."),
    lr: float = typer.Option(2e-3, "--lr", help="Learning rate of every trial."),
    workers_per_trial: int = STUDY_OPTIONS["workers_per_trial"],
    max_concurrent: Optional[int] = STUDY_OPTIONS["max_concurrent"],
    resume: bool = STUDY_OPTIONS["resume"],
    address: Optional[str] = STUDY_OPTIONS["address"],
    config_file: Optional[Path] = STUDY_OPTIONS["config_file"],
) -> None:
    """Latent size 2, 5, 10, 20 with loss 0.5*MSE + 0.5*KL: reconstructions and the metric per size."""
    from .study import latent_dims as run_study
    from .tune import parse_list

    dims = tuple(parse_list(latent_dims, int, "--latent-dims"))
    _print_study(run_study(data, out_dir, dims, epochs=epochs, lr=lr,
                           **_study_options(workers_per_trial, max_concurrent, resume, address, config_file)))


@study_app.command("loss-weights")
@user_errors
def study_loss_weights(
    data: str = typer.Option(..., "--data", "-d", help="Prepared dataset folder."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Study folder (a search folder plus pictures)."),
    latent_dim: int = typer.Option(20, "--latent-dim", help="Latent size of both models."),
    epochs: int = typer.Option(10, "--epochs", help="Epochs per trial."),
    lr: float = typer.Option(2e-3, "--lr", help="Learning rate of every trial."),
    workers_per_trial: int = STUDY_OPTIONS["workers_per_trial"],
    max_concurrent: Optional[int] = STUDY_OPTIONS["max_concurrent"],
    resume: bool = STUDY_OPTIONS["resume"],
    address: Optional[str] = STUDY_OPTIONS["address"],
    config_file: Optional[Path] = STUDY_OPTIONS["config_file"],
) -> None:
    """0.9*MSE + 0.1*KL against 0.1*MSE + 0.9*KL: reconstructions and t-SNE maps side by side."""
    from .study import loss_weights as run_study

    _print_study(run_study(data, out_dir, latent_dim=latent_dim, epochs=epochs, lr=lr,
                           **_study_options(workers_per_trial, max_concurrent, resume, address, config_file)))


def _trial_table(rows: list, metric: str) -> None:
    table = Table(title=f"trials by final {metric}")
    for column in ("trial", "latent", "lr", "beta", "final", "best", "epochs", "status"):
        table.add_column(column, justify="right" if column not in ("trial", "status") else "left", no_wrap=True)
    for r in rows:
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "-"  # noqa: E731
        table.add_row(str(r["trial_id"]), str(r["latent_dim"]), f"{r['lr']:.2e}", f"{r['beta']:g}",
                      fmt(r[f"final_{metric}"]), fmt(r[f"best_{metric}"]), str(r["epochs"]), r["status"])
    console.print(table)


# ---------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------
@app.command("generate")
@user_errors
def generate_cmd(
    checkpoint: Optional[str] = typer.Argument(None, help="A checkpoint folder, or a run folder (its latest)."),
    num: int = typer.Option(1000, "--num", "-n", help="Images to generate."),
    out_uri: Optional[str] = typer.Option(None, "--out", "-o", help="Destination folder or s3://bucket/prefix."),
    fmt: str = typer.Option("png", "--format", "-f", help="png, parquet or npz."),
    seed: int = typer.Option(0, "--seed", help="Seed: image i depends only on checkpoint, seed, i and label."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images decoded per model call (default 256; part of the run's identity)."),
    shard_size: int = typer.Option(10000, "--shard-size", help="Images per shard: one PNG sub-folder, Parquet or NPZ file (at most 10,000)."),
    actors: Optional[int] = typer.Option(None, "--actors", help="Decoder actors (default: one per CPU, or per GPU)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="GPU actors (default: when the cluster has GPUs)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Scale of z ~ N(0, T^2 I)."),
    label: Optional[int] = typer.Option(None, "--label", help="Class-conditional models: generate this class only."),
    per_class: bool = typer.Option(False, "--per-class", help="Class-conditional models: N split evenly over classes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever the destination holds."),
    verify_uri: Optional[str] = typer.Option(None, "--verify", help="Check a finished set against its manifest and exit."),
    submit: bool = typer.Option(False, "--submit", help="Run as a Ray Job on the cluster at --address (or RAY_ADDRESS)."),
    wait: bool = typer.Option(False, "--wait", help="With --submit: stream the job's logs and exit with its outcome."),
    install_requirements: bool = typer.Option(False, "--install-requirements", help="With --submit: pip-install the package's requirements in the job's runtime environment."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address."),
) -> None:
    """Write a synthetic image set with a Ray Data batch-inference job, exactly once and resumable."""
    from .generate import Generation, verify

    if verify_uri is not None:
        manifest = verify(verify_uri)
        console.print(f"[green]ok[/] {verify_uri}: {manifest['count']:,} {manifest['image_format']} images "
                      f"in {len(manifest['shards'])} shards match {MANIFEST_NAME}")
        return
    if checkpoint is None or out_uri is None:
        raise UserError("generate needs a CHECKPOINT_OR_RUN argument and --out (or --verify URI)")
    options = dict(checkpoint=checkpoint, num=num, out=out_uri, fmt=fmt, seed=seed, actors=actors, gpu=gpu,
                   temperature=temperature, label=label, per_class=per_class, overwrite=overwrite,
                   batch_size=batch_size, shard_size=shard_size)
    if submit:
        _submit({"command": "generate", "options": options}, address, wait, install_requirements,
                [checkpoint, out_uri])
        return
    job = Generation(**options)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    started = time.perf_counter()
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("generate", total=num, rate="")

        def progress(done: int, total: int) -> None:
            rate = done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=done, rate=f"{rate:,.0f} img/s")

        manifest = job.run(address, progress)
    console.print(f"[green]wrote[/] {manifest['count']:,} {fmt} images in {manifest['seconds']:.1f} s "
                  f"({manifest['count'] / max(manifest['seconds'], 1e-9):,.0f} img/s) to {out_uri}")
    out.print(out_uri)


# ---------------------------------------------------------------------------
# evaluate, classifier, report
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def _stage_progress():
    """A Rich bar per named stage; yields `progress(stage, done, total)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tasks: dict[str, int] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)
        yield progress


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    checkpoint: str = typer.Argument(..., help="A checkpoint folder, or a run folder (its latest)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Prepared dataset (default: the one it was trained on)."),
    split: str = typer.Option("test", "--split", help="Split to score."),
    iw_samples: int = typer.Option(100, "--iw-samples", "-k", help="Posterior samples per image for the ELBO and the importance-weighted NLL."),
    samples: int = typer.Option(10000, "--samples", help="Generated images for sample quality (0 = skip)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N images of the split."),
    tstr: bool = typer.Option(False, "--tstr", help="Conditional models: Train-on-Synthetic-Test-on-Real accuracy."),
    tstr_samples: int = typer.Option(20000, "--tstr-samples", help="Generated training images for --tstr."),
    actors: Optional[int] = typer.Option(None, "--actors", help="Scoring actors (default: one per CPU)."),
    seed: int = typer.Option(0, "--seed", help="Seed of posterior samples, binarisation and generated images."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address."),
    submit: bool = typer.Option(False, "--submit", help="Run as a Ray Job on the cluster at --address (or RAY_ADDRESS)."),
    wait: bool = typer.Option(False, "--wait", help="With --submit: stream the job's logs and exit with its outcome."),
    install_requirements: bool = typer.Option(False, "--install-requirements", help="With --submit: pip-install the package's requirements in the job's runtime environment."),
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object."),
) -> None:
    """Likelihoods (ELBO, importance-weighted NLL, bits/dim) and sample quality of a model."""
    from .evaluate import Evaluation, save

    options = dict(checkpoint=checkpoint, data=data, split=split, iw_samples=iw_samples, samples=samples,
                   limit=limit, actors=actors, seed=seed, tstr=tstr, tstr_samples=tstr_samples)
    if submit:
        _submit({"command": "evaluate", "options": options}, address, wait, install_requirements,
                [checkpoint, data or ""])
        return
    job = Evaluation(**options)
    if as_json:
        result = job.run(address)
    else:
        with _stage_progress() as progress:
            result = job.run(address, progress)
    saved = save(result, checkpoint)
    if as_json:
        out.print(json.dumps(result))
        return
    _metrics_table(result)
    if saved:
        console.print(f"saved {saved}")


def _metrics_table(result: dict) -> None:
    from .evaluate import KEYS

    table = Table(title=f"{result['split']} split, {result['images']:,} images, K={result['iw_samples']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in KEYS:
        value = result.get(key)
        text = "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        table.add_row(key, text)
    console.print(table)
    console.print(f"judge: {result.get('judge')}")


classifier_app = typer.Typer(help="The judge classifier used to measure sample quality.", no_args_is_help=True)
app.add_typer(classifier_app, name="classifier")


@classifier_app.command("train")
@user_errors
def classifier_train(
    data: str = typer.Option(..., "--data", "-d", help="Prepared, labelled dataset folder."),
    epochs: int = typer.Option(3, "--epochs", help="Training epochs (3 reach 99.3% on MNIST)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Retrain when one is already cached."),
) -> None:
    """Train the dataset's judge classifier and cache it in DATA/classifier."""
    from . import judge

    with _stage_progress() as progress:
        info = judge.train(data, epochs=epochs, seed=seed, overwrite=overwrite,
                           progress=lambda step, steps, loss: progress("training classifier", step, steps))
    console.print(f"[green]test accuracy {info['test_accuracy']:.4f}[/] after {epochs} epochs "
                  f"({info['seconds']:.0f} s)")
    out.print(info["path"])


@app.command("report")
@user_errors
def report_cmd(
    run: str = typer.Argument(..., help="A run folder (or a checkpoint folder)."),
    out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="Folder for index.html and its PNGs (default: RUN/report)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Prepared dataset (default: the one it was trained on)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the images picked and sampled."),
) -> None:
    """A self-contained HTML report: curves, reconstructions, samples, latent maps, interpolations."""
    from .report import Report

    report = Report(run, out_dir, data, seed)
    with console.status("report") as status:
        page = report.build(lambda stage: status.update(f"report: {stage}"))
    console.print(f"[green]wrote[/] {page}")
    out.print(str(page))


# ---------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------
def _submit(spec: dict, address: Optional[str], wait: bool, install_requirements: bool, paths: list) -> None:
    from .jobs import dashboard_url, submit

    url = dashboard_url(address)
    job_id = submit(spec, url, wait, print_line=lambda line: out.print(line, markup=False, highlight=False),
                    warn=lambda text: console.print(f"[yellow]warning:[/] {text}", soft_wrap=True),
                    install_requirements=install_requirements, paths=[str(p) for p in paths if p])
    if wait:
        console.print(f"[green]job {job_id} succeeded[/]")
        return
    console.print(f"submitted {spec['command']} to {url}; follow it with: "
                  f"vae-ray jobs logs {job_id} --follow --address {url}", soft_wrap=True)
    out.print(job_id)


jobs_app = typer.Typer(help="Jobs on a Ray cluster (the Ray Jobs API at --address or RAY_ADDRESS).",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
ADDRESS = typer.Option(None, "--address", help="The cluster's dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS).")


def _when(ms: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


@jobs_app.command("list")
@user_errors
def jobs_list(address: Optional[str] = ADDRESS) -> None:
    """Submitted jobs, newest first."""
    from .jobs import list_jobs

    rows = list_jobs(address)
    table = Table(title=f"{len(rows)} jobs")
    for column in ("job id", "command", "status", "started", "took"):
        table.add_column(column, no_wrap=True)
    for r in rows:
        took = f"{(r['end'] - r['start']) / 1000:.0f} s" if r["start"] and r["end"] else "-"
        style = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow"}.get(r["status"], "cyan")
        table.add_row(r["id"], r["command"], f"[{style}]{r['status']}[/]", _when(r["start"]), took)
    console.print(table)
    for r in rows:
        out.print(f"{r['id']}\t{r['status']}")


@jobs_app.command("status")
@user_errors
def jobs_status(job_id: str = typer.Argument(..., help="The job id."), address: Optional[str] = ADDRESS) -> None:
    """One job's status and message."""
    from .jobs import job_status

    info = job_status(address, job_id)
    console.print(f"{info['id']} ({info['command'] or 'job'}): started {_when(info['start'])}, "
                  f"ended {_when(info['end'])}; {info['message']}", soft_wrap=True)
    out.print(info["status"])


@jobs_app.command("logs")
@user_errors
def jobs_logs(job_id: str = typer.Argument(..., help="The job id."), address: Optional[str] = ADDRESS,
              follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends.")) -> None:
    """A job's output."""
    from .jobs import job_logs

    job_logs(address, job_id, follow, lambda line: out.print(line, markup=False, highlight=False))


@jobs_app.command("stop")
@user_errors
def jobs_stop(job_id: str = typer.Argument(..., help="The job id."), address: Optional[str] = ADDRESS) -> None:
    """Stop a running job."""
    from .jobs import stop_job

    status = stop_job(address, job_id)
    console.print(f"{job_id}: {status.lower() or 'stop requested'}")
    out.print(status)


@app.command("demo")
@user_errors
def demo_cmd(out_dir: Path = typer.Option(Path(".demo"), "--out", "-o", help="Folder for the demo's data and run."),
             epochs: int = typer.Option(5, "--epochs", help="Training epochs."),
             images: int = typer.Option(15000, "--images", help="Training images to use.")) -> None:
    """Prepare the best dataset available, train on a local Ray cluster, print the samples folder."""
    from .demo import run_demo

    summary = run_demo(out_dir, lambda line: console.print(line), epochs=epochs, images=images)
    final = summary["final"]
    console.print(f"[green]done[/]: test MATLAB ELBO {final['test_matlab_elbo']:.3f} per image after "
                  f"{summary['epochs']} epochs; pictures in {summary['plots']}")
    out.print(str(Path(summary["samples"]).resolve()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
