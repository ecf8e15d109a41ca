"""`vae-ray tune-sampling`: a Ray Tune grid over how to sample one trained
model, every trial scoring the very images `generate` writes."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vae_ray.cli import app
from vae_ray.errors import UserError
from vae_ray.sampling import _command, parse_grid, search

from conftest import assert_one_error_line, make_checkpoint


def test_grids_and_options_are_checked_before_anything_runs(tmp_path):
    from vae_ray.sampling import check_grid

    assert parse_grid("0.8, 1.0,0.8,", "temperatures", float) == [0.8, 1.0]
    grid = check_grid(temperatures="1", priors="normal", pixel_temperatures="1,0.7", group_temperatures="1,1;1,1.30;")
    assert grid["pixel_temperature"] == [1.0, 0.7] and grid["group_temperatures"] == ["", "1,1.3"]
    assert check_grid()["group_temperatures"] == [""] and check_grid()["pixel_temperature"] == [1.0]
    assert check_grid(min_confidences="0,Auto,0.9")["min_confidence"] == [0.0, "auto", 0.9]
    best = {"temperature": 0.9, "prior": "gmm", "group_temperatures": "", "pixel_temperature": 1.0}
    command = _command("run", best | {"min_confidence": "auto"}, 1, "auto")
    assert "--min-confidence auto --judge-seed 1 --max-copy-distance auto" in command
    assert "--min-confidence 0.9 " in _command("run", best | {"min_confidence": 0.9}, 1, 0)
    for bad, match in (
        ({"pixel_temperatures": "0.7,0"}, "--pixel-temperature must be"),
        ({"group_temperatures": "1,1;1,x"}, "--group-temperatures must be"),
        ({"pixel_temperatures": "0.5,0.6,0.7,0.8,0.9", "min_confidences": "0,0.5,0.9"}, "the grid has 90 trials"),
        ({"temperatures": "warm"}, "--temperatures"),
        ({"temperatures": "0"}, "--temperature"),
        ({"priors": "normal,flow"}, "--prior"),
        ({"min_confidences": "1.5"}, "--min-confidence"),
        ({"metric": "likelihood"}, "--metric"),
        ({"num": 10}, "--num"),
        ({"temperatures": ",".join(str(0.1 * i) for i in range(1, 10)), "min_confidences": "0,0.1,0.2,0.3,0.4"}, "64"),
    ):
        with pytest.raises(UserError, match=match):
            search("nowhere", str(tmp_path / "out"), **bad)
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_a_sampling_search_scores_what_generate_writes(ray_cluster, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    run = make_checkpoint(tmp_path / "run", conditional=True, loss="bernoulli")
    runner = CliRunner()
    unjudged = runner.invoke(app, ["tune-sampling", str(run), "--data", str(data), "--out", str(tmp_path / "s")])
    assert_one_error_line(unjudged, "classifier train --data")
    trained = runner.invoke(app, ["classifier", "train", "--data", str(data), "--epochs", "1"])
    assert trained.exit_code == 0, trained.output

    options = ["--data", str(data), "--temperatures", "0.5,1", "--priors", "normal,gmm", "--num", "100"]
    done = runner.invoke(app, ["tune-sampling", str(run), *options, "--out", str(tmp_path / "s"), "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "s" / "results.csv").read_text())))
    assert len(rows) == 4 and {(r["temperature"], r["prior"]) for r in rows} == {
        (t, p) for t in ("0.5", "1.0") for p in ("normal", "gmm")
    }
    fds = [float(r["fd"]) for r in rows]
    assert fds == sorted(fds) and summary["best_value"] == pytest.approx(fds[0])
    best = json.loads((tmp_path / "s" / "best.json").read_text())
    grid_keys = ("temperature", "prior", "min_confidence", "pixel_temperature", "group_temperatures")
    assert best["best"] == {k: summary["trials"][0][k] for k in grid_keys}
    assert f"--prior {best['best']['prior']}" in best["command"]
    assert Image.open(tmp_path / "s" / "search.png").size[0] > 100
    assert list(run.glob("prior-gmm-*.safetensors"))  # fitted once, before the trials

    # The best row scored the images `generate` writes with its settings.
    settings = best["best"]
    out = tmp_path / "gen"
    made = runner.invoke(
        app,
        [
            "generate",
            str(run),
            "--num",
            "100",
            "--out",
            str(out),
            "--temperature",
            str(settings["temperature"]),
            "--prior",
            settings["prior"],
            "--data",
            str(data),
        ],
    )
    assert made.exit_code == 0, made.output
    from vae_ray.sampling import _generation

    job = {"checkpoint": str(run), "data": str(data), "num": 100, "seed": 0, "judge_seed": 1, "max_copy_distance": 0}
    images, _, _ = _generation(job, settings).decoder().decode(0, 100)
    written = sorted(out.rglob("*.png"), key=lambda p: int(p.stem))
    assert np.array_equal(np.stack([np.asarray(Image.open(p)) for p in written])[..., None], images)

    # Again into the same folder, as a submitted job's driver runs it: replaced
    # whole. This grid searches pixel and group temperatures.
    from vae_ray import commands

    spec = {
        "command": "sampling",
        "kwargs": {
            "options": {"checkpoint": str(run), "out": str(tmp_path / "s"), "data": str(data), "temperatures": "1"}
            | {"priors": "normal", "num": 100, "pixel_temperatures": "1,0.5", "group_temperatures": "1;1.5"}
        },
    }
    commands.validate(spec)
    again = commands.run(spec)
    assert again["best"]["temperature"] == 1.0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "s" / "results.csv").read_text())))
    assert {(r["pixel_temperature"], r["group_temperatures"]) for r in rows} == {
        (p, g) for p in ("1.0", "0.5") for g in ("", "1.5")
    }
    best = again["best"]
    assert ("--pixel-temperature 0.5" in again["command"]) == (best["pixel_temperature"] == 0.5)
    assert ("--group-temperatures 1.5" in again["command"]) == (best["group_temperatures"] == "1.5")
    figures = {(r["pixel_temperature"], r["group_temperatures"]): float(r["fd"]) for r in rows}
    assert len(set(figures.values())) == 4  # each setting drew other images
    matlab = make_checkpoint(tmp_path / "matlab", conditional=True)
    assert_one_error_line(
        runner.invoke(app, ["tune-sampling", str(matlab), *options, "--pixel-temperatures", "1,0.7", "--out", "x"]),
        "tempers a Bernoulli decoder",
    )
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["tune-sampling", str(run), *options, "--out", str(tmp_path / "theirs")])
    # A mistake in a submitted search is found here, before any cluster is asked.
    bad = [
        "tune-sampling",
        str(run),
        "--out",
        "x",
        "--metric",
        "likelihood",
        "--submit",
        "--address",
        "http://127.0.0.1:9",
    ]
    assert_one_error_line(runner.invoke(app, bad), "--metric must be one of")
    assert_one_error_line(refused, "notes.txt")
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["notes.txt"]
