"""Where one training step's time goes: the worker's own step (worker.train_step), timed and traced.

    python benchmarks/step_profile.py [--arch mnist] [--batch 512] [--steps 20] [--out DIR] [--dry-run]

For each variant that applies to the device it prints the steady-state
milliseconds per step (the mean of `--steps` steps after warm-up, timed
between device synchronisations) and, from a torch.profiler trace of those
steps, the device's kernel time per step. A step whose kernels fill under
half of its time is launch-bound (the host cannot issue kernels fast enough:
CUDA graphs help); above that it is kernel-bound (bf16, channels-last and a
larger batch help). Variants:

- eager: the step `vae-ray train` runs (fp32, fused Adam on GPUs);
- bf16: the same under bf16 autocast (`--precision bf16`);
- graph: the step `vae-ray train --gpu` runs by default for one worker
  (vae_ray/graphed.py): forward, backward and capturable Adam captured once
  as a CUDA graph and replayed, the batch copied into it (uncaptured on a
  CPU); graph_bf16 (CUDA only) the same under bf16 autocast.

With --out DIR the traces are written as Chrome traces (open them in
chrome://tracing or Perfetto) and the figures as step_profile.json.
--dry-run runs every CPU variant for 3 steps at batch 32: it checks the
script, it measures nothing. --shape, --loss, --width and --depth time
another network (gpu_suite.py sizes its timed runs from such a probe), and
--variants picks some of the variants.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_ray.config import TrainConfig  # noqa: E402
from vae_ray.graphed import StaticStep  # noqa: E402
from vae_ray.model import build  # noqa: E402
from vae_ray.spec import ModelSpec  # noqa: E402
from vae_ray.trainer import resolve  # noqa: E402
from vae_ray.worker import Run, autocast_for, binarizes, make_optimizer, train_step  # noqa: E402

SHAPES = {"mnist": (28, 28, 1), "hvae": (28, 28, 1), "cifar": (32, 32, 3)}  # each network at its dataset's size
LAUNCH_BOUND_BELOW = 0.5  # kernel time over step time


def make_run(
    arch: str,
    batch: int,
    device: torch.device,
    precision: str,
    capturable: bool = False,
    shape: tuple[int, int, int] | None = None,
    **settings,
) -> Run:
    """The worker's Run for one network; `settings` are further TrainConfig fields (loss, width, depth)."""
    shape = shape or SHAPES.get(arch, (28, 28, 1))
    meta = {"root": "-", "shape": list(shape), "num_classes": 10, "splits": {"train": {"count": 60_000}}}
    # The architecture's own recipe (learning rate, Adam's beta2, clipping) and default loss, as `train` resolves them.
    cfg = resolve(
        TrainConfig(
            data="-", out="profile-run", arch=arch, latent_dim=16, batch_size=batch, precision=precision, **settings
        ),
        meta,
    )
    dataset = {"name": "profile", "shape": list(shape), "num_classes": 10}
    torch.manual_seed(0)
    core = build(ModelSpec.from_config(cfg, dataset)).to(device)
    if device.type == "cpu":
        core = core.to(memory_format=torch.channels_last)  # as the worker does
    optimizer = make_optimizer(cfg, core, capturable=capturable)
    return Run(cfg, core, core, None, optimizer, 1, device, batch, 10**6, 10**6)


def batches(shape: tuple, batch: int, device: torch.device, count: int):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, batch, *shape), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, (count, batch), generator=g).to(device)
    return images, labels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_steps(run: Run, images, labels):
    scaler = torch.amp.GradScaler(run.device.type, enabled=False)
    autocast = autocast_for(run.cfg.precision, run.device)
    binarize = binarizes(run.cfg)

    def step(i: int) -> None:
        train_step(run, images[i % len(images)], labels[i % len(labels)], 1.0, scaler, autocast, binarize)

    return step


def graph_steps(run: Run, images, labels):
    """The worker's own graphed step (vae_ray/graphed.py): three warm-up steps,
    then the whole step (forward, backward, capturable Adam) captured once and
    replayed. On a CPU the same step runs uncaptured (the dry run checks it)."""
    binarize = binarizes(run.cfg)
    static = StaticStep(run, binarize, capture=run.device.type == "cuda")

    def step(i: int) -> None:
        static(images[i % len(images)], labels[i % len(labels)], run.cfg.lr, 1.0)

    step.static = static  # measure() reports whether it was captured
    return step


def measure(name: str, step, device: torch.device, steps: int, warmup: int, out: Path | None) -> dict:
    for i in range(warmup):
        step(i)
    sync(device)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    ms = (time.perf_counter() - started) * 1000 / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(i)
        sync(device)
    row = {"variant": name, "ms_per_step": round(ms, 3)}
    if hasattr(step, "static"):
        row["captured"] = step.static.graph is not None
    if device.type == "cuda":
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
        row["kernel_ms_per_step"] = round(kernel_us / 1000 / steps, 3)
        row["bound"] = "launch" if row["kernel_ms_per_step"] < LAUNCH_BOUND_BELOW * ms else "kernel"
    if out is not None:
        prof.export_chrome_trace(str(out / f"trace_{name}.json"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mnist", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--shape", help="H,W,C (default: the network's dataset)")
    parser.add_argument("--loss", default="auto")
    parser.add_argument("--width", type=int, default=0)
    parser.add_argument("--depth", type=int, default=0)
    parser.add_argument("--variants", help="a comma-separated subset of eager,bf16,graph,graph_bf16")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    warmup = 5
    if args.dry_run:
        args.batch, args.steps, warmup = 32, 3, 1
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the worker sets it
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else SHAPES[args.arch]
    settings = {"loss": args.loss, "width": args.width, "depth": args.depth}
    rows = []
    variants = [("eager", "fp32", eager_steps), ("bf16", "bf16", eager_steps), ("graph", "fp32", graph_steps)]
    if device.type == "cuda":
        variants.append(("graph_bf16", "bf16", graph_steps))
    if args.variants:
        variants = [v for v in variants if v[0] in args.variants.split(",")]
    for name, precision, make in variants:
        capturable = name.startswith("graph") and device.type == "cuda"
        run = make_run(args.arch, args.batch, device, precision, capturable, shape, **settings)
        images, labels = batches(shape, args.batch, device, 4)
        try:
            rows.append(measure(name, make(run, images, labels), device, args.steps, warmup, args.out))
        except RuntimeError as exc:  # a variant this device or network cannot run
            rows.append({"variant": name, "error": str(exc).splitlines()[0][:200]})
        print(json.dumps(rows[-1]), flush=True)
    report = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "arch": args.arch,
        "shape": list(shape),
        **settings,
        "batch": args.batch,
        "steps": args.steps,
        "dry_run": args.dry_run,
        "variants": rows,
    }
    if args.out is not None:
        (args.out / "step_profile.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
