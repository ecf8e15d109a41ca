"""The whole `vae-ray tune` command against one plain process training the same grid in sequence.

    python benchmarks/tune_overhead.py [--runs 3] [--images 6000] [--epochs 2]

The grid: latent 2, 8 x learning rate 1e-3, 3e-3, 2 epochs each, on the first
6,000 MNIST training images (and 6,000 test images, scored every epoch). The
plain process trains the four configurations one after another with all of
the machine's cores, scoring and saving every epoch, imports included.
`vae-ray tune` is the whole command with no tuning flags but the plain
loop's `--loss matlab` (its defaults:
trials fill the machine, ASHA may stop weak ones). Back to back, --runs
times, order alternating. Goal: vae-ray / plain <= 2.5.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path

from _common import EXE, mnist_source, report_pairs, timed

PLAIN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    sys.path.insert(0, {bench!r})
    from _common import plain_training
    from vae_ray.data import read_arrays
    train, _ = read_arrays({data!r}, "train"); test, _ = read_arrays({data!r}, "test")
    train, test = torch.from_numpy(train.copy()), torch.from_numpy(test.copy())
    for latent in (2, 8):
        for lr in (1e-3, 3e-3):
            plain_training(train, test, latent, {epochs}, 32, lr, save_to=Path({out!r}) / f"k{{latent}}-lr{{lr}}")
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=mnist_source())
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "mnist"
        timed(
            [EXE, "data", "prepare", "mnist", "--source", args.source, "--out", str(data), "--limit", str(args.images)],
            stderr=sys.stderr,
        )
        bench = str(Path(__file__).resolve().parent)
        pairs = []
        for run in range(args.runs):
            plain_cmd = [
                sys.executable,
                "-c",
                PLAIN.format(bench=bench, data=str(data), epochs=args.epochs, out=str(work / f"plain{run}")),
            ]
            ours_cmd = [
                EXE,
                "tune",
                "--data",
                str(data),
                "--out",
                str(work / f"search{run}"),
                "--latent-dims",
                "2,8",
                "--lrs",
                "1e-3,3e-3",
                "--epochs",
                str(args.epochs),
                "--loss",
                "matlab",  # the plain loop's loss (the default for grey images is bernoulli)
            ]
            if run % 2 == 0:
                plain, ours = timed(plain_cmd), timed(ours_cmd)
            else:
                ours, plain = timed(ours_cmd), timed(plain_cmd)
            pairs.append((plain, ours))
            report_pairs("tune (so far)", pairs, "goal <= 2.5")
    report_pairs("vae-ray tune vs one plain process", pairs, "goal <= 2.5")


if __name__ == "__main__":
    main()
