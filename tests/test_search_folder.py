"""What a search's --out may hold when a search starts or resumes (no Ray
here): a search stopped before Tune saved its first state begins again,
whatever else is there is refused with one line."""

import json

import pytest
from typer.testing import CliRunner

from vae_ray import seal
from vae_ray.cli import app
from vae_ray.config import TrainConfig
from vae_ray.errors import UserError
from vae_ray.tune import SEAL_FILE, SEARCH_FILE, _check_folder, _trial_id_of

from conftest import assert_one_error_line


def identity(**search):
    base = {k: v for k, v in TrainConfig(data="d").to_dict().items() if k != "out"}
    return {"base": base, "search": {"latent_dims": [2], **search}, "grace_period": 1, "metric": "test_matlab_elbo"}


def stopped_before_tune_began(out, saved, with_tuner=True):
    out.mkdir()
    (out / SEARCH_FILE).write_text(json.dumps({**saved, "status": "running", "engine": "actor"}))
    if with_tuner:  # Ctrl-C after the Tuner pickled itself, before its first experiment state
        (out / "tune").mkdir()
        (out / "tune" / "tuner.pkl").write_bytes(b"\x80\x04N.")
        (out / "tune" / ".validate_storage_marker").write_text("")
        seal.seal(str(out / "tune"), str(out / SEAL_FILE))
    return out


@pytest.mark.parametrize("with_tuner", [False, True])
def test_a_search_stopped_before_tune_began_begins_again(tmp_path, with_tuner):
    out = stopped_before_tune_began(tmp_path / "s", identity(), with_tuner)
    assert _check_folder(str(out), identity(), resume=False) == "new"  # the same command again
    assert _check_folder(str(out), identity(), resume=True) == "new"  # --resume: nothing to restore
    with pytest.raises(UserError, match="never began, with other settings"):
        _check_folder(str(out), identity(latent_dims=[3]), resume=False)
    assert (out / SEARCH_FILE).exists()  # nothing was removed by asking


def test_a_tuner_pickle_vae_ray_did_not_write_is_not_written_over(tmp_path):
    out = stopped_before_tune_began(tmp_path / "s", identity())
    (out / "tune" / "tuner.pkl").write_bytes(b"somebody else's")
    for resume in (False, True):
        with pytest.raises(UserError, match="changed since vae-ray sealed it"):
            _check_folder(str(out), identity(), resume=resume)
    assert (out / "tune" / "tuner.pkl").read_bytes() == b"somebody else's"


def test_a_search_with_saved_state_is_resumed_not_begun_again(tmp_path):
    out = stopped_before_tune_began(tmp_path / "s", identity())
    (out / "tune" / "experiment_state-2026-12-05_09-00-00.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a search"):
        _check_folder(str(out), identity(), resume=False)
    with pytest.raises(UserError, match="changed since vae-ray sealed it"):  # state no seal covers is never read
        _check_folder(str(out), identity(), resume=True)


def test_a_foreign_file_beside_a_search_json_is_not_ours_to_reuse(tmp_path):
    out = stopped_before_tune_began(tmp_path / "s", identity(), with_tuner=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        _check_folder(str(out), identity(), resume=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_trial_that_never_reported_is_named_by_its_tune_folder():
    assert _trial_id_of("/s/tune/trial_f55c0_00000_0_2026-12-05_09-40-52") == "f55c0_00000"
    assert _trial_id_of("s3://b/s/tune/trial_ab12_00003_3_latent_dim=2,lr=0.0010_2026-12-05_09-40-52") == "ab12_00003"


@pytest.mark.parametrize("content", [None, '{"base": {}}', "[1, 2"])
def test_resume_without_a_search_to_resume_is_one_line(tmp_path, content):
    out = tmp_path / "s"
    if content is not None:
        (out / "tune").mkdir(parents=True)
        (out / SEARCH_FILE).write_text(content)
    result = CliRunner().invoke(app, ["tune", "--out", str(out), "--resume"])
    assert_one_error_line(result, "no search to resume", "--data")
    assert content is None or (out / SEARCH_FILE).read_text() == content
