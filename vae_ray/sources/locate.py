"""Finding a dataset's files: --source, environment variable, Debian path,
cache, download (official files, checked against their MD5 sums); unpacking
archives safely (no absolute paths, no links out, bounded size and count)."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from ..errors import UserError
from . import Source, short
from .cifar import cifar10_source
from .folder import imagefolder_source
from .idx import FASHION_CLASSES, MNIST_CLASSES, find_idx_files, idx_source
from .synthetic import synthetic_digits_source

DATASETS = ("mnist", "fashion-mnist", "cifar10", "imagefolder", "synthetic")
ENV_VARS = {
    "mnist": "VAE_RAY_MNIST_DIR",
    "fashion-mnist": "VAE_RAY_FASHION_MNIST_DIR",
    "cifar10": "VAE_RAY_CIFAR10_DIR",
}
SYSTEM_PATHS = {
    "fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [Path("/usr/share/datasets/mnist")],
}
DOWNLOADS = {  # name -> (base URL, {file: md5}); the official files
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
}
# Archives are unpacked into the prepare's own temporary folder; these bound
# what a hostile archive can make it write.
MAX_ARCHIVE_BYTES = int(os.environ.get("VAE_RAY_MAX_ARCHIVE_BYTES", 64 * 1024**3))
MAX_ARCHIVE_MEMBERS = int(os.environ.get("VAE_RAY_MAX_ARCHIVE_MEMBERS", 2_000_000))
MAX_DOWNLOAD_BYTES = 512 * 1024**2
# tarfile reads a pax or GNU long-name header into memory whole, whatever
# size it declares; real ones hold a few names and numbers.
MAX_TAR_HEADER = 1024**2


def cache_dir(name: str) -> Path:
    base = os.environ.get("VAE_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vae-ray"
    )
    return Path(base) / "datasets" / name


def _looks_complete(name: str, root: Path) -> bool:
    if not root.is_dir():
        return False
    if name == "cifar10":
        return (
            any((c / "data_batch_1").is_file() for c in (root, root / "cifar-10-batches-py"))
            or (root / "train").is_dir()
        )
    return find_idx_files(root) is not None


def locate(name: str, source: str | None, download: bool = True) -> Path:
    """Find the files for a named dataset, in the documented order."""
    if source is not None:
        if "://" in source:
            raise UserError(f"{source}: --source must be a local folder or archive (download it first)")
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"{path}: --source not found")
        return path
    env = ENV_VARS.get(name)
    candidates = (
        ([Path(os.environ[env]).expanduser()] if env and os.environ.get(env) else [])
        + SYSTEM_PATHS.get(name, [])
        + [cache_dir(name)]
    )
    for path in candidates:
        if _looks_complete(name, path):
            return path
    if download and name in DOWNLOADS:
        return fetch(name, cache_dir(name))
    where = ", ".join(str(p) for p in candidates) or "(none)"
    raise UserError(
        f"{name}: dataset files not found (looked in {where}); pass --source DIR" + (f" or set {env}" if env else "")
    )


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
                payload = response.read(MAX_DOWNLOAD_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise UserError(
                f"{name}: not found locally and download from {url} failed ({short(exc)}); "
                f"offline? put the files in {dest}, set {env}, or pass --source DIR"
            ) from None
        if len(payload) > MAX_DOWNLOAD_BYTES or _md5(payload) != md5:
            raise UserError(f"{name}: checksum mismatch for downloaded {filename}; not saved")
        tmp = target.with_name(f".{filename}.part")
        tmp.write_bytes(payload)
        tmp.replace(target)
    if name == "cifar10":
        extract_archive(dest / "cifar-10-python.tar.gz", dest)
    return dest


def _md5(payload: bytes) -> str:
    return hashlib.md5(payload, usedforsecurity=False).hexdigest()


def extract_archive(path: Path, workdir: Path) -> Path:
    """Unpack a .tar(.gz) source into `workdir` safely: its headers checked
    first (`check_tar_headers`), then tarfile's "data" filter (no absolute
    paths, no links out, no devices), and at most MAX_ARCHIVE_MEMBERS members
    and MAX_ARCHIVE_BYTES bytes, checked from the member headers as they
    stream by, before their data is written."""
    if not check_tar_headers(path):
        raise UserError(f"{path}: not a tar archive")
    free = shutil.disk_usage(workdir).free
    budget = min(MAX_ARCHIVE_BYTES, free)
    try:
        with tarfile.open(path) as tar:
            total = 0
            for count, member in enumerate(tar, start=1):
                total += max(member.size, 0)
                if count > MAX_ARCHIVE_MEMBERS:
                    raise UserError(f"{path}: more than {MAX_ARCHIVE_MEMBERS:,} members; refusing to unpack")
                if total > budget:
                    raise UserError(
                        f"{path}: unpacks to more than {budget:,} bytes "
                        f"({'the free disk space' if budget == free else 'the limit'}); refusing"
                    )
                tar.extract(member, workdir, filter="data")
    except UserError:
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot unpack archive ({short(exc)})") from None
    entries = [p for p in workdir.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else workdir


# ---------------------------------------------------------------------------
# Tar headers, read as tarfile reads them, before tarfile does
# ---------------------------------------------------------------------------
_PAX = (b"x", b"g", b"X")  # extended (next member), global, Solaris extended
_HEADER_KINDS = {b"x": "pax", b"g": "pax global", b"X": "pax", b"L": "GNU long name", b"K": "GNU long link name"}
_SKIPPED = (b"0", b"\0", b"7")  # regular files: tarfile skips their data by size
_KNOWN = (*_SKIPPED, b"1", b"2", b"3", b"4", b"5", b"6", b"L", b"K", b"S", *_PAX)
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


def check_tar_headers(path: Path) -> bool:
    """True for a tar archive (raw, .gz, .bz2 or .xz) whose headers are safe
    to hand to tarfile; False for a file that is not a tar archive.

    tarfile reads a pax or GNU long-name header whole into memory, whatever
    size it declares (a 97 KB .tar.gz can declare a 100 MB one), and reads
    the sparse maps of sparse members block by block. So the decompressed
    stream is walked here first, 512-byte header block by block, skipping
    member data by the same sizes tarfile uses: a header over MAX_TAR_HEADER,
    a negative size, or a sparse member is refused before tarfile parses any."""
    try:
        with _decompressed(path) as stream:
            return _walk_headers(path, stream)
    except (OSError, EOFError, zlib.error, lzma.LZMAError):
        return False  # cannot even be opened: not an archive


def _decompressed(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")
    return open(path, "rb")  # noqa: SIM115 - closed by the caller's `with`


def _walk_headers(path: Path, stream) -> bool:
    seen, size_override, global_pax = 0, None, {}
    try:
        while True:
            block = stream.read(512)
            header = _parse_header(block)
            if header is None:  # the end, or a block tarfile would stop at (or refuse, when it is the first)
                return seen > 0
            seen += 1
            kind, size = header
            if kind in _HEADER_KINDS:
                if not 0 <= size <= MAX_TAR_HEADER:
                    raise UserError(
                        f"{path}: a {_HEADER_KINDS[kind]} header of {size:,} bytes "
                        f"(at most {MAX_TAR_HEADER:,} accepted); refusing to unpack"
                    )
                data = stream.read(size)
                _skip(stream, -size % 512)
                if kind in _PAX:
                    records = _pax_records(data)
                    if any(key.startswith(b"GNU.sparse.") for key in records):
                        raise UserError(f"{path}: holds a sparse file; refusing to unpack")
                    if kind == b"g":
                        global_pax.update(records)
                    elif b"size" in {**global_pax, **records}:
                        size_override = _pax_number({**global_pax, **records}[b"size"])
                continue
            if kind == b"S":
                raise UserError(f"{path}: holds a sparse file; refusing to unpack")
            if size_override is not None:  # a pax header's size replaces the member's own
                size, size_override = size_override, None
            if size < 0:
                raise UserError(f"{path}: a member declares a negative size; refusing to unpack")
            if kind in _SKIPPED or kind not in _KNOWN:
                _skip(stream, size + (-size % 512))
    except (OSError, EOFError, zlib.error, lzma.LZMAError):
        return seen > 0  # damaged further on: tarfile says so when it gets there


def _parse_header(block: bytes) -> tuple[bytes, int] | None:
    """(type, size) of a valid header block, as tarfile.TarInfo.frombuf reads it; None otherwise."""
    if len(block) < 512 or block.count(0) == 512:
        return None
    try:
        checksum = _number(block[148:156])
        for start, end in ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345)):
            _number(block[start:end])
        size = _number(block[124:136])
    except ValueError:
        return None
    unsigned = 256 + sum(struct.unpack_from("148B8x356B", block))
    signed = 256 + sum(struct.unpack_from("148b8x356b", block))
    if checksum not in (unsigned, signed):
        return None
    kind = block[156:157]
    if kind == b"\0" and block[:100].split(b"\0", 1)[0].endswith(b"/"):
        kind = b"5"  # old tars write a folder as a regular file whose name ends in '/'
    return kind, size


def _number(field: bytes) -> int:
    """A numeric header field, as tarfile.nti reads it (octal, or base-256)."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    text = field.split(b"\0", 1)[0].decode("ascii")
    return int(text.strip() or "0", 8)


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    records, pos = {}, 0
    while (match := _PAX_RECORD.match(data, pos)) is not None:
        length = int(match.group(1))
        if length <= 0:
            break
        records[match.group(2)] = data[match.end(2) + 1 : match.start(1) + length - 1]
        pos += length
    return records


def _pax_number(value: bytes) -> int:
    try:
        return int(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return 0  # as tarfile does


def _skip(stream, count: int) -> None:
    while count > 0:
        got = len(stream.read(min(count, 1 << 20)))
        if not got:
            raise EOFError("unexpected end of data")
        count -= got


def open_source(
    name: str,
    source: str | None = None,
    *,
    limit: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    test_fraction: float = 0.1,
    skip_corrupt: bool = False,
    seed: int = 0,
    workdir: Path | None = None,
) -> Source:
    """Resolve and open a dataset by name. `workdir` receives unpacked archives."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    if name == "synthetic":
        n_train, n_test = (limit, limit) if limit else (60000, 10000)
        return synthetic_digits_source(n_train, max(1, min(n_test, 10000)), seed=seed)
    if name == "imagefolder" and source is None:
        raise UserError("imagefolder needs --source DIR (a folder of <class>/<image> files)")
    root = archive = locate(name, source)
    if root.is_file() and check_tar_headers(root):  # not tarfile.is_tarfile: it parses the first header
        root = extract_archive(root, Path(tempfile.mkdtemp(dir=workdir)))
    src = _open_tree(name, root, image_size, channels, test_fraction, skip_corrupt, seed, limit)
    if root != archive:
        src.origin = str(archive.resolve())  # the user's archive, not the temporary folder it was unpacked into
    return src


def _open_tree(
    name: str,
    root: Path,
    image_size: int | None,
    channels: int | None,
    test_fraction: float,
    skip_corrupt: bool,
    seed: int,
    limit: int | None,
) -> Source:
    folder_options = dict(
        image_size=image_size,
        channels=channels,
        test_fraction=test_fraction,
        skip_corrupt=skip_corrupt,
        seed=seed,
        limit=limit,
    )
    if not root.is_dir():
        raise UserError(f"{root}: expected a directory or a .tar.gz archive")
    if name in ("mnist", "fashion-mnist"):
        return idx_source(name, root, MNIST_CLASSES if name == "mnist" else FASHION_CLASSES)
    if name == "cifar10":
        return cifar10_source(root, **folder_options)
    return imagefolder_source(root, **folder_options)
