"""Where files live: local paths or `s3://bucket/prefix`, through one set of functions.

Every output of the tool goes through here, so the same guarantees hold
everywhere:
- whole files appear under their final name only when complete (a local
  write goes to a temporary name, is fsynced and renamed; an S3 object is one
  PUT, which is atomic);
- appends tolerate a torn last line (an append cut short by a kill or a full
  disk): readers skip it with a warning and the next append repairs it;
- one writer per output: `Lock` holds an advisory lock beside the output
  (`fcntl.flock` locally, a conditional create of a lock object on S3).

S3 endpoint and credentials come from the standard AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) or the node's instance profile;
they are never printed.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from .errors import UserError, first_line

SCHEMES = ("s3",)
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------
def is_remote(uri: str | Path) -> bool:
    return "://" in str(uri)


def check_uri(uri: str | Path) -> str:
    """The URI as text, or one line saying why it cannot be used: a local
    path never silently stands in for a URI of an unsupported scheme."""
    text = str(uri)
    if not text:
        raise UserError("an empty path was given")
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in SCHEMES:
            raise UserError(f"{text}: unsupported storage scheme '{scheme}://' (use a local path or s3://)")
        if not text.split("://", 1)[1].strip("/"):
            raise UserError(f"{text}: needs a bucket, e.g. s3://bucket/prefix")
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    base = str(uri).rstrip("/")
    rest = "/".join(p.strip("/") for p in parts if p)
    return f"{base}/{rest}" if rest else base


def name_of(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def parent_of(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[0]


@functools.lru_cache(maxsize=8)
def _remote_fs(scheme_and_bucket: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(scheme_and_bucket)
    return fs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI."""
    uri = check_uri(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), uri
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    try:
        fs = _remote_fs(f"{scheme}://{bucket}")
    except (pafs.ArrowInvalid, ValueError, OSError) as exc:
        raise UserError(f"{uri}: cannot open ({first_line(exc)})") from None
    return fs, rest.rstrip("/")


def _info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise UserError(f"{uri}: cannot reach ({first_line(exc)})") from None


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def is_file(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.File


def list_dir(uri: str) -> list[str]:
    """Names of the entries directly inside a folder (none if it does not exist)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)))


def walk_files(uri: str) -> list[str]:
    """Every file below a folder, as paths relative to it."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    cut = len(path.rstrip("/")) + 1
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path[cut:] for i in infos if i.type == pafs.FileType.File)


# ---------------------------------------------------------------------------
# Reading and writing whole files
# ---------------------------------------------------------------------------
def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that it appears complete or not at all."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        with fs.open_output_stream(path) as fh:  # one PUT: the object exists whole or not at all
            fh.write(data)
        return
    write_local_atomic(Path(path), data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2) + "\n")


def write_local_atomic(path: Path, data: bytes) -> None:
    """Temporary name, fsync, rename, fsync of the folder: after a crash the
    file is either the old one or the new one, never a mixture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync folders
        pass
    finally:
        os.close(fd)


def delete(uri: str) -> None:
    """Remove a file or a whole folder (nothing if it does not exist)."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        if is_remote(uri):
            fs.delete_dir(path)
        else:
            shutil.rmtree(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def upload(local: str | Path, uri: str) -> None:
    """Copy a local file or folder to `uri` (each file one PUT)."""
    local = Path(local)
    if local.is_dir():
        for child in sorted(local.rglob("*")):
            if child.is_file():
                write_bytes(join(uri, child.relative_to(local).as_posix()), child.read_bytes())
    else:
        write_bytes(uri, local.read_bytes())


def download(uri: str, local: str | Path) -> Path:
    """Copy a remote folder (or file) to a local path."""
    local = Path(local)
    files = walk_files(uri)
    if not files:
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(read_bytes(uri))
        return local
    for rel in files:
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(join(uri, rel)))
    return local


# ---------------------------------------------------------------------------
# Line-oriented logs (metrics.jsonl)
# ---------------------------------------------------------------------------
def read_jsonl(uri: str) -> list[dict]:
    """Every record of a JSON-lines file. A torn last line (an append cut
    short) is skipped with a warning; damage anywhere else is a user error."""
    try:
        text = read_bytes(uri).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):  # no newline after it: the last append was cut short
                log.warning("%s: ignoring a torn last line (an interrupted write)", uri)
                warn_user(f"{uri}: ignored a torn last line (an interrupted write); it is repaired on the next write")
                continue
            raise UserError(f"{uri}: line {number} is not valid JSON (corrupt file)") from None
    return records


def append_jsonl(uri: str, record: dict) -> None:
    """Append one record durably; a torn last line left by an earlier writer is cut first."""
    line = (json.dumps(record) + "\n").encode()
    fs, path = filesystem(uri)
    if is_remote(uri):  # objects cannot be appended to: rewrite it whole (metrics files are small)
        try:
            old = read_bytes(uri)
        except FileNotFoundError:
            old = b""
        write_bytes(uri, _without_torn_tail(old) + line)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size:
            fh.seek(max(0, size - 65536))
            tail = fh.read()
            if not tail.endswith(b"\n"):
                keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
                fh.truncate(keep)
        fh.seek(0, os.SEEK_END)
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def _without_torn_tail(data: bytes) -> bytes:
    if not data or data.endswith(b"\n"):
        return data
    cut = data.rfind(b"\n")
    return data[: cut + 1] if cut >= 0 else b""


_WARNINGS: list = []


def warn_user(text: str) -> None:
    """A warning for the person at the terminal (printed by the CLI once)."""
    if text not in _WARNINGS:
        _WARNINGS.append(text)
        sys.stderr.write(f"warning: {text}\n")


# ---------------------------------------------------------------------------
# One writer per output
# ---------------------------------------------------------------------------
def lock_uri(uri: str) -> str:
    """The lock of an output sits beside it: `.<name>.lock`."""
    return join(parent_of(uri), f".{name_of(uri)}.lock")


class Lock:
    """An advisory lock for the life of a command that writes `uri`.

    A second writer fails at once with one line naming the holder. Locally the
    lock is `fcntl.flock` on `.<name>.lock` beside the output, released by the
    kernel when its process dies, so a dead holder never blocks anyone. On S3
    the lock object is created with a conditional PUT (If-None-Match) and kept
    fresh by a heartbeat; one whose heartbeat stopped more than STALE_S ago
    belongs to a dead process and is taken over.
    """

    STALE_S = 120
    HEARTBEAT_S = 30

    def __init__(self, uri: str, command: str = ""):
        self.uri, self.path = uri, lock_uri(uri)
        self.command = command or " ".join(["vae-ray", *sys.argv[1:2]])
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict:
        return {
            "command": self.command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "heartbeat": time.time(),
            "token": uuid.uuid4().hex,
        }

    def __enter__(self) -> Lock:
        if is_remote(self.uri):
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local ------------------------------------------------------------
    def _acquire_local(self) -> None:
        path = Path(filesystem(self.path)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"{self.uri}: {self._describe(_read_holder(path))}") from None
                raise
            # The holder before us may have removed the file after we opened
            # it: then our lock is on a file nobody else sees; try again.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self.holder()).encode())
        self._fd = fd

    # -- S3 ---------------------------------------------------------------
    def _acquire_remote(self) -> None:
        me = self.holder()
        for _ in range(2):
            if _put_if_absent(self.path, json.dumps(me).encode()):
                self._token = me["token"]
                self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="vae-ray-lock")
                self._thread.start()
                return
            try:
                holder = read_json(self.path)
            except (FileNotFoundError, ValueError):
                continue  # released (or half-visible) meanwhile: try again
            if time.time() - float(holder.get("heartbeat", 0)) > self.STALE_S:
                warn_user(
                    f"{self.uri}: taking over a stale lock of {holder.get('command')} "
                    f"(pid {holder.get('pid')} on {holder.get('host')}, silent for over {self.STALE_S} s)"
                )
                delete(self.path)
                continue
            raise UserError(f"{self.uri}: {self._describe(holder)}")
        raise UserError(f"{self.uri}: could not take the lock {self.path}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                holder = read_json(self.path)
                if holder.get("token") != self._token:
                    return  # someone took it over: stop touching it
                write_bytes(self.path, json.dumps({**holder, "heartbeat": time.time()}).encode())
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried; staleness needs several
                continue

    def _describe(self, holder: dict) -> str:
        if not holder:
            return "in use by another vae-ray command; wait for it to finish"
        return (
            f"in use by `{holder.get('command', 'vae-ray')}` (pid {holder.get('pid')} on {holder.get('host')}, "
            f"since {holder.get('since')}); wait for it to finish"
        )

    def release(self) -> None:
        if self._fd is not None:
            path = Path(filesystem(self.path)[1])
            try:
                path.unlink()  # safe: lockers check the inode they locked is still the file's
            except FileNotFoundError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            try:
                if read_json(self.path).get("token") == self._token:
                    delete(self.path)
            except (FileNotFoundError, ValueError, OSError):
                pass
            self._thread = None


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _put_if_absent(uri: str, data: bytes) -> bool:
    """Create an object only if it does not exist (S3's If-None-Match: *).

    Without boto3 (the `vae-ray[s3]` extra) this falls back to check-then-put,
    which two writers starting in the same instant can both pass."""
    try:
        from botocore.exceptions import ClientError
    except ImportError:
        if exists(uri):
            return False
        write_bytes(uri, data)
        return True
    bucket, key = uri.split("://", 1)[1].split("/", 1)
    client = _boto_client()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
            return False
        raise UserError(f"{uri}: cannot create the lock object ({first_line(exc)})") from None


@functools.lru_cache(maxsize=1)
def _boto_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


# ---------------------------------------------------------------------------
# Pointers (RUN/latest, SEARCH/best)
# ---------------------------------------------------------------------------
def set_pointer(folder: str, name: str, target: str) -> None:
    """Make `folder/name` point at `folder/target` (a relative path). Locally a
    symlink replaced atomically; on S3, where there are no links, a small
    object holding the target's relative path."""
    if is_remote(folder):
        write_text(join(folder, name), target + "\n")
        return
    root = Path(filesystem(folder)[1])
    tmp = root / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    os.symlink(target, tmp)
    os.replace(tmp, root / name)
    fsync_dir(root)


def read_pointer(folder: str, name: str) -> str | None:
    """The relative target of `folder/name`, or None when there is none."""
    if not is_remote(folder):
        link = Path(filesystem(folder)[1]) / name
        if link.is_symlink():
            return os.readlink(link)
        if not link.is_file():  # a folder (a copied checkpoint) or nothing
            return None
    try:
        text = read_bytes(join(folder, name)).decode().strip()
    except (FileNotFoundError, IsADirectoryError, OSError):
        return None
    if not text or "\n" in text or text.startswith("/") or ".." in text.split("/"):
        return None  # not a pointer we wrote
    return text
