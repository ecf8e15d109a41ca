"""Ray Jobs: run any vae-ray command on a remote Ray cluster, and manage jobs.

`--submit` turns a command into a job spec, `{"command": ..., "kwargs": ...}`
(plain JSON), and submits `python -m vae_ray.jobs '<spec>'` through the Ray
Jobs API. The job runs the spec with `commands.run`, the very function the
command runs on the user's machine. The runtime environment ships this
package (`py_modules`), so it works the same from a source checkout or a
pip-installed wheel; the cluster provides the requirements (its image, or
`--install-requirements` to pip-install them into the job's environment).

Like `ray job submit`, a submission streams the job's logs and exits with its
outcome by default; `--no-wait` detaches after printing the job id.

Token authentication: when RAY_AUTH_TOKEN (or the file named by
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) holds a token, every request
carries it as a bearer token. It is never printed; sent over plain http to
another machine, it is sent with one warning line naming the host.

Secrets never ride in the entrypoint (which anyone with the dashboard reads):
the MLflow URI goes without its user and password, which reach the job in its
runtime_env's env_vars, as Ray users pass secrets to a job; a spec holding
any other credential in a URI is refused before anything is sent.

    python -m vae_ray.jobs '{"command": "train", "kwargs": {"settings": {...}}}'
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cluster import is_dashboard, mask, read_token, warn_if_token_in_clear
from .errors import Interrupted, RunFailed, UserError

PACKAGE_DIR = Path(__file__).resolve().parent
PASSED_ENV = ("VAE_RAY_", "RAY_DATA_", "TUNE_")  # environment prefixes a job inherits
PASSED_NAMES = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")  # where S3 is; never credentials
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_PATIENCE_S = 60  # how long a submission waits for a just-started head's job agent
DEFAULT_DASHBOARD_PORT = 8265


# ---------------------------------------------------------------------------
# Connection
# ---------------------------------------------------------------------------
def dashboard_url(address: str | None) -> str:
    """The Jobs API address for --address / RAY_ADDRESS, as `ray job submit` reads it."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if is_dashboard(address):
        return address.rstrip("/")
    if address.startswith(("ray://", "local")):
        raise UserError(f"--address {address}: jobs go to the dashboard's HTTP address, e.g. http://HEAD:8265")
    if address == "auto":
        return f"http://127.0.0.1:{DEFAULT_DASHBOARD_PORT}"
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return f"http://{host}:{DEFAULT_DASHBOARD_PORT}"  # a GCS address: the dashboard listens on the same head


def auth_headers() -> dict[str, str]:
    token = read_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str | None):
    """A JobSubmissionClient, or one line saying why there is none."""
    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray.dashboard").setLevel(logging.ERROR)  # the SDK's INFO lines stay off the terminal
    url = dashboard_url(address)
    headers = auth_headers()
    warn_if_token_in_clear(url)
    try:
        with _only_this_address(url):
            return JobSubmissionClient(url, headers=headers)
    except Exception as exc:  # noqa: BLE001 - the client raises bare ConnectionError/RuntimeError
        raise UserError(_explain(exc, url)) from None


@contextlib.contextmanager
def _only_this_address(url: str):
    """Ray's client prefers RAY_API_SERVER_ADDRESS (then RAY_ADDRESS) from the
    environment to the address it is given; `--address` must win, so while the
    client is made, the environment names the same dashboard."""
    saved = {name: os.environ.get(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _explain(exc: BaseException, url: str) -> str:
    text = mask(str(exc))
    # A refused connection first: its message carries object addresses
    # (0x7f401...) that a bare search for a status code would misread.
    if isinstance(exc, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return f"cannot reach a Ray cluster at {url} (is the head running and its dashboard port open?)"
    if _status(text, 401) or "Missing authentication token" in text:
        return f"{url}: the cluster requires a token; set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"
    if _status(text, 403) or "Invalid authentication token" in text or "Forbidden" in text:
        return f"{url}: the cluster rejected the token in RAY_AUTH_TOKEN"
    if _status(text, 404) and "not exist" in text.lower():
        return f"{url}: {text.splitlines()[0]}"
    return f"{url}: {text.strip().splitlines()[0] if text.strip() else type(exc).__name__}"


def _status(text: str, code: int) -> bool:
    """Whether an HTTP status code stands in the text as a number of its own
    (not inside a port, a job id or a memory address)."""
    return re.search(rf"(?<![\w.:]){code}(?![\w.])", text) is not None


def _call(url: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        if _status(str(exc), 404) or "does not exist" in str(exc):
            raise UserError(f"{url}: no job {args[0] if args else ''}".rstrip()) from None
        raise UserError(_explain(exc, url)) from None


# ---------------------------------------------------------------------------
# Submitting
# ---------------------------------------------------------------------------
def runtime_env(install_requirements: bool = False, tracking: bool = False) -> dict[str, Any]:
    """The job's environment: the package, the settings it inherits and, for
    a command that tracks to MLflow, the MLflow credentials of this process."""
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV) or k in PASSED_NAMES}
    if tracking:
        from .config import mlflow_secrets  # here: a job's bare `python` must reach the requirements check

        env_vars |= mlflow_secrets()
    env: dict[str, Any] = {"py_modules": [str(PACKAGE_DIR)], "env_vars": env_vars}
    if install_requirements:
        from importlib.metadata import PackageNotFoundError, requires

        try:
            reqs = [r.split(";")[0].strip() for r in (requires("vae-ray") or []) if "extra ==" not in r]
        except PackageNotFoundError:
            raise UserError("--install-requirements needs vae-ray installed (pip install vae-ray)") from None
        env["pip"] = {"packages": reqs, "pip_check": False}
    return env


def entrypoint(spec: dict[str, Any]) -> str:
    return f"python -m vae_ray.jobs {shlex.quote(json.dumps(spec))}"


def public_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as it may be sent and shown: the MLflow URI without its
    credentials (moved to this process's environment, whence runtime_env
    takes them); any other URI holding credentials is refused in one line."""
    from .config import credentials_in, public_mlflow_uri, without_credentials

    settings = spec.get("kwargs", {}).get("settings") if isinstance(spec.get("kwargs"), dict) else None
    if isinstance(settings, dict) and isinstance(settings.get("mlflow"), str):
        settings = {**settings, "mlflow": public_mlflow_uri(settings["mlflow"])}
        spec = {**spec, "kwargs": {**spec["kwargs"], "settings": settings}}
    for value in _strings(spec):
        if credentials_in(value):
            raise UserError(
                f"{without_credentials(value)}: the URI holds credentials ({credentials_in(value)}), which a job "
                f"spec never carries; give them through the environment instead"
            )
    return spec


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def warn_local_paths(url: str, paths: list[str], warn: Callable[[str], None]) -> None:
    """Runs and datasets must sit on shared storage when the cluster has several nodes."""
    local = [p for p in paths if p and "://" not in p]
    if not local:
        return
    try:
        from ray.util.state import list_nodes

        alive = [n for n in list_nodes(address=url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)]
    except Exception:  # noqa: BLE001 - an older dashboard, or no state API: say nothing rather than guess
        return
    if len(alive) > 1:
        warn(
            f"the cluster has {len(alive)} nodes but {', '.join(local)} "
            f"{'is a local path' if len(local) == 1 else 'are local paths'}: every node must see the same files "
            "(use s3:// or a shared filesystem)"
        )


def submit(
    spec: dict[str, Any],
    address: str | None,
    wait: bool,
    print_line: Callable[[str], None],
    warn: Callable[[str], None],
    install_requirements: bool = False,
    paths: list[str] | None = None,
    driver_cpus: float = 0,
    driver_gpus: float = 0,
) -> str:
    """Submit a job spec; with `wait`, stream its logs and raise unless it succeeds."""
    from . import commands

    spec = public_spec(spec)
    commands.validate(spec)  # everything checkable here fails here, before anything is sent
    url = dashboard_url(address)
    env = runtime_env(install_requirements, tracking=spec["command"] in ("train", "tune"))
    client = connect(url)
    warn_local_paths(url, paths or [], warn)
    job_id = f"vae-ray-{spec['command']}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    resources = {}
    if driver_cpus:
        resources["entrypoint_num_cpus"] = driver_cpus
    if driver_gpus:
        resources["entrypoint_num_gpus"] = driver_gpus
    _submit_when_ready(
        url,
        client,
        entrypoint=entrypoint(spec),
        runtime_env=env,
        submission_id=job_id,
        metadata={"vae_ray_command": spec["command"]},
        **resources,
    )
    if not wait:
        return job_id
    try:
        follow(client, url, job_id, print_line)
    except KeyboardInterrupt:
        raise Interrupted(
            what=f"stopped following {job_id}; it keeps running on the cluster (vae-ray jobs stop {job_id})"
        ) from None
    status = _job_status(url, client, job_id)
    if status != "SUCCEEDED":
        info = _call(url, client.get_job_info, job_id)
        last = [line for line in (info.message or "").strip().splitlines() if line.strip()]
        reason = next(
            (line for line in reversed(last) if line.startswith(("error:", "failed:"))), last[-1] if last else ""
        )
        raise RunFailed(f"job {job_id} {status.lower()}" + (f": {mask(reason)}" if reason else ""))
    return job_id


def _status_name(status) -> str:
    """JobStatus.SUCCEEDED (or its text) -> "SUCCEEDED"."""
    return str(status).split(".")[-1]


def _job_status(url: str, client, job_id: str) -> str:
    return _status_name(_call(url, client.get_job_status, job_id))


def _submit_when_ready(url: str, client, patience_s: float = AGENT_PATIENCE_S, **job) -> None:
    """Submit, waiting while the head's job agent is not up yet: a cluster
    that has just started answers "No available agent to submit job" for a
    while, which is worth waiting out rather than reporting."""
    deadline = time.time() + patience_s
    while True:
        try:
            client.submit_job(**job)
            return
        except Exception as exc:  # noqa: BLE001 - the SDK raises RuntimeError with the HTTP body
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise UserError(_explain(exc, url)) from None
            time.sleep(1)


def follow(client, url: str, job_id: str, print_line: Callable[[str], None]) -> None:
    """Stream a job's logs until it ends."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            for line in chunk.splitlines():
                print_line(mask(line))

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(_explain(exc, url)) from None


# ---------------------------------------------------------------------------
# Managing
# ---------------------------------------------------------------------------
def list_jobs(address: str | None) -> list[dict[str, Any]]:
    url = dashboard_url(address)
    client = connect(url)
    rows = []
    for job in _call(url, client.list_jobs):
        if not job.submission_id:
            continue  # drivers started by hand, not submitted jobs
        rows.append(
            {
                "id": job.submission_id,
                "status": _status_name(job.status),
                "command": (job.metadata or {}).get("vae_ray_command", job.entrypoint.split(" ")[0]),
                "start": job.start_time,
                "end": job.end_time,
                "message": job.message or "",
            }
        )
    rows.sort(key=lambda r: r["start"] or 0, reverse=True)
    return rows


def job_status(address: str | None, job_id: str) -> dict[str, Any]:
    url = dashboard_url(address)
    client = connect(url)
    info = _call(url, client.get_job_info, job_id)
    return {
        "id": job_id,
        "status": _status_name(info.status),
        "message": mask(info.message or ""),
        "start": info.start_time,
        "end": info.end_time,
        "command": (info.metadata or {}).get("vae_ray_command", ""),
    }


def job_logs(address: str | None, job_id: str, follow_logs: bool, print_line: Callable[[str], None]) -> None:
    url = dashboard_url(address)
    client = connect(url)
    if follow_logs:
        _call(url, client.get_job_info, job_id)  # a clear error for an unknown id
        follow(client, url, job_id, print_line)
        return
    text = _call(url, client.get_job_logs, job_id)
    for line in text.splitlines():
        print_line(mask(line))


def stop_job(address: str | None, job_id: str, wait_s: float = 30.0) -> str:
    url = dashboard_url(address)
    client = connect(url)
    _call(url, client.stop_job, job_id)
    deadline = time.time() + wait_s
    status = ""
    while time.time() < deadline:
        status = _job_status(url, client, job_id)
        if status in TERMINAL:
            break
        time.sleep(0.5)
    return status


# ---------------------------------------------------------------------------
# The job side: python -m vae_ray.jobs '<spec json>'
# ---------------------------------------------------------------------------
def _missing_module_message(exc: ImportError) -> str:
    name = getattr(exc, "name", None) or str(exc)
    return (
        f"error: the job ran {sys.executable} (Python {platform.python_version()}), which cannot import "
        f"{name}: install vae-ray's requirements in the environment the cluster's `ray start` runs from "
        f"(pip install vae-ray), or submit with --install-requirements"
    )


def entry(argv: list[str]) -> int:
    """Exit 0 on success, 2 on bad input, 1 on failure; the summary is one JSON line."""
    if len(argv) != 2:
        print("usage: python -m vae_ray.jobs '<job spec json>'", file=sys.stderr)
        return 2
    try:
        spec = json.loads(argv[1])
        from .commands import run

        result = run(spec, show=False)
    except ImportError as exc:
        print(_missing_module_message(exc), file=sys.stderr)
        return 2
    except (UserError, json.JSONDecodeError, KeyError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(entry(sys.argv))
