"""Shared fixtures: one small local Ray cluster for the whole session, real
reference data when it sits beside the checkout, and small datasets the tests
write themselves."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The loopback S3 server's address and its dummy credentials are set before
# any Ray worker starts, so the workers (which inherit the driver's
# environment) reach the same server.
S3_PORT = _free_port()
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"})
SHARED_DATA = REPO.parent / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"
CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one (ray.init costs
    seconds on 2 cores). Four logical CPUs: two training workers plus Ray Data."""
    from vae_ray.cluster import ensure_ray

    resources = ensure_ray(cpus_needed=4)
    yield resources
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3-compatible server (moto) on loopback with one empty bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket="vae-ray-test")
    yield "vae-ray-test"
    server.stop()


def make_checkpoint(folder: Path, conditional: bool = False, seed: int = 0) -> Path:
    """A checkpoint of an untrained (randomly initialised) model: generation
    mechanics do not depend on how good the weights are."""
    import torch

    from vae_ray import checkpoint as ckpt
    from vae_ray.config import TrainConfig
    from vae_ray.model import build_model

    torch.manual_seed(seed)
    cfg = TrainConfig(arch="mnist", loss="matlab", latent_dim=4, conditional=conditional).validate()
    dataset = {"name": "digits", "shape": [28, 28, 1], "classes": [str(i) for i in range(10)],
               "num_classes": 10, "counts": {"train": 100, "test": 10}}
    model = build_model("mnist", (28, 28, 1), 4, 10 if conditional else 0)
    directory = ckpt.save(folder / "checkpoint_epoch_0001", model, None, {"epoch": 1, "global_step": 1},
                          cfg.to_dict(), dataset)
    ckpt.point_latest(folder, directory)
    return folder


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not present at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """512 + 256 synthetic 28x28 digits as a prepared dataset."""
    from vae_ray.data import prepare

    out = tmp_path_factory.mktemp("tiny") / "digits"
    prepare("synthetic", out, limit=512, shards=2)
    return out


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


def write_cifar_batches(root: Path, per_batch: int = 20, seed: int = 0) -> dict:
    """CIFAR-10 python batches in the official format (pickled dicts, byte keys)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        blob = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        (root / name).write_bytes(pickle.dumps(blob, protocol=2))
        written[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return written


@pytest.fixture(autouse=True)
def _no_download(monkeypatch, tmp_path):
    """No test touches the network or the user's cache: downloads go to a
    closed loopback port and the cache is a fresh folder."""
    monkeypatch.setenv("VAE_RAY_DOWNLOAD_BASE", "http://127.0.0.1:9/")
    monkeypatch.setenv("VAE_RAY_CACHE", str(tmp_path / "cache"))
    for var in ("VAE_RAY_MNIST_DIR", "VAE_RAY_FASHION_MNIST_DIR", "VAE_RAY_CIFAR10_DIR"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def assert_one_error_line(result, *words):
    """A CLI result that failed as a user's mistake should: exit 2, one line
    starting with 'error:' that names the problem, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.output
