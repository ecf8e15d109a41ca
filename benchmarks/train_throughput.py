"""Training throughput of `vae-ray train` against a plain PyTorch loop.

    python benchmarks/train_throughput.py [--data DIR] [--threads 2] [--epochs 3]

Both train the MATLAB example's model (latent 16, `matlab` loss, Adam 1e-3,
batch 128) on the full MNIST training split with the same torch thread count,
back to back. The plain loop keeps the whole split in memory as a uint8
tensor and shuffles it every epoch: the fastest honest baseline. For
`vae-ray train` (one worker: in the command's own process, no cluster named) the figure is the best
steady-state epoch (epochs 2+), as reported in its metrics.jsonl.
Prints both images/s and the ratio (goal: >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_ray.data import prepare, read_arrays  # noqa: E402
from vae_ray.images import to_float  # noqa: E402
from vae_ray.model import batch_terms, build_model  # noqa: E402

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def plain_loop(data: str, threads: int, batch: int = 128, epochs: int = 1) -> float:
    """images/s of a minimal in-memory PyTorch loop over the same model."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    images, _ = read_arrays(data, "train")
    images = torch.from_numpy(images.copy())
    model = build_model("mnist", (28, 28, 1), 16, loss="matlab")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rates = []
    for _ in range(epochs):
        order = torch.randperm(len(images))
        start = time.perf_counter()
        steps = len(images) // batch
        for i in range(steps):
            x = to_float(images[order[i * batch : (i + 1) * batch]])
            logits, mu, logvar = model(x)
            loss = batch_terms(model, x, x, logits, mu, logvar).loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(steps * batch / (time.perf_counter() - start))
    return max(rates)


def vae_ray_train(data: str, threads: int, epochs: int, workdir: Path) -> tuple[float, list[dict]]:
    exe = shutil.which("vae-ray") or str(Path(sys.executable).parent / "vae-ray")
    run = workdir / "run"
    subprocess.run(
        [
            exe,
            "train",
            "--data",
            data,
            "--out",
            str(run),
            "--epochs",
            str(epochs),
            "--latent-dim",
            "16",
            "--batch-size",
            "128",
            "--lr",
            "1e-3",
            "--loss",
            "matlab",
            "--workers",
            "1",
            "--cpus-per-worker",
            str(threads),
            "--json",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [h["train_images_per_s"] for h in history[1:]] or [history[0]["train_images_per_s"]]
    return max(steady), history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a prepared MNIST folder (default: prepare one from --source)")
    parser.add_argument("--source", default=os.environ.get("VAE_RAY_MNIST_DIR", str(DEFAULT_SOURCE)))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "mnist")
            prepare("mnist", data, args.source)
        plain = plain_loop(data, args.threads)
        ours, history = vae_ray_train(data, args.threads, args.epochs, Path(tmp))
    first = history[0]["train_images_per_s"]
    print(f"plain PyTorch loop : {plain:8,.0f} images/s  ({args.threads} threads, batch 128, in memory)")
    print(f"vae-ray train      : {ours:8,.0f} images/s  (steady-state epoch; epoch 1 at {first:,.0f})")
    print(f"ratio              : {ours / plain:8.2f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
