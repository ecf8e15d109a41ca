"""Shared pieces of the benchmark scripts: the reference data, the command
line, and the plain-PyTorch reference loop every vae-ray figure is held
against."""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_ray.images import to_float  # noqa: E402
from vae_ray.model import batch_terms, build_model  # noqa: E402

DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
EXE = shutil.which("vae-ray") or str(Path(sys.executable).parent / "vae-ray")


def mnist_source() -> str:
    return os.environ.get("VAE_RAY_MNIST_DIR", str(DEFAULT_MNIST))


def timed(command: list[str], **kwargs) -> float:
    """Wall seconds of a whole command (it must succeed)."""
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - started


def lr_at(peak: float, schedule: str, step: int, total: int) -> float:
    """The same per-step schedule vae-ray uses (worker.lr_at)."""
    if schedule == "constant" or total <= 0:
        return peak
    progress = min(step / total, 1.0)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    if progress < 0.1:
        return peak * (0.1 + 0.9 * progress / 0.1)
    return peak * 0.5 * (1 + math.cos(math.pi * (progress - 0.1) / 0.9))


def plain_training(
    train: torch.Tensor,
    test: torch.Tensor,
    latent: int,
    epochs: int,
    batch: int,
    lr: float,
    beta2: float = 0.99,
    schedule: str = "onecycle",
    save_to: Path | None = None,
    seed: int = 0,
    arch: str = "mnist",
) -> list[float]:
    """What a plain script does: train in memory, score the test split and
    save a checkpoint after every epoch. Returns the test MATLAB ELBO per epoch."""
    torch.manual_seed(seed)
    model = build_model(arch, tuple(train.shape[1:]), latent, loss="matlab")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, beta2))
    steps = len(train) // batch
    total, step, scores = steps * epochs, 0, []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train))
        for i in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(lr, schedule, step, total)
            x = to_float(train[order[i * batch : (i + 1) * batch]])
            logits, mu, logvar = model(x)
            loss = batch_terms(model, x, x, logits, mu, logvar).loss.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        model.eval()
        with torch.no_grad():
            total_elbo = 0.0
            for j in range(0, len(test), 1000):
                x = to_float(test[j : j + 1000])
                mu, logvar = model.encode(x)
                logits = model.decode(model.reparameterize(mu, logvar))
                total_elbo += batch_terms(model, x, x, logits, mu, logvar).matlab_elbo.sum().item()
        scores.append(total_elbo / len(test))
        if save_to is not None:
            save_to.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                save_to / f"epoch_{epoch:04d}.pt",
            )
    return scores


def report_pairs(name: str, pairs: list[tuple[float, float]], goal: str, higher_is_better: bool = False) -> None:
    """Print each back-to-back pair and the median ratio (vae-ray / plain)."""
    ratios = []
    for k, (plain, ours) in enumerate(pairs, start=1):
        ratio = ours / plain
        ratios.append(ratio)
        print(f"run {k}: plain {plain:7.1f} s | vae-ray {ours:7.1f} s | vae-ray / plain = {ratio:.2f}", flush=True)
    print(f"{name}: median vae-ray / plain = {statistics.median(ratios):.2f}  ({goal})")
