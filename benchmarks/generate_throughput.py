"""`vae-ray generate` against one plain process, start-up included.

    python benchmarks/generate_throughput.py [--checkpoint RUN] [--num 100000]

The plain process loads the same checkpoint, decodes the same latent vectors
in batches of 256 with torch, and saves each image with Pillow into folders
of 10,000, as a straightforward script would. `vae-ray generate` runs as the
whole command (Ray start-up, actor pool, exactly-once writes, manifest).
Without --checkpoint, a model is first trained for one epoch on 10,000 MNIST
images. Prints images/s for both, the ratio (goal >= 1.5 for PNG), and the
Parquet throughput.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_ray import checkpoint as ckpt  # noqa: E402
from vae_ray.generate import latent_normals  # noqa: E402

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
EXE = shutil.which("vae-ray") or str(Path(sys.executable).parent / "vae-ray")


def plain_process(checkpoint: str, num: int, out: Path) -> float:
    """Seconds for one process to decode and save `num` PNGs with Pillow."""
    from PIL import Image

    start = time.perf_counter()
    model = ckpt.load(checkpoint).model
    with torch.no_grad():
        for first in range(0, num, 256):
            idx = np.arange(first, min(first + 256, num))
            z = torch.from_numpy(latent_normals(0, idx, model.latent_dim))
            pixels = (model.mean_image(model.decode(z)).clamp(0, 1) * 255).round().to(torch.uint8)
            for i, img in zip(idx, pixels[:, 0].numpy()):
                folder = out / f"{i // 10000:05d}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(folder / f"{i:09d}.png")
    return time.perf_counter() - start


def vae_ray_generate(checkpoint: str, num: int, out: Path, fmt: str) -> float:
    start = time.perf_counter()
    subprocess.run([EXE, "generate", checkpoint, "--num", str(num), "--out", str(out), "--format", fmt],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def quick_model(workdir: Path, source: str) -> str:
    data, run = workdir / "mnist", workdir / "run"
    subprocess.run([EXE, "data", "prepare", "mnist", "--source", source, "--out", str(data), "--limit", "10000"],
                   check=True, capture_output=True)
    subprocess.run([EXE, "train", "--data", str(data), "--out", str(run), "--epochs", "1",
                    "--cpus-per-worker", str(os.cpu_count() or 1), "--json"], check=True, capture_output=True)
    return str(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--source", default=os.environ.get("VAE_RAY_MNIST_DIR", str(DEFAULT_SOURCE)))
    parser.add_argument("--num", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or quick_model(work, args.source)
        plain = plain_process(checkpoint, args.num, work / "plain")
        ours = vae_ray_generate(checkpoint, args.num, work / "png", "png")
        parquet = vae_ray_generate(checkpoint, args.num, work / "parquet", "parquet")
    n = args.num
    print(f"plain process (Pillow) : {plain:7.1f} s  {n / plain:8,.0f} images/s")
    print(f"vae-ray generate png   : {ours:7.1f} s  {n / ours:8,.0f} images/s  (start-up included)")
    print(f"ratio                  : {plain / ours:7.2f}x  (goal >= 1.5x)")
    print(f"vae-ray generate parquet: {parquet:6.1f} s  {n / parquet:8,.0f} images/s")


if __name__ == "__main__":
    main()
