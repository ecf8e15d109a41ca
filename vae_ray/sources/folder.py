"""Image folders (`<root>/<class>/*`, or `<root>/train|test/<class>/*`) and
Parquet image sets (Hugging Face's `Image` feature: a struct of PNG/JPEG
bytes and a path, with a `label` column), as `vae-ray generate --format hf`
writes them.

Folders are read without following links out of the source tree: a linked
file or class folder that resolves outside `<root>` is refused, naming the
link. Image sizes are bounded: the automatic size is capped at
MAX_IMAGE_SIZE, and Pillow refuses images of more than MAX_PIXELS pixels
(decompression bombs) as corrupt.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import MAX_IMAGE_SIZE, Chunk, Source, Split, short

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_PIXELS = 32 * 1024 * 1024
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
    parquet = sorted(p for p in _parquet_files(root))
    if parquet:
        classes, everything = _parquet_entries(parquet)
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


def _inside(path: Path, real_root: Path) -> bool:
    real = path.resolve()
    return real == real_root or real_root in real.parents


def _refuse_link(path: Path, real_root: Path) -> None:
    if path.is_symlink() and not _inside(path, real_root):
        raise UserError(
            f"{path}: a link out of the source folder (to {os.path.realpath(path)}); "
            f"copy the files in, or point --source at the folder it links to"
        )


def _list_class_files(folder: Path, real_root: Path) -> dict[str, list[Path]]:
    out = {}
    for class_dir in sorted(folder.iterdir()):
        _refuse_link(class_dir, real_root)
        if not class_dir.is_dir() or class_dir.name.startswith("."):
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for d in dirnames:
                _refuse_link(Path(dirpath, d), real_root)
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if path.suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                    _refuse_link(path, real_root)
                    if path.is_file():
                        files.append(path)
        if files:
            out[class_dir.name] = files
    return out


# ---------------------------------------------------------------------------
# Parquet image sets (Hugging Face `Image` feature)
# ---------------------------------------------------------------------------
def _parquet_files(root: Path) -> list[Path]:
    """Parquet shards at the top or in data/ whose `image` column holds encoded images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = []
    for folder in (root, root / "data"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.parquet")):
            try:
                schema = pq.read_schema(path)
            except (OSError, pa.ArrowException) as exc:
                raise UserError(f"{path}: not a readable Parquet file ({short(exc)})") from None
            if "image" in schema.names and pa.types.is_struct(schema.field("image").type):
                found.append(path)
    return found


def _parquet_entries(files: list[Path]) -> tuple[list[str], list[Entry]]:
    import json

    import pyarrow.parquet as pq

    classes: list[str] = []
    entries: list[Entry] = []
    for path in files:
        pf = pq.ParquetFile(path)
        meta = (pf.schema_arrow.metadata or {}).get(b"huggingface")
        names = []
        if meta:
            try:
                names = json.loads(meta)["info"]["features"]["label"]["names"]
            except (ValueError, KeyError, TypeError):
                names = []
        if names and not classes:
            classes = [str(n) for n in names]
        labels = (
            pf.read(columns=["label"]).column("label").to_numpy()
            if "label" in pf.schema_arrow.names
            else np.zeros(pf.metadata.num_rows, dtype=np.int64)
        )
        entries.extend(((path, row), int(label)) for row, label in enumerate(labels))
    if not classes:
        top = max((label for _, label in entries), default=0)
        classes = [str(k) for k in range(top + 1)]
    if any(not 0 <= label < len(classes) for _, label in entries):
        raise UserError(f"{files[0].parent}: labels outside the {len(classes)} class names")
    return classes, entries


class _Reader:
    """Opens an entry (a file path, or a row of a Parquet image set) with Pillow."""

    def __init__(self):
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        self._table_path: Path | None = None
        self._column = None

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
        import pyarrow.parquet as pq

        if self._table_path != path:
            self._column = pq.read_table(path, columns=["image"]).column("image").combine_chunks()
            self._table_path = path
        value = self._column[row].as_py()
        if not value or not value.get("bytes"):
            raise UserError(f"{path}: row {row} holds no image bytes")
        return value["bytes"]

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
