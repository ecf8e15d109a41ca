"""The run config: one declaration per setting.

Each field of `TrainConfig` carries its type, default, allowed range or
choices, help text and help panel. The same declaration validates config
files, builds the `vae-ray train` options (and the shared ones of `tune`,
see `cli/options.py`), and is saved in every run and checkpoint
(`config.json`), so a checkpoint alone reproduces its run and
`generate` / `evaluate` need no model flags. The object flows
CLI -> job -> `train_loop_config` -> checkpoint.

Settings left at `None` ("auto") are filled in from the data and the network
by `trainer.resolve` before a run starts; the saved config never holds one.

A config never holds a secret either: it is saved with every run, checkpoint
and generated set, logged as MLflow params and sent as a job's entrypoint. A
user and password written into the MLflow URI move into this process's
environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, where MLflow
reads them) the moment a config is made; any other secret in a URI is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .spec import ARCHITECTURES, LIKELIHOODS

# The networks and likelihoods are tables (spec.py); "auto" picks by the data's shape.
ARCHS = ("auto", *ARCHITECTURES)
LOSSES = ("auto", *LIKELIHOODS)
SCHEDULES = ("constant", "cosine", "onecycle")
PRECISIONS = ("fp32", "bf16", "fp16")
CUDA_GRAPH_MODES = ("auto", "off")
CACHE_MODES = ("auto", "memory", "none")
PANELS = ("Data", "Model", "Loss", "Optimisation", "Scale", "Tracking")
MAX_SEED = 2**32 - 1

# The best recipe measured per network (docs/benchmarks.md, "Defaults"): what
# `batch_size`, `lr`, `lr_schedule` and `adam_beta2` become when left at auto.
RECIPES = {name: arch.recipe for name, arch in ARCHITECTURES.items()}


@dataclass(frozen=True)
class Spec:
    """How one setting may be given: help, panel, choices and range."""

    help: str
    panel: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low < value (else low <= value)
    high_open: bool = False  # value < high (else value <= high)
    flag: str = ""  # CLI flag when it is not the field name
    short: str = ""
    negative: str = ""  # bool flags: the name of the "off" form
    auto: str = ""  # what None means, shown as the default

    def check(self, name: str, value: Any) -> None:
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise UserError(f"{name} must be one of {', '.join(self.choices)} (got {value!r})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number (got {value!r})")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise UserError(f"{name} must be {self.describe_range(isinstance(value, float))} (got {value!r})")

    def describe_range(self, real: bool) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            if self.low == 0 and real:
                return "a positive number" if self.low_open else "a non-negative number"
            return f"> {low}" if self.low_open else (f"at least {low}" if self.low else ">= 0")
        if self.low is not None and not (self.low_open or self.high_open) and not real:
            return f"between {low} and {high}"
        lo = f"{'>' if self.low_open else '>='} {low} and " if self.low is not None else ""
        return f"{lo}{'<' if self.high_open else '<='} {high}"


def _number(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def setting(default: Any, help: str, panel: str, **spec: Any) -> Any:
    return field(default=default, metadata={"spec": Spec(help=help, panel=panel, **spec)})


@dataclass
class TrainConfig:
    # --- Data ----------------------------------------------------------------
    data: str = setting("", "Prepared dataset folder or s3:// URI (from `vae-ray data prepare`).", "Data", short="-d")
    out: str = setting(
        "runs/vae", "Run folder or s3:// URI: metrics, checkpoints, plots and samples land here.", "Data", short="-o"
    )
    cache: str = setting(
        "auto",
        "How workers get the training split: memory (each rank loads its equal share "
        "once, then shuffles it in memory every epoch), none (Ray Data streams and reshuffles it "
        "every epoch), auto (memory when every rank's share fits, decided once on the driver).",
        "Data",
        choices=CACHE_MODES,
    )
    # --- Model ---------------------------------------------------------------
    arch: str = setting(
        "auto",
        "Network: mnist (the MATLAB example's), cifar (the PyTorch tutorial's), hvae (a hierarchical VAE "
        "made for generation: sharper, more varied samples); auto picks mnist or cifar by image shape.",
        "Model",
        choices=ARCHS,
    )
    latent_dim: int = setting(
        16, "Size K of the latent vector z (for hvae: of its dense top group).", "Model", low=1, high=4096
    )
    width: int = setting(
        0,
        "hvae only: channels at a quarter of the image side (halved at half the side); 0 = 48. "
        "Wider trains slower and models more; for GPUs.",
        "Model",
        low=0,
        high=1024,
    )
    depth: int = setting(
        0,
        "hvae only: latent groups at a quarter of the image side (half as many at half the side); 0 = 2.",
        "Model",
        low=0,
        high=16,
    )
    conditional: bool = setting(
        False,
        "Class-conditional VAE: the one-hot label enters encoder and decoder.",
        "Model",
        negative="--unconditional",
    )
    # --- Loss ----------------------------------------------------------------
    loss: str = setting(
        "auto",
        "matlab (0.5*SSE + KL), bernoulli (BCE + KL), gaussian (learned variance), "
        "logistic (discretised logistic for 8-bit data, bits/dim); auto = bernoulli for 1 channel, "
        "gaussian otherwise.",
        "Loss",
        choices=LOSSES,
    )
    beta: float = setting(1.0, "Weight of the KL term.", "Loss", low=0.0)
    recon_weight: float = setting(1.0, "Weight of the reconstruction term.", "Loss", low=0.0, low_open=True)
    kl_warmup_epochs: int = setting(
        0,
        "Ramp the KL weight linearly from 0 to beta over this many epochs.",
        "Loss",
        low=0,
        high=100_000,
        flag="--kl-warmup",
    )
    z_samples: int = setting(
        1,
        "Latent samples per training image, in antithetic pairs (eps, -eps); the "
        "reconstruction term is their mean. 2 costs a second decoder pass and cancels the "
        "gradient noise linear in eps.",
        "Loss",
        low=1,
        high=64,
    )
    binarize: bool = setting(
        False,
        "Dynamic binarisation of the inputs (bernoulli loss): x ~ Bernoulli(pixel).",
        "Loss",
        negative="--no-binarize",
    )
    # --- Optimisation --------------------------------------------------------
    epochs: int = setting(30, "Passes over the training split.", "Optimisation", low=1, high=100_000)
    batch_size: int | None = setting(
        None,
        "Global mini-batch size, split over the workers (on GPUs, larger batches with a larger --lr train faster "
        "per epoch).",
        "Optimisation",
        low=1,
        high=1 << 20,
        auto="by network: 32 mnist, 64 hvae, 128 cifar",
    )
    lr: float | None = setting(
        None,
        "Adam learning rate (the peak rate for onecycle).",
        "Optimisation",
        low=0.0,
        low_open=True,
        auto="by network: 3e-3 mnist, 2e-3 cifar and hvae",
    )
    lr_schedule: str | None = setting(
        None,
        "constant, cosine (decay to 0) or onecycle (10% warm-up, then cosine decay), per global step.",
        "Optimisation",
        choices=SCHEDULES,
        auto="by network: onecycle",
    )
    adam_beta2: float | None = setting(
        None,
        "Adam's second-moment decay; 0.99 adapts faster, which high peak learning rates need.",
        "Optimisation",
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
        auto="by network: 0.99",
    )
    weight_decay: float = setting(0.0, "AdamW weight decay.", "Optimisation", low=0.0, high=10.0)
    grad_clip: float | None = setting(
        None,
        "Clip the gradient norm to this value; 0 = off.",
        "Optimisation",
        low=0.0,
        auto="by network: 200 hvae, off otherwise",
    )
    ema: float = setting(
        0.0,
        "Decay of an exponential moving average of the weights (e.g. 0.998); the average "
        "is what is evaluated, saved and sampled. 0 = off.",
        "Optimisation",
        low=0.0,
        high=1.0,
        high_open=True,
    )
    precision: str = setting(
        "fp32",
        "Autocast precision; KL and likelihood stay in fp32 (fp16 needs GPUs).",
        "Optimisation",
        choices=PRECISIONS,
    )
    cuda_graph: str = setting(
        "auto",
        "Capture each training step once as a CUDA graph and replay it: auto (on a GPU, for one "
        "worker on in-memory batches, fp32 or bf16; other runs step as usual) or off.",
        "Optimisation",
        choices=CUDA_GRAPH_MODES,
    )
    seed: int = setting(0, "Seed for weights, shuffling and sampling.", "Optimisation", low=0, high=MAX_SEED)
    # --- Scale ---------------------------------------------------------------
    workers: int = setting(
        1,
        "Ray Train workers (DDP ranks); with --min-workers, the most it grows to.",
        "Scale",
        low=1,
        high=4096,
        short="-w",
    )
    min_workers: int = setting(
        0,
        "Elastic training: start with what the cluster has (at least this many), "
        "survive losing nodes and grow back to --workers. 0 = a fixed size.",
        "Scale",
        low=0,
        high=4096,
    )
    gpu: bool | None = setting(
        None, "One GPU per worker.", "Scale", negative="--no-gpu", auto="when the cluster has GPUs"
    )
    cpus_per_worker: int = setting(
        0,
        "CPUs reserved per worker, also its torch thread count; 0 = fill the "
        "node: its CPUs shared by the workers on it, one left for Ray Data.",
        "Scale",
        low=0,
        high=1024,
    )
    max_failures: int = setting(
        2, "Worker or node failures survived by restarting from the last checkpoint.", "Scale", low=0, high=1000
    )
    keep_checkpoints: int = setting(3, "Checkpoints kept in the run folder (newest first).", "Scale", low=1, high=1000)
    keep_best: str = setting(
        "test_neg_elbo_nats",
        "Also keep the best checkpoint by this test metric (lower is better) as RUN/best, "
        "however old it gets; 'none' keeps only the newest.",
        "Scale",
        choices=("test_neg_elbo_nats", "test_matlab_elbo", "test_loss", "none"),
    )
    stall_timeout: int = setting(
        300,
        "Seconds without progress (no step, no epoch) before the run ends with a "
        "message saying what it waited for; --resume continues it.",
        "Scale",
        low=10,
        high=7 * 86400,
    )
    # --- Tracking ------------------------------------------------------------
    mlflow: str = setting(
        "",
        "MLflow tracking URI (default: MLFLOW_TRACKING_URI; empty = off): params, "
        "per-epoch metrics, the final checkpoint and pictures.",
        "Tracking",
    )
    wandb: str = setting(
        "",
        "Weights & Biases project (default: WANDB_PROJECT; empty = off): config, per-epoch "
        "metrics and pictures, the final checkpoint; a search is a W&B group, a run per trial. "
        "WANDB_ENTITY picks the team, WANDB_MODE=offline writes the runs locally for `wandb sync`.",
        "Tracking",
    )

    # ------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # Before anything can save, log, print or send this config.
        if isinstance(self.mlflow, str):
            self.mlflow = public_mlflow_uri(self.mlflow)

    def validate(self) -> TrainConfig:
        """Raise UserError naming the first impossible value; return self."""
        for f in dataclasses.fields(self):
            spec(f.name).check(f.name, getattr(self, f.name))
        for name in ("data", "out"):
            refuse_credentials(getattr(self, name), name)
        check_wandb_project(self.wandb)
        if self.min_workers > self.workers:
            raise UserError(f"min_workers ({self.min_workers}) must not exceed workers ({self.workers})")
        if self.batch_size is not None and self.batch_size < max(self.workers, 1):
            raise UserError(f"batch_size ({self.batch_size}) must be at least the number of workers ({self.workers})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a plain dict; unknown keys and wrong types are user errors."""
        if not isinstance(values, dict):
            raise UserError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise UserError(f"{source}: unknown setting '{key}' (known: {', '.join(sorted(known))})")
            kwargs[name] = _coerce(name, value, FIELD_TYPES[name], source)
        return cls(**kwargs).validate()

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` applied, validated."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)


def spec(name: str) -> Spec:
    return TrainConfig.__dataclass_fields__[name].metadata["spec"]


def fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def load_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """Read a YAML or JSON file (if given) and apply overrides on top (None = not given)."""
    values: dict[str, Any] = read_settings(Path(path)) if path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values, source=str(path) if path else "config")


def read_settings(path: Path) -> dict[str, Any]:
    """Settings from a YAML or JSON file; a run's own config.json
    ({"config": ..., "dataset": ...}) is accepted as it is."""
    values = read_mapping(path)
    if isinstance(values.get("config"), dict) and set(values) <= {"config", "dataset"}:
        values = dict(values["config"])
    return values


def read_mapping(path: Path) -> dict[str, Any]:
    """Parse a YAML or JSON file into a dict, with one-line errors."""
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text())  # YAML is a superset of JSON: one parser reads both
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not valid YAML or JSON ({first})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    return values


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _coerce(name: str, value: Any, annotation: Any, source: str) -> Any:
    """Check (and gently convert) one value against its field's type."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    kind = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if value is None:
        if optional:
            return None
        raise UserError(f"{source}: setting '{name}' needs a value")
    bad = UserError(f"{source}: setting '{name}' must be {_kind_name(kind)} (got {value!r})")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if kind in (int, float):
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            if kind is int and not float(value).is_integer():
                raise bad
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                raise bad from None
        raise bad
    if kind is str:
        if isinstance(value, str):
            return value
        raise bad
    return value


def _kind_name(kind: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


# ---------------------------------------------------------------------------
# Secrets in URIs
# ---------------------------------------------------------------------------
MLFLOW_SECRETS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# W&B reads its key (or ~/.netrc, never copied) and server from the environment; a job takes them along.
WANDB_ENV = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_MODE")
# Query parameters that carry a secret (a token, a password, a presigned URL's signature).
_SECRET_PARAM = re.compile(
    r"token|passw|pwd|secret|signature|credential|api[-_]?key|^auth(orization)?$|^key$|^sig$|^sas$", re.I
)


def _split(uri: str) -> urllib.parse.SplitResult | None:
    if "://" not in str(uri):
        return None  # a local path: nothing in it is a credential
    try:
        return urllib.parse.urlsplit(str(uri))
    except ValueError:  # a malformed URI: whatever uses it says so
        return None


def _secret_params(parts: urllib.parse.SplitResult) -> list[str]:
    return [
        name for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if _SECRET_PARAM.search(name)
    ]


def credentials_in(uri: str) -> str:
    """What secret a URI carries in itself, in words ("a user and password",
    "a token= parameter"), or "" when it carries none."""
    parts = _split(uri)
    if parts is None:
        return ""
    params = _secret_params(parts)
    if params:
        return f"a {params[0]}= parameter"
    if "@" in parts.netloc:
        return "a user and password" if parts.password is not None else "a user name"
    return ""


def without_credentials(uri: str) -> str:
    """The URI as it may be shown: no user:password@, no secret query parameter."""
    parts = _split(uri)
    if parts is None:
        return str(uri)
    query = urllib.parse.urlencode(
        [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if not _SECRET_PARAM.search(k)]
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=query))


def refuse_credentials(uri: str, what: str = "") -> None:
    """One line, without the secret, for a storage URI that carries
    credentials: they would be saved with every run and checkpoint."""
    found = credentials_in(uri)
    if found:
        raise UserError(
            f"{what + ' ' if what else ''}{without_credentials(uri)}: the URI holds credentials ({found}), which vae-ray never "
            f"stores; give them through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) instead"
        )


def public_mlflow_uri(uri: str) -> str:
    """The MLflow tracking URI as it may be stored and shown.

    An http(s) URI's user and password move into MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD of this process, where MLflow reads them, and
    from where they reach the cluster's processes: a private cluster started
    later inherits them, a joined one gets them in the job's runtime_env
    (cluster.connect), a submitted job likewise (jobs.runtime_env). They win
    over values already there: the URI is what this command was given.
    Secrets that cannot move there (a token in the query, a database's
    password) are refused in one line that shows neither."""
    found = credentials_in(uri)
    if not found:
        return uri
    parts = _split(uri)
    shown = without_credentials(uri)
    if _secret_params(parts):
        raise UserError(
            f"MLflow URI {shown}: {found} would be stored with the run; give the token in MLFLOW_TRACKING_TOKEN instead"
        )
    if parts.scheme.lower() not in ("http", "https"):
        if parts.password is None:
            return uri  # a database user name alone is no secret, and the database needs it there
        raise UserError(
            f"MLflow URI {shown}: a password in it would be stored with the run; give it to the database "
            f"client through its environment (PGPASSWORD for PostgreSQL), or use an MLflow server"
        )
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username or "")
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    return shown


# W&B project names may not hold these (W&B refuses them); control characters never reach a terminal.
_BAD_PROJECT = re.compile(r"[/\\#?%:\x00-\x1f\x7f]")


def check_wandb_project(project: str) -> None:
    """One line for a W&B project name that W&B would refuse."""
    if not project:
        return
    if len(project) > 128 or _BAD_PROJECT.search(project):
        shown = project.encode("unicode_escape").decode()[:140]
        raise UserError(
            f"wandb project '{shown}': W&B project names have at most 128 characters and none of "
            f"/ \\ # ? % : (the team goes in WANDB_ENTITY)"
        )


def mlflow_secrets() -> dict[str, str]:
    """The tracking credentials in this process's environment (MLflow's, and
    W&B's key and where it logs), for the processes a command starts
    elsewhere (a joined cluster's workers, a submitted job)."""
    return {name: os.environ[name] for name in MLFLOW_SECRETS + WANDB_ENV if os.environ.get(name)}
