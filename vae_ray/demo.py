"""`vae-ray demo`: the whole product in a few minutes on a laptop.

Picks the best dataset it can find (real MNIST if present or downloadable,
else Fashion-MNIST from the Debian package path, else synthetic digits),
prepares it, trains the MATLAB example's VAE (one worker: in this process,
or on the cluster RAY_ADDRESS names) and returns the folder of generated images. Run again, it finds its dataset and
run complete and only says where they are; an interrupted demo continues.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import commands
from .data import prepare
from .errors import UserError
from .rundir import RunDir
from .sources.locate import locate

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


def run_demo(out: Path, say: Callable[[str], None], epochs: int = DEMO_EPOCHS, images: int = DEMO_IMAGES) -> dict:
    out = Path(out)
    name, source = choose_dataset(say)
    label = "synthetic digits (no real dataset found)" if name == "synthetic" else f"{name} from {source}"
    say(f"dataset: {label}")
    data_dir = out / f"data-{name}"
    meta = prepare(name, data_dir, source, limit=images)
    say(
        f"{'found' if meta.get('already_complete') else 'prepared'} {meta['splits']['train']['count']:,} train and "
        f"{meta['splits']['test']['count']:,} test images in {data_dir}"
    )
    run = RunDir(str(out / "run"))
    settings = {
        "data": str(data_dir),
        "out": run.uri,
        "epochs": epochs,
        "latent_dim": 16,
        "batch_size": 128,
        "workers": 1,
    }
    resume = run.read_config() is not None and run.last_epoch() < epochs
    say(f"{'continuing' if resume else 'training'} the MATLAB example's VAE for {epochs} epochs")
    return commands.train(settings, resume=resume, show=True)
