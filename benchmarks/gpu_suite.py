"""The GPU figures in one command: see gpu_suite.sh, which sets up the environment and calls this.

    python benchmarks/gpu_suite.py --data DATA_DIR --out REPORT_DIR [--cifar | --nll] [--budget-s 540] [--dry-run]

The default run measures the GPU table (docs/benchmarks.md, "GPU"), most
telling first, and skips what would not finish within --budget-s:
1. 30 MNIST epochs, MATLAB network, batch 512, whole `vae-ray train --gpu` command;
2. one training step, eager, bf16 and as a CUDA graph (benchmarks/step_profile.py);
3. 1,000,000 images to Parquet, then as PNG files, whole `vae-ray generate --gpu` commands;
4. `vae-ray tune`, 16 trials of 5 epochs sharing the GPU, against one trial alone;
5. the same 30 epochs at the default batch of 32.
--cifar runs the CIFAR-10 quality measurement instead: the hierarchical
network with the discretised logistic mixture, sized for a GPU, trained for
the epochs that fit --cifar-train-s (8 minutes; a step is timed first),
scored in bits/dim by `vae-ray evaluate --gpu` on the whole test split.
--nll runs the MNIST likelihood measurement: the hierarchical network at its
default size, Bernoulli on binarised images, for the epochs that fit
--nll-train-s, then the importance-weighted NLL with K=1000 on the whole test
split. Each mode fits one device call of under 10 minutes. Writes REPORT_DIR/gpu_report.json and gpu_report.md (device,
date, every figure against its goal). --dry-run runs the same steps on the
CPU at a tiny size, so the suite itself is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXE = shutil.which("vae-ray") or str(Path(sys.executable).parent / "vae-ray")
HERE = Path(__file__).resolve().parent


DEADLINE = [float("inf")]  # perf_counter time by which every command must have ended (--budget-s)


def time_left(now: float) -> float | None:
    return None if DEADLINE[0] == float("inf") else max(5.0, DEADLINE[0] - now)


def run_cli(args: list[str], log) -> float:
    """A whole command's seconds. One that would outrun the budget is stopped
    (and named in the report) so that the figures before it still come back."""
    started = time.perf_counter()
    log.write(f"$ vae-ray {' '.join(args)}\n")
    log.flush()
    subprocess.run([EXE, *args], check=True, stdout=log, stderr=log, timeout=time_left(started))
    return time.perf_counter() - started


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


GOALS = {
    "mnist_30_epochs_seconds": "<= 25 (test MATLAB ELBO no worse than 18.32)",
    "step_ms_eager": "<= 1.5 (best variant)",
    "generate_parquet_command_images_per_s": ">= 150000",
    "generate_png_command_images_per_s": ">= 100000",
    "tune_max_trials_at_once": ">= 4",
    "tune_over_one_trial": "<= 2",
    "mnist_batch32_30_epochs_seconds": "<= 60",
    "cifar_bits_per_dim": "<= 4.0 after 8 minutes",
    "mnist_hvae_nll_iw_nats": "<= 82 (K=1000, full test split)",
}
# Seconds a step is given at most on a GPU: a step is skipped (and said so) when
# less than this is left of the budget.
RESERVE_S = {"profile": 60, "generate": 90, "tune": 200, "batch32": 240, "eager512": 60, "generate_ray": 60}
STEPS = ("train512", "profile", "generate", "tune", "batch32", "eager512", "generate_ray")


def steps_left(started: float, budget: float, step: str, figures: dict, dry: bool) -> bool:
    if dry or time.perf_counter() - started + RESERVE_S[step] <= budget:
        return True
    figures.setdefault("skipped", []).append(step)
    return False


def train_mnist(mnist: Path, run: Path, epochs: int, batch: int, gpu: list[str], log) -> tuple[float, list[dict]]:
    seconds = run_cli(
        [
            "train",
            "--data",
            str(mnist),
            "--out",
            str(run),
            "--epochs",
            str(epochs),
            "--arch",
            "mnist",
            "--loss",
            "matlab",  # the figures before the bernoulli default, in the same unit
            "--batch-size",
            str(batch),
            *(["--lr", "6e-3"] if batch >= 512 else []),  # large batches take a larger step
            "--latent-dim",
            "16",
            *gpu,
        ],
        log,
    )
    return seconds, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def generate(run: Path, out: Path, num: int, fmt: str, gpu: list[str], log) -> dict:
    shards = ["--shard-size", "500"] if num <= 2000 else []  # the dry run: several shards, as a real run has
    seconds = run_cli(["generate", str(run), "--num", str(num), "--format", fmt, "--out", str(out), *shards, *gpu], log)
    manifest = json.loads((out / "_manifest.json").read_text())
    return {"command": round(num / seconds), "job": round(num / manifest["seconds"]), "path": manifest.get("path", "")}


def tune(mnist: Path, out: Path, dims: str, lrs: str, epochs: int, gpu: list[str], log) -> tuple[float, int]:
    """Seconds of a whole search, and the most trials that ran at once (from
    each trial folder's first and last write)."""
    seconds = run_cli(
        [
            "tune",
            "--data",
            str(mnist),
            "--out",
            str(out),
            "--latent-dims",
            dims,
            "--lrs",
            lrs,
            "--epochs",
            str(epochs),
            "--grace-period",
            str(epochs),  # no early stopping: every trial runs its epochs
            "--batch-size",
            "512",
            *gpu,
        ],
        log,
    )
    spans = []
    for trial in (out / "trials").glob("[!.]*"):  # not the trials' lock files
        begun, ended = (trial / "config.json").stat().st_mtime, (trial / "metrics.jsonl").stat().st_mtime
        spans += [(begun, 1), (ended, -1)]
    at_once = most = 0
    for _, change in sorted(spans):
        at_once += change
        most = max(most, at_once)
    return seconds, most


EPOCH_OVERHEAD = 1.2  # an epoch's time over its steps' (the test split's figures, checkpoints, batches)


def probe_epochs(seconds: float, images: int, batch: int, network: list[str], variant: str, dry: bool, log) -> int:
    """The epochs that fit `seconds` of training: the network's steady-state
    step (benchmarks/step_profile.py, as the run will take it) times the
    steps of an epoch. A timed run sized this way ends on its schedule
    instead of being cut off in the middle of it."""
    # The variant the run takes, and the eager step should it fail to capture (CPUs have no bf16 graph).
    variants = "graph" if dry else f"{variant},{variant.replace('graph_', '').replace('graph', 'eager')}"
    probe = subprocess.run(
        [sys.executable, str(HERE / "step_profile.py"), *network, "--batch", str(batch), "--variants", variants]
        + (["--dry-run"] if dry else []),
        check=True,
        capture_output=True,
        text=True,
        timeout=time_left(time.perf_counter()),
    )
    log.write(probe.stdout)
    rows = [json.loads(line) for line in probe.stdout.splitlines() if line.startswith("{")]
    ms = next(
        r["ms_per_step"] for name in variants.split(",") for r in rows if r["variant"] == name and "ms_per_step" in r
    )
    epoch_s = ms / 1000 * -(-images // batch) * EPOCH_OVERHEAD
    log.write(f"probe: {ms} ms a step, about {epoch_s:.1f} s an epoch\n")
    return 1 if dry else max(1, int(seconds // epoch_s))


def evaluate(run: Path, iw_samples: int, dry: bool) -> dict:
    """`vae-ray evaluate` of a run's last checkpoint on the full test split (on the GPU)."""
    scored = subprocess.run(
        [
            EXE,
            "evaluate",
            str(run),
            "--json",
            "--samples",
            "0",
            "--iw-samples",
            str(8 if dry else iw_samples),
            *(["--limit", "200"] if dry else ["--gpu"]),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=time_left(time.perf_counter()),
    )
    return json.loads(scored.stdout)


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def cifar(data: Path, out: Path, args, dry: bool, gpu: list[str], limit: list[str], figures: dict, log) -> dict:
    """Bits/dim after --cifar-train-s of training: the hierarchical network
    with the discretised logistic mixture, bf16, sized for a GPU, for as many
    epochs as fit (probed first), scored with K=100 on the whole test split."""
    source = next((p for p in (data / "cifar-10-batches-py", data / "cifar10-jpeg.tar.gz") if p.exists()), None)
    if source is None:
        return {"cifar_bits_per_dim": None, "cifar_note": f"no CIFAR-10 files in {data}"}
    cdata, run = out / "work" / "cifar10", out / "work" / "cifar-run"
    run_cli(["data", "prepare", "cifar10", "--source", str(source), "--out", str(cdata), *limit], log)
    width, depth, batch = (16, 2, 16) if dry else (args.cifar_width, args.cifar_depth, args.cifar_batch)
    network = ["--arch", "hvae", "--loss", "logistic_mixture", "--width", str(width), "--depth", str(depth)]
    shape = ["--shape", "32,32,3"]
    epochs = probe_epochs(args.cifar_train_s, 50_000, batch, [*network, *shape], "graph_bf16", dry, log)
    seconds = run_cli(
        [
            "train",
            "--data",
            str(cdata),
            "--out",
            str(run),
            *network,
            "--epochs",
            str(epochs),
            "--batch-size",
            str(batch),
            *([] if dry else ["--precision", "bf16"]),
            *gpu,
        ],
        log,
    )
    epochs_run = history(run)
    figures.update(  # kept should the scoring not finish
        {
            "cifar_network": f"hvae width {width} depth {depth}, logistic_mixture, batch {batch}, "
            + ("fp32" if dry else "bf16"),
            "cifar_epochs": epochs,
            "cifar_train_seconds": round(sum(h["epoch_seconds"] for h in epochs_run), 1),
            "cifar_command_seconds": round(seconds, 1),
            "cifar_last_epoch_elbo_bits_per_dim": round(epochs_run[-1]["test_neg_elbo_nats"] / (3072 * math.log(2)), 3),
        }
    )
    scored = evaluate(run, 100, dry)
    return {
        "cifar_bits_per_dim": round(scored["bits_per_dim"], 3),
        "cifar_iw_samples": scored["iw_samples"],
        "cifar_scored_images": scored["images"],
        "cifar_scored_on": scored.get("scored_on"),
        "cifar_score_seconds": scored.get("seconds"),
    }


def nll(data: Path, out: Path, args, dry: bool, gpu: list[str], limit: list[str], figures: dict, log) -> dict:
    """MNIST likelihood as the literature reports it: the hierarchical network
    at its default size and recipe, Bernoulli on dynamically binarised
    images, for as many epochs as fit --nll-train-s, then the
    importance-weighted NLL with K=1000 on the whole test split."""
    mnist, run = out / "work" / "mnist", out / "work" / "nll-run"
    run_cli(["data", "prepare", "mnist", "--source", str(data / "mnist"), "--out", str(mnist), *limit], log)
    network = ["--arch", "hvae", "--loss", "bernoulli"]
    batch = 16 if dry else 64  # the hvae recipe's batch
    epochs = probe_epochs(args.nll_train_s, 60_000, batch, [*network, "--shape", "28,28,1"], "graph", dry, log)
    seconds = run_cli(
        ["train", "--data", str(mnist), "--out", str(run), *network, "--binarize", "--epochs", str(epochs), *gpu], log
    )
    epochs_run = history(run)
    figures.update(
        {
            "mnist_hvae_epochs": epochs,
            "mnist_hvae_train_seconds": round(sum(h["epoch_seconds"] for h in epochs_run), 1),
            "mnist_hvae_command_seconds": round(seconds, 1),
            "mnist_hvae_last_epoch_neg_elbo_nats": round(epochs_run[-1]["test_neg_elbo_nats"], 2),
        }
    )
    scored = evaluate(run, 1000, dry)
    return {
        "mnist_hvae_nll_iw_nats": round(scored["nll_iw_nats"], 2),
        "mnist_hvae_neg_elbo_nats": round(scored["neg_elbo_nats"], 2),
        "mnist_hvae_iw_samples": scored["iw_samples"],
        "mnist_hvae_scored_images": scored["images"],
        "mnist_hvae_scored_on": scored.get("scored_on"),
        "mnist_hvae_score_seconds": scored.get("seconds"),
        "mnist_hvae_active_units": scored.get("active_units"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        required=True,
        help="a folder with mnist/ (the four IDX files) and, optionally, cifar10-jpeg.tar.gz or cifar-10-batches-py/",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--cifar", action="store_true", help="the CIFAR-10 quality run instead of the speed table")
    parser.add_argument("--cifar-train-s", type=float, default=480, help="training time the epochs are sized to")
    parser.add_argument("--cifar-width", type=int, default=128)
    parser.add_argument("--cifar-depth", type=int, default=4)
    parser.add_argument("--cifar-batch", type=int, default=128)
    parser.add_argument("--nll", action="store_true", help="the MNIST likelihood run (hvae, K=1000) instead")
    parser.add_argument("--nll-train-s", type=float, default=150, help="training time the epochs are sized to")
    parser.add_argument("--budget-s", type=float, default=540, help="skip steps that would not finish within this")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the suite, measures nothing")
    parser.add_argument(
        "--only",
        default=",".join(STEPS[:5]),
        help=f"the steps to run, in order, from {', '.join(STEPS)} (generate and eager512 need train512's run)",
    )
    args = parser.parse_args()
    if set(args.only.split(",")) - set(STEPS):
        parser.error(f"--only: steps are {', '.join(STEPS)}")
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry, started = args.dry_run, time.perf_counter()
    if not dry:
        DEADLINE[0] = started + args.budget_s
    gpu = [] if dry else ["--gpu"]
    limit = ["--limit", "600"] if dry else []
    figures: dict = {"device": device(), "date": time.strftime("%Y-%m-%d"), "dry_run": dry}
    work = out / "work"
    with open(out / "gpu_suite.log", "w") as log:
        if args.cifar:
            attempt(
                "cifar", figures, lambda: figures.update(cifar(data, out, args, dry, gpu, limit, figures, log)), log
            )
        elif args.nll:
            attempt("nll", figures, lambda: figures.update(nll(data, out, args, dry, gpu, limit, figures, log)), log)
        else:
            speed_table(data, work, figures, dry, gpu, limit, started, args.budget_s, log, args.only.split(","))
    figures["goals"] = GOALS
    figures["suite_seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_report.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [
        f"# GPU suite {'(dry run: CPU, tiny sizes, nothing measured)' if dry else ''}",
        "",
        f"{figures['date']}, {figures['device']}, {figures['suite_seconds']} s",
        "",
        "| figure | value | goal |",
        "|---|---|---|",
    ]
    for key, value in figures.items():
        if key not in ("device", "date", "dry_run", "goals", "suite_seconds"):
            lines.append(f"| {key} | {value} | {GOALS.get(key, '')} |")
    (out / "gpu_report.md").write_text("\n".join(lines) + "\n")
    print((out / "gpu_report.md").read_text())
    if figures.get("failed"):
        sys.exit(1)


def attempt(name: str, figures: dict, step, log) -> None:
    """Run one step of the table; a step that fails is named in the report
    (and fails the suite at the end) without losing the figures of the others."""
    try:
        step()
    except (
        subprocess.CalledProcessError,
        subprocess.TimeoutExpired,
        OSError,
        ValueError,
        KeyError,
        LookupError,
        StopIteration,
    ) as exc:
        figures.setdefault("failed", []).append(f"{name}: {exc}")
        log.write(f"!! {name} failed: {exc}\n")
        log.flush()


def speed_table(
    data: Path, work: Path, figures: dict, dry: bool, gpu: list[str], limit: list[str], started, budget, log, only
):
    mnist = work / "mnist"
    run_cli(["data", "prepare", "mnist", "--source", str(data / "mnist"), "--out", str(mnist), *limit], log)

    def train512():
        # 1. MNIST training, start-up included. Large batches are what a GPU needs.
        seconds, history = train_mnist(mnist, work / "mnist-run", 1 if dry else 30, 512, gpu, log)
        figures["mnist_30_epochs_seconds"] = round(seconds, 1)
        figures["mnist_test_matlab_elbo"] = round(history[-1]["test_matlab_elbo"], 3)
        figures["mnist_images_per_s"] = round(max(h["train_images_per_s"] for h in history))
        figures["mnist_train_seconds"] = round(sum(h["train_seconds"] for h in history), 1)
        figures["mnist_cuda_graph"] = history[-1].get("cuda_graph")
        figures["mnist_first_epoch_train_seconds"] = round(history[0]["train_seconds"], 2)
        figures["mnist_cuda_graph_setup_s"] = history[-1].get("cuda_graph_setup_s")

    def eager512():
        # The same run with its steps launched one by one (--cuda-graph off): what the graph is worth.
        if steps_left(started, budget, "eager512", figures, dry):
            seconds, history = train_mnist(
                mnist, work / "mnist-run-eager", 1 if dry else 30, 512, [*gpu, "--cuda-graph", "off"], log
            )
            figures["mnist_eager_30_epochs_seconds"] = round(seconds, 1)
            figures["mnist_eager_train_seconds"] = round(sum(h["train_seconds"] for h in history), 1)
            figures["mnist_eager_first_epoch_train_seconds"] = round(history[0]["train_seconds"], 2)

    def generate_ray():
        # The Ray Data actor pool (as on a cluster) for the same Parquet set.
        if steps_left(started, budget, "generate_ray", figures, dry):
            num = 2000 if dry else 1_000_000
            rates = generate(
                work / "mnist-run", work / "generated-ray", num, "parquet", [*gpu, "--actors", "2" if dry else "8"], log
            )
            figures["generate_parquet_ray_command_images_per_s"] = rates["command"]
            figures["generate_parquet_ray_job_images_per_s"] = rates["job"]
            figures["generate_ray_path"] = rates["path"]

    chosen = {
        "train512": train512,
        "profile": lambda: profile(work, figures, dry, started, budget, log),
        "generate": lambda: generation(work, figures, dry, gpu, started, budget, log),
        "tune": lambda: search(mnist, work, figures, dry, gpu, started, budget, log),
        "batch32": lambda: train32(mnist, work, figures, dry, gpu, started, budget, log),
        "eager512": eager512,
        "generate_ray": generate_ray,
    }
    for name in only:
        attempt(name, figures, chosen[name], log)


def profile(work: Path, figures: dict, dry: bool, started, budget, log) -> None:
    # 2. Where a step's time goes.
    if steps_left(started, budget, "profile", figures, dry):
        subprocess.run(
            [
                sys.executable,
                str(HERE / "step_profile.py"),
                "--out",
                str(work / "profile"),
                *(["--dry-run"] if dry else []),
            ],
            check=True,
            stdout=log,
            stderr=log,
            timeout=time_left(time.perf_counter()),
        )
        report = json.loads((work / "profile" / "step_profile.json").read_text())
        for row in report["variants"]:
            figures[f"step_ms_{row['variant']}"] = row.get("ms_per_step", row.get("error"))
            if "bound" in row:
                figures[f"step_{row['variant']}_bound"] = row["bound"]
            if "captured" in row:
                figures[f"step_{row['variant']}_captured"] = row["captured"]


def generation(work: Path, figures: dict, dry: bool, gpu: list[str], started, budget, log) -> None:
    # 3. Generation, whole commands (Ray's start-up included) and the job's own rate.
    num = 2000 if dry else 1_000_000
    for fmt in ("parquet", "png"):
        if steps_left(started, budget, "generate", figures, dry):
            rates = generate(work / "mnist-run", work / f"generated-{fmt}", num, fmt, gpu, log)
            figures[f"generate_{fmt}_command_images_per_s"] = rates["command"]
            figures[f"generate_{fmt}_job_images_per_s"] = rates["job"]
            figures["generate_path"] = rates["path"]


def search(mnist: Path, work: Path, figures: dict, dry: bool, gpu: list[str], started, budget, log) -> None:
    # 4. A search sharing the GPU, against one of its trials alone.
    if steps_left(started, budget, "tune", figures, dry):
        epochs = 1 if dry else 5
        alone, _ = tune(mnist, work / "tune-one", "16", "1e-3", epochs, gpu, log)
        dims, lrs = ("2,4", "1e-3") if dry else ("2,4,8,16", "1e-3,2e-3,4e-3,8e-3")
        whole, most = tune(mnist, work / "tune-16", dims, lrs, epochs, gpu, log)
        figures["tune_one_trial_seconds"] = round(alone, 1)
        figures["tune_seconds"] = round(whole, 1)
        figures["tune_max_trials_at_once"] = most
        figures["tune_over_one_trial"] = round(whole / alone, 2)


def train32(mnist: Path, work: Path, figures: dict, dry: bool, gpu: list[str], started, budget, log) -> None:
    # 5. The default batch: launch-bound, the step's fixed costs show.
    if steps_left(started, budget, "batch32", figures, dry):
        seconds, history = train_mnist(mnist, work / "mnist-run-32", 1 if dry else 30, 32, gpu, log)
        figures["mnist_batch32_30_epochs_seconds"] = round(seconds, 1)
        figures["mnist_batch32_test_matlab_elbo"] = round(history[-1]["test_matlab_elbo"], 3)
        figures["mnist_batch32_train_seconds"] = round(sum(h["train_seconds"] for h in history), 1)
        figures["mnist_batch32_cuda_graph"] = history[-1].get("cuda_graph")


if __name__ == "__main__":
    main()
