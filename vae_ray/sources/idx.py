"""MNIST and Fashion-MNIST as published: four IDX files, raw or gzip.

The header is read first and checked (magic number, data type, dimensions
and their product against a cap) before a byte of data is allocated; gzip
files are decompressed as a stream that stops one byte past what the header
promises, so a small file that inflates to gigabytes fails at once with
bounded memory.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import Source, Split, array_chunks, refuse_link_out, short

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
UBYTE = 0x08
MAX_IDX_BYTES = 2 * 1024**3  # data an IDX file may declare (full MNIST: 47 MB)
MAX_DIM = 1 << 24


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (raw or .gz) into a uint8 array, validating its header."""
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as fh:  # noqa: SIM115 - one of two openers
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise UserError(f"{path}: not an IDX file (bad magic number)")
            if head[2] != UBYTE:
                raise UserError(f"{path}: IDX data type 0x{head[2]:02x} is not unsigned bytes")
            ndim = head[3]
            if ndim not in (1, 3):
                raise UserError(f"{path}: IDX file has {ndim} dimensions; expected 1 (labels) or 3 (images)")
            dims_raw = fh.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise UserError(f"{path}: truncated IDX header")
            dims = struct.unpack(f">{ndim}I", dims_raw)
            expected = _checked_size(path, dims)
            data = fh.read(expected + 1)  # one byte more than promised tells extra data apart
    except UserError:
        raise
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: cannot read ({short(exc)})") from None
    if len(data) != expected:
        held = f"more than {expected}" if len(data) > expected else str(len(data))
        raise UserError(
            f"{path}: header says {'x'.join(map(str, dims))} = {expected} bytes of data "
            f"but the file holds {held} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _checked_size(path: Path, dims: tuple[int, ...]) -> int:
    if any(d > MAX_DIM for d in dims):
        raise UserError(f"{path}: IDX header dimensions {'x'.join(map(str, dims))} are implausibly large")
    size = 1
    for d in dims:
        size *= d
    if size > MAX_IDX_BYTES:
        raise UserError(
            f"{path}: IDX header declares {size:,} bytes of data, more than the {MAX_IDX_BYTES:,} this reader accepts"
        )
    return size


def find_idx_files(root: Path) -> dict[str, tuple[Path, Path]] | None:
    """Locate the four IDX files (raw or .gz) in `root`; None if any is missing."""
    found = {}
    for split, names in IDX_FILES.items():
        paths = []
        for name in names:
            candidates = [
                root / name,
                root / f"{name}.gz",
                root / name.replace("-idx", ".idx"),
                root / f"{name.replace('-idx', '.idx')}.gz",
            ]
            hit = next((p for p in candidates if p.is_file()), None)
            if hit is None:
                return None
            paths.append(hit)
        found[split] = (paths[0], paths[1])
    return found


def idx_source(name: str, root: Path, classes: list[str]) -> Source:
    files = find_idx_files(root)
    for pair in (files or {}).values():
        for path in pair:
            refuse_link_out(path, root.resolve())
    if files is None:
        missing = [
            n for names in IDX_FILES.values() for n in names if not any((root / f).is_file() for f in (n, n + ".gz"))
        ]
        raise UserError(f"{root}: missing IDX file(s) {', '.join(missing)} (raw or .gz)")
    arrays = {}
    for split, (img_path, lbl_path) in files.items():
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3:
            raise UserError(f"{img_path}: expected a 3-dimensional image file")
        if labels.ndim != 1:
            raise UserError(f"{lbl_path}: expected a 1-dimensional label file")
        if len(images) != len(labels):
            raise UserError(f"{img_path}: {len(images)} images but {lbl_path.name} has {len(labels)} labels")
        if labels.size and labels.max() >= len(classes):
            raise UserError(f"{lbl_path}: label {labels.max()} outside 0..{len(classes) - 1}")
        arrays[split] = (images[..., None], labels.astype(np.int64))
    h, w = arrays["train"][0].shape[1:3]
    if arrays["test"][0].shape[1:3] != (h, w):
        raise UserError(f"{root}: train and test images differ in size")
    if not (1 <= h <= 1024 and 1 <= w <= 1024):
        raise UserError(f"{root}: images of {h}x{w} pixels are outside 1..1024")
    splits = {s: Split(len(a[1]), array_chunks(*a)) for s, a in arrays.items()}
    return Source(name, (h, w, 1), classes, splits, origin=str(root))
