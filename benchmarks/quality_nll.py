"""Likelihoods comparable to the literature: train, then `vae-ray evaluate`.

    python benchmarks/quality_nll.py mnist   [--epochs 100] [--iw-samples 1000] [--limit N]
    python benchmarks/quality_nll.py mnist --arch hvae --epochs 10       # the hierarchical network
    python benchmarks/quality_nll.py cifar10 [--epochs 100] [--iw-samples 100]  [--limit N]

mnist:   the MATLAB example's conv VAE (latent 32) with a Bernoulli decoder on
         dynamically binarised MNIST; reports the importance-weighted NLL in
         nats (goal <= 82.5; Burda et al.'s one-layer MLP VAE: 86.76 at k=5000).
cifar10: the tutorial's conv VAE (latent 128) with a discretised logistic
         decoder on the CIFAR-10 JPEG tree; reports bits per dimension (goal
         < 4.7, a multivariate Gaussian's figure).
Both need many epochs: use a GPU cluster (`--address`) for the goals; on a
laptop, lower --epochs and --limit to see the figures move.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_ray.data import prepare  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETTINGS = {
    "mnist": {
        "source": SHARED / "mnist",
        "prepare": "mnist",
        "goal": 82.5,
        "metric": "nll_iw_nats",
        "unit": "nats",
        "train": ["--loss", "bernoulli", "--binarize", "--latent-dim", "32", "--arch", "mnist", "--kl-warmup", "5"],
    },
    "cifar10": {
        "source": SHARED / "cifar10-jpeg" / "cifar10-jpeg.tar.gz",
        "prepare": "cifar10",
        "goal": 4.7,
        "metric": "bits_per_dim",
        "unit": "bits/dim",
        "train": ["--loss", "logistic", "--latent-dim", "128", "--arch", "cifar"],
    },
}


def network(train: list[str], args: argparse.Namespace) -> list[str]:
    """The table's seed network and recipe, or --arch hvae with its own recipe (batch, rate, sizes)."""
    if args.arch == "seed":
        return [*train, "--lr", str(args.lr), "--lr-schedule", "onecycle", "--batch-size", "128"]
    skip = {"--arch", "--latent-dim", "--kl-warmup"}
    kept = [v for i, v in enumerate(train) if v not in skip and (i == 0 or train[i - 1] not in skip)]
    return [*kept, "--arch", args.arch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(SETTINGS))
    parser.add_argument("--data", help="a prepared dataset folder (default: prepare one from the reference data)")
    parser.add_argument("--arch", default="seed", help="seed (the table's network) or hvae (its own recipe)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--iw-samples", type=int, default=1000)
    parser.add_argument("--limit", type=int, help="score only the first N test images")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--address", help="Ray cluster to train on")
    parser.add_argument("--out", help="keep the run here (default: a temporary folder)")
    args = parser.parse_args()
    s = SETTINGS[args.dataset]
    exe = shutil.which("vae-ray") or str(Path(sys.executable).parent / "vae-ray")
    extra = ["--address", args.address] if args.address else []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(Path(tmp) / args.dataset)
        if args.data is None:
            prepare(s["prepare"], data, str(s["source"]))
        run = Path(args.out) if args.out else Path(tmp) / "run"
        subprocess.run(
            [
                exe,
                "train",
                "--data",
                data,
                "--out",
                str(run),
                "--epochs",
                str(args.epochs),
                "--cpus-per-worker",
                str(args.threads),
                "--json",
                *network(s["train"], args),
                *extra,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        limit = ["--limit", str(args.limit)] if args.limit else []
        done = subprocess.run(
            [
                exe,
                "evaluate",
                str(run),
                "--iw-samples",
                str(args.iw_samples),
                "--samples",
                "0",
                "--json",
                *limit,
                *extra,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(done.stdout)
    value = result[s["metric"]]
    print(f"{args.dataset}: {args.epochs} epochs, K={args.iw_samples}, {result['images']:,} test images")
    print(
        f"  -ELBO {result['neg_elbo_nats']:.2f} nats, IW NLL {result['nll_iw_nats']:.2f} nats, "
        f"bits/dim {result['bits_per_dim'] if result['bits_per_dim'] is None else round(result['bits_per_dim'], 3)}, "
        f"active units {result['active_units']}"
    )
    print(
        f"{s['metric']} {value:.3f} {s['unit']}  goal {'<=' if args.dataset == 'mnist' else '<'} {s['goal']}  "
        f"({'met' if value <= s['goal'] else 'not met'}; ratio {value / s['goal']:.3f})"
    )


if __name__ == "__main__":
    main()
