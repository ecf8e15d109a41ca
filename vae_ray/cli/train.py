"""`vae-ray train` and `vae-ray demo` (code: vae_ray/commands.py -> trainer.py -> worker.py).

Every train option is made from `vae_ray.config.TrainConfig`, grouped in help
panels; only the flags typed override a `--config` file or, with
`--resume`, the run's saved settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from . import options as opt
from .jobs import submit_spec
from .output import EXIT_CODES, handles_errors, labelled, result, say

TRAIN_EPILOG = (
    "Code: vae_ray/cli/train.py -> vae_ray/commands.py (train) -> vae_ray/trainer.py (fit) -> "
    "vae_ray/worker.py (train_loop). Settings: vae_ray/config.py. " + EXIT_CODES
)


def register(app: typer.Typer) -> None:
    app.command(
        "train", help="Train the VAE with Ray Train: DDP workers fed by Ray Data or from memory.", epilog=TRAIN_EPILOG
    )(handles_errors(_train_command()))
    app.command("demo", epilog="Code: vae_ray/demo.py. " + EXIT_CODES)(handles_errors(demo))


def _train_own(
    config_file: opt.ConfigFile = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the resolved settings as YAML and exit.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its latest checkpoint; "
            "flags given change its settings (not the model's).",
        ),
    ] = False,
) -> None: ...


def _train_cluster(
    address: opt.Address = None,
    submit: opt.Submit = False,
    wait: opt.Wait = True,
    install_requirements: opt.InstallRequirements = False,
    driver_cpus: opt.DriverCpus = 0.0,
    driver_gpus: opt.DriverGpus = 0.0,
    verbose: opt.Verbose = False,
    as_json: opt.Json = False,
) -> None: ...


def _train_command():
    def train(ctx: typer.Context, **values: Any) -> None:
        own = {
            k: values.pop(k)
            for k in (
                "config_file",
                "print_config",
                "resume",
                "address",
                "submit",
                "wait",
                "install_requirements",
                "driver_cpus",
                "driver_gpus",
                "verbose",
                "as_json",
            )
        }
        run_train(opt.given(ctx, values), **own)

    return opt.with_parameters(
        train, opt.own_parameters(_train_own), opt.config_parameters(), opt.own_parameters(_train_cluster)
    )


def run_train(
    flags: dict[str, Any],
    *,
    config_file: Path | None,
    print_config: bool,
    resume: bool,
    address: str | None,
    submit: bool,
    wait: bool,
    install_requirements: bool,
    driver_cpus: float,
    driver_gpus: float,
    verbose: bool,
    as_json: bool,
) -> None:
    from .. import commands
    from ..config import load_config, read_settings
    from ..errors import UserError
    from ..tracking import mlflow_uri, wandb_project

    if resume:
        if config_file is not None:
            raise UserError("--resume takes the run's own settings; --config does not apply")
        if not flags.get("out"):
            raise UserError("--resume needs --out RUN")
        settings = dict(flags)
    else:
        base = read_settings(config_file) if config_file is not None else {}
        settings = {**base, **flags}
        settings.setdefault("mlflow", mlflow_uri())  # resolved here, so a submitted job logs to the same place
        settings.setdefault("wandb", wandb_project())
        settings = load_config(None, **settings).to_dict()
    if print_config:
        _print_config(settings, resume)
        return
    spec = {"command": "train", "kwargs": {"settings": settings, "resume": resume}}
    if submit:
        submit_spec(
            spec,
            address,
            wait,
            install_requirements,
            [settings.get("data", ""), settings.get("out", "")],
            driver_cpus,
            driver_gpus,
        )
        return
    summary = (
        commands.run(spec, show=not as_json, address=address)
        if not verbose
        else commands.train(settings, resume, show=not as_json, address=address, verbose=True)
    )
    summary.pop("rows", None)
    if as_json:
        result(json.dumps(summary, default=str))
        return
    final = summary["final"]
    if summary.get("already_complete"):
        labelled(
            "complete:",
            f"{summary['run_dir']} already holds this run ({summary['epochs']} epochs); nothing to do",
            "green",
        )
    elif final:
        labelled(
            "done",
            f"{summary['epochs']} epochs: test MATLAB ELBO {final['test_matlab_elbo']:.3f}, "
            f"test -ELBO {final['test_neg_elbo_nats']:.2f} nats/image",
            "green",
        )
    say(f"checkpoint {summary['checkpoint']}")
    say(f"plots      {summary['plots']}")
    result(summary["samples"])


@handles_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's data and run.")] = Path(".demo"),
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs.", min=1, max=1000)] = 5,
    images: Annotated[int, typer.Option("--images", help="Training images to use.", min=256, max=100_000_000)] = 15000,
) -> None:
    """Prepare the best dataset available, train a VAE on it, print the samples folder."""
    from ..demo import run_demo

    summary = run_demo(out_dir, say, epochs=epochs, images=images)
    final = summary["final"]
    labelled(
        "done:",
        f"test MATLAB ELBO {final['test_matlab_elbo']:.3f} per image after {summary['epochs']} "
        f"epochs; pictures in {summary['plots']}",
        "green",
    )
    result(str(Path(summary["samples"]).resolve()))


def _print_config(settings: dict[str, Any], resume: bool) -> None:
    """The settings a run would use, as YAML: file, flags and (when the data
    can be read) the choices `auto` makes for it."""
    from ..config import load_config, to_yaml
    from ..data import read_meta
    from ..errors import UserError
    from ..rundir import RunDir, merge_for_resume
    from ..trainer import resolve

    cfg = merge_for_resume(RunDir(settings["out"]), settings) if resume else load_config(None, **settings)
    try:
        cfg = resolve(cfg, read_meta(cfg.data)) if cfg.data else cfg
        note = ""
    except UserError as exc:
        note = f"# auto settings are chosen when the data can be read ({exc})\n"
    result(note + to_yaml(cfg).rstrip())
