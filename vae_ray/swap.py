"""Whole-folder outputs replaced in one step: an --overwrite of a generated
or encoded set, a report's folder, an exported model, a sampling search's
results. Locally two renames, the old folder kept aside under a fixed name in
between (so the next command finishes or rolls back a swap a crash cut
short); on S3 one PUT per file, then the stale files removed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from . import storage
from .errors import UserError


def aside(target: Path) -> Path:
    """Where a swap keeps the folder it replaces until the new one is in: a
    fixed name, so that the next command finds it after a crash."""
    return target.with_name(f".{target.name}.old")


def in_the_way(path: Path, foreign_of: Callable[[str], list[str]]) -> list[str]:
    """What makes `path` (a sibling a swap needs) not ours: [] when it does not
    exist or `foreign_of` finds nothing foreign in it."""
    if not os.path.lexists(path):
        return []
    if path.is_symlink() or not path.is_dir():
        return [path.name]
    return foreign_of(str(path))


def remove_folder(folder: Path, last: tuple[str, ...] = ()) -> None:
    """Remove a folder whole, the top-level names in `last` after everything
    else: a removal cut short leaves a folder that still proves itself ours."""
    kept = []
    for child in sorted(folder.iterdir()):
        if child.name in last and child.is_file() and not child.is_symlink():
            kept.append(child)  # (a class folder may bear the name: only files wait)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    for child in kept:
        child.unlink()
    folder.rmdir()


def swap_folder(new: Path, target: Path, last: tuple[str, ...] = ()) -> None:
    """Put the complete folder `new` in place of `target`: two renames, the old
    folder kept aside in between (see settle_swap), then removed."""
    old = aside(target)
    had_old = os.path.lexists(target)
    if had_old:
        target.rename(old)
    new.rename(target)
    storage.fsync_dir(target.parent)
    if had_old:
        remove_folder(old, last)


def settle_swap(out: str, foreign_of: Callable[[str], list[str]], last: tuple[str, ...] = ()) -> None:
    """Finish or roll back a local swap a crash cut short (call under the
    output's lock): with `out` missing, the folder set aside goes back (the
    crash came between the two renames; the staging folder is still there for
    the rerun); with `out` present, the removal of the old one is finished.
    A folder at the aside name holding anything foreign is never touched."""
    if storage.is_remote(out):
        return
    target = Path(out)
    old = aside(target)
    if not os.path.lexists(old) or in_the_way(old, foreign_of):
        return
    if os.path.lexists(target):
        remove_folder(old, last)
    else:
        old.rename(target)
        storage.fsync_dir(target.parent)


def staged(target: Path) -> Path:
    """Where a whole-folder output is copied before its swap: a fixed name, so
    a copy a crash left is found and removed."""
    return target.with_name(f".{target.name}.new")


def unproven(uri: str, marker: str, key: str, value: str | None = None) -> list[str]:
    """[] when `uri` is empty or its `marker` JSON holds `key` (equal to
    `value` when given); else [marker]: names alone prove nothing."""
    found = storage.leaves(uri)
    if not found:
        return []
    try:
        held = storage.read_json(storage.join(uri, marker))
    except (FileNotFoundError, ValueError, OSError):
        return found
    ok = isinstance(held, dict) and key in held and (value is None or held[key] == value)
    return [] if ok else found


def check_destination(out: str, foreign_of: Callable[[str], list[str]], what: str) -> None:
    """A whole-folder output (a report, an exported model) goes into a new or
    empty folder, or replaces a folder holding only its own files; locally the
    two names its swap uses beside it must be free or hold only its files too."""
    if storage.is_file(out):
        raise UserError(f"{out}: exists and is not a folder")
    foreign = foreign_of(out)
    if foreign:
        raise UserError(f"{out}: holds other files ({storage.some(foreign)}), not {what}; choose another --out")
    if storage.is_remote(out):
        return
    for sibling in (staged(Path(out)), aside(Path(out))):
        foreign = in_the_way(sibling, foreign_of)
        if foreign:
            raise UserError(
                f"{sibling}: holds other files ({storage.some(foreign)}); {out} is swapped in "
                f"through this name: move it"
            )


def publish_folder(folder: Path, out: str) -> None:
    """Put a finished whole-folder output in place (call under the output's
    lock, after check_destination): locally a whole-folder swap, on S3 one PUT
    per file, then the old files the new folder lacks removed."""
    if storage.is_remote(out):
        stale = set(storage.walk_files(out)) - {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
        storage.upload(folder, out)
        for rel in stale:  # the output's own files only: check_destination proved it under the lock
            storage.delete(storage.join(out, rel))
        return
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    copy = staged(target)
    if os.path.lexists(copy):  # a copy a crash left before it was swapped in (our files only, checked)
        remove_folder(copy)
    shutil.copytree(folder, copy)
    swap_folder(copy, target)
