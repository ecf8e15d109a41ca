"""Decoding a generated set's shards: `ShardWriter` loads the model once,
then decodes whole shards (a Ray Data actor, or called in the command's own
process) and hands them to shardstore to encode and write. Image i depends
only on the checkpoint, the seed, i and its label (see genplan.py)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch

from .checkpoint import model_from_blob
from .errors import UserError
from .genplan import (
    CANDIDATE_STRIDE,
    FILTER_KEYS,
    MAX_CANDIDATES,
    PIXEL_LADDER,
    Plan,
    class_folders,
    labels_for,
    shard_files,
)
from .images import to_float, to_uint8, to_uint8_tensor
from .shardstore import store_shard

AUTO_PIXEL_VALUES = 2_000_000  # pixel values each side of --pixel-temperature auto's comparison


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
        self.thresholds = self.plan.confidence_thresholds()  # --min-confidence auto: one per class
        self.reference = None  # the training split's pixels, for --max-copy-distance
        if self.plan.max_copy_distance:
            held = model_blob["reference"]
            self.reference = torch.from_numpy(held.reshape(len(held), -1)).to(self.device).float().div_(255.0)
        self.filtered: dict[int, dict[str, int]] = {}  # shard -> candidates, images none passed, copies dropped
        self.mixture = None  # --prior gmm: the fitted mixture the plan names
        self.scales = None  # --group-temperatures: each number of z's factor
        if self.plan.group_temperatures:
            from .prior import group_scales
            from .spec import ModelSpec

            groups = ModelSpec.from_config(model_blob["config"], model_blob["dataset"]).groups
            self.scales = group_scales(groups, self.plan.group_temperatures)
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
            logits = self.model.decode(z[c : c + size], part)
            pixels.append(to_uint8_tensor(self.model.mean_image(logits, self.plan.pixel_temperature)))
        return torch.cat(pixels).cpu().numpy(), np.concatenate(labels)

    @torch.no_grad()
    def closest_pixel_temperature(self, real: np.ndarray) -> tuple[float, dict[float, float]]:
        """--pixel-temperature auto: of PIXEL_LADDER, the temperature whose
        images (the plan's first candidates, as many as `real` holds: see
        auto_pixel_images; whatever --num is) have pixel values distributed
        most like the training images `real`: the mean
        distance between 201 quantiles, in [0, 1] units. Decoded chunk by
        chunk into counts of the 256 values, so memory stays one chunk's.
        Deterministic given the plan and `real`; a tie keeps the higher
        temperature, the one nearer the plain mean."""
        plan, model = self.plan, self.model
        n = len(real)
        counts = {t: np.zeros(256, dtype=np.int64) for t in PIXEL_LADDER}
        conditional = bool(model.num_classes)
        for first in range(0, n, plan.chunk):
            idx = np.arange(first, min(first + plan.chunk, n))
            labels = labels_for(plan, idx, len(self.classes))
            z = torch.from_numpy(self._latents(idx, labels if conditional else None)).to(self.device)
            y = torch.from_numpy(labels).to(self.device) if conditional else None
            logits = model.decode(z, y).float()
            for t in PIXEL_LADDER:
                pixels = to_uint8_tensor(torch.sigmoid(logits / t)).cpu().numpy()
                counts[t] += np.bincount(pixels.reshape(-1), minlength=256)
        target = value_quantiles(np.bincount(real.reshape(-1), minlength=256))
        distances = {t: round(float(np.abs(value_quantiles(c) - target).mean()) / 255.0, 6) for t, c in counts.items()}
        return min(PIXEL_LADDER, key=lambda t: distances[t]), distances

    def _latents(self, keys: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
        from .prior import draw_latents

        plan = self.plan
        return draw_latents(
            plan.seed, keys, self.model.latent_dim, plan.temperature, self.scales, self.mixture, classes
        )

    def _draw(self, keys: np.ndarray, y: torch.Tensor | None) -> np.ndarray:
        z = self._latents(keys, y.cpu().numpy() if y is not None else None)
        z = torch.from_numpy(z).to(self.device)
        return to_uint8(self.model.mean_image(self.model.decode(z, y), self.plan.pixel_temperature))

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
            score = np.minimum(score, self._confidence_ratio(images, labels))
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

    def _confidence_ratio(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The judge's probability of each image's label (of its likeliest class
        when unlabelled) over that class's threshold: >= 1 passes."""
        probs = torch.softmax(self.judge(to_float(images).to(self.device))[1].float(), dim=1).cpu().numpy()
        read = probs.argmax(1) if labels[0] < 0 else labels
        confidence = probs[np.arange(len(read)), read]
        if self.thresholds is None:
            return confidence / self.plan.min_confidence
        return confidence / self.thresholds[read]

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
        classes = self.classes if self.plan.layout.named_classes and self.plan.labels != "none" else None
        names = shard_files(self.plan, shard, self.folders)
        return self.root, self.plan.format, names, images, labels, np.arange(start, end), classes, marker


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


def auto_pixel_images(shape) -> int:
    """How many images --pixel-temperature auto compares on each side: 2,000,
    or fewer large ones (AUTO_PIXEL_VALUES pixel values in all)."""
    return max(1, min(2000, AUTO_PIXEL_VALUES // int(np.prod(shape))))


def value_quantiles(counts: np.ndarray, points: int = 201) -> np.ndarray:
    """The 0..1 quantiles (`points` of them) of 8-bit values given their
    counts: the lowest value whose cumulative share reaches each."""
    cumulative = np.cumsum(counts) / counts.sum()
    return np.searchsorted(cumulative, np.linspace(0, 1, points), side="left").astype(np.float64)
