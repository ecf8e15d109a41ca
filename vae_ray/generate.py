"""Bulk generation: a Ray Data job that decodes latent vectors on an actor
pool and writes images exactly once, resumably, to local disk or s3://.

Work is cut into fixed shards of SHARD images (one PNG sub-folder, one
Parquet or NPZ file). Image i depends only on the checkpoint, the seed, i
and its label:
- its latent vector comes from a counter-based generator keyed by (seed, i),
  not from a stream shared with other images;
- it is decoded in a CHUNK-sized batch aligned to global indices, so the
  arithmetic is the same whatever the block sizes, actor count or restarts.

Exactly once: a shard's files appear under their final names only when
complete (locally a PNG shard's folder is written under a temporary name and
renamed whole, other files one by one; single PUTs on S3), then a marker
records its checksum. A restart skips marked shards and rewrites the rest.
The manifest, written first with the run's identity and last with every
shard's checksum, guards the folder against a different run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .checkpoint import load_blob, model_from_blob
from .errors import UserError

SHARD = 10_000          # images per shard (PNG folder, Parquet/NPZ file)
CHUNK = 256             # decode batch, aligned to global indices
FORMATS = ("png", "parquet", "npz")
MANIFEST = "manifest.json"
MARKERS = ".progress"


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
    labels: str               # "none", "per-class" or a class index as text
    checkpoint_sha256: str
    shard_size: int = SHARD
    chunk: int = CHUNK        # decode batch; part of the identity, since kernels may round differently

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num)


def latent_normals(seed: int, indices: np.ndarray, dim: int) -> np.ndarray:
    """Standard normal z (len(indices), dim) from a counter-based hash of
    (seed, index, coordinate): splitmix64 to uniforms, then Box-Muller."""
    idx = indices.astype(np.uint64)[:, None]
    pairs = (dim + 1) // 2
    counter = idx * np.uint64(2 * pairs) + np.arange(2 * pairs, dtype=np.uint64)[None, :]
    key = np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
    bits = _splitmix64(counter ^ key)
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
    u1, u2 = uniform[:, :pairs], uniform[:, pairs:]
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], axis=1)
    return z[:, :dim].astype(np.float32)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def labels_for(plan: Plan, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Image i's label: -1 (none), i mod C (balanced over classes), or the fixed class."""
    if plan.labels == "none":
        return np.full(len(indices), -1, dtype=np.int64)
    if plan.labels == "per-class":
        return (indices % num_classes).astype(np.int64)
    return np.full(len(indices), int(plan.labels), dtype=np.int64)


def class_folder(name: str) -> str:
    """A class name as a folder name (Fashion-MNIST has 'T-shirt/top')."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name) or "class"


# ---------------------------------------------------------------------------
# Storage: local folders or S3 through pyarrow
# ---------------------------------------------------------------------------
class Store:
    """A folder at a URI. Files appear under their final names only when complete."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        self.uri = uri.rstrip("/")
        self.remote = "://" in uri
        if self.remote:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            except (pafs.ArrowInvalid, ValueError, OSError) as exc:
                raise UserError(f"{uri}: unusable output URI ({str(exc).splitlines()[0]})") from None
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def write(self, rel: str, data: bytes) -> None:
        if self.remote:  # a single PUT: the object exists whole or not at all
            with self.fs.open_output_stream(self.path(rel)) as fh:
                fh.write(data)
            return
        target = Path(self.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{target.name}")
        tmp.write_bytes(data)
        tmp.replace(target)

    def write_folder(self, rel: str, files: dict[str, bytes]) -> None:
        """Write a whole folder of files. Locally they are written into a
        temporary sibling folder that is renamed when complete: one rename
        per folder instead of one per file (file creation and renames are most
        of the kernel time of a PNG shard on ext4)."""
        if self.remote:
            for name, data in files.items():
                self.write(f"{rel}/{name}", data)
            return
        target = Path(self.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{target.name}")
        tmp.mkdir()
        for name, data in files.items():
            with open(tmp / name, "xb") as fh:
                fh.write(data)
        if target.exists():  # an earlier attempt at this shard (a restarted actor) got this far
            shutil.rmtree(target)
        tmp.rename(target)

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read()

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def files(self, rel: str = "") -> list[str]:
        """Every file below `rel`, as paths relative to the root."""
        import pyarrow.fs as pafs

        base = self.path(rel)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        cut = len(self.root) + 1
        return sorted(i.path[cut:] for i in infos if i.type == pafs.FileType.File)

    def delete(self, rel: str) -> None:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def clear(self) -> None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.root).type == pafs.FileType.Directory:
            self.fs.delete_dir_contents(self.root, missing_dir_ok=True)

    def makedirs(self) -> None:
        self.fs.create_dir(self.root, recursive=True)


# ---------------------------------------------------------------------------
# Writing one shard (runs inside the Ray Data actors)
# ---------------------------------------------------------------------------
def shard_files(plan: Plan, shard: int, classes: list[str]) -> list[str]:
    """The files a shard owns, relative to the output root, in index order."""
    start, end = plan.shard_range(shard)
    if plan.format != "png":
        return [f"part-{shard:05d}.{plan.format}"]
    labels = labels_for(plan, np.arange(start, end), len(classes))
    names = []
    for i, label in zip(range(start, end), labels):
        prefix = f"{class_folder(classes[label])}/" if label >= 0 else ""
        names.append(f"{prefix}{shard:05d}/{i:09d}.png")
    return names


def digest(chunks: list[bytes]) -> str:
    """A shard's checksum: SHA-256 over the SHA-256 of each of its files, in order."""
    outer = hashlib.sha256()
    for data in chunks:
        outer.update(hashlib.sha256(data).digest())
    return outer.hexdigest()


class ShardWriter:
    """A Ray Data actor: loads the model once, then writes whole shards."""

    def __init__(self, model_blob_ref: list, plan: dict, out: str, device: str, threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)
        _keep_freed_memory()
        blob = ray.get(model_blob_ref[0])
        self.plan, self.store, self.device = Plan(**plan), Store(out), torch.device(device)
        self.classes, self.shape = blob["dataset"]["classes"], blob["dataset"]["shape"]
        self.model = model_from_blob(blob)
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
        return {"shard": np.array(shards), "images": np.array(counts), "sha256": np.array(sums),
                "seconds": np.array(seconds)}

    def decode(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and labels for indices [start, end), in aligned chunks."""
        import torch

        size = self.plan.chunk
        first, last = (start // size) * size, -(-end // size) * size
        images, labels = [], []
        with torch.no_grad():
            for chunk in range(first, last, size):
                idx = np.arange(chunk, chunk + size)
                z = torch.from_numpy(latent_normals(self.plan.seed, idx, self.model.latent_dim))
                z = (z * self.plan.temperature).to(self.device)
                lab = labels_for(self.plan, idx, len(self.classes))
                y = torch.from_numpy(lab).to(self.device) if self.model.num_classes else None
                pixels = self.model.mean_image(self.model.decode(z, y))
                images.append((pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
                labels.append(lab)
        images, labels = np.concatenate(images), np.concatenate(labels)
        return images[start - first:end - first], labels[start - first:end - first]

    def write_shard(self, shard: int) -> tuple[int, str]:
        from .formats import encode_pngs, npz_bytes, parquet_bytes

        start, end = self.plan.shard_range(shard)
        images, labels = self.decode(start, end)
        indices = np.arange(start, end)
        names = shard_files(self.plan, shard, self.classes)
        if self.plan.format == "png":
            blobs = encode_pngs(images)
        elif self.plan.format == "parquet":
            blobs = [parquet_bytes(images, labels, indices)]
        else:
            blobs = [npz_bytes(images=images, labels=labels, index=indices)]
        if self.plan.format == "png":
            folders: dict[str, dict[str, bytes]] = {}
            for name, data in zip(names, blobs):
                folder, file = name.rsplit("/", 1)
                folders.setdefault(folder, {})[file] = data
            for folder, files in folders.items():
                self.store.write_folder(folder, files)
        else:
            self.store.write(names[0], blobs[0])
        checksum = digest(blobs)
        marker = {"shard": shard, "images": end - start, "sha256": checksum}
        self.store.write(f"{MARKERS}/{shard:05d}.json", json.dumps(marker).encode())
        return end - start, checksum


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
        libc.mallopt(-3, 32 * 2**20)    # M_MMAP_THRESHOLD: allocate up to 32 MB from the heap
        libc.mallopt(-1, 512 * 2**20)   # M_TRIM_THRESHOLD: do not give it back between batches
    except (OSError, AttributeError):   # not glibc (macOS, musl): nothing to tune
        pass


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------
def make_plan(blob: dict[str, Any], num: int, fmt: str, seed: int, temperature: float,
              label: Optional[int], per_class: bool, chunk: int = CHUNK, shard_size: int = SHARD) -> Plan:
    if not 1 <= shard_size <= SHARD:
        raise UserError(f"--shard-size must be between 1 and {SHARD} (got {shard_size})")
    if not 1 <= chunk <= 65536:
        raise UserError(f"--batch-size must be between 1 and 65536 (got {chunk})")
    if num < 1:
        raise UserError(f"--num must be at least 1 (got {num})")
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if not temperature > 0:
        raise UserError(f"--temperature must be positive (got {temperature})")
    if label is not None and per_class:
        raise UserError("--label and --per-class exclude each other")
    classes = blob["dataset"]["classes"]
    if (label is not None or per_class) and not blob["config"]["conditional"]:
        raise UserError(f"{blob['path']}: not a class-conditional model; train with --conditional "
                        f"to use --label or --per-class")
    if label is not None and not 0 <= label < len(classes):
        raise UserError(f"--label must be between 0 and {len(classes) - 1} (got {label})")
    labels = "per-class" if per_class else ("none" if label is None else str(label))
    return Plan(num=num, seed=seed, format=fmt, temperature=float(temperature), labels=labels,
                checkpoint_sha256=blob["sha256"], chunk=chunk, shard_size=shard_size)


def must_clear(store: Store, plan: Plan, overwrite: bool) -> bool:
    """Whether the destination must be emptied first. Empty and same-plan
    folders are used as they are; anything else needs --overwrite."""
    existing = [f for f in store.files() if not f.startswith(f"{MARKERS}/")]
    if not existing:
        return False
    if MANIFEST in existing:
        try:
            manifest = json.loads(store.read(MANIFEST))
        except ValueError:
            manifest = {}
        if manifest.get("plan") == asdict(plan) and not overwrite:
            return False  # the same run: resume it
    if not overwrite:
        what = "a different generation run" if MANIFEST in existing else "other files"
        raise UserError(f"{store.uri}: holds {what} (other checkpoint, seed, count or format); "
                        f"choose an empty folder or pass --overwrite")
    return True


def completed_shards(store: Store, plan: Plan) -> dict[int, dict]:
    done = {}
    for rel in store.files(MARKERS):
        try:
            marker = json.loads(store.read(rel))
        except ValueError:
            continue
        if 0 <= marker.get("shard", -1) < plan.num_shards:
            done[marker["shard"]] = marker
    return done


class Generation:
    """A generation run: the constructor checks everything a user can get
    wrong (checkpoint, options, destination) before anything is written;
    `run` then does the work."""

    def __init__(self, checkpoint: str, num: int, out: str, fmt: str = "png", seed: int = 0,
                 actors: Optional[int] = None, gpu: Optional[bool] = None, temperature: float = 1.0,
                 label: Optional[int] = None, per_class: bool = False, overwrite: bool = False,
                 batch_size: Optional[int] = None, shard_size: int = SHARD):
        if actors is not None and actors < 1:
            raise UserError(f"--actors must be at least 1 (got {actors})")
        self.blob = load_blob(checkpoint)
        self.plan = make_plan(self.blob, num, fmt, seed, temperature, label, per_class,
                              CHUNK if batch_size is None else batch_size, shard_size)
        self.store = Store(out)
        if not self.store.remote and Path(self.store.root).exists() and not Path(self.store.root).is_dir():
            raise UserError(f"{out}: exists and is not a folder")
        self.clear_first = must_clear(self.store, self.plan, overwrite)
        self.out, self.actors, self.gpu = out, actors, gpu

    def run(self, address: Optional[str] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
        """Write the images; return the manifest."""
        import ray

        from .cluster import ensure_ray

        plan, store, blob = self.plan, self.store, self.blob
        if self.clear_first:
            store.clear()
        store.makedirs()
        started = time.time()
        identity = {"format": "vae-ray-generated/1", "status": "running", "plan": asdict(plan),
                    "count": plan.num, "seed": plan.seed, "image_format": plan.format,
                    "checkpoint": blob["path"], "checkpoint_sha256": blob["sha256"],
                    "config": blob["config"], "dataset": blob["dataset"]}
        store.write(MANIFEST, json.dumps(identity, indent=2).encode())

        done = completed_shards(store, plan)
        todo = [s for s in range(plan.num_shards) if s not in done]
        resources = ensure_ray(1, address, dashboard=False)
        use_gpu = bool(resources.get("GPU", 0)) if self.gpu is None else self.gpu
        if use_gpu and not resources.get("GPU", 0):
            raise UserError("--gpu asks for GPU actors but the cluster has no GPUs")
        pool = self.actors or (int(resources.get("GPU", 1)) if use_gpu else max(1, int(resources.get("CPU", 1))))
        pool = max(1, min(pool, len(todo) or 1))
        written = sum(m["images"] for m in done.values())
        if progress:
            progress(written, plan.num)
        for shard in todo:  # partial leftovers of an interrupted run are rewritten whole
            _remove_partial(store, plan, shard, blob["dataset"]["classes"])
        if todo:
            ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
            results = ds.map_batches(
                ShardWriter, batch_size=1, compute=_pool(pool),
                fn_constructor_kwargs={"model_blob_ref": [ray.put(blob)], "plan": asdict(plan), "out": self.out,
                                       "device": "cuda" if use_gpu else "cpu", "threads": 1},
                num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)
            for row in results.iter_rows():
                done[int(row["shard"])] = {"shard": int(row["shard"]), "images": int(row["images"]),
                                           "sha256": str(row["sha256"])}
                written += int(row["images"])
                if progress:
                    progress(written, plan.num)
        manifest = {**identity, "status": "complete",
                    "shards": [done[s] for s in range(plan.num_shards)],
                    "seconds": round(time.time() - started, 3), "actors": pool, "gpu": use_gpu}
        store.write(MANIFEST, json.dumps(manifest, indent=2).encode())
        _clean_leftovers(store, plan, blob["dataset"]["classes"])
        return manifest


def _pool(size: int):
    """A fixed actor pool that hands each actor one shard at a time. Ray
    Data's default queues several tasks per actor, so the first actor to start
    could take most of the shards while the others sat idle."""
    import ray

    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)


def generate(checkpoint: str, num: int, out: str, address: Optional[str] = None,
             progress: Optional[Callable[[int, int], None]] = None, **options: Any) -> dict[str, Any]:
    """Write `num` generated images to `out` (see `Generation` for the options)."""
    return Generation(checkpoint, num, out, **options).run(address, progress)


def _remove_partial(store: Store, plan: Plan, shard: int, classes: list[str]) -> None:
    """Files of an unfinished shard are rewritten anyway; drop them first so a
    shorter rewrite can never leave stale files behind."""
    if plan.format != "png":
        store.delete(f"part-{shard:05d}.{plan.format}")
        return
    folders = {name.rsplit("/", 1)[0] for name in shard_files(plan, shard, classes)}
    for folder in folders:
        store.delete(folder)


def _clean_leftovers(store: Store, plan: Plan, classes: list[str]) -> None:
    """Markers served their purpose (the manifest holds the checksums now);
    temporary files and folders of killed writers must not survive a finished
    run. They only exist locally (S3 objects appear whole with one PUT), beside
    the shard folders: at the top, or in the class folders of a labelled set.
    Shard folders themselves are never listed."""
    store.delete(MARKERS)
    if store.remote:
        return
    parents = [""] + ([class_folder(c) for c in classes] if plan.labels != "none" else [])
    for parent in parents:
        for leftover in Path(store.path(parent)).glob(".tmp-*"):
            store.delete(leftover.relative_to(store.root).as_posix())


def verify(out: str) -> dict[str, Any]:
    """Check a finished set against its manifest: every file, every checksum."""
    store = Store(out)
    try:
        manifest = json.loads(store.read(MANIFEST))
    except (FileNotFoundError, OSError):
        raise UserError(f"{out}: no {MANIFEST}; not a generated set") from None
    except ValueError:
        raise UserError(f"{out}: {MANIFEST} is not valid JSON") from None
    if manifest.get("status") != "complete":
        raise UserError(f"{out}: generation did not finish (status {manifest.get('status')!r}); rerun it to resume")
    plan = Plan(**manifest["plan"])
    classes = manifest["dataset"]["classes"]
    for entry in manifest["shards"]:
        names = shard_files(plan, entry["shard"], classes)
        try:
            blobs = [store.read(name) for name in names]
        except (FileNotFoundError, OSError):
            raise UserError(f"{out}: shard {entry['shard']} is missing files") from None
        if digest(blobs) != entry["sha256"]:
            raise UserError(f"{out}: shard {entry['shard']} does not match its checksum")
    expected = {n for s in range(plan.num_shards) for n in shard_files(plan, s, classes)} | {MANIFEST}
    extra = [f for f in store.files() if f not in expected]
    if extra:
        raise UserError(f"{out}: {len(extra)} file(s) not in the manifest, e.g. {extra[0]}")
    return manifest
