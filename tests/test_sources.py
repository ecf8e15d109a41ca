import gzip
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from vae_ray.errors import UserError
from vae_ray.sources import open_source
from vae_ray.sources.cifar import load_cifar_batch
from vae_ray.sources.folder import imagefolder_source
from vae_ray.sources.idx import read_idx
from vae_ray.sources.locate import locate
from vae_ray.sources.synthetic import synthetic_digits_source

from conftest import write_cifar_batches, write_fake_idx_dataset, write_idx


def _raw_idx(path):
    """An independent reading of an IDX file: header fields by hand."""
    raw = gzip.decompress(path.read_bytes())
    n, rows, cols = struct.unpack(">III", raw[4:16])
    return np.frombuffer(raw[16:], np.uint8).reshape(n, rows, cols)


def test_real_mnist_test_set(mnist_dir):
    images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.array_equal(images, _raw_idx(mnist_dir / "t10k-images-idx3-ubyte.gz"))
    assert np.bincount(labels).tolist()[:3] == [980, 1135, 1032]


def test_idx_raw_and_gzip_agree(tmp_path):
    data = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    a = read_idx(write_idx(tmp_path / "a", data, compress=False))
    b = read_idx(write_idx(tmp_path / "b.gz", data, compress=True))
    assert np.array_equal(a, data) and np.array_equal(b, data)


def test_corrupt_idx_files_name_the_problem(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((3, 28, 28)), compress=False).read_bytes()
    cases = {
        "truncated": (good[:-10], "truncated or corrupt"),
        "magic": (b"\x01\x02" + good[2:], "bad magic number"),
        "dtype": (good[:2] + b"\x0d" + good[3:], "not unsigned bytes"),
        "empty": (b"", "bad magic number"),
        "badgzip": (b"\x1f\x8b" + b"garbage", "cannot read"),
    }
    for name, (payload, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(UserError, match=words) as err:
            read_idx(path)
        assert str(path) in str(err.value)


def test_idx_dataset_with_mismatched_counts(tmp_path):
    root = write_fake_idx_dataset(tmp_path / "m", n_train=10, n_test=5)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(9))
    with pytest.raises(UserError, match="10 images but train-labels-idx1-ubyte.gz has 9 labels"):
        open_source("mnist", str(root))


def test_idx_dataset_missing_file(tmp_path):
    root = write_fake_idx_dataset(tmp_path / "m")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="missing IDX file"):
        open_source("mnist", str(root))


def test_cifar_batches_are_read_in_hwc_order(tmp_path):
    written = write_cifar_batches(tmp_path / "c", per_batch=6)
    batch = load_cifar_batch(tmp_path / "c" / "data_batch_1")
    data, labels = written["data_batch_1"]
    # Pixel (row 0, col 1) of image 2: red at 1, green at 1025, blue at 2049.
    assert batch["data"].shape == (6, 32, 32, 3)
    assert batch["data"][2, 0, 1].tolist() == [data[2, 1], data[2, 1025], data[2, 2049]]
    assert batch["labels"].tolist() == labels
    src = open_source("cifar10", str(tmp_path / "c"))
    assert src.splits["train"].count == 30 and src.splits["test"].count == 6
    assert src.classes[0] == "airplane" and src.shape == (32, 32, 3)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "c"
    write_cifar_batches(root, per_batch=2)
    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}))
    with pytest.raises(UserError, match=r"data_batch_3: unsafe or unexpected pickle content \(refused global"):
        open_source("cifar10", str(root))
    assert not marker.exists()


def test_cifar_batch_with_wrong_shape(tmp_path):
    root = tmp_path / "c"
    write_cifar_batches(root, per_batch=2)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(UserError, match="shape \\(n, 3072\\)"):
        open_source("cifar10", str(root))


def _png(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_imagefolder_split_folders_and_size_rule(tmp_path):
    for split in ("train", "test"):
        for k, cls in enumerate(["cat", "dog"]):
            for i in range(3):
                _png(tmp_path / split / cls / f"{i}.png", (40, 20), (k * 200, 10, 10))
    src = imagefolder_source(tmp_path, image_size=16)
    assert src.classes == ["cat", "dog"] and src.shape == (16, 16, 3)
    images, labels = next(src.splits["train"].chunks())
    assert images.shape == (6, 16, 16, 3)
    # Interleaved by class, so that any prefix is balanced.
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert images[1, 8, 8].tolist() == [200, 10, 10]


def test_imagefolder_fraction_split_and_grey_rule(tmp_path):
    for cls in ("a", "b"):
        for i in range(10):
            _png(tmp_path / cls / f"{i}.png", (12, 12), 128, mode="L")
    src = imagefolder_source(tmp_path, test_fraction=0.2)
    assert src.shape == (12, 12, 1)
    assert (src.splits["train"].count, src.splits["test"].count) == (16, 4)


def test_imagefolder_corrupt_image_rejected_or_skipped(tmp_path):
    for i in range(3):
        _png(tmp_path / "train" / "x" / f"{i}.png", (8, 8), (1, 2, 3))
        _png(tmp_path / "test" / "x" / f"{i}.png", (8, 8), (1, 2, 3))
    bad = tmp_path / "train" / "x" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UserError, match="broken.png: corrupt or unreadable image"):
        imagefolder_source(tmp_path)
    src = imagefolder_source(tmp_path, skip_corrupt=True)
    assert src.splits["train"].count == 3 and src.notes["skipped_corrupt"] == [str(bad)]


def test_synthetic_digits_are_deterministic_and_labelled():
    a = next(synthetic_digits_source(100, 10, seed=3).splits["train"].chunks())
    b = next(synthetic_digits_source(100, 10, seed=3).splits["train"].chunks())
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == (100, 28, 28, 1) and a[0].max() > 200 and set(a[1]) <= set(range(10))


def test_discovery_order_and_offline_message(tmp_path, monkeypatch):
    env_dir = write_fake_idx_dataset(tmp_path / "env")
    monkeypatch.setenv("VAE_RAY_MNIST_DIR", str(env_dir))
    assert locate("mnist", None) == env_dir
    assert locate("mnist", str(tmp_path)) == tmp_path  # --source wins
    monkeypatch.delenv("VAE_RAY_MNIST_DIR")
    with pytest.raises(UserError) as err:
        locate("mnist", None)
    message = str(err.value)
    assert "download from http://127.0.0.1:9/" in message and "--source DIR" in message
    assert "VAE_RAY_MNIST_DIR" in message


def test_download_checks_the_checksum(tmp_path, monkeypatch):
    """A real download from a loopback HTTP server whose file is not the official one."""
    import http.server
    import threading
    from functools import partial

    serve = tmp_path / "www"
    write_fake_idx_dataset(serve)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("VAE_RAY_DOWNLOAD_BASE", f"http://127.0.0.1:{server.server_port}/")
        with pytest.raises(UserError, match="checksum mismatch for downloaded"):
            locate("mnist", None)
    finally:
        server.shutdown()
    assert not list((tmp_path / "cache").rglob("*.gz"))  # nothing unverified kept
