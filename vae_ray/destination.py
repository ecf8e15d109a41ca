"""A generated set's destination: reading a set back (nothing is believed
before it is checked), its state, its shards' markers, verification.

What the destination promises:
- a shard's files appear under their final names only when complete (a PNG
  shard's folder is written under a temporary name and renamed whole; files
  are written to a temporary name and renamed; one PUT each on S3), then a
  marker records its checksum; a rerun skips marked shards;
- `_manifest.json` is written first with the run's identity (status
  "running") and last with every shard's checksum ("complete"); the same
  command on a complete set changes nothing and says so;
- a folder is resumed, replaced or called complete only when everything in
  it, hidden names included, is a file of the set its manifest describes (or a
  leftover of our own writers): a manifest alone proves nothing, and anything
  else is refused in one line with nothing touched; a manifest is checked
  (types, bounds, safe names) before anything is built from it;
- `--overwrite` replaces only such a set, and only once the new one is
  complete: the new set is built in a hidden sibling folder and swapped in
  (locally by two renames, the old set kept as `.OUT.old` in between, which
  the next command puts back or removes after a crash; on S3 the old manifest
  is the first object removed and the new one the last written);
- a local set that cannot fit on its disk is refused before the first write;
- one writer at a time (a lock beside the destination).
The manifest's leading underscore (and the markers' dot) keep the side files
out of the way of pandas, pyarrow, DuckDB and Hugging Face `datasets`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from . import storage
from .errors import UserError
from .genplan import (
    CLASS_FIELDS,
    FILTER_FIELDS,
    FILTER_KEYS,
    MAX_CANDIDATES,
    MAX_CLASSES,
    PRIOR_FIELDS,
    SAMPLING_FIELDS,
    SET_FORMATS,
    Plan,
    check_options,
    class_folders,
    confidence_values,
    is_int,
    is_number,
    shard_files,
)
from .shardstore import MARKERS, digest
from .swap import aside, in_the_way, swap_folder

FORMAT_ID = "vae-ray-generated/1"
MANIFEST = "_manifest.json"
OLD_MANIFEST = "manifest.json"  # sets written before the manifest was renamed
CARD = "README.md"
# In an S3 staging folder only: the manifest of the set an --overwrite is
# replacing, written before that manifest is removed, so a rerun after a crash
# can still prove every key under the prefix ours and finish the swap.
REPLACING = ".replacing.json"
MAX_MANIFEST_BYTES = 64 * 2**20  # a manifest of MAX_SHARDS shards is about 12 MB
MAX_MARKER_BYTES = 4096


_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAFE_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what class_folders makes: one name, no dot first


def read_json_file(uri: str, limit: int) -> Any:
    """A small JSON file's value, or None when there is no such file. A link
    (we never write one) or a file over `limit` bytes is refused unread."""
    fs, path = storage.filesystem(uri)
    if not storage.is_remote(uri) and os.path.islink(path):
        raise UserError(f"{uri}: is a link; vae-ray never writes one there")
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise UserError(f"{uri}: cannot reach ({exc})") from None
    if info.type != pafs.FileType.File:
        return None
    if info.size > limit:
        raise UserError(f"{uri}: is larger than the {limit:,} bytes vae-ray writes there (a damaged or foreign file)")
    try:
        return storage.read_json(uri)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except ValueError:
        raise UserError(f"{uri}: is not valid JSON (a damaged set)") from None


def _manifests(root: str) -> dict[str, dict[str, Any]]:
    """The vae-ray manifests in a folder by name: `_manifest.json`, and the
    older `manifest.json` (a set begun before the rename and finished after it
    holds both). A `manifest.json` of some other tool is not one."""
    found = {}
    for name in (MANIFEST, OLD_MANIFEST):
        try:
            manifest = read_json_file(storage.join(root, name), MAX_MANIFEST_BYTES)
        except UserError:
            if name == MANIFEST:
                raise
            continue  # not JSON, too large, a link: somebody else's manifest.json
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT_ID:
            found[name] = manifest
    return found


def read_manifest(root: str) -> dict[str, Any] | None:
    """A generated set's manifest as written (unchecked: see `check_manifest`), or None when the folder holds none."""
    return next(iter(_manifests(root).values()), None)


def same_plan(raw: dict[str, Any], plan: Plan) -> bool:
    """A checked manifest's plan against this run's: a field an older version
    did not write holds its default, so a set written before the field existed
    is still the same set."""
    try:
        return Plan(**raw) == plan
    except TypeError:
        return False


def valid_entry(entry: Any, shard: int, plan: Plan) -> bool:
    """A shard's record (in a manifest or a marker): its number, image count and checksum."""
    start, end = plan.shard_range(shard)
    return (
        isinstance(entry, dict)
        and is_int(entry.get("shard"))
        and entry["shard"] == shard
        and is_int(entry.get("images"))
        and entry["images"] == end - start
        and isinstance(entry.get("sha256"), str)
        and bool(_SHA256.fullmatch(entry["sha256"]))
    )


def _valid_filter_counts(entry: dict[str, Any], plan: Plan) -> bool:
    """A filtered set's shard record also counts its candidates (at least one
    and at most MAX_CANDIDATES per image) and the images none of them passed."""
    if not getattr(plan, "filtered", False):  # encode's plans (it shares this module's machinery) never are
        return True
    images = entry["images"]
    candidates, unmet, copies = (entry.get(k) for k in FILTER_KEYS)
    return (
        all(is_int(v) for v in (candidates, unmet, copies))
        and images <= candidates <= images * MAX_CANDIDATES
        and 0 <= unmet <= images
        and 0 <= copies <= candidates
    )


def _valid_filter_summary(found: Any, plan: Plan) -> bool:
    """A filtered set's summary in its manifest: its thresholds are the plan's, its counts numbers."""
    if found is None:
        return True
    counts = ("candidates", "acceptance_rate", "unmet", "copies_dropped", "max_candidates")
    return (
        isinstance(found, dict)
        and found.get("class_confidences", "") == plan.class_confidences
        and all(is_number(found[k]) for k in counts if k in found)
    )


def check_manifest(root: str, manifest: dict[str, Any]) -> Layout:
    """The layout a manifest read back describes, once every value it is built
    from has been checked: types, bounds (no list is built from a count that
    was not), a shard entry per shard, and class folders that are safe single
    names, distinct ignoring case and the ones its classes give."""

    def bad(why: str) -> UserError:
        return UserError(f"{root}: {MANIFEST} {why} (damaged, edited, or not written by vae-ray)")

    raw = manifest.get("plan")
    names = {f.name for f in fields(Plan)}
    optional = {"shard_size", "chunk", *FILTER_FIELDS, *PRIOR_FIELDS, *SAMPLING_FIELDS, *CLASS_FIELDS}  # added later
    if not isinstance(raw, dict) or not set(raw) <= names or not names - optional <= set(raw):
        raise bad("holds no valid plan")
    if not (
        all(is_int(raw[k]) for k in ("num", "seed", "shard_size", "chunk") if k in raw)
        and all(
            isinstance(raw[k], str)
            for k in (
                "format",
                "labels",
                "checkpoint_sha256",
                "judge_sha256",
                "reference_sha256",
                *PRIOR_FIELDS,
                "group_temperatures",
                "class_confidences",
            )
            if k in raw
        )
        and all(
            is_number(raw[k])
            for k in ("temperature", "min_confidence", "max_copy_distance", "pixel_temperature")
            if k in raw
        )
    ):
        raise bad("holds a plan with values of the wrong type")
    plan = Plan(**raw)
    try:
        check_options(
            plan.num,
            plan.format,
            plan.seed,
            plan.temperature,
            plan.chunk,
            plan.shard_size,
            min_confidence=plan.min_confidence,
            max_copy_distance=plan.max_copy_distance,
            prior=plan.prior,
            group_temperatures=plan.group_temperatures,
            pixel_temperature=plan.pixel_temperature,
        )
        if plan.class_confidences:
            confidence_values(plan.class_confidences)
    except UserError as exc:
        raise bad(f"plans impossible values ({exc})") from None
    if manifest.get("count") != plan.num or manifest.get("image_format") != plan.format:
        raise bad("disagrees with its own plan")
    if manifest.get("status") not in ("running", "complete"):
        raise bad("has no valid status")
    dataset = manifest.get("dataset")
    classes = dataset.get("classes") if isinstance(dataset, dict) else None
    if (
        not isinstance(classes, list)
        or len(classes) > MAX_CLASSES
        or not all(isinstance(c, str) and len(c) <= 1000 for c in classes)
    ):
        raise bad("holds no valid list of classes")
    if plan.labels == "per-class" and not classes:
        raise bad("plans images per class but lists no classes")
    if plan.class_confidences and (
        len(confidence_values(plan.class_confidences)) != len(classes)
        or plan.min_confidence != min(confidence_values(plan.class_confidences))
    ):
        raise bad("holds class confidences that are not one per class, the least its --min-confidence")
    if not _valid_filter_summary(manifest.get("filter"), plan):
        raise bad("holds a filter summary that disagrees with its plan")
    if plan.labels not in ("none", "per-class") and not (
        re.fullmatch(r"[0-9]{1,6}", plan.labels) and int(plan.labels) < len(classes)
    ):
        raise bad(f"plans images of a class it does not list ({storage.printable(plan.labels)[:40]!r})")
    folders = class_folders(classes)
    if plan.labels != "none":
        _check_class_folders(manifest.get("class_folders"), classes, folders, bad)
    if manifest["status"] == "complete":
        shards = manifest.get("shards")
        if not isinstance(shards, list) or len(shards) != plan.num_shards:
            raise bad(f"does not list its {plan.num_shards:,} shard(s)")
        for shard, entry in enumerate(shards):
            if not valid_entry(entry, shard, plan) or not _valid_filter_counts(entry, plan):
                raise bad(f"holds a malformed entry for shard {shard}")
    return Layout(plan, tuple(folders) if plan.labels != "none" else ())


def _check_class_folders(recorded: Any, classes: list[str], folders: list[str], bad) -> None:
    """The manifest's {class name: folder} (absent in the oldest sets): safe
    names, distinct ignoring case, and what `class_folders` gives its classes."""
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise bad("holds no valid class folders")
    for folder in recorded.values():
        if not _SAFE_FOLDER.fullmatch(folder):
            raise bad(f"names an unsafe class folder {storage.printable(folder)[:80]!r}")
    lowered = [folder.lower() for folder in recorded.values()]
    if len(set(lowered)) != len(lowered):
        raise bad("has class folders that are not distinct (ignoring case): two classes would share a folder")
    if recorded != dict(zip(classes, folders, strict=True)):
        raise bad("has class folders that are not the ones its classes give")


@dataclass(frozen=True)
class Layout:
    """Where a set's files live: which relative paths a set of this plan and
    these class folders (index = label) can hold."""

    plan: Plan
    folders: tuple[str, ...]
    manifests: tuple[str, ...] = (MANIFEST,)  # the names that hold this set's manifests

    def label_of(self, index: int) -> int:
        if self.plan.labels == "none":
            return -1
        if self.plan.labels == "per-class":
            return index % len(self.folders)
        return int(self.plan.labels)

    def owns(self, rel: str) -> bool:
        """True when `rel` (a leaf, see storage.leaves) is something generate
        writes for such a set: its manifest, card, progress markers, shard
        files (by the exact names the plan gives them), and the temporary
        names of our own writers where those writers put them."""
        if rel in (*self.manifests, REPLACING) or (rel == CARD and self.plan.layout.card):
            return True
        parts = rel.rstrip("/").split("/")
        for depth, part in enumerate(parts):
            if storage.is_temp_name(part):  # a killed writer's file or shard folder, and what is inside it
                return self.owns_temp("/".join(parts[: depth + 1]))
        if rel.endswith("/"):
            return self._is_folder(rel[:-1])
        if parts[0] == MARKERS:
            match = re.fullmatch(r"[0-9]{5,6}", parts[-1].removesuffix(".json"))
            return bool(match) and rel == f"{MARKERS}/{int(match[0]):05d}.json" and int(match[0]) < self.plan.num_shards
        return self._is_shard_file(rel)

    def owns_temp(self, rel: str) -> bool:
        """A temporary name of a killed writer, in a folder we write into, of
        a file or folder this set owns (a look-alike of anything else is not ours)."""
        parent, _, name = rel.rpartition("/")
        inner = storage.temp_of(name)
        if inner is None or parent not in self._written_into():
            return False
        target = f"{parent}/{inner}" if parent else inner
        return self.owns(target) or self.owns(target + "/")

    def _written_into(self) -> set[str]:
        return {"", *(fmt.folder for fmt in SET_FORMATS.values()), MARKERS, *self.folders}

    def _is_folder(self, rel: str) -> bool:
        folder = self.plan.layout.folder
        if rel == MARKERS or rel in self.folders or (folder and rel == folder):
            return True
        match = re.fullmatch(r"(?:([^/]+)/)?([0-9]{5,6})", rel)  # a shard's folder, at the top or in a class folder
        parents = self.folders or ("",)
        return bool(match) and (match[1] or "") in parents and int(match[2]) < self.plan.num_shards

    def _is_shard_file(self, rel: str) -> bool:
        plan, shards = self.plan, self.plan.num_shards
        if plan.layout.per_image:
            match = re.fullmatch(r"(?:[^/]+/)?([0-9]{5,6})/([0-9]{9})\.png", rel)
            if not match:
                return False
            shard, index = int(match[1]), int(match[2])
            start, end = plan.shard_range(shard)
            if shard >= shards or not start <= index < end:
                return False
            label = self.label_of(index)
            prefix = f"{self.folders[label]}/" if label >= 0 else ""
            return rel == f"{prefix}{shard:05d}/{index:09d}.png"
        shard = plan.layout.shard_of(rel)
        return shard is not None and shard < shards and rel == shard_files(plan, shard, [])[0]


def read_set(root: str) -> tuple[dict[str, Any], Layout] | None:
    """A set's manifest and checked layout, or None when the folder holds no manifest."""
    manifests = _manifests(root)
    if not manifests:
        return None
    manifest = next(iter(manifests.values()))
    return manifest, replace(check_manifest(root, manifest), manifests=tuple(manifests))


def foreign_in_set(uri: str, read: Callable[[str], tuple[dict[str, Any], Any] | None] | None = None) -> list[str]:
    """The leaves of a folder that do not belong to the generated set its
    manifest describes: [] for an empty folder or exactly a set, every leaf
    when there is no manifest or it does not check. `read` reads another
    kind of set (encode's): its manifest, and what says which leaves it `owns`."""
    found = storage.leaves(uri)
    if not found:
        return []
    try:
        existing = (read or read_set)(uri)
    except UserError:
        return found
    return found if existing is None else storage.foreign_leaves(uri, existing[1].owns)


def _other_files(out: str, foreign: list[str], beside_a_set: bool) -> UserError:
    if beside_a_set:
        return UserError(
            f"{out}: holds other files ({storage.some(foreign)}) beside a generated set; vae-ray resumes or "
            f"replaces a set only when nothing else is in its folder: move them, or choose another --out"
        )
    return UserError(
        f"{out}: holds other files ({storage.some(foreign)}), not a generated set; choose an empty or new "
        f"folder (--overwrite replaces only a generated set)"
    )


def first_write_of_manifest(rel: str, manifest: str = MANIFEST) -> bool:
    """A leftover of our first write into a new folder, the manifest's, cut short."""
    return storage.temp_of(rel) == manifest


def destination_state(out: str, plan: Plan, overwrite: bool) -> str:
    """'new', 'resume', 'complete' or 'replace'; anything else is refused in one line.

    A folder is new only when it holds nothing (a leftover of our own first
    manifest write aside). Otherwise it must hold a manifest that checks, and
    nothing that manifest's set does not own, hidden names included."""
    if storage.is_file(out):
        raise UserError(f"{out}: exists and is not a folder")
    found = storage.leaves(out)
    if all(first_write_of_manifest(rel) for rel in found):
        return "new"
    existing = read_set(out)
    if existing is None:
        if overwrite and _interrupted_swap(out, plan):
            return "replace"
        raise _other_files(out, found, beside_a_set=False)
    manifest, layout = existing
    foreign = storage.foreign_leaves(out, layout.owns)
    if foreign:
        raise _other_files(out, foreign, beside_a_set=True)
    if same_plan(manifest["plan"], plan):
        return "complete" if manifest["status"] == "complete" else "resume"
    if not overwrite:
        raise UserError(
            f"{out}: holds a different generation run (other checkpoint, seed, count or format); "
            f"choose an empty folder or pass --overwrite"
        )
    return "replace"


def _interrupted_swap(out: str, plan: Plan) -> bool:
    """True when `out` (on S3, without a manifest) is an --overwrite of this
    plan that a crash cut short after the old manifest was removed: the
    staging folder holds the new set, complete, and the replaced manifest, and
    every key under `out` belongs to one set or the other."""
    if not storage.is_remote(out):
        return False  # a local swap is two renames: see settle_swap
    staging = staging_folder(out, plan)
    new = read_set(staging)
    if new is None or new[0]["status"] != "complete" or not same_plan(new[0]["plan"], plan):
        return False
    replaced = read_json_file(storage.join(staging, REPLACING), MAX_MANIFEST_BYTES)
    if not isinstance(replaced, dict):
        return False
    old = check_manifest(out, replaced)
    foreign = storage.foreign_leaves(out, lambda rel: old.owns(rel) or new[1].owns(rel))
    if foreign:
        raise _other_files(out, foreign, beside_a_set=True)
    return True


def staging_folder(out: str, plan: Plan) -> str:
    """Where an --overwrite builds its new set: a hidden sibling named by the plan, so a rerun resumes it."""
    return storage.join(storage.parent_of(out), f".{storage.name_of(out)}.overwrite-{plan.digest()}")


def completed_shards(root: str, plan: Plan) -> dict[int, dict]:
    """The shards whose markers say they are complete; a marker that does not
    check (its name, number, count or checksum) is ignored and its shard redone."""
    done = {}
    for name in storage.list_dir(storage.join(root, MARKERS)):
        match = re.fullmatch(r"([0-9]{5,6})\.json", name)
        if not match or int(match[1]) >= plan.num_shards or name != f"{int(match[1]):05d}.json":
            continue
        try:
            marker = read_json_file(storage.join(root, MARKERS, name), MAX_MARKER_BYTES)
        except UserError:
            continue
        shard = int(match[1])
        if valid_entry(marker, shard, plan) and _valid_filter_counts(marker, plan):
            done[shard] = {"shard": shard, "images": marker["images"], "sha256": marker["sha256"]}
            done[shard] |= {k: marker[k] for k in FILTER_KEYS if getattr(plan, "filtered", False)}
    return done


# ---------------------------------------------------------------------------
# Writing into it: where, whether it fits, what a crash left, an --overwrite's swap
# ---------------------------------------------------------------------------
def write_root(out: str, plan: Plan, state: str) -> str:
    """Where this run writes: the destination itself, or for --overwrite
    its staging folder, which must hold nothing or a part of this very set."""
    if state != "replace":
        return out
    check_aside(out)
    staging = staging_folder(out, plan)
    storage.refuse_link(staging, "--overwrite builds the new set there")
    if storage.is_file(staging):
        raise UserError(f"{staging}: exists and is not a folder; --overwrite builds the new set there: move it")
    found = storage.leaves(staging)
    if all(first_write_of_manifest(rel) for rel in found):
        return staging
    existing = read_set(staging)
    if existing is None or not same_plan(existing[0]["plan"], plan):
        foreign = found
    else:
        foreign = storage.foreign_leaves(staging, existing[1].owns)
    if foreign:
        raise UserError(
            f"{staging}: holds other files ({storage.some(foreign)}); --overwrite builds the new set there: move them"
        )
    return staging


def check_space(out: str, root: str, plan: Plan, shape: list[int], done: dict[int, dict]) -> None:
    """Refuse, before the first write, a set its local disk cannot hold
    (S3 has no such limit): the shards still to write, at an upper bound
    of their size in whole blocks, against the free space and free inodes
    of the nearest folder that exists."""
    if storage.is_remote(root):
        return
    todo = [s for s in range(plan.num_shards) if s not in done]
    if not todo:
        return
    where = Path(storage.filesystem(root)[1])
    while not where.is_dir() and where != where.parent:
        where = where.parent
    stats = os.statvfs(where)
    need, files = planned_size(plan, shape, todo, stats.f_frsize or 4096)
    free = shutil.disk_usage(where).free
    images = sum(end - start for start, end in map(plan.shard_range, todo))
    if need > free:
        raise UserError(
            f"{out}: {images:,} {plan.format} images need up to {human_size(need)} but {where} has "
            f"{human_size(free)} free; free some space or choose another --out"
        )
    if stats.f_files and files > stats.f_favail:
        raise UserError(
            f"{out}: {images:,} {plan.format} images need {files:,} files but the file system of "
            f"{where} has room for {stats.f_favail:,} more (free inodes); choose another --out"
        )


def remove_partial(root: str, plan: Plan, shard: int, classes: list[str]) -> None:
    """Whatever an interrupted run left of a shard, before it is written again whole."""
    folders = class_folders(classes)
    parents = {name.rsplit("/", 1)[0] if plan.layout.per_image else name for name in shard_files(plan, shard, folders)}
    for rel in parents:
        storage.delete(storage.join(root, rel))


def clean_leftovers(root: str, plan: Plan, classes: list[str]) -> None:
    """Markers served their purpose (the manifest holds the checksums now);
    temporary files and folders of killed writers must not survive a
    finished run. They only exist locally (S3 objects appear whole with one
    PUT), beside the shard folders: at the top, in data/, or in the class
    folders of a labelled set. Only our own temporary names are removed."""
    storage.delete(storage.join(root, MARKERS))
    if storage.is_remote(root):
        return
    base = Path(storage.filesystem(root)[1])
    folders = class_folders(classes) if plan.labels != "none" else []
    layout = Layout(plan, tuple(folders))
    parents = ["", "data", *folders]
    for parent in parents:
        folder = base / parent
        if folder.is_symlink() or not folder.is_dir():
            continue
        for leftover in folder.iterdir():
            if layout.owns_temp(f"{parent}/{leftover.name}".lstrip("/")):
                shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()


def swap_in(staging: str, out: str) -> None:
    """Replace the old set with the complete new one. Every leaf of the old
    one was proven ours (destination_state) under the lock we hold."""
    if not storage.is_remote(out):
        new, target = Path(storage.filesystem(staging)[1]), Path(storage.filesystem(out)[1])
        swap_folder(new, target, last=(MANIFEST, OLD_MANIFEST))
        return
    # S3 has no renames: keys are copied one by one. The old manifest is the
    # first object removed and the new one the last written, so a crash in
    # between never leaves a manifest vouching for a mixture of two sets;
    # the replaced manifest is kept in the staging folder first, so the
    # same command run again can prove the keys ours and finish.
    replaced = read_manifest(out)
    if replaced is not None:
        storage.write_json(storage.join(staging, REPLACING), replaced)
        for name in (MANIFEST, OLD_MANIFEST):
            storage.delete(storage.join(out, name))
    fs, _ = storage.filesystem(out)

    def copy(rel: str) -> None:
        fs.copy_file(storage.filesystem(storage.join(staging, rel))[1], storage.filesystem(storage.join(out, rel))[1])

    new = [rel for rel in storage.walk_files(staging) if rel not in (MANIFEST, REPLACING)]
    for rel in new:
        copy(rel)
    for stale in set(storage.walk_files(out)) - {*new, MANIFEST}:
        storage.delete(storage.join(out, stale))
    copy(MANIFEST)  # the last object written
    storage.delete(staging)


def check_aside(out: str) -> None:
    """An --overwrite sets the old set aside under a fixed name: that name must be free or ours."""
    if storage.is_remote(out):
        return
    old = aside(Path(out))
    foreign = in_the_way(old, foreign_in_set)
    if foreign:
        raise UserError(
            f"{old}: holds other files ({storage.some(foreign)}); --overwrite sets the old set aside under "
            f"this name until the new one is in: move it"
        )


def verify(out: str) -> dict[str, Any]:
    """Check a finished set against its manifest: every file, every checksum,
    and nothing in the folder that is not the set's own."""
    root, manifest, layout = check_finished(out)
    for entry in manifest["shards"]:
        read_shard(root, shard_files(layout.plan, entry["shard"], list(layout.folders)), entry)
    return manifest


def check_finished(out: str) -> tuple[str, dict[str, Any], Any]:
    """A finished set's (root, manifest, layout), after the checks that read
    no shard: complete, and nothing in the folder that is not the set's own."""
    root = storage.check_uri(out)
    if not storage.is_dir(root):
        raise UserError(f"{out}: no such folder")
    found = read_set(root)
    if found is None:
        raise UserError(f"{out}: no {MANIFEST}; not a generated set")
    manifest, layout = found
    if manifest["status"] != "complete":
        raise UserError(f"{out}: generation did not finish (status {manifest['status']!r}); rerun it to resume")
    extra = storage.foreign_leaves(root, layout.owns)  # before any file is read: links are never followed
    if extra:
        raise UserError(
            f"{out}: holds {len(extra)} file(s) that are not this set's (links, FIFOs, or not in {MANIFEST}): "
            f"{storage.some(extra)}"
        )
    return root, manifest, layout


def read_shard(root: str, names: list[str], entry: dict[str, Any]) -> list[bytes]:
    """One shard's files, after checking them against the manifest's checksum."""
    try:
        blobs = [storage.read_bytes(storage.join(root, name)) for name in names]
    except (FileNotFoundError, IsADirectoryError, OSError):
        raise UserError(f"{root}: shard {entry['shard']} is missing files") from None
    if digest(blobs) != entry["sha256"]:
        raise UserError(f"{root}: shard {entry['shard']} does not match its checksum")
    return blobs


def planned_size(plan: Plan, shape: list[int], shards: list[int], block: int) -> tuple[int, int]:
    """An upper bound on the bytes (in whole blocks) and the files that `shards`
    of a plan take on disk. A PNG holds at most its scanlines (a filter byte
    each) as zlib's worst case, plus 57 bytes of chunks; Parquet and NPZ hold
    at most the raw pixels and two int64 columns per image, plus 64 KiB of
    headers per file; markers, shard folders and the manifest come on top."""
    height, width, channels = (int(x) for x in shape)
    rows = height * (1 + width * channels)
    png = 57 + rows + (rows >> 12) + (rows >> 14) + (rows >> 25) + 13
    per_image = png + 40 if plan.layout.png_inside else height * width * channels + 24

    def blocks(size: int) -> int:
        return -(-size // block) * block

    need, files = 0, 0
    for shard in shards:
        start, end = plan.shard_range(shard)
        if plan.layout.per_image:
            need += (end - start) * blocks(png) + blocks(1)  # each file, and the shard's folder
            files += end - start + 1
        else:
            need += blocks((end - start) * per_image + 65536)
            files += 1
        need += blocks(1)  # its progress marker
        files += 1
    need += 2 * blocks(200 * plan.num_shards + 65536)  # the manifest (and its card), written twice
    return need, files + 2


def human_size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"
