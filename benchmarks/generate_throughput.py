"""`vae-ray generate` against one plain process, start-up included.

    python benchmarks/generate_throughput.py [--checkpoint RUN] [--num 100000]

The plain process loads the same checkpoint, decodes the same latent vectors
in batches of 256 with torch, and saves each image with Pillow into folders
of 10,000, as a straightforward script would. `vae-ray generate` runs as the
whole command (Ray start-up, actor pool, exactly-once writes, manifest).
Without --checkpoint, a model is first trained for one epoch on 10,000 MNIST
images. Prints images/s for both, the ratio (goal >= 1.5 for PNG), and the
Parquet throughput.

Writing 100,000 small files is at the mercy of the file system, so the two
are measured in --pairs back-to-back pairs (the order alternating), each into
a fresh folder, and nothing is deleted until the end: on ext4 without a
journal, creating files within about 30 s of a mass deletion is several times
slower (the kernel's inode allocator skips recently deleted inodes), which is
what made single runs disagree by 2x. The script also waits --settle seconds
first, for the deletions of whatever ran before it. The median ratio is the
figure. `--dir /dev/shm` writes to memory instead, which takes the disk out
of the comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_ray import checkpoint as ckpt  # noqa: E402
from vae_ray.keyed_random import latent_normals  # noqa: E402

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
            for i, img in zip(idx, pixels[:, 0].numpy(), strict=True):
                folder = out / f"{i // 10000:05d}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(folder / f"{i:09d}.png")
    return time.perf_counter() - start


def vae_ray_generate(checkpoint: str, num: int, out: Path, fmt: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [EXE, "generate", checkpoint, "--num", str(num), "--out", str(out), "--format", fmt],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def quick_model(workdir: Path, source: str) -> str:
    data, run = workdir / "mnist", workdir / "run"
    subprocess.run(
        [EXE, "data", "prepare", "mnist", "--source", source, "--out", str(data), "--limit", "10000"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            EXE,
            "train",
            "--data",
            str(data),
            "--out",
            str(run),
            "--epochs",
            "1",
            "--cpus-per-worker",
            str(os.cpu_count() or 1),
            "--json",
        ],
        check=True,
        capture_output=True,
    )
    return str(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--source", default=os.environ.get("VAE_RAY_MNIST_DIR", str(DEFAULT_SOURCE)))
    parser.add_argument("--num", type=int, default=100_000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=40.0)
    parser.add_argument("--dir", default=".", help="where the sets are written (e.g. /dev/shm to leave the disk out)")
    args = parser.parse_args()
    n = args.num
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or quick_model(work, args.source)
        time.sleep(args.settle)
        ratios = []
        for pair in range(args.pairs):
            plain_dir, ours_dir = work / f"plain{pair}", work / f"png{pair}"
            if pair % 2 == 0:
                plain = plain_process(checkpoint, n, plain_dir)
                ours = vae_ray_generate(checkpoint, n, ours_dir, "png")
            else:
                ours = vae_ray_generate(checkpoint, n, ours_dir, "png")
                plain = plain_process(checkpoint, n, plain_dir)
            ratios.append(plain / ours)
            print(
                f"pair {pair + 1}: plain process (Pillow) {plain:6.1f} s {n / plain:7,.0f} images/s | "
                f"vae-ray generate png {ours:6.1f} s {n / ours:7,.0f} images/s | ratio {plain / ours:.2f}x",
                flush=True,
            )
        parquet = vae_ray_generate(checkpoint, n, work / "parquet", "parquet")
    print(f"median ratio            : {statistics.median(ratios):.2f}x  (goal >= 1.5x; start-up included)")
    print(f"vae-ray generate parquet: {parquet:6.1f} s  {n / parquet:8,.0f} images/s")


if __name__ == "__main__":
    main()
