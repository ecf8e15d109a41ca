"""The `vae-ray` command line (Typer + Rich): one module per command group.

    data.py      data prepare | show | verify          -> vae_ray/data.py, vae_ray/sources/
    train.py     train, demo                            -> vae_ray/commands.py, trainer.py, worker.py
    tune.py      tune, study latent-dims | loss-weights -> vae_ray/tune.py, study.py
    generate.py  generate, encode                       -> vae_ray/generate.py, encode.py
    evaluate.py  evaluate, classifier train, report     -> vae_ray/evaluate.py, judge.py, report.py
    export.py    export (a Hub model folder)            -> vae_ray/hub.py
    jobs.py      jobs list | status | logs | stop; --submit -> vae_ray/jobs.py
    options.py   shared options, and the train options made from vae_ray/config.py
    output.py    what is printed, and how errors end a command

Commands import their libraries inside the function, so `vae-ray --help`
stays fast (no Ray or torch import).
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from .. import __version__
from . import data, evaluate, export, generate, jobs, train, tune
from .output import EXIT_CODES, labelled, result


class _OneLineErrors(TyperGroup):
    """Usage errors (an unknown option, a value of the wrong type) end like
    every other mistake: one line and exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from typer._click.exceptions import ClickException, NoArgsIsHelpError

        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # `vae-ray` or `vae-ray data` alone: the help, as usual
            exc.show()
            code = exc.exit_code
        except ClickException as exc:
            message = exc.format_message().replace("Value error, ", "")
            labelled("error:", " ".join(message.split()), "bold red")
            code = exc.exit_code
        except typer.Abort:
            labelled("interrupted:", "aborted", "yellow")
            code = 130
        except typer.Exit as exc:
            code = exc.exit_code
        else:
            code = rv if isinstance(rv, int) else 0
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(
    name="vae-ray",
    cls=_OneLineErrors,
    help="Variational autoencoders trained, tuned and sampled at cluster scale on Ray.",
    epilog=EXIT_CODES + " Shell completion: vae-ray --install-completion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        result(f"vae-ray {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Variational autoencoders trained, tuned and sampled at cluster scale on Ray."""


for module in (data, train, tune, generate, evaluate, export, jobs):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
