"""The GPU figures in one command: see gpu_suite.sh, which sets up the environment and calls this.

    python benchmarks/gpu_suite.py --data DATA_DIR --out REPORT_DIR [--dry-run]

1. 30 epochs of full MNIST with `vae-ray train --gpu` (goal <= 60 s, start-up included);
2. 1,000,000 images written as Parquet by `vae-ray generate --gpu` (goal >= 100,000 images/s);
3. the CIFAR-10 quality run with `--loss logistic`, scored in bits/dim by `vae-ray evaluate`.
Writes REPORT_DIR/gpu_report.json and gpu_report.md (device, date, every
figure against its goal). --dry-run runs the same steps on the CPU at a
tiny size, so the suite itself is tested where no GPU is.
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


def run(args: list[str], log) -> float:
    started = time.perf_counter()
    log.write(f"$ vae-ray {' '.join(args)}\n")
    log.flush()
    subprocess.run([EXE, *args], check=True, stdout=log, stderr=log)
    return time.perf_counter() - started


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        required=True,
        help="a folder with mnist/ (the four IDX files) and, optionally, cifar10-jpeg.tar.gz or cifar-10-batches-py/",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the suite, measures nothing")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    gpu = [] if dry else ["--gpu"]
    sizes = {
        "train_epochs": 1 if dry else 30,
        "limit": ["--limit", "2000"] if dry else [],
        "generate": 2000 if dry else 1_000_000,
        "cifar_epochs": 1 if dry else 30,
    }
    figures: dict = {"device": device(), "date": time.strftime("%Y-%m-%d"), "dry_run": dry}
    with open(out / "gpu_suite.log", "w") as log:
        mnist = out / "work" / "mnist"
        run(["data", "prepare", "mnist", "--source", str(data / "mnist"), "--out", str(mnist), *sizes["limit"]], log)
        # 1. MNIST training, start-up included. Large batches are what a GPU needs.
        seconds = run(
            [
                "train",
                "--data",
                str(mnist),
                "--out",
                str(out / "work" / "mnist-run"),
                "--epochs",
                str(sizes["train_epochs"]),
                "--loss",
                "matlab",  # the figures before the bernoulli default, in the same unit
                "--batch-size",
                "512",
                "--lr",
                "6e-3",
                "--latent-dim",
                "16",
                *gpu,
            ],
            log,
        )
        history = [json.loads(line) for line in (out / "work" / "mnist-run" / "metrics.jsonl").read_text().splitlines()]
        figures["mnist_30_epochs_seconds"] = round(seconds, 1)
        figures["mnist_test_matlab_elbo"] = round(history[-1]["test_matlab_elbo"], 3)
        figures["mnist_images_per_s"] = round(max(h["train_images_per_s"] for h in history))
        # 2. Generation to Parquet.
        seconds = run(
            [
                "generate",
                str(out / "work" / "mnist-run"),
                "--num",
                str(sizes["generate"]),
                "--format",
                "parquet",
                "--out",
                str(out / "work" / "generated"),
                *gpu,
            ],
            log,
        )
        # The job's own rate (the manifest's seconds: shards decoded, encoded
        # and written) and the whole command's, Ray's start-up included.
        manifest = json.loads((out / "work" / "generated" / "_manifest.json").read_text())
        figures["generate_images_per_s"] = round(sizes["generate"] / manifest["seconds"])
        figures["generate_command_images_per_s"] = round(sizes["generate"] / seconds)
        figures["generate_path"] = manifest.get("path", "")
        # 3. CIFAR-10 with the discretised logistic likelihood, in bits/dim.
        cifar = next((p for p in (data / "cifar-10-batches-py", data / "cifar10-jpeg.tar.gz") if p.exists()), None)
        if cifar is None:
            figures["cifar_bits_per_dim"] = None
            figures["cifar_note"] = f"no CIFAR-10 files in {data}"
        else:
            cdata = out / "work" / "cifar10"
            run(["data", "prepare", "cifar10", "--source", str(cifar), "--out", str(cdata), *sizes["limit"]], log)
            run(
                [
                    "train",
                    "--data",
                    str(cdata),
                    "--out",
                    str(out / "work" / "cifar-run"),
                    "--loss",
                    "logistic",
                    "--latent-dim",
                    "128",
                    "--epochs",
                    str(sizes["cifar_epochs"]),
                    *(["--batch-size", "16"] if dry else []),
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
            figures["cifar_bits_per_dim"] = round(json.loads(scored.stdout)["bits_per_dim"], 3)
    figures["goals"] = {
        "mnist_30_epochs_seconds": "<= 60",
        "generate_images_per_s": ">= 100000",
        "generate_command_images_per_s": "(the whole command, start-up included)",
        "cifar_bits_per_dim": "< 4.7 (the literature's simple conv VAEs)",
    }
    (out / "gpu_report.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [
        f"# GPU suite {'(dry run: CPU, tiny sizes, nothing measured)' if dry else ''}",
        "",
        f"{figures['date']}, {figures['device']}",
        "",
        "| figure | value | goal |",
        "|---|---|---|",
    ]
    for key in (
        "mnist_30_epochs_seconds",
        "mnist_test_matlab_elbo",
        "mnist_images_per_s",
        "generate_images_per_s",
        "generate_command_images_per_s",
        "cifar_bits_per_dim",
    ):
        lines.append(f"| {key} | {figures.get(key)} | {figures['goals'].get(key, '')} |")
    (out / "gpu_report.md").write_text("\n".join(lines) + "\n")
    print((out / "gpu_report.md").read_text())


if __name__ == "__main__":
    main()
