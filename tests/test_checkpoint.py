import pytest
import torch

from vae_ray import checkpoint as ckpt
from vae_ray.config import TrainConfig
from vae_ray.errors import UserError
from vae_ray.model import build_model
from vae_ray.rundir import RunDir

DATASET = {"name": "digits", "shape": [28, 28, 1], "classes": [str(i) for i in range(10)], "num_classes": 10}


def _save(tmp_path):
    cfg = TrainConfig(arch="mnist", loss="matlab", latent_dim=3).validate()
    model = build_model("mnist", (28, 28, 1), 3)
    directory = ckpt.save(
        tmp_path / "checkpoint_epoch_0001", model, None, {"epoch": 1, "global_step": 5}, cfg.to_dict(), DATASET
    )
    RunDir(str(tmp_path)).point_latest(directory.name)
    return model, directory


def test_round_trip_through_a_run_folder(tmp_path):
    model, directory = _save(tmp_path)
    loaded = ckpt.load(tmp_path)  # the run folder: follows latest
    assert loaded.path == str(directory.resolve()) and loaded.state["epoch"] == 1
    x = torch.rand(2, 1, 28, 28)
    mu_a, _ = model.eval().encode(x)
    mu_b, _ = loaded.model.encode(x)
    assert torch.equal(mu_a, mu_b)


def test_corrupt_or_missing_checkpoints_are_user_errors(tmp_path):
    _, directory = _save(tmp_path)
    with pytest.raises(UserError, match="no such checkpoint"):
        ckpt.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a checkpoint"):
        ckpt.load(tmp_path / "empty")
    (directory / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt checkpoint"):
        ckpt.load(directory)


def test_weights_are_saved_contiguous_whatever_the_training_layout(tmp_path):
    """Workers train channels-last on the CPU; model.safetensors holds the usual layout
    for any PyTorch reader, and loads back to the same values."""
    import torch

    from vae_ray import checkpoint as ckpt
    from vae_ray.model import build_model

    model = build_model("mnist", (28, 28, 1), 4).to(memory_format=torch.channels_last)
    ckpt.save(tmp_path / "c", model, None, {"epoch": 1}, {}, {})
    saved = ckpt.read_weights(tmp_path / "c" / "model.safetensors")
    assert all(t.is_contiguous() for t in saved.values())
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
