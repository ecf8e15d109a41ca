"""`vae-ray evaluate`: likelihoods and sample quality of a trained model.

Likelihoods run as a Ray Data job: the split's Parquet shards stream
through an actor pool (`LikelihoodScorer`, the model loaded once per actor)
that returns every per-image term; the driver averages them. Posterior
samples and the test-set binarisation are keyed by each image's index, so
the figures do not depend on the number of actors or block sizes.

Sample quality needs the dataset's judge classifier (`vae-ray classifier
train`); without one those keys are null and the summary says how to get it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import judge, storage
from .api import callable_module
from .checkpoint import load_blob, model_from_blob
from .cluster import connect
from .data import decode_images, load_split, read_arrays, read_meta
from .errors import UserError
from .images import to_float, to_uint8
from .keyed_random import binarize, hashed_normals
from .metrics import (
    active_units,
    bits_per_dim,
    frechet_distance,
    inception_score,
    inception_score_splits,
    likelihood_terms,
    precision_recall,
)
from .rundir import RunDir
from .spec import LIKELIHOODS

LIKELIHOOD_KEYS = ("matlab_elbo", "neg_elbo_nats", "nll_iw_nats", "recon_mse", "kl")
QUALITY_KEYS = (
    "fd",
    "fd_real",
    "inception_score",
    "inception_score_mean",
    "inception_score_std",
    "inception_score_real",
    "precision",
    "recall",
    "tstr_accuracy",
)
KEYS = ("matlab_elbo", "neg_elbo_nats", "bits_per_dim", "nll_iw_nats", "recon_mse", "kl", "active_units") + QUALITY_KEYS
ROWS_PER_BATCH = 256
GPU_BATCH_FACTOR = 4  # a GPU actor scores 1,024 images a batch
MAX_NORMALS = 1 << 25  # posterior-sample numbers made at once (about 1.5 GB of temporaries)


class LikelihoodScorer:
    """A Ray Data actor: per-image likelihood terms for batches of the split."""

    def __init__(self, model_blob_ref: list, iw_samples: int, seed: int, threads: int, device: str = "cpu"):
        import ray

        torch.set_num_threads(threads)
        blob = ray.get(model_blob_ref[0])
        self.device = torch.device(device)
        self.model = model_from_blob(blob).to(self.device)
        if self.device.type == "cpu":  # channels-last (transposed) convolutions run about 1.8x faster on CPUs
            self.model = self.model.to(memory_format=torch.channels_last)
        self.shape = blob["dataset"]["shape"]
        self.binarize = blob["config"]["binarize"] and LIKELIHOODS[blob["config"]["loss"]].binarize
        self.iw_samples, self.seed = iw_samples, seed
        self.run_seed = blob["config"]["seed"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices = np.asarray(batch["index"], dtype=np.int64)
        labels = np.asarray(batch["label"], dtype=np.int64)
        x = to_float(decode_images(batch["image"], self.shape)).to(self.device)
        # The run's own seed: the same binary test images its per-epoch figures scored.
        target = binarize(x, self.run_seed, indices) if self.binarize else x
        y = torch.from_numpy(labels).to(self.device) if self.model.num_classes else None
        # On a GPU the posterior samples are made there: the same keyed draws, far faster than numpy's.
        on = self.device if self.device.type == "cuda" else None
        # Rows in groups whose K samples stay under MAX_NORMALS numbers: the
        # draws are keyed by image, so the grouping changes no figure.
        rows = max(1, MAX_NORMALS // (self.iw_samples * self.model.latent_dim))
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(indices), rows):
            part = slice(start, start + rows)
            eps = hashed_normals(self.seed, indices[part], self.iw_samples, self.model.latent_dim, device=on)
            terms = likelihood_terms(self.model, x[part], None if y is None else y[part], target[part], eps)
            for key, value in terms.items():
                parts.setdefault(key, []).append(value.cpu().numpy())
        return {"index": indices, "label": labels, **{k: np.concatenate(v) for k, v in parts.items()}}


class Evaluation:
    """Checks every input up front (nothing runs on bad input), then `run()`."""

    def __init__(
        self,
        checkpoint: str,
        data: str | None = None,
        split: str = "test",
        iw_samples: int = 100,
        samples: int = 10_000,
        limit: int | None = None,
        actors: int | None = None,
        seed: int = 0,
        tstr: bool = False,
        tstr_samples: int = 20_000,
        gpu: bool | None = None,
    ):
        check_options(
            iw_samples=iw_samples,
            samples=samples,
            limit=limit,
            actors=actors,
            seed=seed,
            tstr=tstr,
            tstr_samples=tstr_samples,
        )
        self.blob = load_blob(checkpoint)
        self.config, self.dataset = self.blob["config"], self.blob["dataset"]
        self.data = data or self.config["data"]
        if not self.data:
            raise UserError(f"{checkpoint}: the checkpoint does not name its dataset; pass --data")
        self.meta = read_meta(self.data)
        if split not in self.meta["splits"]:
            raise UserError(f"{self.data}: no split '{split}' (has {', '.join(self.meta['splits'])})")
        if list(self.meta["shape"]) != list(self.dataset["shape"]):
            raise UserError(
                f"{self.data}: images are {tuple(self.meta['shape'])} but the model was trained on "
                f"{tuple(self.dataset['shape'])}"
            )
        if tstr and not self.config["conditional"]:
            raise UserError("--tstr needs a class-conditional model (trained with --conditional)")
        self.checkpoint, self.split, self.iw_samples, self.samples = checkpoint, split, iw_samples, samples
        self.limit, self.actors, self.seed, self.gpu = limit, actors, seed, gpu
        self.tstr, self.tstr_samples = tstr, tstr_samples

    def run(
        self, address: str | None = None, progress: Callable[[str, int, int], None] | None = None
    ) -> dict[str, Any]:
        started = time.time()
        per_image = self.score_likelihoods(address, progress)
        result = summarise(per_image, self.config["loss"], int(np.prod(self.meta["shape"])))
        result.update(self.sample_quality(progress))
        result.update(
            {
                "split": self.split,
                "images": int(len(per_image["index"])),
                "iw_samples": self.iw_samples,
                "scored_on": self.scored_on,
                "checkpoint": self.blob["path"],
                "data": self.meta["root"],
                "loss": self.config["loss"],
                "latent_dim": self.config["latent_dim"],
                "seconds": round(time.time() - started, 2),
            }
        )
        return result

    # -- likelihoods: the Ray Data job ------------------------------------
    def score_likelihoods(self, address, progress) -> dict[str, np.ndarray]:
        import ray

        resources = connect(address, cpus_needed=2, dashboard=False).resources
        total = self.meta["splits"][self.split]["count"]
        if self.limit:
            total = min(total, self.limit)
        gpus = int(resources.get("GPU", 0))
        # auto: GPUs when one is free now (the cluster's may all be training); --gpu waits for them
        use_gpu = int(ray.available_resources().get("GPU", 0)) > 0 if self.gpu is None else self.gpu
        if use_gpu and not gpus:
            raise UserError("--gpu asks for GPU scoring but the cluster has no GPUs")
        # One CPU stays free for Ray Data's Parquet reads: with every CPU held
        # by scoring actors, the reads could never be scheduled. On GPUs: one
        # actor per GPU, on batches large enough to keep it busy.
        rows = ROWS_PER_BATCH * (GPU_BATCH_FACTOR if use_gpu else 1)
        spare = gpus if use_gpu else max(1, int(resources.get("CPU", 2)) - 1)
        pool = max(1, min(self.actors or spare, spare, -(-total // rows)))
        ds = load_split(self.data, self.split, self.meta, first=self.limit)
        if self.limit or len(self.meta["splits"][self.split]["shards"]) < pool:
            # Test splits are often one Parquet file, and a limit may need only
            # one: split the rows so every actor gets work.
            ds = ds.repartition(pool * 2)
        scored = ds.map_batches(
            LikelihoodScorer,
            batch_size=rows,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool),
            # a GPU actor takes a CPU only where one is left for the reads
            num_cpus=1 if not use_gpu or int(resources.get("CPU", 0)) > pool else 0,
            num_gpus=1 if use_gpu else 0,
            fn_constructor_kwargs={
                "model_blob_ref": [ray.put(self.blob)],
                "iw_samples": self.iw_samples,
                "seed": self.seed,
                "threads": 1,
                "device": "cuda" if use_gpu else "cpu",
            },
        )
        self.scored_on = f"{pool} {'GPU' if use_gpu else 'CPU'} actor(s)"
        parts: dict[str, list] = {}
        done = 0
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            for key, value in batch.items():
                parts.setdefault(key, []).append(np.asarray(value))
            done += len(batch["index"])
            if progress:
                progress("likelihood", done, total)
        if not parts:
            raise UserError(f"{self.data}: split '{self.split}' has no images")
        return {key: np.concatenate(values) for key, values in parts.items()}

    # -- sample quality: the judge's feature space ------------------------
    @functools.cached_property
    def model(self):
        """The model on this process, for drawing samples (built once)."""
        return model_from_blob(self.blob)

    def sample_quality(self, progress) -> dict[str, Any]:
        empty = {key: None for key in QUALITY_KEYS}
        if self.samples == 0:
            return empty | {"judge": "not asked (--samples 0)"}
        found = judge.load(self.data, self.meta)
        if found is None:
            return empty | {"judge": f"none: run `vae-ray classifier train --data {self.data}` for sample quality"}
        model, info = found
        all_test, test_labels = read_arrays(self.data, "test", meta=self.meta)
        train, _ = read_arrays(self.data, "train", meta=self.meta)
        n = min(self.samples, len(all_test), len(train))
        rng = np.random.default_rng(self.seed)
        test = all_test[rng.choice(len(all_test), n, replace=False)]
        train = train[rng.choice(len(train), n, replace=False)]
        if progress:
            progress("sample quality", 0, n)
        fake, _ = self.draw(n, self.seed)
        f_test, p_test = judge.features_and_probs(model, test)
        f_train, _ = judge.features_and_probs(model, train)
        f_fake, p_fake = judge.features_and_probs(model, fake)
        precision, recall = precision_recall(f_test, f_fake, k=3)
        is_mean, is_std = inception_score_splits(p_fake)
        result = {
            "fd": frechet_distance(f_fake, f_test),
            "fd_real": frechet_distance(f_train, f_test),
            "inception_score": inception_score(p_fake),
            "inception_score_real": inception_score(p_test),
            "inception_score_mean": is_mean,
            "inception_score_std": is_std,
            "precision": precision,
            "recall": recall,
            "tstr_accuracy": None,
            "quality_samples": n,
            "judge": f"{info['dataset']} classifier, test accuracy {info['test_accuracy']:.4f}",
        }
        if progress:
            progress("sample quality", n, n)
        if self.tstr:
            result["tstr_accuracy"] = self.train_on_synthetic(all_test, test_labels, progress)
        return result

    def draw(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """n generated uint8 images (balanced labels for a conditional model)."""
        model = self.model
        gen = torch.Generator().manual_seed(seed)
        labels = np.arange(n) % self.dataset["num_classes"] if model.num_classes else np.zeros(n, np.int64)
        out = []
        for start in range(0, n, 1000):
            y = torch.from_numpy(labels[start : start + 1000]) if model.num_classes else None
            out.append(to_uint8(model.sample(min(1000, n - start), y, generator=gen)))
        return np.concatenate(out), labels

    def train_on_synthetic(self, test: np.ndarray, test_labels: np.ndarray, progress) -> float:
        """Train-on-Synthetic-Test-on-Real: a fresh judge fitted on generated
        labelled images only, scored on the real test split."""
        images, labels = self.draw(self.tstr_samples, self.seed + 1)

        def report(step: int, steps: int, loss: float) -> None:
            if progress:
                progress("train on synthetic", step, steps)

        model = judge.fit(images, labels, self.dataset["num_classes"], epochs=3, seed=self.seed, progress=report)
        return judge.accuracy(model, test, test_labels)


def check_options(
    iw_samples: int = 100,
    samples: int = 10_000,
    limit: int | None = None,
    actors: int | None = None,
    seed: int = 0,
    tstr: bool = False,
    tstr_samples: int = 20_000,
    **_: Any,
) -> None:
    """Every check that needs no files: run before anything else, and before --submit."""
    if not 1 <= iw_samples <= 100_000:
        raise UserError(f"--iw-samples must be between 1 and 100000 (got {iw_samples})")
    if not 0 <= samples <= 1_000_000:
        raise UserError(f"--samples must be between 0 and 1000000 (got {samples})")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    if actors is not None and not 1 <= actors <= 10_000:
        raise UserError(f"--actors must be between 1 and 10000 (got {actors})")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be between 0 and {2**32 - 1} (got {seed})")
    if tstr and not 100 <= tstr_samples <= 10_000_000:
        raise UserError(f"--tstr-samples must be at least 100 (got {tstr_samples})")


def summarise(per_image: dict[str, np.ndarray], loss: str, dims: int) -> dict[str, Any]:
    """Means of the per-image terms, bits/dim and active units."""
    result: dict[str, Any] = {key: float(np.mean(per_image[key], dtype=np.float64)) for key in LIKELIHOOD_KEYS}
    result["bits_per_dim"] = bits_per_dim(result["nll_iw_nats"], loss, dims)
    result["active_units"] = active_units(per_image["mu"])
    return result


def save(result: dict[str, Any], checkpoint: str) -> str | None:
    """Keep the result beside a run (RUN/evaluation.json) when given a run folder."""
    if str(checkpoint).startswith("hf://"):
        return None
    run = RunDir(checkpoint)
    if run.latest() is None:
        return None
    path = run.path("evaluation.json")
    try:
        # The run's writer (a training run, its search, another evaluate) holds its lock.
        with run.lock("vae-ray evaluate"):
            storage.write_json(path, result)
    except UserError as exc:
        storage.warn_user(f"not saved into the run: {exc}")
        return None
    return path


# `vae_ray.evaluate(...)` is the Python API's function (api.py): this module is callable as it.
callable_module(__name__)
