"""`vae-ray encode`: every image's posterior mean and log-variance to Parquet,
exactly once and resumable, read back with pandas and pyarrow.

Most tests encode a one-shard split, which runs in this process (no Ray);
the Ray Data actor pool is exercised on the shared `ray_cluster`."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import vae_ray
from vae_ray import commands
from vae_ray.cli import app
from vae_ray.data import images_table, prepare, read_arrays, read_meta
from vae_ray.encode import MANIFEST, Encoding, ShardEncoder

from conftest import assert_one_error_line, make_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """40 + 40 synthetic digits, one shard per split: encoding a split is a one-shard job."""
    out = tmp_path_factory.mktemp("one") / "digits"
    prepare("synthetic", out, limit=40, shards=1)
    return out


def _snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file below `root`, hidden ones included: bytes, inode, mtime."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() or path.is_symlink():
            stat = path.lstat()
            found[str(path.relative_to(root))] = (
                path.read_bytes() if path.is_file() else b"",
                stat.st_ino,
                stat.st_mtime_ns,
            )
    return found


def _bytes(root: Path) -> dict[str, bytes]:
    return {name: data for name, (data, _, _) in _snapshot(root).items()}


def _encode_cli(run, data, out, *extra):
    return runner.invoke(app, ["encode", str(run), "--data", str(data), "--out", str(out), *extra])


def _with_shard(src: Path, dst: Path, split: str, change, update_meta: bool) -> Path:
    """A copy of a prepared dataset whose first `split` shard is rewritten by
    `change(images, labels, index)`; dataset.json's checksum follows only with `update_meta`."""
    shutil.copytree(src, dst)
    shard = dst / split / "part-00000.parquet"
    table = pq.read_table(shard)
    images, labels = read_arrays(dst, split, meta=read_meta(src))
    images, labels = change(images.copy(), labels.copy())
    pq.write_table(images_table(images, labels, table.column("index").to_numpy()), shard)
    if update_meta:
        meta = json.loads((dst / "dataset.json").read_text())
        meta["splits"][split]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
        (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def _check_against_api(run, data, frame, split):
    """Each row holds the posterior of its image, as `vae_ray.load(run).encode` gives it."""
    images, labels = read_arrays(data, split)
    rows = frame[frame["split"] == split].sort_values("index")
    assert list(rows["index"]) == list(range(len(images)))  # every image exactly once
    assert np.array_equal(rows["label"].to_numpy(), labels)
    mu, logvar = vae_ray.load(str(run)).encode(images)
    np.testing.assert_allclose(np.stack(rows["mu"].to_numpy()), mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(rows["logvar"].to_numpy()), logvar, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# What is written, and how it reads back
# ---------------------------------------------------------------------------
def test_a_one_shard_job_runs_here_and_reads_back_with_pandas_and_pyarrow(model_run, one_shard, tmp_path):
    import pandas as pd

    out = tmp_path / "latents"
    spec = {
        "command": "encode",
        "kwargs": {"options": {"checkpoint": str(model_run), "out": str(out), "data": str(one_shard), "split": "test"}},
    }
    summary = commands.run(spec)  # what a Ray Job runs, too
    assert summary["path"] == "in this process (one shard, no cluster named)" and summary["images"] == 40

    frame = pd.read_parquet(out)  # the manifest and markers stay out of the reader's way
    assert list(frame.columns) == ["index", "label", "split", "mu", "logvar"] and len(frame) == 40
    assert set(frame["split"]) == {"test"}
    _check_against_api(model_run, one_shard, frame, "test")
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.field("index").type == pa.int64() and schema.field("label").type == pa.int16()
    assert schema.field("mu").type == pa.list_(pa.float32(), 4) == schema.field("logvar").type
    assert pads.dataset(out).count_rows() == 40

    manifest = json.loads((out / MANIFEST).read_text())
    part = (out / "part-00000.parquet").read_bytes()
    assert manifest["status"] == "complete" and manifest["latent_dim"] == 4 and manifest["splits"] == ["test"]
    assert manifest["shards"] == [{"shard": 0, "images": 40, "sha256": hashlib.sha256(part).hexdigest()}]
    source = read_meta(one_shard)["splits"]["test"]["shards"][0]
    assert manifest["plan"]["sources"] == [
        {"split": "test", "file": source["file"], "rows": 40, "sha256": source["sha256"]}
    ]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "part-00000.parquet"]  # no markers left


@pytest.fixture(scope="module")
def pool_set(ray_cluster, model_run, tiny_data, tmp_path_factory):
    """tiny_data (two shards a split) encoded by a Ray Data pool of two actors."""
    out = tmp_path_factory.mktemp("pool") / "latents"
    job = Encoding(str(model_run), str(out), data=str(tiny_data), actors=2)
    manifest = job.run()
    assert job.path_taken.startswith("a Ray Data actor pool of 2 CPU actor(s)")
    return out, manifest


def test_a_ray_data_job_encodes_every_image_once_a_part_per_input_shard(pool_set, model_run, tiny_data):
    import pandas as pd

    out, manifest = pool_set
    meta = read_meta(tiny_data)
    sources = meta["splits"]["train"]["shards"] + meta["splits"]["test"]["shards"]
    assert len(manifest["shards"]) == len(sources) == 4  # train's shards first, then test's
    for entry, source in zip(manifest["shards"], sources, strict=True):
        part = (out / f"part-{entry['shard']:05d}.parquet").read_bytes()
        assert hashlib.sha256(part).hexdigest() == entry["sha256"]
        table = pq.read_table(pa.BufferReader(part))
        assert table.num_rows == source["rows"] == entry["images"]
        assert set(table.column("split").to_pylist()) == {source["file"].split("/")[0]}
    frame = pd.read_parquet(out)
    assert len(frame) == meta["splits"]["train"]["count"] + meta["splits"]["test"]["count"]
    for split in ("train", "test"):
        _check_against_api(model_run, tiny_data, frame, split)


# ---------------------------------------------------------------------------
# Exactly once: resume, rerun
# ---------------------------------------------------------------------------
def test_an_interrupted_run_rewrites_only_its_missing_parts_to_the_same_bytes(pool_set, model_run, tiny_data, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(pool_set[0], out)
    complete = pool_set[1]
    finished = _snapshot(out)
    # What a run killed while writing its third part leaves: the manifest as
    # first written, markers for parts 0, 1 and 3, part 2 written but not yet
    # marked (a marker follows its part), a writer's temporary file.
    identity = {k: v for k, v in complete.items() if k not in ("shards", "seconds", "path")} | {"status": "running"}
    (out / MANIFEST).write_text(json.dumps(identity))
    (out / ".progress").mkdir()
    for entry in complete["shards"]:
        if entry["shard"] != 2:
            marker = {k: entry[k] for k in ("shard", "images", "sha256")}
            (out / ".progress" / f"{entry['shard']:05d}.json").write_text(json.dumps(marker))
    (out / ".part-00002.parquet.0123abcd.tmp").write_bytes(b"PAR1 torn")

    # One actor now, two before: the rewritten part must not depend on it.
    again = _encode_cli(model_run, tiny_data, out, "--actors", "1")
    assert again.exit_code == 0, again.output
    resumed = _snapshot(out)
    assert sorted(resumed) == [MANIFEST, *(f"part-0000{i}.parquet" for i in range(4))]  # no markers, no temp file
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00003.parquet"):
        assert resumed[name] == finished[name]  # marked: not touched (bytes, inode, mtime)
    assert resumed["part-00002.parquet"][0] == finished["part-00002.parquet"][0]  # rewritten, the same bytes
    assert resumed["part-00002.parquet"][1:] != finished["part-00002.parquet"][1:]
    assert json.loads((out / MANIFEST).read_text())["shards"] == complete["shards"]


def test_the_same_command_on_a_complete_set_touches_nothing(model_run, one_shard, tmp_path):
    out = tmp_path / "latents"
    first = _encode_cli(model_run, one_shard, out, "--split", "train")
    assert first.exit_code == 0 and "in this process" in first.output, first.output
    before = _snapshot(out)
    again = _encode_cli(model_run, one_shard, out, "--split", "train", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["already_complete"] is True
    assert _snapshot(out) == before
    said = _encode_cli(model_run, one_shard, out, "--split", "train")
    assert "nothing to do" in said.output and _snapshot(out) == before


# ---------------------------------------------------------------------------
# Ownership: every leaf must be ours
# ---------------------------------------------------------------------------
INTRUDERS = [
    ".DS_Store",
    ".git/HEAD",
    "notes.txt",
    ".progress/notes.json",
    "part-00007.parquet",
    "sub/part-00000.parquet",
]


@pytest.mark.parametrize("intruder", INTRUDERS)
def test_a_folder_holding_anything_else_is_refused_untouched(model_run, one_shard, tmp_path, intruder):
    alone, beside = tmp_path / "alone", tmp_path / "beside"
    assert _encode_cli(model_run, one_shard, beside, "--split", "test").exit_code == 0
    for folder in (alone, beside):
        (folder / intruder).parent.mkdir(parents=True, exist_ok=True)
        (folder / intruder).write_text("someone's")
    for folder, words in ((alone, "not an encoded set"), (beside, "beside an encoded set")):
        before = _snapshot(folder)
        for extra in ((), ("--overwrite",), ("--split", "train", "--overwrite")):
            refused = _encode_cli(model_run, one_shard, folder, "--split", "test", *extra)
            assert_one_error_line(refused, words, intruder.split("/")[0])
            assert _snapshot(folder) == before


EDITS = {
    "a source outside the dataset": lambda m: m["plan"]["sources"][0].update(file="../../etc/part-00000.parquet"),
    "a latent size of the wrong type": lambda m: m["plan"].update(latent_dim=True),
    "an unknown status": lambda m: m.update(status="done"),
    "a part's entry missing": lambda m: m["shards"].pop(),
    "a checksum that is not one": lambda m: m["shards"][0].update(sha256="../x"),
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_a_damaged_or_edited_manifest_is_refused_untouched(model_run, one_shard, tmp_path, edit):
    out = tmp_path / "latents"
    assert _encode_cli(model_run, one_shard, out, "--split", "test").exit_code == 0
    manifest = json.loads((out / MANIFEST).read_text())
    edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    before = _snapshot(out)
    for extra in ((), ("--overwrite",)):
        assert_one_error_line(_encode_cli(model_run, one_shard, out, "--split", "test", *extra), MANIFEST, "damaged")
    assert _snapshot(out) == before


def test_links_and_other_tools_sets_are_not_ours(model_run, one_shard, tmp_path):
    linked = tmp_path / "linked"
    assert _encode_cli(model_run, one_shard, linked, "--split", "test").exit_code == 0
    (linked / "part-00000.parquet").rename(tmp_path / "elsewhere.parquet")
    (linked / "part-00000.parquet").symlink_to(tmp_path / "elsewhere.parquet")  # a part's very name
    assert_one_error_line(_encode_cli(model_run, one_shard, linked, "--split", "test"), "part-00000.parquet")
    generated = tmp_path / "generated"
    assert (
        runner.invoke(app, ["generate", str(model_run), "-n", "5", "-f", "parquet", "-o", str(generated)]).exit_code
        == 0
    )
    before = _snapshot(generated)
    assert_one_error_line(_encode_cli(model_run, one_shard, generated, "--overwrite"), "not an encoded set")
    assert _snapshot(generated) == before


def test_a_different_run_is_replaced_only_with_overwrite(model_run, one_shard, tmp_path):
    out = tmp_path / "latents"
    assert _encode_cli(model_run, one_shard, out, "--split", "test").exit_code == 0
    before = _snapshot(out)
    refused = _encode_cli(model_run, one_shard, out, "--split", "train")
    assert_one_error_line(refused, "different encoding run", "--overwrite")
    assert _snapshot(out) == before
    # The old set goes aside under a fixed name during the swap: one that holds something else stops it.
    aside = tmp_path / ".latents.old"
    aside.mkdir()
    (aside / "keep.txt").write_text("mine")
    assert_one_error_line(_encode_cli(model_run, one_shard, out, "--split", "train", "--overwrite"), ".latents.old")
    assert _snapshot(out) == before
    shutil.rmtree(aside)
    replaced = _encode_cli(model_run, one_shard, out, "--split", "train", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / MANIFEST).read_text())["splits"] == ["train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents"]  # no staging folder, no old set left


def test_an_overwrite_cut_short_is_finished_by_the_next_command(model_run, one_shard, tmp_path):
    """--overwrite swaps by two renames (OUT -> .OUT.old, staging -> OUT). A
    crash between them leaves no OUT; a crash after them leaves .OUT.old."""
    out, aside = tmp_path / "latents", tmp_path / ".latents.old"
    new = Encoding(str(model_run), str(tmp_path / "new"), data=str(one_shard), split="train")
    new.run()
    staging = tmp_path / f".latents.overwrite-{new.plan.digest()}"
    assert _encode_cli(model_run, one_shard, out, "--split", "test").exit_code == 0
    out.rename(aside)  # the first rename happened, the second did not
    (tmp_path / "new").rename(staging)
    finished = _encode_cli(model_run, one_shard, out, "--split", "train", "--overwrite")
    assert finished.exit_code == 0 and "swapped in now" in finished.output, finished.output
    assert json.loads((out / MANIFEST).read_text())["splits"] == ["train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents"]
    # Both renames happened; the old set's removal did not.
    assert _encode_cli(model_run, one_shard, tmp_path / "old", "--split", "test").exit_code == 0
    (tmp_path / "old").rename(aside)
    assert _encode_cli(model_run, one_shard, out, "--split", "train").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents"]


# ---------------------------------------------------------------------------
# Mistakes: one line, exit 2, nothing written
# ---------------------------------------------------------------------------
def test_user_mistakes_end_in_one_line(model_run, one_shard, tmp_path):
    out = tmp_path / "latents"
    cases = [
        (["--split", "valid"], ["--split"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--actors", "0"], ["--actors"]),
    ]
    for extra, words in cases:
        assert_one_error_line(_encode_cli(model_run, one_shard, out, *extra), *words)
    assert_one_error_line(runner.invoke(app, ["encode", str(model_run), "--data", str(one_shard)]), "--out")
    assert_one_error_line(_encode_cli(model_run, tmp_path / "nowhere", out), "not a prepared dataset")
    assert_one_error_line(_encode_cli(tmp_path / "nothing", one_shard, out), "no such checkpoint")
    assert_one_error_line(_encode_cli(model_run, one_shard, one_shard / "latents"), "dataset")
    # Checked before anything is sent to a cluster.
    sent = runner.invoke(
        app,
        [
            "encode",
            str(model_run),
            "--out",
            str(out),
            "--split",
            "valid",
            "--submit",
            "--address",
            "http://127.0.0.1:9",
        ],
    )
    assert_one_error_line(sent, "--split")
    assert not out.exists()


def test_a_set_its_disk_cannot_hold_is_refused_before_the_first_write(model_run, one_shard, tmp_path, monkeypatch):
    full = shutil.disk_usage(tmp_path)._replace(free=20_000)
    monkeypatch.setattr(shutil, "disk_usage", lambda where: full)
    refused = _encode_cli(model_run, one_shard, tmp_path / "latents", "--split", "test")
    assert_one_error_line(refused, "need up to", "20.0 KB free")
    assert not (tmp_path / "latents").exists()


def test_a_conditional_model_needs_the_labels_of_its_classes(tmp_path, one_shard):
    conditional = make_checkpoint(tmp_path / "cmodel", conditional=True)
    unlabelled = _with_shard(
        one_shard, tmp_path / "unlabelled", "test", lambda x, y: (x, np.where(np.arange(len(y)) == 3, -1, y)), True
    )
    out = tmp_path / "latents"
    assert_one_error_line(
        _encode_cli(conditional, unlabelled, out, "--split", "test"), "unlabelled", "class-conditional"
    )
    other = make_checkpoint(tmp_path / "other", conditional=True, classes=["a", "b"])
    assert_one_error_line(_encode_cli(other, one_shard, out, "--split", "test"), "classes")
    assert not out.exists()
    # The labelled split encodes, each image with its class.
    assert _encode_cli(conditional, unlabelled, out, "--split", "train").exit_code == 0
    import pandas as pd

    frame = pd.read_parquet(out)
    images, labels = read_arrays(one_shard, "train")
    mu, _ = vae_ray.load(str(conditional)).encode(images, label=list(labels))
    np.testing.assert_allclose(np.stack(frame.sort_values("index")["mu"].to_numpy()), mu, rtol=1e-5, atol=1e-6)


def test_a_label_the_int16_column_cannot_hold_is_refused(model_run, one_shard, tmp_path):
    """dataset.json and the shard agree (a hostile or hand-made dataset), but
    a label is beyond any class `data prepare` writes: refused, not wrapped."""
    data = shutil.copytree(one_shard, tmp_path / "wide")
    shard = data / "test" / "part-00000.parquet"
    table = pq.read_table(shard)
    labels = table.column("label").to_numpy().astype(np.int64)
    labels[5] = 40_000
    table = table.set_column(1, pa.field("label", pa.int64()), pa.array(labels))
    pq.write_table(table.replace_schema_metadata(pq.read_schema(shard).metadata), shard)
    meta = json.loads((data / "dataset.json").read_text())
    meta["splits"]["test"]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (data / "dataset.json").write_text(json.dumps(meta))
    refused = _encode_cli(model_run, data, tmp_path / "latents", "--split", "test")
    assert_one_error_line(refused, "label 40000", "outside -1..32766")


def test_a_shard_that_does_not_match_dataset_json_stops_the_job_in_one_line(model_run, one_shard, tmp_path):
    """Its footer is fine (same rows, same columns), its bytes are not the ones
    dataset.json names. In this process the error ends the command; a Ray
    actor hands it back as data (raised there, Ray would print its
    traceback), for the driver to end with."""
    changed = _with_shard(one_shard, tmp_path / "changed", "test", lambda x, y: (255 - x, y), False)
    refused = _encode_cli(model_run, changed, tmp_path / "here", "--split", "test")
    assert_one_error_line(refused, "part-00000.parquet", "does not match dataset.json")

    job = Encoding(str(model_run), str(tmp_path / "pool"), data=str(changed))
    actor = ShardEncoder(job.blob, **job._writer_options(str(tmp_path / "pool"), "cpu", 1))
    answer = actor({"shard": np.array([1, 0])})  # test's shard, then train's
    assert list(answer["shard"]) == [1, 0] and list(answer["images"]) == [0, 40]
    assert "does not match dataset.json" in answer["error"][0] and answer["error"][1] == ""
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == [".progress", "part-00000.parquet"]


def test_s3_round_trip(s3_bucket, model_run, one_shard):
    import pyarrow.fs as pafs

    out = f"s3://{s3_bucket}/latents"
    assert _encode_cli(model_run, one_shard, out, "--split", "test").exit_code == 0
    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], region="us-east-1")
    assert pads.dataset(f"{s3_bucket}/latents", filesystem=fs, format="parquet").count_rows() == 40
    again = _encode_cli(model_run, one_shard, out, "--split", "test")
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert_one_error_line(_encode_cli(model_run, one_shard, out, "--split", "train", "--overwrite"), "S3")
    with fs.open_output_stream(f"{s3_bucket}/latents/.env") as fh:
        fh.write(b"SECRET=1")
    assert_one_error_line(_encode_cli(model_run, one_shard, out, "--split", "test"), ".env")
