"""A training worker's view of the data.

Two ways in, chosen once on the driver (`choose_ingest`) so that every rank
takes the same one:
- **memory**: the rank reads its equal share of the split straight from the
  Parquet shards (pyarrow, local or S3) and keeps it as one uint8 tensor, on
  the GPU when training there and it fits. Every epoch shuffles that tensor
  with a permutation keyed by (seed, epoch, rank). No per-epoch pipeline, no
  decode in the loop: on 2 CPU cores this trains at the speed of a plain
  in-memory PyTorch loop (benchmarks/train_throughput.py) and starts in a
  second where a Ray Data pipeline needs several.
- **stream**: Ray Data streams the split to the ranks (`streaming_split`,
  equal rows per rank), with the block order and a local buffer reshuffled
  every epoch; for splits that do not fit in memory.

Per-rank batch sizes add up to the global batch size (they differ by at
most one image when the world size does not divide it), and every rank runs
the same number of steps per epoch, so no rank ever waits on another.
The test split is read by each rank in contiguous row ranges, every row
exactly once whatever the world size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from . import storage
from .data import decode_images, open_shard, read_shard

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 (N, H, W, C), int64 labels, int64 indices
MEMORY_SHARE = 0.25  # ingest "auto": the split may use at most this share of the smallest node's memory
EVAL_CACHE_BYTES = 256 * 2**20  # a rank keeps its part of the test split up to this size
_EVAL_CACHE: dict[tuple, list[Batch]] = {}


# ---------------------------------------------------------------------------
# Geometry: shares, batches and steps
# ---------------------------------------------------------------------------
def rank_batch(batch_size: int, world: int, rank: int) -> int:
    """This rank's share of the global batch (shares add up to batch_size)."""
    return batch_size // world + (1 if rank < batch_size % world else 0)


def steps_per_epoch(rows: int, batch_size: int, world: int) -> int:
    """Steps every rank runs per epoch: its equal share of rows in full batches
    of the largest per-rank size."""
    return (rows // world) // math.ceil(batch_size / world)


def row_range(rows: int, world: int, rank: int, equal: bool) -> tuple[int, int]:
    """Rows [start, stop) of a split that a rank owns: equal shares for
    training (the remainder is left out, like streaming_split(equal=True));
    for evaluation the shares cover every row."""
    if equal:
        share = rows // world
        return rank * share, (rank + 1) * share
    return rank * rows // world, (rank + 1) * rows // world


def choose_ingest(mode: str, train_bytes: int, node_memory: list[float]) -> str:
    """memory or stream, decided once (on the driver) for every rank.

    auto keeps the split in memory when all of it fits in MEMORY_SHARE of the
    smallest node's memory: the ranks on one node hold at most all of it.
    """
    if mode == "memory":
        return "memory"
    if mode == "none" or not node_memory:
        return "stream"
    return "memory" if train_bytes <= MEMORY_SHARE * min(node_memory) else "stream"


# ---------------------------------------------------------------------------
# Reading rows straight from the shards
# ---------------------------------------------------------------------------
def iter_rows(dataset: dict[str, Any], split: str, start: int, stop: int) -> Iterator[pa.Table]:
    """Tables of rows [start, stop) of a split, shard by shard, in index order.

    Each shard is checked from its footer against the rows dataset.json
    declares before anything is read, and only the row groups holding the
    wanted rows are read."""
    offset = 0
    for shard in dataset["shards"][split]:
        lo, hi = offset, offset + shard["rows"]
        offset = hi
        if hi <= start or lo >= stop:
            continue
        path = storage.join(dataset["root"], shard["file"])
        first, last = max(start, lo) - lo, min(stop, hi) - lo
        with open_shard(path, shard["rows"], dataset["shape"]) as pf:
            groups, begin, at = [], None, 0
            for group in range(pf.num_row_groups):
                rows = pf.metadata.row_group(group).num_rows
                if at < last and at + rows > first:
                    groups.append(group)
                    begin = at if begin is None else begin
                at += rows
            table = read_shard(path, partial(pf.read_row_groups, groups, columns=["image", "label", "index"]))
        yield table.slice(first - begin, last - first)


def to_batch(table: pa.Table, shape) -> Batch:
    images = torch.from_numpy(decode_images(table.column("image"), shape).copy())
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    indices = torch.from_numpy(table.column("index").to_numpy().astype(np.int64))
    return images, labels, indices


def read_rows(dataset: dict[str, Any], split: str, start: int, stop: int) -> Batch:
    parts = [to_batch(t, dataset["shape"]) for t in iter_rows(dataset, split, start, stop)]
    if not parts:
        h, w, c = dataset["shape"]
        return (
            torch.empty((0, h, w, c), dtype=torch.uint8),
            torch.empty(0, dtype=torch.int64),
            torch.empty(0, dtype=torch.int64),
        )
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# The two feeds
# ---------------------------------------------------------------------------
class MemoryFeed:
    """This rank's equal share of the training split, held in memory."""

    kind = "memory"

    def __init__(self, dataset: dict[str, Any], rank: int, world: int, device: torch.device, seed: int):
        start, stop = row_range(dataset["counts"]["train"], world, rank, equal=True)
        images, labels, indices = read_rows(dataset, "train", start, stop)
        if device.type == "cuda" and images.numel() > 0.25 * torch.cuda.mem_get_info(device)[0]:
            device = torch.device("cpu")  # too big for the GPU: batches travel there one at a time
        self.images, self.labels, self.indices = images.to(device), labels.to(device), indices.to(device)
        self.seed, self.rank = seed, rank

    def batches(self, epoch: int, batch_size: int, steps: int) -> Iterator[Batch]:
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + epoch * 1009 + self.rank)
        order = torch.randperm(len(self.labels), generator=gen).to(self.images.device)
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            yield self.images[idx], self.labels[idx], self.indices[idx]


class StreamFeed:
    """This rank's Ray Data shard, streamed and reshuffled every epoch."""

    kind = "stream"

    def __init__(self, shard, shape, device: torch.device, seed: int, rank: int):
        self.shard, self.shape, self.device, self.seed, self.rank = shard, tuple(shape), device, seed, rank

    def batches(self, epoch: int, batch_size: int, steps: int) -> Iterator[Batch]:
        tables = self.shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            prefetch_batches=4,
            drop_last=True,
            local_shuffle_buffer_size=8 * batch_size,
            local_shuffle_seed=(self.seed * 1_000_003 + epoch * 1009 + self.rank) % 2**32,
        )
        for done, table in enumerate(tables):
            # Every rank runs `steps` steps; a rank with a batch more than that
            # still drains its iterator, so the next epoch starts together.
            if done < steps:
                images, labels, indices = to_batch(table, self.shape)
                yield (
                    images.to(self.device, non_blocking=True),
                    labels.to(self.device, non_blocking=True),
                    indices.to(self.device, non_blocking=True),
                )


def forget_eval_cache() -> None:
    """Free the kept test split: a process that trained in-process goes on to other work."""
    _EVAL_CACHE.clear()


def eval_batches(
    dataset: dict[str, Any], rank: int, world: int, batch_size: int, device: torch.device
) -> Iterator[Batch]:
    """This rank's contiguous part of the test split, in order, in batches.
    Read once per process: the batches stay where they were put (on the GPU
    when training there) for every later epoch, unless the part exceeds
    EVAL_CACHE_BYTES. The dataset cannot change meanwhile: a run holds its read lock."""
    start, stop = row_range(dataset["counts"]["test"], world, rank, equal=False)
    key = (
        dataset["root"],
        tuple(s["file"] for s in dataset["shards"]["test"]),
        start,
        stop,
        batch_size,
        str(device),
    )
    if key in _EVAL_CACHE:
        yield from _EVAL_CACHE[key]
        return
    keep = (stop - start) * math.prod(dataset["shape"]) <= EVAL_CACHE_BYTES
    kept: list[Batch] = []
    for table in iter_rows(dataset, "test", start, stop):
        for first in range(0, table.num_rows, batch_size):
            images, labels, indices = to_batch(table.slice(first, batch_size), dataset["shape"])
            batch = (images.to(device), labels.to(device), indices.to(device))
            if keep:
                kept.append(batch)
            yield batch
    if keep:  # read to the end: one split per process (an elastic restart changes the key)
        _EVAL_CACHE.clear()
        _EVAL_CACHE[key] = kept
