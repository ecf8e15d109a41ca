import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vae_ray.data import load_split, prepare, read_arrays, read_meta, summary, verify
from vae_ray.errors import UserError
from vae_ray.sources.idx import read_idx

from conftest import CIFAR_JPEG, write_cifar_batches, write_fake_idx_dataset


def test_full_mnist_pixels_equal_the_idx_files(mnist_dir, tmp_path):
    meta = prepare("mnist", tmp_path / "mnist", str(mnist_dir))
    assert meta["splits"]["train"]["count"] == 60000 and meta["splits"]["test"]["count"] == 10000
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = read_arrays(tmp_path / "mnist", split)
        assert np.array_equal(images[..., 0], read_idx(mnist_dir / f"{prefix}-images-idx3-ubyte.gz"))
        assert np.array_equal(labels, read_idx(mnist_dir / f"{prefix}-labels-idx1-ubyte.gz"))


def test_layout_metadata_and_checksums(tmp_path):
    src = write_fake_idx_dataset(tmp_path / "src", n_train=50, n_test=20)
    meta = prepare("mnist", tmp_path / "out", str(src), shards=3)
    out = tmp_path / "out"
    on_disk = json.loads((out / "dataset.json").read_text())
    assert on_disk["shape"] == [28, 28, 1] and on_disk["classes"] == [str(d) for d in range(10)]
    assert [s["rows"] for s in on_disk["splits"]["train"]["shards"]] == [17, 17, 16]
    assert len(on_disk["splits"]["test"]["shards"]) == 2
    assert sum(on_disk["splits"]["train"]["class_counts"].values()) == 50
    table = pq.read_table(out / "train" / "part-00001.parquet")
    assert table.column_names == ["image", "label", "index"]
    assert table.column("index").to_pylist()[0] == 17
    verify(out)
    shard = out / "train" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-5] + b"xxxxx")
    with pytest.raises(UserError, match="checksum does not match"):
        verify(out)
    assert meta["source"] == str(src)


def test_limit_keeps_the_first_images(tmp_path):
    src = write_fake_idx_dataset(tmp_path / "src", n_train=40, n_test=30)
    prepare("mnist", tmp_path / "out", str(src), limit=25)
    images, _ = read_arrays(tmp_path / "out", "train")
    assert len(images) == 25
    assert np.array_equal(images[..., 0], read_idx(src / "train-images-idx3-ubyte.gz")[:25])
    assert read_meta(tmp_path / "out")["splits"]["test"]["count"] == 25


def test_failed_prepare_leaves_nothing_and_keeps_existing(tmp_path):
    good = write_fake_idx_dataset(tmp_path / "good", n_train=20, n_test=10)
    prepare("mnist", tmp_path / "out", str(good))
    before = (tmp_path / "out" / "dataset.json").read_bytes()
    stamp = (tmp_path / "out" / "train" / "part-00000.parquet").stat()
    # The same command again: complete, so nothing is rewritten.
    again = prepare("mnist", tmp_path / "out", str(good))
    assert again["already_complete"]
    after = (tmp_path / "out" / "train" / "part-00000.parquet").stat()
    assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    # A different dataset: refused without --overwrite, untouched.
    with pytest.raises(UserError, match="already holds a different dataset"):
        prepare("mnist", tmp_path / "out", str(good), limit=5)
    # A corrupt source with --overwrite: the old dataset survives the failure.
    bad = write_fake_idx_dataset(tmp_path / "bad")
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnope")
    with pytest.raises(UserError, match="cannot read"):
        prepare("mnist", tmp_path / "out", str(bad), overwrite=True)
    assert (tmp_path / "out" / "dataset.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "out"]
    # A good source with --overwrite replaces it.
    other = write_fake_idx_dataset(tmp_path / "other", n_train=8, n_test=4, seed=5)
    prepare("mnist", tmp_path / "out", str(other), overwrite=True)
    assert read_meta(tmp_path / "out")["splits"]["train"]["count"] == 8


def test_cifar_batches_prepare(tmp_path):
    written = write_cifar_batches(tmp_path / "c", per_batch=4)
    prepare("cifar10", tmp_path / "out", str(tmp_path / "c"))
    images, labels = read_arrays(tmp_path / "out", "test")
    data, lbls = written["test_batch"]
    assert np.array_equal(images, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert labels.tolist() == lbls


@pytest.fixture(scope="module")
def cifar_jpeg_subset(tmp_path_factory):
    """A 20-per-class slice of the real CIFAR-10 JPEG tree, as a folder and as a tarball."""
    if not CIFAR_JPEG.is_file():
        pytest.skip(f"CIFAR-10 JPEG tree not present at {CIFAR_JPEG}")
    root = tmp_path_factory.mktemp("cifar")
    counts = {}
    with tarfile.open(CIFAR_JPEG) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3:
                continue
            key = (parts[-3], parts[-2])
            if counts.get(key, 0) < (20 if parts[-3] == "train" else 5):
                counts[key] = counts.get(key, 0) + 1
                tar.extract(member, root / "tree", filter="data")
            if len(counts) == 20 and all(v >= (20 if k[0] == "train" else 5) for k, v in counts.items()):
                break
    tree = next(p for p in (root / "tree").rglob("train")).parent
    with tarfile.open(root / "subset.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="cifar10")
    return tree, root / "subset.tar.gz"


def test_cifar_jpeg_tree_as_cifar10_and_imagefolder(cifar_jpeg_subset, tmp_path):
    tree, tarball = cifar_jpeg_subset
    meta = prepare("cifar10", tmp_path / "c", str(tree))
    assert meta["shape"] == [32, 32, 3] and meta["splits"]["train"]["count"] == 200
    assert meta["classes"][:2] == ["airplane", "automobile"]
    meta2 = prepare("imagefolder", tmp_path / "f", str(tarball), limit=50)
    assert meta2["splits"]["train"]["count"] == 50
    assert meta2["source"] == str(tarball.resolve())  # the user's archive, not where it was unpacked
    assert set(meta2["splits"]["train"]["class_counts"].values()) == {5}  # balanced prefix
    images, _ = read_arrays(tmp_path / "f", "train", limit=3)
    assert images.dtype == np.uint8 and images.std() > 10


def test_ray_data_loader_reads_every_row(ray_cluster, tiny_data):
    ds = load_split(tiny_data, "train")
    assert ds.count() == 512
    rows = ds.take(2)
    assert len(rows[0]["image"]) == 28 * 28 and {"label", "index"} <= set(rows[0])
    assert sorted(r["index"] for r in ds.select_columns(["index"]).take_all()) == list(range(512))


@pytest.mark.parametrize("first", [100, 256, 300])
def test_ray_data_loader_first_rows_are_always_the_same(ray_cluster, tiny_data, first):
    # The train split has several shards; the first N must not depend on which read finishes first.
    ds = load_split(tiny_data, "train", first=first)
    assert sorted(r["index"] for r in ds.select_columns(["index"]).take_all()) == list(range(first))


def test_a_ranks_test_split_is_read_once_and_kept(tiny_data, monkeypatch):
    from vae_ray import ingest

    dataset = summary(read_meta(tiny_data))
    cpu = torch.device("cpu")
    monkeypatch.setattr(ingest, "_EVAL_CACHE", {})
    first = list(ingest.eval_batches(dataset, 1, 2, 100, cpu))
    assert sum(len(b[0]) for b in first) == 256 and first[0][2][0] == 256  # rank 1 of 2: rows 256..511
    reads, real = [], ingest.iter_rows
    monkeypatch.setattr(ingest, "iter_rows", lambda *a, **k: reads.append(a) or real(*a, **k))
    again = list(ingest.eval_batches(dataset, 1, 2, 100, cpu))
    assert not reads and all(a[0] is b[0] for a, b in zip(first, again, strict=True))
    # Another world size (an elastic restart) is another part of the split: read, not reused.
    whole = list(ingest.eval_batches(dataset, 0, 1, 100, cpu))
    assert len(reads) == 1 and sum(len(b[0]) for b in whole) == 512
    # A part larger than the limit is read every time.
    monkeypatch.setattr(ingest, "_EVAL_CACHE", {})
    monkeypatch.setattr(ingest, "EVAL_CACHE_BYTES", 0)
    for _ in range(2):
        list(ingest.eval_batches(dataset, 0, 1, 100, cpu))
    assert len(reads) == 3 and ingest._EVAL_CACHE == {}
