"""The Python API: what the command line does, from a notebook or a script.

    import vae_ray

    model = vae_ray.load("runs/mnist")              # a run, a checkpoint or an exported model; local, s3://, hf://
    images = model.sample(64, seed=0)               # uint8 (64, H, W, C): generate's first 64 latents
    mu, logvar = model.encode(images)               # float32 (64, K) each
    again = model.reconstruct(images)
    digits = model.decode(mu, label=3)              # a class-conditional model takes labels

    vae_ray.train(data="data/mnist", out="runs/mnist", epochs=10)
    vae_ray.tune(data="data/mnist", out="search/k", latent_dims=[2, 20], lrs=[1e-3, 3e-3], epochs=5)
    vae_ray.generate("runs/mnist", out="gen/mnist", num=10_000, format="parquet")
    vae_ray.encode("runs/mnist", out="latents/mnist", data="data/mnist")
    vae_ray.evaluate("runs/mnist", iw_samples=100)
    vae_ray.export("runs/mnist", out="hub/mnist-vae")  # model.safetensors, config.json, README.md (card)

`train`, `tune`, `generate`, `encode` and `evaluate` take the command line's options as
keyword arguments (`--latent-dim` is `latent_dim`) and run the very functions
the command line and Ray Jobs run (commands.py), so their checks, files and
guarantees are the same; each returns the command's JSON summary. A mistake
raises `vae_ray.UserError` with the one line the command would print.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import commands
from .errors import UserError

ImageArray = np.ndarray  # uint8 (N, H, W, C) or (N, H, W) for grey images; or floats in [0, 1]


class Model:
    """A trained VAE, on the CPU unless `device` says otherwise."""

    def __init__(self, loaded: Any, device: str = "cpu"):
        self._loaded = loaded
        self.device = device

    def __repr__(self) -> str:
        return f"vae_ray.Model({self.path!r}, {self.spec})"

    # -- what it is -----------------------------------------------------------
    @property
    def torch_module(self):
        """The underlying `torch.nn.Module` (vae_ray.model.VAE), in eval mode."""
        return self._loaded.model

    @property
    def spec(self):
        """The model's defining settings (vae_ray.spec.ModelSpec)."""
        return self._loaded.model.spec

    @property
    def path(self) -> str:
        return self._loaded.path

    @property
    def config(self) -> dict[str, Any]:
        return self._loaded.config.to_dict()

    @property
    def classes(self) -> list[str]:
        return list(self._loaded.dataset.get("classes", []))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.spec.shape

    @property
    def latent_dim(self) -> int:
        """Numbers in one latent vector z (for hvae: all its groups, flattened)."""
        return self.spec.z_dim

    # -- the four methods -----------------------------------------------------
    def sample(
        self,
        n: int,
        label: int | str | Sequence | None = None,
        temperature: float = 1.0,
        seed: int = 0,
        prior: str = "normal",
        group_temperatures: str | None = None,
        pixel_temperature: float = 1.0,
    ) -> np.ndarray:
        """n images as uint8 (n, H, W, C), decoded from the latent vectors that
        `vae-ray generate --seed SEED --prior PRIOR` decodes for its images
        0..n-1. A class-conditional model without `label` draws classes in
        turn (image i has class i mod C, as `generate --per-class`). `prior`
        "gmm" uses the mixture a `generate --prior gmm` of this checkpoint
        fitted and kept in its run. `group_temperatures` ("1,1,1.3": a factor
        on `temperature` per latent group, top first) and `pixel_temperature`
        (Bernoulli decoders: sigmoid(logit / T)) as generate's."""
        from .prior import draw_latents, group_scales

        if not 1 <= int(n) <= 1_000_000:
            raise UserError(f"n must be between 1 and 1000000 (got {n})")
        if not (np.isfinite(temperature) and temperature > 0):
            raise UserError(f"temperature must be a positive finite number (got {temperature})")
        scales = group_scales(self.spec.groups, group_temperatures)  # checked before anything is drawn
        pixel_temperature = self._check_pixel_temperature(pixel_temperature)
        idx = np.arange(int(n))
        if label is None and self.spec.num_classes:
            label = list(idx % self.spec.num_classes)
        mixture, classes = None, None
        if prior != "normal":
            mixture = self._mixture(prior)
            labels = self._labels(label, len(idx))
            classes = labels.cpu().numpy() if labels is not None else None
        z = draw_latents(int(seed), idx, self.latent_dim, float(temperature), scales, mixture, classes)
        return self.decode(z, label=label, pixel_temperature=pixel_temperature)

    def _check_pixel_temperature(self, value: float) -> float:
        import numbers

        from .genplan import check_options, check_pixel_temperature

        if isinstance(value, str):  # auto compares with the training images: generate's, with its --data
            raise UserError("pixel_temperature must be a number here (auto is generate's: it reads the dataset)")
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise UserError(f"pixel_temperature must be a number (got {value!r})")
        value = float(value)
        check_options(pixel_temperature=value)
        check_pixel_temperature(self.spec.loss, value, self.path)
        return value

    def _mixture(self, prior: str):
        """The fitted mixture of this checkpoint (vae_ray/prior.py)."""
        from . import prior as priors
        from .checkpoint import describe

        if prior not in priors.PRIORS:
            raise UserError(f"prior must be one of {', '.join(priors.PRIORS)} (got {prior!r})")
        blob = describe(self._loaded)
        found = priors.stored(blob)
        if found is None:
            raise UserError(priors.not_fitted(blob))
        return found[0]

    def encode(self, images: ImageArray, label: int | str | Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The posterior's mean and log-variance, float32 (N, K) each."""
        import torch

        x = self._pixels(images)
        with torch.no_grad():
            mu, logvar = self.torch_module.encode(x, self._labels(label, len(x)))
        return mu.float().cpu().numpy(), logvar.float().cpu().numpy()

    def decode(
        self, z: np.ndarray, label: int | str | Sequence | None = None, pixel_temperature: float = 1.0
    ) -> np.ndarray:
        """Latent vectors (N, K) to uint8 images (N, H, W, C): the decoder's
        mean (with `pixel_temperature`, as `sample`'s)."""
        import torch

        from .images import to_uint8

        pixel_temperature = self._check_pixel_temperature(pixel_temperature)

        z = torch.as_tensor(np.asarray(z, dtype=np.float32)).to(self.device)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise UserError(f"z must have shape (N, {self.latent_dim}) (got {tuple(z.shape)})")
        model = self.torch_module
        with torch.no_grad():
            return to_uint8(model.mean_image(model.decode(z, self._labels(label, len(z))), pixel_temperature))

    def reconstruct(self, images: ImageArray, label: int | str | Sequence | None = None) -> np.ndarray:
        """Each image through the posterior mean and back, uint8 (N, H, W, C)."""
        mu, _ = self.encode(images, label)
        return self.decode(mu, label)

    # -- inputs ---------------------------------------------------------------
    def _pixels(self, images: ImageArray):
        import torch

        from .images import to_float

        array = np.asarray(images)
        h, w, c = self.image_shape
        if array.ndim == 3 and c == 1:
            array = array[..., None]
        if array.ndim != 4 or array.shape[1:] != (h, w, c):
            raise UserError(f"images must have shape (N, {h}, {w}, {c}) (got {array.shape})")
        if array.dtype == np.uint8:
            return to_float(array).to(self.device)
        array = array.astype(np.float32)
        if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise UserError("float images must hold values in [0, 1] (or pass uint8 pixels)")
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(self.device)

    def _labels(self, label, n: int):
        import torch

        classes = self.spec.num_classes
        if not classes:
            if label is not None:
                raise UserError(f"{self.path}: not a class-conditional model; it takes no labels")
            return None
        if label is None:
            raise UserError(f"{self.path}: a class-conditional model; pass label= (a class index or name)")
        values = [label] * n if isinstance(label, (int, str, np.integer)) else list(label)
        if len(values) != n:
            raise UserError(f"got {len(values)} labels for {n} images")
        indices = [self._class_index(v) for v in values]
        return torch.tensor(indices, dtype=torch.long, device=self.device)

    def _class_index(self, value) -> int:
        if isinstance(value, str):
            if value not in self.classes:
                raise UserError(f"unknown class {value!r} (classes: {', '.join(self.classes[:10])})")
            return self.classes.index(value)
        index = int(value)
        if not 0 <= index < self.spec.num_classes:
            raise UserError(f"label {index} is out of range (0-{self.spec.num_classes - 1})")
        return index


def load(path: str, device: str = "cpu") -> Model:
    """A trained model from a run folder (its `latest` checkpoint), a checkpoint folder or a folder
    `vae-ray export` wrote; local, s3:// or hf://ORG/NAME (with huggingface_hub installed)."""
    from .checkpoint import load as load_checkpoint

    return Model(load_checkpoint(path, device=device), device=device)


def train(*, resume: bool = False, address: str | None = None, **settings: Any) -> dict[str, Any]:
    """`vae-ray train`: settings as keyword arguments (data=, out=, epochs=, latent_dim=, ...)."""
    return commands.train(settings, resume=resume, address=address)


def tune(
    *,
    out: str,
    latent_dims: Sequence[int],
    lrs: Sequence[float] | None = None,
    lr_range: tuple[float, float] | None = None,
    num_samples: int = 1,
    betas: Sequence[float] = (1.0,),
    search: str = "auto",
    grace_period: int = 1,
    metric: str = "test_matlab_elbo",
    max_concurrent: int | None = None,
    gpus_per_trial: float | None = None,
    resume: bool = False,
    address: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """`vae-ray tune`: the search space, the strategy (`search`: auto, grid, random or optuna), the
    search's options, and every train setting for all trials."""
    space = {
        "latent_dims": list(latent_dims),
        "lrs": None if lrs is None else list(lrs),
        "lr_range": None if lr_range is None else tuple(lr_range),
        "num_samples": num_samples,
        "betas": list(betas),
        "strategy": search,
    }
    options = {
        "grace_period": grace_period,
        "metric": metric,
        "max_concurrent": max_concurrent,
        "gpus_per_trial": gpus_per_trial,
        "resume": resume,
    }
    result = commands.tune({**settings, "out": out}, space, out, options, address=address)
    result.pop("rows", None)
    return result


def generate(
    checkpoint: str, *, out: str, num: int, format: str = "png", address: str | None = None, **options: Any
) -> dict[str, Any]:
    """`vae-ray generate`: seed=, temperature=, label=, per_class=, overwrite=, actors=, gpu=,
    min_confidence=, max_copy_distance=, data=, prior=, ..."""
    from .genplan import GenerateOptions

    _known(options, GenerateOptions, "generate", skip=("num", "fmt"))
    return commands.generate(
        {"checkpoint": checkpoint, "out": out, "num": num, "fmt": format, **options}, address=address
    )


def encode(
    checkpoint: str, *, out: str, data: str | None = None, address: str | None = None, **options: Any
) -> dict[str, Any]:
    """`vae-ray encode`: a dataset's posterior means and log-variances as Parquet (split=, batch_size=, ...)."""
    from .encode import Encoding

    _known(options, Encoding, "encode", skip=("checkpoint", "out", "data"))
    return commands.encode({"checkpoint": checkpoint, "out": out, "data": data, **options}, address=address)


def evaluate(checkpoint: str, *, address: str | None = None, **options: Any) -> dict[str, Any]:
    """`vae-ray evaluate`: split=, limit=, iw_samples=, samples=, tstr=, ..."""
    from .evaluate import Evaluation

    _known(options, Evaluation, "evaluate", skip=("checkpoint",))
    return commands.evaluate({"checkpoint": checkpoint, **options}, address=address)


def tune_sampling(checkpoint: str, *, out: str, address: str | None = None, **options: Any) -> dict[str, Any]:
    """`vae-ray tune-sampling`: data=, temperatures=, priors=, min_confidences=, num=, metric=, ..."""
    from .sampling import search

    _known(options, search, "tune_sampling", skip=("checkpoint", "out", "address", "progress"))
    return search(checkpoint, out, address=address, **options)


def export(run: str, *, out: str, repo: str | None = None, seed: int = 0) -> dict[str, Any]:
    """`vae-ray export`: the run's best checkpoint (else its latest) as a Hugging Face Hub model folder."""
    from .hub import export as export_model

    return export_model(run, out, samples_seed=seed, repo=repo)


def _known(options: dict[str, Any], command: Any, name: str, skip: tuple[str, ...]) -> None:
    """An unknown keyword is a user's mistake (one line), not a TypeError deep inside."""
    import inspect

    accepted = [p for p in inspect.signature(command).parameters if p not in ("self", *skip)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"{name}: unknown option(s) {', '.join(unknown)} (known: {', '.join(accepted)})")


class CommandModule(types.ModuleType):
    """`vae_ray.generate`, `vae_ray.encode`, `vae_ray.evaluate` and `vae_ray.tune` name both a
    module of the package and a function of this API. Python binds a
    package's submodule to the package's attribute of the same name when it
    is imported, so the module stays the attribute (the package's own imports
    keep working) and calling it calls the function here."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        function = getattr(importlib.import_module(__name__), self.__name__.rsplit(".", 1)[1])
        return function(*args, **kwargs)


def callable_module(name: str) -> None:
    """Make the module `name` (one of generate, encode, evaluate, tune) callable as its API function."""
    import sys

    sys.modules[name].__class__ = CommandModule
