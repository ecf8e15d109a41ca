"""Time `vae-ray data prepare mnist` on the full MNIST (70,000 images).

    python benchmarks/prepare_throughput.py [--source DIR] [--repeats 3]

Runs the real command as a subprocess (start-up included) and prints the
best wall time and images/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=os.environ.get("VAE_RAY_MNIST_DIR", str(DEFAULT_SOURCE)))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    exe = shutil.which("vae-ray") or str(Path(sys.executable).parent / "vae-ray")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"mnist-{i}"
            start = time.perf_counter()
            subprocess.run(
                [exe, "data", "prepare", "mnist", "--source", args.source, "--out", str(out)],
                check=True,
                capture_output=True,
            )
            times.append(time.perf_counter() - start)
    best = min(times)
    print(
        f"data prepare mnist: 70,000 images, best of {args.repeats}: {best:.2f} s "
        f"= {70000 / best:,.0f} images/s (runs: {', '.join(f'{t:.2f}' for t in times)} s)"
    )


if __name__ == "__main__":
    main()
