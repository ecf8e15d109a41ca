"""Encoding and writing one decoded shard of a generated set: the format
table, the folder writes and the shard's marker.

Nothing here imports torch, so a pool of encoder processes (EncoderPool) can
encode and write shards while the decoder (generate.ShardWriter, on a GPU or
the CPU) goes on to the next one: PNG and Parquet encoding, checksums and
file creation are most of a shard's time once decoding runs on a GPU. A Ray
Data actor calls the same `store_shard` itself, so the bytes are the same on
every path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import storage
from .formats import encode_pngs, hf_parquet_bytes, npz_bytes, parquet_bytes

MARKERS = ".progress"


def _png(images, labels, indices, classes) -> list[bytes]:
    return encode_pngs(images)


def _parquet(images, labels, indices, classes) -> list[bytes]:
    return [parquet_bytes(images, labels, indices)]


def _hf(images, labels, indices, classes) -> list[bytes]:
    return [hf_parquet_bytes(images, labels, indices, classes)]


def _npz(images, labels, indices, classes) -> list[bytes]:
    return [npz_bytes(images=images, labels=labels, index=indices)]


# format -> (images, labels, indices, class names or None) -> one blob per file of the shard
ENCODERS: dict[str, Callable[..., list[bytes]]] = {"png": _png, "parquet": _parquet, "hf": _hf, "npz": _npz}


def digest(chunks: list[bytes]) -> str:
    """A shard's checksum: SHA-256 over the SHA-256 of each of its files, in order."""
    outer = hashlib.sha256()
    for data in chunks:
        outer.update(hashlib.sha256(data).digest())
    return outer.hexdigest()


def store_shard(
    root: str,
    fmt: str,
    names: list[str],
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    classes: list[str] | None,
    marker: dict[str, Any],
) -> str:
    """Encode a decoded shard, write its files, then its marker (which says it
    is complete); returns its checksum. `marker` holds the shard's number,
    image count and any filter counts."""
    blobs = ENCODERS[fmt](images, labels, indices, classes)
    if fmt == "png":
        folders: dict[str, dict[str, bytes]] = {}
        for name, data in zip(names, blobs, strict=True):
            folder, file = name.rsplit("/", 1)
            folders.setdefault(folder, {})[file] = data
        for folder, files in folders.items():
            write_folder(root, folder, files)
    else:
        storage.write_bytes(storage.join(root, names[0]), blobs[0])
    checksum = digest(blobs)
    marker = {"shard": marker["shard"], "images": marker["images"], "sha256": checksum} | marker
    storage.write_bytes(storage.join(root, MARKERS, f"{marker['shard']:05d}.json"), json.dumps(marker).encode())
    return checksum


def write_folder(root: str, rel: str, files: dict[str, bytes]) -> None:
    """Write a whole folder of files. Locally they go into a temporary sibling
    folder renamed when complete: one rename per folder instead of one per
    file (file creation and renames are most of the kernel time of a PNG
    shard on ext4). On S3 each file is one PUT."""
    target_uri = storage.join(root, rel)
    if storage.is_remote(root):
        for name, data in files.items():
            storage.write_bytes(storage.join(target_uri, name), data)
        return
    target = Path(storage.filesystem(target_uri)[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{target.name}")
    tmp.mkdir()
    for name, data in files.items():
        with open(tmp / name, "xb") as fh:
            fh.write(data)
    if target.exists():  # an earlier attempt at this shard (a restarted actor) got this far
        shutil.rmtree(target)
    tmp.rename(target)


class EncoderPool:
    """Processes that run store_shard on shards handed over by the decoder.

    Each is a fresh `python -c` running `serve` (never a fork of a process
    holding a CUDA context, and never a re-run of the caller's main script,
    as multiprocessing's spawn would do to a script without a main guard)
    that imports only this module. A thread per process hands it one shard
    at a time through its stdin and reads the checksum back; `submit` blocks
    while every process is busy and one more shard waits, so decoding ahead
    holds at most that many shards in memory. `submit` returns the shards
    finished meanwhile and `finish` the rest, as (shard, images, checksum);
    an encoder's error is raised in the caller."""

    def __init__(self, processes: int):
        self.jobs: queue.Queue = queue.Queue(maxsize=processes)
        self.results: queue.Queue = queue.Queue()
        self.outstanding = 0
        self.workers = [
            subprocess.Popen(
                [sys.executable, "-c", "from vae_ray.shardstore import serve; serve()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for _ in range(processes)
        ]
        self.threads = [threading.Thread(target=self._feed, args=(w,), daemon=True) for w in self.workers]
        for thread in self.threads:
            thread.start()

    def _feed(self, worker: subprocess.Popen) -> None:
        while (job := self.jobs.get()) is not None:
            shard, count, args = job
            try:
                _send(worker.stdin, args)
                ok, value = _receive(worker.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                ok, value = False, RuntimeError(f"an encoder process ended while writing shard {shard}: {exc!r}")
            self.results.put((shard, count, ok, value))
            if not ok:
                return

    def submit(self, shard: int, count: int, *args: Any) -> list[tuple[int, int, str]]:
        finished = []
        while True:  # waiting for room, but raising an encoder's error at once (its thread has stopped)
            finished += self._collect(block=False)
            try:
                self.jobs.put((shard, count, args), timeout=0.2)
                break
            except queue.Full:
                continue
        self.outstanding += 1
        return finished + self._collect(block=False)

    def finish(self) -> list[tuple[int, int, str]]:
        return self._collect(block=True)

    def _collect(self, block: bool) -> list[tuple[int, int, str]]:
        finished = []
        while self.outstanding and (block or not self.results.empty()):
            shard, count, ok, value = self.results.get()
            self.outstanding -= 1
            if not ok:
                raise value
            finished.append((shard, count, value))
        return finished

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, kind, *exc: Any) -> None:
        # Done: each process ends at the end of its input. On an error or an
        # interrupt the shards being written are abandoned (no marker: a rerun
        # writes them again) and the processes stopped.
        if kind is not None:
            for worker in self.workers:
                worker.kill()
        for _ in self.threads:
            try:
                self.jobs.put_nowait(None)
            except queue.Full:
                break
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.stdin.close()
        for worker in self.workers:
            worker.wait()
            worker.stdout.close()


def serve() -> None:
    """An encoder process: store_shard for each shard read from stdin, the
    result (or the error) written back on what was stdout, until stdin ends."""
    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the replies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command that started it handles Ctrl-C
    source = sys.stdin.buffer
    while True:
        try:
            args = _receive(source)
        except EOFError:
            return
        try:
            value = (True, store_shard(*args))
        except Exception as exc:  # noqa: BLE001 - handed back and raised in the command
            value = (False, exc)
        _send(reply, value)


def _send(stream, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("the other end closed")
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other end closed mid-message")
    return pickle.loads(data)
