"""The real TorchTrainer on the shared local cluster, with tiny configs."""

import json
import os
import signal
import threading
import time

import pytest
import torch
from ray.data import DataContext
from typer.testing import CliRunner

from vae_ray import checkpoint as ckpt
from vae_ray import storage
from vae_ray.cli import app
from vae_ray.config import TrainConfig
from vae_ray.data import load_split, read_meta, summary
from vae_ray.errors import RunFailed, UserError
from vae_ray.ingest import StreamFeed, steps_per_epoch
from vae_ray.rundir import RunDir
from vae_ray.trainer import fit

from conftest import assert_one_error_line


def read_history(run):
    return RunDir(str(run)).history()


REQUIRED = {"epoch", "train_loss", "test_matlab_elbo", "test_neg_elbo_nats", "train_images_per_s", "epoch_seconds"}


def tiny(tiny_data, out, **changes):
    base = dict(data=str(tiny_data), out=str(out), epochs=2, latent_dim=4, batch_size=64, lr=2e-3, seed=1)
    return TrainConfig(**{**base, **changes}).validate()


def test_a_finished_run_leaves_its_files_and_a_rerun_changes_nothing(trained_run, tiny_data):
    run = trained_run
    history = read_history(run)
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(history[0]) >= REQUIRED
    assert history[1]["test_matlab_elbo"] < history[0]["test_matlab_elbo"] + 5
    assert os.readlink(run / "latest") == "checkpoint_epoch_0002"
    assert sorted(p.name for p in (run / "latest").iterdir()) == sorted(ckpt.FILES)
    for png in ("loss_curves.png", "reconstructions.png", "samples.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    assert len(list((run / "samples").glob("*.png"))) == 64
    assert not (run / "ray-logs").exists()  # Ray's logs are kept only when a run fails
    assert history[0]["ingest"] == "memory" and history[0]["test_images"] == 512
    loaded = ckpt.load(run)
    assert loaded.config.arch == "mnist" and loaded.config.loss == "bernoulli" and loaded.state["epoch"] == 2
    assert loaded.config.lr_schedule == "onecycle" and loaded.config.cpus_per_worker >= 1  # auto, resolved

    # The same command again finds the run complete and changes nothing ...
    settings = json.loads((run / "config.json").read_text())["config"]
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    again = CliRunner().invoke(app, ["train", "--config", str(run / "config.json"), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["already_complete"], again.output
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    # ... and a different run into the same folder is refused.
    with pytest.raises(UserError, match="already holds a training run"):
        fit(TrainConfig.from_dict({**settings, "latent_dim": 3}), show=False)


def test_weight_average_resume_and_a_non_finite_loss(ray_cluster, tiny_data, tmp_path):
    import torch

    run = tmp_path / "run"
    fit(tiny(tiny_data, run, ema=0.9), show=False)
    latest = run / "latest"
    assert sorted(p.name for p in latest.iterdir()) == sorted(ckpt.FILES + (ckpt.TRAINING_WEIGHTS,))
    average = ckpt.read_weights(latest / ckpt.WEIGHTS)
    own = ckpt.read_weights(latest / ckpt.TRAINING_WEIGHTS)
    assert average.keys() == own.keys()
    assert any(not torch.equal(average[k], own[k]) for k in average)  # two different sets of weights
    assert torch.equal(ckpt.load(run).model.state_dict()["head.weight"], average["head.weight"])  # served
    # The driver was killed in the middle of appending a line; another command holds the run.
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "train_lo')
    with storage.Lock(str(run), "vae-ray train"):  # flock: another open file description conflicts
        busy = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "3"])
    assert_one_error_line(busy, "in use by `vae-ray train`", f"pid {os.getpid()}")  # at once, naming the holder
    # --resume continues it, through the CLI, repairing the torn line, without repeating an epoch;
    # the run's pictures are written while the run is still locked against other writers.
    from vae_ray import pictures

    drawn = []

    def write_run_pictures(run_dir, data):
        with pytest.raises(UserError, match="in use by `vae-ray train`"), storage.Lock(run_dir.uri):
            pass
        drawn.append(run_dir.uri)
        return draw(run_dir, data)

    draw, pictures.write_run_pictures = pictures.write_run_pictures, write_run_pictures
    try:
        result = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "3", "--json"])
    finally:
        pictures.write_run_pictures = draw
    assert result.exit_code == 0, result.output
    assert drawn == [str(run)]
    history = read_history(run)
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[2]["started_at_epoch"] == 3
    assert '"train_lo' not in (run / "metrics.jsonl").read_text().split("\n")[2][:20]
    assert json.loads(result.stdout)["epochs"] == 3 and os.readlink(run / "latest") == "checkpoint_epoch_0003"
    assert (run / "latest" / ckpt.TRAINING_WEIGHTS).is_file()
    # A loss that goes non-finite stops every rank at one step; the last good checkpoint stays.
    with pytest.raises(RunFailed, match=r"non-finite loss at epoch 4, step \d+"):
        fit(tiny(tiny_data, run, ema=0.9, epochs=4, lr=1e30), resume=True, show=False)
    assert os.readlink(run / "latest") == "checkpoint_epoch_0003"
    assert [h["epoch"] for h in read_history(run)] == [1, 2, 3]


def _train_worker_pids():
    """This cluster's Train workers (not those of another cluster on the machine)."""
    from ray.util.state import list_actors

    alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in alive if a.pid]


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
    fit(tiny(tiny_data, run, epochs=4, max_failures=2), show=False)
    thread.join(timeout=1)
    assert killed, "no worker was running to kill"
    history = read_history(run)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert max(h["started_at_epoch"] for h in history) > 1  # restarted from a checkpoint


def test_two_ranks_streaming_agree_on_steps_and_reshuffle_every_epoch(ray_cluster, tiny_data, tmp_path):
    """--cache none: Ray Data streams each rank's part (streaming_split needs every
    rank to read each epoch together, so the ranks must agree on the ingest and
    run the same number of steps)."""
    run = tmp_path / "stream"
    fit(tiny(tiny_data, run, epochs=1, workers=2, cpus_per_worker=1, cache="none", batch_size=65), show=False)
    history = read_history(run)
    assert [h["epoch"] for h in history] == [1]
    assert history[0]["ingest"] == "stream" and history[0]["workers"] == 2
    assert history[0]["global_step"] == steps_per_epoch(512, 65, 2) == 7  # as with the data in memory
    assert history[0]["test_images"] == 512

    # Every epoch shuffles rows with its own seed (and fit() reseeds the block
    # order per epoch). Ray Data's parallel reads deliver blocks in whatever
    # order they finish, so the blocks are kept in order here: what is checked
    # is the seeding, the same rows for the same epoch and others for the next.
    dataset = summary(read_meta(tiny_data))
    context = DataContext.get_current()
    kept = context.execution_options.preserve_order

    def first_indices(epoch):
        shard = load_split(tiny_data, "train").randomize_block_order(seed=1)
        feed = StreamFeed(shard, dataset["shape"], torch.device("cpu"), seed=1, rank=0)
        return next(iter(feed.batches(epoch, 32, 4)))[2].tolist()

    context.execution_options.preserve_order = True
    try:
        assert first_indices(1) == first_indices(1) != first_indices(2)
    finally:
        context.execution_options.preserve_order = kept


def test_impossible_runs_exit_2(ray_cluster, tiny_data, tmp_path):
    runner = CliRunner()
    too_big = runner.invoke(
        app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "a"), "--batch-size", "4096"]
    )
    assert too_big.exit_code == 2 and "larger than the 512 training images" in too_big.output
    nothing = runner.invoke(app, ["train", "--out", str(tmp_path / "b"), "--resume"])
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.output
    greedy = runner.invoke(
        app,
        ["train", "--data", str(tiny_data), "--out", str(tmp_path / "c"), "--workers", "2", "--cpus-per-worker", "8"],
    )
    assert greedy.exit_code == 2 and "need 16 CPUs" in greedy.output


def test_hierarchical_conditional_training_on_two_ranks_feeds_per_class_generation(ray_cluster, tiny_data, tmp_path):
    """--arch hvae under DDP on two ranks, conditional; its flat z is what
    generate draws (the same bytes twice), evaluate's sequential posterior
    scores it, and a resume keeps its sizes."""
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["--data", str(tiny_data), "--out", str(run), "--latent-dim", "4", "--batch-size", "64", "--json"]
    shape = ["--arch", "hvae", "--width", "16", "--depth", "1", "--conditional", "--workers", "2"]
    trained = runner.invoke(app, ["train", *args, *shape, "--epochs", "1", "--cpus-per-worker", "1"])
    assert trained.exit_code == 0, trained.output
    loaded = ckpt.load(run)
    assert (loaded.model.arch, loaded.model.num_classes, loaded.model.latent_dim) == ("hvae", 10, 4 + 196 + 392)
    assert (loaded.config.width, loaded.config.depth) == (16, 1)
    assert read_history(run)[0]["workers"] == 2
    resized = runner.invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "2", "--width", "32"])
    assert resized.exit_code == 2 and "keeps the run's width" in resized.output
    sets = []
    for name in ("set", "again"):
        made = runner.invoke(app, ["generate", str(run), "--num", "40", "--per-class", "--out", str(tmp_path / name)])
        assert made.exit_code == 0, made.output
        sets.append({p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*.png")})
    assert sorted(len([p for p in sets[0] if p.parts[0] == d]) for d in {p.parts[0] for p in sets[0]}) == [4] * 10
    assert sets[0] == sets[1]
    scored = runner.invoke(app, ["evaluate", str(run), "--iw-samples", "4", "--limit", "32", "--json"])
    assert scored.exit_code == 0, scored.output
    figures = json.loads(scored.output[scored.output.index("{") :])
    assert 0 < figures["nll_iw_nats"] <= figures["neg_elbo_nats"]


KEEP_MEMORY = """
import resource, threading, torch
from vae_ray.model import batch_terms, build_model
from vae_ray.worker import keep_freed_memory
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model("mnist", (28, 28, 1), 16, loss="matlab").to(memory_format=torch.channels_last)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
x = torch.rand(32, 1, 28, 28).to(memory_format=torch.channels_last)
def step():
    logits, mu, logvar = model(x)
    loss = batch_terms(model, x, x, logits, mu, logvar).loss.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
def faults_per_step():  # in a thread, as Ray Train runs the loop; once warm
    for _ in range(5):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    found.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
found = []
for phase in ("default", "kept"):
    if phase == "kept":
        found.append(keep_freed_memory())
    thread = threading.Thread(target=faults_per_step)
    thread.start(); thread.join()
print(*found)
"""


@pytest.mark.subprocess
def test_freed_step_buffers_stay_in_the_worker_process():
    """A worker's step buffers are not handed back to the kernel and faulted
    in again every step (what made the first epoch 20% slower on CPUs)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", KEEP_MEMORY], capture_output=True, text=True, check=True)
    default_faults, flag, kept_faults = done.stdout.split()
    assert flag == "True"
    assert float(default_faults) > 500, default_faults  # glibc's default: fresh pages every step
    assert float(kept_faults) < 20, kept_faults  # the same steps after keep_freed_memory()


@pytest.mark.subprocess
def test_one_worker_trains_in_the_commands_own_process_and_resumes_across_engines(ray_cluster, tiny_data, tmp_path):
    """No cluster named: `train` runs the workers' loop in its own process (no
    Ray started), with the figures a Ray Train worker gets, the same files,
    and runs of either kind resume the other."""
    import subprocess

    from conftest import vae_ray_exe

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    local = tmp_path / "local"
    settings = ["--data", str(tiny_data), "--latent-dim", "4", "--batch-size", "64", "--lr", "2e-3", "--seed", "1"]
    settings += ["--keep-checkpoints", "1"]  # as tiny(..., keep_checkpoints=1)

    def command(*extra: str) -> dict:
        done = subprocess.run(
            [vae_ray_exe(), "train", "--out", str(local), "--json", *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    first = command(*settings, "--epochs", "2")
    assert first["engine"] == "process" and first["complete"]
    on_ray = fit(tiny(tiny_data, tmp_path / "ray", epochs=2, keep_checkpoints=1), show=False)
    assert on_ray["engine"] == "ray"
    for mine, ray_s in zip(read_history(local), read_history(tmp_path / "ray"), strict=True):
        for key in ("train_loss", "test_matlab_elbo", "test_neg_elbo_nats", "global_step"):
            assert mine[key] == pytest.approx(ray_s[key], rel=1e-6), key
    ray_own = {".validate_storage_marker", "checkpoint_manager_snapshot.json"}
    pictures = {"plots", "samples"}  # the command's, after training (fit() alone draws none)
    assert set(os.listdir(local)) - pictures == set(os.listdir(tmp_path / "ray")) - ray_own
    assert RunDir(str(local)).latest().endswith("checkpoint_epoch_0002")
    # Ray Train continues the one-process run from its latest checkpoint ...
    fit(tiny(tiny_data, local, epochs=3, keep_checkpoints=1), resume=True, show=False)
    assert [h["started_at_epoch"] for h in read_history(local)] == [1, 1, 3]
    assert (local / "checkpoint_manager_snapshot.json").is_file()
    # ... and the one-process command continues Ray's, keeping the newest checkpoint only.
    last = command("--resume", "--epochs", "4")
    assert last["engine"] == "process" and [h["started_at_epoch"] for h in read_history(local)] == [1, 1, 3, 4]
    assert sorted(p.name for p in local.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0004"]
    assert not (local / "checkpoint_manager_snapshot.json").exists()  # Ray's record, stale now
    assert ckpt.load(local).state["epoch"] == 4
