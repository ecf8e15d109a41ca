"""The real TorchTrainer on the shared local cluster, with tiny configs."""

import json
import math
import os
import signal
import subprocess
import threading
import time

import pytest
from typer.testing import CliRunner

from vae_ray import checkpoint as ckpt
from vae_ray.cli import app
from vae_ray.config import TrainConfig
from vae_ray.errors import RunFailed, UserError
from vae_ray.train import fit, read_history

REQUIRED = {"epoch", "train_loss", "test_matlab_elbo", "test_neg_elbo_nats", "train_images_per_s", "epoch_seconds"}


def tiny(tiny_data, out, **changes):
    base = dict(data=str(tiny_data), out=str(out), epochs=2, latent_dim=4, batch_size=64, lr=2e-3, seed=1)
    return TrainConfig(**{**base, **changes}).validate()


def test_run_files_then_resume(ray_cluster, tiny_data, tmp_path):
    run = tmp_path / "run"
    summary = fit(tiny(tiny_data, run), show=False)
    history = read_history(run)
    assert [h["epoch"] for h in history] == [1, 2]
    assert REQUIRED <= set(history[0])
    assert history[1]["test_matlab_elbo"] < history[0]["test_matlab_elbo"] + 5
    assert os.readlink(run / "latest") == "checkpoint_epoch_0002"
    assert sorted(p.name for p in (run / "latest").iterdir()) == sorted(ckpt.FILES)
    for png in ("loss_curves.png", "reconstructions.png", "samples.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    assert len(list((run / "samples").glob("*.png"))) == 64
    assert (run / "ray-logs").is_dir()
    loaded = ckpt.load(run)
    assert loaded.config.arch == "mnist" and loaded.config.loss == "matlab" and loaded.state["epoch"] == 2
    assert summary["samples"] == str(run / "samples")

    # A second fresh run into the same folder is refused ...
    with pytest.raises(UserError, match="already holds a training run"):
        fit(tiny(tiny_data, run), show=False)
    # ... and --resume continues it, through the CLI, without repeating an epoch.
    result = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "3", "--json"])
    assert result.exit_code == 0, result.output
    history = read_history(run)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[2]["started_at_epoch"] == 3
    assert json.loads(result.stdout)["epochs"] == 3
    assert os.readlink(run / "latest") == "checkpoint_epoch_0003"


def test_weight_average_is_saved_and_resumed(ray_cluster, tiny_data, tmp_path):
    import torch

    run = tmp_path / "run"
    fit(tiny(tiny_data, run, ema=0.9), show=False)
    latest = run / "latest"
    assert sorted(p.name for p in latest.iterdir()) == sorted(ckpt.FILES + (ckpt.TRAINING_WEIGHTS,))
    average = torch.load(latest / "model.pt", weights_only=True)
    own = torch.load(latest / ckpt.TRAINING_WEIGHTS, weights_only=True)
    assert average.keys() == own.keys()
    assert any(not torch.equal(average[k], own[k]) for k in average)  # two different sets of weights
    assert torch.equal(ckpt.load(run).model.state_dict()["head.weight"], average["head.weight"])  # the average is served
    result = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert [h["epoch"] for h in read_history(run)] == [1, 2, 3]
    assert (run / "latest" / ckpt.TRAINING_WEIGHTS).is_file()


def test_two_workers_share_the_data(ray_cluster, tiny_data, tmp_path):
    # Two antithetic latent samples per image: DDP's forward passes them through.
    fit(tiny(tiny_data, tmp_path / "run", workers=2, epochs=1, z_samples=2), show=False)
    (m,) = read_history(tmp_path / "run")
    assert m["workers"] == 2
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["test_matlab_elbo"])
    assert m["test_images"] == 512  # each worker evaluates half of the test split
    # 512 training images, global batch 64 (32 per worker): 8 synchronised steps.
    assert m["global_step"] == 8


def _train_worker_pids():
    out = subprocess.run(["pgrep", "-f", "^ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_killed_worker_is_survived(ray_cluster, tiny_data, tmp_path):
    run = tmp_path / "run"
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if (run / "metrics.jsonl").exists() and read_history(run):
                for pid in _train_worker_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    fit(tiny(tiny_data, run, epochs=6, max_failures=2), show=False)
    thread.join(timeout=1)
    assert killed, "no worker was running to kill"
    history = read_history(run)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert max(h["started_at_epoch"] for h in history) > 1  # restarted from a checkpoint


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(ray_cluster, tiny_data, tmp_path):
    run = tmp_path / "run"
    fit(tiny(tiny_data, run, epochs=1), show=False)
    with pytest.raises(RunFailed, match=r"non-finite loss at epoch 2, step \d+"):
        fit(tiny(tiny_data, run, epochs=2, lr=1e30), resume=True, show=False)
    assert os.readlink(run / "latest") == "checkpoint_epoch_0001"
    assert [h["epoch"] for h in read_history(run)] == [1]


def test_impossible_runs_exit_2(ray_cluster, tiny_data, tmp_path):
    runner = CliRunner()
    too_big = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "a"),
                                  "--batch-size", "4096"])
    assert too_big.exit_code == 2 and "larger than the 512 training images" in too_big.output
    nothing = runner.invoke(app, ["train", "--out", str(tmp_path / "b"), "--resume"])
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.output
    greedy = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "c"),
                                 "--workers", "2", "--cpus-per-worker", "8"])
    assert greedy.exit_code == 2 and "need 16 CPUs" in greedy.output


def test_conditional_training_feeds_per_class_generation(ray_cluster, tiny_data, tmp_path):
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--epochs", "1",
                                  "--latent-dim", "4", "--batch-size", "64", "--conditional", "--json"])
    assert trained.exit_code == 0, trained.output
    assert ckpt.load(tmp_path / "run").model.num_classes == 10
    made = runner.invoke(app, ["generate", str(tmp_path / "run"), "--num", "40", "--per-class",
                               "--out", str(tmp_path / "set")])
    assert made.exit_code == 0, made.output
    counts = sorted(len(list(d.rglob("*.png"))) for d in (tmp_path / "set").iterdir() if d.is_dir())
    assert counts == [4] * 10
