"""Seals: proof that state files in an output folder were written by this
user's vae-ray, for the one kind of state that is code when read back.

Ray Tune keeps a search's resume state as pickles (`tune/tuner.pkl`, and
cloudpickle blobs inside `experiment_state-*.json`): loading them runs
whatever their author put there. A search folder on shared storage is
therefore resumed only when its state carries a seal made with a key that
only this user holds:

    OUT/tune.seal.json   {"files": {name: sha256, ...}, "mac": HMAC-SHA256(key, files)}

The key is 32 random bytes in `~/.config/vae-ray/state.key` (mode 0600,
made on first use), or `$VAE_RAY_STATE_KEY` (hex) where a search moves
between machines (a job on a cluster's head node, resumed from a laptop).
The search seals its state whenever Tune has rewritten it (each step of
Tune's loop) and when it ends, so a search killed at any point keeps a seal
of the state Tune saved last but one at worst.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from . import storage
from .errors import UserError

KEY_ENV = "VAE_RAY_STATE_KEY"
MAX_STATE_BYTES = 512 * 2**20  # Tune's state of a very large search stays far below this


def key_path() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "vae-ray" / "state.key"


def state_key() -> bytes:
    """This user's sealing key (made once, readable by this user only)."""
    given = os.environ.get(KEY_ENV)
    if given:
        try:
            key = bytes.fromhex(given.strip())
        except ValueError:
            raise UserError(
                f"${KEY_ENV} must be a hex string (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            ) from None
        if len(key) < 16:
            raise UserError(f"${KEY_ENV} must hold at least 16 bytes (32 hex digits)")
        return key
    path = key_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_key(path)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the sealing key ({exc.strerror}); remove it to make a new one") from None
    with os.fdopen(fd, "rb") as fh:
        if os.fstat(fh.fileno()).st_uid != os.getuid():
            raise UserError(f"{path}: the sealing key belongs to another user; vae-ray will not use it")
        key = fh.read(4096)
    if len(key) < 16:
        raise UserError(f"{path}: the sealing key is damaged; remove it (searches sealed with it cannot be resumed)")
    return key


def _files(folder: str) -> dict[str, str]:
    """SHA-256 of every file directly in `folder` (the state Tune reads back)."""
    fs, path = storage.filesystem(folder)
    import pyarrow.fs as pafs

    out = {}
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return out
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.type != pafs.FileType.File:
            continue
        if info.size is not None and info.size > MAX_STATE_BYTES:
            raise UserError(f"{storage.join(folder, info.base_name)}: {info.size:,} bytes, too large for search state")
        out[info.base_name] = hashlib.sha256(storage.read_bytes(storage.join(folder, info.base_name))).hexdigest()
    return out


def _mac(key: bytes, files: dict[str, str]) -> str:
    return hmac.new(key, json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def seal(folder: str, seal_file: str) -> dict[str, str]:
    """Record the files of `folder` under this user's key; returns what was sealed."""
    files = _files(folder)
    storage.write_json(seal_file, {"files": files, "mac": _mac(state_key(), files)})
    return files


def check(folder: str, seal_file: str, what: str) -> None:
    """Raise one line unless every file of `folder` is exactly as sealed by this user."""
    refuse = (
        f"vae-ray loads {what} only when it was written by your own vae-ray (it is Python pickles: "
        f"reading them can run code); start a new search in another --out"
    )
    try:
        saved = storage.read_json(seal_file)
    except FileNotFoundError:
        raise UserError(f"{folder}: no seal ({storage.name_of(seal_file)}); {refuse}") from None
    except ValueError:
        raise UserError(f"{seal_file}: not valid JSON; {refuse}") from None
    files = saved.get("files") if isinstance(saved, dict) else None
    mac = saved.get("mac") if isinstance(saved, dict) else None
    if (
        not isinstance(files, dict)
        or not isinstance(mac, str)
        or not hmac.compare_digest(_mac(state_key(), files), mac)
    ):
        raise UserError(f"{seal_file}: not sealed with your key; {refuse}")
    now = _files(folder)
    changed = sorted(name for name, digest in now.items() if files.get(name) != digest)
    if changed:
        raise UserError(f"{storage.join(folder, changed[0])}: changed since vae-ray sealed it; {refuse}")
