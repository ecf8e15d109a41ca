"""`vae-ray evaluate-set`: a generated set judged against real data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vae_ray import judge, quality
from vae_ray.cli import app

from conftest import assert_one_error_line, make_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def judged(tiny_data, tmp_path_factory):
    """The tiny dataset (a copy: its judge is this module's) with a judge, and
    a 300-image labelled set of an untrained model in two formats."""
    tmp = tmp_path_factory.mktemp("quality")
    data = tmp / "digits"
    shutil.copytree(tiny_data, data)
    judge.train(str(data), epochs=2)
    run = make_checkpoint(tmp / "run", conditional=True)
    sets = {}
    for fmt in ("png", "hf"):
        sets[fmt] = tmp / f"gen-{fmt}"
        made = runner.invoke(
            app, ["generate", str(run), "--num", "300", "--format", fmt, "--out", str(sets[fmt]), "--shard-size", "100"]
        )
        assert made.exit_code == 0, made.output
    return data, sets


def test_every_format_reads_back_the_same_images_after_its_checksums(judged):
    _, sets = judged
    png, png_labels, manifest = quality.read_generated(str(sets["png"]))
    hf, hf_labels, _ = quality.read_generated(str(sets["hf"]))
    assert png.shape == (300, 28, 28, 1) and np.array_equal(png, hf)
    assert png_labels.tolist() == hf_labels.tolist() == [i % 10 for i in range(300)]
    assert manifest["count"] == 300
    first = next((sets["png"]).rglob("000000000.png"))
    assert np.array_equal(np.asarray(Image.open(first)), png[0, :, :, 0])
    # A changed file is found before any figure is computed.
    with open(first, "r+b") as fh:
        fh.seek(60)
        fh.write(b"\x00\x01")
    assert_one_error_line(runner.invoke(app, ["evaluate-set", str(sets["png"]), "--data", str(judged[0])]), "checksum")


@pytest.mark.slow
def test_a_set_is_judged_against_real_data(judged, tmp_path):
    data, sets = judged
    out = tmp_path / "q"
    done = runner.invoke(
        app, ["evaluate-set", str(sets["hf"]), "--data", str(data), "--out", str(out), "--steps", "30", "--json"]
    )
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    assert summary["images"] == 300
    # An untrained model's images are far from real ones: further than real train is from real test.
    assert summary["fd"] > summary["fd_real"] > 0 and summary["fd_ratio"] > 1
    for key in ("precision", "recall", "precision_real", "recall_real"):
        assert 0 <= summary[key] <= 1
    assert summary["recall_real"] > summary["recall"]
    # Classifiers trained on real images beat those trained on noise-like samples; the mixing
    # curve runs from all real (TRTR) to all synthetic (TSTR).
    curve = summary["mixing"]
    assert [m["synthetic_share"] for m in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve[0]["accuracy"] == summary["trtr_accuracy"] and curve[-1]["accuracy"] == summary["tstr_accuracy"]
    assert summary["trtr_accuracy"] > summary["tstr_accuracy"] and summary["tstr_ratio"] < 1
    # Near-copies: real test images fall under their own 1st percentile 1% of the time.
    for space in ("near_copies_pixels", "near_copies_features"):
        copies = summary[space]
        assert copies["fraction_real"] <= 0.02 and 0 <= copies["fraction"] <= 1
    assert json.loads((out / "quality.json").read_text()) == {k: v for k, v in summary.items() if k != "out"}
    assert Image.open(out / "samples_per_class.png").size[1] >= 10 * 28
    assert Image.open(out / "mixing.png").size[0] > 100  # the mixing curve, to look at
    # The model's report page shows the set: its figures, its grid per class and its mixing curve.
    page = tmp_path / "page"
    report = ["report", str(data.parent / "run"), "--data", str(data), "--out", str(page), "--quality", str(out)]
    for _ in range(2):  # the second replaces the first, set pictures and all
        shown = runner.invoke(app, report)
        assert shown.exit_code == 0, shown.output
    text = (page / "index.html").read_text()
    assert "Generated set 1" in text and "TSTR / TRTR" in text and f"{summary['tstr_ratio']:.4g}" in text
    assert (page / "set1_samples_per_class.png").read_bytes() == (out / "samples_per_class.png").read_bytes()
    assert (page / "set1_mixing.png").is_file() and not (page / "set1_samples.png").exists()
    assert_one_error_line(runner.invoke(app, [*report[:-1], str(tmp_path)]), "not an `evaluate-set --out` folder")
    # The same command again replaces its own folder; a folder of anything else is refused.
    again = runner.invoke(
        app, ["evaluate-set", str(sets["hf"]), "--data", str(data), "--out", str(out), "--no-tstr", "--json"]
    )
    assert again.exit_code == 0 and json.loads(again.output)["tstr_accuracy"] is None, again.output
    assert not (out / "mixing.png").exists()  # replaced whole: no curve from the earlier run stays
    (out / "mine.txt").write_text("x")
    refused = runner.invoke(app, ["evaluate-set", str(sets["hf"]), "--data", str(data), "--out", str(out)])
    assert_one_error_line(refused, "mine.txt")


def test_the_figures_go_into_the_sets_own_card(judged, tmp_path):
    """--card: the figures in the hf set's README.md, in place of earlier ones;
    the set still verifies; a set with no card is refused before any work."""
    from vae_ray.destination import verify

    data, sets = judged
    hf = tmp_path / "hf"
    shutil.copytree(sets["hf"], hf)
    before = (hf / "README.md").read_text()
    args = ["evaluate-set", str(hf), "--data", str(data), "--no-tstr", "--card", "--json"]
    for _ in range(2):  # the second run replaces the first run's section
        done = runner.invoke(app, args)
        assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    card = (hf / "README.md").read_text()
    assert card.startswith(before.rstrip("\n")) and card.count("## Quality against real data") == 1
    assert f"{summary['fd']:.3f}" in card and f"{summary['precision']:.3f}" in card
    verify(str(hf))
    refused = runner.invoke(app, ["evaluate-set", str(sets["png"]), "--data", str(data), "--card"])
    assert_one_error_line(refused, "a png set, which has none")


def test_near_copies_are_counted_against_real_test_images():
    rng = np.random.default_rng(0)
    train, test = rng.random((500, 32)), rng.random((200, 32))
    copies = quality.near_copies(train[:50] + 1e-4, test, train, percentile=1.0)
    assert copies["fraction"] == 1.0 and copies["fraction_real"] == pytest.approx(0.01, abs=0.006)
    fresh = quality.near_copies(rng.random((200, 32)), test, train, percentile=1.0)
    assert fresh["fraction"] < 0.05
    d = quality.nearest_distances(np.array([[0.0, 0.0], [3.0, 4.0]]), np.array([[0.0, 1.0], [3.0, 0.0]]))
    assert d.tolist() == pytest.approx([1.0, 4.0])


def test_a_node_that_cannot_see_a_local_set_says_so(tmp_path):
    """A cluster's task reading a local set that is not on its node (the
    driver checked it on its own): one line saying where the set must be."""
    from vae_ray.errors import UserError

    shard = json.dumps(
        {"entry": {"shard": 0, "sha256": "0" * 64}, "names": ["part-00000.parquet"], "start": 0, "end": 1}
    )
    with pytest.raises(UserError, match="not on the node that read it .*every node sees it"):
        quality._read_shards({"shard": np.array([shard])}, str(tmp_path / "elsewhere"), "parquet", (28, 28, 1))


def test_mistakes_are_one_line(judged, tmp_path):
    data, sets = judged
    bare = tmp_path / "bare"
    shutil.copytree(data, bare, ignore=shutil.ignore_patterns("classifier"))
    cases = [
        (["evaluate-set", str(sets["png"]), "--data", str(bare)], "no judge classifier"),
        (["evaluate-set", str(tmp_path), "--data", str(data)], "not a generated set"),
        (["evaluate-set", str(sets["png"]), "--data", str(data), "--limit", "5"], "--limit"),
        (["evaluate-set", str(sets["png"]), "--data", str(data), "--copy-percentile", "80"], "--copy-percentile"),
    ]
    for args, words in cases:
        assert_one_error_line(runner.invoke(app, args), words)
    assert not (tmp_path / "q").exists()


@pytest.mark.ray
def test_with_a_cluster_named_the_classifiers_train_there_as_ray_tasks(ray_cluster, judged):
    import time

    import ray
    from ray.util.state import list_tasks

    data, sets = judged
    args = ["evaluate-set", str(sets["hf"]), "--data", str(data), "--steps", "30", "--no-mixing", "--json"]
    here = runner.invoke(app, args)
    assert here.exit_code == 0, here.output
    there = runner.invoke(app, [*args, "--address", ray.get_runtime_context().gcs_address])
    assert there.exit_code == 0, there.output
    mine, theirs = json.loads(here.output), json.loads(there.output)
    # The same classifiers (seeds, steps, images); a task's one CPU only reorders float sums.
    for key in ("trtr_accuracy", "tstr_accuracy"):
        assert theirs[key] == pytest.approx(mine[key], abs=0.01), key
    assert theirs["fd"] == mine["fd"] and theirs["recall"] == mine["recall"]  # the same images, read by Ray Data
    assert mine["read_by"] == "this process" and theirs["read_by"].startswith("a Ray Data job")
    deadline, ran = time.time() + 30, []
    while len(ran) < 2 and time.time() < deadline:  # task events reach the state API within seconds
        ran = [
            t
            for t in list_tasks(filters=[("state", "=", "FINISHED")], limit=10_000)
            if t.name.endswith("tstr_classifier")
        ]
        time.sleep(0.5)
    assert len(ran) >= 2  # TRTR and TSTR, one task each


@pytest.mark.ray
def test_a_ray_data_job_reads_every_shard_in_order_and_checks_each(ray_cluster, judged, tmp_path):
    """Shards read by Ray Data tasks land where their indices say, whatever
    order the tasks finish in; a changed shard is the user's one-line error."""
    import ray

    _, sets = judged
    address = ray.get_runtime_context().gcs_address
    here, here_labels, _ = quality.read_generated(str(sets["hf"]))  # (the PNG set is broken on purpose above)
    there, there_labels, _ = quality.read_generated(str(sets["hf"]), address=address)
    assert len(here) == 300
    assert np.array_equal(here, there) and np.array_equal(here_labels, there_labels)
    part, _, _ = quality.read_generated(str(sets["hf"]), limit=120, address=address)
    assert np.array_equal(part, here[:120])
    broken = tmp_path / "broken"
    shutil.copytree(sets["hf"], broken)
    shard = sorted(broken.rglob("*.parquet"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(quality.UserError, match="checksum"):
        quality.read_generated(str(broken), address=address)
