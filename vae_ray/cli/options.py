"""Options shared by several commands, and the `train` options made from the
config's own declarations (`vae_ray.config.TrainConfig`): one place says
each setting's type, default, range, choices, help and help panel.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from .. import config as settings

CLUSTER = "Cluster"

Address = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="A Ray cluster: host:port or auto (joined from here), or http://HEAD:8265 for --submit. "
        "Default: RAY_ADDRESS, else a private local cluster.",
        rich_help_panel=CLUSTER,
    ),
]
Submit = Annotated[
    bool,
    typer.Option(
        "--submit", help="Run as a Ray Job on the cluster at --address (or RAY_ADDRESS).", rich_help_panel=CLUSTER
    ),
]
Wait = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait",
        help="With --submit: stream the job's logs and exit with its outcome, or print the job id and return.",
        rich_help_panel=CLUSTER,
    ),
]
InstallRequirements = Annotated[
    bool,
    typer.Option(
        "--install-requirements",
        help="With --submit: pip-install the package's requirements in the job's runtime "
        "environment (for clusters whose image lacks them).",
        rich_help_panel=CLUSTER,
    ),
]
DriverCpus = Annotated[
    float,
    typer.Option(
        "--driver-cpus", help="With --submit: CPUs reserved for the job's driver.", min=0, rich_help_panel=CLUSTER
    ),
]
DriverGpus = Annotated[
    float,
    typer.Option(
        "--driver-gpus",
        help="With --submit: GPUs reserved for the job's driver (the judge and TSTR run there).",
        min=0,
        rich_help_panel=CLUSTER,
    ),
]
Verbose = Annotated[
    bool, typer.Option("--verbose", help="Show Ray's own (deduplicated) worker output and warnings live.")
]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.", min=0, max=settings.MAX_SEED)]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML or JSON file of settings (a run's config.json works too); flags override it."
    ),
]


def flag_of(name: str) -> str:
    spec = settings.spec(name)
    return spec.flag or "--" + name.replace("_", "-")


def config_parameters(
    exclude: tuple[str, ...] = (), rename: dict[str, str] | None = None, panel: dict[str, str] | None = None
) -> list[inspect.Parameter]:
    """Typer parameters for the config's fields, with their defaults shown.
    The defaults are the config's own; `given(ctx, ...)` tells which flags
    were typed, so a config file or a resumed run's settings are only
    overridden by those."""
    rename, panel = rename or {}, panel or {}
    params = []
    for f in settings.fields():
        if f.name in exclude:
            continue
        spec = settings.spec(f.name)
        kind = settings.FIELD_TYPES[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        flag = rename.get(f.name) or flag_of(f.name)
        names = [flag] + ([spec.short] if spec.short and f.name not in rename else [])
        extra: dict[str, Any] = {}
        if base is bool:
            names[0] = f"{flag}/{spec.negative or '--no-' + flag[2:]}"
            extra["metavar"] = ""
        if spec.choices:
            base = Literal[spec.choices]  # type: ignore[valid-type]
        if base in (int, float) and spec.low is not None and not spec.low_open:
            extra["min"] = spec.low
        if base in (int, float) and spec.high is not None and not spec.high_open:
            extra["max"] = spec.high
        if f.default is None:
            extra["show_default"] = spec.auto or "auto"
        annotation = Annotated[
            base | None if f.default is None else base,  # type: ignore[valid-type]
            typer.Option(*names, help=spec.help, rich_help_panel=panel.get(f.name, spec.panel), **extra),
        ]
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=annotation)
        )
    return params


def given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """Only the settings typed on the command line (or set through the environment)."""
    from typer._click.core import ParameterSource

    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {name: value for name, value in values.items() if ctx.get_parameter_source(name) in typed}


def with_parameters(
    fn: Callable, before: list[inspect.Parameter], generated: list[inspect.Parameter], after: list[inspect.Parameter]
) -> Callable:
    """Give `fn(ctx, **values)` a signature Typer reads: its own options
    around the generated ones."""
    ctx = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    fn.__signature__ = inspect.Signature([ctx, *before, *generated, *after])
    return fn


def own_parameters(fn: Callable) -> list[inspect.Parameter]:
    """The keyword parameters declared on a plain function (a template for
    `with_parameters`), with their annotations evaluated where they were written."""
    hints = typing.get_type_hints(fn, include_extras=True)
    return [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
        for p in inspect.signature(fn).parameters.values()
    ]
