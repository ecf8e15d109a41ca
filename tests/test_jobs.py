"""Jobs on a real Ray head started on loopback (`ray start --head`) with
token authentication on: submit, list, status, logs, stop, and the errors."""

import json
import os
import secrets
import signal
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import _free_port
from vae_ray.cli import app

runner = CliRunner()
TOKEN = secrets.token_hex(16)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A one-node cluster with its dashboard on 127.0.0.1 and token auth."""
    ray_exe = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    port, dash = _free_port(), _free_port()
    # The head runs jobs with this environment's Python, as a user's `ray start` from their venv would.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    temp = tmp_path_factory.mktemp("rayhead")
    # --block keeps the head in the foreground, in its own process group, so
    # teardown stops this head only (`ray stop` would stop every Ray process
    # on the machine, the suite's own cluster included).
    proc = subprocess.Popen(
        [ray_exe, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=3",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp}", "--disable-usage-stats",
         # Every port of its own: the suite's local cluster already holds Ray's
         # defaults (the dashboard agent's 52365 among them), and a head whose
         # agent cannot bind accepts no jobs.
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # the dashboard answers (401 without a token): it is up
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the Ray head did not start"
            time.sleep(1)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of this head is still running (its own group only)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _wait_for(url: str, job_id: str, states: tuple, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = runner.invoke(app, ["jobs", "status", job_id, "--address", url])
        assert result.exit_code == 0, result.output
        status = result.stdout.strip()
        if status in states:
            return status
        time.sleep(1)
    raise AssertionError(f"{job_id} never reached {states}")


def test_submitted_training_succeeds_and_the_jobs_commands_show_it(head, token, tiny_data, tmp_path):
    run = tmp_path / "remote-run"
    result = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(run), "--epochs", "1",
                                 "--batch-size", "64", "--latent-dim", "2", "--submit", "--wait",
                                 "--address", head])
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    summary = json.loads([ln for ln in result.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["epochs"] == 1 and (run / "latest" / "model.pt").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    listed = runner.invoke(app, ["jobs", "list", "--address", head])
    assert listed.exit_code == 0, listed.output
    rows = dict(line.split() for line in listed.stdout.splitlines())
    job_id = next(j for j in rows if j.startswith("vae-ray-train"))
    assert rows[job_id] == "SUCCEEDED"
    status = runner.invoke(app, ["jobs", "status", job_id, "--address", head])
    assert status.exit_code == 0 and status.stdout.strip() == "SUCCEEDED"
    logs = runner.invoke(app, ["jobs", "logs", job_id, "--address", head])
    assert logs.exit_code == 0 and '"epochs": 1' in logs.stdout


def test_a_job_can_be_stopped(head, token, tiny_data, tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "long"),
                                 "--epochs", "200", "--batch-size", "64", "--submit", "--address", head])
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip().splitlines()[-1]
    assert job_id.startswith("vae-ray-train-")
    _wait_for(head, job_id, ("RUNNING",))
    stopped = runner.invoke(app, ["jobs", "stop", job_id, "--address", head])
    assert stopped.exit_code == 0, stopped.output
    assert stopped.stdout.strip() == "STOPPED"


def test_a_failed_job_exits_non_zero(head, token, tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "r"),
                                 "--submit", "--wait", "--address", head])
    assert result.exit_code == 1, result.output
    assert "failed" in result.output and "no-such-data" in result.output


def test_bad_address_and_bad_token_are_one_line(head, token, monkeypatch, tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    result = runner.invoke(app, ["jobs", "list", "--address", dead])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "cannot reach" in result.output and "Traceback" not in result.output
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    result = runner.invoke(app, ["jobs", "list", "--address", head])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "token" in result.output and "not-the-token" not in result.output
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    result = runner.invoke(app, ["jobs", "status", "vae-ray-train-nonexistent", "--address", head])
    assert result.exit_code == 2 and "vae-ray-train-nonexistent" in result.output, result.output
