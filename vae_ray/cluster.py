"""Connecting to Ray: the cluster the user names, else a private local one.

Addresses, as Ray users write them (`--address`, else `RAY_ADDRESS`):
- `host:port`, `auto`: a running cluster's GCS, joined with `ray.init`;
- `http(s)://host:8265`: a cluster's dashboard, which only the Jobs API
  (`--submit`, `vae-ray jobs`) uses; other commands say so in one line;
- nothing: a private local cluster for this command alone.

Token authentication: the token is read the way Ray reads it
(`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`) and sent to a
cluster that is joined or called; a missing or rejected token is one line.
Sent in clear to another machine (plain http://, or gRPC without
RAY_USE_TLS), it is sent with one warning line naming the host.

`check_address` is every check of an address (and of the token file) that
touches nothing: commands run it before they lock or make anything.

A private cluster is pointed at itself explicitly: its processes get the
address of its own dashboard (RAY_API_SERVER_ADDRESS) and no RAY_ADDRESS,
so a stale `/tmp/ray/ray_current_cluster` or another cluster on the machine
can never capture its internals (Ray Train's placement-group cleaner, for
one, resolves the cluster through those).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

LOG_COPY_LIMIT = 200 * 1024**2  # at most this much of a failed run's Ray logs is copied into it
_STATE = {"private": False}  # whether this process started the cluster it is connected to


@dataclass
class Cluster:
    """The cluster this process is connected to."""

    resources: dict
    private: bool  # a local cluster this command started (and ends)
    address: str = ""
    nodes: list = field(default_factory=list)  # alive nodes: {"id", "ip", "resources"}
    dashboard: str = ""
    logs_dir: str = ""

    @property
    def node_memory(self) -> list[float]:
        return [n["resources"].get("memory", 0.0) for n in self.nodes]

    def largest_node_cpus(self) -> int:
        return int(max((n["resources"].get("CPU", 0) for n in self.nodes), default=self.resources.get("CPU", 1)))


# ---------------------------------------------------------------------------
# Addresses and tokens
# ---------------------------------------------------------------------------
def given_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def is_dashboard(address: str) -> bool:
    return address.startswith(("http://", "https://"))


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of HOST:PORT or [IPv6]:PORT, as `ray.init` takes them; None otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        return host[1:-1], int(port)
    if not host or any(ch in host for ch in ":/@[] \t") or not host.isprintable():
        return None
    return host, int(port)


def check_address(address: str | None) -> None:
    """Every check of --address / RAY_ADDRESS (and of the token a cluster
    needs) that needs no cluster and touches nothing, so that a mistake there
    ends a command before it takes a lock or makes a folder. Dashboard
    addresses are for --submit (checked by `jobs.dashboard_url`)."""
    target = given_address(address)
    if not target or target == "local":
        return
    shown = f"--address {target}" if address else f"RAY_ADDRESS={target}"
    if is_dashboard(target):
        raise UserError(
            f"{shown} is a dashboard (Jobs API) address: add --submit to run this command as a "
            f"job there, or pass --address HOST:6379 to join the cluster from this machine"
        )
    rest = target[len("ray://") :] if target.startswith("ray://") else target
    if target != "auto" and _host_port(rest) is None:
        raise UserError(
            f"{shown}: not a Ray cluster address (expected HOST:PORT such as 10.0.0.5:6379, auto, "
            f"or http://HEAD:8265 with --submit)"
        )
    read_token()  # an unreadable RAY_AUTH_TOKEN_PATH is a mistake now, not a refused connection later


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def token_in_clear(address: str) -> str | None:
    """The host that a token sent to `address` would reach unencrypted across
    a network: a plain http:// dashboard, or a cluster joined over gRPC
    without RAY_USE_TLS, on a host other than this machine. None otherwise."""
    if address in ("", "auto", "local") or address.startswith("https://"):
        return None
    if address.startswith("http://"):
        try:
            host = urllib.parse.urlsplit(address).hostname or ""
        except ValueError:
            return None
    else:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return None
        parsed = _host_port(address[len("ray://") :] if address.startswith("ray://") else address)
        host = parsed[0] if parsed else ""
    return host if host and not _is_loopback(host) else None


def warn_if_token_in_clear(address: str) -> None:
    """One warning line when the token is about to cross a network in clear.

    A warning, not a refusal: `ray job submit` and `ray.init` send the token
    to a plain-http or non-TLS head without a word, and many private clusters
    run exactly so inside a VPC; refusing would break what Ray users do every
    day, while silence hides that anyone on the path can read the token."""
    from . import storage

    if _inside_a_job():
        return  # joining its own cluster from inside: Ray's own traffic
    host = token_in_clear(address) if read_token_quietly() else None
    if host:
        how = "plain http" if address.startswith("http://") else "gRPC without TLS (RAY_USE_TLS)"
        storage.warn_user(
            f"the Ray token goes to {host} ({address}) over {how}: anyone on the network path can read it; "
            f"use https:// or TLS beyond a private network"
        )


def _inside_a_job() -> bool:
    """Whether this process is a submitted job's driver (Ray sets this for it)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def read_token() -> str | None:
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


SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def mask(text: str) -> str:
    """Text with the cluster token (and AWS and MLflow secrets) replaced by ***."""
    for secret in (read_token_quietly(), *(os.environ.get(name) for name in SECRET_VARIABLES)):
        if secret and len(secret) >= 6:
            text = text.replace(secret, "***")
    return text


def read_token_quietly() -> str | None:
    try:
        return read_token()
    except UserError:
        return None


# ---------------------------------------------------------------------------
# Connecting
# ---------------------------------------------------------------------------
def quiet_ray_environment(verbose: bool = False) -> None:
    """Switches that keep Ray's chatter off the terminal (set before `ray.init`
    so the workers inherit them). Ray's own deduplicated worker output stays
    available with --verbose."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train polls its workers every 2 s by default: a finished (or failed)
    # run was noticed seconds late. Half a second costs nothing measurable.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # on for elastic runs (trainer.py)
    if not verbose:
        # Ray Data's advice about actor pools larger than a small input is
        # harmless here (the pool is sized from the data) and not for users.
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")


def connect(address: str | None = None, cpus_needed: int = 1, dashboard: bool = True, verbose: bool = False) -> Cluster:
    """Connect once per process; describe the cluster.

    With no address, a private local cluster starts with the machine's CPUs
    (at least `cpus_needed`, which callers keep within the machine). Ray Data
    jobs (generate, evaluate) pass dashboard=False: they do not need it, and
    it costs about a second.
    """
    import ray

    quiet_ray_environment(verbose)
    if not ray.is_initialized():
        check_address(address)
        target = given_address(address)
        common = dict(
            log_to_driver=verbose, logging_level=logging.WARNING if verbose else logging.ERROR, configure_logging=True
        )
        previous = signal.getsignal(signal.SIGTERM)
        if target and target != "local":
            _join(target, common)
        else:
            _start_private(max(os.cpu_count() or 1, cpus_needed), dashboard, common)
        # Ray's core installs a fatal-signal handler for SIGTERM that aborts the
        # process; keep the one this process had (the CLI's ends a command
        # cleanly, exit status 143, partial results marked as partial).
        if threading.current_thread() is threading.main_thread() and previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _quiet_ray_data()
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
    if not verbose:
        _route_raylet_messages_to_log()
    return describe()


def _join(target: str, common: dict) -> None:
    import ray

    if read_token_quietly() and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"  # Ray 2.60 heads require it by default
    # A cluster that refuses this client is retried for a while; give up sooner.
    os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", "10")
    warn_if_token_in_clear(target)
    # The workers of a joined cluster run elsewhere and do not inherit this
    # process's environment: the MLflow credentials reach them (rank 0 logs)
    # in the job's runtime_env, the way Ray passes environment to a cluster.
    # A submitted job has them in its runtime_env already (and Ray refuses
    # the same variable given twice).
    from .config import mlflow_secrets

    if mlflow_secrets() and not _inside_a_job():
        common = {**common, "runtime_env": {"env_vars": mlflow_secrets()}}
    with _quiet_stderr(enabled=not common["log_to_driver"]) as captured:
        try:
            ray.init(address=target, **common)
            return
        except Exception as exc:  # noqa: BLE001 - ray.init raises ConnectionError, RuntimeError, AuthenticationError
            message = explain_connection_error(exc, target, captured.text())
    raise UserError(message)


class _Captured:
    def __init__(self, handle=None):
        self.handle = handle

    def text(self) -> str:
        if self.handle is None:
            return ""
        self.handle.seek(0)
        return self.handle.read().decode(errors="replace")


@contextlib.contextmanager
def _quiet_stderr(enabled: bool = True):
    """While joining a cluster, Ray's C++ client prints a warning a second as it
    retries a cluster that refuses it (a missing token, say). Those go to a
    temporary file, read back to explain the refusal in one line."""
    if not enabled:
        yield _Captured()
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as handle:
        os.dup2(handle.fileno(), 2)
        try:
            yield _Captured(handle)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _start_private(cpus: int, dashboard: bool, common: dict) -> None:
    import ray

    # Nothing inherited may point this cluster's processes elsewhere.
    os.environ.pop("RAY_ADDRESS", None)
    port = _free_port() if dashboard else None
    if port:
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    context = ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        **common,
    )
    url = getattr(context, "dashboard_url", "") or ""
    if port and url and not url.endswith(f":{port}"):  # the port was taken meanwhile: follow the dashboard
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{url}" if "://" not in url else url
    _STATE["private"] = True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def explain_connection_error(exc: BaseException, target: str, printed: str = "") -> str:
    text = mask(f"{exc}\n{printed}")
    if "auth" in text.lower() and ("token" in text.lower() or "unauthenticated" in text.lower()):
        if read_token_quietly():
            return f"the Ray cluster at {target} rejected the token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        return (
            f"the Ray cluster at {target} requires a token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) "
            f"to the head's ~/.ray/auth_token"
        )
    if target == "auto":
        return "no running Ray cluster found for --address auto (start one with `ray start --head`)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"cannot connect to a Ray cluster at {target} ({(lines[0] if lines else type(exc).__name__)[:200]})"


def describe() -> Cluster:
    import ray

    nodes = [
        {"id": n["NodeID"], "ip": n.get("NodeManagerAddress", ""), "resources": n.get("Resources", {})}
        for n in ray.nodes()
        if n.get("Alive")
    ]
    context = ray.get_runtime_context()
    private = _STATE["private"]
    return Cluster(
        resources=ray.cluster_resources(),
        private=private,
        address=context.gcs_address,
        nodes=nodes,
        dashboard=os.environ.get("RAY_API_SERVER_ADDRESS", "") if private else "",
        logs_dir=_logs_dir() if private else "",
    )


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _logs_dir() -> str:
    """The private cluster's log folder. Ray has no public API for it; the
    session folder is the one `ray.init` just created."""
    try:
        import ray

        return ray._private.worker.global_worker.node.get_logs_dir_path()  # noqa: SLF001 - see tests/test_ray_internals.py
    except Exception:  # noqa: BLE001
        return ""


def _route_raylet_messages_to_log() -> None:
    """The raylet pushes warnings (such as "N worker processes have been
    started ... startup concurrency", routine on a 2-core machine) to every
    driver's stdout, whatever `log_to_driver` says. Ray has no public switch
    for this, so its printer is wrapped to send those to logging; they stay
    in the session's raylet.out. tests/test_ray_internals.py fails loudly when
    Ray renames what this wraps."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_vae_ray_filtered", False):
        return

    def filtered(data, ignore_prefix):
        if data.get("pid") == "raylet":
            logging.getLogger("vae_ray.raylet").info("%s", " ".join(data.get("lines", [])))
            return
        original(data, ignore_prefix)

    filtered._vae_ray_filtered = True  # noqa: SLF001 - our own marker on our own function
    ray_worker.print_to_stdstream = filtered


def start_board(name: str):
    """The progress board (a `progress.ProgressBoard`) as a named, CPU-free
    actor that the workers find by name, and a function that reads it."""
    import ray

    from .progress import ProgressBoard

    board = ray.remote(num_cpus=0)(ProgressBoard).options(name=name).remote()
    return board, lambda: ray.get(board.get.remote(), timeout=2)


def diagnose_stall(cfg, use_gpu: bool, want: dict | None = None) -> str:
    """What a run that made no progress was most likely waiting for, in words.
    `want`: each worker's resources, when not its CPUs and one GPU."""
    import ray

    try:
        table = ray.util.placement_group_table()
        available = ray.available_resources()
    except Exception as exc:  # noqa: BLE001 - the GCS itself is gone
        return f"the Ray cluster stopped answering ({type(exc).__name__})"
    pending = [pg for pg in table.values() if pg.get("state") in ("PENDING", "RESCHEDULING")]
    if pending:
        want = want or {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        free = ", ".join(f"{k} {v:g}" for k, v in sorted(available.items()) if k in ("CPU", "GPU", *want)) or "none"
        return (
            f"waiting for resources: {cfg.min_workers or cfg.workers} worker(s) x {want} "
            f"are not free on the cluster (free now: {free})"
        )
    return "the workers started but reported no training step (stuck starting up or reading data)"


def copy_logs(cluster: Cluster, destination: Path) -> Path | None:
    """Copy a private cluster's logs (never a shared cluster's: other users'
    jobs log there) into `destination`, largest files last, up to LOG_COPY_LIMIT."""
    if not cluster.private or not cluster.logs_dir or not Path(cluster.logs_dir).is_dir():
        return None
    source = Path(cluster.logs_dir)
    files = sorted(
        (p for p in source.rglob("*") if p.is_file() and not p.name.endswith((".sock", ".lock"))),
        key=lambda p: p.stat().st_size,
    )
    budget = LOG_COPY_LIMIT
    for path in files:
        size = path.stat().st_size
        if size > budget:
            break
        target = destination / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        budget -= size
    return destination


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if _STATE["private"]:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        _STATE["private"] = False
