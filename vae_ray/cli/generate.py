"""`vae-ray generate` and `vae-ray encode`, the two ways of batch inference
(code: vae_ray/commands.py -> vae_ray/generate.py, vae_ray/encode.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from . import options as opt
from .jobs import submit_spec
from .output import EXIT_CODES, handles_errors, labelled, result, say

EPILOG = "Code: vae_ray/cli/generate.py -> vae_ray/commands.py (generate) -> vae_ray/generate.py. " + EXIT_CODES
ENCODE_EPILOG = "Code: vae_ray/cli/generate.py -> vae_ray/commands.py (encode) -> vae_ray/encode.py. " + EXIT_CODES


def register(app: typer.Typer) -> None:
    app.command("generate", epilog=EPILOG)(generate)
    app.command("encode", epilog=ENCODE_EPILOG)(encode)


def auto_or_number(text: str, option: str) -> float | str:
    """An option that takes auto or a number (checked with the other options)."""
    from ..errors import UserError

    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{option} must be auto or a number (got {text!r})") from None


@handles_errors
def generate(
    checkpoint: Annotated[
        str | None, typer.Argument(help="A checkpoint folder, or a run folder (its latest); local or s3://.")
    ] = None,
    num: Annotated[int, typer.Option("--num", "-n", help="Images to generate.", min=1, max=1_000_000_000)] = 1000,
    out_uri: Annotated[
        str | None,
        typer.Option("--out", "-o", help="Destination folder or s3://bucket/prefix (new, empty, or this same set)."),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="png, parquet, npz or hf (Hugging Face Parquet with a dataset card).")
    ] = "png",
    seed: opt.Seed = 0,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Images decoded per model call (default 256; part of the set's identity)."),
    ] = None,
    shard_size: Annotated[
        int,
        typer.Option(
            "--shard-size", help="Images per shard: one PNG sub-folder, Parquet or NPZ file (at most 10,000)."
        ),
    ] = 10000,
    actors: Annotated[
        int | None,
        typer.Option(
            "--actors",
            help="Decoder actors (default: one per CPU; on GPUs, up to 8 sharing each GPU, one CPU each; "
            "a one-shard job without a cluster runs in this process).",
        ),
    ] = None,
    gpu: Annotated[
        bool | None,
        typer.Option(
            "--gpu/--no-gpu",
            help="Decode on GPUs (default: when there is one: this machine's, or the cluster's with --address).",
            metavar="",
            show_default="auto",
        ),
    ] = None,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature", help="Scale T of z ~ N(0, T^2 I) (gmm: of each component's spread), in (0, 100]."
        ),
    ] = 1.0,
    group_temperatures: Annotated[
        str | None,
        typer.Option(
            "--group-temperatures",
            help="hvae: a factor on --temperature per latent group, top first, e.g. 1,1,1.3 (the dense top group "
            "shapes the digit, the lower groups its strokes; docs/benchmarks.md measures the trade-off).",
        ),
    ] = None,
    pixel_temperature: Annotated[
        str,
        typer.Option(
            "--pixel-temperature",
            help="Bernoulli decoders (grey images): write the mean of each pixel's likelihood tempered to T, "
            "sigmoid(logit / T), in [0.05, 100]; below 1 the strokes are sharper than the plain mean's. auto: "
            "of 1, 0.9, ..., 0.5, the one whose pixel values are distributed most like the training images' "
            "(of --data).",
        ),
    ] = "1",
    prior: Annotated[
        str,
        typer.Option(
            "--prior",
            help="Where z comes from: normal, N(0, I); or gmm, a Gaussian mixture fitted to the codes of the "
            "training split (of --data), by a Ray job the first time, then kept in the run folder.",
        ),
    ] = "normal",
    label: Annotated[int | None, typer.Option("--label", help="Class-conditional models: this class only.")] = None,
    per_class: Annotated[
        bool,
        typer.Option(
            "--per-class",
            help="Class-conditional models: N split evenly over classes (the default for them without --label).",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a different generated set at --out, once the new one is complete (a folder "
            "holding anything else, hidden files included, is refused).",
        ),
    ] = False,
    min_confidence: Annotated[
        str,
        typer.Option(
            "--min-confidence",
            help="Keep an image only when a judge classifier gives its label (unlabelled sets: any class) at "
            "least this probability, drawing further candidates until one passes (at most 64, then the judge's "
            "favourite); the set still has exactly --num images. auto = per class, the probability the judge "
            "gives 95% of that class's real test images. 0 = off.",
        ),
    ] = "0",
    max_copy_distance: Annotated[
        str,
        typer.Option(
            "--max-copy-distance",
            help="Drop an image this close to a training image (pixel L2 distance, pixels in [0, 1]) and draw "
            "another, as --min-confidence does; auto = closer than 99% of real test images are (evaluate-set's "
            "near-copy threshold). 0 = off.",
        ),
    ] = "0",
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Prepared dataset the filters read: its judge (--min-confidence) and training split "
            "(--max-copy-distance, --prior gmm). Default: the one the model was trained on.",
        ),
    ] = None,
    judge_seed: Annotated[
        int,
        typer.Option(
            "--judge-seed",
            help="Seed of the filtering judge (`vae-ray classifier train --seed S`); not 0, the seed of the judge "
            "that evaluate-set scores with.",
            min=0,
        ),
    ] = 1,
    verify_uri: Annotated[
        str | None, typer.Option("--verify", help="Check a finished set against its manifest and exit.")
    ] = None,
    address: opt.Address = None,
    submit: opt.Submit = False,
    wait: opt.Wait = True,
    install_requirements: opt.InstallRequirements = False,
    driver_cpus: opt.DriverCpus = 0.0,
    driver_gpus: opt.DriverGpus = 0.0,
    as_json: opt.Json = False,
) -> None:
    """Write a synthetic image set with a Ray Data batch-inference job, exactly once and resumable."""
    from .. import commands
    from ..destination import MANIFEST, verify
    from ..errors import UserError

    if verify_uri is not None:
        manifest = verify(verify_uri)
        say(
            f"ok {verify_uri}: {manifest['count']:,} {manifest['image_format']} images in "
            f"{len(manifest['shards'])} shards match {MANIFEST}",
            "green",
        )
        return
    if checkpoint is None or out_uri is None:
        raise UserError("generate needs a CHECKPOINT_OR_RUN argument and --out (or --verify URI)")
    options = dict(
        checkpoint=checkpoint,
        num=num,
        out=out_uri,
        fmt=fmt,
        seed=seed,
        actors=actors,
        gpu=gpu,
        temperature=temperature,
        label=label,
        per_class=per_class,
        overwrite=overwrite,
        batch_size=batch_size,
        shard_size=shard_size,
        min_confidence=auto_or_number(min_confidence, "--min-confidence"),
        max_copy_distance=auto_or_number(max_copy_distance, "--max-copy-distance"),
        data=data,
        judge_seed=judge_seed,
        prior=prior,
        group_temperatures=group_temperatures,
        pixel_temperature=auto_or_number(pixel_temperature, "--pixel-temperature"),
    )
    spec = {"command": "generate", "kwargs": {"options": options}}
    if submit:
        submit_spec(spec, address, wait, install_requirements, [checkpoint, out_uri], driver_cpus, driver_gpus)
        return
    summary = commands.generate(options, show=not as_json, address=address)
    if as_json:
        result(json.dumps(summary, default=str))
        return
    if summary.get("already_complete"):
        labelled("complete:", f"{out_uri} already holds these {summary['count']:,} images; nothing to do", "green")
    else:
        rate = summary["count"] / max(summary["seconds"], 1e-9)
        labelled(
            "wrote",
            f"{summary['count']:,} {fmt} images in {summary['seconds']:.1f} s ({rate:,.0f} img/s) "
            f"to {out_uri}, {summary['path']}",
            "green",
        )
    if summary.get("filter"):
        found = summary["filter"]
        say(
            f"filter: {found['acceptance_rate']:.1%} of {found['candidates']:,} candidates passed; "
            f"{found['copies_dropped']:,} near-copies dropped; {found['unmet']:,} images are the nearest to "
            f"passing of {found['max_candidates']}"
        )
        if found.get("class_confidences"):
            say(f"min confidence per class, chosen by auto: {found['class_confidences'].replace(',', ', ')}")
    if summary.get("pixel_distances"):
        distances = summary["pixel_distances"]
        say(
            f"pixel temperature: {summary['pixel_temperature']:g}, chosen by auto (its pixel values' quantiles "
            f"{distances[summary['pixel_temperature']]:.4f} from the training images'; the plain mean's "
            f"{distances[1.0]:.4f})"
        )
    say(f"checkpoint: {summary['checkpoint']}")
    result(out_uri)


@handles_errors
def encode(
    checkpoint: Annotated[
        str, typer.Argument(help="A checkpoint folder, or a run folder (its latest); local or s3://.")
    ],
    out_uri: Annotated[
        str,
        typer.Option("--out", "-o", help="Destination folder or s3://bucket/prefix (new, empty, or this same set)."),
    ],
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Prepared dataset (default: the one the model was trained on).")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="train, test or all.")] = "all",
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Images encoded per model call (default 256; part of the set's identity)."),
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(
            "--actors",
            help="Encoder actors (default: one per CPU; on GPUs, up to 8 sharing each GPU, one CPU each; "
            "a one-shard job without a cluster runs in this process).",
        ),
    ] = None,
    gpu: Annotated[
        bool | None,
        typer.Option(
            "--gpu/--no-gpu",
            help="Decode on GPUs (default: when there is one: this machine's, or the cluster's with --address).",
            metavar="",
            show_default="auto",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a different encoded set at a local --out, once the new one is complete (a folder "
            "holding anything else, hidden files included, is refused).",
        ),
    ] = False,
    address: opt.Address = None,
    submit: opt.Submit = False,
    wait: opt.Wait = True,
    install_requirements: opt.InstallRequirements = False,
    driver_cpus: opt.DriverCpus = 0.0,
    driver_gpus: opt.DriverGpus = 0.0,
    as_json: opt.Json = False,
) -> None:
    """Write every image's posterior mean and log-variance to Parquet with a Ray Data job, exactly once and resumable."""
    from .. import commands

    options = dict(
        checkpoint=checkpoint,
        out=out_uri,
        data=data,
        split=split,
        batch_size=batch_size,
        actors=actors,
        gpu=gpu,
        overwrite=overwrite,
    )
    spec = {"command": "encode", "kwargs": {"options": options}}
    if submit:
        submit_spec(spec, address, wait, install_requirements, [checkpoint, out_uri, data], driver_cpus, driver_gpus)
        return
    summary = commands.encode(options, show=not as_json, address=address)
    if as_json:
        result(json.dumps(summary, default=str))
        return
    if summary.get("already_complete"):
        labelled("complete:", f"{out_uri} already holds these {summary['images']:,} latents; nothing to do", "green")
    else:
        rate = summary["images"] / max(summary["seconds"], 1e-9)
        labelled(
            "wrote",
            f"{summary['images']:,} latents (K={summary['latent_dim']}, {'+'.join(summary['splits'])}) in "
            f"{summary['seconds']:.1f} s ({rate:,.0f} img/s) to {out_uri}, {summary['path']}",
            "green",
        )
    say(f"checkpoint: {summary['checkpoint']}")
    result(out_uri)
