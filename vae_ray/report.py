"""`vae-ray report`: one self-contained HTML page per run, PNGs beside it.

Everything is computed from the run's checkpoint and its test split on this
process (a few thousand images at most): loss curves, reconstructions, an
8x8 sample grid, PCA and t-SNE maps of the test-set posterior means (and the
decoded 2-D manifold for latent 2), spherical interpolations, a latent
arithmetic example and the distribution of reconstruction errors.
"""

from __future__ import annotations

import html
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from . import checkpoint as ckpt
from . import hub, storage
from .data import dataset_read_lock, read_arrays, read_meta
from .embedding import pca_2d, tsne_2d
from .errors import UserError
from .images import to_float, to_uint8
from .pictures import samples, two_per_class
from .plots import histogram, image_grid, latent_scatter, loss_curves, pairs_grid, save_png
from .rundir import RunDir
from .swap import check_destination, publish_folder, settle_swap, unproven

MAP_POINTS = 1000  # points in the PCA / t-SNE maps
ERROR_IMAGES = 5000  # images in the reconstruction-error histogram
STEPS = 10  # frames per interpolation strip


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Spherical interpolation from a to b (White 2016): follows the shell
    where Gaussian latent mass lives instead of cutting through its centre."""
    t = torch.linspace(0, 1, steps, dtype=a.dtype).unsqueeze(1)
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if omega.abs() < 1e-4:  # nearly parallel: linear is the same path
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


MARKER = "report.json"  # the run and checkpoint a report was made from
# Every file a report folder holds. A folder is replaced only when it holds
# nothing else, hidden names included: the marker alone proves nothing.
PICTURES = (
    "loss_curves.png",
    "reconstructions.png",
    "samples.png",
    "latent_pca.png",
    "latent_tsne.png",
    "manifold.png",
    "interpolation.png",
    "arithmetic.png",
    "recon_error.png",
)
FILES = frozenset({MARKER, "index.html", *PICTURES})
# A generated set's pictures, copied from its `evaluate-set --out` folder as setN_<name>.
SET_PICTURES = ("samples_per_class.png", "samples.png", "mixing.png")
_SET_PICTURE = re.compile(r"^set[0-9]{1,3}_(" + "|".join(re.escape(n) for n in SET_PICTURES) + r")$")
MAX_SET_PICTURE = 64 * 2**20  # larger is not a picture evaluate-set drew: not copied
# The figures of a set shown in its table: quality.json key -> row name.
SET_FIGURES = {
    "images": "images",
    "tstr_ratio": "TSTR / TRTR",
    "tstr_accuracy": "TSTR accuracy",
    "trtr_accuracy": "TRTR accuracy",
    "fd_ratio": "Frechet distance / real's",
    "precision": "precision",
    "recall": "recall",
    "recall_real": "recall of real images",
    "inception_score": "Inception Score",
    "inception_score_real": "Inception Score of real images",
}


class Report:
    """Everything is checked in the constructor; `build` writes the page into a
    temporary folder and swaps it in whole (an old report is replaced only then;
    any other folder is refused)."""

    def __init__(self, run: str, out: str | None = None, data: str | None = None, seed: int = 0, quality: tuple = ()):
        self.loaded = ckpt.load(run)  # a clear error for a missing or broken run
        self.sets = [_read_quality(q) for q in quality]  # evaluate-set --out folders, shown as sections
        on_hub = str(run).startswith(hub.SCHEME)
        if on_hub and not out:
            raise UserError(f"{run}: a model on the Hub has no folder here to hold its report; pass --out")
        self.run = RunDir(str(self.loaded.local) if on_hub else run)
        self.is_run = self.run.latest() is not None
        self.model = self.loaded.model
        self.out = (
            storage.check_uri(out) if out else storage.join(self.run.uri if self.is_run else self.loaded.path, "report")
        )
        _check_destination(self.out)
        self.data = data or self.loaded.config.data
        if not self.data:
            raise UserError(f"{run}: the checkpoint does not name its dataset; pass --data")
        self.meta = read_meta(self.data)
        if list(self.meta["shape"]) != list(self.loaded.dataset["shape"]):
            raise UserError(
                f"{self.data}: images are {tuple(self.meta['shape'])} but the model was trained on "
                f"{tuple(self.loaded.dataset['shape'])}"
            )
        if not 0 <= seed < 2**32:
            raise UserError(f"--seed must be between 0 and {2**32 - 1} (got {seed})")
        self.seed = seed
        self.classes = self.loaded.dataset["classes"] or [str(k) for k in range(self.loaded.dataset["num_classes"])]
        self.history = self.run.history() if self.is_run else []

    # -----------------------------------------------------------------
    def build(self, progress: Callable[[str], None] | None = None) -> str:
        with (
            dataset_read_lock(self.data),
            storage.Lock(self.out, "vae-ray report"),
            tempfile.TemporaryDirectory() as tmp,
        ):
            settle_swap(self.out, _not_report_files)  # a swap a crash cut short
            _check_destination(self.out)
            folder = Path(tmp) / "report"
            folder.mkdir()
            self._build(folder, progress or (lambda _: None))
            storage.write_json(
                str(folder / MARKER),
                {"run": self.run.uri, "checkpoint": self.loaded.path, "written": time.strftime("%Y-%m-%d %H:%M:%S")},
            )
            publish_folder(folder, self.out)
        return storage.join(self.out, "index.html")

    def _build(self, out: Path, say: Callable[[str], None]) -> None:
        self.out_dir = out
        images, labels = read_arrays(self.data, "test", limit=ERROR_IMAGES, meta=self.meta)
        rng = np.random.default_rng(self.seed)
        sections: list[tuple[str, str, str]] = []  # (title, png, caption)
        if self.history:
            say("loss curves")
            loss_curves(self.history, self.out_dir / "loss_curves.png", title=self.run.name)
            sections.append(
                (
                    "Loss curves",
                    "loss_curves.png",
                    "Training objective on the train and test splits per epoch, and the test ELBO "
                    "in the MATLAB example's unit (0.5 * summed squared error + KL, per image).",
                )
            )
        say("reconstructions")
        mu = self._encode(images, labels)  # every picture below starts from these posterior means
        sections.append(self._reconstructions(images, labels, mu))
        say("samples")
        save_png(
            image_grid(samples(self.model, 64, seed=self.seed), cols=8, scale=self._scale()),
            self.out_dir / "samples.png",
        )
        sections.append(
            (
                "Samples",
                "samples.png",
                "64 images decoded from z ~ N(0, I)"
                + (", classes in turn (class-conditional model)." if self.model.num_classes else "."),
            )
        )
        for number, (where, figures) in enumerate(self.sets, start=1):
            say(f"generated set {number}")
            sections.extend(self._generated_set(number, where, figures))
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
        self._write_html(sections)

    # -- pictures -------------------------------------------------------
    def _generated_set(self, number: int, where: str, figures: dict) -> list[tuple[str, str, str]]:
        """A set judged by `evaluate-set --out`: its pictures, captioned with its figures."""
        shown = _set_summary(figures)
        sections = []
        for name, caption in (
            ("samples_per_class.png", "its first images of each class, a row per class"),
            ("samples.png", "its first 64 images"),
            ("mixing.png", "real test accuracy of classifiers trained on real and synthetic images mixed"),
        ):
            source = storage.join(where, name)
            if name == "samples.png" and any(s[1] == f"set{number}_samples_per_class.png" for s in sections):
                continue  # one grid per set: by class when it has labels
            if not storage.is_remote(source) and os.path.islink(source):
                continue  # evaluate-set writes files, not links: not followed
            fs, path = storage.filesystem(source)
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File and info.size <= MAX_SET_PICTURE:
                (self.out_dir / f"set{number}_{name}").write_bytes(storage.read_bytes(source))
                sections.append(
                    (
                        f"Generated set {number}: {Path(str(figures.get('set', where))).name}",
                        f"set{number}_{name}",
                        f"{storage.printable(str(figures.get('set', where)))}: {caption}. {shown}",
                    )
                )
        return sections

    def _scale(self) -> int:
        return max(1, min(4, 96 // self.meta["shape"][0]))

    @torch.no_grad()
    def _encode(self, images: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        x = to_float(images)
        y = torch.from_numpy(labels) if self.model.num_classes else None
        return self.model.encode(x, y)[0].float()

    @torch.no_grad()
    def _decode(self, z: torch.Tensor, label: int | np.ndarray | None = None) -> np.ndarray:
        """Decoder means as uint8 images; `label`: one class for every z, or one per z."""
        y = None
        if self.model.num_classes:
            y = (
                torch.from_numpy(label)
                if isinstance(label, np.ndarray)
                else torch.full((len(z),), label, dtype=torch.long)
            )
        return to_uint8(self.model.mean_image(self.model.decode(z, y)))

    def _reconstructions(self, images, labels, mu):
        pick = two_per_class(labels, self.loaded.dataset["num_classes"], seed=self.seed)
        recon = self._decode(mu[pick], labels[pick])
        save_png(pairs_grid(images[pick], recon, cols=10, scale=self._scale()), self.out_dir / "reconstructions.png")
        return (
            "Reconstructions",
            "reconstructions.png",
            "Two test images of each class (upper rows) above their reconstructions from the posterior mean.",
        )

    def _latent_maps(self, mu: torch.Tensor, labels: np.ndarray, rng) -> list[tuple[str, str, str]]:
        pick = rng.choice(len(mu), min(MAP_POINTS, len(mu)), replace=False)
        points, lab = mu[pick].numpy(), labels[pick]
        latent_scatter(
            pca_2d(points),
            lab,
            self.classes,
            self.out_dir / "latent_pca.png",
            f"PCA of test-set means (K={self.model.latent_dim})",
        )
        latent_scatter(
            tsne_2d(points, seed=self.seed),
            lab,
            self.classes,
            self.out_dir / "latent_tsne.png",
            f"t-SNE of test-set means (K={self.model.latent_dim})",
        )
        return [
            (
                "Latent space: PCA",
                "latent_pca.png",
                f"Posterior means of {len(pick):,} test images on their two principal axes, coloured by class.",
            ),
            (
                "Latent space: t-SNE",
                "latent_tsne.png",
                "The same means embedded with t-SNE (perplexity 30): neighbours in latent space stay neighbours.",
            ),
        ]

    def _manifold(self, side: int = 15):
        # Grid on Gaussian quantiles, as in Kingma & Welling's figure 4.
        q = torch.distributions.Normal(0, 1).icdf(torch.linspace(0.05, 0.95, side))
        zz = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), -1).reshape(-1, 2)
        tiles = self._decode(zz, label=0)
        save_png(image_grid(tiles, cols=side, pad=0, scale=max(1, self._scale() // 2)), self.out_dir / "manifold.png")
        return (
            "Decoded 2-D manifold",
            "manifold.png",
            "Images decoded on a 15 x 15 grid of Gaussian quantiles of the 2-D latent space"
            + (" (class 0)." if self.model.num_classes else "."),
        )

    def _interpolations(self, images, labels, mu, rng, strips: int = 6):
        rows = []
        for _ in range(strips):
            i, j = rng.choice(len(mu), 2, replace=False)
            path = slerp(mu[i], mu[j], STEPS)
            frames = self._decode(path, label=int(labels[i]))
            rows.append(np.concatenate([images[i : i + 1], frames, images[j : j + 1]]))
        save_png(
            image_grid(np.concatenate(rows), cols=STEPS + 2, scale=self._scale()), self.out_dir / "interpolation.png"
        )
        return (
            "Interpolations",
            "interpolation.png",
            f"Spherical interpolation in {STEPS} steps between the posterior means of two test images "
            "(the originals at both ends of each row).",
        )

    def _arithmetic(self, images, labels, mu, rng, examples: int = 4):
        rows = []
        for _ in range(examples):
            a, b, c = rng.choice(len(mu), 3, replace=False)
            result = self._decode((mu[a] - mu[b] + mu[c]).unsqueeze(0), label=int(labels[c]))
            decoded = self._decode(mu[[a, b, c]], label=int(labels[c]))
            rows.append(np.concatenate([images[[a, b, c]], decoded, result]))
        save_png(image_grid(np.concatenate(rows), cols=7, scale=self._scale()), self.out_dir / "arithmetic.png")
        return (
            "Latent arithmetic",
            "arithmetic.png",
            "Each row: test images x1, x2, x3; their reconstructions; then the decoding of "
            "z1 - z2 + z3 (posterior means).",
        )

    def _error_histogram(self, images, labels, mu):
        x = to_float(images)
        recon = to_float(self._decode(mu, labels))
        sse = 0.5 * (recon - x).pow(2).flatten(1).sum(1).numpy()
        histogram(
            sse,
            self.out_dir / "recon_error.png",
            "0.5 * summed squared error per image",
            f"Reconstruction error of {len(images):,} test images",
        )
        return (
            "Reconstruction error",
            "recon_error.png",
            "Distribution of the per-image reconstruction error (the MATLAB example's term) over the test split.",
        )

    # -- the page -------------------------------------------------------
    def _write_html(self, sections: list[tuple[str, str, str]]) -> None:
        cfg = self.loaded.config.to_dict()
        history = self.history
        metrics = dict(history[-1]) if history else dict(self.loaded.state.get("metrics", {}))
        evaluation = _read_json(self.run.path("evaluation.json"))
        body = [
            f"<h1>{html.escape(self.run.name)}</h1>",
            f"<p class=meta>{html.escape(self.meta['name'])}, {len(history)} epochs, checkpoint "
            f"<code>{html.escape(str(self.loaded.path))}</code>, written {time.strftime('%Y-%m-%d %H:%M')}</p>",
            "<div class=tables>",
            _table("Configuration", cfg),
            _table("Last epoch", metrics),
        ]
        if evaluation:
            body.append(_table("Evaluation", evaluation))
        for number, (_, figures) in enumerate(self.sets, start=1):
            body.append(
                _table(
                    f"Generated set {number} (evaluate-set)",
                    {name: figures[key] for key, name in SET_FIGURES.items() if figures.get(key) is not None},
                )
            )
        body.append("</div>")
        for title, png, caption in sections:
            body.append(
                f'<section><h2>{html.escape(title)}</h2><img src="{png}" alt="{html.escape(title)}">'
                f"<p>{html.escape(caption)}</p></section>"
            )
        page = PAGE.format(title=html.escape(f"vae-ray report: {self.run.name}"), body="\n".join(body))
        (self.out_dir / "index.html").write_text(page)


def _not_report_files(uri: str) -> list[str]:
    ours = lambda name: name in FILES or bool(_SET_PICTURE.match(name))  # noqa: E731
    return storage.foreign_leaves(uri, ours) or unproven(uri, MARKER, "checkpoint")


def _read_quality(where: str) -> tuple[str, dict]:
    """An `evaluate-set --out` folder and its figures, or one line saying what it is not."""
    uri = storage.check_uri(where)
    marker = storage.join(uri, "quality.json")
    try:
        fs, path = storage.filesystem(marker)
        small = fs.get_file_info(path).size or 0
        figures = storage.read_json(marker) if small <= MAX_SET_PICTURE else None
    except (FileNotFoundError, ValueError, OSError):
        figures = None
    if not isinstance(figures, dict) or "fd_ratio" not in figures:
        raise UserError(f"{where}: not an `evaluate-set --out` folder (no quality.json of its figures)")
    return uri, figures


def _set_summary(figures: dict) -> str:
    def num(key: str, digits: int = 3) -> str:
        value = figures.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"

    return (
        f"{figures.get('images', '?')} images; TSTR/TRTR {num('tstr_ratio')}, Frechet distance "
        f"{num('fd_ratio', 1)}x real's, precision {num('precision')}, recall {num('recall')} "
        f"(real {num('recall_real')})."
    )


def _check_destination(out: str) -> None:
    check_destination(out, _not_report_files, "a vae-ray report")


def _read_json(uri: str) -> dict:
    try:
        value = storage.read_json(uri)
        return value if isinstance(value, dict) else {}
    except (FileNotFoundError, ValueError, OSError):
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
