"""Secrets are never stored or shown; nothing from data reaches the terminal
as control codes; a token crossing a network in clear is said out loud; and
a mistake in --address ends a command before it locks or makes anything."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import re
import select
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from vae_ray import cluster, config
from vae_ray.cli import app
from vae_ray.errors import UserError
from vae_ray.rundir import RunDir
from vae_ray.tracking import RECORD, Tracking

from conftest import assert_one_error_line, make_checkpoint, vae_ray_exe

runner = CliRunner()
USER, PASSWORD = "alice", "pw-Zq81-never-stored"
SECRETS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
HOSTILE = ["\x1b]52;c;cm0gLXJmIH4=\x07", "\x1b[2Jcleared", "bell\x07", "ok"]


@pytest.fixture(autouse=True)
def _credentials_do_not_outlive_a_test(monkeypatch):
    """vae-ray moves credentials from URIs into this process's environment;
    whatever a test puts there is gone after it."""
    for name in SECRETS:
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_USE_TLS", raising=False)


def with_userinfo(url: str, user: str = USER, password: str = PASSWORD) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest}"


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file below root (hidden ones included) whose bytes hold the secret: `grep -r`."""
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


# ---------------------------------------------------------------------------
# A stand-in for a cluster's dashboard: the Jobs API, recording what it is sent
# ---------------------------------------------------------------------------
class FakeDashboard:
    """Answers the few Jobs API calls the CLI makes and keeps every request
    (path, headers, JSON body): what a real head would have received."""

    def __init__(self, host: str = "127.0.0.1", logs: str = ""):
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                entry = {"method": self.command, "path": self.path, "headers": dict(self.headers), "raw": raw}
                owner.requests.append(entry)
                return entry

            def do_GET(self):
                self._record()
                if self.path == "/api/version":
                    self._reply(200, {"version": "4", "ray_version": ray.__version__, "ray_commit": "x"})
                elif self.path == "/api/jobs/":
                    self._reply(200, [])
                elif self.path.startswith("/api/packages/"):
                    self._reply(200, {})  # "already uploaded": the package itself is not what is tested
                elif self.path.endswith("/logs"):
                    self._reply(200, {"logs": logs})
                else:
                    self._reply(404, {"msg": "not here"})

            def do_POST(self):
                entry = self._record()
                if self.path == "/api/jobs/":
                    body = json.loads(entry["raw"])
                    self._reply(200, {"submission_id": body["submission_id"], "job_id": None})
                else:
                    self._reply(404, {"msg": "not here"})

            do_PUT = do_POST

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeDashboard:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def submitted(self) -> dict:
        return next(json.loads(r["raw"]) for r in self.requests if r["method"] == "POST" and r["path"] == "/api/jobs/")


def _outward_ip() -> str | None:
    """This machine's address on a non-loopback interface (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.123", 9))
            ip = sock.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


# ---------------------------------------------------------------------------
# Credentials in URIs
# ---------------------------------------------------------------------------
def test_print_config_shows_the_mlflow_uri_without_its_password(tiny_data, tmp_path, monkeypatch):
    secret_uri = with_userinfo("https://mlflow.example.org:5000/root")
    base = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--print-config"]
    for args, env in (
        ([*base, "--mlflow", secret_uri], {}),
        (base, {"MLFLOW_TRACKING_URI": secret_uri}),
        # Refused (a token in the query has no place to go but the URI): the line names neither.
        (
            [
                "tune",
                "--data",
                str(tiny_data),
                "--out",
                str(tmp_path / "s"),
                "--mlflow",
                secret_uri + "?token=" + PASSWORD,
            ],
            {},
        ),
    ):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        shown = runner.invoke(app, args)
        assert PASSWORD not in shown.output, shown.output
        if "--print-config" in args:
            assert shown.exit_code == 0, shown.output
            assert "mlflow: https://mlflow.example.org:5000/root" in shown.output
            # The secret moved to where MLflow reads it.
            assert os.environ["MLFLOW_TRACKING_USERNAME"] == USER
            assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
        else:
            assert_one_error_line(shown, "MLFLOW_TRACKING_TOKEN")
        for name in env:
            monkeypatch.delenv(name)
    assert sorted(tmp_path.iterdir()) == []


def test_a_config_never_holds_a_secret_and_refuses_one_it_cannot_move():
    cfg = config.TrainConfig(mlflow=with_userinfo("http://127.0.0.1:5000", "u", "p%40ss")).validate()
    assert cfg.mlflow == "http://127.0.0.1:5000" and "p@ss" not in json.dumps(cfg.to_dict())
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"  # percent-decoded, as the user meant it
    for bad, words in [
        ({"mlflow": "https://mlflow.example.org/?token=tok-Secret-1"}, ("MLFLOW_TRACKING_TOKEN",)),
        ({"mlflow": "postgresql://u:db-Secret-1@db.example.org/mlflow"}, ("password",)),
        ({"data": "s3://AKIAEXAMPLE:aws-Secret-1@bucket/data"}, ("AWS_",)),
        ({"out": "s3://bucket/run?X-Amz-Signature=sig-Secret-1"}, ("X-Amz-Signature",)),
    ]:
        with pytest.raises(UserError) as caught:
            config.TrainConfig.from_dict({"data": "d", **bad})
        assert "Secret-1" not in str(caught.value) and "\n" not in str(caught.value)
        for word in words:
            assert word in str(caught.value), str(caught.value)


def test_every_command_refuses_credentials_in_a_storage_uri(tmp_path, tiny_data):
    run = make_checkpoint(tmp_path / "run")
    leaked = "s3://AKIAEXAMPLE:aws-Secret-2@vae-ray-test/x"
    for args in (
        ["train", "--data", leaked, "--out", str(tmp_path / "r"), "--print-config"],
        ["train", "--data", str(tiny_data), "--out", leaked, "--print-config"],
        ["generate", str(run), "--num", "4", "--out", leaked],
        ["generate", leaked, "--num", "4", "--out", str(tmp_path / "set")],
        ["data", "show", leaked],
        ["report", str(run), "--out", leaked],
        ["evaluate", leaked],
    ):
        result = runner.invoke(app, args)
        assert_one_error_line(result, "credentials")
        assert "aws-Secret-2" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_submitted_job_carries_credentials_in_its_environment_never_its_entrypoint(tiny_data, tmp_path):
    with FakeDashboard() as head:
        result = runner.invoke(
            app,
            [
                "train",
                "--data",
                str(tiny_data),
                "--out",
                "s3://vae-ray-test/secret-run",
                "--mlflow",
                with_userinfo("https://mlflow.example.org"),
                "--submit",
                "--no-wait",
                "--address",
                f"http://127.0.0.1:{head.port}",
            ],
        )
        assert result.exit_code == 0, result.output
        job = head.submitted()
    assert PASSWORD not in job["entrypoint"] and PASSWORD not in json.dumps(job.get("metadata"))
    assert "https://mlflow.example.org" in job["entrypoint"]
    # As Ray users pass secrets to a job: in its runtime environment.
    assert job["runtime_env"]["env_vars"]["MLFLOW_TRACKING_USERNAME"] == USER
    assert job["runtime_env"]["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    assert PASSWORD not in result.output


def test_a_job_spec_with_a_secret_it_cannot_move_is_never_sent(tmp_path):
    run = make_checkpoint(tmp_path / "run")
    with FakeDashboard() as head:
        result = runner.invoke(
            app,
            [
                "generate",
                str(run),
                "--out",
                "s3://AKIAEXAMPLE:aws-Secret-3@vae-ray-test/set",
                "--submit",
                "--address",
                f"http://127.0.0.1:{head.port}",
            ],
        )
        assert_one_error_line(result, "credentials")
        assert "aws-Secret-3" not in result.output
        assert not [r for r in head.requests if r["method"] == "POST"]


def test_job_logs_never_show_the_mlflow_password(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    with FakeDashboard(logs=f"connecting to https://{USER}:{PASSWORD}@mlflow.example.org\nepoch 1\n") as head:
        result = runner.invoke(app, ["jobs", "logs", "vae-ray-train-1", "--address", f"http://127.0.0.1:{head.port}"])
    assert result.exit_code == 0, result.output
    assert "epoch 1" in result.output and PASSWORD not in result.output


def test_tracking_record_and_error_line_hold_no_password(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    run = RunDir(str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    cfg = config.TrainConfig(data="d").validate()
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(UserError) as caught:
        Tracking(with_userinfo(dead)).start(cfg, run)
    assert str(caught.value).startswith(f"MLflow at {dead}:") and PASSWORD not in str(caught.value)
    assert not (tmp_path / "run" / RECORD).exists()


class RecordingProxy:
    """Forwards every request to an MLflow server and keeps who sent what:
    the Authorization header, and whether it logged per-epoch metrics (which
    only rank 0, in a Ray Train worker, does)."""

    def __init__(self, upstream: str):
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                metrics = False
                if body and self.path.endswith("/runs/log-batch"):
                    metrics = bool(json.loads(body).get("metrics"))
                owner.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "metrics": metrics}
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(upstream + self.path, data=body, headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        code, data, kind = response.status, response.read(), response.headers.get("Content-Type")
                except urllib.error.HTTPError as exc:
                    code, data, kind = exc.code, exc.read(), exc.headers.get("Content-Type")
                self.send_response(code)
                self.send_header("Content-Type", kind or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_real_run_keeps_its_password_out_of_every_artefact(tiny_data, mlflow_server, tmp_path):
    """One short run as a user starts it (its own private cluster), logged to a
    real MLflow server through a proxy that notes each request's credentials,
    then its samples and report: grep them all for the password."""
    from mlflow.tracking import MlflowClient

    run, samples, report = tmp_path / "run", tmp_path / "set", tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with RecordingProxy(mlflow_server) as proxy:
        done = subprocess.run(
            [
                vae_ray_exe(),
                "train",
                "--data",
                str(tiny_data),
                "--out",
                str(run),
                "--epochs",
                "1",
                "--latent-dim",
                "2",
                "--batch-size",
                "128",
                "--mlflow",
                with_userinfo(proxy.url),
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    # Every request carried the credentials, from the environment: the
    # driver's, and rank 0's per-epoch metrics from a Ray Train worker.
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert proxy.requests and {r["auth"] for r in proxy.requests} == {basic}
    assert any(r["metrics"] for r in proxy.requests)
    generated = runner.invoke(app, ["generate", str(run), "--num", "8", "--out", str(samples)])
    assert generated.exit_code == 0, generated.output
    reported = runner.invoke(app, ["report", str(run), "--out", str(report)])
    assert reported.exit_code == 0, reported.output
    assert PASSWORD not in done.stdout + done.stderr + generated.output + reported.output
    for root in (run, samples, report):
        assert files_holding(root, PASSWORD) == []
    assert json.loads((run / RECORD).read_text())["mlflow_uri"] == proxy.url
    assert json.loads((run / "config.json").read_text())["config"]["mlflow"] == proxy.url
    logged = MlflowClient(mlflow_server).get_run(summary["mlflow_run_id"])
    assert logged.data.params["mlflow"] == proxy.url and logged.data.metrics
    assert PASSWORD not in json.dumps({"params": logged.data.params, "tags": logged.data.tags})


# ---------------------------------------------------------------------------
# The terminal sees text, never control codes
# ---------------------------------------------------------------------------
def _hostile_dataset(root: Path) -> Path:
    assert runner.invoke(app, ["data", "prepare", "synthetic", "--limit", "40", "--out", str(root)]).exit_code == 0
    meta = json.loads((root / "dataset.json").read_text())
    rename = dict(zip(meta["classes"], HOSTILE + meta["classes"][len(HOSTILE) :], strict=True))
    meta["classes"] = [rename[c] for c in meta["classes"]]
    meta["name"] = "digits\x1b[2J\x1b]0;title\x07"
    for split in meta["splits"].values():
        split["class_counts"] = {rename.get(k, k): v for k, v in split["class_counts"].items()}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _no_control_bytes(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text, repr(text)


def test_class_names_and_paths_reach_the_terminal_as_text(tmp_path):
    data = _hostile_dataset(tmp_path / "d")
    shown = runner.invoke(app, ["data", "show", str(data)])
    assert shown.exit_code == 0, shown.output
    _no_control_bytes(shown.output)
    assert "\\x1b]52;c;cm0gLXJmIH4=\\x07" in shown.output  # shown, as an escape
    # An error line naming a path from the user...
    existing = tmp_path / "x\x1b[2J\x07.png"
    existing.write_bytes(b"not ours")
    failed = runner.invoke(app, ["data", "show", str(data), "--out", str(existing)])
    assert_one_error_line(failed, "exists")
    _no_control_bytes(failed.output)
    # ... and one naming a lock's holder, read from a file someone else wrote.
    run = make_checkpoint(tmp_path / "run")
    lock = tmp_path / ".set.lock"
    lock.write_text(json.dumps({"command": "vae-ray \x1b[2J", "pid": 1, "host": "\x1b]52;c;aGk=\x07h"}))
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = runner.invoke(app, ["generate", str(run), "--num", "4", "--out", str(tmp_path / "set")])
    assert_one_error_line(busy, "in use by")
    _no_control_bytes(busy.output)


def test_a_real_terminal_gets_no_control_codes_from_data(tmp_path):
    """The command in a pseudo-terminal, as a person runs it: Rich's own
    colours (SGR) aside, no escape sequence and no bell comes through, on
    stderr (the table) or stdout (the path it prints)."""
    data = _hostile_dataset(tmp_path / "d")
    preview = tmp_path / "p\x1b]52;c;aGk=\x07.png"
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [vae_ray_exe(), "data", "show", str(data), "--out", str(preview)],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "COLUMNS": "200"},
    )
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # the child closed its side
            chunk = b""
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode(errors="replace"))
    _no_control_bytes(text)
    assert "\\x1b]52;c;aGk=\\x07.png" in text and preview.is_file()


# ---------------------------------------------------------------------------
# A token sent in clear
# ---------------------------------------------------------------------------
def test_a_token_in_clear_to_another_host_is_named_on_stderr(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-0123456789")
    outward = _outward_ip()
    if outward is None:
        pytest.skip("this machine has no non-loopback address to send to")
    with FakeDashboard(host="0.0.0.0") as head:
        far = runner.invoke(app, ["jobs", "list", "--address", f"http://{outward}:{head.port}"])
        near = runner.invoke(app, ["jobs", "list", "--address", f"http://127.0.0.1:{head.port}"])
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        tokenless = runner.invoke(app, ["jobs", "list", "--address", f"http://{outward}:{head.port}"])
    assert far.exit_code == 0 and near.exit_code == 0 and tokenless.exit_code == 0, far.output + near.output
    warnings = [line for line in far.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and outward in warnings[0] and "http" in warnings[0], far.stderr
    assert "tok-0123456789" not in far.output
    assert "warning" not in near.stderr and "warning" not in tokenless.stderr
    sent = [r["headers"].get("Authorization") for r in head.requests]
    assert "Bearer tok-0123456789" in sent  # warned, not refused: private clusters run plain http


def test_which_addresses_send_a_token_in_clear(monkeypatch):
    cases = {
        "http://10.0.0.5:8265": "10.0.0.5",
        "http://head.internal:8265": "head.internal",
        "10.0.0.5:6379": "10.0.0.5",
        "ray://10.0.0.5:10001": "10.0.0.5",
        "https://10.0.0.5:8265": None,
        "http://127.0.0.1:8265": None,
        "http://localhost:8265": None,
        "http://[::1]:8265": None,
        "127.0.0.2:6379": None,
        "auto": None,
        "local": None,
    }
    for address, host in cases.items():
        assert cluster.token_in_clear(address) == host, address
    monkeypatch.setenv("RAY_USE_TLS", "1")
    assert cluster.token_in_clear("10.0.0.5:6379") is None
    assert cluster.token_in_clear("http://10.0.0.5:8265") == "10.0.0.5"  # TLS is gRPC's; the dashboard is http


# ---------------------------------------------------------------------------
# Checks that touch nothing come first
# ---------------------------------------------------------------------------
COMMANDS = {
    "train": lambda data, out, run: ["train", "--data", data, "--out", out],
    "tune": lambda data, out, run: ["tune", "--data", data, "--out", out],
    "generate": lambda data, out, run: ["generate", run, "--num", "4", "--out", out],
    "evaluate": lambda data, out, run: ["evaluate", run, "--data", data],
    "study latent-dims": lambda data, out, run: ["study", "latent-dims", "--data", data, "--out", out],
    "study loss-weights": lambda data, out, run: ["study", "loss-weights", "--data", data, "--out", out],
}
BAD_ADDRESSES = {
    "http://127.0.0.1:8265": "is a dashboard (Jobs API) address",
    "head-without-port": "not a Ray cluster address",
    "10.0.0.5:port": "not a Ray cluster address",
    "10.0.0.5:70000": "not a Ray cluster address",
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_address_or_token_leaves_nothing_behind(command, tiny_data, tmp_path, monkeypatch):
    run = make_checkpoint(tmp_path / "run")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = tmp_path / "new" / "out"
    args = COMMANDS[command](str(tiny_data), str(out), str(run))
    for address, words in BAD_ADDRESSES.items():
        assert_one_error_line(runner.invoke(app, [*args, "--address", address]), address, words)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # the same from the environment
    assert_one_error_line(runner.invoke(app, args), "RAY_ADDRESS", "is a dashboard (Jobs API) address")
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token-here"))
    assert_one_error_line(runner.invoke(app, [*args, "--address", "10.0.0.5:6379"]), "RAY_AUTH_TOKEN_PATH")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no folder, no lock file
