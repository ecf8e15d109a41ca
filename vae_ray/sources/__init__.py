"""Dataset sources: the files users have, read into uint8 image arrays.

Every source returns a `Source`: per split, a known image count and an
iterator of `(images, labels)` chunks, images shaped (n, H, W, C) uint8. The
writer in `data.py` turns that into Parquet shards, so a source never needs to
hold a whole split in memory (image folders can be large).

Readers are strict and bounded: a file that is truncated, has the wrong magic
number or disagrees with its header raises `UserError` naming the file, and
sizes are checked from headers before anything is allocated.

    idx.py        MNIST / Fashion-MNIST IDX files (raw or .gz)
    cifar.py      CIFAR-10 python batches, read with a safe unpickler
    folder.py     image folders (<class>/<image>), Parquet image sets
    synthetic.py  digits drawn with Pillow's font: works offline
    locate.py     --source, environment, system path, cache, download; archives
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError

Chunk = tuple[np.ndarray, np.ndarray]
MAX_IMAGE_SIZE = 1024  # the largest square side an image folder is prepared at


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


def array_chunks(images: np.ndarray, labels: np.ndarray, size: int = 8192) -> Callable[[], Iterator[Chunk]]:
    def chunks() -> Iterator[Chunk]:
        for start in range(0, len(labels), size):
            yield images[start : start + size], labels[start : start + size]

    return chunks


def refuse_link_out(path: Path, real_root: Path) -> None:
    """A link that leads out of the source folder is refused, naming it: a
    source is read only from the tree the user pointed at. Links within it
    are fine."""
    if path.is_symlink():
        real = path.resolve()
        if real != real_root and real_root not in real.parents:
            raise UserError(
                f"{path}: a link out of the source folder (to {os.path.realpath(path)}); "
                f"copy the files in, or point --source at the folder it links to"
            )


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


from .locate import DATASETS, open_source  # noqa: E402  (the package's entry point, after the types it uses)

__all__ = [
    "Chunk",
    "DATASETS",
    "MAX_IMAGE_SIZE",
    "Source",
    "Split",
    "array_chunks",
    "open_source",
    "refuse_link_out",
]
