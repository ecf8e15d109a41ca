"""Ray Tune searches on the shared local cluster: one-worker trials trained in
their trial actors, several-worker trials by a real TorchTrainer each."""

import csv
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vae_ray import checkpoint as ckpt
from vae_ray.cli import app
from vae_ray.config import TrainConfig
from vae_ray.errors import UserError
from vae_ray.trials import GPU_RESOURCE_ENV
from vae_ray.tune import TRIAL_DRIVER_MEMORY, SearchSpec, search

from conftest import REHEARSAL_GPU, vae_ray_exe

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def finished_search(ray_cluster, tiny_data, tmp_path_factory, mlflow_server):
    """Four trials, two at a time: two good learning rates first, then two
    hopeless ones that ASHA should stop after the grace period. Logged to a
    real MLflow server: one parent run, a child run per trial. Scheduled as on
    a GPU box: each trial asks for half of the cluster's one rehearsal GPU."""
    out = tmp_path_factory.mktemp("search") / "s"
    base = TrainConfig(
        data=str(tiny_data), out=str(out), epochs=2, batch_size=64, seed=0, mlflow=mlflow_server
    ).validate()
    spec = SearchSpec(latent_dims=[2, 4], lrs=[3e-3, 1e-7])
    os.environ[GPU_RESOURCE_ENV] = REHEARSAL_GPU
    try:
        rows = search(base, spec, out, grace_period=1, gpus_per_trial=0.5, show=False)
    finally:
        os.environ.pop(GPU_RESOURCE_ENV, None)
    return out, rows


def test_grid_runs_to_completion_with_early_stopping(ray_cluster, finished_search):
    import ray

    out, rows = finished_search
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4 and {(r["latent_dim"], r["lr"]) for r in table} == {
        ("2", "0.003"),
        ("4", "0.003"),
        ("2", "1e-07"),
        ("4", "1e-07"),
    }
    statuses = [r["status"] for r in rows]
    assert "stopped early" in statuses and "error" not in statuses
    assert rows[0]["lr"] == 3e-3  # sorted by the metric: a good learning rate wins
    best = ckpt.load(out / "best")
    assert best.config.latent_dim == rows[0]["latent_dim"] and best.state["epoch"] == rows[0]["epochs"]
    assert (out / "curves.png").stat().st_size > 5000
    for row in rows:  # each trial is a full run folder, as `vae-ray train` leaves
        assert os.path.isdir(row["checkpoint"]) and (Path(ckpt.resolve(row["checkpoint"])) / "config.json").is_file()
    # Each one-worker trial trained in its own trial actor (no Train worker's
    # placement group), which asked for half a GPU (here the rehearsal
    # resource) and one CPU, and trained on that CPU.
    shares = [
        b for pg in ray.util.placement_group_table().values() for b in pg["bundles"].values() if REHEARSAL_GPU in b
    ]
    trial_actor = {"CPU": 1.0, REHEARSAL_GPU: 0.5, "memory": float(TRIAL_DRIVER_MEMORY)}
    assert len(shares) >= 4 and all(b == trial_actor for b in shares), shares
    assert all(ckpt.load(r["checkpoint"]).config.gpu is False for r in rows)
    # Stopped trials gave their workers and GPU shares back.
    deadline = time.time() + 30
    total = {k: ray.cluster_resources()[k] for k in ("CPU", REHEARSAL_GPU)}
    while {k: ray.available_resources().get(k, 0) for k in total} != total and time.time() < deadline:
        time.sleep(0.5)
    assert {k: ray.available_resources().get(k, 0) for k in total} == total == {"CPU": 4, REHEARSAL_GPU: 1}


def test_a_search_is_one_mlflow_parent_run_with_a_child_per_trial(finished_search, mlflow_server):
    from mlflow.tracking import MlflowClient

    out, rows = finished_search
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("vae-ray").experiment_id])
    parents = [r for r in runs if r.data.tags.get("vae_ray.run") == str(out)]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted(r["trial_id"] for r in rows)
    assert all(client.get_metric_history(r.info.run_id, "test_matlab_elbo") for r in children)
    # A trial that ran all its epochs ends on its own, its run finished with its checkpoint; none failed.
    status = {r.data.tags["mlflow.runName"]: r for r in children}
    for row in rows:
        child = status[row["trial_id"]]
        if row["status"] == "completed":
            assert child.info.status == "FINISHED"
            assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["checkpoint"]
        assert child.info.status != "FAILED"


def test_resume_reruns_no_finished_trial(ray_cluster, tiny_data, finished_search):
    out, rows = finished_search
    stamps = {r["trial_id"]: os.stat(out / "trials" / r["trial_id"] / "metrics.jsonl").st_mtime_ns for r in rows}
    base = TrainConfig(data=str(tiny_data), out=str(out), epochs=3, batch_size=64, seed=0).validate()
    again = search(base, SearchSpec(latent_dims=[2, 4], lrs=[3e-3, 1e-7]), out, resume=True, show=False)
    assert {r["trial_id"] for r in again} == set(stamps)
    for r in again:
        assert os.stat(out / "trials" / r["trial_id"] / "metrics.jsonl").st_mtime_ns == stamps[r["trial_id"]]
    # The same search again is complete: nothing runs, the rows come from results.csv.
    same = search(base, SearchSpec(latent_dims=[2, 4], lrs=[3e-3, 1e-7]), out, show=False)
    assert same.already_complete and {r["trial_id"] for r in same} == set(stamps)
    with pytest.raises(UserError, match="already holds a search"):
        search(base, SearchSpec(latent_dims=[2], lrs=[1e-3]), out, show=False)


def test_a_trial_whose_actor_dies_is_restarted_from_its_latest_checkpoint(ray_cluster, tiny_data, tmp_path):
    """A one-worker trial trains in its trial actor; killed there (a node lost,
    the OOM killer), Tune starts it again and it continues from its checkpoint."""
    import threading

    out = tmp_path / "s"
    base = TrainConfig(data=str(tiny_data), out=str(out), epochs=6, batch_size=64, seed=0).validate()
    killed = []

    def kill_the_trial_after_its_first_epoch() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not list(out.glob("trials/*/checkpoint_epoch_0001")):
            time.sleep(0.1)
        found = subprocess.run(["pgrep", "-f", "^ray::ImplicitFunc"], capture_output=True, text=True).stdout.split()
        for pid in found:
            os.kill(int(pid), signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_the_trial_after_its_first_epoch, daemon=True)
    killer.start()
    rows = search(base, SearchSpec(latent_dims=[2], lrs=[3e-3]), out, grace_period=6, show=False)
    killer.join(10)
    assert len(killed) == 1, killed
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["epochs"] == 6, rows
    history = [json.loads(line) for line in next(out.glob("trials/*/metrics.jsonl")).read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]  # each epoch once
    assert max(h["started_at_epoch"] for h in history) > 1, history  # restarted from a checkpoint, not from scratch


def test_one_worker_trials_train_in_their_actors_on_a_machine_of_their_own():
    from vae_ray.trials import TrialPlan
    from vae_ray.tune import trial_engine, trial_resources

    base = TrainConfig(data="d", out="o")
    assert trial_engine(base, "memory", private=True) == "actor"
    assert trial_engine(base, "memory", private=False) == "ray"  # a cluster the search joined: as `train` does
    assert trial_engine(base, "stream", private=True) == "ray"  # Ray Data streams the split to Train workers
    assert trial_engine(base.replace(workers=2), "memory", private=True) == "ray"
    assert trial_engine(base.replace(workers=2, min_workers=1), "memory", private=True) == "ray"
    # The actor holds the worker's share when it trains; else only the TorchTrainer's workers hold CPUs.
    plan = TrialPlan(0.25, 3, 4, "GPU")
    assert trial_resources({"engine": "actor"}, plan) == {"CPU": 3, "GPU": 0.25, "memory": TRIAL_DRIVER_MEMORY}
    assert trial_resources({"engine": "ray"}, plan) == {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}


def test_a_trial_whose_loss_diverges_ends_alone_and_the_search_goes_on(ray_cluster, tiny_data, tmp_path):
    """A trial that stops itself (a non-finite loss) reports no metric, which
    Tune would answer by ending the whole search."""
    from vae_ray.rundir import RunDir

    out = tmp_path / "s"
    base = TrainConfig(data=str(tiny_data), out=str(out), epochs=2, batch_size=64, seed=0).validate()
    rows = search(base, SearchSpec(latent_dims=[2], lrs=[3e-3, 1e6]), out, grace_period=2, show=False)
    by_lr = {r["lr"]: r for r in rows}
    assert by_lr[3e-3]["status"] == "completed", rows
    assert by_lr[1e6]["status"] == "diverged", rows
    assert "non-finite loss" in RunDir(str(out / "trials" / by_lr[1e6]["trial_id"])).stopped()["stopped"]
    assert json.loads((out / "search.json").read_text())["engine"] == "actor"  # what a resume keeps


def test_random_search_space():
    from ray import tune

    space = SearchSpec(latent_dims=[2, 5], lr_range=(1e-4, 1e-2), num_samples=3).param_space()
    assert isinstance(space["lr"], tune.search.sample.Float)
    assert space["latent_dim"] == {"grid_search": [2, 5]}


@pytest.mark.parametrize(
    "args, words",
    [
        (["--latent-dims", "2,x"], "--latent-dims: expected comma-separated int"),
        (["--latent-dims", "0,4"], "latent_dim must be between 1 and 4096"),
        (["--lrs", "1e-3,-1"], "lr must be a positive number"),
        (["--lrs", "1e-3", "--lr-min", "1e-4", "--lr-max", "1e-2"], "either --lrs"),
        (["--lr-min", "1e-2", "--lr-max", "1e-4"], "0 < min < max"),
        (["--lr-min", "1e-4"], "needs both --lr-min and --lr-max"),
        (["--metric", "accuracy"], "--metric must be one of"),
        (["--grace-period", "9", "--epochs", "3"], "--grace-period must be between 1 and --epochs"),
        (["--max-concurrent", "0"], "--max-concurrent must be at least 1"),
        (["--gpus-per-trial", "-0.5"], "--gpus-per-trial must be a number >= 0"),
        (["--gpus-per-trial", "inf"], "--gpus-per-trial must be a number >= 0"),
        (["--gpus-per-trial", "0.5", "--no-gpu"], "contradict"),
    ],
)
def test_invalid_search_specs_exit_2(tiny_data, tmp_path, args, words):
    result = CliRunner().invoke(app, ["tune", "--data", str(tiny_data), "--out", str(tmp_path / "s"), *args])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], result.output
    assert not (tmp_path / "s").exists()


def test_study_latent_dims_writes_its_pictures(ray_cluster, tiny_data, tmp_path):
    """Trials of two workers each: every trial a TorchTrainer of its own."""
    import json

    from typer.testing import CliRunner

    out = tmp_path / "study"
    result = CliRunner().invoke(
        app,
        [
            "study",
            "latent-dims",
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--latent-dims",
            "2,4",
            "--epochs",
            "1",
            "--max-concurrent",
            "1",  # two workers fill this machine's two cores
            "--workers-per-trial",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    histories = [[json.loads(line) for line in f.read_text().splitlines()] for f in out.glob("trials/*/metrics.jsonl")]
    assert len(histories) == 2 and all(h and all(row["workers"] == 2 for row in h) for h in histories), histories
    summary = json.loads((out / "study.json").read_text())
    assert set(summary["results"]) == {"2", "4"}
    for k in ("2", "4"):  # every trial ran with the study's weights
        cfg = ckpt.load(summary["results"][k]["checkpoint"]).config
        assert (cfg.latent_dim, cfg.recon_weight, cfg.beta) == (int(k), 0.5, 0.5)
    for picture in ("reconstructions_by_latent_dim.png", "metric_by_latent_dim.png"):
        assert (out / picture).stat().st_size > 5000


def test_study_loss_weights_searches_weight_pairs(ray_cluster, tiny_data, tmp_path):
    import json

    from typer.testing import CliRunner

    out = tmp_path / "weights"
    result = CliRunner().invoke(
        app,
        [
            "study",
            "loss-weights",
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--latent-dim",
            "4",
            "--epochs",
            "1",
            "--max-concurrent",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    with open(out / "results.csv") as fh:
        pairs = {(r["recon_weight"], r["beta"]) for r in csv.DictReader(fh)}
    assert pairs == {("0.9", "0.1"), ("0.1", "0.9")}  # pairs, not the 2 x 2 grid
    summary = json.loads((out / "study.json").read_text())
    assert set(summary["results"]) == {"0.9*MSE + 0.1*KL", "0.1*MSE + 0.9*KL"}
    assert (out / "loss_weights.png").stat().st_size > 20000


@pytest.mark.subprocess
def test_ctrl_c_stops_a_search_that_resume_continues(tiny_data, tmp_path, request):
    """Also: an earlier cluster stopped without `ray stop` left its address
    behind; the search's private cluster must not follow it (Train's
    placement-group cleaner did, and the second trial waited forever)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="vrt-"))  # short: Ray's socket paths must fit in 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # nothing listens there
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    out = tmp_path / "s"
    proc = subprocess.Popen(
        [
            vae_ray_exe(),
            "tune",
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--latent-dims",
            "2,3",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--max-concurrent",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "trials").glob("*/metrics.jsonl")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    assert proc.wait(timeout=180) == 130, proc.stderr.read()[-3000:]
    assert "--resume" in proc.stderr.read()
    assert not (out / "best").exists()  # an interrupted search names no winner
    assert json.loads((out / "search.json").read_text())["status"] == "running"
    time.sleep(2)
    assert not subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True).stdout.split()
    resumed = subprocess.run(
        # A bound on a stuck start, generous for a loaded machine (90 s was cut short under load).
        [vae_ray_exe(), "tune", "--out", str(out), "--resume", "--stall-timeout", "240"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and {r["status"] for r in table} <= {"completed", "stopped early"}
    assert ckpt.load(out / "best").state["epoch"] >= 1


@pytest.mark.subprocess
def test_ctrl_c_as_a_search_begins_leaves_a_search_that_resume_runs(tiny_data, tmp_path):
    """Ctrl-C as soon as the Tuner has pickled itself: before Tune saved any
    state (resume begins the search) or before its first trial reported (the
    trial's row still names its settings)."""
    out = tmp_path / "s"
    args = ["--latent-dims", "2,3", "--epochs", "1", "--batch-size", "64", "--max-concurrent", "1"]
    proc = subprocess.Popen(
        [vae_ray_exe(), "tune", "--data", str(tiny_data), "--out", str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "tune" / "tuner.pkl").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=180) == 130, proc.stderr.read()[-3000:]
    assert "Traceback" not in proc.stderr.read()
    resumed = subprocess.run(
        [vae_ray_exe(), "tune", "--out", str(out), "--resume"], capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert sorted(r["latent_dim"] for r in table) == ["2", "3"]  # the searched space, not a trial without settings
    assert all(r["epochs"] == "1" and r["status"] == "completed" for r in table)


def test_a_search_written_before_a_setting_existed_is_still_the_same_search():
    from vae_ray.config import TrainConfig
    from vae_ray.tune import _same_search

    base = {k: v for k, v in TrainConfig(data="d").to_dict().items() if k != "out"}
    identity = {"base": base, "search": {"latent_dims": [2]}, "grace_period": 1, "metric": "m"}
    older = {**identity, "base": {k: v for k, v in base.items() if k != "cuda_graph"}, "status": "complete"}
    assert _same_search(older, identity)
    changed = {**older, "base": {**older["base"], "lr": 0.5}}
    assert not _same_search(changed, identity)
    assert not _same_search(older, {**identity, "base": {**base, "cuda_graph": "off"}})
