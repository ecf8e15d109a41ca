"""The GPU figures in one command: see gpu_suite.sh, which sets up the environment and calls this.

    python benchmarks/gpu_suite.py --data DATA_DIR --out REPORT_DIR [--cifar] [--budget-s 540] [--dry-run]

The default run measures the GPU table (docs/benchmarks.md, "GPU"), most
telling first, and skips what would not finish within --budget-s:
1. 30 MNIST epochs, MATLAB network, batch 512, whole `vae-ray train --gpu` command;
2. one training step, eager, bf16 and as a CUDA graph (benchmarks/step_profile.py);
3. 1,000,000 images to Parquet, then as PNG files, whole `vae-ray generate --gpu` commands;
4. `vae-ray tune`, 16 trials of 5 epochs sharing the GPU, against one trial alone;
5. the same 30 epochs at the default batch of 32.
--cifar runs the CIFAR-10 quality measurement instead: the hierarchical
network with the discretised logistic likelihood for --cifar-epochs, scored
in bits/dim by `vae-ray evaluate`. Each mode fits one device call of under
10 minutes. Writes REPORT_DIR/gpu_report.json and gpu_report.md (device,
date, every figure against its goal). --dry-run runs the same steps on the
CPU at a tiny size, so the suite itself is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
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


def cifar(data: Path, out: Path, epochs: int, dry: bool, gpu: list[str], limit: list[str], log) -> dict:
    source = next((p for p in (data / "cifar-10-batches-py", data / "cifar10-jpeg.tar.gz") if p.exists()), None)
    if source is None:
        return {"cifar_bits_per_dim": None, "cifar_note": f"no CIFAR-10 files in {data}"}
    cdata = out / "work" / "cifar10"
    run_cli(["data", "prepare", "cifar10", "--source", str(source), "--out", str(cdata), *limit], log)
    seconds = run_cli(
        [
            "train",
            "--data",
            str(cdata),
            "--out",
            str(out / "work" / "cifar-run"),
            "--arch",
            "hvae",
            "--loss",
            "logistic",
            "--epochs",
            str(epochs),
            *(["--batch-size", "16"] if dry else ["--precision", "bf16"]),
            *gpu,
        ],
        log,
    )
    scored = subprocess.run(
        [
            EXE,
            "evaluate",
            str(out / "work" / "cifar-run"),
            "--json",
            "--samples",
            "0",
            "--iw-samples",
            "8" if dry else "100",
            *(["--limit", "200"] if dry else []),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return {
        "cifar_bits_per_dim": round(json.loads(scored.stdout)["bits_per_dim"], 3),
        "cifar_train_seconds": round(seconds, 1),
        "cifar_epochs": epochs,
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
    parser.add_argument("--cifar-epochs", type=int, default=12, help="about 8 minutes on an H100 (bf16)")
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
            figures |= cifar(data, out, 1 if dry else args.cifar_epochs, dry, gpu, limit, log)
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
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as exc:
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
