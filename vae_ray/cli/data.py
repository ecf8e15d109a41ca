"""`vae-ray data prepare | show | verify` (code: vae_ray/data.py, vae_ray/sources/)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .options import Seed
from .output import EXIT_CODES, cell, console, handles_errors, labelled, result, say, warn

data_app = typer.Typer(
    help="Prepare datasets as Parquet shards and look at them.", no_args_is_help=True, epilog=EXIT_CODES
)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("prepare", epilog="Code: vae_ray/data.py (prepare), vae_ray/sources/. " + EXIT_CODES)
@handles_errors
def prepare(
    dataset: Annotated[str, typer.Argument(help="mnist, fashion-mnist, cifar10, imagefolder or synthetic.")],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder to write (new or empty; the same command again leaves a complete dataset as it is).",
        ),
    ],
    source: Annotated[
        str | None,
        typer.Option(
            "--source", "-s", help="Local files: a folder or .tar.gz (else env var, system path, cache, download)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Keep only the first N images of each split.")] = None,
    shards: Annotated[
        int | None, typer.Option("--shards", help="Parquet files for the train split (default: one per 10,000 images).")
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", help="imagefolder: square size in pixels (default: the images' own size, at most 1024)."
        ),
    ] = None,
    channels: Annotated[int | None, typer.Option("--channels", help="imagefolder: 1 (grey) or 3 (RGB).")] = None,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="imagefolder without train/test folders: share held out.")
    ] = 0.1,
    skip_corrupt: Annotated[
        bool,
        typer.Option(
            "--skip-corrupt", help="imagefolder: skip unreadable images (listed in dataset.json) instead of failing."
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace a different vae-ray dataset at --out, once the new one is complete."),
    ] = False,
    seed: Seed = 0,
) -> None:
    """Turn dataset files into Parquet shards that Ray Data streams."""
    from ..data import prepare as run_prepare
    from ..progress import Stages

    with Stages() as stages:
        meta = run_prepare(
            dataset,
            out_dir,
            source,
            limit=limit,
            shards=shards,
            overwrite=overwrite,
            image_size=image_size,
            channels=channels,
            test_fraction=test_fraction,
            skip_corrupt=skip_corrupt,
            seed=seed,
            progress=lambda split, done, total: stages(f"{dataset} {split}", done, total),
        )
    label = " (synthetic)" if meta["synthetic"] else ""
    h, w, c = meta["shape"]
    counts = f"{meta['splits']['train']['count']:,} train + {meta['splits']['test']['count']:,} test images"
    if meta.get("already_complete"):
        labelled("complete:", f"{out_dir} already holds this dataset ({counts}); nothing to do", "green")
    else:
        labelled("prepared", f"{meta['name']}{label}: {counts}, {h}x{w}x{c}, from {meta['source']}", "green")
    if meta.get("skipped_corrupt"):
        warn(f"skipped {len(meta['skipped_corrupt'])} corrupt image(s), listed in dataset.json")
    result(str(out_dir))


@data_app.command("show", epilog="Code: vae_ray/data.py (read_arrays), vae_ray/plots.py. " + EXIT_CODES)
@handles_errors
def show(
    data_dir: Annotated[str, typer.Argument(help="A prepared dataset folder (or s3:// URI).")],
    png: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="PNG to write (default: DIR/preview.png); an existing file is never replaced."
        ),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="train or test.")] = "train",
    num: Annotated[int, typer.Option("--num", "-n", help="Images in the grid.", min=1, max=4096)] = 64,
) -> None:
    """Write a grid of sample images (PNG) and print the counts per class."""
    import tempfile

    from .. import storage
    from ..data import dataset_read_lock, read_arrays, read_meta
    from ..errors import UserError
    from ..plots import save_grid

    with dataset_read_lock(data_dir):  # no prepare --overwrite swaps the shards meanwhile
        meta = read_meta(data_dir)
        images, _ = read_arrays(data_dir, split, limit=num, meta=meta)
        own_preview = png is None
        if png is None:
            if storage.is_remote(data_dir):
                raise UserError("--out is needed when the dataset is not on local disk")
            png = Path(storage.check_uri(data_dir)) / "preview.png"
            if png.is_symlink() or (png.exists() and not png.is_file()):
                raise UserError(f"{png}: not a preview vae-ray wrote (a link or a folder); remove it or pass --out")
        with tempfile.TemporaryDirectory() as tmp:
            fresh = save_grid(images, Path(tmp) / "preview.png").read_bytes()
        same = png.is_file() and png.read_bytes() == fresh
        if png.exists() and not own_preview and not same:
            raise UserError(f"{png}: exists; choose another --out (nothing was written)")
        if not same:
            storage.write_local_atomic(png, fresh)
    table = Table(
        title=f"{meta['name']}{' (synthetic)' if meta['synthetic'] else ''}  {'x'.join(map(str, meta['shape']))}"
    )
    table.add_column("class")
    for s in meta["splits"]:
        table.add_column(s, justify="right")
    for name in meta["classes"]:
        table.add_row(cell(name), *(f"{meta['splits'][s]['class_counts'].get(name, 0):,}" for s in meta["splits"]))
    table.add_row("total", *(f"{meta['splits'][s]['count']:,}" for s in meta["splits"]), style="bold")
    console.print(table)
    result(str(png))


@data_app.command("verify", epilog="Code: vae_ray/data.py (verify). " + EXIT_CODES)
@handles_errors
def verify(data_dir: Annotated[str, typer.Argument(help="A prepared dataset folder (or s3:// URI).")]) -> None:
    """Check every shard against the checksums in dataset.json."""
    from ..data import dataset_read_lock
    from ..data import verify as run_verify

    with dataset_read_lock(data_dir):
        meta = run_verify(data_dir)
    n = sum(len(s["shards"]) for s in meta["splits"].values())
    say(f"ok {data_dir}: {n} shards match dataset.json", "green")
