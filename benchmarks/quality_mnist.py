"""Quality on MNIST in the source documents' unit.

    python benchmarks/quality_mnist.py [--data DIR] [--epochs 10]

The MATLAB example's model with latent 20 (and its Glorot initialisation),
the `matlab` loss (0.5 * summed squared error + KL per image), batch 128, Adam
(second-moment decay --adam-beta2) with a one-cycle schedule peaking at --lr,
two antithetic latent samples per training image (--z-samples; the test-set
ELBO is always the usual one-sample estimate), 10 epochs, trained with
`vae-ray train`. Prints the test-set
MATLAB ELBO per epoch and against the goal (<= 18.5; the older MATLAB
example needed 50 epochs for 18.51).
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

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
GOAL = 18.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a prepared MNIST folder (default: prepare one from --source)")
    parser.add_argument("--source", default=os.environ.get("VAE_RAY_MNIST_DIR", str(DEFAULT_SOURCE)))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--adam-beta2", type=float, default=0.99)
    parser.add_argument("--schedule", default="onecycle")
    parser.add_argument("--z-samples", type=int, default=2, help="latent samples per training image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.0, help="weight-average decay (0 = off)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="keep the run here (default: a temporary folder)")
    args = parser.parse_args()
    exe = shutil.which("vae-ray") or str(Path(sys.executable).parent / "vae-ray")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "mnist")
            prepare("mnist", data, args.source)
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
                "--latent-dim",
                "20",
                "--loss",
                "matlab",
                "--batch-size",
                "128",
                "--lr",
                str(args.lr),
                "--lr-schedule",
                args.schedule,
                "--adam-beta2",
                str(args.adam_beta2),
                "--ema",
                str(args.ema),
                "--z-samples",
                str(args.z_samples),
                "--seed",
                str(args.seed),
                "--cpus-per-worker",
                str(args.threads),
                "--json",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for h in history:
        print(
            f"epoch {h['epoch']:>2}: test MATLAB ELBO {h['test_matlab_elbo']:.3f}  "
            f"(-ELBO {h['test_neg_elbo_nats']:.2f} nats)  {h['epoch_seconds']:.0f} s"
        )
    final = history[-1]["test_matlab_elbo"]
    print(
        f"final test MATLAB ELBO after {len(history)} epochs: {final:.3f}  goal <= {GOAL}  "
        f"({'met' if final <= GOAL else 'not met'}; ratio {final / GOAL:.3f})"
    )


if __name__ == "__main__":
    main()
