"""Pictures a person would rather look at than read, written as PNG files.

Grids are assembled with Pillow (exact pixels, no resampling surprises);
curves and scatter plots use matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import storage


def image_grid(
    images: np.ndarray, cols: int | None = None, pad: int = 2, scale: int = 1, background: int = 40
) -> np.ndarray:
    """Tile (n, H, W, C) uint8 images into one (rows*H, cols*W, C) array."""
    n, h, w, c = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), background, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W) / (H, W, 1) / (H, W, 3) array as PNG, atomically."""
    from PIL import Image

    path = Path(path)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    storage.write_local_atomic(
        path, buffer.getvalue(), durable=False
    )  # a name of its own: never through a planted link
    return path


def save_grid(images: np.ndarray, path: str | Path, cols: int | None = None) -> Path:
    """A grid of images, scaled up so that 28-pixel digits are readable."""
    scale = max(1, 96 // max(images.shape[1], 1))
    return save_png(image_grid(images, cols=cols, scale=min(scale, 4)), path)


def pairs_grid(originals: np.ndarray, reconstructions: np.ndarray, cols: int = 10, scale: int = 1) -> np.ndarray:
    """Originals above their reconstructions, in pairs of rows."""
    rows = []
    for start in range(0, len(originals), cols):
        rows.append(originals[start : start + cols])
        rows.append(reconstructions[start : start + cols])
    stacked = []
    for r in rows:
        if len(r) < cols:  # pad a short last row with black tiles
            r = np.concatenate([r, np.zeros((cols - len(r), *r.shape[1:]), dtype=np.uint8)])
        stacked.append(r)
    return image_grid(np.concatenate(stacked), cols=cols, scale=scale)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(history: Sequence[dict], path: str | Path, title: str = "Training") -> Path:
    """Train and test loss per epoch (and the MATLAB-unit test ELBO beside it)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    axes[0].plot(epochs, [h["test_loss"] for h in history], "s-", label="test loss")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss per image (training objective)")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    axes[1].plot(epochs, [h["test_matlab_elbo"] for h in history], "o-", color="tab:green")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("test MATLAB ELBO (0.5*SSE + KL)")
    axes[1].grid(alpha=0.3)
    if history:
        elapsed = sum(h.get("epoch_seconds", 0.0) for h in history)
        fig.suptitle(f"{title}: {len(history)} epochs, {elapsed:.0f} s of training")
    fig.tight_layout()
    return _save_fig(fig, path)


def trial_curves(rows: Sequence[dict], metric: str, path: str | Path) -> Path:
    """The search's metric per epoch, one line per trial, labelled by its parameters."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        if row["history"]:
            label = (
                f"K={row['latent_dim']} lr={row['lr']:.1e}"
                + (f" beta={row['beta']}" if row["beta"] != 1 else "")
                + (f" recon={row['recon_weight']}" if row.get("recon_weight", 1) != 1 else "")
            )
            style = "-" if row["status"] == "completed" else ":"
            ax.plot(range(1, len(row["history"]) + 1), row["history"], style, marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("search: dotted lines were stopped early")
    ax.grid(alpha=0.3)
    if any(row["history"] for row in rows):
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save_fig(fig, path)


def latent_scatter(
    points: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: str | Path, title: str, ax=None
) -> Path | None:
    """2-D latent map coloured by class; draws into `ax` when given (no file)."""
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for k, name in enumerate(classes):
        pick = labels == k
        if pick.any():
            ax.scatter(points[pick, 0], points[pick, 1], s=6, alpha=0.7, color=cmap(k % cmap.N), label=name)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best", framealpha=0.6)
    if fig is None:
        return None
    fig.tight_layout()
    return _save_fig(fig, path)


def histogram(values: np.ndarray, path: str | Path, xlabel: str, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.hist(values, bins=60, color="tab:blue", alpha=0.85)
    ax.axvline(float(np.median(values)), color="tab:red", ls="--", label=f"median {np.median(values):.2f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return _save_fig(fig, path)


def labelled_rows(strips: Sequence[np.ndarray], names: Sequence[str], path: str | Path, title: str) -> Path:
    """Image strips (each (H, W, C) uint8) stacked with a name to the left of each."""
    plt = _pyplot()
    height = sum(s.shape[0] for s in strips) / 80 + 0.6
    fig, axes = plt.subplots(len(strips), 1, figsize=(12, max(2.0, height)), squeeze=False)
    for ax, strip, name in zip(axes[:, 0], strips, names, strict=True):
        ax.imshow(
            strip[..., 0] if strip.shape[2] == 1 else strip, cmap="gray", vmin=0, vmax=255, interpolation="nearest"
        )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    return _save_fig(fig, path)


def metric_by_setting(
    names: Sequence[str], series: dict[str, Sequence[float]], path: str | Path, xlabel: str, title: str
) -> Path:
    """One line per metric over a few named settings (e.g. latent sizes)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (label, values) in zip(axes[0], series.items(), strict=True):
        ax.plot(range(len(names)), values, "o-")
        for i, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (i, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save_fig(fig, path)


def recon_and_maps(
    truth: np.ndarray,
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    labels: np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    title: str,
) -> Path:
    """Ground truth, then per setting its reconstruction grid above a 2-D
    latent map coloured by class. `panels`: (name, recon grid, points)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        2,
        len(panels) + 1,
        figsize=(5.5 * (len(panels) + 1), 10),
        gridspec_kw={"height_ratios": [1, 1.3]},
        squeeze=False,
    )

    def show(ax, grid: np.ndarray, name: str) -> None:
        ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])

    show(axes[0, 0], truth, "ground truth")
    axes[1, 0].axis("off")
    for col, (name, grid, points) in enumerate(panels, start=1):
        show(axes[0, col], grid, name)
        latent_scatter(points, labels, classes, None, f"t-SNE of test means: {name}", ax=axes[1, col])
    fig.suptitle(title)
    fig.tight_layout()
    return _save_fig(fig, path)


def _save_fig(fig, path: str | Path) -> Path:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    storage.write_local_atomic(Path(path), buffer.getvalue(), durable=False)
    return Path(path)
