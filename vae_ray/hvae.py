"""The hierarchical VAE (`--arch hvae`): a small network made for generation.

The design of NVAE and VDVAE, sized for CPUs by default: a bottom-up pass of
residual cells reads the image at 1/2 and 1/4 of its side; a top-down pass
starts from a dense top latent and adds latent groups at 1/4 and then 1/2 of
the side (spec.hvae_groups), each drawn from a prior conditioned on every
group above it, and each posterior conditioned on the image as well.

How the rest of vae-ray sees it: one flat latent vector z ~ N(0, I). z holds
each group's *standardised* value, eps_i = (z_i - mu_p,i) / sigma_p,i under
its prior given the groups above, all groups flattened top first. So:
- decoding z is deterministic, and `generate`'s keyed normals, its
  temperature (which scales every group's prior spread, NVAE's temperature)
  and `decode` work unchanged;
- each group's posterior is predicted in that standardised space, so
  KL(q || p) of a group is KL(N(m, s^2) || N(0, I)) of its standardised
  posterior (an affine map keeps KL): `forward` returns (mu, logvar) of the
  standardised posterior along the sampled path, and the analytic KL that
  batch_terms takes is the sum of the groups' KLs (NVAE's estimator);
- `encode` returns the standardised posterior along its mean path, and
  decode(mu) reconstructs that path exactly.
The posterior of a group depends on the groups drawn above it, so the
importance-weighted likelihood draws the groups in turn (`posterior`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import VAE
from .spec import LIKELIHOODS, ModelSpec

LOGVAR_RANGE = (-12.0, 4.0)  # a group's standardised posterior: tight enough for any pixel, never wider than e^2
LOG_SIGMA_RANGE = (-6.0, 2.0)  # a group's prior scale


def _conv(i: int, o: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(i, o, k, padding=k // 2)


class Cell(nn.Module):
    """A bottleneck residual cell (VDVAE): 1x1 down to half the channels, two
    3x3, 1x1 back up, SiLU between. The last layer starts at zero, so every
    cell starts as the identity and a deep stack trains from the first step."""

    def __init__(self, width: int):
        super().__init__()
        mid = max(width // 2, 4)
        self.net = nn.Sequential(
            nn.SiLU(), _conv(width, mid, 1), nn.SiLU(), _conv(mid, mid, 3), nn.SiLU(), _conv(mid, mid, 3), nn.SiLU()
        )
        self.last = _conv(mid, width, 1)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.last(self.net(x))


class Group(nn.Module):
    """One spatial latent group of the top-down pass."""

    def __init__(self, width: int, enc_width: int, channels: int):
        super().__init__()
        self.channels = channels
        self.before = Cell(width)
        self.prior = _conv(width, 2 * channels, 1)
        nn.init.zeros_(self.prior.weight)  # starts as N(0, I): the flat model it grows from
        nn.init.zeros_(self.prior.bias)
        self.posterior = nn.Sequential(_conv(width + enc_width, width, 1), nn.SiLU(), _conv(width, 2 * channels, 3))
        self.z_in = _conv(channels, width, 1)
        self.after = Cell(width)

    def forward(
        self, h: torch.Tensor, enc: torch.Tensor | None, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> (h, standardised z, posterior mean, posterior logvar).

        With `enc` (the bottom-up features) the group is drawn from its
        posterior, `eps` being standard noise; without, `eps` is the
        standardised value itself (decoding a given z)."""
        h = self.before(h)
        prior_mu, prior_log_sigma = self.prior(h).chunk(2, dim=1)
        mu = logvar = None
        if enc is not None:
            mu, logvar = self.posterior(torch.cat([h, enc], dim=1)).chunk(2, dim=1)
            logvar = logvar.clamp(*LOGVAR_RANGE)
            eps = mu + torch.exp(0.5 * logvar) * eps
        z = prior_mu + torch.exp(prior_log_sigma.clamp(*LOG_SIGMA_RANGE)) * eps
        return self.after(h + self.z_in(z)), eps, mu, logvar


class HierarchicalVAE(VAE):
    """See the module's docstring. `latent_dim` is the flattened z's size
    (spec.z_dim); the dense top group's size is `spec.latent_dim`."""

    hierarchical = True

    def __init__(
        self,
        shape: tuple[int, int, int],
        latent_dim: int,
        num_classes: int = 0,
        loss: str = "bernoulli",
        width: int = 48,
        depth: int = 2,
    ):
        nn.Module.__init__(self)
        h, w, c = shape
        self._spec = ModelSpec("hvae", (h, w, c), latent_dim, num_classes, loss, width, depth)
        self.arch, self.shape, self.num_classes, self.loss = "hvae", (h, w, c), num_classes, loss
        self.groups = self._spec.groups
        self.latent_dim = self._spec.z_dim
        self.top_dim, self.width = latent_dim, width
        self.centered_inputs = False
        half = width // 2
        self.quarter_side = (h // 4, w // 4)
        # bottom-up
        self.stem = nn.Conv2d(c, half, 4, stride=2, padding=1)  # -> 1/2
        self.up_half = nn.Sequential(Cell(half), Cell(half))
        self.down = nn.Conv2d(half, width, 3, stride=2, padding=1)  # -> 1/4
        self.up_quarter = nn.Sequential(Cell(width), Cell(width))
        cells = width * (h // 4) * (w // 4)
        self.top_posterior = nn.Linear(cells + num_classes, 2 * latent_dim)
        # top-down
        self.top_in = nn.Linear(latent_dim + num_classes, cells)
        quarter = [g for g in self.groups[1:] if g[0] == h // 4]
        self.quarter_groups = nn.ModuleList(Group(width, width, g[2]) for g in quarter)
        self.to_half = _conv(width, half, 1)
        self.half_groups = nn.ModuleList(Group(half, half, g[2]) for g in self.groups[1 + len(quarter) :])
        outputs = LIKELIHOODS[loss].outputs(c)  # a mixture outputs its components' parameters
        self.out = nn.Sequential(Cell(half), nn.SiLU(), nn.Upsample(scale_factor=2), _conv(half, outputs, 3))
        self._likelihood_init(c, loss)

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    # -- the passes ----------------------------------------------------------
    def _bottom_up(self, x: torch.Tensor, y: torch.Tensor | None):
        half = self.up_half(self.stem(x))
        quarter = self.up_quarter(self.down(F.silu(half)))
        feats = quarter.flatten(1)
        if self.num_classes:
            feats = torch.cat([feats, self._one_hot(y, feats)], dim=1)
        mu, logvar = self.top_posterior(feats).chunk(2, dim=1)
        return half, quarter, mu, logvar.clamp(*LOGVAR_RANGE)

    def _top_down(self, top: torch.Tensor, y: torch.Tensor | None, eps: list[torch.Tensor], encoded=None):
        """Decode from the standardised top group; `eps` holds one tensor per
        spatial group: noise for the posterior when `encoded` (half, quarter
        features) is given, else the groups' standardised values."""
        if self.num_classes:
            top = torch.cat([top, self._one_hot(y, top)], dim=1)
        h = self.top_in(top).view(-1, self.width, *self.quarter_side)
        half_enc, quarter_enc = encoded if encoded is not None else (None, None)
        values, mus, logvars = [], [], []
        n_quarter = len(self.quarter_groups)
        stages = ((self.quarter_groups, eps[:n_quarter], quarter_enc), (self.half_groups, eps[n_quarter:], half_enc))
        for stage, (groups, noise, enc) in enumerate(stages):
            if stage:  # up to half the side
                h = F.interpolate(self.to_half(F.silu(h)), scale_factor=2, mode="nearest")
            for group, e in zip(groups, noise, strict=True):
                h, value, mu, logvar = group(h, enc, e)
                values.append(value)
                mus.append(mu)
                logvars.append(logvar)
        return self.out(h), values, mus, logvars

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A flat (N, latent_dim) vector -> top (N, K) and each spatial group (N, C, H, W)."""
        parts = torch.split(z, [gh * gw * gc for gh, gw, gc in self.groups], dim=1)
        spatial = [p.reshape(-1, gc, gh, gw) for p, (gh, gw, gc) in zip(parts[1:], self.groups[1:], strict=True)]
        return parts[0], spatial

    @staticmethod
    def _flat(top: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([top, *(g.flatten(1) for g in groups)], dim=1)

    def _noise(self, rows: int, like: torch.Tensor, samples: int = 1) -> torch.Tensor:
        """Standard normals for `samples` x `rows` flat latents, sample-major,
        in antithetic pairs (eps, -eps) when samples > 1 (VAE.reparameterize)."""
        eps = torch.randn(((samples + 1) // 2, rows, self.latent_dim), dtype=like.dtype, device=like.device)
        return torch.cat([eps, -eps])[:samples].flatten(0, 1) if samples > 1 else eps[0]

    def _posterior_pass(self, x: torch.Tensor, y: torch.Tensor | None, noise: torch.Tensor, samples: int = 1):
        """Draw every group from its posterior with the given standard noise
        ((samples * N, latent_dim), sample-major) -> (logits, z, mu, logvar)."""
        half, quarter, top_mu, top_logvar = self._bottom_up(x, y)
        if samples > 1:
            half, quarter, top_mu, top_logvar = (
                t.repeat(samples, *([1] * (t.dim() - 1))) for t in (half, quarter, top_mu, top_logvar)
            )
            y = y.repeat(samples) if y is not None else None
        top_noise, group_noise = self._split(noise)
        top = top_mu + torch.exp(0.5 * top_logvar) * top_noise
        logits, values, mus, logvars = self._top_down(top, y, group_noise, (half, quarter))
        return logits, self._flat(top, values), self._flat(top_mu, mus), self._flat(top_logvar, logvars)

    # -- the four methods, as VAE's ----------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, samples: int = 1):
        """-> (logits, mu, logvar): `samples` * N rows each, sample-major; mu
        and logvar are the standardised posterior along each drawn path."""
        logits, _, mu, logvar = self._posterior_pass(x, y, self._noise(len(x), x, samples), samples)
        return logits, mu, logvar

    def posterior(self, x: torch.Tensor, y: torch.Tensor | None, noise: torch.Tensor):
        """Groups drawn in turn with the given standard noise -> (logits, z, logvar)."""
        logits, z, _, logvar = self._posterior_pass(x, y, noise)
        return logits, z, logvar

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The standardised posterior along its mean path, (N, latent_dim) each."""
        _, _, mu, logvar = self._posterior_pass(
            x, y, torch.zeros(len(x), self.latent_dim, device=x.device, dtype=x.dtype)
        )
        return mu, logvar

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        top, groups = self._split(z)
        return self._top_down(top, y, groups)[0]
