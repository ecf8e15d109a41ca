"""The Gaussian-mixture prior (`generate --prior gmm`) without a cluster:
the fit, its file, and the keyed draws. On a cluster: tests/test_generate.py."""

import numpy as np
import pytest

from vae_ray import prior
from vae_ray.errors import UserError

SHA = "ab" * 32


def _blobs(rng: np.random.Generator, centres: list[float], n: int = 600, d: int = 3) -> np.ndarray:
    return np.concatenate([rng.normal(c, 0.3, (n, d)) for c in centres])


def test_the_mixture_size_is_chosen_on_held_out_codes():
    rng = np.random.default_rng(0)
    one = prior.fit(_blobs(rng, [0.0]), None, 0, SHA)
    three = prior.fit(_blobs(rng, [-4.0, 0.0, 4.0]), None, 0, SHA)
    assert one.chosen == (1,)
    assert three.chosen[0] >= 3  # at least the three clusters the codes hold
    heavy = three.weights[0] > 0.1
    found = np.sort(three.means[0][heavy, 0])
    assert len(found) == 3 and np.allclose(found, [-4, 0, 4], atol=0.1)
    assert three.held_out_ll[0] < 0 and np.isfinite(three.held_out_ll[0])


def test_a_conditional_model_gets_a_mixture_per_class_and_draws_from_its_class():
    rng = np.random.default_rng(1)
    codes = _blobs(rng, [-5.0, 5.0], n=400)
    labels = np.repeat([0, 1], 400)
    mixture = prior.fit(codes, labels, 2, SHA)
    assert mixture.weights.shape[0] == 2
    eps = np.random.default_rng(2).normal(size=(1000, 3))
    u = prior.component_uniforms(0, np.arange(1000))
    drawn = mixture.sample(eps, u, np.repeat([0, 1], 500), 1.0)
    assert drawn.dtype == np.float32
    assert abs(drawn[:500].mean() + 5) < 0.1 and abs(drawn[500:].mean() - 5) < 0.1
    assert 0.2 < drawn[:500].std() < 0.4  # the class's spread, not N(0, I)'s
    cold = mixture.sample(eps, u, np.repeat([0, 1], 500), 0.01)
    nearest = np.abs(cold[:500, None, :] - mixture.means[0][None]).sum(-1).min(1)
    assert nearest.max() < 0.05  # temperature scales each component's spread: near a mean of the class


def test_the_same_codes_give_the_same_file_and_a_damaged_file_is_refused():
    rng = np.random.default_rng(3)
    codes = _blobs(rng, [-2.0, 2.0])
    data = prior.fit(codes, None, 0, SHA).to_bytes()
    assert prior.fit(codes, None, 0, SHA).to_bytes() == data
    back = prior.Mixture.from_bytes(data, "f")
    assert back.checkpoint_sha256 == SHA and back.to_bytes() == data
    from safetensors.numpy import load, save

    arrays = load(data)
    meta = prior._metadata(data)
    broken = {
        "truncated": data[: len(data) // 2],
        "not safetensors": b"\x00" * 64,
        "nan means": save(arrays | {"means": np.full_like(arrays["means"], np.nan)}, metadata=meta),
        "negative weights": save(arrays | {"weights": -arrays["weights"]}, metadata=meta),
        "wrong shapes": save(arrays | {"chol": arrays["chol"][:, :, :1]}, metadata=meta),
        "no metadata": save(arrays),
    }
    for why, damaged in broken.items():
        with pytest.raises(UserError, match="remove it to refit"):
            prior.Mixture.from_bytes(damaged, f"f ({why})")


def test_component_draws_are_keyed_by_index_alone():
    keys = np.arange(5000)
    u = prior.component_uniforms(7, keys)
    assert ((u > 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.02
    assert np.array_equal(prior.component_uniforms(7, keys[1234:1300]), u[1234:1300])
    assert not np.array_equal(prior.component_uniforms(8, keys), u)


def test_too_few_codes_of_a_class_is_one_clear_error():
    codes = np.zeros((3, 2))
    with pytest.raises(UserError, match="class 1"):
        prior.fit(codes, np.array([0, 0, 1]), 2, SHA)


def test_an_unknown_prior_or_a_checkpoint_outside_a_run_is_one_clear_line(tmp_path):
    import shutil

    from typer.testing import CliRunner

    from vae_ray.cli import app

    from conftest import assert_one_error_line, make_checkpoint

    runner = CliRunner()
    unknown = runner.invoke(app, ["generate", "nowhere", "--out", str(tmp_path / "o"), "--prior", "flow"])
    assert_one_error_line(unknown, "--prior must be one of normal, gmm")
    run = make_checkpoint(tmp_path / "run")
    alone = tmp_path / "alone"
    shutil.copytree(run / "checkpoint_epoch_0001", alone)  # a checkpoint folder outside any run
    outside = runner.invoke(app, ["generate", str(alone), "--out", str(tmp_path / "o"), "--prior", "gmm"])
    assert_one_error_line(outside, "not in one")
    assert not (tmp_path / "o").exists() and not list(tmp_path.rglob("prior-gmm-*"))
    # A mixture's name planted as a link to someone's file: refused, unread, the file left as it was.
    from vae_ray.checkpoint import load_blob

    theirs = tmp_path / "theirs.bin"
    theirs.write_bytes(b"not ours")
    (run / prior.file_name(load_blob(str(run))["sha256"])).symlink_to(theirs)
    planted = runner.invoke(app, ["generate", str(run), "--out", str(tmp_path / "o"), "--prior", "gmm"])
    assert_one_error_line(planted, "is a link")
    assert theirs.read_bytes() == b"not ours" and not (tmp_path / "o").exists()


def test_a_hub_models_mixture_is_read_through_the_hub_caches_links(tmp_path):
    """huggingface_hub's cache keeps every file as a link to its blob: an hf:// model's
    mixture is read there, while a link planted in a run is still refused (above)."""
    rng = np.random.default_rng(0)
    codes = _blobs(rng, [-2.0, 2.0], d=3)
    mixture = prior.fit(codes, None, 0, "ab" * 32)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    (blobs / "0123").write_bytes(mixture.to_bytes())
    (snapshot / prior.EXPORTED).symlink_to(blobs / "0123")
    blob = {
        "path": "hf://acme/digits",
        "local": str(snapshot),
        "exported": True,
        "sha256": "ab" * 32,
        "config": {"conditional": False, "arch": "mnist", "latent_dim": 3, "loss": "bernoulli"},
        "dataset": {"classes": [], "shape": [28, 28, 1], "num_classes": 0},
    }
    found = prior.stored(blob)
    assert found is not None and found[1] == mixture.to_bytes()
    outside = dict(blob, path=str(snapshot))  # the same links in a plain exported folder: refused
    with pytest.raises(UserError, match="is a link"):
        prior.stored(outside)
