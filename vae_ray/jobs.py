"""Ray Jobs: run any vae-ray command on a remote Ray cluster, and manage jobs.

`--submit` turns a command into a *job spec* (the command name and its
resolved settings, plain JSON) and submits `python entry.py '<spec>'` through
the Ray Jobs API. The runtime environment carries this package
(`py_modules`) and the thin entry point (`working_dir` = `jobs/`); the
cluster's image provides the requirements (see cluster.yaml), or
`--install-requirements` adds them to the runtime environment.

Token authentication: when RAY_AUTH_TOKEN (or the file named by
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) holds a token, every request
carries it as a bearer token. It is never printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import RunFailed, UserError

PACKAGE_DIR = Path(__file__).resolve().parent
JOBS_DIR = PACKAGE_DIR.parent / "jobs"
COMMANDS = ("train", "tune", "generate", "evaluate")
PASSED_ENV = ("VAE_RAY_", "RAY_DATA_", "TUNE_")   # environment prefixes a job inherits
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_PATIENCE_S = 60     # how long a submission waits for a just-started head's job agent


# ---------------------------------------------------------------------------
# Connection
# ---------------------------------------------------------------------------
def dashboard_url(address: Optional[str]) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if address.startswith(("ray://", "auto", "local")):
        raise UserError(f"--address {address}: jobs go to the dashboard's HTTP address, e.g. http://HEAD:8265")
    return address if "://" in address else f"http://{address}"


def read_token() -> Optional[str]:
    """The cluster token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidate = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
    try:
        return candidate.read_text().strip() or None
    except OSError:
        if path:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file") from None
        return None


def auth_headers() -> dict[str, str]:
    token = read_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: Optional[str]):
    """A JobSubmissionClient, or one line saying why there is none."""
    from ray.job_submission import JobSubmissionClient

    import logging

    logging.getLogger("ray.dashboard").setLevel(logging.ERROR)  # the SDK's INFO lines stay off the terminal
    url = dashboard_url(address)
    try:
        return JobSubmissionClient(url, headers=auth_headers())
    except Exception as exc:  # noqa: BLE001 - the client raises bare ConnectionError/RuntimeError
        raise UserError(_explain(exc, url)) from None


def _explain(exc: BaseException, url: str) -> str:
    text = str(exc)
    token = read_token()
    if token:
        text = text.replace(token, "***")  # never echo the token
    if "401" in text or "Missing authentication token" in text:
        return f"{url}: the cluster requires a token; set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"
    if "403" in text or "Invalid authentication token" in text or "Forbidden" in text:
        return f"{url}: the cluster rejected the token in RAY_AUTH_TOKEN"
    if "404" in text and "not exist" in text.lower():
        return f"{url}: {text.splitlines()[0]}"
    if isinstance(exc, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return f"cannot reach a Ray cluster at {url} (is the head running and its dashboard port open?)"
    return f"{url}: {text.strip().splitlines()[0] if text.strip() else type(exc).__name__}"


def _call(url: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        if "404" in str(exc) or "does not exist" in str(exc):
            raise UserError(f"{url}: no job {args[0] if args else ''}".rstrip()) from None
        raise UserError(_explain(exc, url)) from None


# ---------------------------------------------------------------------------
# Submitting
# ---------------------------------------------------------------------------
def runtime_env(install_requirements: bool = False) -> dict[str, Any]:
    if not (JOBS_DIR / "entry.py").is_file():
        raise UserError(f"{JOBS_DIR / 'entry.py'} is missing: submit from a vae-ray source checkout")
    env = {"working_dir": str(JOBS_DIR), "py_modules": [str(PACKAGE_DIR)],
           "env_vars": {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}}
    if install_requirements:
        from importlib.metadata import requires

        reqs = [r.split(";")[0].strip() for r in (requires("vae-ray") or []) if "extra ==" not in r]
        env["pip"] = {"packages": reqs, "pip_check": False}
    return env


def warn_local_paths(client, paths: list[str], warn: Callable[[str], None]) -> None:
    """Runs and datasets must sit on shared storage when the cluster has several nodes."""
    local = [p for p in paths if p and "://" not in p]
    if not local:
        return
    try:
        nodes = client._do_request("GET", "/api/v0/nodes?limit=1000&detail=false")
        alive = [n for n in nodes.json()["data"]["result"]["result"] if n.get("state") == "ALIVE"]
    except Exception:  # noqa: BLE001 - an older dashboard: say nothing rather than guess
        return
    if len(alive) > 1:
        warn(f"the cluster has {len(alive)} nodes but {', '.join(local)} "
             f"{'is a local path' if len(local) == 1 else 'are local paths'}: every node must see the same files "
             "(use s3:// or a shared filesystem)")


def submit(spec: dict[str, Any], address: Optional[str], wait: bool, print_line: Callable[[str], None],
           warn: Callable[[str], None], install_requirements: bool = False,
           paths: Optional[list[str]] = None) -> str:
    """Submit a job spec; with `wait`, stream its logs and raise unless it succeeds."""
    if spec.get("command") not in COMMANDS:
        raise UserError(f"cannot submit {spec.get('command')!r}")
    url = dashboard_url(address)
    env = runtime_env(install_requirements)
    client = connect(url)
    warn_local_paths(client, paths or [], warn)
    job_id = f"vae-ray-{spec['command']}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    entrypoint = f"python entry.py {shlex.quote(json.dumps(spec))}"
    _submit_when_ready(url, client, entrypoint=entrypoint, runtime_env=env, submission_id=job_id,
                       metadata={"vae_ray_command": spec["command"]})
    if not wait:
        return job_id
    follow(client, url, job_id, print_line)
    status = _job_status(url, client, job_id)
    if status != "SUCCEEDED":
        info = _call(url, client.get_job_info, job_id)
        last = (info.message or "").strip().splitlines()
        raise RunFailed(f"job {job_id} {status.lower()}" + (f": {last[-1]}" if last else ""))
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
                print_line(line)
    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001
        raise UserError(_explain(exc, url)) from None


# ---------------------------------------------------------------------------
# Managing
# ---------------------------------------------------------------------------
def list_jobs(address: Optional[str]) -> list[dict[str, Any]]:
    url = dashboard_url(address)
    client = connect(url)
    rows = []
    for job in _call(url, client.list_jobs):
        if not job.submission_id:
            continue  # drivers started by hand, not submitted jobs
        rows.append({"id": job.submission_id, "status": _status_name(job.status),
                     "command": (job.metadata or {}).get("vae_ray_command", job.entrypoint.split(" ")[0]),
                     "start": job.start_time, "end": job.end_time, "message": job.message or ""})
    rows.sort(key=lambda r: r["start"] or 0, reverse=True)
    return rows


def job_status(address: Optional[str], job_id: str) -> dict[str, Any]:
    url = dashboard_url(address)
    client = connect(url)
    info = _call(url, client.get_job_info, job_id)
    return {"id": job_id, "status": _status_name(info.status), "message": info.message or "",
            "start": info.start_time, "end": info.end_time,
            "command": (info.metadata or {}).get("vae_ray_command", "")}


def job_logs(address: Optional[str], job_id: str, follow_logs: bool, print_line: Callable[[str], None]) -> None:
    url = dashboard_url(address)
    client = connect(url)
    if follow_logs:
        _call(url, client.get_job_info, job_id)  # a clear error for an unknown id
        follow(client, url, job_id, print_line)
        return
    text = _call(url, client.get_job_logs, job_id)
    for line in text.splitlines():
        print_line(line)


def stop_job(address: Optional[str], job_id: str, wait_s: float = 30.0) -> str:
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
# The job side (jobs/entry.py)
# ---------------------------------------------------------------------------
def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run a submitted command on the cluster (RAY_ADDRESS is set by Ray)."""
    command = spec.get("command")
    if command == "train":
        from .config import TrainConfig
        from .train import fit

        return fit(TrainConfig.from_dict(spec["config"]), resume=bool(spec.get("resume")), show=False)
    if command == "tune":
        from .config import TrainConfig
        from .tune import SearchSpec, search

        rows = search(TrainConfig.from_dict(spec["config"]), SearchSpec(**spec["search"]), spec["out"],
                      show=False, **spec["options"])
        return {"best": str(Path(spec["out"]) / "best"), "trials": [{k: v for k, v in r.items() if k != "history"}
                                                                   for r in rows]}
    if command == "generate":
        from .generate import Generation

        manifest = Generation(**spec["options"]).run()
        return {k: manifest[k] for k in ("count", "seconds", "actors", "gpu")} | {"out": spec["options"]["out"]}
    if command == "evaluate":
        from .evaluate import Evaluation, save

        result = Evaluation(**spec["options"]).run()
        save(result, spec["options"]["checkpoint"])
        return result
    raise UserError(f"unknown job command {command!r}")


def entry(argv: list[str]) -> int:
    """`python entry.py '<spec json>'`: exit 0 on success, 2 on bad input, 1 on failure."""
    if len(argv) != 2:
        print("usage: python entry.py '<job spec json>'", file=sys.stderr)
        return 2
    try:
        result = run_spec(json.loads(argv[1]))
    except (UserError, json.JSONDecodeError, KeyError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, default=str))
    return 0
