"""Bulk generation on the shared local cluster: counts, determinism,
exactly-once restarts, formats, S3, class-conditional layouts, errors."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from vae_ray.cli import app
from vae_ray.destination import MANIFEST, verify
from vae_ray.errors import UserError
from vae_ray.generate import generate
from vae_ray.genplan import GenerateOptions
from vae_ray.keyed_random import latent_normals
from vae_ray.sharded import actor_plan
from vae_ray.shardstore import write_folder

from conftest import assert_one_error_line, kill_process_tree, make_checkpoint, vae_ray_exe


@pytest.mark.parametrize(
    ("resources", "actors", "expected"),
    [
        ({"CPU": 4}, None, (4, 0.0)),  # CPUs: one single-threaded actor per CPU
        ({"CPU": 16, "GPU": 1}, None, (8, 0.125)),  # a GPU is shared by several actors, one CPU each
        ({"CPU": 2, "GPU": 1}, None, (1, 1.0)),  # a CPU left for Ray Data
        ({"CPU": 64, "GPU": 8}, None, (56, 0.1428)),  # 7 per GPU, rounded down so 7 fit on one
        ({"CPU": 16, "GPU": 2}, 3, (3, 0.5)),  # whole actors per GPU: the third fits on either
        ({"CPU": 16, "GPU": 2}, 1, (1, 1.0)),
    ],
)
def test_actor_plan_fills_the_node(resources, actors, expected):
    want, share = actor_plan(resources, "GPU" in resources, actors)
    assert (want, share) == expected
    if share:  # the actors fit on the GPUs Ray has
        per_gpu = -(-want // resources["GPU"])
        assert per_gpu * share <= 1.0


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cmodel"), conditional=True)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def test_latents_are_standard_normal_and_index_keyed():
    z = latent_normals(7, np.arange(20000), 16)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert np.array_equal(latent_normals(7, np.array([123, 5]), 16), z[[123, 5]])
    assert not np.array_equal(latent_normals(8, np.array([5]), 16), z[[5]])


def test_a_shard_folder_appears_whole_and_a_retry_replaces_it(tmp_path):
    write_folder(str(tmp_path), "00000", {"000000000.png": b"first", "000000001.png": b"first"})
    write_folder(str(tmp_path), "00000", {"000000000.png": b"retry"})  # a restarted actor writes the shard again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000"]  # no temporary folder left
    assert {p.name: p.read_bytes() for p in (tmp_path / "00000").iterdir()} == {"000000000.png": b"retry"}


def test_png_counts_layout_and_determinism_across_actor_counts(ray_cluster, model_run, tmp_path):
    a = generate(str(model_run), 57, str(tmp_path / "a"), shard_size=20, actors=1, seed=3)
    generate(str(model_run), 57, str(tmp_path / "b"), shard_size=20, actors=2, seed=3, batch_size=256)
    files = _files(tmp_path / "a")
    assert len(files) == 57 and a["count"] == 57 and len(a["shards"]) == 3
    assert "00000/000000000.png" in files and "00002/000000056.png" in files
    assert files == _files(tmp_path / "b")  # byte-identical whatever the actor count
    with Image.open(tmp_path / "a" / "00001" / "000000021.png") as im:
        assert im.mode == "L" and im.size == (28, 28)
    assert not [f for f in files if ".tmp-" in f or f.startswith(".progress")]
    verify(str(tmp_path / "a"))
    (tmp_path / "a" / "00001" / "000000021.png").write_bytes(b"\x89PNG damaged")
    with pytest.raises(UserError, match="shard 1 does not match its checksum"):
        verify(str(tmp_path / "a"))


def test_formats_hold_the_same_images(ray_cluster, model_run, tmp_path):
    import ray

    generate(str(model_run), 30, str(tmp_path / "png"), shard_size=16, seed=1)
    generate(str(model_run), 30, str(tmp_path / "pq"), fmt="parquet", shard_size=16, seed=1)
    generate(str(model_run), 30, str(tmp_path / "npz"), fmt="npz", shard_size=16, seed=1)
    table = pq.read_table(tmp_path / "pq" / "part-00001.parquet")
    assert table.num_rows == 14 and table.column("index").to_pylist()[0] == 16
    pixels = np.frombuffer(table.column("image").combine_chunks().buffers()[1], np.uint8)[:784].reshape(28, 28)
    with Image.open(tmp_path / "png" / "00001" / "000000016.png") as im:
        assert np.array_equal(np.asarray(im), pixels)
    with np.load(tmp_path / "npz" / "part-00001.npz") as npz:
        assert npz["images"].shape == (14, 28, 28, 1) and np.array_equal(npz["images"][0, ..., 0], pixels)
    ds = ray.data.read_parquet(str(tmp_path / "pq"), file_extensions=["parquet"])
    assert ds.count() == 30


def test_killed_run_restarts_to_the_same_bytes(ray_cluster, model_run, tmp_path):
    """A real `vae-ray generate` process (with its own local Ray cluster) is
    killed mid-way, then run again; the result equals an uninterrupted run."""
    resumed = tmp_path / "resumed"
    exe = str(Path(sys.executable).parent / "vae-ray")
    command = [
        exe,
        "generate",
        str(model_run),
        "--num",
        "800",
        "--shard-size",
        "100",
        "--seed",
        "5",
        "--actors",
        "1",
        "--out",
        str(resumed),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((resumed / ".progress").glob("*.json"))) < 2:
        time.sleep(0.05)
    kill_process_tree(proc)
    assert json.loads((resumed / MANIFEST).read_text())["status"] == "running"
    assert 2 <= len(list((resumed / ".progress").glob("*.json"))) < 8
    # What a writer killed half-way through a shard leaves: a temporary shard folder.
    partial = resumed / ".tmp-0123456789ab-00007"
    partial.mkdir(exist_ok=True)
    (partial / "000000700.png").write_bytes(b"\x89PNG half")
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert not list(resumed.rglob(".tmp-*"))
    # The uninterrupted reference runs here, on the shared cluster with two actors.
    reference = generate(str(model_run), 800, str(tmp_path / "ref"), shard_size=100, seed=5, actors=2)
    assert _files(resumed) == _files(tmp_path / "ref") and len(_files(resumed)) == 800
    assert json.loads((resumed / MANIFEST).read_text())["shards"] == reference["shards"]


@pytest.mark.subprocess
def test_sigterm_mid_set_says_how_to_continue_and_the_same_command_does(model_run, tmp_path):
    out = tmp_path / "set"
    command = [str(Path(sys.executable).parent / "vae-ray"), "generate", str(model_run), "--num", "20000"]
    command += ["--shard-size", "200", "--seed", "3", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".progress").glob("*.json")) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()[-2000:]
    lines = [line for line in proc.stderr.read().splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted: generation stopped by SIGTERM") and "same command again" in lines[-1]
    assert json.loads((out / MANIFEST).read_text())["status"] == "running"
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert verify(str(out))["count"] == 20000


def test_s3_round_trip(ray_cluster, s3_bucket, model_run):
    import pyarrow.fs as pafs

    uri = f"s3://{s3_bucket}/sets/run1"
    manifest = generate(str(model_run), 40, uri, fmt="parquet", shard_size=25, seed=2)
    assert manifest["count"] == 40
    verify(uri)
    fs, root = pafs.FileSystem.from_uri(uri)
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)))
    assert names == [MANIFEST, "part-00000.parquet", "part-00001.parquet"]
    table = pq.read_table(f"{root}/part-00001.parquet", filesystem=fs)
    assert table.num_rows == 15
    # The same command again finds the set complete and rewrites nothing.
    before = {i.path: i.mtime_ns for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))}
    again = generate(str(model_run), 40, uri, fmt="parquet", shard_size=25, seed=2)
    assert again["already_complete"] and again["shards"] == manifest["shards"]
    assert {i.path: i.mtime_ns for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))} == before


def test_conditional_per_class_is_an_image_folder(ray_cluster, conditional_run, tmp_path):
    from vae_ray.data import prepare

    generate(str(conditional_run), 50, str(tmp_path / "set"), per_class=True, shard_size=20)
    counts = {d.name: len(list(d.rglob("*.png"))) for d in (tmp_path / "set").iterdir() if d.is_dir()}
    assert counts == {str(k): 5 for k in range(10)}
    assert (tmp_path / "set" / "3" / "00000" / "000000013.png").is_file()  # image i has label i mod 10
    meta = prepare("imagefolder", tmp_path / "back", str(tmp_path / "set"), test_fraction=0.2)
    assert meta["classes"] == [str(k) for k in range(10)]
    assert meta["splits"]["train"]["count"] + meta["splits"]["test"]["count"] == 50
    one = generate(str(conditional_run), 12, str(tmp_path / "sevens"), label=7)
    assert one["count"] == 12 and len(list((tmp_path / "sevens" / "7").rglob("*.png"))) == 12


def test_generate_user_errors(ray_cluster, model_run, tmp_path):
    runner = CliRunner()
    assert_one_error_line(
        runner.invoke(app, ["generate", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]), "no such checkpoint"
    )
    broken = make_checkpoint(tmp_path / "broken")
    (broken / "latest" / "model.safetensors").write_bytes(b"garbage")
    assert_one_error_line(
        runner.invoke(app, ["generate", str(broken), "--out", str(tmp_path / "o")]), "corrupt checkpoint"
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert_one_error_line(
        runner.invoke(app, ["generate", str(model_run), "--num", "5", "--out", str(foreign)]),
        "holds other files",
        "--overwrite",
    )
    assert (foreign / "notes.txt").read_text() == "mine"
    assert_one_error_line(
        runner.invoke(app, ["generate", str(model_run), "--out", str(tmp_path / "o"), "--label", "3"]),
        "not a class-conditional model",
    )
    assert_one_error_line(
        runner.invoke(app, ["generate", str(model_run), "--out", str(tmp_path / "o"), "--num", "0"]), "--num"
    )
    assert_one_error_line(
        runner.invoke(app, ["generate", str(model_run), "--out", str(tmp_path / "o"), "--temperature", "inf"]),
        "--temperature must be a finite number",
    )
    assert_one_error_line(
        runner.invoke(app, ["generate", str(model_run), "--out", str(tmp_path / "o"), "--seed", "-3"]), "--seed"
    )
    assert_one_error_line(
        runner.invoke(app, ["generate", str(model_run), "--out", "gs://bucket/x"]), "unsupported storage scheme 'gs://'"
    )
    assert not (tmp_path / "o").exists()
    assert_one_error_line(runner.invoke(app, ["generate", "--verify", str(foreign)]), "not a generated set")
    # A finished set refuses a run with a different seed, unless --overwrite.
    assert runner.invoke(app, ["generate", str(model_run), "--num", "5", "--out", str(tmp_path / "s")]).exit_code == 0
    assert_one_error_line(
        runner.invoke(app, ["generate", str(model_run), "--num", "5", "--seed", "9", "--out", str(tmp_path / "s")]),
        "a different generation run",
    )
    ok = runner.invoke(
        app, ["generate", str(model_run), "--num", "5", "--seed", "9", "--overwrite", "--out", str(tmp_path / "s")]
    )
    assert ok.exit_code == 0 and json.loads((tmp_path / "s" / MANIFEST).read_text())["seed"] == 9


def test_a_one_shard_job_runs_in_this_process_with_the_same_bytes(ray_cluster, model_run, tmp_path):
    small = CliRunner().invoke(
        app, ["generate", str(model_run), "--num", "300", "--seed", "2", "--out", str(tmp_path / "here")]
    )
    assert small.exit_code == 0 and "in this process" in small.output, small.output
    generate(str(model_run), 300, str(tmp_path / "pool"), seed=2, actors=1)  # the Ray Data actor pool
    assert _files(tmp_path / "here") == _files(tmp_path / "pool") and len(_files(tmp_path / "here")) == 300


@pytest.mark.subprocess
@pytest.mark.parametrize("fmt", ["png", "parquet"])
def test_a_job_on_one_machine_decodes_here_while_a_pool_of_processes_encodes(ray_cluster, model_run, tmp_path, fmt):
    # A command with no cluster named: no Ray at all, the same bytes as the Ray Data actors write.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    here = tmp_path / "here"
    args = ["generate", str(model_run), "--num", "250", "--shard-size", "100", "--seed", "3", "--format", fmt]
    done = subprocess.run([vae_ray_exe(), *args, "--out", str(here), "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert "encoder process" in summary["path"] and "in this process" in summary["path"], summary
    assert not list(here.glob("**/.tmp-*"))
    generate(str(model_run), 250, str(tmp_path / "pool"), fmt=fmt, shard_size=100, seed=3, actors=2)
    ours, theirs = _files(here), _files(tmp_path / "pool")
    assert ours == theirs and len([n for n in ours if not n.startswith(".progress")]) == (250 if fmt == "png" else 3)
    manifest = verify(str(here))
    assert manifest["shards"] == verify(str(tmp_path / "pool"))["shards"]  # the same records on both paths


def test_generated_parquet_reads_with_pandas_pyarrow_and_duckdb(ray_cluster, model_run, tmp_path):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    out = tmp_path / "pq"
    generate(str(model_run), 30, str(out), fmt="parquet", shard_size=16, seed=1)
    frame = pd.read_parquet(out)
    assert len(frame) == 30 and list(frame.columns) == ["image", "label", "index"]
    assert sorted(frame["index"]) == list(range(30))
    assert pads.dataset(out).count_rows() == 30
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0] == 30


def test_hugging_face_sets_load_with_datasets_and_prepare_back(conditional_run, tmp_path, monkeypatch):
    import pandas as pd
    from datasets import load_dataset
    from PIL import Image as PILImage

    from vae_ray.data import prepare

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    out = tmp_path / "hf"
    made = CliRunner().invoke(
        app, ["generate", str(conditional_run), "--num", "40", "--per-class", "--format", "hf", "--out", str(out)]
    )
    assert made.exit_code == 0, made.output
    ds = load_dataset(
        "parquet", data_files=str(out / "data" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert len(ds) == 40 and ds.features["label"].names == [str(k) for k in range(10)]
    first = ds[3]
    assert isinstance(first["image"], PILImage.Image) and first["image"].size == (28, 28)
    assert ds.features["label"].int2str(first["label"]) == "3" and first["index"] == 3
    card = (out / "README.md").read_text()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["checkpoint_sha256"] in card and "seed" in card and "40" in card
    assert card.startswith("---\n") and "class_label" in card  # the Hub reads the features from the card
    assert len(pd.read_parquet(out / "data")) == 40
    verify(str(out))
    back = prepare("imagefolder", tmp_path / "back", str(out), test_fraction=0.25)
    assert back["classes"] == [str(k) for k in range(10)] and back["shape"] == [28, 28, 1]
    assert back["splits"]["train"]["count"] + back["splits"]["test"]["count"] == 40


def _by_index(root: Path) -> dict[int, bytes]:
    return {int(p.stem): p.read_bytes() for p in root.rglob("*.png")}


def test_a_filtered_set_keeps_confident_images_exactly_once(
    ray_cluster, conditional_run, model_run, tiny_data, tmp_path
):
    """--min-confidence: a judge of seed 1 (kept apart from the evaluation
    judge), candidates keyed by index, the same bytes from actors, from this
    process and after a resume; every image passes or is counted."""
    import shutil

    from vae_ray import judge as judges
    from vae_ray.card import dataset_card
    from vae_ray.data import read_arrays, read_meta
    from vae_ray.genplan import CONFIDENCE_PERCENTILE

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    runner = CliRunner()
    cli = ["generate", str(conditional_run), "--num", "60", "--min-confidence", "0.3", "--data", str(data)]
    missing = runner.invoke(app, [*cli, "--out", str(tmp_path / "none")])
    assert_one_error_line(missing, "classifier train --data")
    assert not (tmp_path / "none").exists()
    trained = runner.invoke(app, ["classifier", "train", "--data", str(data), "--seed", "1", "--epochs", "1"])
    assert trained.exit_code == 0, trained.output
    assert (data / "classifier" / "seed-1" / "model.pt").is_file() and not (data / "classifier" / "model.pt").exists()
    judge, _ = judges.load(str(data), read_meta(data), seed=1)

    def label_probability(images: dict[int, bytes]) -> np.ndarray:
        order = sorted(images)
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(images[i])))[..., None] for i in order])
        return judges.features_and_probs(judge, pixels)[1][np.arange(len(order)), np.array(order) % 10]

    plain = generate(str(conditional_run), 60, str(tmp_path / "plain"), shard_size=60)
    assert "filter" not in plain
    first = label_probability(_by_index(tmp_path / "plain"))
    threshold = float(np.median(first))  # about half the first candidates pass
    options = dict(per_class=True, min_confidence=threshold, data=str(data))
    filtered = generate(str(conditional_run), 60, str(tmp_path / "f"), shard_size=20, actors=2, **options)
    found = filtered["filter"]
    assert found["min_confidence"] == threshold and found["judge_sha256"] == judges.weights_digest(str(data), 1)
    assert 60 < found["candidates"] <= 60 * found["max_candidates"]
    assert found["acceptance_rate"] == round(60 / found["candidates"], 6)
    kept = _by_index(tmp_path / "f")
    assert sorted(kept) == list(range(60))
    passed = label_probability(kept) >= threshold
    assert int((~passed).sum()) == found["unmet"] < 60
    # An image whose first candidate passed is the unfiltered set's image; the others were redrawn.
    plain_images = _by_index(tmp_path / "plain")
    assert all(kept[i] == plain_images[i] for i in np.flatnonzero(first >= threshold))
    assert any(kept[i] != plain_images[i] for i in np.flatnonzero(first < threshold))
    # In this process, one shard: the same images, the same counts.
    single = generate(str(conditional_run), 60, str(tmp_path / "one"), shard_size=60, **options)
    assert _by_index(tmp_path / "one") == kept and single["filter"]["candidates"] == found["candidates"]
    verify(str(tmp_path / "f"))

    # A run cut short after shards 0 and 2 (their markers written), resumed: the same bytes and counts.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "f", cut)
    manifest = json.loads((cut / MANIFEST).read_text())
    (cut / ".progress").mkdir()
    for entry in manifest["shards"]:
        if entry["shard"] != 1:
            (cut / ".progress" / f"{entry['shard']:05d}.json").write_text(json.dumps(entry))
    for folder in cut.glob("*/00001"):
        shutil.rmtree(folder)
    running = {k: v for k, v in manifest.items() if k not in ("shards", "seconds", "path")} | {"status": "running"}
    running["filter"] = {"min_confidence": threshold, "judge_sha256": found["judge_sha256"]}
    (cut / MANIFEST).write_text(json.dumps(running))
    resumed = generate(str(conditional_run), 60, str(cut), shard_size=20, actors=1, **options)
    assert _by_index(cut) == kept and resumed["filter"] == found and resumed["shards"] == filtered["shards"]
    assert json.loads((cut / MANIFEST).read_text())["status"] == "complete"

    # auto, from the command line: per class, what the judge gives 95% of that class's real test images.
    test, test_labels = read_arrays(data, "test")
    real = judges.features_and_probs(judge, test)[1][np.arange(len(test)), test_labels]
    q = CONFIDENCE_PERCENTILE
    overall = np.percentile(real, q)
    expected = [np.percentile(real[test_labels == k], q) if (test_labels == k).any() else overall for k in range(10)]
    refused = runner.invoke(app, [*cli, "--out", str(tmp_path / "x"), "--min-confidence", "often"])
    assert_one_error_line(refused, "--min-confidence must be auto or a number")
    cli[cli.index("0.3")] = "auto"
    made = runner.invoke(app, [*cli, "--out", str(tmp_path / "auto"), "--shard-size", "30", "--json"])
    assert made.exit_code == 0, made.output
    found = json.loads(made.output)["filter"]
    thresholds = [float(v) for v in found["class_confidences"].split(",")]
    assert thresholds == pytest.approx(expected, abs=2e-6) and found["min_confidence"] == min(thresholds)
    kept = _by_index(tmp_path / "auto")
    below = label_probability(kept) < np.array(thresholds)[np.arange(60) % 10]
    assert int(below.sum()) == found["unmet"] < 60
    assert "of that class's real test images (--min-confidence auto" in dataset_card(
        json.loads((tmp_path / "auto" / MANIFEST).read_text())
    )
    again = runner.invoke(app, [*cli, "--out", str(tmp_path / "auto"), "--shard-size", "30", "--json"])
    assert json.loads(again.output)["already_complete"] and _by_index(tmp_path / "auto") == kept
    # Thresholds another machine would round otherwise: a rerun keeps the ones its set was made with.
    manifest = json.loads((tmp_path / "auto" / MANIFEST).read_text())
    nudged = ",".join(f"{v * 0.999999:.6g}" for v in thresholds)
    assert nudged != found["class_confidences"]
    manifest["plan"] |= {"class_confidences": nudged, "min_confidence": min(float(v) for v in nudged.split(","))}
    manifest["filter"] |= {"class_confidences": nudged}
    (tmp_path / "auto" / MANIFEST).write_text(json.dumps(manifest))
    again = runner.invoke(app, [*cli, "--out", str(tmp_path / "auto"), "--shard-size", "30", "--json"])
    assert json.loads(again.output)["already_complete"], again.output
    assert json.loads(again.output)["filter"]["class_confidences"] == nudged
    # An unlabelled set is judged by the class the judge reads: its thresholds come from real images the same way.
    reading = judges.features_and_probs(judge, test)[1]
    read, sure = reading.argmax(1), reading.max(1)
    expected = [np.percentile(sure[read == k], q) if (read == k).any() else np.percentile(sure, q) for k in range(10)]
    unlabelled = generate(str(model_run), 20, str(tmp_path / "u"), shard_size=20, min_confidence="auto", data=str(data))
    thresholds = [float(v) for v in unlabelled["filter"]["class_confidences"].split(",")]
    assert thresholds == pytest.approx(expected, abs=2e-6)


def test_near_copies_of_the_training_split_are_redrawn(ray_cluster, model_run, tiny_data, tmp_path):
    """--max-copy-distance: every kept image is farther than the threshold
    from every training image, or counted; `auto` is the 1st percentile of
    real test images' distances to the training split."""
    from vae_ray.data import read_arrays
    from vae_ray.quality import nearest_distances

    train = read_arrays(tiny_data, "train")[0]
    flat = lambda a: a.reshape(len(a), -1).astype(np.float32) / 255.0  # noqa: E731

    def distances(root: Path) -> np.ndarray:
        images = _by_index(root)
        return nearest_distances(
            flat(np.stack([np.asarray(Image.open(io.BytesIO(images[i]))) for i in sorted(images)])), flat(train)
        )

    generate(str(model_run), 40, str(tmp_path / "plain"), shard_size=40)
    first = distances(tmp_path / "plain")
    threshold = float(np.median(first))
    made = generate(
        str(model_run), 40, str(tmp_path / "far"), shard_size=40, max_copy_distance=threshold, data=str(tiny_data)
    )
    found = made["filter"]
    assert found["max_copy_distance"] == round(threshold, 6) and found["min_confidence"] == 0
    kept = distances(tmp_path / "far")
    assert int((kept <= found["max_copy_distance"]).sum()) == found["unmet"] < 40
    assert found["copies_dropped"] >= int((first <= found["max_copy_distance"]).sum()) > 0
    card = generate(
        str(model_run), 40, str(tmp_path / "hf"), fmt="hf", shard_size=40, max_copy_distance="auto", data=str(tiny_data)
    )
    test = read_arrays(tiny_data, "test")[0]
    expected = float(np.percentile(nearest_distances(flat(test), flat(train)), 1.0))
    assert card["filter"]["max_copy_distance"] == pytest.approx(expected, abs=1e-5)
    assert "near-copies" in (tmp_path / "hf" / "README.md").read_text()
    # A rerun keeps the distance its set began with, whatever this machine's rounding gives now.
    manifest = json.loads((tmp_path / "hf" / MANIFEST).read_text())
    nudged = round(card["filter"]["max_copy_distance"] * 0.9999, 6)
    manifest["plan"]["max_copy_distance"] = manifest["filter"]["max_copy_distance"] = nudged
    (tmp_path / "hf" / MANIFEST).write_text(json.dumps(manifest))
    again = generate(
        str(model_run), 40, str(tmp_path / "hf"), fmt="hf", shard_size=40, max_copy_distance="auto", data=str(tiny_data)
    )
    assert again["already_complete"] and again["filter"]["max_copy_distance"] == nudged
    refused = CliRunner().invoke(
        app, ["generate", str(model_run), "--out", str(tmp_path / "x"), "--max-copy-distance", "near"]
    )
    assert_one_error_line(refused, "--max-copy-distance must be auto or a number")


def test_a_set_written_before_filters_existed_is_still_this_set(model_run, tmp_path):
    """A manifest of an earlier version holds no filter fields: the same
    command finds its set complete (no rewrite, no 'different run')."""
    from vae_ray.genplan import FILTER_FIELDS

    out = tmp_path / "set"
    generate(str(model_run), 30, str(out), shard_size=30)
    manifest = json.loads((out / MANIFEST).read_text())
    for name in FILTER_FIELDS:
        del manifest["plan"][name]
    (out / MANIFEST).write_text(json.dumps(manifest))
    again = generate(str(model_run), 30, str(out), shard_size=30)
    assert again["already_complete"]


def test_a_gmm_prior_is_fitted_once_beside_the_run_and_resumes_to_the_same_bytes(
    ray_cluster, conditional_run, tiny_data, tmp_path
):
    """--prior gmm: a Ray Data job encodes the training split, one mixture
    per class is fitted and kept in the run folder, later sets reuse it, and
    a gmm set resumes to the same bytes; the plan names the mixture."""
    import hashlib
    import shutil

    import vae_ray
    from vae_ray.data import read_arrays
    from vae_ray.prior import Mixture

    run = tmp_path / "run"
    shutil.copytree(conditional_run, run)
    options = dict(per_class=True, prior="gmm", data=str(tiny_data))
    first = generate(str(run), 60, str(tmp_path / "a"), shard_size=20, actors=2, **options)
    stored = list(run.glob("prior-gmm-*.safetensors"))
    assert len(stored) == 1
    data = stored[0].read_bytes()
    plan = json.loads((tmp_path / "a" / MANIFEST).read_text())["plan"]
    assert plan["prior"] == "gmm" and plan["prior_sha256"] == hashlib.sha256(data).hexdigest()
    generate(str(run), 60, str(tmp_path / "hf"), fmt="hf", shard_size=60, **options)
    assert "Gaussian mixture" in (tmp_path / "hf" / "README.md").read_text()
    # One mixture per class, fitted to that class's codes (the posterior means of its training images).
    mixture = Mixture.from_bytes(data, "stored")
    images, labels = read_arrays(str(tiny_data), "train")
    codes, _ = vae_ray.load(str(run)).encode(images, labels.tolist())
    assert mixture.weights.shape[0] == 10 and mixture.dims == codes.shape[1]
    for c in (0, 7):
        centre = (mixture.weights[c][:, None] * mixture.means[c]).sum(0)
        assert np.allclose(centre, codes[labels == c].mean(0), atol=0.1 * codes[labels == c].std() + 1e-3)
    # Not N(0, I)'s images; the same images from this process and after a resume; the mixture kept.
    plain = generate(str(run), 60, str(tmp_path / "plain"), shard_size=20, per_class=True)
    kept = _by_index(tmp_path / "a")
    assert sorted(kept) == list(range(60)) and kept != _by_index(tmp_path / "plain")
    # The Python API's sample(prior="gmm") is the set's images 0..n-1.
    sampled = vae_ray.load(str(run)).sample(60, prior="gmm")
    assert all(np.array_equal(sampled[i, :, :, 0], np.asarray(Image.open(io.BytesIO(kept[i])))) for i in range(60))
    # vae-ray export carries the mixture, bound to the exported weights: the folder alone draws the same set.
    from vae_ray.hub import export

    written = export(str(run), str(tmp_path / "model"))
    assert "prior-gmm.safetensors" in written["files"]
    assert "--prior gmm" in (tmp_path / "model" / "README.md").read_text()
    assert np.array_equal(vae_ray.load(str(tmp_path / "model")).sample(60, prior="gmm"), sampled)
    generate(str(tmp_path / "model"), 60, str(tmp_path / "shared"), shard_size=60, **options)
    assert _by_index(tmp_path / "shared") == kept
    assert first["count"] == plain["count"] == 60
    modified = stored[0].stat().st_mtime_ns
    generate(str(run), 60, str(tmp_path / "one"), shard_size=60, **options)
    assert _by_index(tmp_path / "one") == kept and stored[0].stat().st_mtime_ns == modified
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "a", cut)
    manifest = json.loads((cut / MANIFEST).read_text())
    (cut / ".progress").mkdir()
    for entry in manifest["shards"][:2]:
        (cut / ".progress" / f"{entry['shard']:05d}.json").write_text(json.dumps(entry))
    for folder in cut.glob("*/00002"):
        shutil.rmtree(folder)
    running = {k: v for k, v in manifest.items() if k not in ("shards", "seconds", "path")} | {"status": "running"}
    (cut / MANIFEST).write_text(json.dumps(running))
    resumed = generate(str(run), 60, str(cut), shard_size=20, actors=1, **options)
    assert _by_index(cut) == kept and resumed["shards"] == first["shards"]
    # A damaged mixture is refused in one line; nothing is written.
    stored[0].write_bytes(data[:100])
    with pytest.raises(UserError, match="remove it to refit"):
        generate(str(run), 60, str(tmp_path / "never"), **options)
    assert not (tmp_path / "never").exists()


def test_generate_options_are_one_checked_object():
    """The options' defaults are typed once (GenerateOptions): the command,
    a submitted job's checks and the Python API all read them from there."""
    from vae_ray.genplan import CHUNK, GenerateOptions

    options = GenerateOptions.of({"checkpoint": "run", "out": "set", "num": 10})
    assert (options.num, options.fmt, options.chunk, options.prior) == (10, "png", CHUNK, "normal")
    with pytest.raises(UserError, match="unknown option.*colour"):
        GenerateOptions.of({"num": 1, "colour": "red"})
    with pytest.raises(UserError, match="--batch-size"):
        GenerateOptions.of({"num": 1, "batch_size": 0})  # 0 is not "the default" anywhere
    with pytest.raises(UserError, match="--label and --per-class"):
        GenerateOptions.of({"num": 1, "label": 3, "per_class": True})


def test_min_confidence_auto_is_a_percentile_of_real_images_per_class():
    """--min-confidence auto: per class, the judge's probability of the label
    that 95% of that class's real test images reach; a class without test
    images takes all classes' figure; a plan without it keeps its digest."""
    from vae_ray.genplan import CONFIDENCE_PERCENTILE, Plan, auto_class_confidences, confidence_values

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    probs = np.concatenate([rng.uniform(0.9, 1.0, 200), rng.uniform(0.1, 1.0, 200)])  # an easy and a hard class
    values = confidence_values(auto_class_confidences(probs, labels, 3))
    q = CONFIDENCE_PERCENTILE
    expected = [np.percentile(probs[:200], q), np.percentile(probs[200:], q), np.percentile(probs, q)]
    assert values == pytest.approx(expected, abs=1e-6) and values[0] > 0.9 > 0.2 > values[1]
    never = confidence_values(auto_class_confidences(np.zeros(10), np.zeros(10, dtype=np.int64), 1))
    assert never == [1e-6]  # a class the judge never reads still has a threshold to divide by
    plan = Plan(num=1, seed=0, format="png", temperature=1.0, labels="none", checkpoint_sha256="x")
    assert plan.confidence_thresholds() is None
    assert plan.digest() == "8740dade7d21"  # the digest of this plan before class_confidences existed
    with pytest.raises(UserError, match="--min-confidence must be auto or a probability"):
        GenerateOptions.of({"num": 1, "min_confidence": "often"})
    assert GenerateOptions.of({"num": 1, "min_confidence": "auto"}).min_confidence == "auto"
    for bad in ("", "0.5,x", "0.5,1", "0,0.5"):
        with pytest.raises(UserError, match="class confidences"):
            confidence_values(bad)


def test_pixel_temperature_sharpens_a_bernoulli_decoders_images(tmp_path):
    """--pixel-temperature T: each pixel's Bernoulli likelihood tempered,
    sigmoid(logit / T), the same bytes through generate and the Python API;
    1 is the plain plan (found complete); another likelihood, or a value out
    of range, is one line and writes nothing."""
    import vae_ray

    run = make_checkpoint(tmp_path / "bernoulli", loss="bernoulli")
    generate(str(run), 40, str(tmp_path / "mean"), shard_size=40, fmt="parquet")
    generate(str(run), 40, str(tmp_path / "sharp"), shard_size=40, fmt="parquet", pixel_temperature=0.1)
    manifest = json.loads((tmp_path / "sharp" / MANIFEST).read_text())
    assert manifest["plan"]["pixel_temperature"] == 0.1
    from vae_ray.card import dataset_card

    assert "| pixel temperature | 0.1 (each pixel's Bernoulli likelihood tempered" in dataset_card(manifest)
    plain_card = dataset_card(json.loads((tmp_path / "mean" / MANIFEST).read_text()))
    assert "pixel temperature" not in plain_card and "| temperature | 1 " in plain_card
    mean = _pixels(tmp_path / "mean")
    images = _pixels(tmp_path / "sharp")
    model = vae_ray.load(str(run))
    assert np.array_equal(images, model.sample(40, pixel_temperature=0.1).reshape(40, -1))
    assert np.array_equal(mean, model.sample(40).reshape(40, -1))
    import torch

    from vae_ray.images import to_uint8
    from vae_ray.prior import draw_latents

    with torch.no_grad():  # the formula itself: sigmoid(logit / T) of the decoder's logits
        logits = model.torch_module.decode(torch.from_numpy(draw_latents(0, np.arange(40), 4, 1.0)))
        assert np.array_equal(images, to_uint8(torch.sigmoid(logits.float() / 0.1)).reshape(40, -1))
    # every pixel moves away from grey, none crosses it
    centred, sharpened = mean.astype(int) - 127.5, images.astype(int) - 127.5
    assert (np.abs(sharpened) >= np.abs(centred)).all() and (np.sign(sharpened) == np.sign(centred)).all()
    assert np.abs(sharpened).mean() > np.abs(centred).mean() + 1
    from vae_ray.genplan import Plan

    plain = json.loads((tmp_path / "mean" / MANIFEST).read_text())["plan"]
    assert "pixel_temperature" in plain and Plan(**plain).digest() != Plan(**manifest["plan"]).digest()
    assert Plan(**plain).digest() == Plan(**{k: v for k, v in plain.items() if k != "pixel_temperature"}).digest()
    again = generate(str(run), 40, str(tmp_path / "mean"), shard_size=40, fmt="parquet", pixel_temperature=1.0)
    assert again["already_complete"]
    for bad in (0, 0.01, -1, float("nan"), 101):
        with pytest.raises(UserError, match="--pixel-temperature must be"):
            generate(str(run), 40, str(tmp_path / "never"), pixel_temperature=bad)
    matlab = make_checkpoint(tmp_path / "matlab")
    with pytest.raises(UserError, match="tempers a Bernoulli decoder.*likelihood is matlab"):
        generate(str(matlab), 40, str(tmp_path / "never"), pixel_temperature=0.7)
    with pytest.raises(UserError, match="needs a Bernoulli decoder"):
        vae_ray.load(str(matlab)).sample(4, pixel_temperature=0.7)
    with pytest.raises(UserError, match="auto is generate's"):
        model.sample(4, pixel_temperature="auto")
    with pytest.raises(UserError, match="must be a number"):
        model.sample(4, pixel_temperature=None)
    assert np.array_equal(model.sample(4, pixel_temperature=np.float32(0.5)), model.sample(4, pixel_temperature=0.5))
    assert not (tmp_path / "never").exists()


def test_pixel_temperature_auto_matches_the_training_pixels(tiny_data, tmp_path, monkeypatch):
    """--pixel-temperature auto: the ladder's temperature whose images' pixel
    values are distributed most like the training images', written into the
    plan as a number, so the same command resumes and finds the set complete
    (and so does the number itself); it needs a Bernoulli decoder and the
    model's dataset."""
    import torch

    from vae_ray.data import read_arrays
    from vae_ray.generate import Generation
    from vae_ray.genplan import PIXEL_LADDER

    monkeypatch.setattr("vae_ray.decoder.AUTO_PIXEL_VALUES", 300 * 784)  # 300 images a comparison
    run = make_checkpoint(tmp_path / "bernoulli", loss="bernoulli", seed=3)
    threads = torch.get_num_threads()
    first = generate(str(run), 20, str(tmp_path / "auto"), pixel_temperature="auto", data=str(tiny_data))
    assert torch.get_num_threads() == threads  # the caller's own setting, kept
    plan = json.loads((tmp_path / "auto" / MANIFEST).read_text())["plan"]
    chosen = plan["pixel_temperature"]
    assert chosen in PIXEL_LADDER and not first.get("already_complete")
    # the choice, made again by hand: the plain mean's logits at every temperature of the ladder
    import vae_ray

    model = vae_ray.load(str(run))
    real = read_arrays(tiny_data, "train")[0]
    quantiles = np.linspace(0, 1, 201)
    target = np.quantile(real[:300], quantiles)
    with torch.no_grad():
        from vae_ray.prior import draw_latents

        logits = model.torch_module.decode(torch.from_numpy(draw_latents(0, np.arange(300), 4, 1.0))).float()
    distance = {
        t: np.abs(np.quantile(np.round(torch.sigmoid(logits / t).numpy() * 255), quantiles) - target).mean()
        for t in PIXEL_LADDER
    }
    assert distance[chosen] <= min(distance.values()) + 0.5  # within half a grey level of the best
    # Into the same folder, auto keeps the temperature the set began with, without decoding again.
    rerun = Generation(str(run), 20, str(tmp_path / "auto"), pixel_temperature="auto", data=str(tiny_data))
    assert rerun.plan.pixel_temperature == chosen and rerun.pixel_distances is None
    fresh = Generation(str(run), 20, str(tmp_path / "other"), pixel_temperature="auto", data=str(tiny_data))
    assert fresh.plan.pixel_temperature == chosen and set(fresh.pixel_distances) == set(PIXEL_LADDER)
    again = generate(str(run), 20, str(tmp_path / "auto"), pixel_temperature="auto", data=str(tiny_data))
    same = generate(str(run), 20, str(tmp_path / "auto"), pixel_temperature=chosen)
    assert again["already_complete"] and same["already_complete"]
    matlab = make_checkpoint(tmp_path / "matlab")
    with pytest.raises(UserError, match="tempers a Bernoulli decoder"):  # before a mixture is fitted
        generate(str(matlab), 20, str(tmp_path / "never"), pixel_temperature="auto", prior="gmm")
    assert not list(matlab.glob("prior-*"))
    with pytest.raises(UserError, match="auto compares with the model's training images: pass --data"):
        generate(str(run), 20, str(tmp_path / "never"), pixel_temperature="auto")
    with pytest.raises(UserError, match="--pixel-temperature must be auto or a number"):
        generate(str(run), 20, str(tmp_path / "never"), pixel_temperature="sharp")
    typed = ["generate", str(run), "--num", "5", "--out", str(tmp_path / "never"), "--pixel-temperature", "sharp"]
    assert_one_error_line(CliRunner().invoke(app, typed), "--pixel-temperature must be auto or a number")
    assert not (tmp_path / "never").exists()


def _pixels(root: Path) -> np.ndarray:
    """A Parquet set's images as rows of pixels, in index order."""
    table = pq.read_table(sorted(root.glob("*.parquet")))
    order = np.argsort(table.column("index").to_numpy())
    rows = [np.frombuffer(b, np.uint8) for b in table.column("image").to_pylist()]
    return np.stack(rows)[order]


def test_group_temperatures_scale_each_latent_group():
    """--group-temperatures: a factor on T per latent group, top first,
    written one way; all ones is no option at all (the same plan)."""
    from vae_ray.genplan import canonical_group_temperatures
    from vae_ray.prior import draw_latents, group_scales

    assert canonical_group_temperatures("1,1.0") == "" and canonical_group_temperatures(None) == ""
    assert canonical_group_temperatures(" 1.0,1.30") == "1,1.3"
    for bad in ("1,x", "0", "-1,1", "nan", "1,,1", "1e9", ",".join(["1"] * 65)):
        with pytest.raises(UserError, match="--group-temperatures must be"):
            canonical_group_temperatures(bad)
    groups = [(1, 1, 4), (2, 2, 1), (1, 1, 3)]  # a dense top group, a 2x2 group, a dense third
    keys = np.arange(50)
    plain = draw_latents(3, keys, 11, 0.8)
    scaled = draw_latents(3, keys, 11, 0.8, group_scales(groups, "1,1.5,0.5"))
    assert np.array_equal(scaled[:, :4], plain[:, :4])
    assert np.array_equal(scaled[:, 4:8], plain[:, 4:8] * np.float32(1.5))
    assert np.array_equal(scaled[:, 8:], plain[:, 8:] * np.float32(0.5))


def test_group_temperatures_reach_the_images(model_run, tmp_path):
    """The MATLAB network has one latent group: its factor is a temperature,
    to the byte. A count that is not the model's is one line; all ones is
    the plain set (found complete)."""
    generate(str(model_run), 30, str(tmp_path / "hot"), shard_size=30, temperature=1.5)
    generate(str(model_run), 30, str(tmp_path / "group"), shard_size=30, group_temperatures="1.5")
    assert _files(tmp_path / "hot") == _files(tmp_path / "group")
    plan = json.loads((tmp_path / "group" / MANIFEST).read_text())["plan"]
    assert plan["group_temperatures"] == "1.5"
    import vae_ray

    model = vae_ray.load(str(model_run))  # the Python API draws the same latents
    assert np.array_equal(model.sample(8, group_temperatures="1.5"), model.sample(8, temperature=1.5))
    with pytest.raises(UserError, match="1 latent group"):
        model.sample(8, group_temperatures="1,2")
    with pytest.raises(UserError, match="gives 2 value.*has 1 latent group"):
        generate(str(model_run), 30, str(tmp_path / "never"), group_temperatures="1,1.2")
    with pytest.raises(UserError, match="gives 2 value.*has 1 latent group"):  # all ones is no effect, not no check
        generate(str(model_run), 30, str(tmp_path / "never"), group_temperatures="1,1")
    assert not (tmp_path / "never").exists()
    again = generate(str(model_run), 30, str(tmp_path / "hot"), shard_size=30, temperature=1.5, group_temperatures="1")
    assert again["already_complete"]
