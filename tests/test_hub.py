"""Sharing a model: safetensors checkpoints, `vae-ray export`, hf://ORG/NAME.

Read back with the libraries a Hub user reads them with: safetensors for the
weights, huggingface_hub's own card parser for the card, huggingface_hub's
cache (offline, filled the way `hf download` fills it) for hf://.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vae_ray import checkpoint as ckpt
from vae_ray.cli import app
from vae_ray.errors import UserError
from vae_ray.rundir import RunDir

from conftest import REPO, assert_one_error_line, assert_process_error_line

runner = CliRunner()
FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v0_2"  # written by vae-ray 0.2.0: model.pt, training.pt
EXPECTED = json.loads((FIXTURE.parent / "checkpoint_v0_2.expected.json").read_text())
EVALUATION = {"images": 64, "neg_elbo_nats": 71.25, "nll_iw_nats": 69.5, "bits_per_dim": 0.696, "recall": 0.41}


def _inputs():
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([0, 1, 2, 0])


def _mu(model) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(*_inputs())[0]


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder around the old-format checkpoint, with an evaluation."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run / "checkpoint_epoch_0001")
    RunDir(str(run)).point_latest("checkpoint_epoch_0001")
    (run / "evaluation.json").write_text(json.dumps(EVALUATION))
    return run


def test_a_checkpoint_written_before_safetensors_still_loads_and_resumes():
    loaded = ckpt.load(FIXTURE)
    assert torch.allclose(_mu(loaded.model), torch.tensor(EXPECTED["mu"]), atol=1e-6)
    # A worker resuming it gets the optimizer's own weights (training.pt), the average and the optimizer.
    from vae_ray.model import build_model

    own, average = (build_model("mnist", (12, 12, 1), 2, 3, "bernoulli") for _ in range(2))
    optimizer = torch.optim.Adam(own.parameters(), lr=1e-3)
    state = ckpt.restore(FIXTURE, own, optimizer, average, torch.device("cpu"))
    assert state["epoch"] == 1 and optimizer.state_dict()["state"]
    assert torch.allclose(_mu(own.eval()), torch.tensor(EXPECTED["training_mu"]), atol=1e-6)
    assert torch.allclose(_mu(average.eval()), torch.tensor(EXPECTED["mu"]), atol=1e-6)


def test_new_checkpoints_hold_safetensors_weights_that_round_trip(tmp_path):
    from safetensors import safe_open

    loaded = ckpt.load(FIXTURE)
    own = ckpt.load(FIXTURE).model
    optimizer = torch.optim.Adam(own.parameters(), lr=1e-3)
    folder = ckpt.save(
        tmp_path / "c", loaded.model, optimizer, loaded.state, loaded.config.to_dict(), loaded.dataset, own
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted((*ckpt.FILES, ckpt.TRAINING_WEIGHTS))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as held:  # the safetensors library, not ours
        assert set(held.keys()) == set(loaded.model.state_dict())
        assert held.metadata() == {"format": "pt"}
        for name, tensor in loaded.model.state_dict().items():
            assert torch.equal(held.get_tensor(name), tensor)
    again = ckpt.load(folder)
    assert torch.equal(_mu(again.model), _mu(loaded.model)) and again.state == loaded.state


def test_a_damaged_safetensors_file_is_one_line(tmp_path):
    folder = tmp_path / "c"
    loaded = ckpt.load(FIXTURE)
    ckpt.save(folder, loaded.model, None, loaded.state, loaded.config.to_dict(), loaded.dataset)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + data[8:])  # a header "a terabyte long"
    result = runner.invoke(app, ["generate", str(folder), "--num", "2", "--out", str(tmp_path / "g")])
    assert_one_error_line(result, "corrupt checkpoint")
    assert not (tmp_path / "g").exists()


def test_export_writes_a_folder_the_hub_reads(run, tmp_path):
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(run), "--out", str(out), "--repo", "acme/digits-vae", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["checkpoint"].endswith("checkpoint_epoch_0001 (the run's latest)")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "samples.png"]
    # The card, parsed by the Hub's own parser: header fields and the evaluation's figures.
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "vae-ray" and "vae" in card.data.tags
    figures = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert figures == {"elbo": 71.25, "nll": 69.5, "bits_per_dim": 0.696, "recall": 0.41}
    assert "hf://acme/digits-vae" in card.text and "![64 samples](samples.png)" in card.text
    # The weights, read with safetensors alone; the picture, 8x8 samples of 12x12 images.
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in ckpt.load(run).model.state_dict().items())
    assert Image.open(out / "samples.png").size[0] >= 8 * 12
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "vae-ray-model" and config["state"]["epoch"] == 1
    # Moved away from any run: the Python API and generate take the folder itself.
    alone = tmp_path / "elsewhere" / "model"
    shutil.move(out, alone)
    shutil.rmtree(run)
    import vae_ray

    model = vae_ray.load(str(alone))
    assert torch.allclose(_mu(model.torch_module), torch.tensor(EXPECTED["mu"]), atol=1e-6)
    assert model.sample(6, seed=0, label=2).shape == (6, 12, 12, 1)
    with pytest.raises(UserError, match="carries no Gaussian-mixture prior"):  # its run fitted none
        model.sample(6, prior="gmm")
    made = runner.invoke(app, ["generate", str(alone), "--num", "6", "--out", str(tmp_path / "g"), "--json"])
    assert made.exit_code == 0, made.output
    manifest = json.loads((tmp_path / "g" / "_manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["checkpoint"] == str(alone)
    assert manifest["checkpoint_sha256"] == __import__("hashlib").sha256(weights_bytes(alone)).hexdigest()


def weights_bytes(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_export_keeps_to_its_own_folders(run, tmp_path):
    out = tmp_path / "export"
    assert runner.invoke(app, ["export", str(run), "--out", str(out)]).exit_code == 0
    first = (out / "model.safetensors").read_bytes()
    # An earlier export is replaced whole; a folder holding anything else is refused, untouched.
    again = runner.invoke(app, ["export", str(run), "--out", str(out), "--seed", "3"])
    assert again.exit_code == 0, again.output
    assert (out / "model.safetensors").read_bytes() == first
    (out / "notes.txt").write_text("mine")
    assert_one_error_line(
        runner.invoke(app, ["export", str(run), "--out", str(out)]), "not an exported vae-ray model", "notes.txt"
    )
    assert (out / "notes.txt").read_text() == "mine"
    # Names alone prove nothing: a folder of the user's own README.md is not an earlier export.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("# my notes")
    assert_one_error_line(runner.invoke(app, ["export", str(run), "--out", str(notes)]), "README.md")
    assert (notes / "README.md").read_text() == "# my notes"
    assert_one_error_line(runner.invoke(app, ["export", str(run), "--out", str(run / "x")]), "inside the run")
    assert_one_error_line(
        runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "e2"), "--repo", "../etc"]), "hf://ORG/NAME"
    )
    assert not (tmp_path / "e2").exists()
    # The best checkpoint is the one exported when the run kept one.
    RunDir(str(run)).keep_best("checkpoint_epoch_0001", 1)
    best = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "e3"), "--json"])
    assert json.loads(best.output)["checkpoint"].endswith("(the run's best)"), best.output


def _hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """A model in huggingface_hub's cache laid out as `hf download` leaves it:
    blobs by content, a snapshot of links to them, refs/main naming it."""
    import hashlib

    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for file in folder.iterdir():
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


@pytest.mark.subprocess
def test_hf_models_come_through_huggingface_hub(run, tmp_path):
    """`generate hf://ORG/NAME` fetches through huggingface_hub (offline here:
    its cache answers) and records the hf:// URI; an unknown model offline is
    one line saying what to do."""
    exported = tmp_path / "export"
    assert runner.invoke(app, ["export", str(run), "--out", str(exported)]).exit_code == 0
    cache = tmp_path / "hf-cache"
    _hub_cache(cache, "acme/digits-vae", exported)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO)}

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "vae_ray", *args], env=env, capture_output=True, text=True, timeout=300
        )

    done = cli("generate", "hf://acme/digits-vae", "--num", "6", "--out", str(tmp_path / "g"), "--format", "npz")
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "g" / "_manifest.json").read_text())
    assert manifest["checkpoint"] == "hf://acme/digits-vae" and manifest["count"] == 6
    with np.load(next((tmp_path / "g").glob("*.npz"))) as held:
        assert held["images"].shape == (6, 12, 12, 1)
        assert held["labels"].tolist() == [0, 1, 2, 0, 1, 2]  # a conditional model's classes take turns
    missing = cli("generate", "hf://acme/other", "--num", "2", "--out", str(tmp_path / "g2"))
    assert_process_error_line(missing, "hf://acme/other", "hf download acme/other --local-dir")
    assert not (tmp_path / "g2").exists()
    assert_process_error_line(cli("evaluate", "hf://acme", "--data", str(tmp_path)), "hf://ORG/NAME")
