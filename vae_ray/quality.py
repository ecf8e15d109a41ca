"""`vae-ray evaluate-set`: what a generated set is worth, measured against real data.

    vae-ray evaluate-set GEN --data REAL [--out DIR]

GEN is any set `vae-ray generate` wrote (PNG, Parquet, NPZ or Hugging Face
Parquet; local or s3://). It is verified against its manifest (every
checksum) before an image is read. REAL is the prepared dataset the model
learnt from; its judge classifier (`vae-ray classifier train`) supplies the
feature space. The figures, each beside the same figure for real images
where one exists:

- Frechet distance to the real test images in the judge's features, and
  between real train and real test images (`fd_real`): their ratio says how
  far the set is from "as good as more real data";
- precision and recall (Kynkaanniemi et al. 2019): how much of the set looks
  real, and how much of the real variety the set covers;
- Inception Score in the judge's features (set and real test);
- near-copies: each generated image's distance to its nearest training
  image, in pixels and in judge features, against the distances of the real
  test images to the training set. An image closer than 99% of real test
  images are (`--copy-percentile 1`) is a near-copy; real test images have 1%
  of them by construction, so a set with more copies the training data;
- for labelled sets, TSTR: a fresh classifier of the judge's architecture
  trained on the set alone and scored on the real test split, against the
  same classifier trained on as many real training images (TRTR), and the
  mixing curve: real:synthetic training mixes from all real to all synthetic
  (each classifier trains for `--steps` batches of 128, 450 by default: the
  judge's 3 epochs of 20,000 images).

The classifiers of TSTR and the mixing curve are trained with a seed other
than the judge's, so the figures never reward a set for pleasing the judge.
With `--out DIR`, DIR/quality.json holds the figures and DIR/samples.png
(DIR/samples_per_class.png for labelled sets) the set's first images.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import judge, storage
from .errors import UserError

MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)  # the synthetic share of the training images
MAX_IMAGES = 1_000_000
STEPS = 450  # optimizer steps of each TSTR/TRTR classifier: the judge's 3 epochs of 20,000 images


# ---------------------------------------------------------------------------
# Reading a generated set back
# ---------------------------------------------------------------------------
def read_generated(
    uri: str, limit: int | None = None, address: str | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A finished set's images (uint8 NHWC), labels (-1 where the set has
    none) and manifest. The set is checked first (complete, nothing foreign
    in its folder), and each shard against its checksum as it is read: by
    this process, or with a cluster named by a Ray Data job, shards read and
    decoded in parallel where the cluster has CPUs. With a limit only the
    shards that hold the first `limit` images are read."""
    from .destination import check_finished
    from .genplan import shard_files

    root, manifest, layout = check_finished(uri)
    shape = tuple(manifest["dataset"]["shape"])
    shards, planned = [], 0
    for entry in sorted(manifest["shards"], key=lambda e: e["shard"]):
        if limit is not None and planned >= limit:
            break
        start, end = layout.plan.shard_range(entry["shard"])
        names = shard_files(layout.plan, entry["shard"], list(layout.folders))
        shards.append({"entry": entry, "names": names, "start": start, "end": end})
        planned += end - start
    if not shards:
        raise UserError(f"{uri}: the set holds no images")
    first = shards[0]["start"]
    images = np.empty((planned, *shape), dtype=np.uint8)
    if address:
        parts = _read_on_ray(root, layout.plan.format, shape, shards, address)
    else:
        parts = (_read_one(root, layout.plan.format, shape, shard) for shard in shards)
    for index, part in parts:
        images[index - first] = part
    labels = np.array([layout.label_of(first + i) for i in range(planned)], dtype=np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels, manifest


def _read_one(root: str, fmt: str, shape: tuple[int, ...], shard: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(indices, images) of one shard's images, checked against its checksum."""
    from .destination import read_shard

    part = _decode_shard(fmt, read_shard(root, shard["names"], shard["entry"]), shape)
    expected = shard["end"] - shard["start"]
    if len(part) != expected:
        raise UserError(f"{root}: shard {shard['entry']['shard']} holds {len(part)} images, not {expected}")
    return np.arange(shard["start"], shard["end"]), part


def _read_shards(batch: dict[str, np.ndarray], root: str, fmt: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A Ray Data task: the shards of a batch (one, described as JSON), read, checked and decoded."""
    if not storage.is_remote(root) and not os.path.isdir(root):  # checked on the driver: not on this node
        import socket

        raise UserError(
            f"{root}: is not on the node that read it ({socket.gethostname()}); a set the cluster reads "
            f"must be where every node sees it (s3://, or a folder shared by every node)"
        )
    read = [_read_one(root, fmt, shape, json.loads(text)) for text in batch["shard"]]
    return {"index": np.concatenate([i for i, _ in read]), "image": np.concatenate([p for _, p in read])}


def _read_on_ray(root: str, fmt: str, shape: tuple[int, ...], shards: list[dict], address: str):
    """(indices, images) batches of the shards, read by a Ray Data job: one task per shard."""
    import ray

    from .cluster import connect
    from .errors import user_error_in

    connect(address, cpus_needed=1, dashboard=False)
    items = [{"shard": json.dumps(shard)} for shard in shards]
    read = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_shards, fn_kwargs={"root": root, "fmt": fmt, "shape": shape}, batch_size=1, num_cpus=1
    )
    try:
        for batch in read.iter_batches(batch_size=None, batch_format="numpy"):
            yield np.asarray(batch["index"]), np.asarray(batch["image"])
    except Exception as exc:  # a shard's UserError reaches here wrapped by Ray
        cause = user_error_in(exc)
        if cause is None:
            raise
        raise cause from None


def _decode_shard(fmt: str, blobs: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    def png(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            array = np.asarray(img.convert("L" if shape[2] == 1 else "RGB"), dtype=np.uint8)
        return array.reshape(shape)

    if fmt == "png":
        return np.stack([png(b) for b in blobs])
    if fmt == "npz":
        with np.load(io.BytesIO(blobs[0]), allow_pickle=False) as held:
            return np.asarray(held["images"], dtype=np.uint8).reshape(-1, *shape)
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(blobs[0]), columns=["image"])
    if fmt == "hf":
        return np.stack([png(cell["bytes"]) for cell in table.column("image").to_pylist()])
    from .data import decode_images

    return decode_images(table.column("image"), shape).copy()


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------
def nearest_distances(queries: np.ndarray, references: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Each query row's Euclidean distance to its nearest reference row."""
    refs = torch.from_numpy(np.ascontiguousarray(references, dtype=np.float32))
    out = []
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[start : start + chunk], dtype=np.float32))
        best = torch.full((len(q),), float("inf"))
        for r0 in range(0, len(refs), 8192):
            best = torch.minimum(best, torch.cdist(q, refs[r0 : r0 + 8192]).min(dim=1).values)
        out.append(best)
    return torch.cat(out).numpy().astype(np.float64)


def near_copies(fake: np.ndarray, test: np.ndarray, train: np.ndarray, percentile: float) -> dict[str, float]:
    """How close the set sits to the training data, against real test images:
    the threshold is the `percentile`-th percentile of the test images'
    nearest-training distances, and a near-copy is a generated image closer
    than that (real test images: `percentile`% by construction)."""
    d_fake, d_test = nearest_distances(fake, train), nearest_distances(test, train)
    threshold = float(np.percentile(d_test, percentile))
    return {
        "threshold": threshold,
        "fraction": float(np.mean(d_fake < threshold)),
        "fraction_real": float(np.mean(d_test < threshold)),
        "median_distance": float(np.median(d_fake)),
        "median_distance_real": float(np.median(d_test)),
    }


def pixel_rows(images: np.ndarray) -> np.ndarray:
    """uint8 images -> one float row each, pixels in [0, 1]: the space of pixel distances."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def evaluate_set(
    gen: str,
    data: str,
    *,
    limit: int | None = None,
    seed: int = 0,
    copy_percentile: float = 1.0,
    tstr: bool = True,
    mixing: bool = True,
    steps: int = STEPS,
    out: str | None = None,
    card: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """The set's figures. With a cluster named (`address` or RAY_ADDRESS), a
    Ray Data job reads the set (one task per shard) and the TSTR, TRTR and
    mixing classifiers train there at once, one Ray task each; otherwise
    both happen in this process."""
    from .cluster import check_address, given_address
    from .data import dataset_read_lock, read_arrays, read_meta
    from .metrics import frechet_distance, inception_score, precision_recall

    check_options(limit, seed, copy_percentile, steps)
    check_address(address)
    address = given_address(address)
    if card:  # refused before the work, like --out
        _check_card(gen)
    if out:  # refused before an hour of work, and again under its lock before the write
        from .swap import check_destination

        check_destination(storage.check_uri(out), _not_quality_files, WHAT)
    say = progress or (lambda *_: None)
    started = time.time()
    meta = read_meta(data)
    with dataset_read_lock(data):
        found = judge.load(data, meta)
        if found is None:
            raise UserError(f"{data}: no judge classifier; run `vae-ray classifier train --data {data}` first")
        model, info = found
        say("reading the set", 0, 1)
        fake, fake_labels, manifest = read_generated(gen, limit, address)
        if list(fake.shape[1:]) != list(meta["shape"]):
            raise UserError(f"{gen}: images are {fake.shape[1:]} but {data} holds {tuple(meta['shape'])}")
        test, test_labels = read_arrays(data, "test", meta=meta)
        train, train_labels = read_arrays(data, "train", meta=meta)
    n = len(fake)
    rng = np.random.default_rng(seed)
    test_pick = rng.choice(len(test), min(n, len(test)), replace=False)
    train_pick = rng.choice(len(train), min(n, len(train)), replace=False)
    say("judge features", 0, 3)
    f_fake, p_fake = judge.features_and_probs(model, fake)
    f_test, p_test = judge.features_and_probs(model, test[test_pick])
    f_train_all, _ = judge.features_and_probs(model, train)  # once: the sample here, every image for near-copies
    f_train_n = f_train_all[train_pick]
    say("judge features", 3, 3)
    precision, recall = precision_recall(f_test, f_fake, k=3)
    precision_real, recall_real = precision_recall(f_test, f_train_n, k=3)
    fd, fd_real = frechet_distance(f_fake, f_test), frechet_distance(f_train_n, f_test)
    result: dict[str, Any] = {
        "set": storage.check_uri(gen),
        "data": meta["root"],
        "images": n,
        "checkpoint": manifest.get("checkpoint"),
        "fd": fd,
        "fd_real": fd_real,
        "fd_ratio": fd / fd_real if fd_real > 0 else None,
        "precision": precision,
        "recall": recall,
        "precision_real": precision_real,
        "recall_real": recall_real,
        "inception_score": inception_score(p_fake),
        "inception_score_real": inception_score(p_test),
        "judge": f"{info['dataset']} classifier, test accuracy {info['test_accuracy']:.4f}",
        "filter": manifest.get("filter"),
        "read_by": "a Ray Data job, one task per shard" if address else "this process",
    }
    if (manifest.get("filter") or {}).get("judge_sha256") == judge.weights_digest(data):
        # generate --judge-seed 0: the set was filtered by the very network that scores it
        result["warning"] = (
            "the set was filtered by this judge: its feature figures flatter it (filter with --judge-seed 1)"
        )
    say("near-copies", 0, 2)
    result["near_copies_pixels"] = near_copies(
        pixel_rows(fake), pixel_rows(test[test_pick]), pixel_rows(train), copy_percentile
    )
    say("near-copies", 1, 2)
    result["near_copies_features"] = near_copies(f_fake, f_test, f_train_all, copy_percentile)
    result["copy_percentile"] = copy_percentile
    say("near-copies", 2, 2)
    labelled = bool((fake_labels >= 0).all()) and meta["num_classes"] > 1
    result["tstr_accuracy"] = result["trtr_accuracy"] = result["tstr_ratio"] = None
    result["mixing"] = None
    if tstr and labelled:
        result.update(
            _train_on_synthetic(
                fake,
                fake_labels,
                train,
                train_labels,
                train_pick,
                test,
                test_labels,
                meta,
                seed,
                steps,
                mixing,
                say,
                address,
            )
        )
    elif tstr:
        result["tstr_note"] = "the set has no labels (a class-conditional model's set has)"
    result["seconds"] = round(time.time() - started, 1)
    if out:
        _write(out, result, fake, fake_labels, meta)
        result["out"] = storage.check_uri(out)
    if card:
        result["card"] = _into_card(gen, result)
    return result


# ---------------------------------------------------------------------------
# --card: the figures in the set's own dataset card
# ---------------------------------------------------------------------------
CARD_START, CARD_END = "<!-- vae-ray evaluate-set -->", "<!-- /vae-ray evaluate-set -->"


def _check_card(gen: str) -> None:
    from .destination import read_set

    found = read_set(storage.check_uri(gen))
    fmt = found[0]["plan"]["format"] if found else None
    if found is None or not found[1].plan.layout.card:
        raise UserError(
            f"{gen}: --card writes into a Hugging Face set's dataset card (README.md); "
            f"this is {'not a generated set' if fmt is None else f'a {fmt} set, which has none'}"
        )


def _into_card(gen: str, result: dict[str, Any]) -> str:
    """Put the figures into the set's README.md, in place of earlier ones,
    under the set's lock (the card is the set's own file, outside its checksums)."""
    from .destination import CARD, read_set

    root = storage.check_uri(gen)
    with storage.Lock(root, "vae-ray evaluate-set --card"):
        found = read_set(root)
        if found is None or found[0]["status"] != "complete" or not found[1].plan.layout.card:
            raise UserError(f"{gen}: changed while it was evaluated; run evaluate-set again")
        path = storage.join(root, CARD)
        text = storage.read_bytes(path).decode() if storage.is_file(path) else ""
        if CARD_START in text and CARD_END in text.split(CARD_START, 1)[1]:
            before, rest = text.split(CARD_START, 1)
            text = before.rstrip("\n") + "\n" + rest.split(CARD_END, 1)[1].lstrip("\n")
        storage.write_text(path, text.rstrip("\n") + "\n\n" + card_section(result) + "\n")
    return path


def card_section(result: dict[str, Any]) -> str:
    """The figures of `vae-ray evaluate-set` as a dataset-card section."""

    def f(value: Any, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    pixels, features = result["near_copies_pixels"], result["near_copies_features"]
    tstr = result.get("tstr_ratio")
    rows = [
        (
            "TSTR / TRTR (a classifier trained on the set, on real test images)",
            f"{f(tstr, 3)} ({f(result.get('tstr_accuracy'))} / {f(result.get('trtr_accuracy'))})"
            if tstr is not None
            else "-",
            "1",
        ),
        ("precision (judge features)", f(result["precision"], 3), f(result["precision_real"], 3)),
        ("recall (judge features)", f(result["recall"], 3), f(result["recall_real"], 3)),
        (
            "Frechet distance to real test images",
            f"{f(result['fd'], 3)} ({f(result['fd_ratio'], 1)}x real train's)",
            f(result["fd_real"], 3),
        ),
        ("Inception Score", f(result["inception_score"], 3), f(result["inception_score_real"], 3)),
        (
            f"near-copies: closer to a training image than {result['copy_percentile']:g}% of real test images, "
            "pixels / features",
            f"{pixels['fraction']:.2%} / {features['fraction']:.2%}",
            f"{pixels['fraction_real']:.2%} / {features['fraction_real']:.2%}",
        ),
    ]
    table = "\n".join(f"| {name} | {value} | {real} |" for name, value, real in rows)
    return f"""{CARD_START}
## Quality against real data

Measured by `vae-ray evaluate-set` on {result["images"]:,} images of this set
against `{result["data"]}` ({result["judge"]}), {time.strftime("%Y-%m-%d")}.

| figure | this set | real images |
|---|---|---|
{table}
{CARD_END}"""


def _train_on_synthetic(
    fake, fake_labels, train, train_labels, train_pick, test, test_labels, meta, seed, steps, mixing, say, address
) -> dict[str, Any]:
    """TSTR, TRTR at the same size, and the mixing curve. Classifiers get the
    seed `seed + 1`: never the judge's own (0 by default)."""
    n, classes = len(fake), meta["num_classes"]
    real, real_labels = train[train_pick], train_labels[train_pick]
    shares = MIXES if mixing else (0.0, 1.0)
    # A number of steps, not epochs: a small set's classifiers see it more
    # often, or TRTR itself would be an undertrained figure.
    epochs = math.ceil(steps * judge.BATCH / n)
    mixes = []
    for share in shares:
        k = int(round(share * n))
        mixes.append(
            (np.concatenate([fake[:k], real[: n - k]]), np.concatenate([fake_labels[:k], real_labels[: n - k]]))
        )
    title = "train on mixes" if mixing else "train on synthetic"
    fit = (classes, epochs, seed + 1)
    if address is None:
        accuracies = []
        for step, (images, labels) in enumerate(mixes):
            say(title, step, len(mixes))
            accuracies.append(fit_and_score(images, labels, *fit, test, test_labels))
    else:
        accuracies = _fit_on_ray(mixes, fit, test, test_labels, address, lambda done: say(title, done, len(mixes)))
    say(title, len(mixes), len(mixes))
    curve = [{"synthetic_share": share, "accuracy": acc} for share, acc in zip(shares, accuracies, strict=True)]
    trtr, tstr = curve[0]["accuracy"], curve[-1]["accuracy"]
    return {
        "tstr_accuracy": tstr,
        "trtr_accuracy": trtr,
        "tstr_ratio": tstr / trtr if trtr > 0 else None,
        "mixing": curve if mixing else None,
        "classifier_epochs": epochs,
    }


def fit_and_score(images, labels, classes: int, epochs: int, seed: int, test, test_labels) -> float:
    """A classifier of the judge's architecture trained on (images, labels): its real test accuracy."""
    return judge.accuracy(judge.fit(images, labels, classes, epochs=epochs, seed=seed), test, test_labels)


def _fit_on_ray(mixes, fit, test, test_labels, address: str, say: Callable[[int], None]) -> list[float]:
    """One Ray task per classifier, one CPU each, all at once on the cluster."""
    import ray

    from . import cluster as clusters

    clusters.connect(address, dashboard=False)
    test_ref = ray.put((test, test_labels))
    task = ray.remote(num_cpus=1)(tstr_classifier)
    refs = [task.remote(images, labels, *fit, test_ref) for images, labels in mixes]
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=1)
        say(len(refs) - len(pending))
    return [float(v) for v in ray.get(refs)]


def tstr_classifier(images, labels, classes, epochs, seed, test_and_labels) -> float:
    """The Ray task: one classifier trained and scored."""
    test, test_labels = test_and_labels
    return fit_and_score(images, labels, classes, epochs, seed, test, test_labels)


def _write(out: str, result: dict[str, Any], fake: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> None:
    """OUT/quality.json and the set's first images, as a whole-folder output."""
    import json
    import tempfile
    from pathlib import Path

    from .plots import save_grid
    from .swap import check_destination, publish_folder, settle_swap

    target = storage.check_uri(out)
    with storage.Lock(target, "vae-ray evaluate-set"), tempfile.TemporaryDirectory() as tmp:
        settle_swap(target, _not_quality_files)
        check_destination(target, _not_quality_files, WHAT)
        folder = Path(tmp) / "quality"
        folder.mkdir()
        (folder / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
        save_grid(fake[:64], folder / "samples.png", cols=8)
        if (labels >= 0).all() and meta["num_classes"] > 1:
            rows = [np.flatnonzero(labels == k)[:8] for k in range(min(meta["num_classes"], 20))]
            picks = np.concatenate([r for r in rows if len(r)])
            save_grid(fake[picks], folder / "samples_per_class.png", cols=8)
        if result.get("mixing"):
            _mixing_curve(result, folder / "mixing.png")
        publish_folder(folder, target)


def _mixing_curve(result: dict[str, Any], path) -> None:
    """Test accuracy against the synthetic share of the training images (0: TRTR, 1: TSTR)."""
    from .plots import metric_by_setting

    curve = result["mixing"]
    metric_by_setting(
        [f"{m['synthetic_share']:.0%}" for m in curve],
        {"accuracy on real test images": [m["accuracy"] for m in curve]},
        path,
        "synthetic share of the classifier's training images",
        f"Real and synthetic mixed ({result['images']:,} training images)",
    )


WHAT = "a vae-ray set evaluation"
OUT_FILES = frozenset({"quality.json", "samples.png", "samples_per_class.png", "mixing.png"})


def _not_quality_files(uri: str) -> list[str]:
    from .swap import unproven

    return storage.foreign_leaves(uri, OUT_FILES.__contains__) or unproven(uri, "quality.json", "fd_ratio")


def check_options(limit: int | None, seed: int, copy_percentile: float, steps: int) -> None:
    if limit is not None and not 100 <= limit <= MAX_IMAGES:
        raise UserError(f"--limit must be between 100 and {MAX_IMAGES} (got {limit})")
    if not 0 <= seed < 2**31:
        raise UserError(f"--seed must be between 0 and {2**31 - 1} (got {seed})")
    if not 0 < copy_percentile < 50:
        raise UserError(f"--copy-percentile must be between 0 and 50 (got {copy_percentile})")
    if not 10 <= steps <= 1_000_000:
        raise UserError(f"--steps must be between 10 and 1000000 (got {steps})")
