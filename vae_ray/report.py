"""`vae-ray report`: one self-contained HTML page per run, PNGs beside it.

Everything is computed from the run's checkpoint and its test split on this
process (a few thousand images at most): loss curves, reconstructions, an
8x8 sample grid, PCA and t-SNE maps of the test-set posterior means (and the
decoded 2-D manifold for latent 2), spherical interpolations, a latent
arithmetic example and the distribution of reconstruction errors.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .errors import UserError
from .pictures import samples, to_uint8, two_per_class
from .plots import histogram, image_grid, latent_scatter, loss_curves, pairs_grid, save_png

MAP_POINTS = 1000        # points in the PCA / t-SNE maps
ERROR_IMAGES = 5000      # images in the reconstruction-error histogram
STEPS = 10               # frames per interpolation strip


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Spherical interpolation from a to b (White 2016): follows the shell
    where Gaussian latent mass lives instead of cutting through its centre."""
    t = torch.linspace(0, 1, steps, dtype=a.dtype).unsqueeze(1)
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if omega.abs() < 1e-4:  # nearly parallel: linear is the same path
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


class Report:
    def __init__(self, run: str, out: Optional[str] = None, data: Optional[str] = None, seed: int = 0):
        from .data import read_meta

        self.run = Path(run).expanduser()
        self.loaded = ckpt.load(self.run)       # a clear error for a missing or broken run
        self.model = self.loaded.model
        self.data = data or self.loaded.config.data
        self.meta = read_meta(self.data)
        if list(self.meta["shape"]) != list(self.loaded.dataset["shape"]):
            raise UserError(f"{self.data}: images are {tuple(self.meta['shape'])} but the model was trained on "
                            f"{tuple(self.loaded.dataset['shape'])}")
        self.out = Path(out).expanduser() if out else (self.run if (self.run / "latest").exists()
                                                         else self.loaded.path) / "report"
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a folder")
        self.seed = seed
        self.classes = self.loaded.dataset["classes"] or [str(k) for k in range(self.loaded.dataset["num_classes"])]
        self.history = self._read_history()

    # -----------------------------------------------------------------
    def build(self, progress: Optional[Callable[[str], None]] = None) -> Path:
        from .data import read_arrays

        say = progress or (lambda _: None)
        self.out.mkdir(parents=True, exist_ok=True)
        images, labels = read_arrays(self.data, "test", limit=ERROR_IMAGES, meta=self.meta)
        rng = np.random.default_rng(self.seed)
        sections: list[tuple[str, str, str]] = []  # (title, png, caption)
        if self.history:
            say("loss curves")
            loss_curves(self.history, self.out / "loss_curves.png", title=self.run.name)
            sections.append(("Loss curves", "loss_curves.png",
                             "Training objective on the train and test splits per epoch, and the test ELBO "
                             "in the MATLAB example's unit (0.5 * summed squared error + KL, per image)."))
        say("reconstructions")
        mu = self._encode(images, labels)  # every picture below starts from these posterior means
        sections.append(self._reconstructions(images, labels, mu))
        say("samples")
        save_png(image_grid(samples(self.model, 64, seed=self.seed), cols=8, scale=self._scale()),
                 self.out / "samples.png")
        sections.append(("Samples", "samples.png", "64 images decoded from z ~ N(0, I)"
                         + (", classes in turn (class-conditional model)." if self.model.num_classes else ".")))
        say("latent maps")
        sections.extend(self._latent_maps(mu, labels, rng))
        if self.model.latent_dim == 2:
            sections.append(self._manifold())
        say("interpolations")
        sections.append(self._interpolations(images, labels, mu, rng))
        sections.append(self._arithmetic(images, labels, mu, rng))
        say("reconstruction errors")
        sections.append(self._error_histogram(images, labels, mu))
        say("page")
        return self._write_html(sections)

    # -- pictures -------------------------------------------------------
    def _scale(self) -> int:
        return max(1, min(4, 96 // self.meta["shape"][0]))

    def _read_history(self) -> list[dict]:
        from .train import read_history

        return read_history(self.run) if (self.run / "metrics.jsonl").is_file() else []

    @torch.no_grad()
    def _encode(self, images: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(labels) if self.model.num_classes else None
        return self.model.encode(x, y)[0].float()

    @torch.no_grad()
    def _decode(self, z: torch.Tensor, label: int | np.ndarray | None = None) -> np.ndarray:
        """Decoder means as uint8 images; `label`: one class for every z, or one per z."""
        y = None
        if self.model.num_classes:
            y = torch.from_numpy(label) if isinstance(label, np.ndarray) else \
                torch.full((len(z),), label, dtype=torch.long)
        return to_uint8(self.model.mean_image(self.model.decode(z, y)))

    def _reconstructions(self, images, labels, mu):
        pick = two_per_class(labels, self.loaded.dataset["num_classes"], seed=self.seed)
        recon = self._decode(mu[pick], labels[pick])
        save_png(pairs_grid(images[pick], recon, cols=10, scale=self._scale()), self.out / "reconstructions.png")
        return ("Reconstructions", "reconstructions.png",
                "Two test images of each class (upper rows) above their reconstructions from the posterior mean.")

    def _latent_maps(self, mu: torch.Tensor, labels: np.ndarray, rng) -> list[tuple[str, str, str]]:
        from .embedding import pca_2d, tsne_2d

        pick = rng.choice(len(mu), min(MAP_POINTS, len(mu)), replace=False)
        points, lab = mu[pick].numpy(), labels[pick]
        latent_scatter(pca_2d(points), lab, self.classes, self.out / "latent_pca.png",
                       f"PCA of test-set means (K={self.model.latent_dim})")
        latent_scatter(tsne_2d(points, seed=self.seed), lab, self.classes, self.out / "latent_tsne.png",
                       f"t-SNE of test-set means (K={self.model.latent_dim})")
        return [("Latent space: PCA", "latent_pca.png",
                 f"Posterior means of {len(pick):,} test images on their two principal axes, coloured by class."),
                ("Latent space: t-SNE", "latent_tsne.png",
                 "The same means embedded with t-SNE (perplexity 30): neighbours in latent space stay neighbours.")]

    def _manifold(self, side: int = 15):
        # Grid on Gaussian quantiles, as in Kingma & Welling's figure 4.
        q = torch.distributions.Normal(0, 1).icdf(torch.linspace(0.05, 0.95, side))
        zz = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), -1).reshape(-1, 2)
        tiles = self._decode(zz, label=0)
        save_png(image_grid(tiles, cols=side, pad=0, scale=max(1, self._scale() // 2)), self.out / "manifold.png")
        return ("Decoded 2-D manifold", "manifold.png",
                "Images decoded on a 15 x 15 grid of Gaussian quantiles of the 2-D latent space"
                + (" (class 0)." if self.model.num_classes else "."))

    def _interpolations(self, images, labels, mu, rng, strips: int = 6):
        rows = []
        for _ in range(strips):
            i, j = rng.choice(len(mu), 2, replace=False)
            path = slerp(mu[i], mu[j], STEPS)
            frames = self._decode(path, label=int(labels[i]))
            rows.append(np.concatenate([images[i:i + 1], frames, images[j:j + 1]]))
        save_png(image_grid(np.concatenate(rows), cols=STEPS + 2, scale=self._scale()), self.out / "interpolation.png")
        return ("Interpolations", "interpolation.png",
                f"Spherical interpolation in {STEPS} steps between the posterior means of two test images "
                "(the originals at both ends of each row).")

    def _arithmetic(self, images, labels, mu, rng, examples: int = 4):
        rows = []
        for _ in range(examples):
            a, b, c = rng.choice(len(mu), 3, replace=False)
            result = self._decode((mu[a] - mu[b] + mu[c]).unsqueeze(0), label=int(labels[c]))
            decoded = self._decode(mu[[a, b, c]], label=int(labels[c]))
            rows.append(np.concatenate([images[[a, b, c]], decoded, result]))
        save_png(image_grid(np.concatenate(rows), cols=7, scale=self._scale()), self.out / "arithmetic.png")
        return ("Latent arithmetic", "arithmetic.png",
                "Each row: test images x1, x2, x3; their reconstructions; then the decoding of "
                "z1 - z2 + z3 (posterior means).")

    def _error_histogram(self, images, labels, mu):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        recon = torch.from_numpy(self._decode(mu, labels)).permute(0, 3, 1, 2).float() / 255
        sse = 0.5 * (recon - x).pow(2).flatten(1).sum(1).numpy()
        histogram(sse, self.out / "recon_error.png", "0.5 * summed squared error per image",
                  f"Reconstruction error of {len(images):,} test images")
        return ("Reconstruction error", "recon_error.png",
                "Distribution of the per-image reconstruction error (the MATLAB example's term) over the test split.")

    # -- the page -------------------------------------------------------
    def _write_html(self, sections: list[tuple[str, str, str]]) -> Path:
        cfg = self.loaded.config.to_dict()
        history = self.history
        metrics = dict(history[-1]) if history else dict(self.loaded.state.get("metrics", {}))
        evaluation = _read_json(self.run / "evaluation.json")
        body = [f"<h1>{html.escape(self.run.name)}</h1>",
                f"<p class=meta>{html.escape(self.meta['name'])}, {len(history)} epochs, checkpoint "
                f"<code>{html.escape(str(self.loaded.path))}</code>, written {time.strftime('%Y-%m-%d %H:%M')}</p>",
                "<div class=tables>", _table("Configuration", cfg), _table("Last epoch", metrics)]
        if evaluation:
            body.append(_table("Evaluation", evaluation))
        body.append("</div>")
        for title, png, caption in sections:
            body.append(f"<section><h2>{html.escape(title)}</h2><img src=\"{png}\" alt=\"{html.escape(title)}\">"
                        f"<p>{html.escape(caption)}</p></section>")
        page = PAGE.format(title=html.escape(f"vae-ray report: {self.run.name}"), body="\n".join(body))
        path = self.out / "index.html"
        tmp = path.with_name(".index.html.tmp")
        tmp.write_text(page)
        tmp.replace(path)
        return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _table(title: str, values: dict[str, Any]) -> str:
    rows = []
    for key, value in values.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if math.isfinite(value) else str(value)
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>")
    return f"<table><caption>{html.escape(title)}</caption>{''.join(rows)}</table>"


# The script marks the page once every image has loaded (or failed), so a
# headless browser can check that nothing is missing.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
.meta {{ color: #666; }} .tables {{ display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} caption {{ font-weight: bold; text-align: left; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; }}
section {{ margin-top: 2em; }} img {{ max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }}
</style></head>
<body>
{body}
<script>
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""
