"""Encoding and writing one decoded shard of a generated set: the format
table, the folder writes and the shard's marker.

Nothing here imports torch, so a pool of encoder processes (EncoderPool) can
encode and write shards while the decoder (decoder.ShardWriter, on a GPU or
the CPU) goes on to the next one: PNG and Parquet encoding, checksums and
file creation are most of a shard's time once decoding runs on a GPU. A Ray
Data actor calls the same `store_shard` itself, so the bytes are the same on
every path.
"""

from __future__ import annotations

import contextlib
import functools
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
from .genplan import SET_FORMATS

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
    if SET_FORMATS[fmt].per_image:
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
    shard on ext4), and its files made durable before the rename, so a
    marker written after it never vouches for files a power cut lost. On S3
    each file is one PUT."""
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
    flush_folder(tmp)
    if target.exists():  # an earlier attempt at this shard (a restarted actor) got this far
        shutil.rmtree(target)
    tmp.rename(target)
    storage.fsync_dir(target.parent)


def flush_folder(folder: Path) -> None:
    """Make a folder's files durable: on Linux one syncfs(2) of its file
    system, instead of an fsync per file (a PNG shard holds thousands);
    elsewhere an fsync per file. Then the folder itself."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        syncfs = _syncfs()
        if syncfs is None or syncfs(fd) != 0:
            for child in folder.iterdir():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        with contextlib.suppress(OSError):  # some file systems do not fsync folders
            os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # not Linux's libc
        return None


class EncoderPool:
    """Processes that run store_shard on shards handed over by the decoder.

    Each is a fresh `python -c` running `serve` (never a fork of a process
    holding a CUDA context, and never a re-run of the caller's main script,
    as multiprocessing's spawn would do to a script without a main guard)
    that imports this very package and this module only. A thread per
    process hands it one shard at a time through its stdin (the arrays as
    out-of-band pickle buffers: no copy) and reads the checksum back. One
    more shard may wait: `submit` blocks while every process is busy and one
    waits, so the decoder holds at most processes + 2 shards. `submit`
    returns the shards finished meanwhile and `finish` the rest, as (shard,
    images, checksum); an encoder's error is raised in the caller. An
    encoder dies with the command's process (Linux), so none writes on
    after the command's lock is gone."""

    def __init__(self, processes: int):
        self.jobs: queue.Queue = queue.Queue(maxsize=1)
        self.results: queue.Queue = queue.Queue()
        self.outstanding = 0
        root = str(Path(__file__).resolve().parents[1])  # the vae_ray this process runs
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        env[PARENT_ENV] = str(os.getpid())
        self.workers = [
            subprocess.Popen([sys.executable, "-c", SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
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
            except BaseException as exc:  # noqa: BLE001 - whatever it is, the command hears of it
                ok, value = False, RuntimeError(f"an encoder process failed on shard {shard}: {exc!r}")
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
                if not any(thread.is_alive() for thread in self.threads):
                    raise RuntimeError("every encoder process has stopped") from None
        self.outstanding += 1
        return finished + self._collect(block=False)

    def finish(self) -> list[tuple[int, int, str]]:
        return self._collect(block=True)

    def _collect(self, block: bool) -> list[tuple[int, int, str]]:
        finished = []
        while self.outstanding and (block or not self.results.empty()):
            try:
                shard, count, ok, value = self.results.get(timeout=1.0)
            except queue.Empty:  # a shard no live thread will ever take
                if not any(thread.is_alive() for thread in self.threads):
                    raise RuntimeError("every encoder process has stopped") from None
                continue
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


PARENT_ENV = "VAE_RAY_ENCODER_PARENT"
# `python -c` puts the working folder first on sys.path: an encoder must not
# import a vae_ray found there instead of the command's (PYTHONPATH names it).
SERVE = "import sys\nif sys.path[:1] == ['']: del sys.path[0]\nfrom vae_ray.shardstore import serve\nserve()\n"


def serve() -> None:
    """An encoder process: store_shard for each shard read from stdin, the
    result (or the error) written back on what was stdout, until stdin ends."""
    _die_with_parent()
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
            value = (False, _portable(exc))
        _send(reply, value)


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the command's process dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: stdin's end still stops it, after its shard
        return
    if os.environ.get(PARENT_ENV) and os.getppid() != int(os.environ[PARENT_ENV]):
        os._exit(1)  # the command died before the signal was asked for


def _portable(exc: Exception) -> Exception:
    """The error as the command can rebuild it (some exceptions do not unpickle)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _send(stream, value: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    stream.write(struct.pack(f"<QI{len(views)}Q", len(data), len(views), *(v.nbytes for v in views)))
    stream.write(data)
    for view in views:
        stream.write(view)
    stream.flush()


def _receive(stream) -> Any:
    size, count = struct.unpack("<QI", _read(stream, 12))
    sizes = struct.unpack(f"<{count}Q", _read(stream, 8 * count))
    data = _read(stream, size)
    return pickle.loads(data, buffers=[_read(stream, n) for n in sizes])


def _read(stream, size: int) -> bytearray:
    buffer = bytearray(size)
    view, done = memoryview(buffer), 0
    while done < size:
        got = stream.readinto(view[done:])
        if not got:
            raise EOFError("the other end closed")
        done += got
    return buffer
