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

Where the pieces live: the run's identity and image i (genplan.py), decoding
a shard (decoder.py), encoding and writing it (shardstore.py, formats.py),
the destination's promises (destination.py, swap.py), the shard-by-shard
life shared with `encode` (sharded.py), the dataset card (card.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from . import storage
from .api import callable_module
from .card import dataset_card
from .checkpoint import load_blob
from .decoder import ShardWriter
from .destination import (
    CARD,
    FORMAT_ID,
    MANIFEST,
    OLD_MANIFEST,
    check_space,
    clean_leftovers,
    completed_shards,
    destination_state,
    foreign_in_set,
    read_set,
    remove_partial,
    swap_in,
    write_root,
)
from .errors import UserError
from .genplan import (
    AUTO_CONFIDENCE_IMAGES,
    COPY_PERCENTILE,
    MAX_CANDIDATES,
    MAX_REFERENCE_BYTES,
    PIXEL_LADDER,
    GenerateOptions,
    auto_class_confidences,
    check_model_options,
    class_folders,
    confidence_values,
    filter_fields,
    make_plan,
)
from .sharded import ShardedJob


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
        check_model_options(self.blob, o.group_temperatures, o.pixel_temperature)  # before a fit or a read
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
            o.group_temperatures,
            1.0 if o.pixel_temperature == "auto" else o.pixel_temperature,
        )
        self.pixel_distances: dict[float, float] | None = None  # --pixel-temperature auto's comparison
        chosen = self._earlier_choices(o)
        if chosen is not None:
            self.plan = replace(self.plan, **chosen)
        elif o.pixel_temperature == "auto":
            self.plan = replace(self.plan, pixel_temperature=self._auto_pixel_temperature(o.data))
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

    def _earlier_choices(self, o: GenerateOptions) -> dict[str, Any] | None:
        """What each `auto` chose when the set at --out began, when that plan is
        this one in every other field: a rerun or a resume finds the set it
        started, whatever another machine's rounding would choose now (and
        --pixel-temperature auto needs no decoding)."""
        auto = [name for name in ("pixel_temperature", "max_copy_distance") if getattr(o, name) == "auto"]
        auto += ["min_confidence", "class_confidences"] if o.min_confidence == "auto" else []
        if not auto:
            return None
        try:
            existing = read_set(self.out)
        except UserError:
            return None  # destination_state says what is wrong with it
        if existing is None:
            return None
        earlier = existing[1].plan
        chosen = {name: getattr(earlier, name) for name in auto}
        if "pixel_temperature" in chosen and earlier.pixel_temperature not in PIXEL_LADDER:
            return None
        if "max_copy_distance" in chosen and not earlier.max_copy_distance:
            return None
        if "class_confidences" in chosen and not earlier.class_confidences:
            return None
        return chosen if replace(self.plan, **chosen) == earlier else None

    def _auto_pixel_temperature(self, data: str | None) -> float:
        """--pixel-temperature auto, against the training images of `data`
        (default: the run's dataset), of the set's one class with --label."""
        import torch

        from .data import read_arrays, read_meta
        from .decoder import auto_pixel_images

        blob = self.blob
        data = data or blob["config"].get("data")
        if not data:
            raise UserError("--pixel-temperature auto compares with the model's training images: pass --data")
        meta = read_meta(data)
        if list(meta["shape"]) != list(blob["dataset"]["shape"]):
            raise UserError(f"{data}: holds other image shapes than the model {blob['path']} takes")
        wanted = auto_pixel_images(meta["shape"])
        label = int(self.plan.labels) if self.plan.labels not in ("none", "per-class") else None
        real, labels = read_arrays(data, "train", limit=None if label is not None else wanted, meta=meta)
        if label is not None:
            real = real[labels == label]
        if not len(real):
            raise UserError(f"{data}: holds no training images to compare with for --pixel-temperature auto")
        # The first candidates, unfiltered: no judge or training split in this decoder.
        light = replace(
            self.plan,
            min_confidence=0.0,
            judge_sha256="",
            class_confidences="",
            max_copy_distance=0.0,
            reference_sha256="",
        )
        threads = torch.get_num_threads()
        try:
            writer = ShardWriter(self.blob, **{**self._writer_options("", "cpu", threads), "plan": asdict(light)})
            chosen, self.pixel_distances = writer.closest_pixel_temperature(real[:wanted])
        finally:
            torch.set_num_threads(threads)
        return chosen

    def _load_filters(
        self, data: str, min_confidence: float | str, max_copy_distance: float | str, judge_seed: int
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
            judge, filters["judge_sha256"] = self._load_judge(data, meta, judge_seed)
            if min_confidence == "auto":
                by_reading = not self.blob["config"]["conditional"]  # an unlabelled set: the judge's reading
                filters["class_confidences"] = self._auto_confidences(judge, data, meta, by_reading)
                min_confidence = min(confidence_values(filters["class_confidences"]))
            filters["min_confidence"] = float(min_confidence)
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

    @staticmethod
    def _auto_confidences(judge: Any, data: str, meta: dict[str, Any], by_reading: bool) -> str:
        """--min-confidence auto: per class, the filtering judge's probability of
        the label that 95% of that class's real test images reach. For an
        unlabelled set (`by_reading`), whose images are judged by the class the
        judge reads, the same of the real images it reads as that class."""
        from .data import read_arrays
        from .judge import features_and_probs

        test, labels = read_arrays(data, "test", limit=AUTO_CONFIDENCE_IMAGES, meta=meta)
        if not len(test):
            raise UserError(f"{data}: --min-confidence auto needs real test images; give a probability")
        probs = features_and_probs(judge, test)[1]
        if by_reading:
            labels = probs.argmax(1)
        return auto_class_confidences(probs[np.arange(len(labels)), labels], labels, len(meta["classes"]))

    def _load_judge(self, data: str, meta: dict[str, Any], seed: int) -> tuple[Any, str]:
        """The filtering judge (a classifier of the model's dataset and classes,
        of a seed other than the evaluation judge's), into the blob the
        writers get; returns it and the SHA-256 of its weights."""
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
        return model, judge.weights_digest(data, seed)

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
        if self.plan.layout.card:
            storage.write_text(storage.join(root, CARD), dataset_card(manifest))

    # -- files --------------------------------------------------------------
    def _root(self) -> str:
        return write_root(self.out, self.plan, self.state)

    def _check_space(self, root: str, done: dict[int, dict]) -> None:
        check_space(self.out, root, self.plan, self.blob["dataset"]["shape"], done)

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
            **({"filter": filter_fields(plan)} if plan.filtered else {}),
            "checkpoint_sha256": blob["sha256"],
            "class_folders": dict(zip(classes, class_folders(classes), strict=True)) if plan.labels != "none" else {},
            "config": blob["config"],
            "dataset": blob["dataset"],
            "evaluation": blob["evaluation"] if blob.get("evaluation") is not None else _evaluation_of(blob["path"]),
        }

    def _remove_partial(self, root: str, shard: int) -> None:
        remove_partial(root, self.plan, shard, self.blob["dataset"]["classes"])

    def _clean_leftovers(self, root: str) -> None:
        clean_leftovers(root, self.plan, self.blob["dataset"]["classes"])

    def _swap_in(self, staging: str) -> None:
        swap_in(staging, self.out)


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


# `vae_ray.generate(...)` is the Python API's function (api.py): this module is callable as it.
callable_module(__name__)
