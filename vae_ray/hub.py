"""Sharing a trained model: `vae-ray export` and hf://ORG/NAME.

    vae-ray export RUN --out DIR      DIR/model.safetensors   the weights (the run's best, else latest)
                                      DIR/config.json         {"config", "dataset", "state", "format", "vae_ray"}
                                      DIR/README.md           a model card with the Hub's YAML header
                                      DIR/samples.png         64 samples, the card's picture
                                      DIR/prior-gmm.safetensors  the mixture prior, when the run fitted one

The folder is what the Hugging Face Hub expects of a model repository: upload
it as it is (`hf upload ORG/NAME DIR`). Every command that takes a checkpoint
(generate, evaluate, encode, report, `vae_ray.load`) takes the folder, or
`hf://ORG/NAME[@REVISION]`, fetched through huggingface_hub's cache when it is
installed (`pip install 'vae-ray[hub]'`) and the Hub is reachable. Only these
files are fetched and nothing in them is executed: weights and the mixture
are safetensors, the rest is JSON, Markdown and a PNG.

An export is a whole-folder output like a report: written in a temporary
folder and swapped in under the destination's lock; an existing folder is
replaced only when it holds nothing but an export's files.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __version__, storage
from .errors import UserError, first_line
from .swap import unproven

SCHEME = "hf://"
FORMAT = "vae-ray-model"
# prior-gmm.safetensors: the Gaussian-mixture prior the run fitted (prior.EXPORTED), when it has one.
FILES = frozenset({"model.safetensors", "config.json", "README.md", "samples.png", "prior-gmm.safetensors"})
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,199}$")

# The Hub's ids of the public datasets `data prepare` reads by name; a model
# trained on anything else names no Hub dataset in its card.
HUB_DATASETS = {
    "mnist": "ylecun/mnist",
    "fashion-mnist": "zalando-datasets/fashion_mnist",
    "cifar10": "uoft-cs/cifar10",
}
# evaluation.json's figures as the card's metrics: key -> (metric type, name shown).
CARD_METRICS = {
    "nll_iw_nats": ("nll", "negative log-likelihood, importance-weighted (nats)"),
    "neg_elbo_nats": ("elbo", "negative ELBO (nats)"),
    "bits_per_dim": ("bits_per_dim", "bits per dimension"),
    "fd": ("frechet_distance", "Frechet distance to the test images in the judge's features"),
    "inception_score": ("inception_score", "Inception Score in the judge's features"),
    "precision": ("precision", "precision in the judge's features"),
    "recall": ("recall", "recall in the judge's features"),
    "tstr_accuracy": ("accuracy", "accuracy on the test split of a classifier trained on samples (TSTR)"),
}


# ---------------------------------------------------------------------------
# hf://ORG/NAME
# ---------------------------------------------------------------------------
def parse(uri: str) -> tuple[str, str | None]:
    """'hf://org/name@rev' -> ('org/name', 'rev'), or a UserError naming the form."""
    rest = uri[len(SCHEME) :].strip("/")
    repo, _, revision = rest.partition("@")
    if not _REPO.match(repo) or ".." in repo or (revision and (not _REVISION.match(revision) or ".." in revision)):
        raise UserError(f"{storage.printable(uri)[:120]}: not a Hub model (hf://ORG/NAME or hf://ORG/NAME@REVISION)")
    return repo, revision or None


def download(uri: str) -> Path:
    """The model's four files in huggingface_hub's local cache; one line when
    the library is missing, the Hub unreachable or the repository unknown."""
    repo, revision = parse(uri)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"{uri}: loading from the Hugging Face Hub needs huggingface_hub (pip install 'vae-ray[hub]'); "
            "or download the folder and pass its path"
        ) from None
    try:
        folder = snapshot_download(repo_id=repo, revision=revision, allow_patterns=sorted(FILES))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, HTTP errors: all one line
        raise UserError(
            f"{uri}: could not fetch it from the Hugging Face Hub ({type(exc).__name__}: {first_line(exc, 160)}); "
            f"offline, download it where the Hub is reachable (hf download {repo} --local-dir DIR) "
            "and pass DIR instead"
        ) from None
    if not (Path(folder) / "model.safetensors").is_file():
        raise UserError(f"{uri}: the repository holds no model.safetensors; is it a vae-ray model?")
    return Path(folder)


# ---------------------------------------------------------------------------
# vae-ray export
# ---------------------------------------------------------------------------
def _not_export_files(uri: str) -> list[str]:
    """What makes a folder not an earlier export: any leaf an export does not
    write, or, when it holds only such names, a config.json that is not an
    export's (a folder holding just a README.md or config.json of its own is
    not ours to replace)."""
    return storage.foreign_leaves(uri, FILES.__contains__) or unproven(uri, "config.json", "format", FORMAT)


def export(source: str, out: str, samples_seed: int = 0, repo: str | None = None) -> dict[str, Any]:
    """Write RUN's best checkpoint (else its latest, or the checkpoint given)
    as a Hub model folder at `out`. Returns what was written."""
    from . import checkpoint as ckpt
    from .rundir import RunDir, describe_checkpoint
    from .swap import check_destination, publish_folder, settle_swap

    given = source
    run = RunDir(storage.check_uri(source)) if not str(source).startswith(SCHEME) else None
    best = run.best() if run is not None else None
    loaded = ckpt.load(best or source)  # a search's best is a trial's run: its latest checkpoint
    used = describe_checkpoint(storage.join(given, "best") if best else given, loaded.path)
    out = storage.check_uri(out)
    if repo is not None:
        parse(SCHEME + repo)
    if run is not None and (out == run.uri or out.startswith(run.uri.rstrip("/") + "/")):
        raise UserError(f"{out}: is inside the run; export into a folder of its own")
    check_destination(out, _not_export_files, "an exported vae-ray model")
    evaluation = _evaluation(run) if run is not None else {}
    mixture = _mixture_of(loaded)
    with storage.Lock(out, "vae-ray export"), tempfile.TemporaryDirectory() as tmp:
        settle_swap(out, _not_export_files)
        check_destination(out, _not_export_files, "an exported vae-ray model")
        folder = Path(tmp) / "model"
        folder.mkdir()
        _write(folder, loaded, evaluation, used, samples_seed, repo, mixture)
        files = sorted(p.name for p in folder.iterdir())
        publish_folder(folder, out)
    return {"out": out, "checkpoint": used, "files": files, "metrics": sorted(_metrics(evaluation))}


def _mixture_of(loaded):
    """The Gaussian-mixture prior fitted for this checkpoint (in its run, or
    carried by the export it was loaded from), or None."""
    from . import prior
    from .checkpoint import describe

    blob = describe(loaded)
    if not blob["exported"]:
        try:
            prior.run_folder_of(blob)
        except UserError:  # a checkpoint outside any run has none
            return None
    found = prior.stored(blob)  # a damaged or foreign one: one line, nothing exported
    return found[0] if found is not None else None


def _evaluation(run) -> dict[str, Any]:
    try:
        value = storage.read_json(run.path("evaluation.json"))
    except (FileNotFoundError, ValueError, OSError):
        return {}
    return value if isinstance(value, dict) else {}


def _metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in evaluation.items()
        if key in CARD_METRICS and isinstance(value, (int, float)) and value == value
    }


def _write(
    folder: Path, loaded, evaluation: dict[str, Any], used: str, seed: int, repo: str | None, mixture=None
) -> None:
    import dataclasses
    import hashlib

    from . import checkpoint as ckpt
    from .pictures import samples
    from .plots import save_grid
    from .prior import EXPORTED

    ckpt.save_weights(loaded.model, folder / "model.safetensors")
    if mixture is not None:  # bound to these weights, as a run's mixture is to its checkpoint's
        digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        (folder / EXPORTED).write_bytes(dataclasses.replace(mixture, checkpoint_sha256=digest).to_bytes())
    config = {
        "format": FORMAT,
        "vae_ray": __version__,
        "config": loaded.config.to_dict(),
        "dataset": loaded.dataset,
        "state": loaded.state,
        "evaluation": _metrics(evaluation),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_grid(samples(loaded.model, 64, seed=seed), folder / "samples.png", cols=8)
    (folder / "README.md").write_text(card(loaded, evaluation, used, repo, mixture is not None))


def card(loaded, evaluation: dict[str, Any], used: str, repo: str | None = None, mixture: bool = False) -> str:
    """The model card: the Hub's YAML header (library, tags, datasets,
    model-index with evaluation.json's figures), then how to use the model."""
    import yaml

    spec = loaded.model.spec
    dataset = loaded.dataset
    name = str(dataset.get("name") or "images")
    conditional = spec.num_classes > 0
    header: dict[str, Any] = {
        "library_name": "vae-ray",
        "license": "other",
        "tags": ["vae-ray", "vae", "variational-autoencoder", "image-generation", "pytorch", "safetensors"],
        "pipeline_tag": "unconditional-image-generation",
    }
    if name in HUB_DATASETS:
        header["datasets"] = [HUB_DATASETS[name]]
    metrics = _metrics(evaluation)
    if metrics:
        header["model-index"] = [
            {
                "name": f"vae-ray-{spec.arch}-{name}",
                "results": [
                    {
                        "task": {"type": "unconditional-image-generation", "name": "Image generation"},
                        "dataset": {"type": HUB_DATASETS.get(name, name), "name": name, "split": "test"},
                        "metrics": [
                            {"type": CARD_METRICS[k][0], "value": round(v, 4), "name": CARD_METRICS[k][1]}
                            for k, v in metrics.items()
                        ],
                    }
                ],
            }
        ]
    h, w, c = spec.shape
    state = loaded.state
    table = "\n".join(f"| {CARD_METRICS[k][1]} | {v:.4g} |" for k, v in metrics.items())
    figures = (
        f"Measured by `vae-ray evaluate` on the test split of {name} "
        f"({evaluation.get('images', '?')} images):\n\n| figure | value |\n|---|---|\n{table}\n"
        if metrics
        else "No evaluation was run before the export (`vae-ray evaluate RUN`, then export again).\n"
    )
    label = ", label=3" if conditional else ""
    where = repo or "ORG/NAME"
    gmm_line = (
        f"\nvae-ray generate hf://{where} --num 10000 --out synthetic-gmm/ --prior gmm   # from the mixture prior"
        if mixture
        else ""
    )
    gmm_file = (
        "\n- `prior-gmm.safetensors`: a Gaussian mixture fitted to the training images' codes"
        f"{' (one per class)' if conditional else ''}, sampled by `--prior gmm` (sharper, more varied sets than N(0, I))."
        if mixture
        else ""
    )
    body = f"""
# vae-ray {spec.arch} VAE on {name}

A variational autoencoder trained with [vae-ray](https://pypi.org/project/vae-ray/):
the `{spec.arch}` network, a {spec.z_dim}-dimensional latent space, the `{spec.loss}` likelihood,
{h}x{w} {"colour" if c == 3 else "grey"} images{f", conditioned on {spec.num_classes} classes" if conditional else ""}.
Trained for {state.get("epoch", "?")} epochs; exported from `{storage.printable(used)}` on {time.strftime("%Y-%m-%d")}.

![64 samples](samples.png)

## Use it

```bash
pip install 'vae-ray[hub]'
vae-ray generate hf://{where} --num 10000 --out synthetic/ --format png   # or a local copy of this folder{gmm_line}
```

```python
import vae_ray

model = vae_ray.load("hf://{where}")     # or the folder's path
images = model.sample(64, seed=0{label})   # uint8 (64, {h}, {w}, {c})
mu, logvar = model.encode(images)
```

## Evaluation

{figures}
## Files

- `model.safetensors`: the weights{" (the weight average)" if loaded.config.ema else ""}.
- `config.json`: the training settings, the image shape and classes, the checkpoint's epoch and metrics.
- `samples.png`: 64 samples drawn from N(0, I).{gmm_file}
"""
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n" + body
