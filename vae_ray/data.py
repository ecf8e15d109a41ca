"""Prepared datasets: Parquet shards plus `dataset.json`, and their readers.

Layout written by `prepare`:

    DIR/dataset.json            name, shape, classes, counts, shards + sha256, source
    DIR/train/part-00000.parquet ...
    DIR/test/part-00000.parquet ...

Each row holds `image` (the raw H*W*C uint8 pixels as fixed-size binary, so a
batch decodes with one zero-copy `np.frombuffer`), `label` and `index` (the
row's position in its split). A prepare is built in a hidden temporary folder
beside DIR and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .sources import Source, open_source

META_FILE = "dataset.json"
SPLITS = ("train", "test")
ROWS_PER_SHARD = 10_000
ROW_GROUP = 2_048


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def prepare(name: str, out: str | Path, source: str | None = None, *, limit: int | None = None,
            shards: int | None = None, overwrite: bool = False, image_size: int | None = None,
            channels: int | None = None, test_fraction: float = 0.1, skip_corrupt: bool = False,
            seed: int = 0, progress: Optional[Callable[[str, int, int], None]] = None) -> dict[str, Any]:
    """Read a source and write it as Parquet shards at `out`; return the metadata.

    `progress(split, done, total)` is called as images are written.
    """
    out = Path(out).expanduser()
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    if shards is not None and shards < 1:
        raise UserError(f"--shards must be at least 1 (got {shards})")
    if image_size is not None and not 4 <= image_size <= 1024:
        raise UserError(f"--image-size must be between 4 and 1024 (got {image_size})")
    if channels not in (None, 1, 3):
        raise UserError(f"--channels must be 1 or 3 (got {channels})")
    _check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        src = open_source(name, source, limit=limit, image_size=image_size, channels=channels,
                          test_fraction=test_fraction, skip_corrupt=skip_corrupt, seed=seed, workdir=tmp)
        meta = _write_all(src, tmp, limit, shards, progress)
        for leftover in tmp.iterdir():  # unpacked archives, if any
            if leftover.name not in (*SPLITS, META_FILE):
                shutil.rmtree(leftover, ignore_errors=True)
        _check_destination(out, overwrite)  # again: something may have appeared meanwhile
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: already exists and is not empty; choose another --out or pass --overwrite")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old dataset is removed only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_all(src: Source, root: Path, limit: int | None, shards: int | None,
               progress: Optional[Callable[[str, int, int], None]]) -> dict[str, Any]:
    started = time.time()
    h, w, c = src.shape
    counts = {s: min(src.splits[s].count, limit or src.splits[s].count) for s in SPLITS}
    if counts["train"] < 1 or counts["test"] < 1:
        raise UserError(f"{src.origin}: both splits need at least one image (train {counts['train']}, "
                        f"test {counts['test']})")
    meta: dict[str, Any] = {
        "format": "vae-ray-dataset/1", "name": src.name, "synthetic": src.synthetic,
        "shape": [h, w, c], "height": h, "width": w, "channels": c,
        "classes": src.classes, "num_classes": len(src.classes),
        "source": src.origin, "limit": limit, "splits": {},
        **src.notes,
    }
    for split in SPLITS:
        n_shards = _shard_count(split, counts, shards)
        meta["splits"][split] = _write_split(src, split, counts[split], n_shards, root, progress)
    meta["seconds"] = round(time.time() - started, 3)
    (root / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _shard_count(split: str, counts: dict[str, int], shards: int | None) -> int:
    if shards is None:
        return max(1, math.ceil(counts[split] / ROWS_PER_SHARD))
    if split == "train":
        return min(shards, counts["train"])
    # The test split gets shards in proportion to its size.
    return max(1, min(counts["test"], math.ceil(shards * counts["test"] / counts["train"])))


def _write_split(src: Source, split: str, count: int, n_shards: int, root: Path,
                 progress: Optional[Callable[[str, int, int], None]]) -> dict[str, Any]:
    folder = root / split
    folder.mkdir()
    h, w, c = src.shape
    schema = image_schema(h, w, c)
    per_shard = math.ceil(count / n_shards)
    label_counts = np.zeros(len(src.classes), dtype=np.int64)
    shard_infos, writer, written, shard_rows = [], None, 0, 0

    def close_shard() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            path = folder / f"part-{len(shard_infos):05d}.parquet"
            shard_infos.append({"file": f"{split}/{path.name}", "rows": shard_rows,
                                "sha256": sha256_file(path)})
            writer = None

    for images, labels in src.splits[split].chunks():
        images, labels = images[:count - written], labels[:count - written]
        pos = 0
        while pos < len(labels):
            if writer is None:
                shard_rows = 0
                path = folder / f"part-{len(shard_infos):05d}.parquet"
                writer = pq.ParquetWriter(path, schema, compression="zstd")
            take = min(per_shard - shard_rows, len(labels) - pos)
            table = images_table(images[pos:pos + take], labels[pos:pos + take],
                                 np.arange(written, written + take))
            writer.write_table(table, row_group_size=ROW_GROUP)
            np.add.at(label_counts, labels[pos:pos + take], 1)
            pos, written, shard_rows = pos + take, written + take, shard_rows + take
            if shard_rows == per_shard:
                close_shard()
        if progress:
            progress(split, written, count)
        if written >= count:
            break
    close_shard()
    if written != count:
        raise UserError(f"{src.origin}: {split} split yielded {written} images, expected {count}")
    return {"count": count, "shards": shard_infos,
            "class_counts": {name: int(n) for name, n in zip(src.classes, label_counts)}}


def image_schema(h: int, w: int, c: int) -> pa.Schema:
    return pa.schema([("image", pa.binary(h * w * c)), ("label", pa.int16()), ("index", pa.int64())],
                     metadata={b"vae_ray.shape": f"{h},{w},{c}".encode()})


def images_table(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> pa.Table:
    """(N, H, W, C) uint8 images with labels and row indices as an Arrow table."""
    n, h, w, c = images.shape
    schema = image_schema(h, w, c)
    flat = np.ascontiguousarray(images).reshape(n, -1)
    image_col = pa.FixedSizeBinaryArray.from_buffers(schema.field("image").type, n,
                                                     [None, pa.py_buffer(flat.tobytes())])
    return pa.table([image_col, pa.array(labels, pa.int16()), pa.array(indices, pa.int64())], schema=schema)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------
def _filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or s3:// URI."""
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def read_meta(uri: str | Path) -> dict[str, Any]:
    """Read and sanity-check `dataset.json` of a prepared dataset."""
    uri = str(uri)
    fs, path = _filesystem(uri)
    try:
        with fs.open_input_stream(f"{path.rstrip('/')}/{META_FILE}") as fh:
            meta = json.loads(fh.read())
    except FileNotFoundError:
        raise UserError(f"{uri}: not a prepared dataset (no {META_FILE}; run `vae-ray data prepare`)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{uri}: cannot read {META_FILE} ({str(exc).splitlines()[0]})") from None
    if not isinstance(meta, dict) or meta.get("format") != "vae-ray-dataset/1":
        raise UserError(f"{uri}: {META_FILE} is not a vae-ray dataset description")
    # Absolute, so that code running in another working directory (Tune
    # trials, Ray workers) finds the same files.
    meta["root"] = uri if "://" in uri else str(Path(uri).expanduser().resolve())
    return meta


def shard_paths(meta: dict[str, Any], split: str) -> list[str]:
    if split not in meta["splits"]:
        raise UserError(f"{meta['root']}: no split '{split}' (has {', '.join(meta['splits'])})")
    root = meta["root"].rstrip("/")
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    return [f"{root}/{s['file']}" for s in meta["splits"][split]["shards"]]


def load_split(uri: str | Path, split: str = "train", meta: dict[str, Any] | None = None,
               first: int | None = None):
    """The split as a `ray.data.Dataset` with columns image (bytes), label, index.

    `first=N` keeps the split's first N images (index < N) whatever order
    Ray Data's parallel reads finish in, and reads only the shards holding them.
    """
    import ray.data

    meta = meta or read_meta(uri)
    paths = shard_paths(meta, split)
    if first is not None:
        rows = np.cumsum([s["rows"] for s in meta["splits"][split]["shards"]])
        paths = paths[:int(np.searchsorted(rows, first)) + 1]
    ds = ray.data.read_parquet(paths, columns=["image", "label", "index"])
    if first is not None:
        ds = ds.map_batches(_rows_before, fn_kwargs={"end": first}, batch_format="pyarrow", batch_size=None)
    return ds


def _rows_before(table: pa.Table, end: int) -> pa.Table:
    import pyarrow.compute as pc

    return table.filter(pc.less(table["index"], end))


def decode_images(column: pa.Array | pa.ChunkedArray | np.ndarray, shape) -> np.ndarray:
    """Raw image bytes -> (n, H, W, C) uint8, without copying when possible."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.FixedSizeBinaryArray):
        n = len(column)
        width = column.type.byte_width
        buf = np.frombuffer(column.buffers()[1], dtype=np.uint8)
        return buf[column.offset * width:(column.offset + n) * width].reshape(n, *shape)
    # numpy object array of bytes (as Ray Data's numpy batches give)
    return np.frombuffer(b"".join(column), dtype=np.uint8).reshape(len(column), *shape)


def read_arrays(uri: str | Path, split: str = "test", limit: int | None = None,
                meta: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole split (or its first `limit` rows) as numpy arrays, read on this process."""
    meta = meta or read_meta(uri)
    fs, _ = _filesystem(meta["root"])
    images, labels, have = [], [], 0
    for path in shard_paths(meta, split):
        inner = path if "://" not in path else path.split("://", 1)[1]
        table = pq.read_table(inner, filesystem=fs)
        images.append(decode_images(table.column("image"), meta["shape"]))
        labels.append(table.column("label").to_numpy().astype(np.int64))
        have += table.num_rows
        if limit is not None and have >= limit:
            break
    imgs, lbls = np.concatenate(images), np.concatenate(labels)
    return (imgs[:limit], lbls[:limit]) if limit is not None else (imgs, lbls)


def verify(uri: str | Path) -> dict[str, Any]:
    """Check every shard of a local dataset against the checksums in dataset.json."""
    meta = read_meta(uri)
    root = Path(str(uri)).expanduser()
    for split in meta["splits"].values():
        for shard in split["shards"]:
            path = root / shard["file"]
            if not path.is_file():
                raise UserError(f"{path}: shard listed in {META_FILE} is missing")
            if sha256_file(path) != shard["sha256"]:
                raise UserError(f"{path}: checksum does not match {META_FILE} (corrupt shard)")
    return meta
