"""`train_loop`: the function every Ray Train worker runs (one DDP rank).

Numbered comments mark the Ray-specific steps, as in Ray's own examples.
The driver side (building the TorchTrainer, following it) is `trainer.py`.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import graphed
from .config import TrainConfig
from .images import to_float
from .ingest import MemoryFeed, StreamFeed, eval_batches, rank_batch, steps_per_epoch
from .keyed_random import binarize as keyed_binarize
from .model import VAE, batch_terms, build
from .rundir import checkpoint_name
from .session import RaySession
from .spec import LIKELIHOODS, ModelSpec
from .tracking import EpochLogger

CHECK_EVERY = 20  # steps between non-finite checks and progress updates
EVAL_BATCH = 256  # measured: 25% faster per image than 1,000 on CPU (caches)
# glibc's malloc: keep freed activation buffers in the process (see keep_freed_memory).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit
TRIM_THRESHOLD = 256 * 2**20


def train_loop(loop_config: dict[str, Any], session=None) -> None:
    """The per-worker training function handed to TorchTrainer; called
    directly, with a session.LocalSession, for a run in one process."""
    session = session or RaySession()
    cfg = TrainConfig.from_dict(loop_config["config"])
    dataset = loop_config["dataset"]
    rank, world = session.rank_world()

    # 1. Threads, memory, seeds and device for this rank.
    torch.set_num_threads(cfg.cpus_per_worker)
    keep_freed_memory()
    seed_everything(cfg.seed + rank)
    device = session.device()
    if device.type == "cuda":
        # The batch shape is fixed for a whole run: let cuDNN time its
        # convolution algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True

    # 2. Model (DDP-wrapped when world > 1), optimizer and weight average.
    core = build(ModelSpec.from_config(cfg, dataset))
    if device.type == "cpu":
        # oneDNN's native layout: the MNIST network's training steps run about
        # 20% faster and scoring about 40% faster on 2 cores (as generate and
        # evaluate already run). The images arrive channels-last from to_float.
        core = core.to(memory_format=torch.channels_last)
    model = session.prepare_model(core)
    # The step as one CUDA graph where it can be captured (graphed.py says when).
    graph_blocker = graphed.blocker(cfg, device, world, loop_config["ingest"])
    optimizer = make_optimizer(cfg, model, capturable=graph_blocker is None)
    flags = graphed.implementation(optimizer)
    averaged = copy.deepcopy(core).requires_grad_(False) if cfg.ema else None
    served = averaged if averaged is not None else core  # what is evaluated, saved and sampled

    # 3. Resume from the latest checkpoint (after --resume, or a restart after a failure).
    start_epoch, global_step = 1, 0
    with session.checkpoint() as directory:
        if directory is None and loop_config.get("resume_from"):
            # Ray Train keeps no record of checkpoints written in one process: the run's own `latest`.
            directory = str(ckpt.local_copy(loop_config["resume_from"]))
        if directory is not None:
            state = ckpt.restore(directory, core, optimizer, averaged, device)
            start_epoch, global_step = state["epoch"] + 1, state["global_step"]
            graphed.keep_implementation(optimizer, flags)  # a checkpoint from another device or mode

    # 4. This rank's share of the data: in memory, or streamed by Ray Data.
    if loop_config["ingest"] == "memory":
        feed = MemoryFeed(dataset, rank, world, device, cfg.seed)
    else:
        feed = StreamFeed(session.dataset_shard("train"), dataset["shape"], device, cfg.seed, rank)
    batch = rank_batch(cfg.batch_size, world, rank)
    steps = steps_per_epoch(dataset["counts"]["train"], cfg.batch_size, world)
    # The schedule is defined per global step of the configured geometry, whatever the world size.
    total_steps = cfg.epochs * (dataset["counts"]["train"] // cfg.batch_size)
    run = Run(
        cfg,
        model,
        core,
        averaged,
        optimizer,
        world,
        device,
        batch,
        steps,
        total_steps,
        global_step,
        session.board(loop_config.get("progress_board")) if rank == 0 else None,
        loop_config.get("progress_key", ""),
    )
    if graph_blocker is None:
        run.static = graphed.StaticStep(run, binarizes(cfg), capture=True)
    logger = None
    if rank == 0:  # a search's trial logs before its report: the search may end its workers right after
        tracking = loop_config.get("tracking", {})
        logger = EpochLogger(loop_config["run"], tracking, cfg, dataset, background=not loop_config.get("trial"))

    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            # 5. One epoch of training: the same number of steps on every rank.
            started = time.perf_counter()
            sums, stopped = train_epoch(run, feed, epoch)
            if stopped:
                if logger is not None:  # W&B would show its run as running until this worker exits
                    logger.close()
                session.report({"epoch": epoch, "stopped": stopped}, None, checkpoint_name(epoch))
                return
            sync(device)
            train_seconds = time.perf_counter() - started

            # 6. The test split, every epoch, every row exactly once across the ranks.
            test = evaluate(served, dataset, cfg, rank, world, device)
            totals = all_sum(sums, world)
            seen = totals[0].item()
            metrics = {
                "epoch": epoch,
                "train_loss": totals[1].item() / seen,
                "train_recon": totals[2].item() / seen,
                "train_kl": totals[3].item() / seen,
                **{f"test_{k}": v for k, v in test.items()},
                "beta": beta_at(cfg, epoch, steps, steps),
                "lr": float(optimizer.param_groups[0]["lr"]),  # a tensor under a CUDA graph
                "train_images_per_s": seen / train_seconds,
                "epoch_seconds": time.perf_counter() - started,
                "train_seconds": train_seconds,
                "global_step": run.global_step,
                "workers": world,
                "nodes": count_nodes(world),
                "ingest": feed.kind,
                "cuda_graph": run.static is not None and run.static.graph is not None,  # the steps replay one graph
                "cuda_graph_setup_s": round(run.static.setup_seconds, 3) if run.static is not None else 0.0,
                "started_at_epoch": start_epoch,  # > 1 after a resume or a restart from a checkpoint
            }

            # 7. Experiment tracking: rank 0 draws the pictures now and logs them
            #    while the next epoch trains (a search's trial: before the report).
            if logger is not None:
                logger.epoch(metrics, served, device)

            # 8. Report (a barrier on every rank); rank 0 alone writes the checkpoint.
            report(
                session,
                metrics,
                epoch,
                rank,
                served,
                core if averaged is not None else None,
                optimizer,
                dataset,
                run.global_step,
                loop_config,
            )
    except BaseException:  # the run's own error is the one reported, not a logging error behind it
        if logger is not None:
            logger.close(failing=True)
        raise
    finally:  # however the loop ends (done, stopped, an error): TensorBoard and W&B closed
        if logger is not None:
            logger.close()


@dataclass
class Run:
    """What a rank's training steps share."""

    cfg: TrainConfig
    model: torch.nn.Module  # DDP-wrapped when world > 1
    core: VAE  # the model itself
    averaged: VAE | None  # the weight average (--ema)
    optimizer: torch.optim.Optimizer
    world: int
    device: torch.device
    batch: int  # this rank's share of the global batch
    steps: int  # steps per epoch, the same on every rank
    total_steps: int  # the schedule's length in global steps
    global_step: int = 0
    board: Any = None  # the driver's progress board (rank 0 only)
    board_key: str = ""
    static: graphed.StaticStep | None = None  # the step as a CUDA graph, where it applies


def train_epoch(run: Run, feed, epoch: int) -> tuple[torch.Tensor, str | None]:
    """One epoch; returns (sums of images/loss/recon/kl, why it stopped or None)."""
    cfg, device, world = run.cfg, run.device, run.world
    run.model.train()
    started = time.perf_counter()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast = autocast_for(cfg.precision, device)
    # Loss sums stay on the device and images are counted on the host: a
    # per-step count copied to a GPU would make every step wait for the host.
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, recon, kl
    images_seen = 0
    window = torch.zeros((), device=device)
    binarize = binarizes(cfg)
    for step, (images, labels, _) in enumerate(feed.batches(epoch, run.batch, run.steps), start=1):
        beta = beta_at(cfg, epoch, step, run.steps)
        if run.static is not None:
            terms, loss = run.static(images, labels, lr_at(cfg, run.global_step, run.total_steps), beta)
        else:
            terms, loss = train_step(run, images, labels, beta, scaler, autocast, binarize)
        sums += torch.stack(
            [terms.loss.detach().sum().double(), terms.recon.detach().sum().double(), terms.kl.detach().sum().double()]
        )
        images_seen += len(images)
        window = window + loss.detach()
        if step % CHECK_EVERY == 0 or step == run.steps:
            if not all_finite(window, world):  # checked together, so every rank stops at the same step
                return _with_count(images_seen, sums), f"non-finite loss at epoch {epoch}, step {step}"
            window = torch.zeros((), device=device)
            if run.board is not None:
                run.board.update.remote(
                    key=run.board_key,
                    epoch=epoch,
                    epochs=cfg.epochs,
                    step=step,
                    steps=run.steps,
                    loss=sums[0].item() / max(images_seen, 1),
                    images_per_s=images_seen * world / (time.perf_counter() - started),
                )
    return _with_count(images_seen, sums), None


def train_step(run: Run, images, labels, beta: float, scaler, autocast, binarize: bool):
    """One optimiser step on one batch of uint8 images, with nothing that
    waits for the device; returns the batch's terms and the step's loss.
    benchmarks/step_profile.py times exactly this (and graphed.StaticStep)."""
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(cfg, run.global_step, run.total_steps)
    terms, loss = step_loss(run, images, labels, beta, autocast, binarize)
    run.optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip:
        scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    scaler.step(run.optimizer)
    scaler.update()
    run.global_step += 1
    if run.averaged is not None:
        update_average(run.averaged, run.core, cfg.ema, run.global_step)
    return terms, loss


def binarizes(cfg: TrainConfig) -> bool:
    """Whether training draws Bernoulli targets from the grey levels (dynamic binarisation)."""
    return bool(cfg.binarize and LIKELIHOODS[cfg.loss].binarize)


def step_loss(run: Run, images, labels, beta, autocast, binarize: bool):
    """A step's forward pass: the batch's per-image terms and the loss to
    differentiate. `beta` is a float, or a device tensor under a CUDA graph."""
    cfg = run.cfg
    x = to_float(images)
    target = torch.bernoulli(x) if binarize else x
    with autocast:
        logits, mu, logvar = run.model(x, labels if cfg.conditional else None, samples=cfg.z_samples)
    terms = batch_terms(run.core, x, target, logits, mu, logvar, beta, cfg.recon_weight)
    # DDP averages gradients over ranks: scaling each rank's sum by world /
    # batch_size makes the step the mean over the global batch, even when
    # ranks hold batches one image apart.
    return terms, terms.loss.sum() * (run.world / cfg.batch_size)


def _with_count(images: int, sums: torch.Tensor) -> torch.Tensor:
    """(images, loss, recon, kl) sums, one tensor for the ranks' all-reduce."""
    return torch.cat([torch.tensor([float(images)], dtype=torch.float64, device=sums.device), sums])


@torch.no_grad()
def evaluate(
    core: VAE, dataset: dict, cfg: TrainConfig, rank: int, world: int, device: torch.device
) -> dict[str, float]:
    """Per-image means over the test split (each rank scores its rows), summed
    across ranks. The Bernoulli target is the index-keyed binarisation that
    `vae-ray evaluate` uses, so both report the same figures."""
    core.eval()
    binarize = binarizes(cfg)
    autocast = autocast_for(cfg.precision, device)
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for images, labels, indices in eval_batches(dataset, rank, world, EVAL_BATCH, device):
        x = to_float(images)
        target = keyed_binarize(x, cfg.seed, indices.cpu().numpy()) if binarize else x
        y = labels if cfg.conditional else None
        with autocast:
            logits, mu, logvar = core(x, y)
        t = batch_terms(core, x, target, logits, mu, logvar, cfg.beta, cfg.recon_weight)
        sums += torch.stack(
            [torch.tensor(float(len(x)), device=device, dtype=torch.float64)]
            + [v.sum().double() for v in (t.loss, t.recon, t.kl, t.neg_elbo_nats, t.matlab_elbo)]
        )
    core.train()
    totals = all_sum(sums, world)
    n = max(totals[0].item(), 1.0)
    names = ("loss", "recon", "kl", "neg_elbo_nats", "matlab_elbo")
    return {name: totals[i + 1].item() / n for i, name in enumerate(names)} | {"images": int(totals[0].item())}


def report(
    session,
    metrics: dict,
    epoch: int,
    rank: int,
    served: VAE,
    training_weights: VAE | None,
    optimizer,
    dataset: dict,
    global_step: int,
    loop_config: dict,
) -> None:
    name = checkpoint_name(epoch)
    if rank != 0:
        session.report(metrics, None, name)
        return
    # Not a context manager: where Ray Train uploads in the background it
    # deletes the folder itself once the upload is done.
    tmp, handed_over = tempfile.mkdtemp(prefix="vae-ray-checkpoint-"), False
    try:
        ckpt.save(
            Path(tmp),
            served,
            optimizer,
            {"epoch": epoch, "global_step": global_step, "metrics": metrics},
            loop_config["config"],
            dataset,
            training_weights=training_weights,
        )
        handed_over = session.report(metrics, tmp, name)
    finally:
        if not handed_over:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------
def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, capturable: bool = False) -> torch.optim.Optimizer:
    betas = (0.9, cfg.adam_beta2)
    # On GPUs the fused kernels update every tensor in one launch: the small
    # networks' steps are launch-bound there (about 6 ms per MNIST step at
    # batch 512 on an H100). CPUs keep the default implementation. Under a
    # CUDA graph, the capturable multi-tensor form (the launches no longer count).
    if capturable:
        fused = {"capturable": True, "foreach": True}
    else:
        fused = {"fused": True} if all(p.is_cuda for p in model.parameters()) else {}
    if cfg.weight_decay:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=betas, **fused)


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.lr_schedule == "constant" or total <= 0:
        return cfg.lr
    progress = min(step / total, 1.0)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    warm = 0.1  # onecycle: linear warm-up over the first 10%, then cosine decay
    if progress < warm:
        return cfg.lr * (0.1 + 0.9 * progress / warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (progress - warm) / (1 - warm)))


def beta_at(cfg: TrainConfig, epoch: int, step: int, steps: int) -> float:
    if cfg.kl_warmup_epochs <= 0:
        return cfg.beta
    done = (epoch - 1) + step / max(steps, 1)
    return cfg.beta * min(1.0, done / cfg.kl_warmup_epochs)


@torch.no_grad()
def update_average(averaged: VAE, model: VAE, decay: float, step: int) -> None:
    """One step of the weight average. The decay ramps up from 0.1 so the
    average does not remember the random initial weights; buffers (BatchNorm
    statistics) are copied, not averaged."""
    d = min(decay, (1 + step) / (10 + step))
    for avg, new in zip(averaged.parameters(), model.parameters(), strict=True):
        avg.lerp_(new, 1 - d)
    for avg, new in zip(averaged.buffers(), model.buffers(), strict=True):
        avg.copy_(new)


def all_finite(value: torch.Tensor, world: int) -> bool:
    bad = (~torch.isfinite(value)).float().reshape(1)
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def all_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def count_nodes(world: int) -> int:
    """Distinct Ray nodes the ranks run on (gathered over the process group)."""
    if world == 1:
        return 1
    import ray

    node = ray.get_runtime_context().get_node_id()
    everyone: list = [None] * world
    dist.all_gather_object(everyone, node)
    return len(set(everyone))


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keep_freed_memory() -> bool:
    """Stop glibc handing a training step's buffers back to the kernel.

    By default glibc serves allocations above 128 KiB with fresh mappings and
    trims freed heap memory, raising those limits only after it has freed a
    large block. A CPU worker's first epoch (batch 32: a few MiB per layer)
    therefore faulted in about 110,000 new pages a second, 15% of its CPU in
    the kernel, until the first test-split scoring (batches of 256) freed a
    block large enough to raise the limits; later epochs faulted none and ran
    about 20% faster. Fixed limits make the first epoch like the others.
    Returns whether they were set (not on a C library other than glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
