"""Weights & Biases tracking and the Optuna search, each checked with the
library its users read it with: the offline W&B runs through wandb's own
reader of its transaction logs (`wandb leet inspect --json`), the search
through Ray Tune's OptunaSearch and the files it leaves."""

import csv
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vae_ray.cli import app
from vae_ray.config import TrainConfig
from vae_ray.rundir import RunDir
from vae_ray.tracking import RECORD, Tracking, wandb_target
from vae_ray.tune import SearchSpec

from conftest import assert_one_error_line

runner = CliRunner()
PROJECT = "vae-ray-test"
API_KEY = secrets.token_hex(20)  # a W&B key's shape: 40 characters
TYPED_PASSWORD = "typed-" + secrets.token_hex(8)  # a password on the command line


def offline_wandb(monkeypatch, root: Path) -> Path:
    """W&B as on a node without internet, everything it writes under `root`."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root),
        "WANDB_API_KEY": API_KEY,
        "WANDB_DATA_DIR": str(root / "data"),  # offline artifacts are staged here
        "WANDB_CACHE_DIR": str(root / "cache"),
        "WANDB_CONFIG_DIR": str(root / "config"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    return root


def read_wandb_run(folder: Path) -> list[dict]:
    """The records of one offline run folder, as wandb's own reader prints them."""
    exe = Path(sys.executable).parent / "wandb"
    done = subprocess.run(
        [str(exe), "leet", "inspect", "--json", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def wandb_sessions(root: Path, run_id: str) -> list[list[dict]]:
    """Every offline folder of W&B run `run_id` (one per process that wrote
    it), in the order `wandb sync` uploads them: by start time."""
    folders = list((root / "wandb").glob(f"offline-run-*-{run_id}*"))
    sessions = [read_wandb_run(folder) for folder in folders]
    return sorted(sessions, key=lambda records: first(records, "run")["start_time"])


def first(records: list[dict], kind: str) -> dict:
    return next(r[kind] for r in records if r["type"] == kind)


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def history(sessions: list[list[dict]]) -> dict[int, dict]:
    """step -> the values logged at it, over all of a run's sessions."""
    return {int(h["step"]["num"]): h["item"] for records in sessions for h in of_type(records, "history")}


def metrics_jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_history_is_metrics_jsonl(sessions: list[list[dict]], run: Path) -> None:
    logged, expected = history(sessions), metrics_jsonl(run)
    assert sorted(logged) == [m["epoch"] for m in expected]
    for m in expected:
        for key in ("train_loss", "test_matlab_elbo", "test_neg_elbo_nats", "lr", "workers"):
            assert logged[m["epoch"]][key] == m[key], (key, m["epoch"])
        assert logged[m["epoch"]]["samples._type"] == "image-file"  # the pictures too, at the same step


def files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


# ---------------------------------------------------------------------------
# W&B: a run, resumed, read back
# ---------------------------------------------------------------------------
def test_a_run_is_one_wandb_run_read_back_with_wandbs_reader(ray_cluster, tiny_data, tmp_path, monkeypatch):
    """`--wandb` in offline mode: one W&B run (its id in RUN/tracking.json)
    whose config is the run's settings, whose history per epoch is
    RUN/metrics.jsonl, with the final checkpoint and pictures; W&B's key and
    a password typed on the command line are in no file vae-ray or W&B wrote.
    (A resumed run continuing it: the next test.)"""
    root = offline_wandb(monkeypatch, tmp_path / "wb")
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--mlflow", f"https://user:{TYPED_PASSWORD}@mlflow.example.org"])
    run = tmp_path / "run"
    args = ["--epochs", "2", "--latent-dim", "2", "--batch-size", "128", "--seed", "5", "--wandb", PROJECT]
    result = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(run), *args])
    assert result.exit_code == 0, result.output
    record = json.loads((run / RECORD).read_text())
    run_id = record["wandb_run_id"]
    assert record == {"wandb_project": PROJECT, "wandb_entity": "", "wandb_run_id": run_id}

    # The driver opens it, rank 0 logs the epochs, the driver adds the results.
    sessions = wandb_sessions(root, run_id)
    assert len(sessions) == 3
    opened = first(sessions[0], "run")
    assert opened["project"] == PROJECT and opened["display_name"] == "run" and "run_group" not in opened
    config = opened["config"]["update"]
    assert config["latent_dim"] == 2 and config["seed"] == 5 and config["run_folder"] == str(run)
    assert config["wandb"] == PROJECT and config["lr_schedule"] == "onecycle"
    assert_history_is_metrics_jsonl(sessions, run)
    assert first(sessions[1], "exit")["exit_code"] == 0  # rank 0 closed its part
    summary = {k: v for s in of_type(sessions[2], "summary") for k, v in s["update"].items()}
    for picture in ("plots/loss_curves", "plots/reconstructions", "plots/samples"):
        assert summary[picture]["_type"] == "image-file", picture
    assert summary["samples"]["_type"] == "images/separated" and summary["samples"]["count"] == 64
    (artifact,) = of_type(sessions[2], "artifact")
    assert artifact["name"] == f"model-{run_id}" and artifact["type"] == "model"
    assert {f["path"] for f in artifact["manifest"]["contents"]} >= {"model.safetensors", "config.json"}
    assert first(sessions[2], "exit")["exit_code"] == 0
    assert not list(run.glob("wandb*"))  # W&B's files stay in WANDB_DIR
    for folder in (run, root):
        assert files_holding(folder, API_KEY) == [] and files_holding(folder, TYPED_PASSWORD) == []


def test_a_resume_continues_the_recorded_wandb_run_only_when_it_is_ours(tmp_path, monkeypatch):
    """RUN/tracking.json continues the W&B run it names only when it names one
    as vae-ray makes them, in the same project; anything else starts a new one."""
    root = offline_wandb(monkeypatch, tmp_path / "wb")
    cfg = TrainConfig(data="d", wandb=PROJECT).validate()
    (tmp_path / "run").mkdir()
    run = RunDir(str(tmp_path / "run"))

    def start(record) -> str:
        (tmp_path / "run" / RECORD).write_text(json.dumps(record))
        tracking = Tracking(wandb=wandb_target(cfg.wandb))
        info = tracking.start(cfg, run)
        assert info["wandb_run_id"] == json.loads((tmp_path / "run" / RECORD).read_text())["wandb_run_id"]
        return info["wandb_run_id"]

    kept = start({"wandb_project": PROJECT, "wandb_entity": "", "wandb_run_id": "abcd1234"})
    assert kept == "abcd1234"
    for hostile in (
        {"wandb_project": PROJECT, "wandb_entity": "", "wandb_run_id": "../../../etc"},
        {"wandb_project": PROJECT, "wandb_entity": "", "wandb_run_id": ["abcd1234"]},
        {"wandb_project": "another", "wandb_entity": "", "wandb_run_id": "abcd1234"},
        ["not", "a", "record"],
    ):
        new = start(hostile)
        assert new != "abcd1234" and len(new) == 8 and new.isalnum(), hostile
    assert len(list((root / "wandb").glob("offline-run-*"))) == 5


# ---------------------------------------------------------------------------
# Mistakes and missing packages: one line, nothing written
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [
        ["train", "--wandb", PROJECT],
        ["tune", "--wandb", PROJECT, "--latent-dims", "2"],
    ],
)
def test_wandb_without_the_package_is_one_line(command, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "out"
    result = runner.invoke(app, [command[0], "--data", str(tiny_data), "--out", str(out), *command[1:]])
    assert_one_error_line(result, "pip install 'vae-ray[wandb]'")
    assert not out.exists()


def test_wandb_project_from_the_environment_without_the_package_is_one_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("WANDB_PROJECT", PROJECT)
    result = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run")])
    assert_one_error_line(result, "pip install 'vae-ray[wandb]'")
    assert not (tmp_path / "run").exists()


def test_optuna_without_the_package_is_one_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    out = tmp_path / "s"
    result = runner.invoke(
        app, ["tune", "--data", str(tiny_data), "--out", str(out), "--search", "optuna", "--latent-dims", "2,4"]
    )
    assert_one_error_line(result, "pip install 'vae-ray[optuna]'")
    assert not out.exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--search", "bayes"], "--search must be one of grid, random, optuna"),
        (["--search", "grid", "--lr-min", "1e-4", "--lr-max", "1e-2"], "--search grid takes a grid"),
        (["--search", "random", "--lrs", "1e-3,1e-2"], "--search random draws learning rates"),
        (["--wandb", "team/project"], "WANDB_ENTITY"),
        (["--wandb", "a\x1b[2Jb"], "W&B project names"),
        (["--wandb", "x" * 129], "at most 128 characters"),
    ],
)
def test_search_and_wandb_mistakes_exit_2(tiny_data, tmp_path, args, words):
    out = tmp_path / "s"
    result = runner.invoke(app, ["tune", "--data", str(tiny_data), "--out", str(out), *args])
    assert_one_error_line(result, words)
    assert "\x1b" not in result.output and not out.exists()


def test_a_bad_wandb_project_for_train_is_one_line(tiny_data, tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--wandb", "a:b"])
    assert_one_error_line(result, "W&B project names")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------
# Optuna
# ---------------------------------------------------------------------------
def test_optuna_is_seeded_and_searches_the_same_space():
    """OptunaSearch as the search builds it: the same seed suggests the same
    trials, another seed others, and every suggestion lies in the space
    (categorical lists, a log-uniform learning rate)."""
    spec = SearchSpec(latent_dims=[2, 4, 8], lr_range=(1e-4, 1e-2), betas=[0.5, 1.0], num_samples=4, strategy="optuna")

    def suggestions(seed: int) -> list[dict]:
        searcher = spec.searcher(seed)
        searcher.set_search_properties("test_matlab_elbo", "min", spec.param_space())
        return [searcher.suggest(f"t{i}") for i in range(4)]

    first_draw = suggestions(3)
    assert first_draw == suggestions(3) and first_draw != suggestions(4)
    for config in first_draw:
        assert config["latent_dim"] in (2, 4, 8) and config["beta"] in (0.5, 1.0) and 1e-4 <= config["lr"] <= 1e-2
    assert spec.trial_count() == 4  # trials, not a grid times samples
    assert SearchSpec(latent_dims=[2], lr_range=(1e-4, 1e-2)).strategy == "random"
    assert SearchSpec(latent_dims=[2], lrs=[1e-3]).strategy == "grid"


@pytest.fixture(scope="module")
def optuna_search(ray_cluster, tiny_data, tmp_path_factory):
    """Two one-epoch trials chosen by Optuna, two at a time, logged to W&B offline."""
    tmp = tmp_path_factory.mktemp("optuna")
    out = tmp / "s"
    with pytest.MonkeyPatch.context() as monkeypatch:
        root = offline_wandb(monkeypatch, tmp / "wb")
        result = runner.invoke(app, [*optuna_command(tiny_data, out), "--wandb", PROJECT])
    assert result.exit_code == 0, result.output
    return out, root


def optuna_command(tiny_data, out) -> list[str]:
    return [
        "tune",
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--search",
        "optuna",
        "--num-samples",
        "2",
        "--latent-dims",
        "2,4",
        "--lr-min",
        "1e-3",
        "--lr-max",
        "1e-2",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--max-concurrent",
        "2",
        "--seed",
        "3",
    ]


def test_an_optuna_search_runs_its_trials(optuna_search):
    out, _ = optuna_search
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and {r["status"] for r in table} == {"completed"}
    for row in table:
        assert row["latent_dim"] in ("2", "4") and 1e-3 <= float(row["lr"]) <= 1e-2
        assert float(row["final_test_matlab_elbo"]) > 0
    saved = json.loads((out / "search.json").read_text())
    assert saved["search"]["strategy"] == "optuna" and saved["status"] == "complete"
    # Optuna's state is among Tune's, under the seal that --resume checks.
    searcher_state = list((out / "tune").glob("searcher-state-*.pkl"))
    assert searcher_state
    sealed = json.loads((out / "tune.seal.json").read_text())["files"]
    assert {p.name for p in searcher_state} <= set(sealed)


def test_a_search_is_a_wandb_group_with_a_run_per_trial(optuna_search):
    out, root = optuna_search
    group = json.loads((out / RECORD).read_text())["wandb_group"]
    assert group.startswith("s-")
    trials = sorted(p for p in (out / "trials").iterdir() if p.is_dir())
    assert len(trials) == 2
    for trial in trials:
        run_id = json.loads((trial / RECORD).read_text())["wandb_run_id"]
        # The trial opens the run and closes its session before training; its training loop (rank 0)
        # then logs the epochs, but Tune ends a trial's processes within seconds of its last report,
        # which can cut that last W&B write short (README: W&B), so only the first session is read
        # here. A train run's per-epoch history is checked against metrics.jsonl above. A third
        # session is there only when a trial failed and closed its run as failed.
        folders = sorted((root / "wandb").glob(f"offline-run-*-{run_id}*"))
        assert 2 <= len(folders) <= 3
        opened = next(first(records, "run") for records in (read_wandb_run(f) for f in folders[:1]))
        assert opened["run_group"] == group and opened["display_name"] == trial.name
        assert opened["job_type"] == "trial" and opened["config"]["update"]["latent_dim"] in (2, 4)


def test_an_optuna_search_resumes_as_it_was_started(optuna_search, tiny_data, monkeypatch):
    """`--resume` continues the saved strategy with Tune's saved (sealed)
    state, running no finished trial again; the same command again is
    complete; another strategy in the same folder is another search."""
    out, root = optuna_search
    offline_wandb(monkeypatch, root)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*/metrics.jsonl")}
    resumed = runner.invoke(app, ["tune", "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*/metrics.jsonl")} == stamps
    with open(out / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2
    again = runner.invoke(app, [*optuna_command(tiny_data, out), "--wandb", PROJECT])
    assert again.exit_code == 0 and "already holds this search" in again.output, again.output
    other = runner.invoke(app, [*optuna_command(tiny_data, out), "--wandb", PROJECT, "--search", "random"])
    assert_one_error_line(other, "already holds a search")


def test_a_changed_optuna_state_is_never_loaded(optuna_search, tmp_path):
    """The searcher's pickle is Tune state like the rest: changed after the
    seal, --resume refuses it in one line and loads nothing."""
    out, _ = optuna_search
    copy = tmp_path / "s"
    shutil.copytree(out, copy, symlinks=True)
    (state,) = sorted((copy / "tune").glob("searcher-state-*.pkl"))[-1:]
    state.write_bytes(state.read_bytes() + b"\n")
    result = runner.invoke(app, ["tune", "--out", str(copy), "--resume"])
    assert_one_error_line(result, state.name, "changed since vae-ray sealed it")
    assert os.path.exists(copy / "search.json")
