"""What differs across the supported Ray releases (vae_ray/compat.py), and a
job submitted through the Jobs SDK. `make test` runs this module against the
newest release of pyproject.toml's range; `make test-ray-range`
(.ci/ray_range.sh) against the oldest, with the fast tier and a few real
train, tune and generate tests."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vae_ray import compat
from vae_ray.cli import app
from vae_ray.errors import UserError

from conftest import (
    TOKEN,
    LoopbackCluster,
    _free_port,
    _start_node,
    _wait_for_nodes,
    assert_one_error_line,
    assert_process_error_line,
    make_checkpoint,
    stop_nodes,
)

runner = CliRunner()


def test_epochs_get_a_new_block_order_on_every_release():
    seed = compat.block_order_seed(7)
    if compat.has(compat.SEED_CONFIG):
        assert seed.seed == 7 and seed.reseed_after_execution
    else:
        assert seed is None  # an int seed would repeat one order every epoch before 2.55


@pytest.mark.skipif(compat.has(compat.ELASTIC), reason="this Ray release trains elastically")
def test_elastic_training_on_a_release_without_it_is_one_line(tiny_data, tmp_path):
    with pytest.raises(UserError, match=r"needs Ray 2\.55 or later; this is Ray 2\."):
        compat.check_elastic(1)
    compat.check_elastic(0)  # a fixed size is fine on every release
    args = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--workers", "2", "--min-workers", "1"]
    assert_one_error_line(runner.invoke(app, args), "--min-workers", "Ray 2.55")
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def head():
    """A one-node cluster started the way users start one (`ray start --head`,
    its own ports, token authentication on) from this environment: its jobs
    run this environment's `python`."""
    temp = Path(tempfile.mkdtemp(prefix="vrr-"))  # short: Ray's socket paths must fit in 107 bytes
    venv = Path(sys.prefix)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": TOKEN,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "VIRTUAL_ENV"):
        env.pop(name, None)
    port, dash = _free_port(), _free_port()
    cluster = LoopbackCluster(venv, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp, env)
    args = ["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    cluster.nodes.append(
        _start_node(cluster, [*args, f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}"])
    )
    try:
        _wait_for_nodes(cluster, 1)
        yield cluster
    finally:
        stop_nodes(cluster.nodes)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.subprocess
@pytest.mark.skipif(
    compat.ray_release() >= (2, 60),
    reason="on the newest release tests/test_cluster.py submits jobs through the same SDK with a token; "
    "this one runs in `make test-ray-range`",
)
def test_a_job_goes_through_the_jobs_sdk_with_the_token(head, tmp_path):
    """Submitted, followed to its end and listed, with the cluster's token;
    without it, one line."""
    run = make_checkpoint(tmp_path / "run")
    out = tmp_path / "gen"
    done = head.run("generate", str(run), "--num", "12", "--out", str(out), "--submit", "--address", head.dashboard)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "succeeded" in done.stderr and TOKEN not in done.stdout + done.stderr
    assert json.loads((out / "_manifest.json").read_text())["count"] == 12
    listed = head.run("jobs", "list", "--address", head.dashboard)
    assert listed.returncode == 0 and "generate" in listed.stdout, listed.stderr
    without = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    refused = subprocess.run(
        [head.exe(), "jobs", "list", "--address", head.dashboard],
        env={**without, "HOME": str(tmp_path)},  # no ~/.ray/auth_token either
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_process_error_line(refused, "requires a token")
