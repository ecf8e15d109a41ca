"""A small job: `vae-ray generate --num 2000` from a local run, no cluster running,
against one plain process, imports included.

    python benchmarks/generate_small.py [--checkpoint RUN] [--runs 3]

The plain process imports torch, loads the checkpoint, decodes the same
latent vectors in batches of 256 and saves each PNG with Pillow. `vae-ray
generate` is the whole command (a one-shard job without --address runs its
ShardWriter in the process, the same bytes as the distributed path; the
output says which path ran). Goal: vae-ray / plain <= 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path

from _common import EXE, mnist_source, report_pairs, timed

PLAIN = textwrap.dedent("""
    import numpy as np, torch
    from pathlib import Path
    from PIL import Image
    from vae_ray import checkpoint as ckpt
    from vae_ray.keyed_random import latent_normals
    model = ckpt.load({run!r}).model
    out = Path({out!r}); out.mkdir(parents=True)
    with torch.no_grad():
        for first in range(0, {num}, 256):
            idx = np.arange(first, min(first + 256, {num}))
            z = torch.from_numpy(latent_normals(0, idx, model.latent_dim))
            pixels = (model.mean_image(model.decode(z)).clamp(0, 1) * 255).round().to(torch.uint8)
            for i, img in zip(idx, pixels[:, 0].numpy()):
                Image.fromarray(img).save(out / f"{{i:09d}}.png")
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--source", default=mnist_source())
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = args.checkpoint
        if run is None:
            data, run = work / "mnist", str(work / "run")
            timed([EXE, "data", "prepare", "mnist", "--source", args.source, "--out", str(data), "--limit", "2000"])
            timed([EXE, "train", "--data", str(data), "--out", run, "--epochs", "1"])
        pairs = []
        for k in range(args.runs):
            plain_cmd = [sys.executable, "-c", PLAIN.format(run=run, out=str(work / f"plain{k}"), num=args.num)]
            ours_cmd = [EXE, "generate", run, "--num", str(args.num), "--out", str(work / f"ours{k}")]
            if k % 2 == 0:
                plain, ours = timed(plain_cmd), timed(ours_cmd)
            else:
                ours, plain = timed(ours_cmd), timed(plain_cmd)
            pairs.append((plain, ours))
    report_pairs(f"vae-ray generate --num {args.num} vs one plain process", pairs, "goal <= 2")


if __name__ == "__main__":
    main()
