"""The Python API: its public names, a loaded model's four methods, and the
commands as functions (the same ones the command line runs)."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import vae_ray
from vae_ray import UserError

from conftest import make_checkpoint


def test_the_public_names_are_pinned_and_import_light():
    assert sorted(vae_ray.__all__) == [
        "Model",
        "ModelSpec",
        "UserError",
        "__version__",
        "encode",
        "evaluate",
        "export",
        "generate",
        "load",
        "train",
        "tune",
        "tune_sampling",
    ]
    for name in vae_ray.__all__:
        assert getattr(vae_ray, name) is not None
    # `import vae_ray` alone loads neither torch nor Ray (the API loads them on first use).
    code = "import sys, vae_ray; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_loaded_model_samples_encodes_decodes_and_reconstructs(tmp_path):
    model = vae_ray.load(str(make_checkpoint(tmp_path / "run")))
    assert model.image_shape == (28, 28, 1) and model.latent_dim == 4 and model.spec.arch == "mnist"
    images = model.sample(12, seed=3)
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8
    assert np.array_equal(images, model.sample(12, seed=3))  # keyed by (seed, index): repeatable
    assert not np.array_equal(images, model.sample(12, seed=4))
    assert np.array_equal(images[:5], model.sample(5, seed=3))  # image i does not depend on n
    mu, logvar = model.encode(images)
    assert mu.shape == logvar.shape == (12, 4) and mu.dtype == np.float32
    assert np.array_equal(model.decode(mu), model.reconstruct(images))
    assert model.encode(images[..., 0])[0].shape == (12, 4)  # (N, H, W) grey images too
    floats = images.astype(np.float32) / 255
    assert np.allclose(model.encode(floats)[0], mu, atol=1e-5)
    for bad, words in [
        (lambda: model.encode(np.zeros((2, 32, 32, 1), np.uint8)), "must have shape (N, 28, 28, 1)"),
        (lambda: model.encode(np.full((2, 28, 28, 1), 2.0)), "values in [0, 1]"),
        (lambda: model.decode(np.zeros((2, 3))), "z must have shape (N, 4)"),
        (lambda: model.sample(2, label=1), "not a class-conditional model"),
        (lambda: model.sample(0), "n must be between"),
    ]:
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            bad()


def test_a_conditional_model_takes_labels_by_index_or_name(tmp_path):
    classes = ["zero", "one", "two"]
    model = vae_ray.load(str(make_checkpoint(tmp_path / "run", conditional=True, classes=classes)))
    assert model.classes == classes
    by_name = model.sample(6, label="two", seed=1)
    assert np.array_equal(by_name, model.sample(6, label=2, seed=1))
    turns = model.sample(6, seed=1)  # no label: classes in turn, as generate --per-class
    assert np.array_equal(turns, model.sample(6, label=[0, 1, 2, 0, 1, 2], seed=1))
    with pytest.raises(UserError, match="pass label="):
        model.encode(by_name)
    with pytest.raises(UserError, match="unknown class 'three'"):
        model.sample(2, label="three")
    with pytest.raises(UserError, match="label 3 is out of range"):
        model.sample(2, label=3)


def test_sample_decodes_the_latents_generate_writes(tmp_path):
    run = make_checkpoint(tmp_path / "run")
    summary = vae_ray.generate(str(run), out=str(tmp_path / "set"), num=8, seed=5)
    assert summary["count"] == 8 and "in this process" in summary["path"]
    assert summary["checkpoint"] == f"{run / 'checkpoint_epoch_0001'} (the run's latest)"  # says which one it used
    written = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "set").rglob("*.png"))])
    sampled = vae_ray.load(str(run)).sample(8, seed=5)[..., 0]
    # The same latent vectors; the decoder's kernels (batch, memory layout) may round a level apart.
    assert np.abs(written.astype(int) - sampled.astype(int)).max() <= 1
    with pytest.raises(UserError, match="unknown option"):
        vae_ray.generate(str(run), out=str(tmp_path / "other"), num=8, sead=5)
    assert not (tmp_path / "other").exists()


def test_encode_from_python_writes_the_latents_the_model_gives(ray_cluster, tmp_path, tiny_data):
    import pandas as pd

    run = make_checkpoint(tmp_path / "run")
    summary = vae_ray.encode(str(run), out=str(tmp_path / "latents"), data=str(tiny_data), split="test")
    assert summary["images"] == 512 and summary["checkpoint"].endswith("(the run's latest)")
    table = pd.read_parquet(tmp_path / "latents").sort_values("index")
    assert len(table) == 512 and table["index"].is_unique
    with pytest.raises(UserError, match="unknown option"):
        vae_ray.encode(str(run), out=str(tmp_path / "other"), splitt="test")


def test_train_from_python_runs_the_command(ray_cluster, tiny_data, tmp_path):
    summary = vae_ray.train(data=str(tiny_data), out=str(tmp_path / "run"), epochs=1, latent_dim=2, batch_size=64)
    assert summary["epochs"] == 1 and summary["complete"]
    assert (tmp_path / "run" / "plots" / "samples.png").is_file()
    assert vae_ray.load(str(tmp_path / "run")).sample(3).shape == (3, 28, 28, 1)
    with pytest.raises(UserError, match="unknown setting"):
        vae_ray.train(data=str(tiny_data), out=str(tmp_path / "other"), epoks=1)
