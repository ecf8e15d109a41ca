"""What defines a model, and the tables of the networks and likelihoods it
can be made of. No torch here: the command line's choices and help, and
every check of a checkpoint's settings, read these tables without loading
a deep-learning library.

    ARCHITECTURES   name -> Architecture: what image sides it takes, its
                    measured training recipe (model.py holds the layers)
    LIKELIHOODS     name -> Likelihood: how it reads 8-bit pixels, whether it
                    learns a scale, whether it takes binarised targets
    ModelSpec       the one description of a model: network, image shape,
                    latent size, classes, likelihood. Built once from a run's
                    config and its dataset (`from_config`), and once from a
                    checkpoint's config.json (`from_checkpoint`), where every
                    value is data and is bounded before any tensor is made.

A new network is one entry in ARCHITECTURES, its builder in model.py's
BUILDERS, and one row in tests/test_model.py's table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import UserError

MAX_SIDE = 1024  # the largest image side any command prepares or loads
MAX_LATENT = 4096
MAX_CLASSES = 100_000
MAX_WIDTH, MAX_DEPTH = 1024, 16
MAX_Z = 1 << 18  # numbers in one flattened latent vector


@dataclass(frozen=True)
class Architecture:
    name: str
    about: str
    side_multiple: int  # image height and width must be multiples of this
    recipe: dict[str, Any]  # batch_size, lr, lr_schedule, adam_beta2 when left at auto (docs/benchmarks.md)
    sizes: dict[str, int] | None = None  # width and depth when left at 0 (auto); None: a fixed network


@dataclass(frozen=True)
class Likelihood:
    name: str
    about: str
    discrete: bool = False  # a distribution over the 256 pixel values: bits/dim are meaningful
    learned_scale: bool = False  # one learned log scale per channel (model.log_sigma)
    binarize: bool = False  # may score dynamically binarised targets (--binarize)
    mixture: int = 0  # > 0: the decoder outputs this many components per pixel (networks with `sizes` only)

    def outputs(self, channels: int) -> int:
        """The decoder's output channels for images of `channels` channels:
        one logit per channel, or per mixture component a weight and each
        channel's mean and log scale, plus the colour channels' coupling
        coefficients (green on red, blue on red and green)."""
        if not self.mixture:
            return channels
        return self.mixture * (1 + 2 * channels + channels * (channels - 1) // 2)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "mnist",
            "the MATLAB example's network: two 3x3/2 convolutions, one dense layer, three transposed convolutions",
            side_multiple=4,
            recipe={"batch_size": 32, "lr": 3e-3, "lr_schedule": "onecycle", "adam_beta2": 0.99},
        ),
        Architecture(
            "hvae",
            "a hierarchical VAE made for generation: residual cells, a dense top latent and spatial latent "
            "groups at 1/4 and 1/2 of the image side, each conditioned on the groups above it",
            side_multiple=4,
            recipe={"batch_size": 64, "lr": 2e-3, "lr_schedule": "onecycle", "adam_beta2": 0.99, "grad_clip": 200.0},
            sizes={"width": 48, "depth": 2},
        ),
        Architecture(
            "cifar",
            "the PyTorch CIFAR-10 tutorial's network: three 4x4/2 convolutions with BatchNorm, 1024 hidden units",
            side_multiple=8,
            recipe={"batch_size": 128, "lr": 2e-3, "lr_schedule": "onecycle", "adam_beta2": 0.99},
        ),
    )
}

LIKELIHOODS: dict[str, Likelihood] = {
    lk.name: lk
    for lk in (
        Likelihood("matlab", "0.5 * summed squared error (a unit-variance Gaussian): the MATLAB example's loss"),
        Likelihood("bernoulli", "summed binary cross-entropy of the pixels", binarize=True),
        Likelihood("gaussian", "a Gaussian with a learned scale per channel (sigma-VAE)", learned_scale=True),
        Likelihood(
            "logistic",
            "a discretised logistic over the 256 pixel values (bits/dim)",
            discrete=True,
            learned_scale=True,
        ),
        Likelihood(
            "logistic_mixture",
            "a mixture of 10 discretised logistics per pixel, each with its own mean and scale, the colour "
            "channels coupled (PixelCNN++; bits/dim; hvae only)",
            discrete=True,
            mixture=10,
        ),
    )
}

DISCRETE_LOSSES = tuple(name for name, lk in LIKELIHOODS.items() if lk.discrete)


def hvae_groups(shape: tuple[int, int, int], latent_dim: int, depth: int) -> list[tuple[int, int, int]]:
    """The hierarchical network's latent groups, top first: a dense vector of
    `latent_dim`, `depth` groups of 4 channels at 1/4 of the image side (the
    shapes of strokes and parts), then ceil(depth / 2) groups of 2 channels
    at 1/2 of the side (edges and texture). hvae.py builds them."""
    h, w, _ = shape
    quarter = [(h // 4, w // 4, 4)] * depth
    half = [(h // 2, w // 2, 2)] * -(-depth // 2)
    return [(1, 1, latent_dim), *quarter, *half]


def _get_or(get, name: str, default: Any) -> Any:
    """A setting that configs written before it existed do not hold."""
    try:
        value = get(name)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def choose_arch(shape: tuple[int, int, int] | list[int]) -> str:
    """`--arch auto`: the CIFAR network for colour images it can take, else the MNIST one."""
    h, w, c = shape
    cifar = ARCHITECTURES["cifar"].side_multiple
    return "cifar" if c == 3 and h % cifar == 0 and w % cifar == 0 else "mnist"


def choose_loss(shape: tuple[int, int, int] | list[int]) -> str:
    """`--loss auto`: Bernoulli for grey images, a learned-scale Gaussian for colour.

    Grey images were the MATLAB example's loss (0.5 * SSE, a unit-variance
    Gaussian) until measured against real data: the 10-epoch conditional
    MNIST model's 20,000 samples had recall 0.003 and trained a classifier to
    0.574 of real data's accuracy; the same network and recipe with
    Bernoulli: recall 0.474, 0.938 (docs/benchmarks.md, "Synthetic sets"). A
    unit variance is far wider than pixel noise, so the decoder learns to
    average. `--loss matlab` keeps the seed's loss and its figures."""
    return "bernoulli" if shape[2] == 1 else "gaussian"


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines a model's layers and likelihood."""

    arch: str
    shape: tuple[int, int, int]  # height, width, channels
    latent_dim: int
    num_classes: int = 0  # > 0: class-conditional
    loss: str = "matlab"
    width: int = 0  # channels at 1/4 of the image side (networks with `sizes` only; 0 = their default)
    depth: int = 0  # latent groups at 1/4 of the image side (likewise)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def likelihood(self) -> Likelihood:
        return LIKELIHOODS[self.loss]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"shape": list(self.shape)}

    @property
    def groups(self) -> list[tuple[int, int, int]]:
        """The latent groups, top first, as (height, width, channels); a dense
        group is (1, 1, size). The seeds' networks have one dense group."""
        if self.architecture.sizes is None:
            return [(1, 1, self.latent_dim)]
        return hvae_groups(self.shape, self.latent_dim, self.depth or self.architecture.sizes["depth"])

    @property
    def z_dim(self) -> int:
        """Numbers in one latent vector z, all groups flattened: what `generate`
        draws, `encode` writes and a Python caller passes to `decode`."""
        return sum(h * w * c for h, w, c in self.groups)

    def check(self, where: str = "") -> ModelSpec:
        """Every value in range, before any tensor is made: a spec read from a
        file is data, and a config that asks for 4096x4096 images must fail
        in one line, not after allocating gigabytes."""
        at = f"{where}: " if where else ""
        if self.arch not in ARCHITECTURES:
            raise UserError(f"{at}unknown network {self.arch!r} (known: {', '.join(ARCHITECTURES)})")
        if self.loss not in LIKELIHOODS:
            raise UserError(f"{at}unknown likelihood {self.loss!r} (known: {', '.join(LIKELIHOODS)})")
        h, w, c = self.shape
        if not (4 <= h <= MAX_SIDE and 4 <= w <= MAX_SIDE and c in (1, 3)):
            raise UserError(f"{at}image shape {list(self.shape)} is out of range (sides 4-{MAX_SIDE}, 1 or 3 channels)")
        step = self.architecture.side_multiple
        if h % step or w % step:
            raise UserError(f"{at}the {self.arch} network needs image sides divisible by {step}; got {h}x{w}")
        if not 1 <= self.latent_dim <= MAX_LATENT:
            raise UserError(f"{at}latent size {self.latent_dim} is out of range (1-{MAX_LATENT})")
        if not 0 <= self.num_classes <= MAX_CLASSES or self.num_classes == 1:
            raise UserError(f"{at}{self.num_classes} classes is out of range (0, or 2-{MAX_CLASSES})")
        sized = self.architecture.sizes is not None
        if self.likelihood.mixture and not sized:
            raise UserError(
                f"{at}the {self.loss} likelihood needs --arch hvae (the {self.arch} network has one output per pixel)"
            )
        if not sized and (self.width or self.depth):
            raise UserError(f"{at}the {self.arch} network has a fixed size: --width and --depth apply to hvae only")
        if not (0 <= self.width <= MAX_WIDTH and self.width % 4 == 0 and 0 <= self.depth <= MAX_DEPTH):
            raise UserError(
                f"{at}width {self.width} / depth {self.depth} out of range "
                f"(width a multiple of 4 up to {MAX_WIDTH}, depth up to {MAX_DEPTH})"
            )
        if self.z_dim > MAX_Z:
            raise UserError(f"{at}the latent vector would hold {self.z_dim:,} numbers (at most {MAX_Z:,})")
        return self

    @classmethod
    def from_config(cls, config: Any, dataset: dict[str, Any], where: str = "") -> ModelSpec:
        """From a run's config (a TrainConfig or its dict) and its dataset description."""
        get = config.get if isinstance(config, dict) else lambda name: getattr(config, name)
        try:
            spec = cls(
                arch=str(get("arch")),
                shape=tuple(int(v) for v in dataset["shape"]),
                latent_dim=int(get("latent_dim")),
                num_classes=int(dataset["num_classes"]) if get("conditional") else 0,
                loss=str(get("loss")),
                width=int(_get_or(get, "width", 0)),
                depth=int(_get_or(get, "depth", 0)),
            )
            if len(spec.shape) != 3:
                raise ValueError("shape")
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where or 'config'}: does not describe a vae-ray model (damaged config)") from None
        return spec.check(where)

    from_checkpoint = from_config  # a checkpoint's config.json holds {"config": ..., "dataset": ...} alike
