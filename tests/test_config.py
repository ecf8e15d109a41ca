import json

import pytest

from vae_ray.config import TrainConfig, load_config
from vae_ray.errors import UserError


def test_defaults_are_the_documents_values():
    cfg = TrainConfig().validate()
    assert (cfg.latent_dim, cfg.batch_size, cfg.lr, cfg.epochs) == (16, 128, 1e-3, 30)


def test_round_trip_through_dict():
    cfg = TrainConfig(latent_dim=20, lr=3e-4, gpu=True, conditional=True).validate()
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("changes, words", [
    ({"latent_dim": 0}, "latent_dim must be at least 1"),
    ({"lr": -1e-3}, "lr must be a positive number"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"workers": 3, "batch_size": 128}, "divisible by workers"),
    ({"loss": "l1"}, "loss must be one of"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"beta": -0.5}, "beta must be a non-negative number"),
    ({"ema": 1.0}, "ema must be >= 0 and < 1"),
    ({"adam_beta2": 1.0}, "adam_beta2 must be > 0 and < 1"),
    ({"z_samples": 0}, "z_samples must be at least 1"),
])
def test_impossible_values_are_rejected(changes, words):
    with pytest.raises(UserError, match=words):
        TrainConfig.from_dict(changes)


def test_unknown_keys_and_wrong_types_are_rejected():
    with pytest.raises(UserError, match="unknown setting 'latent'"):
        TrainConfig.from_dict({"latent": 3})
    with pytest.raises(UserError, match="'epochs' must be an integer"):
        TrainConfig.from_dict({"epochs": "many"})
    with pytest.raises(UserError, match="'epochs' must be an integer"):
        TrainConfig.from_dict({"epochs": True})


def test_yaml_file_with_flag_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("latent-dim: 20\nlr: 2e-3\nepochs: 7\n")
    cfg = load_config(path, epochs=3)
    assert (cfg.latent_dim, cfg.lr, cfg.epochs) == (20, 2e-3, 3)


def test_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML or JSON"):
        load_config(broken)
    listy = tmp_path / "list.json"
    listy.write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(listy)
