"""The VAE and its losses. Plain PyTorch, no Ray: usable on its own.

Two networks from the source documents:
- `mnist`: the MATLAB example (conv 3x3/2 with 32 and 64 filters, one fully
  connected layer to 2K; "project and reshape" then three transposed convs).
  Generalised to any H x W divisible by 4 and any channel count.
- `cifar`: the PyTorch tutorial (three conv 4x4/2 + BatchNorm, 1024 hidden,
  mirrored decoder). Any H x W divisible by 8.

The decoder returns logits; each loss reads them its own way (sigmoid mean
for `matlab`, `gaussian` and `logistic`, Bernoulli logits for `bernoulli`). Inputs are
always pixels in [0, 1], so the MATLAB-unit ELBO is comparable for any model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ARCHITECTURES, LIKELIHOODS, ModelSpec

LOG_2PI = math.log(2 * math.pi)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # keeps exp(logvar) finite in fp32
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -6.0, 2.0
LOG_SIGMA_INIT = -3.0  # a scale of about 13 of the 255 intensity steps
LOG_SCALE_MIN = -8.0  # logistic scale floor: well under one 8-bit step (1/255)
HALF_BIN = 0.5 / 255  # half the width of one 8-bit intensity step in [0, 1]


class VAE(nn.Module):
    def __init__(
        self, arch: str, shape: tuple[int, int, int], latent_dim: int, num_classes: int = 0, loss: str = "matlab"
    ):
        super().__init__()
        h, w, c = shape
        self.arch, self.shape, self.latent_dim = arch, (h, w, c), latent_dim
        self.num_classes, self.loss = num_classes, loss
        if arch not in BUILDERS:
            raise ValueError(f"unknown arch {arch!r}")
        parts = BUILDERS[arch](self.shape, latent_dim, num_classes)
        self.encoder, self.decoder, self.head = parts.encoder, parts.decoder, parts.head
        self.centered_inputs = parts.centered_inputs
        if parts.glorot:
            _glorot(self)
        self._likelihood_init(c, loss)

    def _likelihood_init(self, c: int, loss: str) -> None:
        if loss not in NLL:
            raise ValueError(f"unknown loss {loss!r}")
        # sigma-VAE / discretised logistic: one learned log scale per channel.
        # It starts near where CIFAR-10 training settles (-2.8 to -3.1): from
        # 0 (a scale as wide as the whole intensity range), Adam moves it by
        # about lr per step, and until it gets there the weak reconstruction
        # gradient held the first epochs back (10,000 CIFAR images, 8 epochs,
        # logistic: 8.99 bits/dim from 0, 6.75 from -3; Gaussian, 5 epochs:
        # -ELBO 1,708 nats from 0, 495 from -3).
        learned = LIKELIHOODS[loss].learned_scale
        self.log_sigma = nn.Parameter(torch.full((c,), LOG_SIGMA_INIT)) if learned else None

    hierarchical = False  # one latent group: the posterior of z is one Gaussian given x

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.arch, self.shape, self.latent_dim, self.num_classes, self.loss)

    def posterior(self, x: torch.Tensor, y: torch.Tensor | None, noise: torch.Tensor):
        """z drawn from q(z | x) with the given standard noise -> (logits, z, logvar)."""
        mu, logvar = self.encode(x, y)
        z = mu + noise * torch.exp(0.5 * logvar)
        return self.decode(z, y), z, logvar

    # -- the four methods -------------------------------------------------
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [0, 1], (N, C, H, W) -> (mu, logvar), each (N, K)."""
        if self.centered_inputs:
            x = x * 2 - 1  # the tutorial normalises to [-1, 1]
        feats = self.encoder(x)
        if self.num_classes:
            feats = torch.cat([feats, self._one_hot(y, feats)], dim=1)
        mu, logvar = self.head(feats).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, samples: int = 1) -> torch.Tensor:
        """z = mu + eps * sigma, eps ~ N(0, I) (Kingma & Welling, section 2.4).

        With `samples` > 1 the result stacks that many draws, sample-major
        ((samples * N, K)), in antithetic pairs: eps and -eps. The pair's mean
        of any function of z is still unbiased, but the part of it linear in
        eps cancels, which is most of the gradient noise of the reconstruction
        term.
        """
        if samples == 1:
            return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        eps = torch.randn(((samples + 1) // 2, *mu.shape), dtype=mu.dtype, device=mu.device)
        eps = torch.cat([eps, -eps])[:samples]
        return (mu + eps * torch.exp(0.5 * logvar)).flatten(0, 1)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z (N, K) -> logits (N, C, H, W)."""
        if self.num_classes:
            z = torch.cat([z, self._one_hot(y, z)], dim=1)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, samples: int = 1):
        """-> (logits, mu, logvar); logits has `samples` * N rows, sample-major."""
        mu, logvar = self.encode(x, y)
        z = self.reparameterize(mu, logvar, samples)
        if y is not None and samples > 1:
            y = y.repeat(samples)
        return self.decode(z, y), mu, logvar

    # -- helpers ----------------------------------------------------------
    def _one_hot(self, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if y is None:
            raise ValueError("this is a class-conditional model: pass labels")
        return F.one_hot(y.long(), self.num_classes).to(like.dtype)

    def mean_image(self, logits: torch.Tensor, pixel_temperature: float = 1.0) -> torch.Tensor:
        """The decoder's mean in [0, 1] for every likelihood used here. For a
        Bernoulli decoder, `pixel_temperature` T < 1 gives the mean of each
        pixel's likelihood raised to 1/T (renormalised): sigmoid(logit / T),
        sharper strokes than the plain mean, which averages over where an
        edge may fall (genplan.check_pixel_temperature allows it for
        Bernoulli decoders only)."""
        if LIKELIHOODS[self.loss].mixture:
            return logistic_mixture_mean(logits.float(), self.shape[2])
        if pixel_temperature != 1.0:
            return torch.sigmoid(logits.float() / pixel_temperature)
        return torch.sigmoid(logits.float())

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode z ~ N(0, temperature^2 I); returns images in [0, 1], (n, C, H, W)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device) * temperature
        return self.mean_image(self.decode(z, labels))


class _CifarHead(nn.Module):
    """flatten -> 1024 -> ReLU -> two heads (mu, logvar), as in the tutorial."""

    def __init__(self, features: int, latent_dim: int):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(features, 1024), nn.ReLU())
        self.mu, self.logvar = nn.Linear(1024, latent_dim), nn.Linear(1024, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        return torch.cat([self.mu(h), self.logvar(h)], dim=1)


def _glorot(module: nn.Module) -> None:
    """The MATLAB example's initialisation: its convolution, transposed
    convolution and fully connected layers default to Glorot-uniform weights
    and zero biases (PyTorch's default draws weights with half the variance)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


def _mnist_encoder(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, stride=2, padding=1),
        nn.ReLU(),  # "same": H/2
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),  # H/4
        nn.Flatten(),
    )


class _MnistDecoder(nn.Module):
    def __init__(self, z_dim: int, h: int, w: int, c: int):
        super().__init__()
        self.h4, self.w4 = h // 4, w // 4
        self.project = nn.Linear(z_dim, 64 * self.h4 * self.w4)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(64, 64, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, c, 3, stride=1, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.project(z).view(-1, 64, self.h4, self.w4))


def _cifar_encoder(c: int) -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 4, stride=2, padding=1), nn.ReLU(), nn.BatchNorm2d(o)]

    return nn.Sequential(*block(c, 32), *block(32, 64), *block(64, 128), nn.Flatten())


class _CifarDecoder(nn.Module):
    def __init__(self, z_dim: int, h: int, w: int, c: int):
        super().__init__()
        self.h8, self.w8 = h // 8, w // 8
        self.fc = nn.Sequential(nn.Linear(z_dim, 1024), nn.Linear(1024, 128 * self.h8 * self.w8), nn.ReLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(64),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(32),
            nn.ConvTranspose2d(32, c, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, 128, self.h8, self.w8))


# ---------------------------------------------------------------------------
# The networks by name (spec.ARCHITECTURES describes them without torch)
# ---------------------------------------------------------------------------
@dataclass
class Parts:
    encoder: nn.Module  # images -> features (N, F)
    decoder: nn.Module  # z (plus one-hot labels) -> logits (N, C, H, W)
    head: nn.Module  # features (plus one-hot labels) -> (mu, logvar) side by side
    centered_inputs: bool = False  # the encoder sees pixels in [-1, 1]
    glorot: bool = False  # Glorot-uniform weights, zero biases


def _mnist_parts(shape: tuple[int, int, int], latent_dim: int, num_classes: int) -> Parts:
    h, w, c = shape  # made in this order: a seed gives the weights it always gave
    encoder, decoder = _mnist_encoder(c), _MnistDecoder(latent_dim + num_classes, h, w, c)
    head = nn.Linear(64 * (h // 4) * (w // 4) + num_classes, 2 * latent_dim)
    return Parts(encoder, decoder, head, glorot=True)


def _cifar_parts(shape: tuple[int, int, int], latent_dim: int, num_classes: int) -> Parts:
    h, w, c = shape
    encoder, decoder = _cifar_encoder(c), _CifarDecoder(latent_dim + num_classes, h, w, c)
    head = _CifarHead(128 * (h // 8) * (w // 8) + num_classes, latent_dim)
    return Parts(encoder, decoder, head, centered_inputs=True)


BUILDERS: dict[str, Callable[[tuple[int, int, int], int, int], Parts]] = {
    "mnist": _mnist_parts,
    "cifar": _cifar_parts,
}


# ---------------------------------------------------------------------------
# Losses. All per image, computed in fp32 whatever the autocast dtype.
# ---------------------------------------------------------------------------
def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per image (Kingma & Welling, appendix B)."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def matlab_recon(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The MATLAB example's reconstruction term: 0.5 * summed squared error per image."""
    return 0.5 * (torch.sigmoid(logits.float()) - x.float()).pow(2).flatten(1).sum(1)


def matlab_error(model: VAE, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """0.5 * summed squared error of the decoder's mean image, whatever its
    likelihood: the MATLAB-unit ELBO every model reports."""
    return 0.5 * (model.mean_image(logits) - x.float()).pow(2).flatten(1).sum(1)


def _matlab_nll(model: VAE, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return matlab_recon(logits, x) + 0.5 * x[0].numel() * LOG_2PI  # a Gaussian with sigma = 1


def _bernoulli_nll(model: VAE, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def _gaussian_nll(model: VAE, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    log_sigma = model.log_sigma.float().clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX).view(1, -1, 1, 1)
    z = (x - torch.sigmoid(logits)) * torch.exp(-log_sigma)
    return (0.5 * z.pow(2) + log_sigma + 0.5 * LOG_2PI).flatten(1).sum(1)


def _logistic_nll(model: VAE, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    log_scale = model.log_sigma.float().clamp(LOG_SCALE_MIN, LOG_SIGMA_MAX).view(1, -1, 1, 1)
    return -discretized_logistic_log_prob(x, torch.sigmoid(logits), log_scale).flatten(1).sum(1)


def _mixture_parts(params: torch.Tensor, channels: int):
    """Split a mixture decoder's output (N, M * (1 + 2C + C(C-1)/2), H, W)
    -> log weights (N, M, H, W), means and log scales (N, C, M, H, W) in
    [0, 1] pixel units, coupling coefficients (N, C(C-1)/2, M, H, W).

    The raw outputs are read as PixelCNN++ reads them in its [-1, 1] pixel
    space (mean 0 is mid-grey, log scale 0 is half the range), so the
    network starts where that design starts."""
    n, _, h, w = params.shape
    m = params.shape[1] // (1 + 2 * channels + channels * (channels - 1) // 2)
    log_weights, means, log_scales, coeffs = torch.split(
        params, [m, channels * m, channels * m, channels * (channels - 1) // 2 * m], dim=1
    )
    means = 0.5 + 0.5 * means.view(n, channels, m, h, w)
    log_scales = (log_scales.view(n, channels, m, h, w) - math.log(2)).clamp(LOG_SCALE_MIN, LOG_SIGMA_MAX)
    coeffs = torch.tanh(coeffs.view(n, -1, m, h, w))
    return F.log_softmax(log_weights, dim=1), means, log_scales, coeffs


def _coupled(means: torch.Tensor, coeffs: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Colour channels' means given the channels before them (PixelCNN++):
    green moves with red, blue with red and green. `pixels` (N, C, 1, H, W)."""
    if means.shape[1] == 1:
        return means
    r, g, b = (pixels[:, c] - 0.5 for c in range(3))
    return torch.stack(
        [means[:, 0], means[:, 1] + coeffs[:, 0] * r, means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g], dim=1
    )


def logistic_mixture_log_prob(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log P(x) per pixel (N, H, W) of 8-bit images x (N, C, H, W) in [0, 1]
    under a mixture of discretised logistics, each component's channels
    drawn in turn: a distribution over the 256^C values of a pixel."""
    log_weights, means, log_scales, coeffs = _mixture_parts(params, x.shape[1])
    pixels = x.unsqueeze(2)
    per_channel = discretized_logistic_log_prob(pixels, _coupled(means, coeffs, pixels), log_scales)
    return torch.logsumexp(log_weights + per_channel.sum(1), dim=1)


def logistic_mixture_mean(params: torch.Tensor, channels: int) -> torch.Tensor:
    """The mixture's mean image, approximately (N, C, H, W): each
    component's colour coupling taken at its own means, and each
    component's mean clamped to the pixel range instead of integrating its
    tails. Close once the scales are small, as after a few epochs; early in
    training, with wide components, it can be off by a tenth of the range."""
    log_weights, means, _, coeffs = _mixture_parts(params, channels)
    if channels == 3:  # green and blue follow red and green at their component's means
        r = means[:, 0].clamp(0, 1)
        g = (means[:, 1] + coeffs[:, 0] * (r - 0.5)).clamp(0, 1)
        b = means[:, 2] + coeffs[:, 1] * (r - 0.5) + coeffs[:, 2] * (g - 0.5)
        means = torch.stack([r, g, b], dim=1)
    return (log_weights.exp().unsqueeze(1) * means.clamp(0, 1)).sum(2)


def _mixture_nll(model: VAE, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return -logistic_mixture_log_prob(logits, x).flatten(1).sum(1)


# -log p(x | z) in nats per image, by likelihood (spec.LIKELIHOODS describes them without torch).
NLL: dict[str, Callable[[VAE, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "matlab": _matlab_nll,
    "bernoulli": _bernoulli_nll,
    "gaussian": _gaussian_nll,
    "logistic": _logistic_nll,
    "logistic_mixture": _mixture_nll,
}


def recon_nll(model: VAE, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x | z) in nats per image, for the model's own likelihood."""
    if model.loss not in NLL:
        raise ValueError(f"unknown loss {model.loss!r}")
    return NLL[model.loss](model, logits.float(), x.float())


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per pixel for 8-bit x in {0, 1/255, ..., 1} under a logistic
    of `mean` and exp(log_scale), integrated over the pixel's bin; the two end
    bins take the tails (Salimans et al. 2017, PixelCNN++). Sums to 1 over
    the 256 values, so -log P in bits per dimension is directly comparable
    with the literature's figures."""
    centered = x - mean
    inv_scale = torch.exp(-log_scale)
    plus_in = inv_scale * (centered + HALF_BIN)
    min_in = inv_scale * (centered - HALF_BIN)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in))
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_scale * centered  # when the bin mass underflows:
    log_pdf_mid = mid_in - log_scale - 2 * F.softplus(mid_in)  # density times the bin width
    inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_mid + math.log(2 * HALF_BIN))
    return torch.where(x < HALF_BIN, log_cdf_plus, torch.where(x > 1 - HALF_BIN, log_one_minus_cdf_min, inner))


def recon_term(model: VAE, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What training minimises for reconstruction: the NLL without constants
    for `matlab` (so losses read in the documents' unit), the full NLL otherwise."""
    if model.loss == "matlab":
        return matlab_recon(logits, x)
    return recon_nll(model, logits, x)


@dataclass
class BatchTerms:
    """Per-image terms of one batch, all fp32 tensors of shape (N,)."""

    loss: torch.Tensor  # the training objective, weights and warm-up applied
    recon: torch.Tensor  # reconstruction term of the training objective
    kl: torch.Tensor
    neg_elbo_nats: torch.Tensor
    matlab_elbo: torch.Tensor


def batch_terms(
    model: VAE,
    x: torch.Tensor,
    target: torch.Tensor,
    logits: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
    recon_weight: float = 1.0,
) -> BatchTerms:
    """Every per-image quantity training and evaluation report, from one forward pass.

    `x` is the [0, 1] input; `target` is what the likelihood scores (the
    binarised input under dynamic binarisation, else `x`). `logits` may hold
    several latent samples per image (`VAE.forward(..., samples=S)`): every
    reconstruction term is then the mean over them.
    """
    kl = kl_divergence(mu, logvar)
    if kl.shape[0] != x.shape[0]:  # a hierarchical posterior: one KL per drawn path, sample-major
        kl = kl.view(-1, x.shape[0]).mean(0)
    # Sample-major logits: one (N, ...) slice per latent sample, each scored against the same input.
    parts = logits.chunk(logits.shape[0] // x.shape[0])

    def mean(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values).mean(0)

    recon = mean([recon_term(model, part, target) for part in parts])
    nll = mean([recon_nll(model, part, target) for part in parts])
    matlab = mean([matlab_error(model, part, x) for part in parts]) + kl
    return BatchTerms(
        loss=recon_weight * recon + beta * kl, recon=recon, kl=kl, neg_elbo_nats=nll + kl, matlab_elbo=matlab
    )


def _hierarchical(spec: ModelSpec) -> VAE:
    from .hvae import HierarchicalVAE  # its own module; it builds on VAE

    sizes = spec.architecture.sizes or {}
    width, depth = spec.width or sizes["width"], spec.depth or sizes["depth"]
    return HierarchicalVAE(spec.shape, spec.latent_dim, spec.num_classes, spec.loss, width, depth)


def _make(spec: ModelSpec) -> VAE:
    if spec.arch in BUILDERS:
        return VAE(spec.arch, spec.shape, spec.latent_dim, spec.num_classes, spec.loss)
    return NETWORKS[spec.arch](spec)


# Networks that are not an encoder, a head and a decoder (spec.ARCHITECTURES names them all).
NETWORKS: dict[str, Callable[[ModelSpec], VAE]] = {"hvae": _hierarchical}


def build(spec: ModelSpec) -> VAE:
    """The model a spec describes (checked first: a spec may come from a file)."""
    return _make(spec.check())


def build_model(
    arch: str, shape, latent_dim: int, num_classes: int = 0, loss: str = "matlab", width: int = 0, depth: int = 0
) -> VAE:
    h, w, _ = shape
    step = ARCHITECTURES[arch].side_multiple if arch in ARCHITECTURES else 1
    if h % step or w % step:
        raise ValueError(f"the {arch} network needs image sides divisible by {step}, got {h}x{w}")
    if arch not in BUILDERS and arch not in NETWORKS:
        raise ValueError(f"unknown arch {arch!r}")
    return _make(ModelSpec(arch, tuple(shape), latent_dim, num_classes, loss, width, depth))
