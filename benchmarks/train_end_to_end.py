"""The whole `vae-ray train` command against a plain process doing the same from the IDX files.

    python benchmarks/train_end_to_end.py [--runs 3] [--epochs 3]

Both train the defaults (the MATLAB network, latent 16, the measured recipe:
batch 32, one-cycle peaking at 3e-3, Adam beta2 0.99) for 3 epochs of full
MNIST, score the test split and save a checkpoint after every epoch. The
plain process starts from the four IDX files (reading them is part of its
time); `vae-ray train` is the whole command with no flags beyond data, out
and epochs, from a prepared dataset (preparing takes about a second,
benchmarks/prepare_throughput.py), start-up, pictures and TensorBoard
included. Prints speed = plain / vae-ray (goal >= 0.8) for --runs back-to-back
pairs, and how fast the first epoch trained against the later ones (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from _common import EXE, mnist_source, timed

PLAIN = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {bench!r})
    from _common import plain_training
    from vae_ray.sources.idx import read_idx
    root = Path({source!r})
    train = torch.from_numpy(read_idx(root / "train-images-idx3-ubyte.gz")[..., None].copy())
    test = torch.from_numpy(read_idx(root / "t10k-images-idx3-ubyte.gz")[..., None].copy())
    plain_training(train, test, 16, {epochs}, 32, 3e-3, save_to=Path({out!r}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=mnist_source())
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    bench = str(Path(__file__).resolve().parent)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "mnist"
        timed([EXE, "data", "prepare", "mnist", "--source", args.source, "--out", str(data)])
        speeds, first = [], []
        for run in range(args.runs):
            plain_cmd = [
                sys.executable,
                "-c",
                PLAIN.format(bench=bench, source=args.source, epochs=args.epochs, out=str(work / f"plain{run}")),
            ]
            ours_cmd = [
                EXE,
                "train",
                "--data",
                str(data),
                "--out",
                str(work / f"run{run}"),
                "--epochs",
                str(args.epochs),
                "--loss",
                "matlab",  # the plain loop's loss (the default for grey images is bernoulli)
            ]
            if run % 2 == 0:
                plain, ours = timed(plain_cmd), timed(ours_cmd)
            else:
                ours, plain = timed(ours_cmd), timed(plain_cmd)
            history = [json.loads(line) for line in (work / f"run{run}" / "metrics.jsonl").read_text().splitlines()]
            rates = [h["train_images_per_s"] for h in history]
            first.append(rates[0] / statistics.median(rates[1:]))
            speeds.append(plain / ours)
            print(
                f"run {run + 1}: plain {plain:6.1f} s | vae-ray train {ours:6.1f} s | speed (plain / vae-ray) "
                f"{plain / ours:.2f} | epoch 1 at {rates[0]:,.0f} img/s, later {statistics.median(rates[1:]):,.0f}"
                f" ({first[-1]:.2f})",
                flush=True,
            )
    print(
        f"median speed of vae-ray train: {statistics.median(speeds):.2f} of the plain process (goal >= 0.8); "
        f"first epoch at {statistics.median(first):.2f} of the later ones (goal >= 0.8)"
    )


if __name__ == "__main__":
    main()
