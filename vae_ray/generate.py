"""Bulk generation: decode latent vectors and write images exactly once,
resumably, to local disk or s3://.

Work is cut into fixed shards of at most SHARD images (one PNG sub-folder,
one Parquet or NPZ file). A multi-shard job (or any job on a named cluster)
is a Ray Data job: one row per shard through `map_batches` to a pool of
decoder actors. A one-shard job with no cluster named runs the very same
`ShardWriter` in this process, which skips Ray's start-up (the output says
which path ran); the bytes are identical.

Image i depends only on the checkpoint, the seed, i and its label: its latent
vector comes from a counter-based generator keyed by (seed, i), and it is
decoded in a CHUNK-sized batch aligned to global indices, so the arithmetic is
the same whatever the block sizes, actor count or restarts.

What the destination promises:
- a shard's files appear under their final names only when complete (a PNG
  shard's folder is written under a temporary name and renamed whole; files
  are written to a temporary name and renamed; one PUT each on S3), then a
  marker records its checksum; a rerun skips marked shards;
- `_manifest.json` is written first with the run's identity (status
  "running") and last with every shard's checksum ("complete"); the same
  command on a complete set changes nothing and says so;
- `--overwrite` replaces only a generated set, and only once the new one is
  complete: the new set is built in a hidden sibling folder and swapped in;
- one writer at a time (a lock beside the destination).
The manifest's leading underscore (and the markers' dot) keep the side files
out of the way of pandas, pyarrow, DuckDB and Hugging Face `datasets`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage
from .checkpoint import load_blob, model_from_blob
from .errors import UserError
from .formats import encode_pngs, hf_features, hf_parquet_bytes, npz_bytes, parquet_bytes
from .images import to_uint8
from .keyed_random import latent_normals

SHARD = 10_000  # images per shard (PNG folder, Parquet/NPZ file)
CHUNK = 256  # decode batch, aligned to global indices
MAX_ACTORS_PER_GPU = 8
MAX_NUM = 1_000_000_000  # file names hold nine digits of index
MAX_TEMPERATURE = 100.0
FORMATS = ("png", "parquet", "npz", "hf")
FORMAT_ID = "vae-ray-generated/1"
MANIFEST = "_manifest.json"
OLD_MANIFEST = "manifest.json"  # sets written before the manifest was renamed
MARKERS = ".progress"
CARD = "README.md"


# ---------------------------------------------------------------------------
# What a run is, and what image i is
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The identity of a generation run: two runs with equal plans write equal bytes."""

    num: int
    seed: int
    format: str
    temperature: float
    labels: str  # "none", "per-class" or a class index as text
    checkpoint_sha256: str
    shard_size: int = SHARD
    chunk: int = CHUNK  # decode batch; part of the identity, since kernels may round differently

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def labels_for(plan: Plan, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Image i's label: -1 (none), i mod C (balanced over classes), or the fixed class."""
    if plan.labels == "none":
        return np.full(len(indices), -1, dtype=np.int64)
    if plan.labels == "per-class":
        return (indices % num_classes).astype(np.int64)
    return np.full(len(indices), int(plan.labels), dtype=np.int64)


def class_folders(classes: list[str]) -> list[str]:
    """Safe, distinct folder names for class names, which are data (from
    batches.meta, dataset.json or a checkpoint) and must never steer a write:
    no separators, no leading dot or underscore, no '..', at most 64
    characters. The manifest keeps the real names beside them."""
    out: list[str] = []
    for k, name in enumerate(classes):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip(".-_")[:64] or f"class-{k}"
        if safe in out or safe.lower() in (s.lower() for s in out):
            safe = f"{safe[:58]}-{k}"
        out.append(safe)
    return out


# ---------------------------------------------------------------------------
# Writing one shard (in a Ray Data actor, or in this process)
# ---------------------------------------------------------------------------
def shard_files(plan: Plan, shard: int, folders: list[str]) -> list[str]:
    """The files a shard owns, relative to the set's root, in index order."""
    start, end = plan.shard_range(shard)
    if plan.format == "hf":
        return [f"data/train-{shard:05d}-of-{plan.num_shards:05d}.parquet"]
    if plan.format != "png":
        return [f"part-{shard:05d}.{plan.format}"]
    labels = labels_for(plan, np.arange(start, end), len(folders))
    names = []
    for i, label in zip(range(start, end), labels, strict=True):
        prefix = f"{folders[label]}/" if label >= 0 else ""
        names.append(f"{prefix}{shard:05d}/{i:09d}.png")
    return names


def digest(chunks: list[bytes]) -> str:
    """A shard's checksum: SHA-256 over the SHA-256 of each of its files, in order."""
    outer = hashlib.sha256()
    for data in chunks:
        outer.update(hashlib.sha256(data).digest())
    return outer.hexdigest()


class ShardWriter:
    """Loads the model once, then writes whole shards (a Ray Data actor, or
    called directly for a one-shard job)."""

    def __init__(self, model_blob: Any, plan: dict, root: str, device: str, threads: int):
        torch.set_num_threads(threads)
        _keep_freed_memory()
        if isinstance(model_blob, list):  # a Ray object reference, wrapped so Ray does not resolve it early
            import ray

            model_blob = ray.get(model_blob[0])
        self.plan, self.root, self.device = Plan(**plan), root, torch.device(device)
        self.classes = model_blob["dataset"]["classes"]
        self.folders = class_folders(self.classes)
        self.model = model_from_blob(model_blob)
        # Channels-last transposed convolutions decode about 1.8x faster on
        # CPUs (oneDNN's NHWC kernels); every run uses the same kernels, so
        # outputs stay byte-identical.
        self.model.to(self.device, memory_format=torch.channels_last).eval()
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, counts, sums, seconds = [], [], [], []
        for shard in batch["shard"]:
            started = time.perf_counter()
            n, checksum = self.write_shard(int(shard))
            shards.append(int(shard))
            counts.append(n)
            sums.append(checksum)
            seconds.append(time.perf_counter() - started)
        return {
            "shard": np.array(shards),
            "images": np.array(counts),
            "sha256": np.array(sums),
            "seconds": np.array(seconds),
        }

    @torch.no_grad()
    def decode(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and labels for indices [start, end), in aligned chunks."""
        size = self.plan.chunk
        first, last = (start // size) * size, -(-end // size) * size
        images, labels = [], []
        for chunk in range(first, last, size):
            idx = np.arange(chunk, chunk + size)
            z = torch.from_numpy(latent_normals(self.plan.seed, idx, self.model.latent_dim))
            z = (z * self.plan.temperature).to(self.device)
            lab = labels_for(self.plan, idx, len(self.classes))
            y = torch.from_numpy(lab).to(self.device) if self.model.num_classes else None
            images.append(to_uint8(self.model.mean_image(self.model.decode(z, y))))
            labels.append(lab)
        images, labels = np.concatenate(images), np.concatenate(labels)
        return images[start - first : end - first], labels[start - first : end - first]

    def write_shard(self, shard: int) -> tuple[int, str]:
        start, end = self.plan.shard_range(shard)
        images, labels = self.decode(start, end)
        indices = np.arange(start, end)
        names = shard_files(self.plan, shard, self.folders)
        if self.plan.format == "png":
            blobs = encode_pngs(images)
            folders: dict[str, dict[str, bytes]] = {}
            for name, data in zip(names, blobs, strict=True):
                folder, file = name.rsplit("/", 1)
                folders.setdefault(folder, {})[file] = data
            for folder, files in folders.items():
                write_folder(self.root, folder, files)
        else:
            if self.plan.format == "parquet":
                blobs = [parquet_bytes(images, labels, indices)]
            elif self.plan.format == "hf":
                blobs = [
                    hf_parquet_bytes(images, labels, indices, self.classes if self.plan.labels != "none" else None)
                ]
            else:
                blobs = [npz_bytes(images=images, labels=labels, index=indices)]
            storage.write_bytes(storage.join(self.root, names[0]), blobs[0])
        checksum = digest(blobs)
        marker = {"shard": shard, "images": end - start, "sha256": checksum}
        storage.write_bytes(storage.join(self.root, MARKERS, f"{shard:05d}.json"), json.dumps(marker).encode())
        return end - start, checksum


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


def _keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 32 MB in the heap. By default a
    decode batch's activations (about 25 MB for 256 MNIST images) are mapped
    and unmapped on every call once its adaptive threshold drifts, and the
    page faults that follow cost a third of a CPU decoder's time (measured:
    1.1 s of kernel time per 10,000 images against 2.6 s of decoding)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: allocate up to 32 MB from the heap
        libc.mallopt(-1, 512 * 2**20)  # M_TRIM_THRESHOLD: do not give it back between batches
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        pass


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------
def make_plan(
    blob: dict[str, Any],
    num: int,
    fmt: str,
    seed: int,
    temperature: float,
    label: int | None,
    per_class: bool,
    chunk: int = CHUNK,
    shard_size: int = SHARD,
) -> Plan:
    check_options(
        num=num,
        fmt=fmt,
        seed=seed,
        temperature=temperature,
        chunk=chunk,
        shard_size=shard_size,
        label=label,
        per_class=per_class,
    )
    classes = blob["dataset"]["classes"]
    if (label is not None or per_class) and not blob["config"]["conditional"]:
        raise UserError(
            f"{blob['path']}: not a class-conditional model; train with --conditional to use --label or --per-class"
        )
    if label is not None and not 0 <= label < len(classes):
        raise UserError(f"--label must be between 0 and {len(classes) - 1} (got {label})")
    labels = "per-class" if per_class else ("none" if label is None else str(label))
    return Plan(
        num=num,
        seed=seed,
        format=fmt,
        temperature=float(temperature),
        labels=labels,
        checkpoint_sha256=blob["sha256"],
        chunk=chunk,
        shard_size=shard_size,
    )


def check_options(
    num: int = 1,
    fmt: str = "png",
    seed: int = 0,
    temperature: float = 1.0,
    chunk: int = CHUNK,
    shard_size: int = SHARD,
    label: int | None = None,
    per_class: bool = False,
    actors: int | None = None,
) -> None:
    """Every check that needs no files: run before anything else, and before --submit."""
    if not 1 <= shard_size <= SHARD:
        raise UserError(f"--shard-size must be between 1 and {SHARD} (got {shard_size})")
    if not 1 <= chunk <= 65536:
        raise UserError(f"--batch-size must be between 1 and 65536 (got {chunk})")
    if not 1 <= num <= MAX_NUM:
        raise UserError(f"--num must be between 1 and {MAX_NUM:,} (got {num})")
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and 0 < temperature <= MAX_TEMPERATURE
    ):
        raise UserError(f"--temperature must be a finite number in (0, {MAX_TEMPERATURE:g}] (got {temperature})")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be between 0 and {2**32 - 1} (got {seed})")
    if label is not None and per_class:
        raise UserError("--label and --per-class exclude each other")
    if actors is not None and not 1 <= actors <= 10_000:
        raise UserError(f"--actors must be between 1 and 10000 (got {actors})")


def read_manifest(root: str) -> dict[str, Any] | None:
    """A generated set's manifest, or None when the folder holds none."""
    for name in (MANIFEST, OLD_MANIFEST):
        try:
            manifest = storage.read_json(storage.join(root, name))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
        except ValueError:
            raise UserError(f"{root}: {name} is not valid JSON (a damaged set)") from None
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT_ID:
            return manifest
    return None


def destination_state(out: str, plan: Plan, overwrite: bool) -> str:
    """'new', 'resume', 'complete' or 'replace'; anything else is refused in one line."""
    if storage.is_file(out):
        raise UserError(f"{out}: exists and is not a folder")
    entries = [n for n in storage.list_dir(out) if not n.startswith(".")]
    if not entries:
        return "new"
    manifest = read_manifest(out)
    if manifest is None:
        shown = ", ".join(sorted(entries)[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise UserError(
            f"{out}: holds other files ({shown}), not a generated set; choose an empty or new folder "
            f"(--overwrite replaces only a generated set)"
        )
    if manifest.get("plan") == asdict(plan):
        return "complete" if manifest.get("status") == "complete" else "resume"
    if not overwrite:
        raise UserError(
            f"{out}: holds a different generation run (other checkpoint, seed, count or format); "
            f"choose an empty folder or pass --overwrite"
        )
    return "replace"


def staging_folder(out: str, plan: Plan) -> str:
    """Where an --overwrite builds its new set: a hidden sibling named by the plan, so a rerun resumes it."""
    return storage.join(storage.parent_of(out), f".{storage.name_of(out)}.overwrite-{plan.digest()}")


def completed_shards(root: str, plan: Plan) -> dict[int, dict]:
    done = {}
    for name in storage.list_dir(storage.join(root, MARKERS)):
        try:
            marker = storage.read_json(storage.join(root, MARKERS, name))
        except ValueError:
            continue
        if isinstance(marker, dict) and 0 <= marker.get("shard", -1) < plan.num_shards:
            done[marker["shard"]] = marker
    return done


class Generation:
    """A generation run: the constructor checks everything a user can get
    wrong (options, checkpoint, destination) before anything is written;
    `run` then does the work."""

    def __init__(
        self,
        checkpoint: str,
        num: int,
        out: str,
        fmt: str = "png",
        seed: int = 0,
        actors: int | None = None,
        gpu: bool | None = None,
        temperature: float = 1.0,
        label: int | None = None,
        per_class: bool = False,
        overwrite: bool = False,
        batch_size: int | None = None,
        shard_size: int = SHARD,
    ):
        chunk = CHUNK if batch_size is None else batch_size
        check_options(num, fmt, seed, temperature, chunk, shard_size, label, per_class, actors)
        self.out = storage.check_uri(out)
        self.blob = load_blob(checkpoint)
        if self.blob["path"].rstrip("/").startswith(self.out.rstrip("/") + "/") or self.blob["path"] == self.out:
            raise UserError(f"{out}: holds the checkpoint being sampled; choose another --out")
        self.plan = make_plan(self.blob, num, fmt, seed, temperature, label, per_class, chunk, shard_size)
        self.state = destination_state(self.out, self.plan, overwrite)
        self.actors, self.gpu, self.overwrite = actors, gpu, overwrite
        self.path_taken = ""

    def run(self, address: str | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Write the images; return the manifest (with `already_complete` when there was nothing to do)."""
        from .cluster import given_address

        with storage.Lock(self.out, "vae-ray generate"):
            self.state = destination_state(self.out, self.plan, self.overwrite)  # again, under the lock
            if self.state == "complete":
                self.path_taken = "nothing to do"
                return read_manifest(self.out) | {"already_complete": True}
            root = staging_folder(self.out, self.plan) if self.state == "replace" else self.out
            in_process = (
                given_address(address) is None and self.actors is None and not self.gpu and self.plan.num_shards == 1
            )
            decoder = None if in_process else self._connect(address)  # checks the cluster (GPUs) first
            started = time.time()
            identity = self._identity(root)
            existing = read_manifest(root)
            if existing is None or existing.get("plan") != asdict(self.plan):
                storage.makedirs(root)
                storage.write_json(storage.join(root, MANIFEST), identity)
            done = completed_shards(root, self.plan)
            todo = [s for s in range(self.plan.num_shards) if s not in done]
            for shard in todo:  # leftovers of an interrupted run are rewritten whole
                self._remove_partial(root, shard)
            written = sum(m["images"] for m in done.values())
            if progress:
                progress(written, self.plan.num)
            if in_process:
                self.path_taken = "in this process (one shard, no cluster named)"
                writer = ShardWriter(self.blob, asdict(self.plan), root, "cpu", _threads())
                for shard in todo:
                    n, checksum = writer.write_shard(shard)
                    done[shard] = {"shard": shard, "images": n, "sha256": checksum}
                    if progress:
                        progress(written + n, self.plan.num)
            else:
                done = decoder(root, todo, done, written, progress)
            manifest = {
                **identity,
                "status": "complete",
                "shards": [done[s] for s in range(self.plan.num_shards)],
                "seconds": round(time.time() - started, 3),
                "path": self.path_taken,
            }
            if self.plan.format == "hf":
                storage.write_text(storage.join(root, CARD), dataset_card(manifest))
            storage.write_json(storage.join(root, MANIFEST), manifest)
            self._clean_leftovers(root)
            if self.state == "replace":
                self._swap_in(root)
            return manifest

    # -- the Ray Data path --------------------------------------------------
    def _connect(self, address: str | None):
        import ray

        from .cluster import connect

        cluster = connect(address, cpus_needed=1, dashboard=False)
        resources = cluster.resources
        use_gpu = bool(resources.get("GPU", 0)) if self.gpu is None else self.gpu
        if use_gpu and not resources.get("GPU", 0):
            raise UserError("--gpu asks for GPU actors but the cluster has no GPUs")
        want, gpus_each = actor_plan(resources, use_gpu, self.actors)

        def decode(root: str, todo: list[int], done: dict, written: int, progress) -> dict:
            pool = max(1, min(want, len(todo) or 1))
            shared = f", {gpus_each:g} GPU each" if use_gpu and gpus_each < 1 else ""
            self.path_taken = f"a Ray Data actor pool of {pool} {'GPU' if use_gpu else 'CPU'} actor(s){shared}"
            if not todo:
                return done
            ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
            results = ds.map_batches(
                ShardWriter,
                batch_size=1,
                compute=_pool(pool),
                fn_constructor_kwargs={
                    "model_blob": [ray.put(self.blob)],
                    "plan": asdict(self.plan),
                    "root": root,
                    "device": "cuda" if use_gpu else "cpu",
                    "threads": 1,
                },
                num_gpus=gpus_each,
                num_cpus=1,
            )
            for row in results.iter_rows():
                done[int(row["shard"])] = {
                    "shard": int(row["shard"]),
                    "images": int(row["images"]),
                    "sha256": str(row["sha256"]),
                }
                written += int(row["images"])
                if progress:
                    progress(written, self.plan.num)
            return done

        return decode

    # -- files --------------------------------------------------------------
    def _identity(self, root: str) -> dict[str, Any]:
        blob, plan = self.blob, self.plan
        classes = blob["dataset"]["classes"]
        return {
            "format": FORMAT_ID,
            "status": "running",
            "plan": asdict(plan),
            "count": plan.num,
            "seed": plan.seed,
            "image_format": plan.format,
            "temperature": plan.temperature,
            "checkpoint": blob["path"],
            "checkpoint_sha256": blob["sha256"],
            "class_folders": dict(zip(classes, class_folders(classes), strict=True)) if plan.labels != "none" else {},
            "config": blob["config"],
            "dataset": blob["dataset"],
            "evaluation": _evaluation_of(blob["path"]),
        }

    def _remove_partial(self, root: str, shard: int) -> None:
        folders = class_folders(self.blob["dataset"]["classes"])
        parents = {
            name.rsplit("/", 1)[0] if self.plan.format == "png" else name
            for name in shard_files(self.plan, shard, folders)
        }
        for rel in parents:
            storage.delete(storage.join(root, rel))

    def _clean_leftovers(self, root: str) -> None:
        """Markers served their purpose (the manifest holds the checksums now);
        temporary files and folders of killed writers must not survive a
        finished run. They only exist locally (S3 objects appear whole with one
        PUT), beside the shard folders: at the top, in data/, or in the class
        folders of a labelled set. Shard folders themselves are never listed."""
        storage.delete(storage.join(root, MARKERS))
        if storage.is_remote(root):
            return
        base = Path(storage.filesystem(root)[1])
        parents = ["", "data"] + (class_folders(self.blob["dataset"]["classes"]) if self.plan.labels != "none" else [])
        for parent in parents:
            for leftover in (base / parent).glob(".tmp-*") if (base / parent).is_dir() else []:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            for leftover in (base / parent).glob(".*.tmp") if (base / parent).is_dir() else []:
                leftover.unlink()

    def _swap_in(self, staging: str) -> None:
        """Replace the old set with the complete new one."""
        if storage.is_remote(self.out):
            new = set(storage.walk_files(staging))
            fs, _ = storage.filesystem(self.out)
            for rel in sorted(new):
                fs.copy_file(
                    storage.filesystem(storage.join(staging, rel))[1],
                    storage.filesystem(storage.join(self.out, rel))[1],
                )
            for rel in storage.walk_files(self.out):
                if rel not in new and not rel.startswith("."):
                    storage.delete(storage.join(self.out, rel))
            storage.delete(staging)
            return
        out, new = Path(self.out), Path(staging)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        new.rename(out)
        storage.fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)


def _threads() -> int:
    import os

    return max(1, os.cpu_count() or 1)


def actor_plan(resources: dict, use_gpu: bool, actors: int | None) -> tuple[int, float]:
    """How many decoder actors, and the GPU share of each.

    On CPUs: one single-threaded actor per CPU. On GPUs the decoding is a
    small part of a shard's work (the latents, the uint8 copy back, encoding
    and checksums run on the CPU), so one actor per GPU left the node's other
    cores idle: measured on one H100 with 16 cores, one actor wrote 1,000,000
    MNIST images to Parquet at 61,576 images/s. Several actors share each GPU
    instead, one CPU each, at most 8 per GPU (each holds a CUDA context of a
    few hundred MB), leaving a CPU per GPU for Ray Data."""
    cpus = max(1, int(resources.get("CPU", 1)))
    if not use_gpu:
        return actors or cpus, 0.0
    gpus = max(1, int(resources.get("GPU", 1)))
    want = actors or gpus * max(1, min(MAX_ACTORS_PER_GPU, cpus // gpus - 1))
    # Whole actors per GPU (3 actors on 2 GPUs take half a GPU each, or the
    # third would fit on neither), and Ray keeps resource amounts to 4
    # decimals: round the share down, or 7 actors of 1/7 (0.1429) would not fit.
    per_gpu = math.ceil(want / gpus)
    return want, math.floor(10_000 / per_gpu) / 10_000


def _pool(size: int):
    """A fixed actor pool that hands each actor one shard at a time. Ray
    Data's default queues several tasks per actor, so the first actor to start
    could take most of the shards while the others sat idle."""
    import ray

    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)


def _evaluation_of(checkpoint: str) -> dict[str, Any]:
    """The model's evaluation figures for the dataset card: RUN/evaluation.json
    when `vae-ray evaluate` saved one, else the checkpoint epoch's test metrics."""
    run = storage.parent_of(checkpoint)
    try:
        saved = storage.read_json(storage.join(run, "evaluation.json"))
        return {
            k: saved.get(k)
            for k in (
                "matlab_elbo",
                "neg_elbo_nats",
                "nll_iw_nats",
                "bits_per_dim",
                "fd",
                "inception_score",
                "precision",
                "recall",
            )
            if saved.get(k) is not None
        }
    except (FileNotFoundError, ValueError, OSError):
        pass
    try:
        metrics = storage.read_json(storage.join(checkpoint, "state.json")).get("metrics", {})
    except (FileNotFoundError, ValueError, OSError):
        return {}
    return {k: metrics[k] for k in ("epoch", "test_matlab_elbo", "test_neg_elbo_nats") if k in metrics}


def generate(
    checkpoint: str,
    num: int,
    out: str,
    address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Write `num` generated images to `out` (see `Generation` for the options)."""
    return Generation(checkpoint, num, out, **options).run(address, progress)


def dataset_card(manifest: dict[str, Any]) -> str:
    """A Hugging Face dataset card (README.md) for a generated set."""
    plan, dataset = manifest["plan"], manifest["dataset"]
    features = hf_features(dataset["classes"] if plan["labels"] != "none" else None)
    lines = [
        "---",
        "tags:",
        "- synthetic",
        "- vae-ray",
        "- image",
        "task_categories:",
        "- unconditional-image-generation" if plan["labels"] == "none" else "- image-classification",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/train-*",
        "dataset_info:",
        "  features:",
        "  - name: image",
        "    dtype: image",
    ]
    if "label" in features:
        lines += ["  - name: label", "    dtype:", "      class_label:", "        names:"]
        lines += [f"          '{k}': {json.dumps(name)}" for k, name in enumerate(features["label"]["names"])]
    lines += [
        "  - name: index",
        "    dtype: int64",
        "  splits:",
        "  - name: train",
        f"    num_examples: {manifest['count']}",
        "---",
        "",
    ]
    evaluation = manifest.get("evaluation") or {}
    figures = (
        "\n".join(f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in evaluation.items())
        or "| (none saved) | |"
    )
    body = f"""# Synthetic {dataset["name"]} images ({manifest["count"]:,})

Images decoded by a variational autoencoder with `vae-ray generate`; none of
them is a real {dataset["name"]} image.

| | |
|---|---|
| images | {manifest["count"]:,} ({dataset["shape"][0]}x{dataset["shape"][1]}, {dataset["shape"][2]} channel(s), PNG) |
| labels | {"image i has label i mod " + str(len(dataset["classes"])) if plan["labels"] == "per-class" else ("class " + plan["labels"] if plan["labels"] != "none" else "none (an unconditional model)")} |
| seed | {plan["seed"]} (image i depends only on the checkpoint, the seed, i and its label) |
| temperature | {plan["temperature"]:g} (z ~ N(0, T^2 I)) |
| checkpoint | `{manifest["checkpoint"]}` |
| checkpoint SHA-256 | `{manifest["checkpoint_sha256"]}` |
| model | {manifest["config"]["arch"]} network, latent {manifest["config"]["latent_dim"]}, {manifest["config"]["loss"]} loss{", class-conditional" if manifest["config"]["conditional"] else ""} |
| trained on | {dataset["name"]} |

## The model's evaluation figures

| figure | value |
|---|---|
{figures}

## Loading

```python
from datasets import load_dataset
ds = load_dataset("parquet", data_files="data/*.parquet", split="train")
```

`_manifest.json` lists every shard with its checksum; `vae-ray generate --verify DIR` checks them.
"""
    return "\n".join(lines) + body


def verify(out: str) -> dict[str, Any]:
    """Check a finished set against its manifest: every file, every checksum."""
    root = storage.check_uri(out)
    if not storage.is_dir(root):
        raise UserError(f"{out}: no such folder")
    manifest = read_manifest(root)
    if manifest is None:
        raise UserError(f"{out}: no {MANIFEST}; not a generated set")
    if manifest.get("status") != "complete":
        raise UserError(f"{out}: generation did not finish (status {manifest.get('status')!r}); rerun it to resume")
    try:
        plan = Plan(**manifest["plan"])
        folders = class_folders(manifest["dataset"]["classes"])
        shards = manifest["shards"]
    except (KeyError, TypeError):
        raise UserError(f"{out}: {MANIFEST} is incomplete") from None
    for entry in shards:
        names = shard_files(plan, entry["shard"], folders)
        try:
            blobs = [storage.read_bytes(storage.join(root, name)) for name in names]
        except (FileNotFoundError, IsADirectoryError, OSError):
            raise UserError(f"{out}: shard {entry['shard']} is missing files") from None
        if digest(blobs) != entry["sha256"]:
            raise UserError(f"{out}: shard {entry['shard']} does not match its checksum")
    expected = {n for s in range(plan.num_shards) for n in shard_files(plan, s, folders)}
    expected |= {MANIFEST, OLD_MANIFEST, CARD}
    extra = [f for f in storage.walk_files(root) if f not in expected and not f.split("/")[-1].startswith(".")]
    if extra:
        raise UserError(f"{out}: {len(extra)} file(s) not in the manifest, e.g. {extra[0]}")
    return manifest
