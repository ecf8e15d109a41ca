"""`vae-ray export`: a run's model as a folder the Hugging Face Hub takes (code: vae_ray/hub.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .output import EXIT_CODES, handles_errors, result, say

EPILOG = "Code: vae_ray/cli/export.py -> vae_ray/hub.py (export). " + EXIT_CODES


def register(app: typer.Typer) -> None:
    app.command("export", epilog=EPILOG)(export)


@handles_errors
def export(
    run: Annotated[
        str,
        typer.Argument(help="A run folder (its best checkpoint, else its latest) or a checkpoint; local or s3://."),
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="New folder (or s3:// prefix), or an earlier export to replace.")
    ],
    repo: Annotated[
        str | None, typer.Option("--repo", help="ORG/NAME the folder will be uploaded as (shown in the card).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the card's 64 samples.", min=0, max=2**32 - 1)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Write model.safetensors, config.json, a model card (README.md) and samples.png: upload the
    folder as it is (`hf upload ORG/NAME DIR`); generate, evaluate, encode, report and
    vae_ray.load take the folder, or hf://ORG/NAME once it is on the Hub."""
    from .. import hub

    summary = hub.export(run, out, samples_seed=seed, repo=repo)
    if as_json:
        result(json.dumps(summary))
        return
    say(f"checkpoint: {summary['checkpoint']}")
    say(f"metrics in the card: {', '.join(summary['metrics']) or 'none (run vae-ray evaluate first)'}")
    result(summary["out"])
