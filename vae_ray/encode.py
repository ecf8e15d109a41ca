"""Bulk encoding: the posterior mean and log-variance of every image of a
prepared dataset, written to Parquet exactly once and resumably.

One output shard per input shard: `part-NNNNN.parquet` holds, for each
image of the dataset's shard, in order, the columns

    index   int64                       the image's index in its split (dataset.json's `index`)
    label   int16                       its label, as the dataset holds it
    split   string                      "train" or "test"
    mu      fixed_size_list<float32>[K] the posterior mean
    logvar  fixed_size_list<float32>[K] the posterior log-variance

numbered train shards first, then test shards (`--split all`). A multi-shard
job (or any job on a named cluster) is a Ray Data job, as `generate` is: one
row per shard through `map_batches` to a pool of encoder actors, each of
which reads its input shard itself, checks it against the SHA-256 that
dataset.json gives it (and its footer against the rows and image size),
encodes it and writes its part. A one-shard job with no cluster named runs
the same encoder in this process.

Nothing is random: the posterior's mean and log-variance are functions of
the checkpoint and the image, encoded in batches of `--batch-size` rows
aligned to the shard's start, so a rerun, a resume or another actor count
writes the same bytes on the same hardware and software.

The destination keeps `generate`'s promises (see vae_ray/destination.py), and
its machinery does the work (`ShardedJob.run`): a part appears whole under its final name and is then
recorded by a marker under `.progress/`; `_manifest.json` is written first
("running", with the run's identity: checkpoint SHA-256, the input shards'
checksums, the splits, K, the batch size) and last ("complete", with every
part's checksum); the same command on a complete set changes nothing; a
folder is resumed, replaced or called complete only when everything in it,
hidden names included, belongs to the set its manifest describes; a local
`--overwrite` builds the new set in a hidden sibling and swaps it in whole
(an `--overwrite` on S3 is refused: remove the old prefix first); free disk
is checked before the first write; one writer at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import cached_property, partial
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import storage
from .api import callable_module
from .checkpoint import load_blob, model_from_blob
from .data import (
    MAX_CLASSES,
    MAX_LIMIT,
    SHARD_NAME,
    SPLITS,
    check_footer,
    dataset_read_lock,
    decode_images,
    open_shard,
    read_meta,
    read_shard,
)
from .destination import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    completed_shards,
    first_write_of_manifest,
    human_size,
    read_json_file,
    staging_folder,
    valid_entry,
)
from .destination import foreign_in_set as generated_foreign_in_set
from .errors import UserError, first_line
from .genplan import MAX_SHARDS
from .images import to_float
from .sharded import ShardedJob
from .shardstore import MARKERS
from .spec import MAX_Z, ModelSpec
from .swap import aside, in_the_way, swap_folder

FORMAT_ID = "vae-ray-encoded/1"
BATCH = 256  # images per encoder call, aligned to each shard's start
MAX_BATCH = 65_536
MAX_LATENT = MAX_Z  # bounds what a manifest read back may claim
SPLIT_CHOICES = (*SPLITS, "all")
PART = re.compile(r"part-([0-9]{5,6})\.parquet")
MARKER = re.compile(r"([0-9]{5,6})\.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------
# What a run is
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The identity of an encoding run: two runs with equal plans write equal
    bytes. `sources` is one entry per output shard: the input shard's split,
    file, rows and SHA-256, as dataset.json lists them."""

    checkpoint_sha256: str
    latent_dim: int
    batch_size: int
    sources: list[dict[str, Any]]

    @property
    def num_shards(self) -> int:
        return len(self.sources)

    @cached_property
    def starts(self) -> list[int]:
        """Where each shard's rows begin in the concatenation of all shards (and where the last ends)."""
        return [0, *accumulate(s["rows"] for s in self.sources)]

    @property
    def num(self) -> int:
        return self.starts[-1]

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The shard's rows in the concatenation of all shards (its marker's image count is their number)."""
        return self.starts[shard], self.starts[shard + 1]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def owns(self, rel: str) -> bool:
        """Whether a leaf (see storage.leaves) is something encode writes for a
        set of this plan: its manifest, its parts and markers by their exact
        names, and the temporary names of our own writers beside them."""
        parts = rel.split("/")
        inner = storage.temp_of(parts[-1])  # a killed writer's file: ours where the file it was writing is
        if inner is not None:
            return self.owns("/".join([*parts[:-1], inner]))
        if len(parts) == 1:
            return rel == MANIFEST or self._numbered(rel, PART.pattern, part_name)
        if len(parts) == 2 and parts[0] == MARKERS:  # "" is the folder itself, when empty
            name = parts[1]
            return name == "" or self._numbered(name, MARKER.pattern, marker_name)
        return False

    def _numbered(self, name: str, pattern: str, exact: Callable[[int], str]) -> bool:
        match = re.fullmatch(pattern, name)
        return bool(match) and int(match[1]) < self.num_shards and name == exact(int(match[1]))


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def marker_name(shard: int) -> str:
    return f"{shard:05d}.json"


def latent_schema(latent_dim: int) -> pa.Schema:
    vector = pa.list_(pa.float32(), latent_dim)
    return pa.schema(
        [("index", pa.int64()), ("label", pa.int16()), ("split", pa.string()), ("mu", vector), ("logvar", vector)],
        metadata={b"vae_ray.latent_dim": str(latent_dim).encode()},
    )


def check_options(split: str = "all", batch_size: int | None = None, actors: int | None = None, **_: Any) -> None:
    """Every check that needs no files: run before anything else, and before --submit."""
    if split not in SPLIT_CHOICES:
        raise UserError(f"--split must be one of {', '.join(SPLIT_CHOICES)} (got {storage.printable(split)!r})")
    if batch_size is not None and not 1 <= batch_size <= MAX_BATCH:
        raise UserError(f"--batch-size must be between 1 and {MAX_BATCH} (got {batch_size})")
    if actors is not None and not 1 <= actors <= 10_000:
        raise UserError(f"--actors must be between 1 and 10000 (got {actors})")


def make_plan(blob: dict[str, Any], meta: dict[str, Any], split: str, batch_size: int) -> Plan:
    """The plan for encoding `split` of a dataset with a checkpoint, once the two fit each other."""
    model_data = blob["dataset"]
    if list(meta["shape"]) != list(model_data["shape"]):
        raise UserError(
            f"{meta['root']}: images are {tuple(meta['shape'])} but the model was trained on "
            f"{tuple(model_data['shape'])}"
        )
    if blob["config"]["conditional"] and list(meta["classes"]) != list(model_data["classes"]):
        raise UserError(
            f"{meta['root']}: its classes are not the ones the class-conditional model {blob['path']} takes "
            f"({len(meta['classes'])} against {len(model_data['classes'])}); encode a dataset with the model's classes"
        )
    sources = [
        {"split": name, "file": s["file"], "rows": int(s["rows"]), "sha256": s["sha256"]}
        for name in (SPLITS if split == "all" else (split,))
        for s in meta["splits"][name]["shards"]
    ]
    if not sources or not any(s["rows"] for s in sources):
        raise UserError(f"{meta['root']}: {'the dataset' if split == 'all' else f'split {split!r}'} has no images")
    if len(sources) > MAX_SHARDS:
        raise UserError(f"{meta['root']}: has more than {MAX_SHARDS:,} shards; vae-ray encode writes one part each")
    z_dim = ModelSpec.from_checkpoint(blob["config"], blob["dataset"], blob["path"]).z_dim
    return Plan(blob["sha256"], z_dim, batch_size, sources)


# ---------------------------------------------------------------------------
# Encoding one shard (in a Ray Data actor, or in this process)
# ---------------------------------------------------------------------------
class ShardEncoder:
    """Loads the model once, then encodes whole shards (a Ray Data actor, or
    called directly for a one-shard job)."""

    def __init__(self, model_blob: Any, plan: dict, data: str, shape: list[int], root: str, device: str, threads: int):
        torch.set_num_threads(threads)
        if isinstance(model_blob, list):  # a Ray object reference, wrapped so Ray does not resolve it early
            import ray

            model_blob = ray.get(model_blob[0])
        self.plan, self.data, self.shape, self.root = Plan(**plan), data, shape, root
        self.device = torch.device(device)
        # The layout `vae_ray.load(...).encode` uses, so a row equals what the API gives for its image.
        self.model = model_from_blob(model_blob).to(self.device).eval()
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Shard numbers in; image counts, checksums and errors out. A user's
        mistake found here (a shard that does not match dataset.json) comes
        back as data, for the driver to end with as one line: raised, it would
        reach the terminal as Ray's traceback."""
        shards, counts, sums, errors = [], [], [], []
        for shard in batch["shard"]:
            try:
                n, checksum, error = *self.write_shard(int(shard)), ""
            except UserError as exc:
                n, checksum, error = 0, "", str(exc)
            shards.append(int(shard))
            counts.append(n)
            sums.append(checksum)
            errors.append(error)
        return {
            "shard": np.array(shards),
            "images": np.array(counts),
            "sha256": np.array(sums),
            "error": np.array(errors),
        }

    def read_source(self, shard: int) -> tuple[str, pq.ParquetFile]:
        """The input shard, read whole and believed only once its bytes are the
        ones dataset.json (and so this run's manifest) names."""
        source = self.plan.sources[shard]
        path = storage.join(self.data, source["file"])
        try:
            data = storage.read_bytes(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise UserError(f"{path}: shard listed in dataset.json is missing") from None
        if hashlib.sha256(data).hexdigest() != source["sha256"]:
            raise UserError(
                f"{path}: does not match dataset.json's checksum (changed or corrupt); run `vae-ray data verify`"
            )
        try:
            table = pq.ParquetFile(pa.BufferReader(data))
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
        check_footer(path, table, source["rows"], self.shape)
        return path, table

    @torch.no_grad()
    def encode(self, path: str, table: pq.ParquetFile) -> dict[str, np.ndarray]:
        """index, label, mu and logvar of every row, in batches of the plan's size."""
        parts: dict[str, list[np.ndarray]] = {"index": [], "label": [], "mu": [], "logvar": []}
        columns = ["image", "label", "index"]
        for batch in table.iter_batches(batch_size=self.plan.batch_size, columns=columns, use_threads=False):
            labels = check_labels(path, batch.column("label").to_numpy().astype(np.int64), self.model.num_classes)
            x = to_float(decode_images(batch.column("image"), self.shape)).to(self.device)
            y = torch.from_numpy(labels).to(self.device) if self.model.num_classes else None
            mu, logvar = self.model.encode(x, y)
            parts["index"].append(batch.column("index").to_numpy().astype(np.int64))
            parts["label"].append(labels)
            parts["mu"].append(mu.float().cpu().numpy())
            parts["logvar"].append(logvar.float().cpu().numpy())
        k = self.plan.latent_dim
        return {
            name: np.concatenate(values) if values else np.empty((0, k) if name in ("mu", "logvar") else 0)
            for name, values in parts.items()
        }

    def write_shard(self, shard: int) -> tuple[int, str]:
        path, table = self.read_source(shard)
        rows = self.encode(path, table)
        data = parquet_part(rows, self.plan.sources[shard]["split"], self.plan.latent_dim)
        storage.write_bytes(storage.join(self.root, part_name(shard)), data)
        checksum = hashlib.sha256(data).hexdigest()
        marker = {"shard": shard, "images": len(rows["index"]), "sha256": checksum}
        storage.write_json(storage.join(self.root, MARKERS, marker_name(shard)), marker)
        return len(rows["index"]), checksum


def check_labels(path: str, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels fit the int16 column (-1 for none, else a class number, as
    `data prepare` writes them); a class-conditional encoder (num_classes > 0)
    takes each image's class, so a row without one or outside the model's
    classes is the user's mistake, not a crash."""
    if num_classes:
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            value = int(labels[bad][0])
            what = (
                "is unlabelled (-1)" if value < 0 else f"has label {value}, outside the model's {num_classes} classes"
            )
            raise UserError(f"{path}: an image {what}; a class-conditional model encodes labelled images only")
    elif labels.size and (labels.min() < -1 or labels.max() >= MAX_CLASSES):
        value = int(labels.min() if labels.min() < -1 else labels.max())
        raise UserError(
            f"{path}: holds label {value}, outside -1..{MAX_CLASSES - 1} (damaged or not from data prepare)"
        )
    return labels


def parquet_part(rows: dict[str, np.ndarray], split: str, latent_dim: int) -> bytes:
    """One part's bytes. Dictionary encoding only for `split`: latents do not
    repeat, and without it a part is never larger than `planned_size` says."""
    n = len(rows["index"])

    def vectors(values: np.ndarray) -> pa.Array:
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), pa.float32())
        return pa.FixedSizeListArray.from_arrays(flat, latent_dim)

    table = pa.table(
        [
            pa.array(rows["index"], pa.int64()),
            pa.array(rows["label"].astype(np.int16), pa.int16()),  # in range: check_labels
            pa.array([split] * n, pa.string()),
            vectors(rows["mu"]),
            vectors(rows["logvar"]),
        ],
        schema=latent_schema(latent_dim),
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=["split"], row_group_size=max(n, 1))
    return sink.getvalue().to_pybytes()


def planned_size(plan: Plan, shards: list[int], block: int) -> tuple[int, int]:
    """An upper bound on the bytes (in whole blocks) and files of `shards`:
    two float32 vectors, two 8-byte columns and the split's name a row (no
    compression assumed), 64 KiB of headers a part, a marker each, and the
    manifest written twice."""

    def blocks(size: int) -> int:
        return -(-size // block) * block

    per_row = 8 * plan.latent_dim + 32
    need = sum(blocks(plan.sources[s]["rows"] * per_row + 65536) + blocks(1) for s in shards)
    need += 2 * blocks(400 * plan.num_shards + 65536)
    return need, 2 * len(shards) + 2


# ---------------------------------------------------------------------------
# Reading a set back: nothing is believed before it is checked
# ---------------------------------------------------------------------------
def read_manifest(root: str) -> dict[str, Any] | None:
    """An encoded set's manifest as written (unchecked), or None when the folder holds none."""
    manifest = read_json_file(storage.join(root, MANIFEST), MAX_MANIFEST_BYTES)
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT_ID else None


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _valid_source(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and set(entry) == {"split", "file", "rows", "sha256"}
        and entry["split"] in SPLITS
        and isinstance(entry["file"], str)
        and bool(SHARD_NAME.match(entry["file"]))
        and entry["file"].startswith(f"{entry['split']}/")
        and _is_int(entry["rows"], 0, MAX_LIMIT)
        and isinstance(entry["sha256"], str)
        and bool(_SHA256.fullmatch(entry["sha256"]))
    )


def check_manifest(root: str, manifest: dict[str, Any]) -> Plan:
    """The plan a manifest read back describes, once every value in it has
    been checked: types, bounds, safe input names, an entry per part."""

    def bad(why: str) -> UserError:
        return UserError(f"{root}: {MANIFEST} {why} (damaged, edited, or not written by vae-ray)")

    raw = manifest.get("plan")
    if not isinstance(raw, dict) or set(raw) != {f.name for f in fields(Plan)}:
        raise bad("holds no valid plan")
    sources = raw["sources"]
    if not (
        isinstance(raw["checkpoint_sha256"], str)
        and _is_int(raw["latent_dim"], 1, MAX_LATENT)
        and _is_int(raw["batch_size"], 1, MAX_BATCH)
        and isinstance(sources, list)
        and 1 <= len(sources) <= MAX_SHARDS
        and all(_valid_source(s) for s in sources)
    ):
        raise bad("holds a plan with values of the wrong type or out of bounds")
    plan = Plan(**raw)
    if manifest.get("status") not in ("running", "complete"):
        raise bad("has no valid status")
    if manifest["status"] == "complete":
        shards = manifest.get("shards")
        if not isinstance(shards, list) or len(shards) != plan.num_shards:
            raise bad(f"does not list its {plan.num_shards:,} part(s)")
        for shard, entry in enumerate(shards):
            if not valid_entry(entry, shard, plan):
                raise bad(f"holds a malformed entry for part {shard}")
    return plan


def read_set(root: str) -> tuple[dict[str, Any], Plan] | None:
    """A set's manifest and checked plan, or None when the folder holds no manifest."""
    manifest = read_manifest(root)
    return None if manifest is None else (manifest, check_manifest(root, manifest))


def foreign_in_set(uri: str) -> list[str]:
    """The leaves of a folder that do not belong to the encoded set its manifest describes."""
    return generated_foreign_in_set(uri, read_set)


def check_ownership(out: str) -> tuple[dict[str, Any], Plan] | None:
    """The encoded set at `out` (None when there is nothing, or only our own
    first manifest write, cut short), once every leaf below it, hidden names
    included, is proven to belong to it; anything else is refused in one line."""
    if storage.is_file(out):
        raise UserError(f"{out}: exists and is not a folder")
    found = storage.leaves(out)
    if all(first_write_of_manifest(rel) for rel in found):
        return None
    existing = read_set(out)
    if existing is None:
        raise UserError(
            f"{out}: holds other files ({storage.some(found)}), not an encoded set; choose an empty or new "
            f"folder (--overwrite replaces only an encoded set)"
        )
    foreign = storage.foreign_leaves(out, existing[1].owns)
    if foreign:
        raise UserError(
            f"{out}: holds other files ({storage.some(foreign)}) beside an encoded set; vae-ray resumes or "
            f"replaces a set only when nothing else is in its folder: move them, or choose another --out"
        )
    return existing


def destination_state(out: str, plan: Plan, overwrite: bool) -> str:
    """'new', 'resume', 'complete' or 'replace'; anything else is refused in one line."""
    existing = check_ownership(out)
    if existing is None:
        return "new"
    manifest, old = existing
    if old == plan:
        return "complete" if manifest["status"] == "complete" else "resume"
    if not overwrite:
        raise UserError(
            f"{out}: holds a different encoding run (other checkpoint, dataset, split or batch size); "
            f"choose an empty folder or pass --overwrite"
        )
    if storage.is_remote(out):
        raise UserError(f"{out}: --overwrite replaces a local set only; remove the old set on S3 first")
    return "replace"


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------
class Encoding(ShardedJob):
    """An encoding run: the constructor checks everything a user can get
    wrong (options, checkpoint, dataset, destination) before anything is
    written; `run` then does the work."""

    command = "vae-ray encode"
    writer = ShardEncoder
    last = (MANIFEST,)
    _destination = staticmethod(destination_state)
    _read_set = staticmethod(read_set)
    _foreign = staticmethod(foreign_in_set)

    def __init__(
        self,
        checkpoint: str,
        out: str,
        data: str | None = None,
        split: str = "all",
        batch_size: int | None = None,
        actors: int | None = None,
        gpu: bool | None = None,
        overwrite: bool = False,
    ):
        check_options(split, batch_size, actors)
        self.out = storage.check_uri(out)
        check_ownership(self.out)  # a folder that is not ours is refused before anything is loaded
        self.blob = load_blob(checkpoint)
        data = data or self.blob["config"].get("data")
        if not data:
            raise UserError(f"{checkpoint}: the checkpoint does not name its dataset; pass --data")
        self.meta = read_meta(data)
        for held, what in ((self.blob["path"], "the checkpoint being used"), (self.meta["root"], "the dataset")):
            if self.out == held or _inside(self.out, held) or _inside(held, self.out):
                raise UserError(
                    f"{out}: {'is inside' if _inside(self.out, held) else 'holds'} {what}; choose another --out"
                )
        self.plan = make_plan(self.blob, self.meta, split, BATCH if batch_size is None else batch_size)
        self.actors, self.gpu, self.overwrite = actors, gpu, overwrite
        self.state = destination_state(self.out, self.plan, overwrite)
        self.path_taken = ""
        if self.state != "complete":
            root = self._root()
            done = completed_shards(root, self.plan)
            self._check_sources([s for s in range(self.plan.num_shards) if s not in done])
            self._check_space(root, done)

    def run(self, address: str | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Encode the shards (generate's life of a set: ShardedJob.run), the
        dataset held against a `data prepare --overwrite` meanwhile."""
        with dataset_read_lock(self.meta["root"]):
            return super().run(address, progress)

    # -- what ShardedJob.run asks -------------------------------------------
    def _writer_options(self, root: str, device: str, threads: int) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "data": self.meta["root"],
            "shape": list(self.meta["shape"]),
            "root": root,
            "device": device,
            "threads": threads,
        }

    def _remove_partial(self, root: str, shard: int) -> None:
        """A part without its marker may be a torn retry: it is written again whole."""
        storage.delete(storage.join(root, part_name(shard)))

    # -- checks before anything is written ----------------------------------
    def _check_sources(self, shards: list[int]) -> None:
        """The input shards still to encode, from their footers (rows, columns,
        image size), before a cluster starts or a file is written; a
        class-conditional model also needs every image's class, so their label
        columns are read and an unlabelled row refused now. (Each actor checks
        its whole shard's SHA-256 as it reads it.)"""
        conditional = self.blob["config"]["conditional"]
        for shard in shards:
            source = self.plan.sources[shard]
            path = storage.join(self.meta["root"], source["file"])
            with open_shard(path, source["rows"], self.meta["shape"]) as table:
                if conditional:
                    labels = read_shard(path, partial(table.read, columns=["label"])).column("label").to_numpy()
                    check_labels(path, labels.astype(np.int64), len(self.blob["dataset"]["classes"]))

    def _root(self) -> str:
        """Where this run writes: the destination itself, or for --overwrite
        its staging folder, which must hold nothing or a part of this very set."""
        if self.state != "replace":
            return self.out
        old = aside(Path(self.out))
        if in_the_way(old, foreign_in_set):
            raise UserError(
                f"{old}: holds other files; --overwrite sets the old set aside under this name until the new "
                f"one is in: move it"
            )
        staging = staging_folder(self.out, self.plan)
        storage.refuse_link(staging, "--overwrite builds the new set there")
        if storage.is_file(staging):
            raise UserError(f"{staging}: exists and is not a folder; --overwrite builds the new set there: move it")
        found = storage.leaves(staging)
        if all(first_write_of_manifest(rel) for rel in found):
            return staging
        existing = read_set(staging)
        foreign = found if existing is None or existing[1] != self.plan else foreign_in_set(staging)
        if foreign:
            raise UserError(
                f"{staging}: holds other files ({storage.some(foreign)}); --overwrite builds the new set there: "
                f"move them"
            )
        return staging

    def _check_space(self, root: str, done: dict[int, dict]) -> None:
        """Refuse, before the first write, a set its local disk cannot hold."""
        todo = [s for s in range(self.plan.num_shards) if s not in done]
        if storage.is_remote(root) or not todo:
            return
        where = Path(storage.filesystem(root)[1])
        while not where.is_dir() and where != where.parent:
            where = where.parent
        stats = os.statvfs(where)
        need, files = planned_size(self.plan, todo, stats.f_frsize or 4096)
        free = shutil.disk_usage(where).free
        if need > free:
            raise UserError(
                f"{self.out}: the latents of {self.plan.num:,} images need up to {human_size(need)} but {where} has "
                f"{human_size(free)} free; free some space or choose another --out"
            )
        if stats.f_files and files > stats.f_favail:
            raise UserError(f"{self.out}: needs {files:,} files but {where} has room for {stats.f_favail:,} more")

    # -- files --------------------------------------------------------------
    def _identity(self, root: str) -> dict[str, Any]:
        return {
            "format": FORMAT_ID,
            "status": "running",
            "plan": asdict(self.plan),
            "images": self.plan.num,
            "latent_dim": self.plan.latent_dim,
            "splits": sorted({s["split"] for s in self.plan.sources}, key=SPLITS.index),
            "columns": latent_schema(self.plan.latent_dim).names,
            "checkpoint": self.blob["path"],
            "checkpoint_sha256": self.blob["sha256"],
            "data": self.meta["root"],
            "dataset": self.meta["name"],
            "classes": self.meta["classes"],
            "config": self.blob["config"],
        }

    def _clean_leftovers(self, root: str) -> None:
        """Markers served their purpose (the manifest holds the checksums now);
        temporary files of killed writers must not survive a finished run.
        Only our own temporary names are removed."""
        storage.delete(storage.join(root, MARKERS))
        if storage.is_remote(root):
            return
        for leftover in Path(storage.filesystem(root)[1]).iterdir():
            ours = storage.temp_of(leftover.name) is not None and self.plan.owns(leftover.name)
            if ours and leftover.is_file() and not leftover.is_symlink():
                leftover.unlink()

    def _swap_in(self, staging: str) -> None:
        """Replace the old set with the complete new one (local only: see destination_state)."""
        swap_folder(Path(storage.filesystem(staging)[1]), Path(storage.filesystem(self.out)[1]), last=(MANIFEST,))


def _inside(path: str, folder: str) -> bool:
    return path.rstrip("/").startswith(folder.rstrip("/") + "/")


# `vae_ray.encode(...)` is the Python API's function (api.py): this module is callable as it.
callable_module(__name__)
