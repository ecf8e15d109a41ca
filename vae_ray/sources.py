"""Dataset sources: the files users have, read into uint8 image arrays.

Every source returns a `Source`: per split, a known image count and an
iterator of `(images, labels)` chunks, images shaped (n, H, W, C) uint8. The
writer in `data.py` turns that into Parquet shards, so a source never needs to
hold a whole split in memory (image folders can be large).

Readers are strict: a file that is truncated, has the wrong magic number, or
disagrees with its header raises `UserError` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import UserError

Chunk = tuple[np.ndarray, np.ndarray]

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class Split:
    count: int
    chunks: Callable[[], Iterator[Chunk]]


@dataclass
class Source:
    name: str
    shape: tuple[int, int, int]  # H, W, C
    classes: list[str]
    splits: dict[str, Split]
    origin: str  # where the files came from, for dataset.json
    synthetic: bool = False
    notes: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (raw or .gz) into a uint8 array, validating its header."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: cannot read ({_short(exc)})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != _IDX_UBYTE:
        raise UserError(f"{path}: IDX data type 0x{raw[2]:02x} is not unsigned bytes")
    ndim = raw[3]
    if ndim not in (1, 3):
        raise UserError(f"{path}: IDX file has {ndim} dimensions; expected 1 (labels) or 3 (images)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise UserError(
            f"{path}: header says {'x'.join(map(str, dims))} = {expected} bytes of data "
            f"but the file holds {len(raw) - header} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_idx_files(root: Path) -> dict[str, tuple[Path, Path]] | None:
    """Locate the four IDX files (raw or .gz) in `root`; None if any is missing."""
    found = {}
    for split, names in IDX_FILES.items():
        paths = []
        for name in names:
            candidates = [root / name, root / f"{name}.gz",
                          root / name.replace("-idx", ".idx"), root / f"{name.replace('-idx', '.idx')}.gz"]
            hit = next((p for p in candidates if p.is_file()), None)
            if hit is None:
                return None
            paths.append(hit)
        found[split] = (paths[0], paths[1])
    return found


def idx_source(name: str, root: Path, classes: list[str]) -> Source:
    files = find_idx_files(root)
    if files is None:
        missing = [n for names in IDX_FILES.values() for n in names
                   if not any((root / f).is_file() for f in (n, n + ".gz"))]
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
    splits = {s: Split(len(a[1]), _array_chunks(*a)) for s, a in arrays.items()}
    return Source(name, (h, w, 1), classes, splits, origin=str(root))


def _array_chunks(images: np.ndarray, labels: np.ndarray, size: int = 8192) -> Callable[[], Iterator[Chunk]]:
    def chunks() -> Iterator[Chunk]:
        for start in range(0, len(labels), size):
            yield images[start:start + size], labels[start:start + size]
    return chunks


# ---------------------------------------------------------------------------
# CIFAR-10 python batches, read without ever running code from the pickle
# ---------------------------------------------------------------------------
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


class _SafeUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR batches contain: dicts, lists,
    bytes, numbers and numpy arrays. Any other global (os.system, eval, ...)
    is refused before it can be called."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def load_cifar_batch(path: Path, data: bytes | None = None) -> dict:
    """Load one CIFAR python batch safely; returns {'data': (n,32,32,3) uint8, 'labels': (n,)}."""
    try:
        data = path.read_bytes() if data is None else data
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: unsafe or unexpected pickle content ({exc})") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise UserError(f"{path}: not a readable CIFAR batch ({_short(exc)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR batch (expected a dict)")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise UserError(f"{path}: CIFAR batch lacks 'data' or 'labels'")
    images, labels = obj["data"], np.asarray(obj["labels"])
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != 3072:
        raise UserError(f"{path}: CIFAR 'data' must be a uint8 array of shape (n, 3072)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{path}: {len(images)} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{path}: labels outside 0..9")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue); convert to HWC.
    return {"data": images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), "labels": labels.astype(np.int64)}


def _cifar_classes(root: Path) -> list[str]:
    meta = root / "batches.meta"
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    try:
        obj = _SafeUnpickler(io.BytesIO(meta.read_bytes()), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
        raise UserError(f"{meta}: unreadable batches.meta ({_short(exc)})") from None
    names = obj.get(b"label_names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or len(names) != 10:
        raise UserError(f"{meta}: expected 10 label_names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def cifar_batches_source(root: Path) -> Source:
    missing = [n for n in CIFAR_TRAIN + CIFAR_TEST if not (root / n).is_file()]
    if missing:
        raise UserError(f"{root}: missing CIFAR-10 batch file(s) {', '.join(missing)}")
    classes = _cifar_classes(root)
    splits = {}
    for split, names in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST)):
        batches = [load_cifar_batch(root / n) for n in names]  # validate all before writing anything
        images = np.concatenate([b["data"] for b in batches])
        labels = np.concatenate([b["labels"] for b in batches])
        splits[split] = Split(len(labels), _array_chunks(images, labels))
    return Source("cifar10", (32, 32, 3), classes, splits, origin=str(root))


def cifar10_source(root: Path, **folder_options) -> Source:
    """CIFAR-10 from the official python batches or from an image-folder tree
    (`train/<class>/*.jpg`, `test/<class>/*.jpg`) with the ten class names."""
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() or (candidate / "test_batch").is_file():
            return cifar_batches_source(candidate)
    if (root / "train").is_dir():
        src = imagefolder_source(root, **folder_options)
        if sorted(src.classes) != sorted(CIFAR10_CLASSES):
            raise UserError(f"{root}: class folders {src.classes} are not the CIFAR-10 classes")
        src.name = "cifar10"
        return src
    raise UserError(f"{root}: neither CIFAR-10 python batches (data_batch_1..5, test_batch) "
                    f"nor an image-folder tree with train/ and test/")


# ---------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------
def imagefolder_source(root: Path, image_size: int | None = None, channels: int | None = None,
                       test_fraction: float = 0.1, skip_corrupt: bool = False, seed: int = 0,
                       limit: int | None = None) -> Source:
    """`<root>/<split>/<class>/*` (splits train and test) or `<root>/<class>/*`
    with a held-out `test_fraction` chosen by seed.

    Size and mode rule: every image becomes `image_size` x `image_size`
    (default: the size of the first image when all share it, else 64) by
    scaling the shorter side and cropping the centre; RGB unless every image is
    greyscale (or `channels` says otherwise).
    """
    from PIL import Image

    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    if (root / "train").is_dir():
        files = {s: _list_class_files(root / s) for s in ("train", "test") if (root / s).is_dir()}
        if "test" not in files:
            raise UserError(f"{root}: has train/ but no test/ folder")
        classes = sorted(set(files["train"]) | set(files["test"]))
        entries = {s: _interleave(f, classes) for s, f in files.items()}
    else:
        by_class = _list_class_files(root)
        classes = sorted(by_class)
        everything = _interleave(by_class, classes)
        if not 0.0 < test_fraction < 1.0:
            raise UserError(f"test_fraction must be between 0 and 1 (got {test_fraction})")
        order = np.random.default_rng(seed).permutation(len(everything))
        n_test = max(1, int(round(len(everything) * test_fraction)))
        entries = {"test": [everything[i] for i in sorted(order[:n_test])],
                   "train": [everything[i] for i in sorted(order[n_test:])]}
    if not classes or not any(entries.values()):
        raise UserError(f"{root}: no images found (expected <class>/<image> folders)")
    if limit is not None:
        entries = {s: e[:limit] for s, e in entries.items()}

    # First pass reads headers only: sizes, modes, and which files are broken.
    sizes, modes, corrupt = set(), set(), []
    for split_entries in entries.values():
        for path, _ in split_entries:
            try:
                with Image.open(path) as im:
                    sizes.add(im.size)
                    modes.add(im.mode)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
                if not skip_corrupt:
                    raise UserError(f"{path}: corrupt or unreadable image ({_short(exc)}); "
                                    f"use --skip-corrupt to skip such files") from None
                corrupt.append(str(path))
    bad = set(corrupt)
    entries = {s: [e for e in es if str(e[0]) not in bad] for s, es in entries.items()}
    if image_size is None:
        image_size = next(iter(sizes))[0] if len(sizes) == 1 and len({*next(iter(sizes))}) == 1 else 64
    if channels is None:
        channels = 1 if modes and modes <= {"L", "1", "I;16", "I", "LA"} else 3
    mode = "L" if channels == 1 else "RGB"
    shape = (image_size, image_size, channels)

    def chunks_for(split_entries: list) -> Callable[[], Iterator[Chunk]]:
        def chunks() -> Iterator[Chunk]:
            size = 2048
            for start in range(0, len(split_entries), size):
                part = split_entries[start:start + size]
                images = np.empty((len(part), *shape), dtype=np.uint8)
                for i, (path, _) in enumerate(part):
                    images[i] = _load_image(path, image_size, mode).reshape(shape)
                yield images, np.array([label for _, label in part], dtype=np.int64)
        return chunks

    splits = {s: Split(len(e), chunks_for(e)) for s, e in entries.items()}
    return Source("imagefolder", shape, classes, splits, origin=str(root),
                  notes={"skipped_corrupt": corrupt} if corrupt else {})


def _interleave(by_class: dict[str, list[Path]], classes: list[str]) -> list[tuple[Path, int]]:
    """Round-robin over classes (file 0 of each class, then file 1, ...), so
    that any prefix, such as the one `--limit` keeps, is class-balanced."""
    lists = [[(p, classes.index(c)) for p in by_class[c]] for c in classes if c in by_class]
    longest = max((len(x) for x in lists), default=0)
    return [x[i] for i in range(longest) for x in lists if i < len(x)]


def _list_class_files(folder: Path) -> dict[str, list[Path]]:
    out = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if files:
            out[class_dir.name] = files
    return out


def _load_image(path: Path, size: int, mode: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if im.size != (size, size):
                im = _resize_center_crop(im, size)
            return np.asarray(im, dtype=np.uint8)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated data shows up only on decode
        raise UserError(f"{path}: corrupt or unreadable image ({_short(exc)})") from None


def _resize_center_crop(im, size: int):
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------
# Synthetic digits: works offline with nothing downloaded (the demo's fallback)
# ---------------------------------------------------------------------------
def synthetic_digits_source(train: int = 60000, test: int = 10000, seed: int = 0) -> Source:
    """Digits 0-9 drawn with Pillow's bundled font, with random affine jitter,
    stroke width and blur: 28x28 greyscale, MNIST-like but clearly synthetic."""
    def chunks_for(count: int, split_seed: int) -> Callable[[], Iterator[Chunk]]:
        def chunks() -> Iterator[Chunk]:
            size = 2048
            for start in range(0, count, size):
                n = min(size, count - start)
                rng = np.random.default_rng([split_seed, start])
                labels = rng.integers(0, 10, n)
                images = np.stack([_render_digit(int(d), rng) for d in labels])[..., None]
                yield images, labels.astype(np.int64)
        return chunks

    splits = {"train": Split(train, chunks_for(train, seed * 2 + 1)),
              "test": Split(test, chunks_for(test, seed * 2 + 2))}
    return Source("synthetic-digits", (28, 28, 1), list(MNIST_CLASSES), splits,
                  origin="generated (Pillow font rendering)", synthetic=True)


_FONT_CACHE: dict = {}


def _render_digit(digit: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    size = int(rng.integers(30, 44))
    font = _FONT_CACHE.get(size)
    if font is None:
        font = _FONT_CACHE[size] = ImageFont.load_default(size=size)
    canvas = Image.new("L", (56, 56), 0)
    ImageDraw.Draw(canvas).text((28, 28), str(digit), fill=255, font=font, anchor="mm",
                                stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
    angle = np.deg2rad(rng.uniform(-15, 15))
    shear, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.85, 1.15)
    dx, dy = rng.uniform(-3, 3, size=2)
    # Inverse affine map about the centre: rotation, shear, scale, shift.
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    a, b, d, e = c, s + shear * c, -s, c - shear * s
    cx = cy = 28
    coeffs = (a, b, cx - a * cx - b * cy - dx, d, e, cy - d * cx - e * cy - dy)
    canvas = canvas.transform((56, 56), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    return np.asarray(canvas.resize((28, 28), Image.Resampling.BILINEAR), dtype=np.uint8)


# ---------------------------------------------------------------------------
# Discovery: --source, env var, Debian path, cache, download
# ---------------------------------------------------------------------------
DATASETS = ("mnist", "fashion-mnist", "cifar10", "imagefolder", "synthetic")
ENV_VARS = {"mnist": "VAE_RAY_MNIST_DIR", "fashion-mnist": "VAE_RAY_FASHION_MNIST_DIR",
            "cifar10": "VAE_RAY_CIFAR10_DIR"}
SYSTEM_PATHS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")],
                "mnist": [Path("/usr/share/datasets/mnist")]}
DOWNLOADS = {  # name -> (base URL, {file: md5}); the official files
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
}


def cache_dir(name: str) -> Path:
    base = os.environ.get("VAE_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vae-ray")
    return Path(base) / "datasets" / name


def _looks_complete(name: str, root: Path) -> bool:
    if not root.is_dir():
        return False
    if name == "cifar10":
        return any((c / "data_batch_1").is_file() for c in (root, root / "cifar-10-batches-py")) \
            or (root / "train").is_dir()
    return find_idx_files(root) is not None


def locate(name: str, source: str | None, download: bool = True) -> Path:
    """Find the files for a named dataset, in the documented order."""
    if source is not None:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"{path}: --source not found")
        return path
    env = ENV_VARS.get(name)
    candidates = ([Path(os.environ[env]).expanduser()] if env and os.environ.get(env) else []) \
        + SYSTEM_PATHS.get(name, []) + [cache_dir(name)]
    for path in candidates:
        if _looks_complete(name, path):
            return path
    if download and name in DOWNLOADS:
        return fetch(name, cache_dir(name))
    where = ", ".join(str(p) for p in candidates) or "(none)"
    raise UserError(f"{name}: dataset files not found (looked in {where}); pass --source DIR"
                    + (f" or set {env}" if env else ""))


def fetch(name: str, dest: Path) -> Path:
    """Download the official files into the cache, checking each checksum."""
    base, files = DOWNLOADS[name]
    base = os.environ.get("VAE_RAY_DOWNLOAD_BASE", base)
    env = ENV_VARS.get(name, "--source")
    dest.mkdir(parents=True, exist_ok=True)
    for filename, md5 in files.items():
        target = dest / filename
        if target.is_file() and _md5(target.read_bytes()) == md5:
            continue
        url = base + filename
        try:
            with urllib.request.urlopen(url, timeout=20) as response:
                payload = response.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise UserError(
                f"{name}: not found locally and download from {url} failed ({_short(exc)}); "
                f"offline? put the files in {dest}, set {env}, or pass --source DIR") from None
        if _md5(payload) != md5:
            raise UserError(f"{name}: checksum mismatch for downloaded {filename}; not saved")
        tmp = target.with_name(f".{filename}.part")
        tmp.write_bytes(payload)
        tmp.replace(target)
    if name == "cifar10":
        with tarfile.open(dest / "cifar-10-python.tar.gz") as tar:
            tar.extractall(dest, filter="data")
    return dest


def _md5(payload: bytes) -> str:
    return hashlib.md5(payload, usedforsecurity=False).hexdigest()


def extract_archive(path: Path, workdir: Path) -> Path:
    """Unpack a .tar(.gz) source into `workdir` safely (no absolute paths, no links out)."""
    try:
        with tarfile.open(path) as tar:
            tar.extractall(workdir, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot unpack archive ({_short(exc)})") from None
    entries = [p for p in workdir.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else workdir


def open_source(name: str, source: str | None = None, *, limit: int | None = None,
                image_size: int | None = None, channels: int | None = None, test_fraction: float = 0.1,
                skip_corrupt: bool = False, seed: int = 0, workdir: Path | None = None) -> Source:
    """Resolve and open a dataset by name. `workdir` receives unpacked archives."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    if name == "synthetic":
        n_train, n_test = (limit, limit) if limit else (60000, 10000)
        return synthetic_digits_source(n_train, max(1, min(n_test, 10000)), seed=seed)
    if name == "imagefolder" and source is None:
        raise UserError("imagefolder needs --source DIR (a folder of <class>/<image> files)")
    root = locate(name, source)
    if root.is_file() and tarfile.is_tarfile(root):
        root = extract_archive(root, Path(tempfile.mkdtemp(dir=workdir)))
    folder_options = dict(image_size=image_size, channels=channels, test_fraction=test_fraction,
                          skip_corrupt=skip_corrupt, seed=seed, limit=limit)
    if not root.is_dir():
        raise UserError(f"{root}: expected a directory or a .tar.gz archive")
    if name in ("mnist", "fashion-mnist"):
        return idx_source(name, root, MNIST_CLASSES if name == "mnist" else FASHION_CLASSES)
    if name == "cifar10":
        return cifar10_source(root, **folder_options)
    return imagefolder_source(root, **folder_options)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
