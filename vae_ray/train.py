"""Distributed training: `train_loop` runs on every Ray Train worker, `fit`
builds the `TorchTrainer` on the driver.

Run directory (RUN = RunConfig.storage_path / RunConfig.name):

    RUN/config.json                  the resolved config and dataset description
    RUN/metrics.jsonl                one line per epoch (written by RunDirCallback)
    RUN/checkpoint_epoch_0007/       Ray-persisted checkpoints, the newest few kept
    RUN/latest -> checkpoint_epoch_0007
    RUN/plots/, RUN/samples/         pictures written when the run ends
    RUN/ray-logs/                    Ray's own logs, kept out of the terminal
"""

from __future__ import annotations

import copy
import json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import TrainConfig
from .errors import RunFailed, UserError
from .ingest import ShardFeeder, to_float
from .model import VAE, batch_terms, build_model

CHECK_EVERY = 20          # steps between non-finite checks and progress updates
EVAL_BATCH = 1024


# ===========================================================================
# Worker side
# ===========================================================================
def train_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker training function handed to TorchTrainer."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["config"])
    dataset = loop_config["dataset"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    # 1. Threads, seeds and device for this rank.
    torch.set_num_threads(cfg.cpus_per_worker)
    _seed_everything(cfg.seed + rank)
    device = ray.train.torch.get_device()

    # 2. Model (DDP-wrapped when world > 1) and optimizer.
    model = build_model(cfg.arch, dataset["shape"], cfg.latent_dim,
                        dataset["num_classes"] if cfg.conditional else 0, cfg.loss)
    model = ray.train.torch.prepare_model(model)
    core: VAE = model.module if hasattr(model, "module") else model
    betas = (0.9, cfg.adam_beta2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay) \
        if cfg.weight_decay else torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=betas)

    # The weight average (--ema) is the model that is evaluated, saved and sampled.
    averaged = copy.deepcopy(core).requires_grad_(False) if cfg.ema else None
    served = averaged if averaged is not None else core

    # 3. Resume from the latest checkpoint (after --resume or a worker failure).
    start_epoch, global_step = 1, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            load = lambda name: torch.load(Path(directory) / name, map_location=device, weights_only=True)
            # With a weight average, model.pt is the average and training.pt the optimizer's weights.
            own = ckpt.TRAINING_WEIGHTS if (Path(directory) / ckpt.TRAINING_WEIGHTS).is_file() else "model.pt"
            core.load_state_dict(load(own))
            if averaged is not None:
                averaged.load_state_dict(load("model.pt"))
            optimizer.load_state_dict(load("optimizer.pt"))
            state = json.loads((Path(directory) / "state.json").read_text())
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]

    # 4. This worker's shards of the Ray Data splits.
    per_worker_batch = cfg.batch_size // world
    train_rows = dataset["counts"]["train"] // world
    steps_per_epoch = train_rows // per_worker_batch
    total_steps = steps_per_epoch * cfg.epochs
    train_feed = ShardFeeder(ray.train.get_dataset_shard("train"), dataset["shape"], per_worker_batch,
                             device, cfg.cache, train_rows, cfg.seed, rank,
                             shuffle_buffer=min(train_rows, 8 * per_worker_batch))
    test_feed = ShardFeeder(ray.train.get_dataset_shard("test"), dataset["shape"], EVAL_BATCH, device,
                            cfg.cache, dataset["counts"]["test"] // world, cfg.seed, rank)

    board = _progress_board(loop_config.get("progress_actor")) if rank == 0 else None
    autocast = _autocast(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    binarize = cfg.binarize and cfg.loss == "bernoulli"

    for epoch in range(start_epoch, cfg.epochs + 1):
        # 5. One epoch of training.
        model.train()
        epoch_start = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # images, loss, recon, kl
        window = torch.zeros((), device=device)
        stopped = None
        for step, (images, labels) in enumerate(train_feed.batches(epoch), start=1):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(cfg, global_step, total_steps)
            beta = _beta_at(cfg, epoch, step, steps_per_epoch)
            x = to_float(images)
            target = torch.bernoulli(x) if binarize else x
            y = labels if cfg.conditional else None
            with autocast:
                logits, mu, logvar = model(x, y, samples=cfg.z_samples)
            terms = batch_terms(core, x, target, logits, mu, logvar, beta, cfg.recon_weight)
            loss = terms.loss.mean()
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            global_step += 1
            if averaged is not None:
                _update_average(averaged, core, cfg.ema, global_step)
            n = x.shape[0]
            sums += torch.stack([torch.tensor(float(n), device=device, dtype=torch.float64),
                                 terms.loss.detach().sum().double(), terms.recon.detach().sum().double(),
                                 terms.kl.detach().sum().double()])
            window = window + loss.detach()
            if step % CHECK_EVERY == 0 or step == steps_per_epoch:
                # Checked together on every rank, so all stop at the same step.
                if not _all_finite(window, world):
                    stopped = f"non-finite loss at epoch {epoch}, step {step}"
                    break
                window = torch.zeros((), device=device)
                if board is not None:
                    seen = sums[0].item() * world
                    board.update.remote(epoch=epoch, epochs=cfg.epochs, step=step, steps=steps_per_epoch,
                                        loss=sums[1].item() / max(sums[0].item(), 1),
                                        images_per_s=seen / (time.perf_counter() - epoch_start))
        if stopped:
            ray.train.report({"epoch": epoch, "stopped": stopped})
            return
        _sync(device)
        train_seconds = time.perf_counter() - epoch_start

        # 6. The test split, every epoch.
        test = evaluate_feed(served, test_feed, epoch, cfg, device, world, autocast)
        totals = _all_sum(sums, world)
        images_seen = totals[0].item()
        metrics = {
            "epoch": epoch,
            "train_loss": totals[1].item() / images_seen,
            "train_recon": totals[2].item() / images_seen,
            "train_kl": totals[3].item() / images_seen,
            **{f"test_{k}": v for k, v in test.items()},
            "beta": _beta_at(cfg, epoch, steps_per_epoch, steps_per_epoch),
            "lr": optimizer.param_groups[0]["lr"],
            "train_images_per_s": images_seen / train_seconds,
            "epoch_seconds": time.perf_counter() - epoch_start,
            "train_seconds": train_seconds,
            "global_step": global_step,
            "workers": world,
            "cached": train_feed.cached,
            "started_at_epoch": start_epoch,  # > 1 after a resume or a restart from a checkpoint
        }

        # 7. Report (a barrier on every rank); rank 0 alone writes the checkpoint.
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt.save(Path(tmp), served, optimizer, {"epoch": epoch, "global_step": global_step,
                                                         "metrics": metrics},
                          loop_config["config"], dataset)
                if averaged is not None:  # the optimizer's own weights, to resume from
                    torch.save(core.state_dict(), Path(tmp) / ckpt.TRAINING_WEIGHTS)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")
        else:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")


@torch.no_grad()
def evaluate_feed(core: VAE, feed: ShardFeeder, epoch: int, cfg: TrainConfig, device: torch.device,
                  world: int, autocast) -> dict[str, float]:
    """Per-image means over this worker's test shard, summed across workers."""
    core.eval()
    # A fixed binarisation of the test set, identical every epoch.
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
    binarize = cfg.binarize and cfg.loss == "bernoulli"
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for images, labels in feed.batches(epoch, train=False):
        x = to_float(images)
        target = torch.bernoulli(x, generator=gen) if binarize else x
        with autocast:
            mu, logvar = core.encode(x, labels if cfg.conditional else None)
            logits = core.decode(core.reparameterize(mu, logvar), labels if cfg.conditional else None)
        t = batch_terms(core, x, target, logits, mu, logvar, cfg.beta, cfg.recon_weight)
        sums += torch.stack([torch.tensor(float(len(x)), device=device, dtype=torch.float64)] +
                            [v.sum().double() for v in (t.loss, t.recon, t.kl, t.neg_elbo_nats, t.matlab_elbo)])
    core.train()
    totals = _all_sum(sums, world)
    n = max(totals[0].item(), 1.0)
    names = ("loss", "recon", "kl", "neg_elbo_nats", "matlab_elbo")
    return {name: totals[i + 1].item() / n for i, name in enumerate(names)} | {"images": int(totals[0].item())}


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.lr_schedule == "constant" or total <= 0:
        return cfg.lr
    progress = min(step / total, 1.0)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    warm = 0.1  # onecycle: linear warm-up over the first 10%, then cosine decay
    if progress < warm:
        return cfg.lr * (0.1 + 0.9 * progress / warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (progress - warm) / (1 - warm)))


@torch.no_grad()
def _update_average(averaged: VAE, model: VAE, decay: float, step: int) -> None:
    """One step of the weight average. The decay ramps up from 0.1 so the
    average does not remember the random initial weights; buffers (BatchNorm
    statistics) are copied, not averaged."""
    d = min(decay, (1 + step) / (10 + step))
    for avg, new in zip(averaged.parameters(), model.parameters()):
        avg.lerp_(new, 1 - d)
    for avg, new in zip(averaged.buffers(), model.buffers()):
        avg.copy_(new)


def _beta_at(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    if cfg.kl_warmup_epochs <= 0:
        return cfg.beta
    done = (epoch - 1) + step / max(steps_per_epoch, 1)
    return cfg.beta * min(1.0, done / cfg.kl_warmup_epochs)


def _all_finite(value: torch.Tensor, world: int) -> bool:
    bad = (~torch.isfinite(value)).float().reshape(1)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def _all_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values)
    return values


def _autocast(precision: str, device: torch.device):
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _progress_board(name: str | None):
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name)
    except ValueError:
        return None


# ===========================================================================
# Driver side
# ===========================================================================
def resolve(cfg: TrainConfig, meta: dict[str, Any]) -> TrainConfig:
    """Fill in `auto` choices from the dataset and reject impossible combinations."""
    h, w, c = meta["shape"]
    arch = cfg.arch
    if arch == "auto":
        arch = "cifar" if c == 3 and h % 8 == 0 and w % 8 == 0 else "mnist"
    step = 4 if arch == "mnist" else 8
    if h % step or w % step:
        raise UserError(f"the {arch} network needs image sides divisible by {step}; {meta['root']} has {h}x{w}")
    loss = cfg.loss if cfg.loss != "auto" else ("matlab" if c == 1 else "gaussian")
    n_train = meta["splits"]["train"]["count"]
    if cfg.batch_size > n_train:
        raise UserError(f"batch_size {cfg.batch_size} is larger than the {n_train} training images")
    if n_train // cfg.workers < cfg.batch_size // cfg.workers:
        raise UserError(f"{cfg.workers} workers get {n_train // cfg.workers} images each, "
                        f"fewer than a per-worker batch of {cfg.batch_size // cfg.workers}")
    if cfg.conditional and meta["num_classes"] < 2:
        raise UserError(f"--conditional needs labelled data with at least 2 classes; {meta['root']} has "
                        f"{meta['num_classes']}")
    if cfg.binarize and loss != "bernoulli":
        raise UserError("binarize applies to the bernoulli loss only")
    return cfg.replace(arch=arch, loss=loss, data=meta["root"])


def dataset_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """What workers and checkpoints need to know about the data."""
    return {"name": meta["name"], "root": meta["root"], "shape": list(meta["shape"]),
            "classes": meta["classes"], "num_classes": meta["num_classes"],
            "synthetic": meta.get("synthetic", False),
            "counts": {s: meta["splits"][s]["count"] for s in meta["splits"]}}


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _make_run_dir_callback(run_dir: Path):
    import ray.train

    class RunDirCallback(ray.train.UserCallback):
        """On the Train controller after every report: append the epoch to
        metrics.jsonl (never twice) and point RUN/latest at its checkpoint."""

        def __init__(self, run_dir: str):
            self.run_dir = Path(run_dir)
            self.last_epoch: int | None = None  # read from metrics.jsonl once, on the controller

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            if "stopped" in m:
                (self.run_dir / "stopped.json").write_text(json.dumps(m) + "\n")
                return
            if self.last_epoch is None:
                self.last_epoch = max((h["epoch"] for h in read_history(self.run_dir)), default=0)
            if m["epoch"] > self.last_epoch:
                with open(self.run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(m) + "\n")
                self.last_epoch = m["epoch"]
            if checkpoint is not None:
                ckpt.point_latest(self.run_dir, Path(checkpoint.path))

    return RunDirCallback(str(run_dir))


def check_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a directory")
    holds_run = (run_dir / "metrics.jsonl").exists() or any(run_dir.glob("checkpoint_*"))
    if resume and not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir}: nothing to resume (no config.json); start it without --resume")
    if not resume and holds_run:
        raise UserError(f"{run_dir}: already holds a training run; pass --resume to continue it "
                        f"or choose a new --out")


def fit(cfg: TrainConfig, resume: bool = False, show: bool = True, address: str | None = None) -> dict[str, Any]:
    """Train with Ray Train; return a summary. The config must be validated."""
    from .data import read_meta

    meta = read_meta(cfg.data)
    cfg = resolve(cfg, meta)
    run_dir = Path(cfg.out).expanduser().resolve()
    check_run_dir(run_dir, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset = dataset_summary(meta)
    done = max((h["epoch"] for h in read_history(run_dir)), default=0)
    (run_dir / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "dataset": dataset}, indent=2) + "\n")
    (run_dir / "stopped.json").unlink(missing_ok=True)

    if done < cfg.epochs:
        _run_trainer(cfg, dataset, run_dir, meta, show, address)
    stopped = run_dir / "stopped.json"
    if stopped.exists():
        reason = json.loads(stopped.read_text())["stopped"]
        raise RunFailed(f"training stopped: {reason}; the last good checkpoint is {run_dir / 'latest'}")
    from .pictures import write_run_pictures

    pictures = write_run_pictures(run_dir, cfg.data)
    history = read_history(run_dir)
    return {"run_dir": str(run_dir), "epochs": len(history), "final": history[-1] if history else {},
            "checkpoint": str((run_dir / "latest").resolve()), **pictures}


def build_trainer(cfg: TrainConfig, dataset: dict, run_dir: Path, meta: dict, use_gpu: bool,
                  callbacks: list | None = None, progress_actor: str | None = None):
    """The TorchTrainer for one run: `vae-ray train` and every Tune trial use this."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .data import load_split

    train_ds = load_split(cfg.data, "train", meta).randomize_block_order(seed=cfg.seed)
    test_ds = load_split(cfg.data, "test", meta)
    resources_per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), "dataset": dataset, "progress_actor": progress_actor},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources_per_worker),
        run_config=ray.train.RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=[_make_run_dir_callback(run_dir), *(callbacks or [])]),
        datasets={"train": train_ds, "test": test_ds},
    )


def check_resources(cfg: TrainConfig, resources: dict) -> bool:
    """Whether the run uses GPUs; a UserError if the cluster cannot hold it."""
    use_gpu = cfg.gpu if cfg.gpu is not None else resources.get("GPU", 0) >= cfg.workers
    if use_gpu and resources.get("GPU", 0) < cfg.workers:
        raise UserError(f"--gpu asks for {cfg.workers} GPU worker(s) but the cluster has "
                        f"{int(resources.get('GPU', 0))} GPU(s)")
    if cfg.precision == "fp16" and not use_gpu:
        raise UserError("precision fp16 needs GPUs; use bf16 on CPUs")
    cpus = resources.get("CPU", 0)
    if cfg.workers * cfg.cpus_per_worker > cpus:
        raise UserError(f"{cfg.workers} workers x {cfg.cpus_per_worker} CPUs need "
                        f"{cfg.workers * cfg.cpus_per_worker} CPUs; the cluster has {int(cpus)}")
    return use_gpu


def _run_trainer(cfg: TrainConfig, dataset: dict, run_dir: Path, meta: dict, show: bool,
                 address: str | None) -> None:
    import threading
    import uuid

    import ray

    from .cluster import copy_ray_logs, ensure_ray
    from .progress import ProgressBoard, TrainingDisplay

    resources = ensure_ray(cfg.workers * cfg.cpus_per_worker + 1, address)
    use_gpu = check_resources(cfg, resources)
    board_name = f"vae-ray-progress-{uuid.uuid4().hex[:8]}"
    board = ProgressBoard.options(name=board_name).remote()
    trainer = build_trainer(cfg, dataset, run_dir, meta, use_gpu, progress_actor=board_name)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="vae-ray-fit", daemon=True)
    display = TrainingDisplay(board, enabled=show, history=lambda: read_history(run_dir))
    thread.start()
    try:
        display.follow(thread)
    finally:
        copy_ray_logs(run_dir / "ray-logs")
        ray.kill(board)
    error = outcome.get("error") or getattr(outcome.get("result"), "error", None)
    if error is not None:
        raise RunFailed(f"training failed: {root_cause(error)} (Ray logs: {run_dir / 'ray-logs'})")


def root_cause(exc: BaseException) -> str:
    """The innermost exception's first line: what actually went wrong on a worker."""
    seen = exc
    while True:
        nxt = seen.__cause__ or getattr(seen, "cause", None)
        if nxt is None or nxt is seen:
            break
        seen = nxt
    lines = [ln for ln in str(seen).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(seen).__name__)[:300]
