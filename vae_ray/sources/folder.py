"""Image folders (`<root>/<class>/*`, or `<root>/train|test/<class>/*`) and
Parquet image sets (Hugging Face's `Image` feature: a struct of PNG/JPEG
bytes and a path, with a `label` column), as `vae-ray generate --format hf`
writes them.

Folders are read without following links out of the source tree: a linked
split folder, class folder, file, `data/` folder or Parquet file that
resolves outside `<root>` is refused, naming the link. Image sizes are
bounded: the automatic size is capped at MAX_IMAGE_SIZE, and Pillow refuses
images of more than MAX_PIXELS pixels (decompression bombs) as corrupt.
A Parquet set is checked from its footer before its columns are read: row
count, rows without image bytes, the bytes its images take, label type.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import MAX_IMAGE_SIZE, Chunk, Source, Split, refuse_link_out, short

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_PIXELS = 32 * 1024 * 1024
MAX_ROWS = 100_000_000  # images a Parquet set may hold: prepare's --limit bound (data.MAX_LIMIT)
MAX_CLASSES = 32_767  # labels are stored as int16 (data.MAX_CLASSES)
# PNG and JPEG bytes do not compress further: a row whose image takes fewer
# bytes than this in the file holds no image of its own (nulls, or one image
# repeated), however many rows the footer declares.
MIN_STORED_IMAGE_BYTES = 8
# The reader holds one row group's image bytes at a time.
MAX_ROW_GROUP_BYTES = 1024**3
CHUNK = 2048
Entry = tuple[object, int]  # (a path, or (parquet file, row)), label


def imagefolder_source(
    root: Path,
    image_size: int | None = None,
    channels: int | None = None,
    test_fraction: float = 0.1,
    skip_corrupt: bool = False,
    seed: int = 0,
    limit: int | None = None,
) -> Source:
    """`<root>/<split>/<class>/*` (splits train and test), `<root>/<class>/*`
    with a held-out `test_fraction` chosen by seed, or a folder of Parquet
    image shards.

    Size and mode rule: every image becomes `image_size` x `image_size`
    (default: the common size when all images are square and share it, else
    64) by scaling the shorter side and cropping the centre; RGB unless every
    image is greyscale (or `channels` says otherwise).
    """
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    real_root = root.resolve()
    for top in ("train", "test", "data"):  # the folders read below, before anything follows them
        refuse_link_out(root / top, real_root)
    parquet = sorted(p for p in _parquet_files(root, real_root))
    if parquet:
        classes, everything = _parquet_entries(parquet, skip_corrupt)
        entries = _held_out(everything, test_fraction, seed)
    elif (root / "train").is_dir():
        files = {s: _list_class_files(root / s, real_root) for s in ("train", "test") if (root / s).is_dir()}
        if "test" not in files:
            raise UserError(f"{root}: has train/ but no test/ folder")
        classes = sorted(set(files["train"]) | set(files["test"]))
        entries = {s: _interleave(f, classes) for s, f in files.items()}
    else:
        by_class = _list_class_files(root, real_root)
        classes = sorted(by_class)
        entries = _held_out(_interleave(by_class, classes), test_fraction, seed)
    if not classes or not any(entries.values()):
        raise UserError(f"{root}: no images found (expected <class>/<image> folders or Parquet image shards)")
    if limit is not None:
        entries = {s: e[:limit] for s, e in entries.items()}

    reader = _Reader()
    # First pass: headers only (or whole images with skip_corrupt, since a
    # truncated file shows up only when decoded): sizes, modes, broken files.
    sizes, modes, corrupt = set(), set(), []
    for split_entries in entries.values():
        for item, _ in split_entries:
            try:
                with reader.open(item) as im:
                    sizes.add(im.size)
                    modes.add(im.mode)
                    if skip_corrupt:
                        im.load()
            except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
                if not skip_corrupt:
                    raise UserError(
                        f"{reader.name(item)}: corrupt or unreadable image ({short(exc)}); "
                        f"use --skip-corrupt to skip such files"
                    ) from None
                corrupt.append(reader.name(item))
    bad = set(corrupt)
    entries = {s: [e for e in es if reader.name(e[0]) not in bad] for s, es in entries.items()}
    image_size = image_size or _automatic_size(root, sizes)
    if channels is None:
        channels = 1 if modes and modes <= {"L", "1", "I;16", "I", "LA"} else 3
    mode = "L" if channels == 1 else "RGB"
    shape = (image_size, image_size, channels)

    def chunks_for(split_entries: list[Entry]) -> Callable[[], Iterator[Chunk]]:
        def chunks() -> Iterator[Chunk]:
            for start in range(0, len(split_entries), CHUNK):
                part = split_entries[start : start + CHUNK]
                images = np.empty((len(part), *shape), dtype=np.uint8)
                for i, (item, _) in enumerate(part):
                    images[i] = reader.load(item, image_size, mode).reshape(shape)
                yield images, np.array([label for _, label in part], dtype=np.int64)

        return chunks

    splits = {s: Split(len(e), chunks_for(e)) for s, e in entries.items()}
    return Source(
        "imagefolder", shape, classes, splits, origin=str(root), notes={"skipped_corrupt": corrupt} if corrupt else {}
    )


def _automatic_size(root: Path, sizes: set) -> int:
    if len(sizes) == 1:
        w, h = next(iter(sizes))
        if w == h:
            if w > MAX_IMAGE_SIZE:
                raise UserError(f"{root}: images are {w}x{h}; pass --image-size (at most {MAX_IMAGE_SIZE})")
            return w
    return 64


def _held_out(everything: list[Entry], test_fraction: float, seed: int) -> dict[str, list[Entry]]:
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be between 0 and 1 (got {test_fraction})")
    if not everything:
        return {"train": [], "test": []}
    order = np.random.default_rng(seed).permutation(len(everything))
    n_test = max(1, int(round(len(everything) * test_fraction)))
    return {
        "test": [everything[i] for i in sorted(order[:n_test])],
        "train": [everything[i] for i in sorted(order[n_test:])],
    }


def _interleave(by_class: dict[str, list[Path]], classes: list[str]) -> list[Entry]:
    """Round-robin over classes (file 0 of each class, then file 1, ...), so
    that any prefix, such as the one `--limit` keeps, is class-balanced."""
    lists = [[(p, classes.index(c)) for p in by_class[c]] for c in classes if c in by_class]
    longest = max((len(x) for x in lists), default=0)
    return [x[i] for i in range(longest) for x in lists if i < len(x)]


def _list_class_files(folder: Path, real_root: Path) -> dict[str, list[Path]]:
    out = {}
    for class_dir in sorted(folder.iterdir()):
        refuse_link_out(class_dir, real_root)
        if not class_dir.is_dir() or class_dir.name.startswith("."):
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for d in dirnames:
                refuse_link_out(Path(dirpath, d), real_root)
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if path.suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                    refuse_link_out(path, real_root)
                    if path.is_file():
                        files.append(path)
        if files:
            out[class_dir.name] = files
    return out


# ---------------------------------------------------------------------------
# Parquet image sets (Hugging Face `Image` feature)
# ---------------------------------------------------------------------------
def _parquet_files(root: Path, real_root: Path) -> list[Path]:
    """Parquet shards at the top or in data/ whose `image` column holds encoded images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = []
    for folder in (root, root / "data"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.parquet")):
            refuse_link_out(path, real_root)
            try:
                schema = pq.read_schema(path)
            except (OSError, pa.ArrowException) as exc:
                raise UserError(f"{path}: not a readable Parquet file ({short(exc)})") from None
            if "image" in schema.names and pa.types.is_struct(schema.field("image").type):
                found.append(path)
    return found


def _parquet_entries(files: list[Path], skip_corrupt: bool = False) -> tuple[list[str], list[Entry]]:
    import json

    classes: list[str] = []
    entries: list[Entry] = []
    for path in files:
        pf = _open_parquet(path)
        _check_image_footer(path, pf, skip_corrupt)
        meta = (pf.schema_arrow.metadata or {}).get(b"huggingface")
        names = []
        if meta:
            try:
                names = json.loads(meta)["info"]["features"]["label"]["names"]
            except (ValueError, KeyError, TypeError):
                names = []
        if names and not classes:
            if not isinstance(names, list) or len(names) > MAX_CLASSES:
                raise UserError(f"{path}: its metadata's class names are not a list of at most {MAX_CLASSES:,}")
            classes = [str(n) for n in names]
        labels = _labels(path, pf) if "label" in pf.schema_arrow.names else np.zeros(pf.metadata.num_rows, np.int64)
        entries.extend(((path, row), int(label)) for row, label in enumerate(labels))
    if not classes:
        top = max((label for _, label in entries), default=0)
        classes = [str(k) for k in range(top + 1)]
    if any(not 0 <= label < len(classes) for _, label in entries):
        raise UserError(f"{files[0].parent}: labels outside the {len(classes)} class names")
    return classes, entries


def _open_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({short(exc)})") from None


def _check_image_footer(path: Path, pf, skip_corrupt: bool) -> None:
    """What the footer says of the image column, before any column is read:
    no more rows than a prepare takes, none without image bytes (unless
    --skip-corrupt), enough stored bytes for that many images, and row groups
    small enough to hold in memory one at a time."""
    footer = pf.metadata
    rows = footer.num_rows
    if rows > MAX_ROWS:
        raise UserError(f"{path}: holds {rows:,} rows, more than the {MAX_ROWS:,} images a prepare takes")
    nulls = stored = 0
    for number in range(footer.num_row_groups):
        group = footer.row_group(number)
        size = 0
        for column in range(group.num_columns):
            chunk = group.column(column)
            if chunk.path_in_schema.split(".")[0] != "image":
                continue
            size += chunk.total_uncompressed_size
            if chunk.path_in_schema == "image.bytes":
                stored += chunk.total_compressed_size
                stats = chunk.statistics
                if stats is not None and stats.has_null_count:
                    nulls += stats.null_count
        if size > MAX_ROW_GROUP_BYTES:
            raise UserError(
                f"{path}: row group {number} declares {size:,} bytes of images, "
                f"more than the {MAX_ROW_GROUP_BYTES:,} read at once"
            )
    if nulls and not skip_corrupt:
        raise UserError(
            f"{path}: its footer says {nulls:,} of its {rows:,} rows hold no image bytes; "
            f"use --skip-corrupt to skip such rows"
        )
    if stored < rows * MIN_STORED_IMAGE_BYTES:
        raise UserError(
            f"{path}: holds {rows:,} rows but only {stored:,} bytes of image data "
            f"(under {MIN_STORED_IMAGE_BYTES} a row: rows without an image of their own)"
        )


def _labels(path: Path, pf) -> np.ndarray:
    """The label column as int64, refused unless it is whole numbers 0..MAX_CLASSES."""
    import pyarrow as pa

    kind = pf.schema_arrow.field("label").type
    if not pa.types.is_integer(kind):
        raise UserError(f"{path}: the label column holds {kind} values; expected integer class numbers")
    try:
        column = pf.read(columns=["label"]).column("label")
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read the label column ({short(exc)})") from None
    if column.null_count:
        raise UserError(f"{path}: {column.null_count:,} of {len(column):,} rows have no label")
    labels = column.to_numpy().astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > MAX_CLASSES - 1):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise UserError(f"{path}: label {bad} is outside 0..{MAX_CLASSES - 1} (at most {MAX_CLASSES} classes)")
    return labels


class _Reader:
    """Opens an entry (a file path, or a row of a Parquet image set) with Pillow."""

    def __init__(self):
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        self._path: Path | None = None
        self._file = self._starts = self._group = self._column = None

    @staticmethod
    def name(item) -> str:
        return f"{item[0]}[row {item[1]}]" if isinstance(item, tuple) else str(item)

    def open(self, item):
        from PIL import Image

        with warnings.catch_warnings():  # more than MAX_PIXELS / 2 pixels: refused, not warned about
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(item, tuple):
                return Image.open(io.BytesIO(self._parquet_bytes(*item)))
            return Image.open(item)

    def _parquet_bytes(self, path: Path, row: int) -> bytes:
        """One row's image bytes, read a row group at a time (bounded by the footer check)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._path != path:
            self._file = pq.ParquetFile(path)
            footer = self._file.metadata
            self._starts = np.cumsum([0] + [footer.row_group(g).num_rows for g in range(footer.num_row_groups)])
            self._path, self._group = path, None
        group = int(np.searchsorted(self._starts, row, side="right")) - 1
        if self._group != group:
            try:
                table = self._file.read_row_group(group, columns=["image.bytes"])
            except (OSError, pa.ArrowException) as exc:
                raise UserError(f"{path}: cannot read row group {group} ({short(exc)})") from None
            self._column = table.column("image").combine_chunks().flatten()[0]  # with the struct's own nulls
            self._group = group
        value = self._column[row - int(self._starts[group])].as_py()
        if not value:
            raise UserError(f"{path}: row {row} holds no image bytes")
        return value

    def load(self, item, size: int, mode: str) -> np.ndarray:
        try:
            with self.open(item) as im:
                im = im.convert(mode)
                if im.size != (size, size):
                    im = _resize_center_crop(im, size)
                return np.asarray(im, dtype=np.uint8)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated data shows up only on decode
            raise UserError(f"{self.name(item)}: corrupt or unreadable image ({short(exc)})") from None


def _resize_center_crop(im, size: int):
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))
