"""`vae-ray evaluate`, `classifier train` and `report` on a tiny run and a
real local Ray cluster; the report is opened in a real headless browser."""

import json
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from vae_ray.cli import app
from vae_ray.evaluate import KEYS

from conftest import assert_one_error_line, make_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def judged_data(tmp_path_factory, tiny_data):
    """A private copy of the tiny dataset with its judge classifier cached."""
    data = tmp_path_factory.mktemp("judged") / "digits"
    shutil.copytree(tiny_data, data)
    result = runner.invoke(app, ["classifier", "train", "--data", str(data), "--epochs", "12"])
    assert result.exit_code == 0, result.output
    return data


def _evaluate(*args):
    result = runner.invoke(app, ["evaluate", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_evaluate_prints_one_json_object_with_every_metric(ray_cluster, run, tiny_data):
    result = _evaluate(run, "--data", tiny_data, "--iw-samples", 8, "--samples", 0)
    assert set(KEYS) <= set(result)
    assert result["images"] == 512 and result["split"] == "test"
    assert result["nll_iw_nats"] <= result["neg_elbo_nats"]
    # matlab loss: the model's own NLL is the MATLAB term plus the Gaussian constant (and sample noise).
    assert result["neg_elbo_nats"] - result["matlab_elbo"] == pytest.approx(0.5 * 784 * 1.8378770664, abs=5.0)
    assert 0 <= result["active_units"] <= 4 and result["bits_per_dim"] is None
    assert 0 < result["recon_mse"] < 1 and result["kl"] >= 0
    assert result["fd"] is None and "--samples 0" in result["judge"]
    # A run folder keeps its evaluation for the report.
    assert json.loads((run / "evaluation.json").read_text())["nll_iw_nats"] == result["nll_iw_nats"]


def test_evaluate_does_not_depend_on_actor_count(ray_cluster, run, tiny_data):
    one = _evaluate(run, "--data", tiny_data, "--iw-samples", 4, "--samples", 0, "--actors", 1, "--limit", 200)
    two = _evaluate(run, "--data", tiny_data, "--iw-samples", 4, "--samples", 0, "--actors", 3, "--limit", 200)
    for key in ("matlab_elbo", "neg_elbo_nats", "nll_iw_nats", "recon_mse", "kl", "active_units"):
        assert one[key] == pytest.approx(two[key], rel=1e-9, abs=1e-9), key
    assert one["images"] == 200
    assert one["scored_on"] == "1 CPU actor(s)" and two["scored_on"].endswith(" CPU actor(s)")


def test_gpu_scoring_on_a_cluster_without_gpus_is_refused_in_one_line(ray_cluster, run, tiny_data):
    result = runner.invoke(app, ["evaluate", str(run), "--data", str(tiny_data), "--samples", "0", "--gpu"])
    assert_one_error_line(result, "--gpu", "no GPUs")


def test_sample_quality_with_the_judge(ray_cluster, judged_data, tmp_path):
    info = json.loads((judged_data / "classifier" / "info.json").read_text())
    assert info["test_accuracy"] > 0.5 and info["train_images"] == 512
    run = make_checkpoint(tmp_path / "cond", conditional=True)
    result = _evaluate(run, "--data", judged_data, "--iw-samples", 2, "--samples", 200, "--tstr", "--tstr-samples", 300)
    # An untrained model's samples are far from the data; real train vs real test is close.
    assert result["fd"] > result["fd_real"] > 0
    assert 1 <= result["inception_score"] <= 10 and result["inception_score_real"] > result["inception_score"]
    assert result["inception_score_mean"] > 0 and result["inception_score_std"] >= 0  # the usual 10-split report
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert 0 <= result["tstr_accuracy"] <= 1
    again = runner.invoke(app, ["classifier", "train", "--data", str(judged_data)])
    assert_one_error_line(again, "already cached", "--overwrite")


@pytest.mark.browser
def test_report_renders_in_a_headless_browser(run, tiny_data, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the report test needs Debian's chromium (make install adds it)"
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(run), "--data", str(tiny_data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    for name in (
        "reconstructions.png",
        "samples.png",
        "latent_pca.png",
        "latent_tsne.png",
        "interpolation.png",
        "arithmetic.png",
        "recon_error.png",
    ):
        assert name in pngs
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            (out / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    body = re.search(r'<body data-images-total="(\d+)" data-images-loaded="(\d+)"', dom)
    assert body, dom[:500]
    total, loaded = map(int, body.groups())
    assert total == len(pngs) and loaded == total
    assert "Configuration" in dom and "latent_dim" in dom


def test_latent_two_gets_a_manifold(tmp_path, tiny_data):
    import torch

    from vae_ray import checkpoint as ckpt
    from vae_ray.config import TrainConfig
    from vae_ray.model import build_model

    cfg = TrainConfig(arch="mnist", loss="matlab", latent_dim=2).validate()
    ckpt.save(
        tmp_path / "c",
        build_model("mnist", (28, 28, 1), 2),
        None,
        {"epoch": 1, "global_step": 1},
        cfg.to_dict(),
        {"name": "digits", "shape": [28, 28, 1], "classes": [], "num_classes": 10, "counts": {}},
    )
    torch.manual_seed(0)
    result = runner.invoke(app, ["report", str(tmp_path / "c"), "--data", str(tiny_data)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "report" / "manifold.png").is_file()


@pytest.mark.parametrize(
    "args, words",
    [
        (["evaluate", "/nonexistent/run"], ["/nonexistent/run"]),
        (["evaluate", "RUN", "--iw-samples", "0"], ["--iw-samples"]),
        (["evaluate", "RUN", "--data", "/nonexistent/data"], ["/nonexistent/data"]),
        (["evaluate", "RUN", "--split", "valid"], ["valid"]),
        (["evaluate", "RUN", "--tstr"], ["--tstr", "conditional"]),
        (["report", "/nonexistent/run"], ["/nonexistent/run"]),
        (["classifier", "train", "--data", "/nonexistent/data"], ["/nonexistent/data"]),
    ],
)
def test_bad_inputs_exit_2_with_one_line(run, tiny_data, args, words):
    args = [a.replace("RUN", str(run)) for a in args]
    if args[0] == "evaluate" and "--data" not in args:
        args += ["--data", str(tiny_data)]
    assert_one_error_line(runner.invoke(app, args), *words)
