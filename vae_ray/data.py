"""Prepared datasets: Parquet shards plus `dataset.json`, and their readers.

Layout written by `prepare`:

    DIR/dataset.json              name, shape, classes, counts, shards + sha256, source, recipe
    DIR/train/part-00000.parquet ...
    DIR/test/part-00000.parquet ...

Each row holds `image` (the raw H*W*C uint8 pixels as fixed-size binary, so a
batch decodes with one zero-copy `np.frombuffer`), `label` and `index` (the
row's position in its split). A prepare is built in a hidden folder beside
DIR and renamed into place only when complete; the same command run again
finds the dataset complete (recipe and checksums) and leaves it untouched.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import UserError, first_line
from .sources import MAX_IMAGE_SIZE, Source, open_source

META_FILE = "dataset.json"
FORMAT = "vae-ray-dataset/1"
SPLITS = ("train", "test")
ROWS_PER_SHARD = 10_000
ROW_GROUP = 2_048
MAX_LIMIT = 100_000_000


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def prepare(
    name: str,
    out: str | Path,
    source: str | None = None,
    *,
    limit: int | None = None,
    shards: int | None = None,
    overwrite: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    test_fraction: float = 0.1,
    skip_corrupt: bool = False,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Read a source and write it as Parquet shards at `out`; return the metadata.

    `progress(split, done, total)` is called as images are written. The
    returned metadata has `already_complete` set when an identical prepare
    had already finished there (nothing is rewritten then).
    """
    if storage.is_remote(str(out)):
        raise UserError(f"{out}: data prepare writes a local folder; upload it afterwards (aws s3 sync DIR s3://...)")
    out = Path(storage.check_uri(str(out)))
    _check_options(limit, shards, image_size, channels, test_fraction, seed)
    recipe = {
        "dataset": name,
        "source": str(Path(source).expanduser().resolve()) if source else None,
        "limit": limit,
        "shards": shards,
        "image_size": image_size,
        "channels": channels,
        "test_fraction": test_fraction,
        "skip_corrupt": skip_corrupt,
        "seed": seed,
    }
    with storage.Lock(str(out), "vae-ray data prepare"):
        existing = _existing_dataset(out)
        if existing is not None and existing.get("recipe") == recipe and not overwrite:
            verify(out)  # the same command again: complete and intact means nothing to do
            return existing | {"already_complete": True, "root": str(out)}
        _check_destination(out, overwrite, existing)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            src = open_source(
                name,
                source,
                limit=limit,
                image_size=image_size,
                channels=channels,
                test_fraction=test_fraction,
                skip_corrupt=skip_corrupt,
                seed=seed,
                workdir=tmp,
            )
            meta = _write_all(src, tmp, limit, shards, progress, recipe)
            for leftover in tmp.iterdir():  # unpacked archives, if any
                if leftover.name not in (*SPLITS, META_FILE):
                    shutil.rmtree(leftover, ignore_errors=True)
            _check_destination(out, overwrite, _existing_dataset(out))  # again: something may have appeared
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return meta | {"root": str(out)}


def _check_options(limit, shards, image_size, channels, test_fraction, seed) -> None:
    if limit is not None and not 1 <= limit <= MAX_LIMIT:
        raise UserError(f"--limit must be between 1 and {MAX_LIMIT:,} (got {limit})")
    if shards is not None and not 1 <= shards <= 100_000:
        raise UserError(f"--shards must be between 1 and 100000 (got {shards})")
    if image_size is not None and not 4 <= image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be between 4 and {MAX_IMAGE_SIZE} (got {image_size})")
    if channels not in (None, 1, 3):
        raise UserError(f"--channels must be 1 or 3 (got {channels})")
    if not (isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0):
        raise UserError(f"--test-fraction must be between 0 and 1 (got {test_fraction})")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be between 0 and {2**32 - 1} (got {seed})")


def _existing_dataset(out: Path) -> dict[str, Any] | None:
    """The metadata of a vae-ray dataset at `out`, or None."""
    try:
        meta = storage.read_json(str(out / META_FILE))
    except (FileNotFoundError, ValueError, IsADirectoryError, NotADirectoryError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _check_destination(out: Path, overwrite: bool, existing: dict | None) -> None:
    """Only an empty folder, or with --overwrite a vae-ray dataset, may be replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if not out.is_dir():
        return
    entries = [p.name for p in out.iterdir()]
    if not entries:
        return
    if existing is None:
        raise UserError(f"{out}: holds other files ({_some(entries)}), not a vae-ray dataset; choose another --out")
    if not overwrite:
        raise UserError(
            f"{out}: already holds a different dataset ({existing.get('name')}); "
            f"choose another --out or pass --overwrite"
        )
    ours = {*SPLITS, META_FILE, "preview.png", "classifier"}
    foreign = [e for e in entries if e not in ours and not e.startswith(".")]
    if foreign:
        raise UserError(
            f"{out}: --overwrite replaces a dataset, but the folder also holds {_some(foreign)}; move those first"
        )


def _some(names: list[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old dataset is removed only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    storage.fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_all(
    src: Source,
    root: Path,
    limit: int | None,
    shards: int | None,
    progress: Callable[[str, int, int], None] | None,
    recipe: dict,
) -> dict[str, Any]:
    started = time.time()
    h, w, c = src.shape
    counts = {s: min(src.splits[s].count, limit or src.splits[s].count) for s in SPLITS}
    if counts["train"] < 1 or counts["test"] < 1:
        raise UserError(
            f"{src.origin}: both splits need at least one image (train {counts['train']}, test {counts['test']})"
        )
    meta: dict[str, Any] = {
        "format": FORMAT,
        "name": src.name,
        "synthetic": src.synthetic,
        "shape": [h, w, c],
        "height": h,
        "width": w,
        "channels": c,
        "classes": src.classes,
        "num_classes": len(src.classes),
        "source": src.origin,
        "limit": limit,
        "splits": {},
        "recipe": recipe,
        **src.notes,
    }
    for split in SPLITS:
        n_shards = _shard_count(split, counts, shards)
        meta["splits"][split] = _write_split(src, split, counts[split], n_shards, root, progress)
    meta["seconds"] = round(time.time() - started, 3)
    storage.write_json(str(root / META_FILE), meta)
    return meta


def _shard_count(split: str, counts: dict[str, int], shards: int | None) -> int:
    if shards is None:
        return max(1, math.ceil(counts[split] / ROWS_PER_SHARD))
    if split == "train":
        return min(shards, counts["train"])
    # The test split gets shards in proportion to its size.
    return max(1, min(counts["test"], math.ceil(shards * counts["test"] / counts["train"])))


def _write_split(
    src: Source, split: str, count: int, n_shards: int, root: Path, progress: Callable[[str, int, int], None] | None
) -> dict[str, Any]:
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
            shard_infos.append({"file": f"{split}/{path.name}", "rows": shard_rows, "sha256": sha256_file(path)})
            writer = None

    for images, labels in src.splits[split].chunks():
        images, labels = images[: count - written], labels[: count - written]
        pos = 0
        while pos < len(labels):
            if writer is None:
                shard_rows = 0
                path = folder / f"part-{len(shard_infos):05d}.parquet"
                writer = pq.ParquetWriter(path, schema, compression="zstd")
            take = min(per_shard - shard_rows, len(labels) - pos)
            table = images_table(images[pos : pos + take], labels[pos : pos + take], np.arange(written, written + take))
            writer.write_table(table, row_group_size=ROW_GROUP)
            np.add.at(label_counts, labels[pos : pos + take], 1)
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
    return {
        "count": count,
        "shards": shard_infos,
        "class_counts": {name: int(n) for name, n in zip(src.classes, label_counts, strict=True)},
    }


def image_schema(h: int, w: int, c: int) -> pa.Schema:
    return pa.schema(
        [("image", pa.binary(h * w * c)), ("label", pa.int16()), ("index", pa.int64())],
        metadata={b"vae_ray.shape": f"{h},{w},{c}".encode()},
    )


def images_table(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> pa.Table:
    """(N, H, W, C) uint8 images with labels and row indices as an Arrow table."""
    n, h, w, c = images.shape
    schema = image_schema(h, w, c)
    flat = np.ascontiguousarray(images).reshape(n, -1)
    image_col = pa.FixedSizeBinaryArray.from_buffers(
        schema.field("image").type, n, [None, pa.py_buffer(flat.tobytes())]
    )
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
def read_meta(uri: str | Path) -> dict[str, Any]:
    """Read and sanity-check `dataset.json` of a prepared dataset (local or s3://)."""
    root = storage.check_uri(str(uri))
    try:
        meta = storage.read_json(storage.join(root, META_FILE))
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{uri}: not a prepared dataset (no {META_FILE}; run `vae-ray data prepare`)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{uri}: cannot read {META_FILE} ({first_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{uri}: {META_FILE} is not a vae-ray dataset description")
    try:
        _check_meta(meta)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{uri}: {META_FILE} is incomplete or damaged") from None
    # Absolute, so that code running in another working directory (Tune
    # trials, Ray workers) finds the same files.
    meta["root"] = root
    return meta


def _check_meta(meta: dict) -> None:
    h, w, c = (int(v) for v in meta["shape"])
    if not (1 <= h <= MAX_IMAGE_SIZE and 1 <= w <= MAX_IMAGE_SIZE and c in (1, 3)):
        raise ValueError("shape")
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            if ".." in str(shard["file"]).split("/") or str(shard["file"]).startswith("/"):
                raise ValueError("shard path")
            int(shard["rows"])


def summary(meta: dict[str, Any]) -> dict[str, Any]:
    """What workers and checkpoints need to know about the data."""
    return {
        "name": meta["name"],
        "root": meta["root"],
        "shape": list(meta["shape"]),
        "classes": meta["classes"],
        "num_classes": meta["num_classes"],
        "synthetic": meta.get("synthetic", False),
        "counts": {s: meta["splits"][s]["count"] for s in meta["splits"]},
        "shards": {
            s: [{"file": sh["file"], "rows": sh["rows"]} for sh in meta["splits"][s]["shards"]] for s in meta["splits"]
        },
    }


def shard_paths(meta: dict[str, Any], split: str) -> list[str]:
    if split not in meta["splits"]:
        raise UserError(f"{meta['root']}: no split '{split}' (has {', '.join(meta['splits'])})")
    return [storage.join(meta["root"], s["file"]) for s in meta["splits"][split]["shards"]]


def load_split(uri: str | Path, split: str = "train", meta: dict[str, Any] | None = None, first: int | None = None):
    """The split as a `ray.data.Dataset` with columns image (bytes), label, index.

    `first=N` keeps the split's first N images (index < N) whatever order
    Ray Data's parallel reads finish in, and reads only the shards holding them.
    """
    import ray.data

    meta = meta or read_meta(uri)
    paths = shard_paths(meta, split)
    if first is not None:
        rows = np.cumsum([s["rows"] for s in meta["splits"][split]["shards"]])
        paths = paths[: int(np.searchsorted(rows, first)) + 1]
    fs, _ = storage.filesystem(meta["root"])
    inner = [storage.filesystem(p)[1] for p in paths]
    ds = ray.data.read_parquet(inner, filesystem=fs).select_columns(["image", "label", "index"])
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
        return buf[column.offset * width : (column.offset + n) * width].reshape(n, *shape)
    # numpy object array of bytes (as Ray Data's numpy batches give)
    return np.frombuffer(b"".join(column), dtype=np.uint8).reshape(len(column), *shape)


def read_arrays(
    uri: str | Path, split: str = "test", limit: int | None = None, meta: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A whole split (or its first `limit` rows) as numpy arrays, read on this process."""
    meta = meta or read_meta(uri)
    images, labels, have = [], [], 0
    for path in shard_paths(meta, split):
        fs, inner = storage.filesystem(path)
        try:
            table = pq.read_table(inner, filesystem=fs, columns=["image", "label"])
        except (OSError, pa.ArrowException) as exc:
            raise UserError(
                f"{path}: cannot read shard ({first_line(exc)}); check it with `vae-ray data verify`"
            ) from None
        images.append(decode_images(table.column("image"), meta["shape"]))
        labels.append(table.column("label").to_numpy().astype(np.int64))
        have += table.num_rows
        if limit is not None and have >= limit:
            break
    imgs, lbls = np.concatenate(images), np.concatenate(labels)
    return (imgs[:limit], lbls[:limit]) if limit is not None else (imgs, lbls)


def verify(uri: str | Path) -> dict[str, Any]:
    """Check every shard of a dataset (local or s3://) against the checksums in dataset.json."""
    meta = read_meta(uri)
    for split in meta["splits"].values():
        for shard in split["shards"]:
            path = storage.join(meta["root"], shard["file"])
            try:
                data = storage.read_bytes(path)
            except (FileNotFoundError, IsADirectoryError):
                raise UserError(f"{path}: shard listed in {META_FILE} is missing") from None
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise UserError(f"{path}: checksum does not match {META_FILE} (corrupt shard)")
    return meta
