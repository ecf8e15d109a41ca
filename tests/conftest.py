"""Shared fixtures.

- `ray_cluster`: one small private Ray cluster in this process for the whole
  session (ray.init costs seconds on 2 cores).
- `cluster`: a real multi-node Ray cluster on loopback, started the way users
  start one (`ray start --head`, `ray start --address`, each node in its own
  process group with its own ports, token authentication on), from a virtual
  environment where vae-ray was installed from its wheel and no source
  checkout is importable. Jobs, multi-node, S3 and elastic tests use it.
- `s3_bucket`: a real S3-compatible server (moto) on loopback.
- reference data when it sits beside the checkout, and small datasets the
  tests write themselves.

Test tiers (markers): `ray` (uses a Ray cluster), `cluster` (the multi-node
cluster), `subprocess` (runs the CLI as a process), `browser`; `smoke` marks
the end-to-end test `make test-fast` keeps.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REHEARSAL_GPU = "rehearsal_gpu"  # the shared cluster's stand-in for a GPU (see ray_cluster)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The loopback S3 server's address and its dummy credentials are set before
# any Ray process starts, so every node and worker (which inherit this
# environment) reaches the same server.
S3_PORT = _free_port()
os.environ.update(
    {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
)
os.environ.pop("RAY_ADDRESS", None)
SHARED_DATA = REPO.parent / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"
CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
TOKEN = secrets.token_hex(16)


RAY_FIXTURES = {"ray_cluster", "trained_run", "cluster", "finished_search", "wheel_env", "mlflow_server"}


def pytest_collection_modifyitems(config, items):
    """Tiers: a test that uses a Ray cluster is marked `ray` (and `cluster` for the multi-node one)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
        if "cluster" in fixtures:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray cluster shared by every test that needs one. Four
    logical CPUs: two training workers plus Ray Data. It also declares one
    `rehearsal_gpu`, a custom resource that searches schedule by as by a GPU
    when VAE_RAY_GPU_RESOURCE names it (Ray's own RAY_OVERRIDE_RESOURCES, as
    the cluster launcher sets a node's resources)."""
    from vae_ray.cluster import connect, shutdown

    os.environ["RAY_OVERRIDE_RESOURCES"] = json.dumps({REHEARSAL_GPU: 1})
    try:
        cluster = connect(cpus_needed=4)
    finally:
        os.environ.pop("RAY_OVERRIDE_RESOURCES", None)
    yield cluster.resources
    workers = _local_ray_workers()
    shutdown()
    end_stragglers(workers)


def _local_ray_workers() -> list[int]:
    """The worker processes of the local cluster this process started: what
    its raylet spawned (they have process groups of their own, and a worker
    has outlived `ray.shutdown()`)."""
    raylets = []
    for pid in descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/raylet"):
                raylets.append(pid)
        except OSError:
            continue
    return [pid for raylet in raylets for pid in descendants(raylet)]


def end_stragglers(pids: list[int], patience: float = 10) -> None:
    """SIGKILL those of `pids` still alive after `patience` seconds."""
    deadline = time.monotonic() + patience
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        time.sleep(0.2)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3-compatible server (moto) on loopback with one empty bucket."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket="vae-ray-test")
    yield "vae-ray-test"
    server.stop()


# ---------------------------------------------------------------------------
# An installed vae-ray and a multi-node cluster
# ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def wheel_env() -> Path:
    """vae-ray built as a wheel and installed into a fresh virtual environment.

    The environment sees this one's third-party packages (ray, torch, ...)
    through a .pth line, but vae-ray only from the wheel: the test checkout's
    editable install is not importable there, and the wheel carries no jobs/
    folder, so everything that works here works for `pip install vae-ray`."""
    root = Path(tempfile.mkdtemp(prefix="vr-wheel-"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(root / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((root / "dist").glob("vae_ray-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "_requirements.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    yield venv
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Node:
    process: subprocess.Popen
    port_args: list = field(default_factory=list)

    def signal(self, sig: str) -> None:
        """Signal everything in the session this node's `ray start` opened (Ray's
        worker processes have process groups of their own, in that session),
        and nothing else."""
        subprocess.run(["pkill", f"-{sig}", "-s", str(self.process.pid)], capture_output=True)

    def kill(self) -> None:
        """The node vanishes at once, with every process on it (a spot instance taken away)."""
        self.signal("KILL")
        self.process.wait(timeout=30)


@dataclass
class LoopbackCluster:
    venv: Path
    gcs: str
    dashboard: str
    temp_dir: Path
    env: dict
    nodes: list = field(default_factory=list)

    def exe(self, name: str = "vae-ray") -> str:
        return str(self.venv / "bin" / name)

    def add_node(self, cpus: int = 1) -> Node:
        node = _start_node(self, ["--address", self.gcs, f"--num-cpus={cpus}"])
        self.nodes.append(node)
        _wait_for_nodes(self, len(self.nodes))
        return node

    def run(self, *args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        """The installed `vae-ray` with this cluster's environment, from a folder with no source checkout."""
        return subprocess.run(
            [self.exe(), *args],
            env=self.env,
            cwd=self.temp_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )


def stop_nodes(nodes: list[Node], patience: float = 5) -> None:
    """Stop every node at once (one after the other took 10-13 s): SIGTERM to
    each node's session, then SIGKILL to what is left after `patience`."""
    for node in nodes:
        node.signal("TERM")
    deadline = time.monotonic() + patience
    for node in nodes:
        try:
            node.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    for node in nodes:
        node.signal("KILL")  # whatever a node's session still holds
        if node.process.poll() is None:
            node.process.wait(timeout=30)


def _node_ports() -> list[str]:
    """Every port a node opens, its own: several nodes share this machine (and
    the suite's private cluster holds Ray's defaults)."""
    return [
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]


def _start_node(cluster: LoopbackCluster, args: list[str]) -> Node:
    command = [
        str(cluster.venv / "bin" / "python"),
        "-m",
        "ray.scripts.scripts",
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={cluster.temp_dir}",
        "--disable-usage-stats",
        *_node_ports(),
        *args,
    ]
    process = subprocess.Popen(
        command,
        env=cluster.env,
        cwd=cluster.temp_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return Node(process)


def _wait_for_nodes(cluster: LoopbackCluster, count: int, timeout: float = 180, watch: Node | None = None) -> bool:
    """Until `count` nodes are alive (True); False as soon as the `watch`ed
    node's `ray start` has exited instead."""
    import json

    deadline = time.time() + timeout
    while time.time() < deadline:
        if watch is not None and watch.process.poll() is not None:
            return False
        request = urllib.request.Request(
            f"{cluster.dashboard}/nodes?view=summary", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                summary = json.loads(response.read())["data"]["summary"]
            alive = [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]
            if len(alive) >= count:
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise AssertionError(f"the loopback cluster did not reach {count} nodes")


@pytest.fixture(scope="module")
def cluster(wheel_env, s3_bucket):
    """A head (1 CPU, the dashboard and Jobs API) and two worker nodes (1 CPU
    each) on 127.0.0.1, with token authentication, started from the wheel's
    environment. Its nodes find S3 through the environment, as cluster nodes
    find theirs through an instance profile."""
    temp = Path(tempfile.mkdtemp(prefix="vrc-"))  # short: Ray's socket paths must fit in 107 bytes
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": TOKEN,
        "PATH": f"{wheel_env / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        # Node deaths noticed within seconds (the elastic test kills one).
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "RAY_health_check_initial_delay_ms": "1000",
    }
    env.pop("RAY_ADDRESS", None)
    # Set in this process while the suite's private cluster runs: it would point
    # the CLI's Jobs and state clients at that cluster's dashboard instead.
    env.pop("RAY_API_SERVER_ADDRESS", None)
    env.pop("VIRTUAL_ENV", None)
    for _ in range(3):  # a port taken between _free_port() and the head's bind ends `ray start`: new ports
        port, dash = _free_port(), _free_port()
        loopback = LoopbackCluster(wheel_env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp, env)
        head = _start_node(
            loopback,
            [
                "--head",
                f"--port={port}",
                "--num-cpus=1",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--ray-client-server-port={_free_port()}",
            ],
        )
        loopback.nodes.append(head)
        if _wait_for_nodes(loopback, 1, watch=head):
            break
        stop_nodes(loopback.nodes)
    else:
        shutil.rmtree(temp, ignore_errors=True)
        raise AssertionError("the loopback cluster's head did not start in three tries")
    try:
        for count in (2, 3):  # one at a time: on 2 cores, starting nodes together only slows each down
            loopback.nodes.append(_start_node(loopback, ["--address", loopback.gcs, "--num-cpus=1"]))
            _wait_for_nodes(loopback, count)
        yield loopback
    finally:
        stop_nodes(loopback.nodes)
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------------------
# Data and checkpoints
# ---------------------------------------------------------------------------
def make_checkpoint(
    folder: Path, conditional: bool = False, seed: int = 0, classes: list | None = None, loss: str = "matlab"
) -> Path:
    """A checkpoint of an untrained (randomly initialised) model: generation
    mechanics do not depend on how good the weights are."""
    import torch

    from vae_ray import checkpoint as ckpt
    from vae_ray.config import TrainConfig
    from vae_ray.model import build_model
    from vae_ray.rundir import RunDir

    torch.manual_seed(seed)
    classes = classes or [str(i) for i in range(10)]
    cfg = TrainConfig(
        arch="mnist",
        loss=loss,
        latent_dim=4,
        conditional=conditional,
        lr=1e-3,
        lr_schedule="constant",
        adam_beta2=0.999,
        cpus_per_worker=1,
    ).validate()
    dataset = {
        "name": "digits",
        "shape": [28, 28, 1],
        "classes": classes,
        "num_classes": len(classes),
        "counts": {"train": 100, "test": 10},
    }
    model = build_model("mnist", (28, 28, 1), 4, len(classes) if conditional else 0, loss=loss)
    directory = ckpt.save(
        folder / "checkpoint_epoch_0001", model, None, {"epoch": 1, "global_step": 1}, cfg.to_dict(), dataset
    )
    RunDir(str(folder)).point_latest(directory.name)
    return folder


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not present at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """512 + 512 synthetic 28x28 digits as a prepared dataset."""
    from vae_ray.data import prepare

    out = tmp_path_factory.mktemp("tiny") / "digits"
    prepare("synthetic", out, limit=512, shards=2)
    return out


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (SQLite store, local artifacts)."""
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    assert os.path.exists(exe), "the tracking tests need mlflow (pip install 'vae-ray[mlflow]'; make install does)"
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [
            exe,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'runs.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while not urlopen_ok(f"{url}/health"):
        assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a busy machine: its gunicorn workers were slow to go
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def trained_run(ray_cluster, tiny_data, tmp_path_factory, mlflow_server) -> Path:
    """One short training run that read-only tests share (files, TensorBoard, MLflow)."""
    from vae_ray import commands

    run = tmp_path_factory.mktemp("trained") / "run"
    summary = commands.train(
        {
            "data": str(tiny_data),
            "out": str(run),
            "epochs": 2,
            "latent_dim": 4,
            "batch_size": 64,
            "seed": 1,
            "lr": 2e-3,
            "mlflow": mlflow_server,
        }
    )
    (run.parent / "mlflow_run_id").write_text(summary["mlflow_run_id"])
    return run


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 array in the IDX format (as MNIST ships it)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_fake_idx_dataset(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


def write_cifar_batches(root: Path, per_batch: int = 20, seed: int = 0, names: list | None = None) -> dict:
    """CIFAR-10 python batches in the official format (pickled dicts, byte keys)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        blob = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        (root / name).write_bytes(pickle.dumps(blob, protocol=2))
        written[name] = (data, labels)
    names = names or [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return written


@pytest.fixture(autouse=True)
def _no_download(monkeypatch, tmp_path):
    """No test touches the network or the user's cache: downloads go to a
    closed loopback port and the cache is a fresh folder."""
    monkeypatch.setenv("VAE_RAY_DOWNLOAD_BASE", "http://127.0.0.1:9/")
    monkeypatch.setenv("VAE_RAY_CACHE", str(tmp_path / "cache"))
    for var in (
        "VAE_RAY_MNIST_DIR",
        "VAE_RAY_FASHION_MNIST_DIR",
        "VAE_RAY_CIFAR10_DIR",
        "MLFLOW_TRACKING_URI",
        "WANDB_PROJECT",
    ):
        monkeypatch.delenv(var, raising=False)


def assert_one_error_line(result, *words):
    """A CLI result that failed as a user's mistake should: exit 2, one line
    starting with 'error:' that names the problem, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.output


def assert_process_error_line(done: subprocess.CompletedProcess, *words, code: int = 2):
    """The same for a CLI run as a process: exit status, one line on stderr."""
    assert done.returncode == code, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def descendants(pid: int) -> list[int]:
    """Every process below pid, whatever process group it moved to (Ray's
    workers start sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a command started with start_new_session and everything it
    started: its group, and the workers of its private Ray cluster, which a
    killed raylet does not always take with it."""
    below = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def vae_ray_exe() -> str:
    return shutil.which("vae-ray") or str(Path(sys.executable).parent / "vae-ray")


def urlopen_ok(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
