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

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
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
MAX_CLASSES = 32_767  # labels are stored as int16
# The only shard names prepare writes; any other name in dataset.json (an
# absolute path, `..`, a sub-folder, another split's folder) is refused.
SHARD_NAME = re.compile(r"^(train|test)/part-[0-9]{5,}\.parquet$")
# Everything prepare, `data show` (preview.png) and the judges (judge.py:
# classifier/[seed-S/]model.pt and info.json) write in a dataset folder; with our
# temporary names (storage.is_temp_name) beside them, nothing else may be in
# a folder that --overwrite replaces.
OURS = re.compile(
    r"^(?:dataset\.json|preview\.png|(?:train|test)/part-[0-9]{5,}\.parquet"
    r"|classifier/(?:seed-[1-9][0-9]{0,9}/)?(?:model\.pt|info\.json)|(?:train|test|classifier)/"
    r"|classifier/seed-[1-9][0-9]{0,9}/)$"
)


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
        _recover_swap(out)
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
    """A new destination must hold nothing at all; with --overwrite a vae-ray
    dataset may be replaced, but only when every file in it, hidden ones
    included, is something vae-ray writes in a dataset folder (OURS)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    found = storage.leaves(str(out))
    if not found:
        return
    if existing is None:
        raise UserError(
            f"{out}: holds other files ({storage.some(found)}), not a vae-ray dataset; choose another --out"
        )
    if not overwrite:
        raise UserError(
            f"{out}: already holds a different dataset ({storage.printable(existing.get('name'))}); "
            f"choose another --out or pass --overwrite"
        )
    storage.refuse_foreign(str(out), _written_by_us, "a dataset", "move those first")


def _written_by_us(rel: str) -> bool:
    folder, _, name = rel.rpartition("/")
    return bool(OURS.match(rel)) or (
        bool(re.fullmatch(r"|classifier(?:/seed-[1-9][0-9]{0,9})?", folder)) and storage.is_temp_name(name)
    )


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old dataset is removed only
    after. A crash between the two renames is repaired by `_recover_swap`."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    storage.fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover_swap(out: Path) -> None:
    """Finish or roll back a swap that a crash cut short, then remove what
    earlier prepares left beside `out` (run under the prepare's lock).

    `_swap_into_place` renames OUT to `.OUT.old-X`, then `.OUT.partial-Y` to
    OUT. Killed between the two, it leaves no OUT: the new dataset goes in
    when it is complete and intact (dataset.json is the last file written, and
    every shard matches it), otherwise the old one goes back. Only real
    folders with exactly these names are touched, never a link."""
    olds, partials = _swap_leftovers(out, "old"), _swap_leftovers(out, "partial")
    if olds and not os.path.lexists(out):
        newest_first = sorted(partials, key=lambda p: p.lstat().st_mtime_ns, reverse=True)
        finished = next((p for p in newest_first if _intact(p)), None)
        back = finished or max(olds, key=lambda p: p.lstat().st_mtime_ns)
        back.rename(out)
        storage.fsync_dir(out.parent)
        (partials if finished else olds).remove(back)
    for leftover in olds + partials:
        shutil.rmtree(leftover, ignore_errors=True)


def _swap_leftovers(out: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.{kind}-[0-9a-f]{{8}}$")
    try:
        names = os.listdir(out.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        path = out.parent / name
        if pattern.match(name) and stat.S_ISDIR(path.lstat().st_mode):
            found.append(path)
    return found


def _intact(folder: Path) -> bool:
    try:
        verify(folder)
    except UserError:
        return False
    return True


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
    """Read and sanity-check `dataset.json` of a prepared dataset (local or s3://).

    Nothing in it is taken as a path: shard names must be the ones prepare
    writes, and locally no part of the dataset may be a link (prepare makes
    none, so a link is somebody else's way out of the folder)."""
    root = storage.check_uri(str(uri))
    local = not storage.is_remote(root)
    if local:
        _refuse_link(Path(root), META_FILE)
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
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{uri}: {META_FILE} is incomplete or damaged") from None
    _check_shard_list(uri, meta)
    if local:
        for split in SPLITS:
            _refuse_link(Path(root), split)
            for shard in meta["splits"][split]["shards"]:
                _refuse_link(Path(root), shard["file"])
    # Absolute, so that code running in another working directory (Tune
    # trials, Ray workers) finds the same files.
    meta["root"] = root
    return meta


def _check_meta(meta: dict) -> None:
    h, w, c = (int(v) for v in meta["shape"])
    if not (1 <= h <= MAX_IMAGE_SIZE and 1 <= w <= MAX_IMAGE_SIZE and c in (1, 3)):
        raise ValueError("shape")
    if not (isinstance(meta["classes"], list) and 1 <= int(meta["num_classes"]) == len(meta["classes"]) <= MAX_CLASSES):
        raise ValueError("classes")
    for split in SPLITS:
        int(meta["splits"][split]["count"])
        for shard in meta["splits"][split]["shards"]:
            if int(shard["rows"]) < 0 or not isinstance(shard["sha256"], str) or "file" not in shard:
                raise ValueError("shard")


def _check_shard_list(uri: str | Path, meta: dict) -> None:
    """Shard names exactly as prepare writes them, and split counts that are
    the sum of their shards' rows (what readers size their work by)."""
    for split in SPLITS:
        info = meta["splits"][split]
        for shard in info["shards"]:
            name = shard["file"]
            if not (isinstance(name, str) and SHARD_NAME.match(name) and name.startswith(f"{split}/")):
                raise UserError(
                    f"{uri}: {META_FILE} lists {storage.printable(repr(name))} in the {split} split, "
                    f"not a shard name vae-ray writes ({split}/part-NNNNN.parquet)"
                )
        rows = sum(int(shard["rows"]) for shard in info["shards"])
        if int(info["count"]) != rows:
            raise UserError(
                f"{uri}: {META_FILE} says the {split} split holds {int(info['count']):,} images "
                f"but its shards hold {rows:,} (damaged)"
            )


def _refuse_link(root: Path, rel: str) -> None:
    path = root / rel
    if path.is_symlink():
        raise UserError(f"{path}: a link inside the dataset folder; prepare writes none and readers do not follow one")
    try:
        mode = path.lstat().st_mode
    except OSError:  # missing: said where it is read
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO would block its reader for good
        raise UserError(f"{path}: not a regular file (a FIFO, socket or device); prepare writes none")


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


def _shards(meta: dict[str, Any], split: str) -> list[tuple[str, int]]:
    """(path, declared rows) of every shard of a split."""
    rows = [int(s["rows"]) for s in meta["splits"].get(split, {}).get("shards", [])]
    return list(zip(shard_paths(meta, split), rows, strict=True))


# ---------------------------------------------------------------------------
# Shards: checked from their footers before a row is read
# ---------------------------------------------------------------------------
# Bytes a row group's image column may take beyond its rows' pixels: the
# Parquet writer's dictionary page (1 MiB at most) and page headers.
FOOTER_SLACK = 2 * 1024**2


def check_footer(path: str, shard: pq.ParquetFile, rows: int, shape) -> None:
    """A shard's footer (all that opening it reads) against dataset.json: the
    rows it declares, the columns prepare writes with an image column of
    exactly H*W*C bytes a row, and no row group larger than its rows. Reading
    it then takes the memory dataset.json promises, however small the file."""
    h, w, c = (int(v) for v in shape)
    width = h * w * c
    footer = shard.metadata
    if footer.num_rows != rows:
        raise UserError(
            f"{path}: holds {footer.num_rows:,} rows but {META_FILE} declares {rows:,} (damaged or replaced)"
        )
    schema = shard.schema_arrow
    missing = [name for name in ("image", "label", "index") if name not in schema.names]
    if missing:
        raise UserError(f"{path}: lacks the {', '.join(missing)} column(s) of a vae-ray shard")
    kind = schema.field("image").type
    if not (pa.types.is_fixed_size_binary(kind) and kind.byte_width == width):
        held = f"{kind.byte_width} bytes a row" if pa.types.is_fixed_size_binary(kind) else f"{kind} values"
        raise UserError(f"{path}: image column holds {held}, not {h}x{w}x{c} = {width} bytes an image")
    for name in ("label", "index"):
        if not pa.types.is_integer(schema.field(name).type):
            raise UserError(f"{path}: {name} column holds {schema.field(name).type} values, not integers")
    for number in range(footer.num_row_groups):
        group = footer.row_group(number)
        bound = group.num_rows * (width + 8) + FOOTER_SLACK
        for column in range(group.num_columns):
            chunk = group.column(column)
            if chunk.path_in_schema == "image" and chunk.total_uncompressed_size > bound:
                raise UserError(
                    f"{path}: row group {number} declares {chunk.total_uncompressed_size:,} bytes of images "
                    f"for {group.num_rows:,} rows (at most {bound:,})"
                )


def open_shard(path: str, rows: int, shape) -> pq.ParquetFile:
    """A shard (local or s3://), opened and checked from its footer alone."""
    fs, inner = storage.filesystem(path)
    try:
        shard = pq.ParquetFile(inner, filesystem=fs)
    except FileNotFoundError:
        raise UserError(f"{path}: shard listed in {META_FILE} is missing") from None
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read shard ({first_line(exc)}); check it with `vae-ray data verify`") from None
    try:
        check_footer(path, shard, rows, shape)
    except BaseException:
        shard.close()
        raise
    return shard


def read_shard(path: str, read: Callable[[], pa.Table]) -> pa.Table:
    """`read()` of an open shard, its failures as one line naming the shard."""
    try:
        return read()
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read shard ({first_line(exc)}); check it with `vae-ray data verify`") from None


def check_footers(shards: list[tuple[str, int]], shape) -> None:
    """Every shard's footer, before a reader that cannot check them (Ray Data) starts."""

    def check(item: tuple[str, int]) -> None:
        with open_shard(*item, shape):
            pass

    if len(shards) > 1 and storage.is_remote(shards[0][0]):  # one round trip each: in parallel
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(check, shards))
    else:
        for item in shards:
            check(item)


def load_split(uri: str | Path, split: str = "train", meta: dict[str, Any] | None = None, first: int | None = None):
    """The split as a `ray.data.Dataset` with columns image (bytes), label, index.

    `first=N` keeps the split's first N images (index < N) whatever order
    Ray Data's parallel reads finish in, and reads only the shards holding them.
    Every shard's footer is checked here first (Ray Data reads whole shards).
    """
    import ray.data

    meta = meta or read_meta(uri)
    shards = _shards(meta, split)
    if first is not None:
        rows = np.cumsum([n for _, n in shards])
        shards = shards[: int(np.searchsorted(rows, first)) + 1]
    check_footers(shards, meta["shape"])
    fs, _ = storage.filesystem(meta["root"])
    inner = [storage.filesystem(p)[1] for p, _ in shards]
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
    """A whole split (or its first `limit` rows) as numpy arrays, read on this
    process one row group at a time: `limit` rows cost about that many rows."""
    meta = meta or read_meta(uri)
    images, labels, have = [], [], 0
    for path, rows in _shards(meta, split):
        with open_shard(path, rows, meta["shape"]) as shard:
            for group in range(shard.num_row_groups):
                if limit is not None and have >= limit:
                    break
                table = read_shard(path, partial(shard.read_row_group, group, columns=["image", "label"]))
                images.append(decode_images(table.column("image"), meta["shape"]))
                labels.append(table.column("label").to_numpy().astype(np.int64))
                have += table.num_rows
        if limit is not None and have >= limit:
            break
    if not images:
        return np.empty((0, *meta["shape"]), np.uint8), np.empty(0, np.int64)
    imgs, lbls = np.concatenate(images), np.concatenate(labels)
    return (imgs[:limit], lbls[:limit]) if limit is not None else (imgs, lbls)


def verify(uri: str | Path) -> dict[str, Any]:
    """Check every shard of a dataset (local or s3://) against dataset.json:
    its checksum, and its footer (rows, columns, sizes)."""
    meta = read_meta(uri)
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            path = storage.join(meta["root"], shard["file"])
            try:
                data = storage.read_bytes(path)
            except (FileNotFoundError, IsADirectoryError):
                raise UserError(f"{path}: shard listed in {META_FILE} is missing") from None
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise UserError(f"{path}: checksum does not match {META_FILE} (corrupt shard)")
            try:
                footer = pq.ParquetFile(pa.BufferReader(data))
            except (OSError, pa.ArrowException) as exc:
                raise UserError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
            check_footer(path, footer, int(shard["rows"]), meta["shape"])
    return meta


# ---------------------------------------------------------------------------
# Readers and a running prepare keep out of each other's way
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def dataset_read_lock(uri: str | Path) -> Iterator[None]:
    """Hold a shared lock on a local dataset while a command reads it.

    `data prepare` takes the same lock file exclusively (storage.Lock:
    `flock(LOCK_EX | LOCK_NB)` on `.NAME.lock` beside the folder), so a
    prepare --overwrite cannot swap shards under a running reader, and a
    reader cannot start while a prepare holds the folder: either fails at once
    with one line. Readers share the lock with each other. The lock file is
    opened relative to its folder and never through a link. Nothing to lock on
    S3: prepare writes only local folders."""
    root = storage.check_uri(str(uri))
    if storage.is_remote(root):
        yield
        return
    held = _lock_shared(Path(root))
    try:
        yield
    finally:
        if held is not None:
            _unlock_shared(*held)


def _lock_shared(root: Path) -> tuple[int, int, str] | None:
    """(folder fd, lock fd, lock name) once a shared lock is held; None when
    the folder cannot hold a lock file (a read-only place: no prepare can
    write there either)."""
    name = storage.name_of(storage.lock_uri(str(root)))
    try:
        folder = os.open(root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None  # no dataset there: reading it says so
    try:
        while True:
            fd = _open_lock_file(folder, name, root)
            if fd is None:
                os.close(folder)
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"{root}: {holder}; wait for it to finish") from None
                raise
            # The last holder removes the file as it lets go: a lock on a file
            # that is no longer there keeps nobody out. Then try again.
            try:
                same = os.stat(name, dir_fd=folder, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return folder, fd, name
            os.close(fd)
    except BaseException:
        os.close(folder)
        raise


def _open_lock_file(folder: int, name: str, root: Path) -> int | None:
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, os.O_RDWR | flags, 0o666, dir_fd=folder)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(
                f"{root.parent / name}: the lock file is a link; vae-ray never follows one (remove it)"
            ) from None
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"{root.parent / name}: cannot open the lock file ({first_line(exc)})") from None
        try:  # a folder we may not write to: an existing lock file still tells us of a prepare
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
        except OSError:
            return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{root.parent / name}: the lock file is not a regular file; remove it")
    return fd


def _holder(fd: int) -> str:
    """Who holds the lock exclusively, from what storage.Lock writes in the file."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or not holder.get("command"):
        return "in use by `vae-ray data prepare`"
    return (
        f"in use by `{storage.printable(holder['command'])}` (pid {storage.printable(holder.get('pid'))} "
        f"on {storage.printable(holder.get('host'))}, since {storage.printable(holder.get('since'))})"
    )


def _unlock_shared(folder: int, fd: int, name: str) -> None:
    """Let go; the last reader out removes the lock file, as storage.Lock does."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only when no one else holds it
        try:
            if os.stat(name, dir_fd=folder, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(name, dir_fd=folder)
        except FileNotFoundError:
            pass
    except OSError:
        pass  # other readers still hold it: the last of them removes it
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        os.close(folder)
