"""Hostile and damaged inputs to the dataset code (issue #27): a dataset
folder holding somebody's files, a swap cut short, small files that declare
huge contents, links out of a tree, a prepare running under a reader.

Every case uses real files (written with pyarrow, tarfile, json) and the real
CLI; a refusal is one line and exit status 2, and nothing is touched."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from vae_ray import storage
from vae_ray.cli import app
from vae_ray.data import image_schema, images_table, prepare, read_meta, sha256_file
from vae_ray.errors import UserError

from conftest import assert_one_error_line, make_checkpoint, write_cifar_batches, write_fake_idx_dataset

runner = CliRunner()


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _prepare_cli(out: Path, limit: int, *extra: str):
    return runner.invoke(app, ["data", "prepare", "synthetic", "--limit", str(limit), "--out", str(out), *extra])


# ---------------------------------------------------------------------------
# 1. --overwrite replaces a folder only when everything in it is ours
# ---------------------------------------------------------------------------
FOREIGN = [
    (".git/HEAD", "ref: refs/heads/main\n"),
    (".dvc/config", "[core]\n"),
    (".env", "AWS_SECRET_ACCESS_KEY=hunter2\n"),
    ("notes.txt", "months of work\n"),
    ("train/README.md", "where these came from\n"),
    ("classifier/my-own-model.ckpt", "weights\n"),
    ("test/part-00000.parquet.orig", "a backup\n"),
    (".cache/", None),  # an empty folder is somebody's too
]


@pytest.mark.parametrize("rel, content", FOREIGN, ids=[f for f, _ in FOREIGN])
def test_overwrite_refuses_a_dataset_folder_holding_anything_else(tmp_path, rel, content):
    out = tmp_path / "d"
    assert _prepare_cli(out, 10).exit_code == 0
    target = out / rel
    if content is None:
        target.mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    before = _snapshot(out)
    result = _prepare_cli(out, 12, "--overwrite")
    assert_one_error_line(result, rel.rstrip("/"), "did not write")
    assert _snapshot(out) == before
    assert read_meta(out)["splits"]["train"]["count"] == 10  # the old dataset, intact
    assert {p.name for p in tmp_path.iterdir()} <= {"d", ".d.lock"}  # no staging folder left


def test_overwrite_refuses_a_link_inside_the_dataset_folder(tmp_path):
    out = tmp_path / "d"
    assert _prepare_cli(out, 10).exit_code == 0
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (out / "train" / "part-00001.parquet").symlink_to(elsewhere / "keep.txt")
    (out / "classifier").symlink_to(elsewhere, target_is_directory=True)
    assert_one_error_line(_prepare_cli(out, 12, "--overwrite"), "did not write")
    assert (elsewhere / "keep.txt").read_text() == "mine"
    assert (out / "classifier").is_symlink() and read_meta(out)["splits"]["train"]["count"] == 10


def test_overwrite_replaces_a_folder_holding_only_what_vae_ray_wrote(tmp_path):
    from vae_ray import judge

    out = tmp_path / "d"
    assert _prepare_cli(out, 20).exit_code == 0
    assert runner.invoke(app, ["data", "show", str(out), "--num", "4"]).exit_code == 0  # preview.png
    judge.train(str(out), epochs=1, batch_size=8)  # classifier/model.pt, classifier/info.json
    # What a killed `data show` or judge leaves behind: our own temporary names.
    (out / ".preview.png.0123abcd.tmp").write_bytes(b"half a png")
    (out / "classifier" / ".model.pt.89abcdef.tmp").write_bytes(b"half")
    assert {"preview.png", "classifier/model.pt", "classifier/info.json"} <= set(storage.leaves(str(out)))
    result = _prepare_cli(out, 12, "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_meta(out)["splits"]["train"]["count"] == 12
    assert sorted(storage.leaves(str(out))) == ["dataset.json", "test/part-00000.parquet", "train/part-00000.parquet"]


# ---------------------------------------------------------------------------
# 8. A swap cut between its two renames is finished or rolled back
# ---------------------------------------------------------------------------
def _half_swapped(tmp_path: Path, complete: bool) -> tuple[Path, Path, Path]:
    """Dataset A (10 images) at d, then the first rename of a swap to B (12
    images) done by hand, as a crash between the renames leaves it."""
    out = tmp_path / "d"
    prepare("synthetic", out, limit=10)
    prepare("synthetic", tmp_path / "b", limit=12)
    old, partial = tmp_path / ".d.old-0123abcd", tmp_path / ".d.partial-89abcdef"
    out.rename(old)
    (tmp_path / "b").rename(partial)
    if not complete:  # the new dataset was still being written: its dataset.json is the last thing written
        (partial / "dataset.json").unlink()
    return out, old, partial


def test_a_swap_cut_after_the_new_dataset_was_complete_is_finished(tmp_path):
    out, old, partial = _half_swapped(tmp_path, complete=True)
    result = _prepare_cli(out, 12)  # the command that was interrupted, run again
    assert result.exit_code == 0, result.output
    assert "already holds this dataset" in result.output
    assert read_meta(out)["splits"]["train"]["count"] == 12
    assert not old.exists() and not partial.exists()


def test_a_swap_cut_before_the_new_dataset_was_complete_is_rolled_back(tmp_path):
    out, old, partial = _half_swapped(tmp_path, complete=False)
    result = _prepare_cli(out, 10)
    assert result.exit_code == 0, result.output
    assert "already holds this dataset" in result.output
    assert read_meta(out)["splits"]["train"]["count"] == 10  # the old one, back in place
    assert not old.exists() and not partial.exists()
    # A damaged new dataset is not swapped in either.
    out2, old2, partial2 = _half_swapped(tmp_path / "again", complete=True)
    shard = partial2 / "train" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-9] + b"corrupted")
    assert _prepare_cli(out2, 10).exit_code == 0
    assert read_meta(out2)["splits"]["train"]["count"] == 10 and not old2.exists() and not partial2.exists()


def test_leftovers_of_a_finished_or_abandoned_swap_are_removed_and_others_kept(tmp_path):
    out = tmp_path / "d"
    prepare("synthetic", out, limit=10)
    shutil.copytree(out, tmp_path / ".d.old-0123abcd")  # crash after the second rename
    shutil.copytree(out, tmp_path / ".d.partial-89abcdef")  # crash while writing
    not_ours = [tmp_path / ".d.partial-notours", tmp_path / ".dd.old-0123abcd", tmp_path / ".d.old-0123abcd.bak"]
    for path in not_ours:
        path.mkdir()
        (path / "keep").write_text("x")
    (tmp_path / ".d.old-fedcba98").symlink_to(tmp_path / ".d.partial-notours", target_is_directory=True)
    result = _prepare_cli(out, 10)
    assert result.exit_code == 0 and "already holds this dataset" in result.output
    assert not (tmp_path / ".d.old-0123abcd").exists() and not (tmp_path / ".d.partial-89abcdef").exists()
    assert all((path / "keep").read_text() == "x" for path in not_ours)
    assert (tmp_path / ".d.old-fedcba98").is_symlink()


# ---------------------------------------------------------------------------
# 6. Small files, large memory: sizes from footers and headers first
# ---------------------------------------------------------------------------
def _swap_shard(root: Path, split: str, write) -> Path:
    """Replace a shard with `write(path)`'s file and record its checksum in
    dataset.json, so that only the file's own contents can give it away."""
    path = root / split / "part-00000.parquet"
    write(path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["splits"][split]["shards"][0]["sha256"] = sha256_file(path)
    (root / "dataset.json").write_text(json.dumps(meta))
    return path


def _zero_rows(path: Path, rows: int, width: int = 28 * 28) -> None:
    h = w = int(np.sqrt(width))
    with pq.ParquetWriter(path, image_schema(h, w, 1), compression="zstd") as writer:
        for start in range(0, rows, 4000):
            n = min(4000, rows - start)
            writer.write_table(
                images_table(np.zeros((n, h, w, 1), np.uint8), np.zeros(n, np.int64), np.arange(start, start + n))
            )


def test_a_shard_holding_more_rows_than_declared_is_refused_from_its_footer(tmp_path):
    from vae_ray import ingest
    from vae_ray.data import read_arrays, summary

    out = tmp_path / "d"
    prepare("synthetic", out, limit=10)
    path = _swap_shard(out, "train", lambda p: _zero_rows(p, 120_000))
    assert path.stat().st_size < 1_000_000  # a small file ...
    # ... that would take 94 MB: refused from its footer, before a row is read.
    words = ["part-00000.parquet", "120,000 rows", "dataset.json declares 10"]
    assert_one_error_line(runner.invoke(app, ["data", "show", str(out), "--num", "1"]), *words)
    assert_one_error_line(runner.invoke(app, ["data", "verify", str(out)]), *words)
    meta = read_meta(out)
    with pytest.raises(UserError, match="120,000 rows"):
        read_arrays(out, "train", limit=1, meta=meta)
    with pytest.raises(UserError, match="120,000 rows"):
        ingest.read_rows(summary(meta), "train", 0, 1)  # what training and evaluation workers read
    # Fewer rows than declared are refused the same way.
    _swap_shard(out, "test", lambda p: _zero_rows(p, 3))
    assert_one_error_line(
        runner.invoke(app, ["data", "show", str(out), "--split", "test", "--num", "1"]), "3 rows", "declares 10"
    )


def test_shards_on_s3_are_checked_from_their_footers_too(tmp_path, s3_bucket):
    out = tmp_path / "d"
    prepare("synthetic", out, limit=10)
    uri = f"s3://{s3_bucket}/hostile/{tmp_path.name}/d"
    storage.upload(out, uri)
    assert runner.invoke(app, ["data", "verify", uri]).exit_code == 0
    show = ["data", "show", uri, "--num", "1", "--out", str(tmp_path / "p.png")]
    assert runner.invoke(app, show).exit_code == 0
    _swap_shard(out, "train", lambda p: _zero_rows(p, 120_000))
    storage.upload(out, uri)
    (tmp_path / "p.png").unlink()
    for args in (show, ["data", "verify", uri]):
        assert_one_error_line(runner.invoke(app, args), "120,000 rows", "dataset.json declares 10")
    assert not (tmp_path / "p.png").exists()


def test_a_dataset_json_whose_counts_disagree_with_its_shards_is_refused(tmp_path):
    out = tmp_path / "d"
    prepare("synthetic", out, limit=10)
    meta = json.loads((out / "dataset.json").read_text())
    meta["splits"]["train"]["count"] = 10**9
    (out / "dataset.json").write_text(json.dumps(meta))
    assert_one_error_line(runner.invoke(app, ["data", "show", str(out)]), "dataset.json", "1,000,000,000")


@pytest.mark.parametrize(
    "image_type, words",
    [
        (pa.binary(100), ["100 bytes", "28x28x1 = 784"]),
        (pa.binary(), ["binary", "28x28x1 = 784"]),
        (pa.string(), ["string", "28x28x1 = 784"]),
    ],
)
def test_an_image_column_of_the_wrong_width_is_one_line(tmp_path, image_type, words):
    out = tmp_path / "d"
    prepare("synthetic", out, limit=10)

    def write(path):
        value = "x" * 100 if image_type == pa.string() else b"x" * 100
        table = pa.table(
            {
                "image": pa.array([value] * 10, image_type),
                "label": pa.array(np.zeros(10), pa.int16()),
                "index": pa.array(np.arange(10), pa.int64()),
            }
        )
        pq.write_table(table, path)

    _swap_shard(out, "train", write)
    assert_one_error_line(runner.invoke(app, ["data", "show", str(out), "--num", "1"]), "image column", *words)
    assert_one_error_line(runner.invoke(app, ["data", "verify", str(out)]), "image column", *words)


def _hf_set(root: Path, images: pa.Array, labels: pa.Array | None = None, stats: bool = True, repeat: int = 1) -> Path:
    """A Parquet image set as Hugging Face writes it (an `image` struct of
    bytes and path, a `label` column), holding the rows `repeat` times."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(images)
    image = pa.StructArray.from_arrays([images, pa.nulls(n, pa.string())], names=["bytes", "path"])
    columns = {"image": image}
    if labels is not None:
        columns["label"] = labels
    table = pa.table(columns)
    with pq.ParquetWriter(root / "train-00000-of-00001.parquet", table.schema, write_statistics=stats) as writer:
        for _ in range(repeat):
            writer.write_table(table)
    return root


def _png(value: int = 3, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), value).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_parquet_image_set_is_checked_from_its_footer(tmp_path):
    n, times = 100_000, 20
    zeros = pa.array(np.zeros(n, np.int64))
    cases = [
        # 2M rows without image bytes, in a few KB.
        (_hf_set(tmp_path / "nulls", pa.nulls(n, pa.binary()), zeros, repeat=times), ["2,000,000 of its 2,000,000"]),
        # The same, written without the statistics that count nulls: the column's size gives it away.
        (
            _hf_set(tmp_path / "nostats", pa.nulls(n, pa.binary()), zeros, stats=False, repeat=times),
            ["2,000,000 rows"],
        ),
        # One tiny PNG repeated two million times: a few KB of real data for 2M rows.
        (_hf_set(tmp_path / "repeated", pa.array([_png()] * n, pa.binary()), zeros, repeat=times), ["2,000,000 rows"]),
    ]
    for root, words in cases:
        assert sum(p.stat().st_size for p in root.iterdir()) < 100_000
        result = runner.invoke(
            app, ["data", "prepare", "imagefolder", "--source", str(root), "--out", str(tmp_path / "out")]
        )
        assert_one_error_line(result, "train-00000-of-00001.parquet", *words)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "labels, words",
    [
        (pa.array([0, 1, 40000, 2], pa.int64()), ["label", "40000", "32767"]),
        (pa.array([0, 1, -3, 2], pa.int64()), ["label", "-3"]),
        (pa.array(["cat", "dog", "cat", "dog"], pa.string()), ["label column", "string", "integer"]),
        (pa.array([0.5, 1.0, 0.0, 1.0], pa.float64()), ["label column", "double", "integer"]),
        (pa.array([0, None, 1, 0], pa.int64()), ["label", "1 of 4 rows"]),
    ],
)
def test_parquet_image_set_labels_are_checked(tmp_path, labels, words):
    images = pa.array([_png(v) for v in (10, 20, 30, 40)], pa.binary())
    root = _hf_set(tmp_path / "set", images, labels)
    result = runner.invoke(
        app,
        [
            "data",
            "prepare",
            "imagefolder",
            "--source",
            str(root),
            "--test-fraction",
            "0.5",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert_one_error_line(result, *words)
    assert not (tmp_path / "o").exists()
    # The same set with good labels prepares.
    good = _hf_set(tmp_path / "good", images, pa.array([0, 1, 1, 0], pa.int64()))
    ok = runner.invoke(
        app,
        [
            "data",
            "prepare",
            "imagefolder",
            "--source",
            str(good),
            "--test-fraction",
            "0.5",
            "--out",
            str(tmp_path / "g"),
        ],
    )
    assert ok.exit_code == 0, ok.output


def _tar_with_header(path: Path, kind: bytes, header_bytes: int) -> Path:
    """A .tar.gz whose first member is a pax or GNU long-name header of
    `header_bytes` bytes, written as a stream (the test never holds it)."""
    import gzip

    info = tarfile.TarInfo("././@PaxHeader" if kind in (b"x", b"g") else "././@LongLink")
    info.type, info.size = kind, header_bytes
    with gzip.open(path, "wb") as fh:
        fh.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        chunk = b"9" * (1 << 20)
        for start in range(0, header_bytes, len(chunk)):
            fh.write(chunk[: min(len(chunk), header_bytes - start)])
        fh.write(bytes(-header_bytes % 512) + bytes(1024))
    return path


@pytest.mark.parametrize("kind, what", [(b"x", "pax"), (b"g", "pax"), (b"L", "GNU long name"), (b"K", "GNU long")])
def test_an_archive_with_a_huge_header_is_refused_before_it_is_parsed(tmp_path, kind, what):
    archive = _tar_with_header(tmp_path / "set.tar.gz", kind, 8 << 20)
    assert archive.stat().st_size < 100_000
    result = runner.invoke(
        app, ["data", "prepare", "imagefolder", "--source", str(archive), "--out", str(tmp_path / "d")]
    )
    assert_one_error_line(result, "set.tar.gz", what, "8,388,608 bytes")
    assert not (tmp_path / "d").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_archive_with_ordinary_pax_and_long_names_still_unpacks(tmp_path):
    root = tmp_path / "src"
    long_dir = "c" * 120
    for cls in ("a", long_dir):
        for i in range(3):
            path = root / "set" / cls / f"{'n' * 150}-{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 40 * i).save(path)
    for fmt, name in ((tarfile.PAX_FORMAT, "pax.tar.gz"), (tarfile.GNU_FORMAT, "gnu.tar.bz2")):
        with tarfile.open(tmp_path / name, "w:gz" if name.endswith("gz") else "w:bz2", format=fmt) as tar:
            tar.add(root / "set", arcname="set")
        result = runner.invoke(
            app,
            ["data", "prepare", "imagefolder", "--source", str(tmp_path / name), "--test-fraction", "0.5"]
            + ["--out", str(tmp_path / f"d-{name}")],
        )
        assert result.exit_code == 0, result.output
        assert read_meta(tmp_path / f"d-{name}")["classes"] == ["a", long_dir]


@pytest.mark.subprocess
def test_a_100_mb_pax_header_fails_with_bounded_memory(tmp_path):
    archive = _tar_with_header(tmp_path / "bomb.tar.gz", b"x", 100 << 20)
    assert archive.stat().st_size < 200_000
    probe = (
        "import sys, pathlib; from vae_ray.sources import open_source; from vae_ray.errors import UserError\n"
        "try:\n    open_source('imagefolder', sys.argv[1], workdir=pathlib.Path(sys.argv[2]))\n"
        "except UserError as e:\n    print(e)\n"
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))"
    )
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, "-c", probe, str(archive), str(work)], capture_output=True, text=True)
    message, peak_kb = done.stdout.strip().splitlines()
    assert "104,857,600 bytes" in message
    assert int(peak_kb) < 200_000, peak_kb


def _edit_checkpoint_dataset(run: Path, **changes) -> None:
    path = run / "checkpoint_epoch_0001" / "config.json"
    blob = json.loads(path.read_text())
    blob["dataset"].update(changes)
    path.write_text(json.dumps(blob))


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"shape": [4096, 4096, 1]}, ["4096x4096x1", "1024"]),
        ({"shape": [28, 28, 2]}, ["28x28x2", "channels"]),
        ({"shape": [0, 28, 1]}, ["0x28x1"]),
        ({"shape": "28x28"}, ["shape"]),
        ({"num_classes": 10**9}, ["num_classes"]),
        # Within the bounds, yet a model far larger than its weights file.
        ({"shape": [1024, 1024, 1]}, ["model.safetensors", "bytes"]),
    ],
)
def test_a_checkpoint_config_is_bounded_before_a_tensor_is_made(tmp_path, changes, words):
    from vae_ray import checkpoint

    run = make_checkpoint(tmp_path / "run")
    _edit_checkpoint_dataset(run, **changes)
    result = runner.invoke(app, ["generate", str(run), "--num", "1", "--out", str(tmp_path / "o")])
    assert_one_error_line(result, *words)
    with pytest.raises(UserError):
        checkpoint.load(run)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# 12. Links out of a tree are never followed
# ---------------------------------------------------------------------------
def _image_tree(root: Path, splits=("train", "test")) -> Path:
    for split in splits:
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("L", (8, 8), 30 * i).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("linked", ["train", "test"])
def test_a_split_folder_linking_out_of_the_source_is_refused(tmp_path, linked):
    secret = _image_tree(tmp_path / "elsewhere")
    root = _image_tree(tmp_path / "src", splits=[s for s in ("train", "test") if s != linked])
    (root / linked).symlink_to(secret / linked, target_is_directory=True)
    result = runner.invoke(app, ["data", "prepare", "imagefolder", "--source", str(root), "--out", str(tmp_path / "d")])
    assert_one_error_line(result, str(root / linked), "a link out of the source folder")
    assert not (tmp_path / "d").exists()


def test_idx_and_cifar_files_linking_out_of_the_source_are_refused(tmp_path):
    secret = write_fake_idx_dataset(tmp_path / "elsewhere", n_train=10, n_test=5)
    root = write_fake_idx_dataset(tmp_path / "mnist", n_train=10, n_test=5)
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    (root / "t10k-images-idx3-ubyte.gz").symlink_to(secret / "t10k-images-idx3-ubyte.gz")
    result = runner.invoke(app, ["data", "prepare", "mnist", "--source", str(root), "--out", str(tmp_path / "a")])
    assert_one_error_line(result, "t10k-images-idx3-ubyte.gz", "a link out of the source folder")
    write_cifar_batches(tmp_path / "batches", per_batch=2)
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "cifar-10-batches-py").symlink_to(tmp_path / "batches", target_is_directory=True)
    result = runner.invoke(
        app, ["data", "prepare", "cifar10", "--source", str(tmp_path / "cifar"), "--out", str(tmp_path / "b")]
    )
    assert_one_error_line(result, "cifar-10-batches-py", "a link out of the source folder")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_parquet_sets_linking_out_of_the_source_are_refused(tmp_path):
    images = pa.array([_png(v) for v in (10, 20, 30, 40)], pa.binary())
    secret = _hf_set(tmp_path / "elsewhere" / "data", images, pa.array([0, 1, 0, 1]))
    args = ["data", "prepare", "imagefolder", "--test-fraction", "0.5"]
    # The set's data/ folder is a link out.
    root = tmp_path / "src"
    root.mkdir()
    (root / "data").symlink_to(secret, target_is_directory=True)
    assert_one_error_line(
        runner.invoke(app, [*args, "--source", str(root), "--out", str(tmp_path / "a")]),
        str(root / "data"),
        "a link out of the source folder",
    )
    # One shard is a link out.
    root2 = tmp_path / "src2"
    (root2 / "data").mkdir(parents=True)
    (root2 / "data" / "train.parquet").symlink_to(secret / "train-00000-of-00001.parquet")
    assert_one_error_line(
        runner.invoke(app, [*args, "--source", str(root2), "--out", str(tmp_path / "b")]),
        "train.parquet",
        "a link out of the source folder",
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # A link inside the tree is fine.
    (root2 / "data" / "train.parquet").unlink()
    shutil.copytree(secret, root2 / "real")
    (root2 / "data" / "train.parquet").symlink_to(root2 / "real" / "train-00000-of-00001.parquet")
    ok = runner.invoke(app, [*args, "--source", str(root2), "--out", str(tmp_path / "c")])
    assert ok.exit_code == 0, ok.output


def test_a_dataset_folder_is_read_without_following_links(tmp_path):
    out = tmp_path / "d"
    prepare("synthetic", out, limit=10)
    copy = tmp_path / "elsewhere"
    shutil.copytree(out, copy)
    commands = [["data", "show", str(out), "--out", str(tmp_path / "p.png")], ["data", "verify", str(out)]]
    # train/ is a link to another folder's train/.
    shutil.rmtree(out / "train")
    (out / "train").symlink_to(copy / "train", target_is_directory=True)
    for args in commands:
        assert_one_error_line(runner.invoke(app, args), str(out / "train"), "link")
    with pytest.raises(UserError, match="link"):
        read_meta(out)  # what train, tune and evaluate read first
    # One shard is a link.
    (out / "train").unlink()
    shutil.copytree(copy / "train", out / "train")
    (out / "test" / "part-00000.parquet").unlink()
    (out / "test" / "part-00000.parquet").symlink_to(copy / "test" / "part-00000.parquet")
    for args in commands:
        assert_one_error_line(runner.invoke(app, args), "part-00000.parquet", "link")
    assert not (tmp_path / "p.png").exists()
    # The preview `data show` writes into the folder is never written through a link.
    (out / "test" / "part-00000.parquet").unlink()
    shutil.copy(copy / "test" / "part-00000.parquet", out / "test" / "part-00000.parquet")
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"someone's picture")
    (out / "preview.png").symlink_to(victim)
    assert_one_error_line(runner.invoke(app, ["data", "show", str(out)]), "preview.png", "link")
    assert victim.read_bytes() == b"someone's picture" and (out / "preview.png").is_symlink()


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "train/../../x.parquet", "train/sub/part-00000.parquet", "test/part-00000.parquet", "train\\..\\x"],
)
def test_shard_names_in_dataset_json_must_be_ours(tmp_path, name):
    out = tmp_path / "d"
    prepare("synthetic", out, limit=10)
    meta = json.loads((out / "dataset.json").read_text())
    meta["splits"]["train"]["shards"][0]["file"] = name
    (out / "dataset.json").write_text(json.dumps(meta))
    assert_one_error_line(
        runner.invoke(app, ["data", "verify", str(out)]), "dataset.json", "not a shard name vae-ray writes"
    )


# ---------------------------------------------------------------------------
# 10. A prepare --overwrite never swaps shards under a reader
# ---------------------------------------------------------------------------
def test_a_reader_lock_keeps_prepare_out_and_the_other_way_round(tmp_path):
    from vae_ray.data import dataset_read_lock

    out = tmp_path / "d"
    prepare("synthetic", out, limit=10)
    before = _snapshot(out)
    with dataset_read_lock(out), dataset_read_lock(str(out)):  # readers share
        assert_one_error_line(_prepare_cli(out, 12, "--overwrite"), str(out), "in use")
        with pytest.raises(UserError, match="in use"), storage.Lock(str(out), "vae-ray data prepare"):
            pass
    assert _snapshot(out) == before
    # Once the readers are gone, the prepare goes ahead.
    assert _prepare_cli(out, 12, "--overwrite").exit_code == 0
    assert read_meta(out)["splits"]["train"]["count"] == 12
    # And a reader cannot start while a prepare holds the folder.
    with storage.Lock(str(out), "vae-ray data prepare"):
        with pytest.raises(UserError, match="in use by `vae-ray data prepare`") as err, dataset_read_lock(out):
            pass
        assert "\n" not in str(err.value)
    # `data show` and `data verify` are such readers.
    with storage.Lock(str(out), "vae-ray data prepare"):
        for args in (["data", "verify", str(out)], ["data", "show", str(out), "--out", str(tmp_path / "p.png")]):
            assert_one_error_line(runner.invoke(app, args), str(out), "in use by `vae-ray data prepare`")
    assert not (tmp_path / "p.png").exists()
    assert runner.invoke(app, ["data", "verify", str(out)]).exit_code == 0
    assert not (tmp_path / ".d.lock").exists()  # the last reader out removes the lock file


def test_a_reader_lock_never_follows_a_link(tmp_path):
    from vae_ray.data import dataset_read_lock

    out = tmp_path / "d"
    prepare("synthetic", out, limit=10)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / ".d.lock").symlink_to(victim)
    with pytest.raises(UserError, match=r"\.d\.lock"), dataset_read_lock(out):
        pass
    assert victim.read_text() == "mine" and (tmp_path / ".d.lock").is_symlink()
    os.unlink(tmp_path / ".d.lock")
    with dataset_read_lock(out):
        assert (tmp_path / ".d.lock").is_file() and not (tmp_path / ".d.lock").is_symlink()


def test_a_judge_folder_planted_as_a_link_is_refused(tmp_path):
    """classifier/seed-S made a link to a folder elsewhere: nothing is written through it."""
    from vae_ray import judge
    from vae_ray.errors import UserError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "data" / "classifier").mkdir(parents=True)
    (tmp_path / "data" / "classifier" / "seed-1").symlink_to(elsewhere)
    with pytest.raises(UserError, match="is a link"):
        judge.folder_for(str(tmp_path / "data"), 1)
    (tmp_path / "data2").mkdir()
    (tmp_path / "data2" / "classifier").symlink_to(elsewhere)
    for seed in (0, 1):
        with pytest.raises(UserError, match="is a link"):
            judge.folder_for(str(tmp_path / "data2"), seed)
    assert list(elsewhere.iterdir()) == []
