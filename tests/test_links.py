"""A link planted where vae-ray writes, replaces or deletes is never followed:
what it leads to is somebody else's and stays as it was (no Ray here)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vae_ray import destination, plots, storage
from vae_ray.cli import app
from vae_ray.config import TrainConfig
from vae_ray.errors import UserError
from vae_ray.rundir import RunDir, check_run

from conftest import assert_one_error_line, make_checkpoint

runner = CliRunner()


@pytest.fixture
def victim(tmp_path) -> Path:
    """Somebody's folder and file, outside anything vae-ray writes."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


def intact(victim: Path) -> bool:
    return sorted(p.name for p in victim.iterdir()) == ["notes.txt"] and (victim / "notes.txt").read_text() == "keep me"


def test_deleting_a_link_removes_the_link_not_what_it_leads_to(tmp_path, victim):
    (tmp_path / "to-folder").symlink_to(victim)
    (tmp_path / "to-file").symlink_to(victim / "notes.txt")
    storage.delete(str(tmp_path / "to-folder"))
    storage.delete(str(tmp_path / "to-file"))
    assert not os.path.lexists(tmp_path / "to-folder") and not os.path.lexists(tmp_path / "to-file")
    assert intact(victim)


def test_writing_or_copying_over_a_link_replaces_the_link(tmp_path, victim):
    (tmp_path / "out.json").symlink_to(victim / "notes.txt")
    storage.write_json(str(tmp_path / "out.json"), {"a": 1})
    assert not (tmp_path / "out.json").is_symlink() and json.loads((tmp_path / "out.json").read_text()) == {"a": 1}
    source = tmp_path / "source"
    source.mkdir()
    (source / "state.json").write_text("{}")
    (tmp_path / "copy").symlink_to(victim)
    storage.copy_folder(str(source), str(tmp_path / "copy"))
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["state.json"]
    assert not (tmp_path / "copy").is_symlink()
    assert intact(victim)
    (tmp_path / "staging").symlink_to(victim)
    with pytest.raises(UserError, match="is a link"):
        storage.refuse_link(str(tmp_path / "staging"), "the set is built there")


def test_pictures_are_never_written_through_a_planted_temporary_name(tmp_path, victim):
    for name in (".samples.png.tmp", ".curves.png.tmp.png"):
        (tmp_path / name).symlink_to(victim / "notes.txt")
    plots.save_png(np.zeros((4, 4), np.uint8), tmp_path / "samples.png")
    plots.trial_curves([], "m", tmp_path / "curves.png")
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "curves.png").stat().st_size
    assert intact(victim)


@pytest.fixture
def resumable_run(tmp_path, tiny_data) -> Path:
    import torch

    from vae_ray import checkpoint as ckpt

    run = make_checkpoint(tmp_path / "run")
    model = ckpt.load(run).model
    torch.save(torch.optim.Adam(model.parameters()).state_dict(), run / "checkpoint_epoch_0001" / "optimizer.pt")
    RunDir(str(run)).write_config(TrainConfig(data=str(tiny_data), epochs=3).to_dict(), {"name": "digits"})
    return run


@pytest.mark.parametrize(
    "planted", ["stopped.json", "best_checkpoint_epoch_0001", "samples", "plots/.samples.png.tmp", "metrics.jsonl"]
)
def test_a_run_with_a_planted_link_is_not_resumed(resumable_run, tiny_data, victim, planted):
    (resumable_run / planted).parent.mkdir(exist_ok=True)
    (resumable_run / planted).symlink_to(victim)
    cfg = TrainConfig(data=str(tiny_data), out=str(resumable_run), epochs=3)
    with pytest.raises(UserError, match=f"{planted}: is a link"):
        check_run(RunDir(str(resumable_run)), cfg, resume=True)
    result = runner.invoke(app, ["train", "--out", str(resumable_run), "--resume", "--epochs", "3"])
    assert_one_error_line(result, planted, "is a link")
    assert intact(victim) and (resumable_run / planted).is_symlink()


def test_the_runs_own_pointer_links_are_resumable(resumable_run, tiny_data):
    assert (resumable_run / "latest").is_symlink()
    cfg = TrainConfig(data=str(tiny_data), out=str(resumable_run), epochs=3)
    assert check_run(RunDir(str(resumable_run)), cfg, resume=True) == "resume"


def test_look_alikes_of_temporary_names_are_not_ours(tmp_path):
    model = make_checkpoint(tmp_path / "model")
    out = tmp_path / "set"
    out.mkdir()
    (out / ".notes.deadbeef.tmp").write_text("theirs")
    (out / ".tmp-0123456789ab-backup").mkdir()
    (out / ".tmp-0123456789ab-backup" / "f").write_text("theirs")
    result = runner.invoke(app, ["generate", str(model), "--num", "5", "--out", str(out)])
    assert_one_error_line(result, "holds other files", ".notes.deadbeef.tmp")
    assert (out / ".notes.deadbeef.tmp").read_text() == "theirs"
    assert (out / ".tmp-0123456789ab-backup" / "f").read_text() == "theirs"
    # Our own first manifest write, cut short, is ours: the folder is still new.
    other = tmp_path / "set2"
    other.mkdir()
    (other / f".{destination.MANIFEST}.0123abcd.tmp").write_text("{")
    assert runner.invoke(app, ["generate", str(model), "--num", "5", "--out", str(other)]).exit_code == 0
    assert not list(other.glob(".*.tmp"))


def test_an_overwrite_never_builds_its_set_through_a_link(tmp_path, victim):
    model = make_checkpoint(tmp_path / "model")
    out = tmp_path / "set"
    assert runner.invoke(app, ["generate", str(model), "--num", "5", "--out", str(out)]).exit_code == 0
    plan = destination.read_set(str(out))[1].plan
    staging = Path(destination.staging_folder(str(out), plan))
    staging.symlink_to(victim)
    with pytest.raises(UserError, match="is a link"):
        destination.write_root(str(out), plan, "replace")
    assert intact(victim)


def test_a_fifo_in_a_dataset_or_a_set_is_refused_before_anything_reads_it(tmp_path, tiny_data):
    """A reader opening a FIFO waits for a writer forever, beyond SIGTERM's reach."""
    from vae_ray.data import read_meta

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = next((data / "test").glob("*.parquet"))
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(UserError, match="not a regular file"):
        read_meta(str(data))
    model = make_checkpoint(tmp_path / "model")
    out = tmp_path / "set"
    assert runner.invoke(app, ["generate", str(model), "--num", "5", "--out", str(out)]).exit_code == 0
    image = next(out.rglob("*.png"))
    image.unlink()
    os.mkfifo(image)
    assert_one_error_line(runner.invoke(app, ["generate", "--verify", str(out)]), "FIFOs", image.name)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda c: (c / "state.json").write_text("garbage"), "corrupt checkpoint"),
        (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]), "cannot resume from it"),
        (lambda c: (c / "optimizer.pt").unlink(), "cannot resume from it"),
    ],
    ids=["state.json", "optimizer.pt truncated", "optimizer.pt missing"],
)
def test_a_damaged_checkpoint_is_refused_before_a_resumed_run_trains(resumable_run, damage, words):
    damage(resumable_run / "checkpoint_epoch_0001")
    result = runner.invoke(app, ["train", "--out", str(resumable_run), "--resume", "--epochs", "3"])
    assert_one_error_line(result, "checkpoint_epoch_0001", words)
    assert sorted(p.name for p in resumable_run.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0001"]


def test_a_hard_linked_metrics_file_is_refused_before_a_resumed_run_trains(resumable_run, tmp_path):
    (resumable_run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    os.link(resumable_run / "metrics.jsonl", tmp_path / "theirs.jsonl")
    result = runner.invoke(app, ["train", "--out", str(resumable_run), "--resume", "--epochs", "3"])
    assert_one_error_line(result, "metrics.jsonl", "hard link")
    assert (tmp_path / "theirs.jsonl").read_text() == '{"epoch": 1}\n'
