"""CIFAR-10 as published (python batches), read without ever running code
from a pickle, or as a `train/<class>/`, `test/<class>/` image tree."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import Source, Split, array_chunks, refuse_link_out, short

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
MAX_BATCH_BYTES = 512 * 1024**2  # an official batch is 31 MB
MAX_CLASS_NAME = 200


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


def _unpickle(path: Path, data: bytes | None = None):
    if data is None:
        if path.stat().st_size > MAX_BATCH_BYTES:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes is far larger than a CIFAR batch")
        data = path.read_bytes()
    return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()


def load_cifar_batch(path: Path, data: bytes | None = None) -> dict:
    """Load one CIFAR python batch safely; returns {'data': (n,32,32,3) uint8, 'labels': (n,)}."""
    try:
        obj = _unpickle(path, data)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: unsafe or unexpected pickle content ({exc})") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as exc:
        raise UserError(f"{path}: not a readable CIFAR batch ({short(exc)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR batch (expected a dict)")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise UserError(f"{path}: CIFAR batch lacks 'data' or 'labels'")
    images = obj["data"]
    try:
        labels = np.asarray(obj["labels"], dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: CIFAR 'labels' must be a list of integers") from None
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise UserError(f"{path}: CIFAR 'data' must be a uint8 array of shape (n, 3072)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{path}: {len(images)} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{path}: labels outside 0..9")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue); convert to HWC.
    return {"data": images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), "labels": labels}


def cifar_classes(root: Path) -> list[str]:
    """The ten class names from batches.meta. They are data (kept verbatim in
    dataset.json), never paths: whatever they hold cannot steer a write."""
    meta = root / "batches.meta"
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    try:
        obj = _unpickle(meta)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
        raise UserError(f"{meta}: unreadable batches.meta ({short(exc)})") from None
    names = obj.get(b"label_names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or len(names) != 10:
        raise UserError(f"{meta}: expected 10 label_names")
    out = [n.decode("utf-8", errors="replace") if isinstance(n, bytes) else str(n) for n in names]
    if any(not name.strip() or len(name) > MAX_CLASS_NAME for name in out):
        raise UserError(f"{meta}: class names must be non-empty and at most {MAX_CLASS_NAME} characters")
    if len(set(out)) != len(out):
        raise UserError(f"{meta}: class names must be distinct")
    return out


def cifar_batches_source(root: Path, real_root: Path | None = None) -> Source:
    for name in (*CIFAR_TRAIN, *CIFAR_TEST, "batches.meta"):
        refuse_link_out(root / name, real_root or root.resolve())
    missing = [n for n in CIFAR_TRAIN + CIFAR_TEST if not (root / n).is_file()]
    if missing:
        raise UserError(f"{root}: missing CIFAR-10 batch file(s) {', '.join(missing)}")
    classes = cifar_classes(root)
    splits = {}
    for split, names in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST)):
        batches = [load_cifar_batch(root / n) for n in names]  # validate all before writing anything
        images = np.concatenate([b["data"] for b in batches])
        labels = np.concatenate([b["labels"] for b in batches])
        splits[split] = Split(len(labels), array_chunks(images, labels))
    return Source("cifar10", (32, 32, 3), classes, splits, origin=str(root))


def cifar10_source(root: Path, **folder_options) -> Source:
    """CIFAR-10 from the official python batches or from an image-folder tree
    (`train/<class>/*.jpg`, `test/<class>/*.jpg`) with the ten class names."""
    from .folder import imagefolder_source

    real_root = root.resolve()
    refuse_link_out(root / "cifar-10-batches-py", real_root)
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() or (candidate / "test_batch").is_file():
            return cifar_batches_source(candidate, real_root)
    if (root / "train").is_dir():
        src = imagefolder_source(root, **folder_options)
        if sorted(src.classes) != sorted(CIFAR10_CLASSES):
            raise UserError(f"{root}: class folders {src.classes} are not the CIFAR-10 classes")
        src.name = "cifar10"
        return src
    raise UserError(
        f"{root}: neither CIFAR-10 python batches (data_batch_1..5, test_batch) "
        f"nor an image-folder tree with train/ and test/"
    )
