"""`vae-ray jobs list | status | logs | stop`, and `--submit` for the other
commands (code: vae_ray/jobs.py)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from .output import EXIT_CODES, cell, handles_errors, is_terminal, labelled, out, result, say, warn

jobs_app = typer.Typer(
    help="Jobs on a Ray cluster (the Ray Jobs API at --address or RAY_ADDRESS).",
    no_args_is_help=True,
    epilog="Code: vae_ray/jobs.py. " + EXIT_CODES,
)
Address = Annotated[
    str | None,
    typer.Option("--address", help="The cluster's dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS)."),
]
JobId = Annotated[str, typer.Argument(help="The job id.")]


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")


def submit_spec(
    spec: dict,
    address: str | None,
    wait: bool,
    install_requirements: bool,
    paths: list,
    driver_cpus: float = 0,
    driver_gpus: float = 0,
) -> None:
    """Send a job spec to the cluster; with `wait`, follow it to its end."""
    from ..jobs import dashboard_url, submit

    url = dashboard_url(address)
    job_id = submit(
        spec,
        url,
        wait,
        print_line=result,
        warn=warn,
        install_requirements=install_requirements,
        paths=[str(p) for p in paths if p],
        driver_cpus=driver_cpus,
        driver_gpus=driver_gpus,
    )
    if wait:
        labelled("succeeded:", f"job {job_id}", "green")
        return
    say(f"submitted {spec['command']} to {url}; follow it with: vae-ray jobs logs {job_id} --follow --address {url}")
    result(job_id)


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


@jobs_app.command("list")
@handles_errors
def jobs_list(address: Address = None) -> None:
    """Submitted jobs, newest first: a table in a terminal, tab-separated rows otherwise (ids never cut)."""
    from ..jobs import list_jobs

    rows = list_jobs(address)
    if not is_terminal():
        for r in rows:
            result(f"{r['id']}\t{r['status']}\t{r['command']}\t{_when(r['start'])}")
        return
    table = Table(title=f"{len(rows)} jobs")
    table.add_column("job id", no_wrap=True, overflow="fold", min_width=max((len(r["id"]) for r in rows), default=6))
    for column in ("command", "status", "started", "took"):
        table.add_column(column, no_wrap=True)
    for r in rows:
        took = f"{(r['end'] - r['start']) / 1000:.0f} s" if r["start"] and r["end"] else "-"
        style = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow"}.get(r["status"], "cyan")
        table.add_row(cell(r["id"]), cell(r["command"]), Text(r["status"], style=style), _when(r["start"]), took)
    out.print(table)


@jobs_app.command("status")
@handles_errors
def jobs_status(job_id: JobId, address: Address = None) -> None:
    """One job's status and message."""
    from ..jobs import job_status

    info = job_status(address, job_id)
    say(
        f"{info['id']} ({info['command'] or 'job'}): started {_when(info['start'])}, ended {_when(info['end'])}; "
        f"{info['message']}"
    )
    result(info["status"])


@jobs_app.command("logs")
@handles_errors
def jobs_logs(
    job_id: JobId,
    address: Address = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")] = False,
) -> None:
    """A job's output."""
    from ..jobs import job_logs

    job_logs(address, job_id, follow, result)


@jobs_app.command("stop")
@handles_errors
def jobs_stop(job_id: JobId, address: Address = None) -> None:
    """Stop a running job."""
    from ..jobs import stop_job

    status = stop_job(address, job_id)
    say(f"{job_id}: {status.lower() or 'stop requested'}")
    result(status)
