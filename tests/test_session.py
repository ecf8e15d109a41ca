"""One-process training (vae_ray/session.py): a run of one worker with no
cluster named trains in the command's own process. The comparison with a Ray
Train worker, and resumes across the two, are in test_train.py."""

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from vae_ray import checkpoint as ckpt
from vae_ray.cli import app
from vae_ray.errors import UserError
from vae_ray.rundir import RunDir
from vae_ray.session import LocalBoard, LocalSession, Stopped

runner = CliRunner()


def test_a_run_of_one_worker_trains_here_and_resumes(tiny_data, tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--out", str(run), "--latent-dim", "4", "--batch-size", "128"]
    first = runner.invoke(app, [*args, "--epochs", "1", "--keep-checkpoints", "1", "--json"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    # In this process unless a test before this one joined a Ray cluster here (the suite's shared one).
    assert summary["engine"] == ("ray" if ray.is_initialized() else "process")
    again = runner.invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "2", "--json"])
    assert again.exit_code == 0, again.output
    history = RunDir(str(run)).history()
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["started_at_epoch"] == 2
    assert sorted(p.name for p in run.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0002"]
    assert ckpt.load(run).state["epoch"] == 2 and (run / "samples").is_dir()


class _Recorder:
    def __init__(self):
        self.calls = []

    def after_report(self, context, metrics, checkpoint):
        self.calls.append((metrics[0], checkpoint.path if checkpoint else None))


def test_the_session_writes_prunes_and_never_follows_a_planted_link(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's record: stale once this session writes
    recorder = _Recorder()
    session = LocalSession(RunDir(str(run)), torch.device("cpu"), LocalBoard(), recorder, keep=2)
    (run / "checkpoint_epoch_5").write_text("a user's note")  # names like a checkpoint's, but no folder of ours
    (run / "checkpoint_epoch_\u00b2").mkdir()  # a superscript two: not an epoch number
    for epoch in (1, 2, 3):
        made = tmp_path / f"made{epoch}"
        made.mkdir()
        (made / "state.json").write_text(json.dumps({"epoch": epoch}))
        session.report({"epoch": epoch}, str(made), f"checkpoint_epoch_{epoch:04d}")
    kept = ["checkpoint_epoch_0002", "checkpoint_epoch_0003", "checkpoint_epoch_5", "checkpoint_epoch_\u00b2"]
    assert sorted(p.name for p in run.glob("checkpoint_epoch_*")) == sorted(kept)  # not ours: never pruned
    assert recorder.calls[-1] == ({"epoch": 3}, str(run / "checkpoint_epoch_0003"))
    assert not (run / "checkpoint_manager_snapshot.json").exists()
    # Someone's folder linked in under a checkpoint's name: refused, left as it was.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("months of work")
    os.symlink(theirs, run / "checkpoint_epoch_0004")
    made = tmp_path / "made4"
    made.mkdir()
    with pytest.raises(UserError, match="is a link"):
        session.report({"epoch": 4}, str(made), "checkpoint_epoch_0004")
    assert (theirs / "thesis.tex").read_text() == "months of work" and os.listdir(theirs) == ["thesis.tex"]
    # A stopping run ends at its next progress update or report, writing nothing more.
    session._board.stopping.set()
    with pytest.raises(Stopped):
        session.board(None).update.remote(epoch=5)
    with pytest.raises(Stopped):
        session.report({"epoch": 5}, str(made), "checkpoint_epoch_0005")
    assert not (run / "checkpoint_epoch_0005").exists()


@pytest.mark.subprocess
def test_a_one_process_run_on_s3_writes_prunes_and_resumes_there(tiny_data, s3_bucket, tmp_path):
    """A fresh process with no cluster named (so no Ray): the run lives on S3."""
    import subprocess

    from vae_ray import storage

    from conftest import vae_ray_exe

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = f"s3://{s3_bucket}/one-process/run"
    base = [vae_ray_exe(), "train", "--out", run, "--json"]
    settings = ["--data", str(tiny_data), "--latent-dim", "4", "--batch-size", "128", "--keep-checkpoints", "1"]
    for extra in ([*settings, "--epochs", "1"], ["--resume", "--epochs", "2"]):
        done = subprocess.run([*base, *extra], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["engine"] == "process"
    history = RunDir(run).history()
    assert [h["started_at_epoch"] for h in history] == [1, 2]
    assert [n for n in storage.list_dir(run) if n.startswith("checkpoint_epoch_")] == ["checkpoint_epoch_0002"]
    assert RunDir(run).latest() == f"{run}/checkpoint_epoch_0002" and ckpt.load(run).state["epoch"] == 2
    # TensorBoard's own reader finds both epochs in the files uploaded from the background thread.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(storage.download(f"{run}/tensorboard", tmp_path / "tb")), {"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("test/matlab_elbo")] == [1, 2]
