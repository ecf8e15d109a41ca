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

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from . import storage
from .api import callable_module
from .checkpoint import load_blob, model_from_blob
from .errors import UserError
from .formats import hf_features
from .images import to_float, to_uint8, to_uint8_tensor
from .keyed_random import latent_normals
from .shardstore import MARKERS, EncoderPool, digest, store_shard

SHARD = 10_000  # images per shard (PNG folder, Parquet/NPZ file)
CHUNK = 256  # decode batch, aligned to global indices
MAX_ACTORS_PER_GPU = 8
MAX_ENCODERS = 32  # encoder processes of a job on one machine (each holds a shard or two)
LOCAL_CPU_DECODE = 4  # cores up to which a job without a GPU decodes in the command's process
MAX_NUM = 1_000_000_000  # file names hold nine digits of index
MAX_SHARDS = 100_000  # MAX_NUM at the default shard size; shard names hold five digits
MAX_CLASSES = 100_000
MAX_MANIFEST_BYTES = 64 * 2**20  # a manifest of MAX_SHARDS shards is about 12 MB
MAX_MARKER_BYTES = 4096
MAX_TEMPERATURE = 100.0
MAX_CANDIDATES = 64  # draws per image under --min-confidence; the judge's favourite of them when none passes
# Candidate r of image i is decoded from the keyed normals of index i + r * CANDIDATE_STRIDE: never
# another image's (indices stay below MAX_NUM), and candidate 0 is the unfiltered set's image i.
CANDIDATE_STRIDE = 1 << 30
FILTER_JUDGE_SEED = 1  # the evaluation judge is seed 0: a set is never judged by the network that filtered it
MAX_COPY_DISTANCE = 1e4  # pixel L2 in [0, 1] units; 1024x1024x3 images are at most ~1774 apart
MAX_REFERENCE_BYTES = 4 << 30  # --max-copy-distance holds the training split in every writer
COPY_PERCENTILE = 1.0  # --max-copy-distance auto: closer than 99% of real test images are
FORMATS = ("png", "parquet", "npz", "hf")
FORMAT_ID = "vae-ray-generated/1"
MANIFEST = "_manifest.json"
OLD_MANIFEST = "manifest.json"  # sets written before the manifest was renamed
CARD = "README.md"
# In an S3 staging folder only: the manifest of the set an --overwrite is
# replacing, written before that manifest is removed, so a rerun after a crash
# can still prove every key under the prefix ours and finish the swap.
REPLACING = ".replacing.json"


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
    min_confidence: float = 0.0  # > 0: keep an image only when the judge gives its label this probability
    judge_sha256: str = ""  # the filtering judge's weights
    max_copy_distance: float = 0.0  # > 0: drop an image this close (pixel L2, [0, 1] units) to a training image
    reference_sha256: str = ""  # the dataset whose training split that is
    prior: str = "normal"  # where z comes from (vae_ray/prior.py): N(0, I), or "gmm"
    prior_sha256: str = ""  # the fitted mixture's file, for "gmm"

    @property
    def filtered(self) -> bool:
        return bool(self.min_confidence or self.max_copy_distance)

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num)

    def digest(self) -> str:
        fields_ = asdict(self)
        if not self.filtered:  # an unfiltered plan keeps the digest it had before filtering existed
            for name in FILTER_FIELDS:
                del fields_[name]
        if self.prior == "normal":  # likewise before priors were a choice
            for name in PRIOR_FIELDS:
                del fields_[name]
        return hashlib.sha256(json.dumps(fields_, sort_keys=True).encode()).hexdigest()[:12]


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
    characters. Distinct ignoring case (macOS and Windows fold it), and a
    suffixed name is checked again: ["x", "x-2", "x"] gives x, x-2, x-3. The
    manifest keeps the real names beside them."""
    out: list[str] = []
    used: set[str] = set()
    for k, name in enumerate(classes):
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip(".-_")[:64] or f"class-{k}"
        safe, n = base, k
        while safe.lower() in used:
            suffix = f"-{n}"
            safe = base[: min(58, 64 - len(suffix))] + suffix  # 58: the names earlier versions gave
            n += 1
        used.add(safe.lower())
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
        self.judge = _filter_judge(model_blob, self.device) if self.plan.min_confidence else None
        self.reference = None  # the training split's pixels, for --max-copy-distance
        if self.plan.max_copy_distance:
            held = model_blob["reference"]
            self.reference = torch.from_numpy(held.reshape(len(held), -1)).to(self.device).float().div_(255.0)
        self.filtered: dict[int, dict[str, int]] = {}  # shard -> candidates, images none passed, copies dropped
        self.mixture = None  # --prior gmm: the fitted mixture the plan names
        if self.plan.prior == "gmm":
            from .prior import Mixture

            if hashlib.sha256(model_blob["prior"]).hexdigest() != self.plan.prior_sha256:
                raise UserError("the mixture handed to the writer is not the one the plan names")
            self.mixture = Mixture.from_bytes(model_blob["prior"], "the plan's mixture")
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
        out = {
            "shard": np.array(shards),
            "images": np.array(counts),
            "sha256": np.array(sums),
            "seconds": np.array(seconds),
        }
        for key in FILTER_KEYS if self.plan.filtered else ():
            out[key] = np.array([self.filtered[s][key] for s in shards])
        return out

    @torch.no_grad()
    def decode(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 images, labels and candidates drawn for indices [start, end), in aligned chunks."""
        size = self.plan.chunk
        first, last = (start // size) * size, -(-end // size) * size
        if not self.plan.filtered:
            images, labels = self._decode_chunks(first, last)
            tries = np.stack([np.ones(len(labels), dtype=np.int64), np.zeros(len(labels), dtype=np.int64)], 1)
            cut = slice(start - first, end - first)
            return images[cut], labels[cut], tries[cut]
        images, labels, tries = [], [], []
        for chunk in range(first, last, size):
            idx = np.arange(chunk, chunk + size)
            lab = labels_for(self.plan, idx, len(self.classes))
            y = torch.from_numpy(lab).to(self.device) if self.model.num_classes else None
            drawn = self._draw(idx, y)
            count, copies = np.ones(len(idx), dtype=np.int64), np.zeros(len(idx), dtype=np.int64)
            if self.plan.filtered:
                drawn, count, copies = self._filter(idx, lab, y, drawn)
            images.append(drawn)
            labels.append(lab)
            tries.append(np.stack([count, copies], 1))
        cut = slice(start - first, end - first)
        return np.concatenate(images)[cut], np.concatenate(labels)[cut], np.concatenate(tries)[cut]

    def _decode_chunks(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """Images [first, last) (whole chunks), unfiltered: the latents of every
        chunk made on the host and copied over once, each chunk decoded as its
        own batch (the same arithmetic as one call per chunk), and the pixels
        copied back once, so a GPU is not waited for at every chunk."""
        size = self.plan.chunk
        keys = [np.arange(c, min(c + size, last)) for c in range(first, last, size)]
        labels = [labels_for(self.plan, idx, len(self.classes)) for idx in keys]
        conditional = bool(self.model.num_classes)
        z = np.concatenate(
            [self._latents(idx, lab if conditional else None) for idx, lab in zip(keys, labels, strict=True)]
        )
        z = torch.from_numpy(z).to(self.device)
        y = torch.from_numpy(np.concatenate(labels)).to(self.device) if conditional else None
        pixels = []
        for c in range(0, last - first, size):
            part = y[c : c + size] if y is not None else None
            pixels.append(to_uint8_tensor(self.model.mean_image(self.model.decode(z[c : c + size], part))))
        return torch.cat(pixels).cpu().numpy(), np.concatenate(labels)

    def _latents(self, keys: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
        eps = latent_normals(self.plan.seed, keys, self.model.latent_dim)
        z = eps * np.float32(self.plan.temperature)
        if self.mixture is not None:  # the first latent group from the mixture (of the image's class)
            from .prior import component_uniforms

            d = self.mixture.dims
            u = component_uniforms(self.plan.seed, keys)
            z[:, :d] = self.mixture.sample(eps[:, :d], u, classes, self.plan.temperature)
        return z

    def _draw(self, keys: np.ndarray, y: torch.Tensor | None) -> np.ndarray:
        z = self._latents(keys, y.cpu().numpy() if y is not None else None)
        z = torch.from_numpy(z).to(self.device)
        return to_uint8(self.model.mean_image(self.model.decode(z, y)))

    def _filter(
        self, idx: np.ndarray, lab: np.ndarray, y: torch.Tensor | None, drawn: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """--min-confidence and --max-copy-distance: redraw, candidate by
        candidate, the images the judge does not give their label (an
        unlabelled set: any class) with at least that probability, and those
        that close to a training image. Candidate r of image i is keyed by i
        and r alone and each round redraws the same images for the same
        chunk, so the result is the same bytes on every run and every resume.
        An image no candidate passes keeps the one nearest to passing: the set
        still has exactly --num images, and the manifest counts those.
        -> (images, candidates per image (negative: none passed), copies dropped per image)."""
        best, (best_score, copy) = drawn.copy(), self._score(drawn, lab)
        count, copies = np.ones(len(idx), dtype=np.int64), copy.astype(np.int64)
        pending = np.flatnonzero(best_score < 1)
        for r in range(1, MAX_CANDIDATES):
            if not len(pending):
                break
            keys = idx[pending] + np.int64(r * CANDIDATE_STRIDE)
            images = self._draw(keys, y[torch.from_numpy(pending).to(y.device)] if y is not None else None)
            score, copy = self._score(images, lab[pending])
            count[pending] += 1
            copies[pending] += copy
            better = score > best_score[pending]
            best[pending[better]], best_score[pending[better]] = images[better], score[better]
            pending = pending[score < 1]
        return best, np.where(best_score >= 1, count, -count), copies

    def _score(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """How far each candidate is from passing, as its worst ratio to a
        threshold (>= 1: it passes), and whether it is a near-copy."""
        score = np.full(len(images), np.inf)
        copy = np.zeros(len(images), dtype=bool)
        if self.judge is not None:
            score = np.minimum(score, self._confidence(images, labels) / self.plan.min_confidence)
        if self.reference is not None:
            distance = self._nearest_training_distance(images)
            copy = distance <= self.plan.max_copy_distance
            # just past the threshold passes: distance / threshold > 1
            score = np.minimum(score, np.where(copy, distance / self.plan.max_copy_distance, np.inf))
        return score, copy

    def _nearest_training_distance(self, images: np.ndarray) -> np.ndarray:
        q = torch.from_numpy(images.reshape(len(images), -1)).to(self.device).float().div_(255.0)
        best = torch.full((len(q),), float("inf"), device=self.device)
        for start in range(0, len(self.reference), 8192):
            best = torch.minimum(best, torch.cdist(q, self.reference[start : start + 8192]).min(dim=1).values)
        return best.cpu().numpy().astype(np.float64)

    def _confidence(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The judge's probability of each image's label (of its likeliest class when unlabelled)."""
        probs = torch.softmax(self.judge(to_float(images).to(self.device))[1].float(), dim=1).cpu().numpy()
        return probs.max(1) if labels[0] < 0 else probs[np.arange(len(labels)), labels]

    def write_shard(self, shard: int) -> tuple[int, str]:
        args = self.decode_shard(shard)
        return args[-1]["images"], store_shard(*args)

    def decode_shard(self, shard: int) -> tuple:
        """A shard decoded: shardstore.store_shard's arguments (the last is its marker without the checksum)."""
        start, end = self.plan.shard_range(shard)
        images, labels, tries = self.decode(start, end)
        # tries[:, 0] < 0: an image none of its candidates passed (see _filter)
        self.filtered[shard] = {
            "candidates": int(np.abs(tries[:, 0]).sum()),
            "unmet": int((tries[:, 0] < 0).sum()),
            "copies": int(tries[:, 1].sum()),
        }
        marker = {"shard": shard, "images": end - start} | (self.filtered[shard] if self.plan.filtered else {})
        classes = self.classes if self.plan.format == "hf" and self.plan.labels != "none" else None
        names = shard_files(self.plan, shard, self.folders)
        return self.root, self.plan.format, names, images, labels, np.arange(start, end), classes, marker


FILTER_KEYS = ("candidates", "unmet", "copies")  # a filtered set's per-shard counts (markers and manifest)
FILTER_FIELDS = ("min_confidence", "judge_sha256", "max_copy_distance", "reference_sha256")  # Plan's, newer
PRIOR_FIELDS = ("prior", "prior_sha256")  # Plan's, newer still


def _filter_judge(model_blob: dict[str, Any], device: torch.device):
    from .judge import Judge

    held = model_blob["judge"]
    judge = Judge(held["channels"], held["num_classes"])
    judge.load_state_dict(held["state"])
    return judge.to(device).eval()


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
    filters: dict[str, Any] | None = None,
    prior: tuple[str, str] = ("normal", ""),
) -> Plan:
    """The plan of a run; `filters` holds the Plan's FILTER_FIELDS (resolved by
    Generation), `prior` its prior and the fitted mixture's SHA-256."""
    filters = filters or {}
    check_options(
        num=num,
        fmt=fmt,
        seed=seed,
        temperature=temperature,
        chunk=chunk,
        shard_size=shard_size,
        label=label,
        per_class=per_class,
        min_confidence=filters.get("min_confidence", 0.0),
        max_copy_distance=filters.get("max_copy_distance", 0.0),
    )
    classes = blob["dataset"]["classes"]
    if (label is not None or per_class) and not blob["config"]["conditional"]:
        raise UserError(
            f"{blob['path']}: not a class-conditional model; train with --conditional to use --label or --per-class"
        )
    if label is not None and not 0 <= label < len(classes):
        raise UserError(f"--label must be between 0 and {len(classes) - 1} (got {label})")
    # A conditional model needs a label for every image: without --label, the
    # classes take turns (as with --per-class).
    balanced = per_class or (label is None and blob["config"]["conditional"])
    labels = "per-class" if balanced else ("none" if label is None else str(label))
    return Plan(
        num=num,
        seed=seed,
        format=fmt,
        temperature=float(temperature),
        labels=labels,
        checkpoint_sha256=blob["sha256"],
        chunk=chunk,
        shard_size=shard_size,
        prior=prior[0],
        prior_sha256=prior[1],
        **filters,
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
    min_confidence: float = 0.0,
    max_copy_distance: float | str = 0.0,
    prior: str = "normal",
) -> None:
    """Every check that needs no files: run before anything else, and before --submit."""
    from .prior import PRIORS

    if prior not in PRIORS:
        raise UserError(f"--prior must be one of {', '.join(PRIORS)} (got {storage.printable(str(prior))[:40]!r})")
    if not (_is_number(min_confidence) and 0 <= min_confidence < 1):
        raise UserError(f"--min-confidence must be a probability in [0, 1) (got {min_confidence})")
    if max_copy_distance != "auto" and not (
        _is_number(max_copy_distance) and 0 <= max_copy_distance <= MAX_COPY_DISTANCE
    ):
        raise UserError(
            f"--max-copy-distance must be auto or a pixel distance in [0, {MAX_COPY_DISTANCE:g}] (got {max_copy_distance})"
        )
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
    if -(-num // shard_size) > MAX_SHARDS:
        raise UserError(
            f"--num {num:,} in shards of {shard_size:,} makes more than {MAX_SHARDS:,} shards; raise --shard-size"
        )


# ---------------------------------------------------------------------------
# Reading a set back: nothing is believed before it is checked
# ---------------------------------------------------------------------------
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAFE_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what class_folders makes: one name, no dot first


def _read_json_file(uri: str, limit: int) -> Any:
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
            manifest = _read_json_file(storage.join(root, name), MAX_MANIFEST_BYTES)
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def same_plan(raw: dict[str, Any], plan: Plan) -> bool:
    """A checked manifest's plan against this run's: a field an older version
    did not write holds its default, so a set written before the field existed
    is still the same set."""
    try:
        return Plan(**raw) == plan
    except TypeError:
        return False


def _valid_entry(entry: Any, shard: int, plan: Plan) -> bool:
    """A shard's record (in a manifest or a marker): its number, image count and checksum."""
    start, end = plan.shard_range(shard)
    return (
        isinstance(entry, dict)
        and _is_int(entry.get("shard"))
        and entry["shard"] == shard
        and _is_int(entry.get("images"))
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
        all(_is_int(v) for v in (candidates, unmet, copies))
        and images <= candidates <= images * MAX_CANDIDATES
        and 0 <= unmet <= images
        and 0 <= copies <= candidates
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
    optional = {"shard_size", "chunk", *FILTER_FIELDS, *PRIOR_FIELDS}  # fields later versions added
    if not isinstance(raw, dict) or not set(raw) <= names or not names - optional <= set(raw):
        raise bad("holds no valid plan")
    if not (
        all(_is_int(raw[k]) for k in ("num", "seed", "shard_size", "chunk") if k in raw)
        and all(
            isinstance(raw[k], str)
            for k in ("format", "labels", "checkpoint_sha256", "judge_sha256", "reference_sha256", *PRIOR_FIELDS)
            if k in raw
        )
        and all(_is_number(raw[k]) for k in ("temperature", "min_confidence", "max_copy_distance") if k in raw)
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
        )
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
            if not _valid_entry(entry, shard, plan) or not _valid_filter_counts(entry, plan):
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
        if rel in (*self.manifests, REPLACING) or (rel == CARD and self.plan.format == "hf"):
            return True
        parts = rel.rstrip("/").split("/")
        for depth, part in enumerate(parts):
            if storage.is_temp_name(part):  # a killed writer's file or shard folder, and what is inside it
                return "/".join(parts[:depth]) in self._written_into()
        if rel.endswith("/"):
            return self._is_folder(rel[:-1])
        if parts[0] == MARKERS:
            match = re.fullmatch(r"[0-9]{5,6}", parts[-1].removesuffix(".json"))
            return bool(match) and rel == f"{MARKERS}/{int(match[0]):05d}.json" and int(match[0]) < self.plan.num_shards
        return self._is_shard_file(rel)

    def _written_into(self) -> set[str]:
        return {"", "data", MARKERS, *self.folders}

    def _is_folder(self, rel: str) -> bool:
        if rel == MARKERS or rel in self.folders or (rel == "data" and self.plan.format == "hf"):
            return True
        match = re.fullmatch(r"(?:([^/]+)/)?([0-9]{5,6})", rel)  # a shard's folder, at the top or in a class folder
        parents = self.folders or ("",)
        return bool(match) and (match[1] or "") in parents and int(match[2]) < self.plan.num_shards

    def _is_shard_file(self, rel: str) -> bool:
        plan, shards = self.plan, self.plan.num_shards
        if plan.format == "png":
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
        if plan.format == "hf":
            match = re.fullmatch(r"data/train-([0-9]{5,6})-of-[0-9]{5,6}\.parquet", rel)
            return bool(match) and int(match[1]) < shards and rel == shard_files(plan, int(match[1]), [])[0]
        match = re.fullmatch(r"part-([0-9]{5,6})\.(?:parquet|npz)", rel)
        return bool(match) and int(match[1]) < shards and rel == shard_files(plan, int(match[1]), [])[0]


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


def destination_state(out: str, plan: Plan, overwrite: bool) -> str:
    """'new', 'resume', 'complete' or 'replace'; anything else is refused in one line.

    A folder is new only when it holds nothing (a leftover of our own first
    manifest write aside). Otherwise it must hold a manifest that checks, and
    nothing that manifest's set does not own, hidden names included."""
    if storage.is_file(out):
        raise UserError(f"{out}: exists and is not a folder")
    found = storage.leaves(out)
    if all(storage.is_temp_name(rel.split("/")[0]) for rel in found):
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
    replaced = _read_json_file(storage.join(staging, REPLACING), MAX_MANIFEST_BYTES)
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
            marker = _read_json_file(storage.join(root, MARKERS, name), MAX_MARKER_BYTES)
        except UserError:
            continue
        shard = int(match[1])
        if _valid_entry(marker, shard, plan) and _valid_filter_counts(marker, plan):
            done[shard] = {"shard": shard, "images": marker["images"], "sha256": marker["sha256"]}
            done[shard] |= {k: marker[k] for k in FILTER_KEYS if getattr(plan, "filtered", False)}
    return done


# ---------------------------------------------------------------------------
# Whole-folder swaps (an --overwrite here, a report's folder in report.py)
# ---------------------------------------------------------------------------
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


def _check_aside(out: str) -> None:
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


class ShardedJob:
    """The life of a set written shard by shard, exactly once, that generate
    and encode (vae_ray/encode.py) share: under the destination's lock, finish
    a swap a crash cut short, find the destination's state again, skip the
    marked shards, write the manifest first ("running") and last ("complete"),
    remove leftovers, swap an --overwrite in. A subclass says what its set is:
    `command`, `writer` (the shard writer: a Ray Data actor class), `last`
    (the names a swap removes last), its module's functions `_destination`
    (destination_state), `_read_set` and `_foreign` (foreign_in_set), and the
    methods `run` calls."""

    command = ""
    writer: type = object
    pipelined = False  # the writer decodes (decode_shard) apart from encoding and writing (shardstore)
    last: tuple[str, ...] = (MANIFEST,)
    _destination: Callable[..., str]
    _read_set: Callable[[str], tuple[dict[str, Any], Any] | None]
    _foreign: Callable[[str], list[str]]

    def run(self, address: str | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Write the shards; return the manifest (with `already_complete` when there was nothing to do)."""
        with storage.Lock(self.out, self.command) as lock:

            def tick(done: int, total: int) -> None:  # after every shard: is the lock still ours?
                lock.ensure_held()
                if progress:
                    progress(done, total)

            settle_swap(self.out, self._foreign, last=self.last)  # a swap a crash cut short
            self.state = self._destination(self.out, self.plan, self.overwrite)  # again, under the lock
            if self.state == "complete":
                self.path_taken = "nothing to do"
                return self._read_set(self.out)[0] | {"already_complete": True}
            root = self._root()
            existing = self._read_set(root)  # None, or this very plan's set (checked by _destination or _root)
            if existing is not None and existing[0]["status"] == "complete":  # an --overwrite whose swap was cut short
                self.path_taken = "the new set was complete; swapped in now"
                self._swap_in(root)
                return existing[0]
            done = completed_shards(root, self.plan)
            todo = [s for s in range(self.plan.num_shards) if s not in done]
            self._check_space(root, done)  # before the first write
            here = self._here(address)
            writer = None if here else self._connect(address)  # checks the cluster (GPUs) first
            started = time.time()
            identity = self._identity(root)
            if existing is None:
                storage.makedirs(root)
                storage.write_json(storage.join(root, MANIFEST), identity)
            for shard in todo:  # leftovers of an interrupted run are rewritten whole
                self._remove_partial(root, shard)
            written = sum(m["images"] for m in done.values())
            tick(written, self.plan.num)
            if here:
                self._write_here(here, root, todo, done, written, tick)
            else:
                done = writer(root, todo, done, written, tick)
            manifest = {
                **identity,
                "status": "complete",
                "shards": [done[s] for s in range(self.plan.num_shards)],
                "seconds": round(time.time() - started, 3),
                "path": self.path_taken,
            }
            self._summarise(manifest)
            lock.ensure_held()  # a writer that lost its lock never writes the manifest that calls a set complete
            self._before_manifest(root, manifest)
            storage.write_json(storage.join(root, MANIFEST), manifest)
            self._clean_leftovers(root)
            if self.state == "replace":
                lock.ensure_held()
                self._swap_in(root)
            return manifest

    # -- in this process ----------------------------------------------------
    def _here(self, address: str | None) -> str | None:
        """The device to decode on in this process, or None for the Ray Data
        path. A job of one shard runs here unless a cluster is named
        (--address, RAY_ADDRESS), --actors asks for actors, or --gpu finds no
        GPU. More shards (a pipelined writer's) run here on a machine of one
        GPU, or without a GPU on one of at most LOCAL_CPU_DECODE cores (beyond,
        one single-threaded Ray actor per core decodes faster), and not in a
        process that has joined a Ray cluster already. The device is chosen the
        same way on both paths: a GPU when there is one, unless --no-gpu."""
        from .cluster import given_address

        if given_address(address) is not None or self.actors is not None:
            return None
        if not self.pipelined:
            return "cpu" if not self.gpu and self.plan.num_shards == 1 else None
        cuda = torch.cuda.is_available()
        if self.gpu and not cuda:
            return None  # the Ray path says the cluster has no GPU
        device = "cuda" if cuda and self.gpu is not False else "cpu"
        if self.plan.num_shards == 1:
            return device
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            return None
        if device == "cuda" and torch.cuda.device_count() > 1:
            return None  # one decoder per GPU: the actors use them all
        if device == "cpu" and _threads() > LOCAL_CPU_DECODE:
            return None
        return device

    def _write_here(self, device: str, root: str, todo: list[int], done: dict, written: int, tick) -> None:
        """Decode shard after shard here; with more than one, a pool of encoder
        processes (shardstore.EncoderPool) encodes and writes them meanwhile.
        A set of several shards decodes in one thread on a CPU, as each Ray
        actor does, so that a set resumed on the other path is the same
        arithmetic. The process's torch settings are put back after."""
        cpus = _threads()
        encoders = 0 if len(todo) < 2 or not self.pipelined else min(len(todo), MAX_ENCODERS, max(1, cpus - 1))
        threads = cpus if device == "cpu" and self.plan.num_shards == 1 else 1
        kept = torch.get_num_threads(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
        try:
            shard_writer = self.writer(self.blob, **self._writer_options(root, device, threads))
            self._write_shards(shard_writer, device, encoders, todo, done, written, tick)
        finally:
            torch.set_num_threads(kept[0])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = kept[1], kept[2]

    def _write_shards(self, shard_writer, device: str, encoders: int, todo, done: dict, written: int, tick) -> None:
        where = "in this process" + (" on the GPU" if device == "cuda" else "")
        # A shard's record, as the Ray path and a resume (completed_shards) make it.
        filtered = getattr(shard_writer, "filtered", {}) if getattr(self.plan, "filtered", False) else {}

        def record(shard: int, n: int, checksum: str) -> None:
            nonlocal written
            done[shard] = {"shard": shard, "images": n, "sha256": checksum} | filtered.get(shard, {})
            written += n
            tick(written, self.plan.num)

        if not encoders:
            self.path_taken = f"{where} ({'one shard, ' if self.plan.num_shards == 1 else ''}no cluster named)"
            for shard in todo:
                record(shard, *shard_writer.write_shard(shard))
            return
        self.path_taken = f"{where}, {encoders} encoder process(es) (no cluster named)"
        with EncoderPool(encoders) as pool:
            for shard in todo:
                args = shard_writer.decode_shard(shard)
                for finished in pool.submit(shard, args[-1]["images"], *args):
                    record(*finished)
            for finished in pool.finish():
                record(*finished)

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

        def write(root: str, todo: list[int], done: dict, written: int, progress) -> dict:
            pool = max(1, min(want, len(todo) or 1))
            shared = f", {gpus_each:g} GPU each" if use_gpu and gpus_each < 1 else ""
            self.path_taken = f"a Ray Data actor pool of {pool} {'GPU' if use_gpu else 'CPU'} actor(s){shared}"
            if not todo:
                return done
            ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
            results = ds.map_batches(
                self.writer,
                batch_size=1,
                compute=_pool(pool),
                fn_constructor_kwargs={
                    "model_blob": [ray.put(self.blob)],
                    **self._writer_options(root, "cuda" if use_gpu else "cpu", 1),
                },
                num_gpus=gpus_each,
                num_cpus=1,
            )
            for row in results.iter_rows():
                if row.get("error"):  # a user's mistake an actor found (raised there, Ray would print a traceback)
                    raise UserError(str(row["error"]))
                done[int(row["shard"])] = {
                    "shard": int(row["shard"]),
                    "images": int(row["images"]),
                    "sha256": str(row["sha256"]),
                } | {key: int(row[key]) for key in FILTER_KEYS if key in row}

                written += int(row["images"])
                if progress:
                    progress(written, self.plan.num)
            return done

        return write

    # -- what a subclass says -------------------------------------------------
    def _writer_options(self, root: str, device: str, threads: int) -> dict[str, Any]:
        """The writer's constructor arguments beside the model."""
        raise NotImplementedError

    def _before_manifest(self, root: str, manifest: dict[str, Any]) -> None:
        """Anything written just before the complete manifest (the last file)."""

    def _summarise(self, manifest: dict[str, Any]) -> None:
        """Totals of the shards' records, into the complete manifest."""


@dataclass(frozen=True)
class GenerateOptions:
    """Every option of `vae-ray generate` but the checkpoint and --out, with
    its default: the one place they are typed, checked by `check()` (before
    anything is read, and before a job is submitted)."""

    num: int = 1
    fmt: str = "png"
    seed: int = 0
    actors: int | None = None
    gpu: bool | None = None
    temperature: float = 1.0
    label: int | None = None
    per_class: bool = False
    overwrite: bool = False
    batch_size: int | None = None
    shard_size: int = SHARD
    min_confidence: float = 0.0
    max_copy_distance: float | str = 0.0
    data: str | None = None
    judge_seed: int = FILTER_JUDGE_SEED
    prior: str = "normal"

    @property
    def chunk(self) -> int:
        return CHUNK if self.batch_size is None else self.batch_size

    def check(self) -> GenerateOptions:
        check_options(
            self.num,
            self.fmt,
            self.seed,
            self.temperature,
            self.chunk,
            self.shard_size,
            self.label,
            self.per_class,
            self.actors,
            self.min_confidence,
            self.max_copy_distance,
            self.prior,
        )
        return self

    @classmethod
    def of(cls, options: dict[str, Any]) -> GenerateOptions:
        """From a command's options (a dict that may also name the checkpoint
        and --out), checked; an unknown name is the user's one-line mistake."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known - {"checkpoint", "out"})
        if unknown:
            raise UserError(f"generate: unknown option(s) {', '.join(unknown)}")
        return cls(**{k: v for k, v in options.items() if k in known}).check()


class Generation(ShardedJob):
    """A generation run: the constructor checks everything a user can get
    wrong (options, checkpoint, destination) before anything is written;
    `run` then does the work."""

    command = "vae-ray generate"
    writer = ShardWriter
    pipelined = True
    last = (MANIFEST, OLD_MANIFEST)
    _destination = staticmethod(destination_state)
    _read_set = staticmethod(read_set)
    _foreign = staticmethod(foreign_in_set)

    def __init__(
        self,
        checkpoint: str,
        num: int,
        out: str,
        address: str | None = None,
        fitting: Callable[[int, int], None] | None = None,
        **options: Any,
    ):
        """`options`: GenerateOptions' fields. `address`: the cluster that
        fits a --prior gmm mixture when the run has none yet (`fitting`
        follows that job); `run` takes it again."""
        o = self.options = GenerateOptions.of({"num": num, **options})
        self.out = storage.check_uri(out)
        self.blob = load_blob(checkpoint)
        if self.blob["path"].rstrip("/").startswith(self.out.rstrip("/") + "/") or self.blob["path"] == self.out:
            raise UserError(f"{out}: holds the checkpoint being sampled; choose another --out")
        filters: dict[str, Any] = {}
        if o.min_confidence or o.max_copy_distance:
            filters = self._load_filters(
                o.data or self.blob["config"]["data"], o.min_confidence, o.max_copy_distance, o.judge_seed
            )
        mixture = ("normal", "")
        if o.prior == "gmm":
            from .prior import ensure

            _, stored = ensure(self.blob, o.data, address, o.actors, o.gpu, fitting)
            self.blob = self.blob | {"prior": stored}
            mixture = ("gmm", hashlib.sha256(stored).hexdigest())
        self.plan = make_plan(
            self.blob,
            o.num,
            o.fmt,
            o.seed,
            o.temperature,
            o.label,
            o.per_class,
            o.chunk,
            o.shard_size,
            filters,
            mixture,
        )
        self.state = destination_state(self.out, self.plan, o.overwrite)
        self.actors, self.gpu, self.overwrite = o.actors, o.gpu, o.overwrite
        self.path_taken = ""
        if self.state != "complete":
            root = self._root()
            self._check_space(root, completed_shards(root, self.plan))

    def _writer_options(self, root: str, device: str, threads: int) -> dict[str, Any]:
        return {"plan": asdict(self.plan), "root": root, "device": device, "threads": threads}

    def decoder(self, threads: int = 1) -> ShardWriter:
        """This run's images without writing them (`decoder().decode(start, end)`), on the CPU."""
        return ShardWriter(self.blob, **self._writer_options("", "cpu", threads))

    def _load_filters(
        self, data: str, min_confidence: float, max_copy_distance: float | str, judge_seed: int
    ) -> dict[str, Any]:
        """What the filters need, from the dataset `data` (of the model's
        classes and image shape), into the blob the writers get; returns the
        plan's filter fields."""
        from .data import read_meta

        if not data:
            raise UserError("--min-confidence and --max-copy-distance need the model's dataset: pass --data")
        meta = read_meta(data)
        classes, shape = self.blob["dataset"]["classes"], self.blob["dataset"]["shape"]
        if list(meta["shape"]) != list(shape) or (min_confidence and list(meta["classes"]) != list(classes)):
            raise UserError(f"{data}: holds other classes or image shapes than the model {self.blob['path']} takes")
        filters: dict[str, Any] = {}
        if min_confidence:
            filters |= {
                "min_confidence": float(min_confidence),
                "judge_sha256": self._load_judge(data, meta, judge_seed),
            }
        if max_copy_distance:
            filters |= self._load_reference(data, meta, max_copy_distance)
        return filters

    def _load_reference(self, data: str, meta: dict[str, Any], max_copy_distance: float | str) -> dict[str, Any]:
        """The training split's pixels for --max-copy-distance; `auto` is the
        distance to the training split that 99% of real test images exceed
        (evaluate-set's near-copy threshold)."""
        from .data import read_arrays
        from .judge import dataset_digest
        from .quality import nearest_distances, pixel_rows

        h, w, c = meta["shape"]
        size = meta["splits"]["train"]["count"] * h * w * c
        if size > MAX_REFERENCE_BYTES:
            raise UserError(
                f"{data}: --max-copy-distance compares every image with the whole training split, and its "
                f"{size / 2**30:.1f} GiB do not fit every writer (at most {MAX_REFERENCE_BYTES / 2**30:.0f} GiB)"
            )
        train, _ = read_arrays(data, "train", meta=meta)
        if max_copy_distance == "auto":
            test, _ = read_arrays(data, "test", limit=2000, meta=meta)
            if not len(test):
                raise UserError(f"{data}: --max-copy-distance auto needs real test images; give a distance")
            distances = nearest_distances(pixel_rows(test), pixel_rows(train))
            max_copy_distance = float(np.percentile(distances, COPY_PERCENTILE))
        self.blob = self.blob | {"reference": train}
        return {"max_copy_distance": round(float(max_copy_distance), 6), "reference_sha256": dataset_digest(meta)}

    def _load_judge(self, data: str, meta: dict[str, Any], seed: int) -> str:
        """The filtering judge (a classifier of the model's dataset and classes,
        of a seed other than the evaluation judge's), into the blob the
        writers get; returns the SHA-256 of its weights."""
        from . import judge

        found = judge.load(data, meta, seed)
        if found is None:
            raise UserError(
                f"{data}: no judge classifier of seed {seed} for --min-confidence; "
                f"run `vae-ray classifier train --data {data} --seed {seed}` first"
            )
        model, info = found
        self.blob = self.blob | {
            "judge": {"state": model.state_dict(), "channels": info["channels"], "num_classes": info["num_classes"]}
        }
        return judge.weights_digest(data, seed)

    def _summarise(self, manifest: dict[str, Any]) -> None:
        if "filter" in manifest:  # acceptance: images kept over candidates decoded
            candidates = sum(entry["candidates"] for entry in manifest["shards"])
            manifest["filter"] |= {
                "candidates": candidates,
                "acceptance_rate": round(manifest["count"] / candidates, 6),
                "unmet": sum(entry["unmet"] for entry in manifest["shards"]),
                "copies_dropped": sum(entry["copies"] for entry in manifest["shards"]),
                "max_candidates": MAX_CANDIDATES,
            }

    def _before_manifest(self, root: str, manifest: dict[str, Any]) -> None:
        if self.plan.format == "hf":
            storage.write_text(storage.join(root, CARD), dataset_card(manifest))

    # -- files --------------------------------------------------------------
    def _root(self) -> str:
        """Where this run writes: the destination itself, or for --overwrite
        its staging folder, which must hold nothing or a part of this very set."""
        if self.state != "replace":
            return self.out
        _check_aside(self.out)
        staging = staging_folder(self.out, self.plan)
        if storage.is_file(staging):
            raise UserError(f"{staging}: exists and is not a folder; --overwrite builds the new set there: move it")
        found = storage.leaves(staging)
        if all(storage.is_temp_name(rel.split("/")[0]) for rel in found):
            return staging
        existing = read_set(staging)
        if existing is None or not same_plan(existing[0]["plan"], self.plan):
            foreign = found
        else:
            foreign = storage.foreign_leaves(staging, existing[1].owns)
        if foreign:
            raise UserError(
                f"{staging}: holds other files ({storage.some(foreign)}); --overwrite builds the new set "
                f"there: move them"
            )
        return staging

    def _check_space(self, root: str, done: dict[int, dict]) -> None:
        """Refuse, before the first write, a set its local disk cannot hold
        (S3 has no such limit): the shards still to write, at an upper bound
        of their size in whole blocks, against the free space and free inodes
        of the nearest folder that exists."""
        if storage.is_remote(root):
            return
        todo = [s for s in range(self.plan.num_shards) if s not in done]
        if not todo:
            return
        where = Path(storage.filesystem(root)[1])
        while not where.is_dir() and where != where.parent:
            where = where.parent
        stats = os.statvfs(where)
        need, files = planned_size(self.plan, self.blob["dataset"]["shape"], todo, stats.f_frsize or 4096)
        free = shutil.disk_usage(where).free
        images = sum(end - start for start, end in map(self.plan.shard_range, todo))
        if need > free:
            raise UserError(
                f"{self.out}: {images:,} {self.plan.format} images need up to {_size(need)} but {where} has "
                f"{_size(free)} free; free some space or choose another --out"
            )
        if stats.f_files and files > stats.f_favail:
            raise UserError(
                f"{self.out}: {images:,} {self.plan.format} images need {files:,} files but the file system of "
                f"{where} has room for {stats.f_favail:,} more (free inodes); choose another --out"
            )

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
            **({"filter": {name: getattr(plan, name) for name in FILTER_FIELDS}} if plan.filtered else {}),
            "checkpoint_sha256": blob["sha256"],
            "class_folders": dict(zip(classes, class_folders(classes), strict=True)) if plan.labels != "none" else {},
            "config": blob["config"],
            "dataset": blob["dataset"],
            "evaluation": blob["evaluation"] if blob.get("evaluation") is not None else _evaluation_of(blob["path"]),
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
        folders of a labelled set. Only our own temporary names are removed."""
        storage.delete(storage.join(root, MARKERS))
        if storage.is_remote(root):
            return
        base = Path(storage.filesystem(root)[1])
        parents = ["", "data"] + (class_folders(self.blob["dataset"]["classes"]) if self.plan.labels != "none" else [])
        for parent in parents:
            folder = base / parent
            if folder.is_symlink() or not folder.is_dir():
                continue
            for leftover in folder.iterdir():
                if storage.is_temp_name(leftover.name):
                    shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()

    def _swap_in(self, staging: str) -> None:
        """Replace the old set with the complete new one. Every leaf of the old
        one was proven ours (destination_state) under the lock we hold."""
        if not storage.is_remote(self.out):
            new, out = Path(storage.filesystem(staging)[1]), Path(storage.filesystem(self.out)[1])
            swap_folder(new, out, last=(MANIFEST, OLD_MANIFEST))
            return
        # S3 has no renames: keys are copied one by one. The old manifest is the
        # first object removed and the new one the last written, so a crash in
        # between never leaves a manifest vouching for a mixture of two sets;
        # the replaced manifest is kept in the staging folder first, so the
        # same command run again can prove the keys ours and finish.
        replaced = read_manifest(self.out)
        if replaced is not None:
            storage.write_json(storage.join(staging, REPLACING), replaced)
            for name in (MANIFEST, OLD_MANIFEST):
                storage.delete(storage.join(self.out, name))
        fs, _ = storage.filesystem(self.out)

        def copy(rel: str) -> None:
            fs.copy_file(
                storage.filesystem(storage.join(staging, rel))[1], storage.filesystem(storage.join(self.out, rel))[1]
            )

        new = [rel for rel in storage.walk_files(staging) if rel not in (MANIFEST, REPLACING)]
        for rel in new:
            copy(rel)
        for stale in set(storage.walk_files(self.out)) - {*new, MANIFEST}:
            storage.delete(storage.join(self.out, stale))
        copy(MANIFEST)  # the last object written
        storage.delete(staging)


def _threads() -> int:
    """The CPUs this process may use: its affinity, and a container's CPU quota (cgroup v2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


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
    return Generation(checkpoint, num, out, address=address, **options).run(address, progress)


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
| temperature | {plan["temperature"]:g} ({_prior_text(plan)}) |
{_filter_row(manifest)}| checkpoint | `{manifest["checkpoint"]}` |
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


def _prior_text(plan: dict[str, Any]) -> str:
    if plan.get("prior", "normal") == "gmm":
        return (
            "z's first latent group from a Gaussian mixture fitted to the training images' codes, each "
            f"component's spread scaled by T; mixture SHA-256 `{plan['prior_sha256'][:12]}`"
        )
    return "z ~ N(0, T^2 I)"


def _filter_row(manifest: dict[str, Any]) -> str:
    found = manifest.get("filter")
    if not found:
        return ""
    rules = []
    if found["min_confidence"]:
        rules.append(
            f"a judge classifier (weights SHA-256 `{found['judge_sha256'][:16]}...`) gave its label (unlabelled: "
            f"any class) probability >= {found['min_confidence']:g}"
        )
    if found["max_copy_distance"]:
        rules.append(
            f"it was farther than {found['max_copy_distance']:g} (pixel L2, [0, 1] units) from every training "
            f"image ({found['copies_dropped']:,} candidates dropped as near-copies)"
        )
    return (
        f"| filter | kept an image only when {' and '.join(rules)}: {found['acceptance_rate']:.1%} of "
        f"{found['candidates']:,} candidates kept; {found['unmet']:,} images are the nearest to passing of "
        f"{found['max_candidates']} candidates |\n"
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
            f"{out}: holds {len(extra)} file(s) that are not this set's (links, or not in {MANIFEST}): "
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
    per_image = png + 40 if plan.format == "hf" else height * width * channels + 24

    def blocks(size: int) -> int:
        return -(-size // block) * block

    need, files = 0, 0
    for shard in shards:
        start, end = plan.shard_range(shard)
        if plan.format == "png":
            need += (end - start) * blocks(png) + blocks(1)  # each file, and the shard's folder
            files += end - start + 1
        else:
            need += blocks((end - start) * per_image + 65536)
            files += 1
        need += blocks(1)  # its progress marker
        files += 1
    need += 2 * blocks(200 * plan.num_shards + 65536)  # the manifest (and its card), written twice
    return need, files + 2


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


# `vae_ray.generate(...)` is the Python API's function (api.py): this module is callable as it.
callable_module(__name__)
