import json

import pytest

from vae_ray.config import RECIPES, TrainConfig, fields, load_config, spec
from vae_ray.errors import UserError


def test_defaults_are_the_documents_values_and_the_measured_recipe():
    cfg = TrainConfig().validate()
    assert (cfg.latent_dim, cfg.epochs) == (16, 30)
    # Optimiser settings left at auto take the recipe measured for the network (docs/benchmarks.md).
    assert (cfg.batch_size, cfg.lr, cfg.lr_schedule, cfg.adam_beta2) == (None, None, None, None)
    assert RECIPES["mnist"] == {"batch_size": 32, "lr": 3e-3, "lr_schedule": "onecycle", "adam_beta2": 0.99}
    assert RECIPES["cifar"]["batch_size"] == 128


def test_round_trip_through_dict():
    cfg = TrainConfig(latent_dim=20, lr=3e-4, gpu=True, conditional=True).validate()
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"latent_dim": 0}, "latent_dim must be between 1 and 4096"),
        ({"lr": -1e-3}, "lr must be a positive number"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"batch_size": 0}, "batch_size must be between 1 and 1048576"),
        ({"workers": 8, "batch_size": 4}, "must be at least the number of workers"),
        ({"workers": 2, "min_workers": 3}, r"min_workers \(3\) must not exceed workers \(2\)"),
        ({"seed": -1}, "seed must be between 0 and 4294967295"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"latent_dim": 10**9}, "latent_dim must be between 1 and 4096"),
        ({"loss": "l1"}, "loss must be one of"),
        ({"epochs": 0}, "epochs must be between 1 and 100000"),
        ({"beta": -0.5}, "beta must be a non-negative number"),
        ({"ema": 1.0}, "ema must be >= 0 and < 1"),
        ({"adam_beta2": 1.0}, "adam_beta2 must be > 0 and < 1"),
        ({"z_samples": 0}, "z_samples must be between 1 and 64"),
    ],
)
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


def test_a_runs_own_config_json_is_a_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": TrainConfig(latent_dim=7, epochs=4).to_dict(), "dataset": {"name": "x"}}))
    cfg = load_config(path, epochs=9)
    assert (cfg.latent_dim, cfg.epochs) == (7, 9)


def test_every_setting_declares_help_and_a_panel():
    for f in fields():
        s = spec(f.name)
        assert s.help.endswith(".") and s.panel in ("Data", "Model", "Loss", "Optimisation", "Scale", "Tracking"), (
            f.name
        )
        if f.default is None:
            assert s.auto, f"{f.name} is auto without saying what auto means"
