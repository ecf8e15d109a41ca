import os
import subprocess
import sys

from typer.testing import CliRunner

from vae_ray.cli import app

from conftest import assert_one_error_line, write_fake_idx_dataset

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("data", "train", "demo"):
        assert command in result.output
    assert "--source" in runner.invoke(app, ["data", "prepare", "--help"]).output


def test_prepare_and_show(tmp_path):
    src = write_fake_idx_dataset(tmp_path / "src", n_train=30, n_test=12)
    result = runner.invoke(app, ["data", "prepare", "mnist", "--source", str(src), "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(str(tmp_path / "d"))
    shown = runner.invoke(app, ["data", "show", str(tmp_path / "d"), "--num", "9"])
    assert shown.exit_code == 0, shown.output
    from PIL import Image

    with Image.open(tmp_path / "d" / "preview.png") as im:
        assert im.size[0] > 28 * 3
    assert "total" in shown.output and "30" in shown.output


def test_user_errors_are_one_line_exit_2(tmp_path):
    assert_one_error_line(
        runner.invoke(
            app, ["data", "prepare", "mnist", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
        ),
        "nope",
        "not found",
    )
    assert_one_error_line(
        runner.invoke(app, ["data", "prepare", "mnist", "--source", str(tmp_path), "--out", str(tmp_path / "o")]),
        "missing IDX file",
    )
    assert_one_error_line(
        runner.invoke(app, ["data", "prepare", "pets", "--out", str(tmp_path / "o")]), "unknown dataset 'pets'"
    )
    assert_one_error_line(
        runner.invoke(app, ["data", "prepare", "synthetic", "--limit", "0", "--out", str(tmp_path / "o")]), "--limit"
    )
    assert_one_error_line(runner.invoke(app, ["data", "show", str(tmp_path)]), "not a prepared dataset")
    assert_one_error_line(
        runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--latent-dim", "0"]),
        "--latent-dim",
        "greater than or equal to 1",
    )
    assert_one_error_line(
        runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--lr", "-1"]),
        "lr must be a positive number",
    )
    assert_one_error_line(
        runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r")]), "not a prepared dataset"
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_console_script_and_module_entry_points(tmp_path):
    version = subprocess.run([sys.executable, "-m", "vae_ray", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("vae-ray ")
    exe = __import__("shutil").which("vae-ray") or str(__import__("pathlib").Path(sys.executable).parent / "vae-ray")
    bad = subprocess.run(
        [exe, "data", "prepare", "mnist", "--source", str(tmp_path / "x"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_train_help_shows_every_setting_with_its_default_in_panels():
    from vae_ray.cli.options import flag_of
    from vae_ray.config import fields

    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for f in fields():
        assert flag_of(f.name) in result.output, f.name
    for panel in ("Data", "Model", "Loss", "Optimisation", "Scale", "Tracking", "Cluster"):
        assert f"─ {panel} " in result.output, panel
    assert "[default: 16]" in result.output and "<auto|mnist|hvae|cifar>" in result.output
    assert "by network: 32 mnist, 64 hvae, 128 cifar" in result.output  # what auto means
    assert "vae_ray/trainer.py" in result.output and "Exit status" in result.output  # one hop to the code


def test_print_config_shows_the_resolved_settings_and_writes_nothing(tiny_data, tmp_path):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text("latent-dim: 7\nepochs: 3\n")
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "r"),
            "--config",
            str(config),
            "--epochs",
            "4",
            "--print-config",
        ],
    )
    assert result.exit_code == 0, result.output
    settings = yaml.safe_load(result.stdout)
    assert (settings["latent_dim"], settings["epochs"]) == (7, 4)  # file, then the flags typed
    assert (settings["arch"], settings["batch_size"], settings["lr"]) == ("mnist", 32, 3e-3)  # auto, resolved
    assert not (tmp_path / "r").exists()


def test_the_command_line_loads_neither_ray_nor_torch_for_help():
    probe = "import sys, vae_ray.cli; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_job_errors_are_read_from_their_status_not_from_stray_digits():
    """A refused connection's message names objects by address (0x7f4013...);
    only a status code standing on its own means a token problem."""
    from vae_ray.jobs import _explain

    url = "http://127.0.0.1:40317"
    refused = ConnectionError(
        "HTTPConnectionPool(host='127.0.0.1', port=40317): Max retries exceeded "
        "(Caused by NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f4013a4f403>'))"
    )
    assert _explain(refused, url).startswith("cannot reach a Ray cluster")
    assert "requires a token" in _explain(RuntimeError("Request failed with status code 401: Unauthorized"), url)
    assert "rejected the token" in _explain(RuntimeError("Request failed with status code 403"), url)
    other = _explain(RuntimeError("job vae-ray-train-4031aa failed at 0x7f401"), url)
    assert "token" not in other and "vae-ray-train-4031aa" in other


def test_jobs_go_to_the_given_address_whatever_the_environment_names(monkeypatch):
    """Ray's job client prefers RAY_API_SERVER_ADDRESS to the address it is
    given; `--address` must win. The environment here names a dashboard that
    answers 401; the given address has nothing listening."""
    import http.server
    import threading

    class Refuses(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server interface
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{server.server_port}")
        result = CliRunner().invoke(app, ["jobs", "list", "--address", "http://127.0.0.1:9"])
    finally:
        server.shutdown()
    assert_one_error_line(result, "cannot reach a Ray cluster at http://127.0.0.1:9")
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{server.server_port}"  # put back
