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
import re
import shutil
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable
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
        from .config import refuse_credentials  # they would be stored and shown wherever the URI goes

        refuse_credentials(text)
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
# Ownership: a folder is ours only if everything in it is
# ---------------------------------------------------------------------------
# The temporary names this module and the writers built on it use. A file or
# folder left under one of them by a killed writer is ours to remove; nothing
# else hidden is (`.git/`, `.ssh/`, `.env` are somebody's).
_TEMP_NAME = re.compile(r"^\.(?:(?P<file>.+)\.[0-9a-f]{8}\.tmp|tmp-[0-9a-f]{12}-(?P<folder>.+))$")


def is_temp_name(name: str) -> bool:
    """True for the names of our own unfinished writes (`.NAME.1234abcd.tmp`, `.tmp-<12 hex>-NAME`)."""
    return bool(_TEMP_NAME.match(name))


def temp_of(name: str) -> str | None:
    """NAME, for a temporary name of an unfinished write of NAME; else None.
    Anyone can make a file of such a name: it is ours only where NAME is."""
    found = _TEMP_NAME.match(name)
    return (found["file"] or found["folder"]) if found else None


def leaves(uri: str) -> list[str]:
    """Everything below a folder that holds data, hidden names included, as
    paths relative to it: files, links (never followed: a link is a leaf
    whatever it points at) and empty folders (as `NAME/`). Nothing when the
    folder does not exist."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        root = Path(path)
        if root.is_symlink() or not root.is_dir():
            return []
        found = []
        for folder, dirs, files in os.walk(root, followlinks=False):
            rel = Path(folder).relative_to(root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            for name in list(dirs):
                if os.path.islink(os.path.join(folder, name)):  # os.walk lists links to folders as folders
                    dirs.remove(name)
                    found.append(prefix + name)
            found += [prefix + name for name in files]
            if not dirs and not files and prefix:
                found.append(prefix)
        return sorted(found)
    return walk_files(uri)


def foreign_leaves(uri: str, ours: Callable[[str], bool]) -> list[str]:
    """The leaves below `uri` (see `leaves`) that `ours(relative_path)` does not
    claim. Local links, FIFOs and devices are always foreign: vae-ray's writers
    make none but the pointers a run folder checks itself."""
    local_root = None if is_remote(uri) else Path(filesystem(uri)[1])

    def odd(rel: str) -> bool:  # a link, a FIFO, a socket, a device: never one of our files (a FIFO blocks a reader)
        if local_root is None:
            return False
        mode = os.lstat(local_root / rel.rstrip("/")).st_mode
        return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))

    return [rel for rel in leaves(uri) if odd(rel) or not ours(rel)]


def refuse_foreign(uri: str, ours: Callable[[str], bool], what: str, advice: str = "choose another --out") -> None:
    """One line and nothing touched when `uri` holds anything `ours` does not claim."""
    if is_file(uri):
        raise UserError(f"{uri}: exists and is not a folder")
    foreign = foreign_leaves(uri, ours)
    if foreign:
        raise UserError(f"{uri}: holds {some(foreign)}, which vae-ray did not write for {what}; {advice}")


def some(names: list[str], shown: int = 3) -> str:
    """A short list of names for a one-line message (control characters made visible)."""
    names = sorted(names)
    text = ", ".join(printable(n) for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def printable(text: str) -> str:
    """Text from files or names made safe for a terminal: control characters
    (escape sequences, OSC clipboard writes, bells) shown as escapes."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in str(text))


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
    if is_remote(uri):
        fs, path = filesystem(uri)
        with fs.open_output_stream(path) as fh:  # one PUT: the object exists whole or not at all
            fh.write(data)
        return
    folder, name = local_split(uri)  # a link planted at the name is replaced, never written through
    write_local_atomic(folder / name, data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2) + "\n")


def write_local_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Temporary name of its own, fsync, rename, fsync of the folder: after a
    crash the file is either the old one or the new one, never a mixture.
    `durable=False` skips the fsyncs, for files drawn again on demand (pictures)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
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
    """Remove a file or a whole folder (nothing if it does not exist). A link
    at the name is removed itself: what it leads to is somebody else's."""
    if not is_remote(uri):
        folder, name = local_split(uri)
        path = folder / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        elif os.path.lexists(path):  # a FIFO, a socket: not a folder of ours either
            path.unlink()
        return
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def copy_folder(source: str, target: str) -> None:
    """Copy a folder of files so that `target` appears whole: locally into a
    temporary sibling renamed at the end (an old `target` is replaced), on S3
    object by object (the caller points at it only once this returns)."""
    if is_remote(target):
        for rel in walk_files(source):
            write_bytes(join(target, rel), read_bytes(join(source, rel)))
        return
    folder, name = local_split(target)  # a link planted at `target` is replaced, not what it leads to
    src, dst = Path(filesystem(source)[1]), folder / name
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copytree(src, tmp, symlinks=True)
        if dst.is_symlink():
            dst.unlink()
        elif dst.is_dir():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dst.parent)


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
    """Append one record durably. A torn last line left by an earlier writer is
    cut first, however long it is; a last record that lacks only its newline
    (readers count it) is completed instead, so no complete record is lost."""
    line = (json.dumps(record) + "\n").encode()
    if is_remote(uri):  # objects cannot be appended to: rewrite it whole (metrics files are small)
        try:
            old = read_bytes(uri)
        except FileNotFoundError:
            old = b""
        write_bytes(uri, _without_torn_tail(old) + line)
        return
    folder, name = local_split(uri)
    folder.mkdir(parents=True, exist_ok=True)
    fd = _open_own_file(str(folder / name), os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        cut = _after_last_newline(fd, size)
        if cut < size:
            if _is_record(os.pread(fd, size - cut, cut) if size - cut <= _MAX_RECORD else b""):
                line = b"\n" + line
            else:
                os.ftruncate(fd, cut)
        _write_all(fd, line)  # O_APPEND: at the end, whatever was cut
        os.fsync(fd)
    finally:
        os.close(fd)


_BLOCK = 65536
_MAX_RECORD = 1 << 20  # a metrics record is a few hundred bytes; a longer tail is no record


def _after_last_newline(fd: int, size: int) -> int:
    """The offset just after the file's last newline (0 when it has none),
    searched backwards block by block: a torn tail of any length is found."""
    end = size
    while end > 0:
        start = max(0, end - _BLOCK)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def _is_record(tail: bytes) -> bool:
    """True when a last line without its newline is nonetheless a whole record
    (the write stopped just before the newline)."""
    try:
        return isinstance(json.loads(tail), dict)
    except ValueError:
        return False


def _without_torn_tail(data: bytes) -> bytes:
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    if not tail:
        return data
    if len(tail) <= _MAX_RECORD and _is_record(tail):
        return data + b"\n"
    return data[:cut]


def local_split(uri: str | Path) -> tuple[Path, str]:
    """(folder, name) of a local path, the folder resolved but not the name:
    `check_uri` resolves links all the way, which would turn a link planted at
    the name into the file it leads to, unseen."""
    path = Path(os.path.expanduser(str(uri)))
    if path.name in ("", ".", ".."):
        path = Path(check_uri(str(path)))
    return Path(check_uri(str(path.parent))), path.name


def refuse_link(uri: str, role: str) -> None:
    """One line when a local name vae-ray is about to write under is a link:
    what it leads to is somebody else's."""
    if is_remote(uri):
        return
    folder, name = local_split(uri)
    if os.path.islink(folder / name):
        raise UserError(f"{printable(str(folder / name))}: is a link; {role}, never through a link: move it")


def _open_own_file(path: str, flags: int) -> int:
    """Open a file we write in place (metrics.jsonl) without following a link:
    a link, a FIFO or a second name of another file there is refused, since
    appending and cutting a torn tail would change whatever it leads to."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
            raise UserError(f"{printable(path)}: {_what_is(path)}; vae-ray writes only files it made") from None
        raise
    why = _not_own_file(os.fstat(fd))
    if why:
        os.close(fd)
        raise UserError(f"{printable(path)}: {why}; vae-ray writes only files it made")
    return fd


def _not_own_file(st: os.stat_result) -> str:
    """Why a file (stat not following links) cannot be one of ours to write in place; "" when it can."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_nlink > 1:
        return "is a hard link (another name shares the file)"
    return ""


def _what_is(path: str, dir_fd: int | None = None) -> str:
    try:
        return _not_own_file(os.stat(path, dir_fd=dir_fd, follow_symlinks=False)) or "is not a regular file"
    except OSError:
        return "cannot be opened as a regular file"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_WARNINGS: list = []


def warn_user(text: str) -> None:
    """A warning for the person at the terminal (printed by the CLI once)."""
    if text not in _WARNINGS:
        _WARNINGS.append(text)
        sys.stderr.write(f"warning: {printable(text)}\n")


# ---------------------------------------------------------------------------
# One writer per output
# ---------------------------------------------------------------------------
def lock_uri(uri: str) -> str:
    """The lock of an output sits beside it: `.<name>.lock`."""
    if not is_remote(uri):  # a relative path too ("out" has no "/" to split at)
        folder, name = local_split(uri)
        return str(folder / f".{name}.lock")
    return join(parent_of(uri), f".{name_of(uri)}.lock")


_HOLDER_MAX = 65536  # a holder record is a few hundred bytes


class Lock:
    """An advisory lock for the life of a command that writes `uri`.

    A second writer fails at once with one line naming the holder.

    Locally the lock is `fcntl.flock` on `.<name>.lock` beside the output,
    released by the kernel when its process dies, so a dead holder never blocks
    anyone. The lock file is opened relative to its folder without following a
    link; anything at that name but a lock file vae-ray made (a link, a folder,
    a FIFO, a second name of another file, a file holding something else) is
    refused with one line and left as it is. Release removes the name only
    while it is still the file this lock holds.

    `shared=True` takes a reader's lock (`LOCK_SH`) on the same local file,
    with the same checks: readers share it, no writer gets it while one holds
    it and the other way round. Readers write nothing into it and never remove
    it (a writer may be waiting on it). On S3 a shared lock does nothing.

    On S3 the lock object is created with a conditional PUT (If-None-Match)
    and kept fresh by a heartbeat; one whose heartbeat stopped more than
    STALE_S ago belongs to a dead process and is taken over. Takeover and
    heartbeat are PUTs conditional on the ETag last seen (If-Match), so of two
    waiters taking over one stale lock exactly one wins, and a holder that was
    taken over never overwrites its successor: it learns that it lost the lock,
    and its next `ensure_held()` raises. Without boto3 (the `vae-ray[s3]`
    extra) these are check-then-put, which two writers in the same instant can
    both pass.

    Writers call `ensure_held()` before each output they write (a shard, an
    epoch's records, the manifest): it raises the one-line UserError once the
    lock is lost. A writer in another process checks with `ensure_lock_held(uri, lock.token)`.

    `wait_s`: on S3, wait up to that long for a held lock (checked every
    POLL_S) before failing. A search's trial that Tune restarts after its
    process was killed waits so for its own dead predecessor's lock to go
    stale; locally the kernel has released it already.
    """

    STALE_S = 120
    HEARTBEAT_S = 30
    POLL_S = 5

    def __init__(self, uri: str, command: str = "", shared: bool = False, wait_s: float = 0):
        self.uri, self.path = uri, lock_uri(uri)
        self.shared, self.wait_s = shared, wait_s
        self.command = command or " ".join(["vae-ray", *sys.argv[1:2]])
        self.token = ""  # set once held; the holder record carries it
        self._fd: int | None = None  # local: the locked file ...
        self._folder: int | None = None  # ... and its folder, opened once
        self._me: dict = {}  # S3: the holder record we wrote ...
        self._version = ""  # ... and its ETag (its token without boto3)
        self._beat_at = 0.0  # monotonic time of the last heartbeat that landed
        self._lost = ""  # S3: why the lock is no longer ours (set by the heartbeat)
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
            if not self.shared:  # shared (reader) locks are local only: S3 outputs are never swapped in place
                self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def ensure_held(self) -> None:
        """Raise a one-line UserError when this lock is no longer ours (its lock
        file was replaced, its S3 lock object taken over or its heartbeat
        silent for over STALE_S): the writer must stop before writing more."""
        if self._fd is not None:
            self._ensure_held_local()
        elif self._thread is not None:
            if self._lost:
                raise UserError(self._lost)
            if time.monotonic() - self._beat_at > self.STALE_S:  # others may take it over by now
                raise UserError(
                    f"lost the lock on {self.uri}: its heartbeat has not reached {self.path} "
                    f"for over {self.STALE_S} s; stopping"
                )

    def _describe(self, holder: dict) -> str:
        if not holder:
            return "in use by another vae-ray command; wait for it to finish"
        return f"in use by {_who(holder)}; wait for it to finish"

    def release(self) -> None:
        if self._fd is not None:
            self._release_local()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if not self._lost:
                try:
                    _s3_delete_if_ours(self.path, self.token)
                except Exception:  # noqa: BLE001 - left behind: the next writer takes it over once it is stale
                    pass

    # -- local ------------------------------------------------------------
    def _acquire_local(self) -> None:
        folder_path, name = local_split(self.path)
        try:
            folder_path.mkdir(parents=True, exist_ok=True)
            folder = os.open(folder_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UserError(f"{printable(folder_path)}: cannot hold the lock there ({exc.strerror})") from None
        try:
            fd = self._lock_file(folder, name)
        except BaseException:
            os.close(folder)
            raise
        self._folder, self._fd = folder, fd

    def _lock_file(self, folder: int, name: str) -> int:
        """Open, lock and claim the lock file `name` in the open folder `folder`."""
        while True:
            self._refuse_unless_lock_file(folder, name)  # look before opening: a device is never opened
            try:
                fd = os.open(
                    name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666, dir_fd=folder
                )
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):  # planted meanwhile
                    self._refuse(_what_is(name, folder))
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # e.g. another user's, in a shared folder
                    raise UserError(f"{printable(self.path)}: cannot open the lock file ({exc.strerror})") from None
                raise
            try:
                mine = self._lock_open_file(fd, folder, name)
            except BaseException:
                os.close(fd)
                raise
            if mine:
                return fd
            os.close(fd)

    def _lock_open_file(self, fd: int, folder: int, name: str) -> bool:
        """Lock the opened file and write our holder record into it; False when
        the name no longer leads to it (the holder before us removed it)."""
        why = _not_own_file(os.fstat(fd))
        if why:
            self._refuse(why)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{self.uri}: {self._describe(_parse_holder(os.pread(fd, _HOLDER_MAX, 0)))}") from None
            raise
        if not _same_file(fd, folder, name):
            return False
        why = _not_own_file(os.fstat(fd))  # a hard link made while we locked it
        old = os.pread(fd, _HOLDER_MAX + 1, 0)
        if why or (old.strip() and not _parse_holder(old)):
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._refuse(why or "holds something other than a vae-ray lock record")
        if self.shared:
            return True  # readers share the file: none of them writes into it
        # Ours now: a lock file of a killed holder (or empty) that we hold the lock on.
        me = self.holder()
        os.ftruncate(fd, 0)
        _write_all(fd, json.dumps(me).encode())
        self.token = me["token"]
        return True

    def _refuse_unless_lock_file(self, folder: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return
        why = _not_own_file(st)
        if why:
            self._refuse(why)

    def _refuse(self, why: str) -> None:
        raise UserError(
            f"{printable(self.path)}: not a vae-ray lock file ({why}); nothing was touched "
            f"(remove it if it is yours, or choose another --out)"
        )

    def _ensure_held_local(self) -> None:
        if _same_file(self._fd, self._folder, name_of(self.path)):
            return
        holder = _read_local_holder(self._folder, name_of(self.path))
        to = _who(holder) if holder else f"whoever removed {printable(self.path)}"
        raise UserError(f"lost the lock on {self.uri} to {to}; stopping")

    def _release_local(self) -> None:
        try:
            # Never a name that is now another's; readers leave it for the writer that may be waiting.
            if not self.shared and _same_file(self._fd, self._folder, name_of(self.path)):
                os.unlink(name_of(self.path), dir_fd=self._folder)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            os.close(self._folder)
            self._fd = self._folder = None

    # -- S3 ---------------------------------------------------------------
    def _acquire_remote(self) -> None:
        self._stop.clear()
        deadline = time.monotonic() + self.wait_s
        tries = 0
        while tries < 3:
            tries += 1
            me = self.holder()
            body = json.dumps(me).encode()
            version = _s3_create(self.path, body)
            if version is None:
                found = _s3_read_lock(self.path)
                if found is None:
                    continue  # released meanwhile: try again
                holder, seen = found
                if time.time() - _heartbeat_of(holder) <= self.STALE_S:
                    if time.monotonic() + self.POLL_S > deadline:
                        raise UserError(f"{self.uri}: {self._describe(holder)}")
                    time.sleep(self.POLL_S)
                    tries = 0  # waiting on a live-looking holder is not a failed try
                    continue
                warn_user(
                    f"{self.uri}: taking over a stale lock of {printable(holder.get('command'))} "
                    f"(pid {printable(holder.get('pid'))} on {printable(holder.get('host'))}, "
                    f"silent for over {self.STALE_S} s)"
                )
                # Conditional on the object we judged stale: of several waiters
                # that read it, exactly one replaces it; the others look again
                # and find the winner's fresh lock.
                version = _s3_replace(self.path, body, seen)
                if version is None:
                    continue
            self._me, self._version, self.token = me, version, me["token"]
            self._beat_at = time.monotonic()
            self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="vae-ray-lock")
            self._thread.start()
            return
        raise UserError(f"{self.uri}: could not take the lock {self.path}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried; staleness needs several
                continue
            if self._lost:
                return  # someone took it over: never touch it again

    def _beat(self) -> None:
        """Refresh the lock object, conditional on it being the one we wrote last."""
        body = json.dumps({**self._me, "heartbeat": time.time()}).encode()
        version = _s3_replace(self.path, body, self._version)
        if version is None:
            found = _s3_read_lock(self.path)
            if found is not None and found[0].get("token") == self.token:
                version = found[1]  # our own last write, whose reply was lost: still ours
            else:
                to = _who(found[0]) if found else f"whoever removed {self.path}"
                self._lost = f"lost the lock on {self.uri} to {to}; stopping"
                return
        self._version, self._beat_at = version, time.monotonic()


def ensure_lock_held(uri: str, token: str) -> None:
    """For a writer in another process than the lock's holder (a Train
    controller): raise the one-line UserError unless the lock of `uri` still
    carries the holder's `token` (`Lock.token`)."""
    if is_remote(uri):
        found = _s3_read_lock(lock_uri(uri))
        holder = found[0] if found else {}
    else:
        folder_path, name = local_split(lock_uri(uri))
        try:
            folder = os.open(folder_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            holder = {}
        else:
            try:
                holder = _read_local_holder(folder, name)
            finally:
                os.close(folder)
    if holder.get("token") != token:
        to = _who(holder) if holder else f"whoever removed {printable(lock_uri(uri))}"
        raise UserError(f"lost the lock on {uri} to {to}; stopping")


def _who(holder: dict) -> str:
    """A holder record (read from a file: anything) as words for a message."""
    return printable(
        f"`{holder.get('command', 'vae-ray')}` (pid {holder.get('pid')} on {holder.get('host')}, "
        f"since {holder.get('since')})"
    )


def _parse_holder(data: bytes) -> dict:
    """A holder record, or {} when the bytes are none."""
    if len(data) > _HOLDER_MAX:
        return {}
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) and "token" in holder else {}


def _heartbeat_of(holder: dict) -> float:
    try:
        return float(holder.get("heartbeat", 0))
    except (TypeError, ValueError):
        return 0.0


def _same_file(fd: int, folder: int, name: str) -> bool:
    """Whether `name` in the open folder is still the file open as `fd` (not followed if a link)."""
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_local_holder(folder: int, name: str) -> dict:
    """The holder record at `name` in an open folder; {} when there is none (a link is not followed)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except OSError:
        return {}
    try:
        return _parse_holder(os.pread(fd, _HOLDER_MAX + 1, 0)) if stat.S_ISREG(os.fstat(fd).st_mode) else {}
    finally:
        os.close(fd)


# The lock object's conditional operations. With boto3 a "version" is the
# object's ETag and the conditions are S3's (If-None-Match, If-Match); without
# it a version is the holder's token and each condition a check-then-act.
def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, key = uri.split("://", 1)[1].split("/", 1)
    return bucket, key


def _have_boto() -> bool:
    try:
        import botocore.exceptions  # noqa: F401
    except ImportError:
        return False
    return True


def _s3_call(uri: str, doing: str, call: Callable[[], Any]) -> Any:
    """One boto3 call on the lock object: its result, or None when its
    condition did not hold or the object is gone. Any other failure (refused,
    unreachable) is one line."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412") or status in (409, 412):
            return None
        raise UserError(f"{uri}: cannot {doing} ({first_line(exc)})") from None
    except BotoCoreError as exc:
        raise UserError(f"{uri}: cannot reach S3 to {doing} ({first_line(exc)})") from None


def _s3_create(uri: str, data: bytes) -> str | None:
    """Create the lock object only if it does not exist: its version, or None."""
    if not _have_boto():
        if exists(uri):
            return None
        write_bytes(uri, data)
        return json.loads(data)["token"]
    bucket, key = _bucket_key(uri)
    reply = _s3_call(
        uri,
        "create the lock object",
        lambda: _boto_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"),
    )
    return reply["ETag"] if reply else None


def _s3_replace(uri: str, data: bytes, version: str) -> str | None:
    """Overwrite the lock object only if it is still at `version`: the new version, or None."""
    if not _have_boto():
        found = _s3_read_lock(uri)
        if found is None or found[1] != version:
            return None
        write_bytes(uri, data)
        return json.loads(data)["token"]
    bucket, key = _bucket_key(uri)
    reply = _s3_call(
        uri,
        "write the lock object",
        lambda: _boto_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version),
    )
    return reply["ETag"] if reply else None


def _s3_read_lock(uri: str) -> tuple[dict, str] | None:
    """(holder record, version) of the lock object, or None when there is none."""
    if not _have_boto():
        try:
            data = read_bytes(uri)
        except FileNotFoundError:
            return None
        version = None
    else:
        bucket, key = _bucket_key(uri)

        def fetch() -> tuple[bytes, str]:
            reply = _boto_client().get_object(Bucket=bucket, Key=key)
            return reply["Body"].read(_HOLDER_MAX + 1), reply["ETag"]

        found = _s3_call(uri, "read the lock object", fetch)
        if found is None:
            return None
        data, version = found
    holder = _parse_holder(data)
    if not holder:
        raise UserError(
            f"{uri}: holds something other than a vae-ray lock record; nothing was touched "
            f"(remove it if no vae-ray command writes there)"
        )
    return holder, version or str(holder["token"])


def _s3_delete_if_ours(uri: str, token: str) -> None:
    """Remove the lock object if it still carries our token (conditional on its
    ETag where the server supports conditional deletes)."""
    found = _s3_read_lock(uri)
    if found is None or found[0].get("token") != token:
        return
    if not _have_boto():
        delete(uri)
        return
    bucket, key = _bucket_key(uri)
    try:
        _s3_call(
            uri,
            "remove the lock object",
            lambda: _boto_client().delete_object(Bucket=bucket, Key=key, IfMatch=found[1]),
        )  # None: replaced since we read it, not ours to remove
    except UserError:
        delete(uri)  # a server without conditional deletes: it carried our token a moment ago


@functools.lru_cache(maxsize=1)
def _boto_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


# ---------------------------------------------------------------------------
# Pointers (RUN/latest, SEARCH/best)
# ---------------------------------------------------------------------------
_POINTER_MAX = 4096


def set_pointer(folder: str, name: str, target: str) -> None:
    """Make `folder/name` point at `folder/target` (a relative path inside
    `folder`). Locally a symlink replaced atomically, made and renamed
    relative to the open folder; on S3, where there are no links, a small
    object holding the target's relative path."""
    if _pointer_target(target) is None:
        raise ValueError(f"a pointer must lead inside its folder, not to {target!r}")
    if is_remote(folder):
        write_text(join(folder, name), target + "\n")
        return
    root = Path(filesystem(folder)[1])
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        os.symlink(target, tmp, dir_fd=fd)
        try:
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)  # replaces the name, never what it leads to
        except BaseException as exc:
            os.unlink(tmp, dir_fd=fd)
            if isinstance(exc, IsADirectoryError):
                raise UserError(f"{printable(root / name)}: is a folder, not a pointer vae-ray made") from None
            raise
        try:
            os.fsync(fd)
        except OSError:  # some file systems do not fsync folders
            pass
    finally:
        os.close(fd)


def read_pointer(folder: str, name: str) -> str | None:
    """The relative target of `folder/name`, or None when there is none or it
    is not a pointer we could have written (empty, absolute, leaving the
    folder through '..', or long)."""
    uri = join(folder, name)
    if not is_remote(folder):
        path = Path(filesystem(folder)[1]) / name
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return _pointer_target(os.readlink(path))
        if not stat.S_ISREG(st.st_mode):  # a folder (a copied checkpoint) or something else
            return None
    elif (_info(uri).size or 0) > _POINTER_MAX:  # a pointer is one short line
        return None
    try:
        data = read_bytes(uri) if is_remote(folder) else _read_small_local(path)
    except OSError:
        return None
    return _pointer_target(data.decode("utf-8", errors="replace").strip()) if data is not None else None


def _read_small_local(path: Path) -> bytes | None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        data = os.read(fd, _POINTER_MAX + 1)
    finally:
        os.close(fd)
    return data if len(data) <= _POINTER_MAX else None


def _pointer_target(text: str) -> str | None:
    """`text` when it is a relative path that stays inside its folder, else None."""
    parts = text.split("/")
    if not text or not text.isprintable() or text.startswith("/") or ".." in parts:
        return None
    if all(part in ("", ".") for part in parts):
        return None  # the folder itself
    return text
