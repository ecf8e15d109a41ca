"""The source documents' two studies, each a Ray Tune search plus pictures.

- `latent_dims`: latent size 2, 5, 10, 20 with loss 0.5*MSE + 0.5*KL: ground
  truth beside each size's reconstructions, and the test metric per size.
- `loss_weights`: 0.9*MSE + 0.1*KL against 0.1*MSE + 0.9*KL at latent 20:
  reconstructions side by side, and a t-SNE of the test-set latent means
  coloured by class for each.

Every trial runs to the last epoch (a study compares settings; it does not
prune them), so ASHA's grace period is the whole run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import storage
from .config import load_config
from .data import read_arrays, read_meta
from .embedding import tsne_2d
from .errors import RunFailed
from .images import to_float
from .pictures import reconstruct, two_per_class
from .plots import image_grid, labelled_rows, metric_by_setting, recon_and_maps
from .rundir import RunDir
from .tune import SearchSpec, search

METRIC = "test_matlab_elbo"


def _run(data: str, out: Path, spec: SearchSpec, epochs: int, lr: float, options: dict[str, Any]) -> list[dict]:
    base = load_config(
        options.pop("config_file", None),
        data=data,
        out=str(out),
        epochs=epochs,
        lr=lr,
        workers=options.pop("workers_per_trial", 1),
    )
    spec.lrs = [lr]
    rows = search(base, spec, out, grace_period=epochs, metric=METRIC, **options)
    failed = [r for r in rows if not r["checkpoint"]]
    if failed:
        raise RunFailed(f"{len(failed)} of {len(rows)} study trials left no checkpoint: {failed[0]['error']}")
    return rows


def _test_images(data: str, seed: int = 0):
    meta = read_meta(data)
    images, labels = read_arrays(data, "test", limit=5000, meta=meta)
    return images, labels, two_per_class(labels, meta["num_classes"], seed=seed), meta


def _strip(images: np.ndarray) -> np.ndarray:
    return image_grid(images, cols=len(images), pad=1)


def latent_dims(
    data: str,
    out: str | Path,
    dims: tuple[int, ...] = (2, 5, 10, 20),
    epochs: int = 10,
    lr: float = 2e-3,
    **options: Any,
) -> dict[str, Any]:
    out = storage.check_uri(str(out))
    spec = SearchSpec(latent_dims=list(dims), lrs=[lr], recon_weights=[0.5], betas=[0.5])
    rows = sorted(_run(data, out, spec, epochs, lr, options), key=lambda r: r["latent_dim"])
    images, labels, pick, _ = _test_images(data)
    strips, names, finals = [_strip(images[pick])], ["ground truth"], {}
    for row in rows:
        model = ckpt.load(row["checkpoint"]).model
        strips.append(_strip(reconstruct(model, images[pick], labels[pick])))
        names.append(f"K = {row['latent_dim']}")
        last = RunDir(storage.parent_of(row["checkpoint"])).history()[-1]
        finals[row["latent_dim"]] = {
            METRIC: last[METRIC],
            "test_loss": last["test_loss"],
            "test_kl": last["test_kl"],
            "checkpoint": row["checkpoint"],
        }
    ks = sorted(finals)
    with tempfile.TemporaryDirectory() as tmp:
        labelled_rows(
            strips,
            names,
            Path(tmp) / "reconstructions_by_latent_dim.png",
            f"Ground truth and reconstructions, loss 0.5*MSE + 0.5*KL, {epochs} epochs",
        )
        metric_by_setting(
            [str(k) for k in ks],
            {
                "test MATLAB ELBO (0.5*SSE + KL)": [finals[k][METRIC] for k in ks],
                "test loss (0.5*SSE + 0.5*KL)": [finals[k]["test_loss"] for k in ks],
                "test KL": [finals[k]["test_kl"] for k in ks],
            },
            Path(tmp) / "metric_by_latent_dim.png",
            "latent dimension K",
            "Test metrics per latent size",
        )
        storage.upload(tmp, out)
    return _summary(
        out,
        "latent-dims",
        {str(k): v for k, v in finals.items()},
        ["reconstructions_by_latent_dim.png", "metric_by_latent_dim.png"],
    )


def loss_weights(
    data: str,
    out: str | Path,
    latent_dim: int = 20,
    epochs: int = 10,
    lr: float = 2e-3,
    pairs: tuple[tuple[float, float], ...] = ((0.9, 0.1), (0.1, 0.9)),
    **options: Any,
) -> dict[str, Any]:
    out = storage.check_uri(str(out))
    spec = SearchSpec(latent_dims=[latent_dim], lrs=[lr], weight_pairs=list(pairs))
    rows = _run(data, out, spec, epochs, lr, options)
    rows.sort(key=lambda r: -r["recon_weight"])
    images, labels, pick, meta = _test_images(data)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(images), min(1000, len(images)), replace=False)
    classes = meta["classes"] or [str(k) for k in range(meta["num_classes"])]
    scale = max(1, 56 // meta["shape"][0])
    panels, finals = [], {}
    for row in rows:
        name = f"{row['recon_weight']:g}*MSE + {row['beta']:g}*KL"
        model = ckpt.load(row["checkpoint"]).model
        recon = image_grid(reconstruct(model, images[pick], labels[pick]), cols=4, scale=scale)
        with torch.no_grad():
            x = to_float(images[sample])
            y = torch.from_numpy(labels[sample]) if model.num_classes else None
            mu = model.encode(x, y)[0].numpy()
        panels.append((name, recon, tsne_2d(mu)))
        last = RunDir(storage.parent_of(row["checkpoint"])).history()[-1]
        finals[name] = {
            METRIC: last[METRIC],
            "test_kl": last["test_kl"],
            "test_recon": last["test_recon"],
            "checkpoint": row["checkpoint"],
        }
    with tempfile.TemporaryDirectory() as tmp:
        recon_and_maps(
            image_grid(images[pick], cols=4, scale=scale),
            panels,
            labels[sample],
            classes,
            Path(tmp) / "loss_weights.png",
            f"Reconstruction weight against KL weight, latent {latent_dim}, {epochs} epochs",
        )
        storage.upload(tmp, out)
    return _summary(out, "loss-weights", finals, ["loss_weights.png"])


def _summary(out: str, name: str, results: dict, pictures: list[str]) -> dict[str, Any]:
    summary = {
        "study": name,
        "metric": METRIC,
        "results": results,
        "pictures": [storage.join(out, p) for p in pictures],
        "results_csv": storage.join(out, "results.csv"),
    }
    storage.write_json(storage.join(out, "study.json"), summary)
    return summary
