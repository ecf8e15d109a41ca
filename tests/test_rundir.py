"""The run folder and resume, without Ray: which folders a run may start in,
what a resume keeps, which of Ray's own files are trusted, and which state
is never unpickled (seal.py)."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vae_ray
from vae_ray import seal, storage
from vae_ray.cli import app
from vae_ray.config import TrainConfig
from vae_ray.errors import UserError
from vae_ray.evaluate import save as save_evaluation
from vae_ray.rundir import RAY_SNAPSHOT, RunDir, check_ray_state, check_run, merge_for_resume

from conftest import assert_one_error_line, make_checkpoint

runner = CliRunner()


@pytest.fixture(autouse=True)
def _own_key(tmp_path, monkeypatch):
    """Each test seals with a key of its own, never the user's."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(seal.KEY_ENV, raising=False)


def _cfg(out: Path, data: Path | str = "/data") -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), arch="mnist", loss="matlab", epochs=2).validate()


# ---------------------------------------------------------------------------
# Which folders a run may start in
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "planted",
    [
        {".bashrc": "alias ll='ls -l'"},
        {".ssh/id_ed25519": "PRIVATE KEY"},
        {".git/": None},  # an empty hidden folder is somebody's too
        {".env": "TOKEN=1", ".aws/credentials": "[default]"},
    ],
)
def test_a_new_run_needs_a_truly_empty_folder(tmp_path, planted):
    home = tmp_path / "home"
    home.mkdir()
    for name, text in planted.items():
        if text is None:
            (home / name).mkdir(parents=True)
        else:
            (home / name).parent.mkdir(parents=True, exist_ok=True)
            (home / name).write_text(text)
    with pytest.raises(UserError, match="holds other files, not a vae-ray run"):
        check_run(RunDir(str(home)), _cfg(home), resume=False)
    assert check_run(RunDir(str(tmp_path / "new")), _cfg(tmp_path / "new"), resume=False) == "new"
    (tmp_path / "empty").mkdir()
    assert check_run(RunDir(str(tmp_path / "empty")), _cfg(tmp_path / "empty"), resume=False) == "new"


def test_train_and_tune_refuse_a_home_directory(tmp_path, tiny_data):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA")
    (home / ".bashrc").write_text("export PATH")
    for args in (
        ["train", "--data", str(tiny_data), "--out", str(home), "--epochs", "1"],
        ["tune", "--data", str(tiny_data), "--out", str(home), "--epochs", "1", "--latent-dims", "2"],
    ):
        assert_one_error_line(runner.invoke(app, args), "holds other files", ".bashrc")
    assert sorted(p.name for p in home.iterdir()) == [".bashrc", ".ssh"]
    assert (home / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAA"


# ---------------------------------------------------------------------------
# What a resume keeps
# ---------------------------------------------------------------------------
def test_a_resume_keeps_the_model_and_takes_operational_changes(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_config(_cfg(tmp_path / "run").to_dict(), {"shape": [28, 28, 1]})
    merged = merge_for_resume(run, {"epochs": 5, "max_failures": 3, "latent_dim": None})
    assert (merged.epochs, merged.max_failures, merged.latent_dim) == (5, 3, _cfg(tmp_path).latent_dim)
    with pytest.raises(UserError, match="--resume keeps the run's latent_dim"):
        merge_for_resume(run, {"latent_dim": 99})
    with pytest.raises(UserError, match="nothing to resume"):
        merge_for_resume(RunDir(str(tmp_path / "none")), {"epochs": 5})


# ---------------------------------------------------------------------------
# Ray's snapshot names only our checkpoint folders
# ---------------------------------------------------------------------------
def _snapshot(names: list) -> dict:
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {"epoch": 1}} for n in names]
    return {
        "ray_version": "2.60.0",
        "checkpoint_results": results,
        "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": results[-1] if results else None,
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": len(names),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }


@pytest.mark.parametrize(
    "hostile",
    [
        "/home/victim/thesis",
        "../../victim",
        "checkpoint_epoch_0001/../../victim",
        "checkpoint_epoch_0001/",
        "",
        7,
    ],
)
def test_a_crafted_ray_snapshot_is_refused_before_ray_reads_it(tmp_path, tiny_data, hostile):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("months of work")
    run_dir = make_checkpoint(tmp_path / "run")
    RunDir(str(run_dir)).write_config(_cfg(run_dir, tiny_data).to_dict(), {"shape": [28, 28, 1]})
    (run_dir / RAY_SNAPSHOT).write_text(json.dumps(_snapshot(["checkpoint_epoch_0001", hostile])))
    with pytest.raises(UserError, match="not one of this run's"):
        check_ray_state(RunDir(str(run_dir)))
    # The command says so in one line before any cluster starts, and nothing is touched.
    result = runner.invoke(app, ["train", "--out", str(run_dir), "--resume", "--epochs", "3"])
    assert_one_error_line(result, RAY_SNAPSHOT, "not one of this run's")
    assert (victim / "thesis.tex").read_text() == "months of work"
    # Our own names pass; so does a run that has no snapshot yet.
    (run_dir / RAY_SNAPSHOT).write_text(json.dumps(_snapshot(["checkpoint_epoch_0001", "checkpoint_epoch_0002"])))
    check_ray_state(RunDir(str(run_dir)))
    (run_dir / RAY_SNAPSHOT).unlink()
    check_ray_state(RunDir(str(run_dir)))


def test_a_snapshot_that_is_a_link_or_huge_or_not_json_is_refused(tmp_path):
    run_dir = make_checkpoint(tmp_path / "run")
    run = RunDir(str(run_dir))
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(_snapshot(["checkpoint_epoch_0001"])))
    os.symlink(elsewhere, run_dir / RAY_SNAPSHOT)
    with pytest.raises(UserError, match="is a link"):
        check_ray_state(run)
    (run_dir / RAY_SNAPSHOT).unlink()
    (run_dir / RAY_SNAPSHOT).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        check_ray_state(run)
    with open(run_dir / RAY_SNAPSHOT, "wb") as fh:
        fh.truncate(17 * 2**20)  # sparse: costs no disk
    with pytest.raises(UserError, match="too large"):
        check_ray_state(run)


# ---------------------------------------------------------------------------
# A search's pickled state is loaded only under this user's seal
# ---------------------------------------------------------------------------
class _Touch:
    """A pickle that creates a file when loaded: what a planted tuner.pkl would do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _search_folder(tmp_path: Path, tiny_data: Path) -> tuple[Path, Path]:
    out = tmp_path / "search"
    (out / "tune").mkdir(parents=True)
    base = TrainConfig(data=str(tiny_data), epochs=1, latent_dim=2).to_dict()
    identity = {
        "base": {k: v for k, v in base.items() if k != "out"},
        "search": {"latent_dims": [2], "lrs": [1e-3]},
        "grace_period": 1,
        "metric": "test_matlab_elbo",
    }
    (out / "search.json").write_text(json.dumps(identity | {"status": "running"}))
    ran = tmp_path / "code-ran"
    (out / "tune" / "tuner.pkl").write_bytes(pickle.dumps(_Touch(ran)))
    return out, ran


def test_a_planted_tune_state_is_never_unpickled(tmp_path, tiny_data):
    out, ran = _search_folder(tmp_path, tiny_data)
    result = runner.invoke(app, ["tune", "--out", str(out), "--resume"])
    assert_one_error_line(result, "no seal", "start a new search")
    assert not ran.exists()
    # A seal made with somebody else's key proves nothing either.
    os.environ[seal.KEY_ENV] = "ab" * 32
    try:
        seal.seal(str(out / "tune"), str(out / "tune.seal.json"))
    finally:
        del os.environ[seal.KEY_ENV]
    assert_one_error_line(runner.invoke(app, ["tune", "--out", str(out), "--resume"]), "not sealed with your key")
    assert not ran.exists()
    # A crafted search.json is one line too.
    (out / "search.json").write_text(
        json.dumps({"base": {}, "search": {"lr_min": 1}, "grace_period": 1, "metric": "x"})
    )
    assert_one_error_line(runner.invoke(app, ["tune", "--out", str(out), "--resume"]), "does not describe")


def test_a_seal_covers_every_state_file_and_notices_changes(tmp_path):
    folder, seal_file = tmp_path / "tune", tmp_path / "tune.seal.json"
    folder.mkdir()
    (folder / "tuner.pkl").write_bytes(b"state one")
    (folder / "experiment_state-1.json").write_text("{}")
    seal.seal(str(folder), str(seal_file))
    seal.check(str(folder), str(seal_file), "state")  # unchanged: trusted
    (folder / "tuner.pkl").write_bytes(b"state two")
    with pytest.raises(UserError, match="tuner.pkl: changed since vae-ray sealed it"):
        seal.check(str(folder), str(seal_file), "state")
    seal.seal(str(folder), str(seal_file))
    (folder / "search_gen_state-2.pkl").write_bytes(b"new")  # a file the seal never saw
    with pytest.raises(UserError, match="search_gen_state-2.pkl: changed"):
        seal.check(str(folder), str(seal_file), "state")
    forged = json.loads(seal_file.read_text())
    forged["files"]["search_gen_state-2.pkl"] = "0" * 64
    seal_file.write_text(json.dumps(forged))
    with pytest.raises(UserError, match="not sealed with your key"):
        seal.check(str(folder), str(seal_file), "state")
    key = seal.key_path()
    assert key.stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------------
# A search's trials and a run's evaluation have one writer
# ---------------------------------------------------------------------------
def test_a_trial_of_a_running_search_cannot_be_resumed_beside_it(tmp_path, tiny_data):
    search = tmp_path / "search"
    trial = make_checkpoint(search / "trials" / "abc_00000")
    RunDir(str(trial)).write_config(_cfg(trial, tiny_data).to_dict(), {"shape": [28, 28, 1]})
    (search / "search.json").write_text("{}")
    assert RunDir(str(trial)).search() == str(search)
    with storage.Lock(str(search), "vae-ray tune"):
        result = runner.invoke(app, ["train", "--out", str(trial), "--resume", "--epochs", "3"])
        assert_one_error_line(result, "in use by `vae-ray tune`")
        with pytest.raises(UserError, match="in use by `vae-ray tune`"), RunDir(str(trial)).lock("vae-ray evaluate"):
            pass
        with RunDir(str(trial)).lock("vae-ray tune", as_trial=True):  # the search's own trial
            pass
    assert json.loads((trial / "config.json").read_text())["config"]["epochs"] == 2
    # A run that merely sits in a folder called trials is nobody's trial.
    loose = make_checkpoint(tmp_path / "other" / "trials" / "x")
    assert RunDir(str(loose)).search() is None


def test_an_evaluation_is_not_written_into_a_run_another_command_holds(tmp_path, capsys):
    run = make_checkpoint(tmp_path / "run")
    with storage.Lock(str(run), "vae-ray train"):
        assert save_evaluation({"matlab_elbo": 1.0}, str(run)) is None
    assert not (run / "evaluation.json").exists()
    assert "in use by `vae-ray train`" in capsys.readouterr().err
    assert save_evaluation({"matlab_elbo": 1.0}, str(run)) == str(run / "evaluation.json")


def test_the_train_controller_stops_writing_once_the_run_lock_is_not_the_drivers(tmp_path):
    from vae_ray.trainer import RunDirRecorder

    run = make_checkpoint(tmp_path / "run")
    with storage.Lock(str(run), "vae-ray train") as lock:
        callback = RunDirRecorder(str(run), lock.token)
        callback.after_report(None, [{"epoch": 1, "test_loss": 1.0}], None)
        assert [h["epoch"] for h in RunDir(str(run)).history()] == [1]
        (tmp_path / ".run.lock").unlink()  # another command took the run over
        (tmp_path / ".run.lock").write_text(json.dumps({"command": "vae-ray other", "token": "theirs"}))
        with pytest.raises(UserError, match="lost the lock"):
            callback.after_report(None, [{"epoch": 2, "test_loss": 0.5}], None)
    assert [h["epoch"] for h in RunDir(str(run)).history()] == [1]


def test_the_best_checkpoint_is_kept_as_a_copy_and_a_pointer(tmp_path):
    from vae_ray.trainer import RunDirRecorder

    run = make_checkpoint(tmp_path / "run")  # checkpoint_epoch_0001
    ckpt = run / "checkpoint_epoch_0001"

    class Reported:
        def __init__(self, path):
            self.path = str(path)

    callback = RunDirRecorder(str(run), keep_best="test_neg_elbo_nats")
    callback.after_report(None, [{"epoch": 1, "test_neg_elbo_nats": 90.0}], Reported(ckpt))
    assert os.readlink(run / "best") == "best_checkpoint_epoch_0001"
    assert (run / "best" / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    shutil.copytree(ckpt, run / "checkpoint_epoch_0002")
    callback.after_report(None, [{"epoch": 2, "test_neg_elbo_nats": 95.0}], Reported(run / "checkpoint_epoch_0002"))
    assert os.readlink(run / "best") == "best_checkpoint_epoch_0001"  # worse: the best stays
    shutil.copytree(ckpt, run / "checkpoint_epoch_0003")
    fresh = RunDirRecorder(str(run), keep_best="test_neg_elbo_nats")  # a resumed run's controller
    fresh.after_report(None, [{"epoch": 3, "test_neg_elbo_nats": 80.0}], Reported(run / "checkpoint_epoch_0003"))
    assert os.readlink(run / "best") == "best_checkpoint_epoch_0003"
    assert not (run / "best_checkpoint_epoch_0001").exists()  # the copy it replaced is gone
    assert os.readlink(run / "latest") == "checkpoint_epoch_0003"
    assert vae_ray.load(str(run / "best")).latent_dim == 4


def test_readers_of_a_dataset_wait_for_no_prepare_and_keep_one_out(tmp_path, tiny_data):
    """A prepare (--overwrite) holds its dataset: train, tune and evaluate fail
    at once in one line, writing nothing; while one of them reads it, prepare does."""
    run = make_checkpoint(tmp_path / "run")
    with storage.Lock(str(tiny_data), "vae-ray data prepare"):
        for args in (
            ["train", "--data", str(tiny_data), "--out", str(tmp_path / "new-run"), "--epochs", "1"],
            ["tune", "--data", str(tiny_data), "--out", str(tmp_path / "new-search"), "--latent-dims", "2"],
            ["evaluate", str(run), "--data", str(tiny_data), "--samples", "0"],
        ):
            assert_one_error_line(runner.invoke(app, args), "in use by `vae-ray data prepare`")
    assert not (tmp_path / "new-run").exists() and not (tmp_path / "new-search").exists()
    from vae_ray.data import dataset_read_lock

    with dataset_read_lock(str(tiny_data)):
        result = runner.invoke(
            app, ["data", "prepare", "synthetic", "--limit", "512", "--out", str(tiny_data), "--overwrite"]
        )
        assert_one_error_line(result, "in use")
    assert (tiny_data / "dataset.json").is_file()
