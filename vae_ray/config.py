"""One validated dataclass describes a training run.

The same object flows CLI -> job entry point -> `train_loop_config` ->
checkpoint (`config.json`), so a checkpoint alone reproduces its run and
`generate` / `evaluate` need no model flags. Field docs (the `help` metadata)
double as the CLI's help text.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import UserError

ARCHS = ("auto", "mnist", "cifar")
LOSSES = ("auto", "matlab", "bernoulli", "gaussian", "logistic")
SCHEDULES = ("constant", "cosine", "onecycle")
PRECISIONS = ("fp32", "bf16", "fp16")
CACHE_MODES = ("auto", "memory", "none")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- data and output -------------------------------------------------
    data: str = _f("", "Prepared dataset directory (from `vae-ray data prepare`), local or s3://.")
    out: str = _f("runs/vae", "Run directory: metrics, checkpoints, plots and samples land here.")
    # --- model -----------------------------------------------------------
    arch: str = _f("auto", "Network: mnist (MATLAB example), cifar (PyTorch tutorial), auto = by image shape.")
    latent_dim: int = _f(16, "Size K of the latent vector z.")
    conditional: bool = _f(False, "Class-conditional VAE: the one-hot label enters encoder and decoder.")
    # --- loss ------------------------------------------------------------
    loss: str = _f("auto", "matlab (0.5*SSE + KL), bernoulli (BCE + KL), gaussian (learned variance), logistic (discretised logistic for 8-bit data, bits/dim); auto = matlab for 1 channel, gaussian otherwise.")
    beta: float = _f(1.0, "Weight of the KL term.")
    recon_weight: float = _f(1.0, "Weight of the reconstruction term.")
    kl_warmup_epochs: int = _f(0, "Ramp the KL weight linearly from 0 to beta over this many epochs.")
    z_samples: int = _f(1, "Latent samples per training image, drawn in antithetic pairs (eps, -eps); the reconstruction term is their mean. 2 costs a second decoder pass and cancels the gradient noise linear in eps.")
    binarize: bool = _f(False, "Dynamic binarisation of the inputs (bernoulli loss): x ~ Bernoulli(pixel).")
    # --- optimisation ----------------------------------------------------
    epochs: int = _f(30, "Passes over the training split.")
    batch_size: int = _f(128, "Global mini-batch size, split evenly over workers.")
    lr: float = _f(1e-3, "Adam learning rate (the peak rate for onecycle).")
    lr_schedule: str = _f("constant", "constant, cosine (decay to 0) or onecycle (warm-up then cosine decay).")
    adam_beta2: float = _f(0.999, "Adam's second-moment decay; 0.99 adapts faster, which high peak learning rates need.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    grad_clip: float = _f(0.0, "Clip the gradient norm to this value; 0 = off.")
    ema: float = _f(0.0, "Decay of an exponential moving average of the weights (e.g. 0.998); the average is what is evaluated, saved and sampled. 0 = off.")
    precision: str = _f("fp32", "fp32, bf16 or fp16 autocast; KL and likelihood stay in fp32.")
    # --- scale -----------------------------------------------------------
    workers: int = _f(1, "Ray Train workers (DDP ranks).")
    gpu: Optional[bool] = _f(None, "One GPU per worker; None = use GPUs when the cluster has them.")
    cpus_per_worker: int = _f(1, "CPUs reserved per worker; also its torch thread count.")
    cache: str = _f("auto", "Keep each worker's shard in memory after the first epoch: auto (when it fits), memory, none.")
    max_failures: int = _f(2, "Worker failures survived by restarting from the last checkpoint.")
    keep_checkpoints: int = _f(3, "Checkpoints kept in the run directory (newest first).")
    # --- reproducibility -------------------------------------------------
    seed: int = _f(0, "Seed for weights, shuffling and sampling.")

    # ------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise UserError naming the first impossible value; return self."""
        checks = [
            (self.latent_dim >= 1, "latent_dim must be at least 1", self.latent_dim),
            (self.epochs >= 1, "epochs must be at least 1", self.epochs),
            (self.batch_size >= 1, "batch_size must be at least 1", self.batch_size),
            (_positive(self.lr), "lr must be a positive number", self.lr),
            (_nonneg(self.beta), "beta must be a non-negative number", self.beta),
            (_positive(self.recon_weight), "recon_weight must be a positive number", self.recon_weight),
            (self.z_samples >= 1, "z_samples must be at least 1", self.z_samples),
            (self.kl_warmup_epochs >= 0, "kl_warmup_epochs must be >= 0", self.kl_warmup_epochs),
            (_nonneg(self.adam_beta2) and 0 < self.adam_beta2 < 1, "adam_beta2 must be > 0 and < 1",
             self.adam_beta2),
            (_nonneg(self.weight_decay), "weight_decay must be >= 0", self.weight_decay),
            (_nonneg(self.grad_clip), "grad_clip must be >= 0", self.grad_clip),
            (_nonneg(self.ema) and self.ema < 1, "ema must be >= 0 and < 1", self.ema),
            (self.workers >= 1, "workers must be at least 1", self.workers),
            (self.cpus_per_worker >= 1, "cpus_per_worker must be at least 1", self.cpus_per_worker),
            (self.max_failures >= 0, "max_failures must be >= 0", self.max_failures),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1", self.keep_checkpoints),
            (self.batch_size % self.workers == 0,
             f"batch_size must be divisible by workers ({self.workers})", self.batch_size),
            (self.arch in ARCHS, f"arch must be one of {', '.join(ARCHS)}", self.arch),
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}", self.loss),
            (self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {', '.join(SCHEDULES)}", self.lr_schedule),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}", self.precision),
            (self.cache in CACHE_MODES, f"cache must be one of {', '.join(CACHE_MODES)}", self.cache),
        ]
        for ok, message, value in checks:
            if not ok:
                raise UserError(f"{message} (got {value!r})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a plain dict; unknown keys and wrong types are user errors."""
        if not isinstance(values, dict):
            raise UserError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise UserError(f"{source}: unknown setting '{key}' (known: {', '.join(known)})")
            kwargs[name] = _coerce(name, value, known[name].type, source)
        return cls(**kwargs).validate()

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with `changes` applied (None values are ignored), validated."""
        changes = {k: v for k, v in changes.items() if v is not None}
        merged = {**self.to_dict(), **changes}
        return TrainConfig.from_dict(merged)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """Read a YAML or JSON file (if given) and apply CLI overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_mapping(Path(path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values, source=str(path) if path else "config")


def read_mapping(path: Path) -> dict[str, Any]:
    """Parse a YAML or JSON file into a dict, with one-line errors."""
    import yaml  # YAML is a superset of JSON, so one parser reads both

    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not valid YAML or JSON ({first})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    return values


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _nonneg(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def _coerce(name: str, value: Any, annotation: str, source: str) -> Any:
    """Check (and gently convert) one value against its field's annotation."""
    kind = str(annotation)
    optional = "Optional" in kind or "None" in kind
    if value is None:
        if optional:
            return None
        raise UserError(f"{source}: setting '{name}' needs a value")
    bad = UserError(f"{source}: setting '{name}' must be {_kind_name(kind)} (got {value!r})")
    if "bool" in kind:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    for word, number in (("int", int), ("float", float)):
        if word not in kind:
            continue
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)) and (number is float or float(value).is_integer()):
            return number(value)
        if isinstance(value, str):
            try:
                return number(value)
            except ValueError:
                raise bad from None
        raise bad
    if "str" in kind:
        if isinstance(value, str):
            return value
        raise bad
    return value


def _kind_name(kind: str) -> str:
    for word, name in (("bool", "true or false"), ("int", "an integer"), ("float", "a number"), ("str", "a string")):
        if word in kind:
            return name
    return kind
