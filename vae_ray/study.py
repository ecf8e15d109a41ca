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

import json
from pathlib import Path
from typing import Any

import numpy as np

from .config import load_config
from .tune import SearchSpec, search

METRIC = "test_matlab_elbo"


def _run(data: str, out: Path, spec: SearchSpec, epochs: int, lr: float, options: dict[str, Any]) -> list[dict]:
    base = load_config(options.pop("config_file", None), data=data, out=str(out), epochs=epochs, lr=lr,
                       workers=options.pop("workers_per_trial", 1))
    spec.lrs = [lr]
    rows = search(base, spec, out, grace_period=epochs, metric=METRIC, **options)
    failed = [r for r in rows if not r["checkpoint"]]
    if failed:
        from .errors import RunFailed

        raise RunFailed(f"{len(failed)} of {len(rows)} study trials left no checkpoint: {failed[0]['error']}")
    return rows


def _test_images(data: str, seed: int = 0):
    from .data import read_arrays, read_meta
    from .pictures import two_per_class

    meta = read_meta(data)
    images, labels = read_arrays(data, "test", limit=5000, meta=meta)
    return images, labels, two_per_class(labels, meta["num_classes"], seed=seed), meta


def _strip(images: np.ndarray) -> np.ndarray:
    from .plots import image_grid

    return image_grid(images, cols=len(images), pad=1)


def latent_dims(data: str, out: str | Path, dims: tuple[int, ...] = (2, 5, 10, 20), epochs: int = 10,
                lr: float = 2e-3, **options: Any) -> dict[str, Any]:
    from . import checkpoint as ckpt
    from .pictures import reconstruct
    from .plots import labelled_rows, metric_by_setting

    out = Path(out).expanduser().resolve()
    spec = SearchSpec(latent_dims=list(dims), lrs=[lr], recon_weights=[0.5], betas=[0.5])
    rows = sorted(_run(data, out, spec, epochs, lr, options), key=lambda r: r["latent_dim"])
    images, labels, pick, _ = _test_images(data)
    strips, names, finals = [_strip(images[pick])], ["ground truth"], {}
    from .train import read_history

    for row in rows:
        model = ckpt.load(row["checkpoint"]).model
        strips.append(_strip(reconstruct(model, images[pick], labels[pick])))
        names.append(f"K = {row['latent_dim']}")
        last = read_history(Path(row["checkpoint"]).parent)[-1]
        finals[row["latent_dim"]] = {METRIC: last[METRIC], "test_loss": last["test_loss"],
                                     "test_kl": last["test_kl"], "checkpoint": row["checkpoint"]}
    labelled_rows(strips, names, out / "reconstructions_by_latent_dim.png",
                  f"Ground truth and reconstructions, loss 0.5*MSE + 0.5*KL, {epochs} epochs")
    ks = sorted(finals)
    metric_by_setting([str(k) for k in ks],
                      {"test MATLAB ELBO (0.5*SSE + KL)": [finals[k][METRIC] for k in ks],
                       "test loss (0.5*SSE + 0.5*KL)": [finals[k]["test_loss"] for k in ks],
                       "test KL": [finals[k]["test_kl"] for k in ks]},
                      out / "metric_by_latent_dim.png", "latent dimension K", "Test metrics per latent size")
    return _summary(out, "latent-dims", {str(k): v for k, v in finals.items()},
                    ["reconstructions_by_latent_dim.png", "metric_by_latent_dim.png"])


def loss_weights(data: str, out: str | Path, latent_dim: int = 20, epochs: int = 10, lr: float = 2e-3,
                 pairs: tuple[tuple[float, float], ...] = ((0.9, 0.1), (0.1, 0.9)), **options: Any) -> dict[str, Any]:
    import torch

    from . import checkpoint as ckpt
    from .embedding import tsne_2d
    from .pictures import reconstruct
    from .plots import image_grid, recon_and_maps
    from .train import read_history

    out = Path(out).expanduser().resolve()
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
            x = torch.from_numpy(images[sample]).permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(labels[sample]) if model.num_classes else None
            mu = model.encode(x, y)[0].numpy()
        panels.append((name, recon, tsne_2d(mu)))
        last = read_history(Path(row["checkpoint"]).parent)[-1]
        finals[name] = {METRIC: last[METRIC], "test_kl": last["test_kl"], "test_recon": last["test_recon"],
                        "checkpoint": row["checkpoint"]}
    recon_and_maps(image_grid(images[pick], cols=4, scale=scale), panels, labels[sample], classes,
                   out / "loss_weights.png",
                   f"Reconstruction weight against KL weight, latent {latent_dim}, {epochs} epochs")
    return _summary(out, "loss-weights", finals, ["loss_weights.png"])


def _summary(out: Path, name: str, results: dict, pictures: list[str]) -> dict[str, Any]:
    summary = {"study": name, "metric": METRIC, "results": results,
               "pictures": [str(out / p) for p in pictures], "results_csv": str(out / "results.csv")}
    (out / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
