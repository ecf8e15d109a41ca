"""`vae-ray demo`: the whole product in about two minutes on a laptop.

Picks the best dataset it can find (real MNIST if present or downloadable,
else Fashion-MNIST from the Debian package path, else synthetic digits),
prepares it, trains the MATLAB example's VAE on a local Ray cluster and
returns the folder of generated images.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .errors import UserError
from .sources import locate

DEMO_IMAGES = 15_000
DEMO_EPOCHS = 5


def choose_dataset(say: Callable[[str], None]) -> tuple[str, str | None]:
    for name in ("mnist", "fashion-mnist"):
        try:
            path = locate(name, None, download=True)
        except UserError as exc:
            say(f"skipping {exc}")
            continue
        return name, str(path)
    return "synthetic", None


def run_demo(out: Path, say: Callable[[str], None], epochs: int = DEMO_EPOCHS,
             images: int = DEMO_IMAGES) -> dict:
    from .data import prepare, read_meta
    from .train import fit

    out = Path(out)
    name, source = choose_dataset(say)
    label = "synthetic digits (no real dataset found)" if name == "synthetic" else f"{name} from {source}"
    say(f"dataset: {label}")
    data_dir = out / f"data-{name}"
    if (data_dir / "dataset.json").is_file():
        meta = read_meta(data_dir)
    else:
        meta = prepare(name, data_dir, source, limit=images)
    say(f"prepared {meta['splits']['train']['count']:,} train and {meta['splits']['test']['count']:,} "
        f"test images in {data_dir}")
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo's own previous run
    cfg = TrainConfig(data=str(data_dir), out=str(run_dir), epochs=epochs, latent_dim=16,
                      batch_size=128, lr=2e-3, lr_schedule="onecycle",
                      cpus_per_worker=max(1, os.cpu_count() or 1), workers=1).validate()
    say(f"training the MATLAB example's VAE for {epochs} epochs on a local Ray cluster")
    return fit(cfg)
