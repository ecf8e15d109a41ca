"""What a generation run is, and what image i is: the plan (the run's
identity: two runs with equal plans write equal bytes), each image's label,
the files a shard owns, and every check of `generate`'s options that needs no
file. No torch here: the command line checks options before it imports it."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from . import storage
from .errors import UserError

SHARD = 10_000  # images per shard (PNG folder, Parquet/NPZ file)
CHUNK = 256  # decode batch, aligned to global indices
MAX_NUM = 1_000_000_000  # file names hold nine digits of index
MAX_SHARDS = 100_000  # MAX_NUM at the default shard size; shard names hold five digits
MAX_CLASSES = 100_000
MAX_TEMPERATURE = 100.0
MAX_GROUPS = 64  # --group-temperatures values (hvae has 2-3 groups per depth step)
MAX_CANDIDATES = 64  # draws per image under --min-confidence; the judge's favourite of them when none passes
# Candidate r of image i is decoded from the keyed normals of index i + r * CANDIDATE_STRIDE: never
# another image's (indices stay below MAX_NUM), and candidate 0 is the unfiltered set's image i.
CANDIDATE_STRIDE = 1 << 30
FILTER_JUDGE_SEED = 1  # the evaluation judge is seed 0: a set is never judged by the network that filtered it
MAX_COPY_DISTANCE = 1e4  # pixel L2 in [0, 1] units; 1024x1024x3 images are at most ~1774 apart
MAX_REFERENCE_BYTES = 4 << 30  # --max-copy-distance holds the training split in every writer
COPY_PERCENTILE = 1.0  # --max-copy-distance auto: closer than 99% of real test images are
# --min-confidence auto: per class, the judge's probability of the label that 95% of that class's real
# test images reach; a hard class (a judge at 90% on shirts) keeps its images, an easy one stays strict.
CONFIDENCE_PERCENTILE = 5.0
AUTO_CONFIDENCE_IMAGES = 10_000  # real test images it reads at most
MIN_CLASS_CONFIDENCE = 1e-6  # a class whose real images the judge rarely reads still filters something
FILTER_KEYS = ("candidates", "unmet", "copies")  # a filtered set's per-shard counts (markers and manifest)
FILTER_FIELDS = ("min_confidence", "judge_sha256", "max_copy_distance", "reference_sha256")  # Plan's, newer
PRIOR_FIELDS = ("prior", "prior_sha256")  # Plan's, newer still
SAMPLING_FIELDS = ("group_temperatures", "pixel_temperature")  # Plan's, newer still
CLASS_FIELDS = ("class_confidences",)  # Plan's, newest
MIN_PIXEL_TEMPERATURE = 0.05
PIXEL_LADDER = (1.0, 0.9, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)  # --pixel-temperature auto's choices


@dataclass(frozen=True)
class SetFormat:
    """How a `--format` lays a set out: what every part of vae-ray that
    writes, owns, sizes or reads a set asks of it (the encoders themselves are
    shardstore.ENCODERS, the readers quality.read_generated)."""

    name: str
    per_image: bool = False  # one file per image, in a folder per shard (else one file per shard)
    file: str = ""  # a one-file shard's name: {shard} and {shards} (the count) as five or more digits
    folder: str = ""  # the folder those files live in, when not the set's top
    card: bool = False  # a dataset card (README.md) beside the data
    named_classes: bool = False  # the files hold the class names
    png_inside: bool = False  # the images are PNG bytes (sizes are PNG's worst case)

    def shard_file(self, shard: int, shards: int) -> str:
        return self.file.format(shard=f"{shard:05d}", shards=f"{shards:05d}")

    def shard_of(self, rel: str) -> int | None:
        """The shard whose file `rel` would be, when the name has this format's
        pattern (the caller still compares it with the name the plan gives)."""
        number = "[0-9]{5,6}"
        pattern = re.escape(self.file).replace(re.escape("{shard}"), f"({number})")
        match = re.fullmatch(pattern.replace(re.escape("{shards}"), number), rel) if self.file else None
        return int(match[1]) if match else None


SET_FORMATS = {
    "png": SetFormat("png", per_image=True, png_inside=True),
    "parquet": SetFormat("parquet", file="part-{shard}.parquet"),
    "npz": SetFormat("npz", file="part-{shard}.npz"),
    "hf": SetFormat(
        "hf",
        file="data/train-{shard}-of-{shards}.parquet",
        folder="data",
        card=True,
        named_classes=True,
        png_inside=True,
    ),
}
FORMATS = tuple(SET_FORMATS)


@dataclass(frozen=True)
class Plan:
    """The identity of a generation run: two runs with equal plans write equal bytes."""

    num: int
    seed: int
    format: str
    temperature: float
    labels: str  # "none", "per-class" or a class index as text
    checkpoint_sha256: str
    shard_size: int = SHARD
    chunk: int = CHUNK  # decode batch; part of the identity, since kernels may round differently
    min_confidence: float = 0.0  # > 0: keep an image only when the judge gives its label this probability
    judge_sha256: str = ""  # the filtering judge's weights
    max_copy_distance: float = 0.0  # > 0: drop an image this close (pixel L2, [0, 1] units) to a training image
    reference_sha256: str = ""  # the dataset whose training split that is
    prior: str = "normal"  # where z comes from (vae_ray/prior.py): N(0, I), or "gmm"
    prior_sha256: str = ""  # the fitted mixture's file, for "gmm"
    group_temperatures: str = ""  # each latent group's factor on `temperature`, top first ("" = all 1)
    pixel_temperature: float = 1.0  # Bernoulli decoders: each pixel's likelihood tempered (< 1: sharper)
    # --min-confidence auto: each class's threshold, comma-separated ("" = min_confidence for every class,
    # which then holds the least of these)
    class_confidences: str = ""

    @property
    def layout(self) -> SetFormat:
        return SET_FORMATS[self.format]

    @property
    def filtered(self) -> bool:
        return bool(self.min_confidence or self.max_copy_distance)

    def confidence_thresholds(self) -> np.ndarray | None:
        """--min-confidence per class index (None: the one min_confidence for every class)."""
        return np.array(confidence_values(self.class_confidences)) if self.class_confidences else None

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num)

    def digest(self) -> str:
        fields_ = asdict(self)
        if not self.filtered:  # an unfiltered plan keeps the digest it had before filtering existed
            for name in FILTER_FIELDS:
                del fields_[name]
        if self.prior == "normal":  # likewise before priors were a choice
            for name in PRIOR_FIELDS:
                del fields_[name]
        for name in (*SAMPLING_FIELDS, *CLASS_FIELDS):  # and each later setting at its default, before it existed
            if fields_[name] == _PLAN_DEFAULTS[name]:
                del fields_[name]
        return hashlib.sha256(json.dumps(fields_, sort_keys=True).encode()).hexdigest()[:12]


_PLAN_DEFAULTS = {f.name: f.default for f in fields(Plan)}


def labels_for(plan: Plan, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Image i's label: -1 (none), i mod C (balanced over classes), or the fixed class."""
    if plan.labels == "none":
        return np.full(len(indices), -1, dtype=np.int64)
    if plan.labels == "per-class":
        return (indices % num_classes).astype(np.int64)
    return np.full(len(indices), int(plan.labels), dtype=np.int64)


def class_folders(classes: list[str]) -> list[str]:
    """Safe, distinct folder names for class names, which are data (from
    batches.meta, dataset.json or a checkpoint) and must never steer a write:
    no separators, no leading dot or underscore, no '..', at most 64
    characters. Distinct ignoring case (macOS and Windows fold it), and a
    suffixed name is checked again: ["x", "x-2", "x"] gives x, x-2, x-3. The
    manifest keeps the real names beside them."""
    out: list[str] = []
    used: set[str] = set()
    for k, name in enumerate(classes):
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip(".-_")[:64] or f"class-{k}"
        safe, n = base, k
        while safe.lower() in used:
            suffix = f"-{n}"
            safe = base[: min(58, 64 - len(suffix))] + suffix  # 58: the names earlier versions gave
            n += 1
        used.add(safe.lower())
        out.append(safe)
    return out


def shard_files(plan: Plan, shard: int, folders: list[str]) -> list[str]:
    """The files a shard owns, relative to the set's root, in index order."""
    start, end = plan.shard_range(shard)
    fmt = SET_FORMATS[plan.format]
    if not fmt.per_image:
        return [fmt.shard_file(shard, plan.num_shards)]
    labels = labels_for(plan, np.arange(start, end), len(folders))
    names = []
    for i, label in zip(range(start, end), labels, strict=True):
        prefix = f"{folders[label]}/" if label >= 0 else ""
        names.append(f"{prefix}{shard:05d}/{i:09d}.png")
    return names


def make_plan(
    blob: dict[str, Any],
    num: int,
    fmt: str,
    seed: int,
    temperature: float,
    label: int | None,
    per_class: bool,
    chunk: int = CHUNK,
    shard_size: int = SHARD,
    filters: dict[str, Any] | None = None,
    prior: tuple[str, str] = ("normal", ""),
    group_temperatures: str = "",
    pixel_temperature: float = 1.0,
) -> Plan:
    """The plan of a run; `filters` holds the Plan's FILTER_FIELDS (resolved by
    Generation), `prior` its prior and the fitted mixture's SHA-256. The
    options the model decides were checked first (check_model_options)."""
    filters = filters or {}
    group_temperatures = canonical_group_temperatures(group_temperatures)
    check_options(
        num=num,
        fmt=fmt,
        seed=seed,
        temperature=temperature,
        chunk=chunk,
        shard_size=shard_size,
        label=label,
        per_class=per_class,
        min_confidence=filters.get("min_confidence", 0.0),
        max_copy_distance=filters.get("max_copy_distance", 0.0),
        pixel_temperature=pixel_temperature,
    )
    classes = blob["dataset"]["classes"]
    if (label is not None or per_class) and not blob["config"]["conditional"]:
        raise UserError(
            f"{blob['path']}: not a class-conditional model; train with --conditional to use --label or --per-class"
        )
    if label is not None and not 0 <= label < len(classes):
        raise UserError(f"--label must be between 0 and {len(classes) - 1} (got {label})")
    # A conditional model needs a label for every image: without --label, the
    # classes take turns (as with --per-class).
    balanced = per_class or (label is None and blob["config"]["conditional"])
    labels = "per-class" if balanced else ("none" if label is None else str(label))
    return Plan(
        num=num,
        seed=seed,
        format=fmt,
        temperature=float(temperature),
        labels=labels,
        checkpoint_sha256=blob["sha256"],
        chunk=chunk,
        shard_size=shard_size,
        prior=prior[0],
        prior_sha256=prior[1],
        group_temperatures=group_temperatures,
        pixel_temperature=float(pixel_temperature),
        **filters,
    )


def check_model_options(blob: dict[str, Any], group_temperatures: str | None, pixel_temperature: float | str) -> None:
    """The options a model's latent groups and likelihood decide, one line
    each: checked before anything costly (a mixture's fit, a dataset read)."""
    from .prior import group_scales
    from .spec import ModelSpec

    spec = ModelSpec.from_config(blob["config"], blob["dataset"], blob["path"])
    group_scales(spec.groups, group_temperatures, blob["path"])
    check_pixel_temperature(spec.loss, pixel_temperature, blob["path"])


def check_pixel_temperature(loss: str, value: float | str, where: str) -> None:
    """--pixel-temperature (a number or auto) against the model's likelihood."""
    if value != 1.0 and loss != "bernoulli":
        raise UserError(
            f"{where}: --pixel-temperature tempers a Bernoulli decoder's pixels: it needs a Bernoulli decoder, "
            f"and this model's likelihood is {loss} (train with --loss bernoulli, the default for grey images)"
        )


def filter_fields(plan: Plan) -> dict[str, Any]:
    """A filtered set's filter settings, as its manifest and card hold them."""
    found = {name: getattr(plan, name) for name in FILTER_FIELDS}
    return found | ({"class_confidences": plan.class_confidences} if plan.class_confidences else {})


def confidence_values(text: str) -> list[float]:
    """Plan.class_confidences as numbers, each checked (a manifest's plan is data)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or len(values) > MAX_CLASSES or not all(MIN_CLASS_CONFIDENCE <= v < 1 for v in values):
        raise UserError(f"class confidences must be probabilities in [{MIN_CLASS_CONFIDENCE:g}, 1) (got a bad list)")
    return values


def auto_class_confidences(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> str:
    """--min-confidence auto from the judge's probability of each real test
    image's label: per class, the CONFIDENCE_PERCENTILE-th percentile (a class
    without test images takes all classes' figure), as Plan.class_confidences."""
    overall = float(np.percentile(probabilities, CONFIDENCE_PERCENTILE))
    values = []
    for k in range(num_classes):
        mine = probabilities[labels == k]
        value = float(np.percentile(mine, CONFIDENCE_PERCENTILE)) if len(mine) else overall
        values.append(min(max(round(value, 6), MIN_CLASS_CONFIDENCE), 0.999999))
    return ",".join(f"{v:g}" for v in values)


def group_values(text: str) -> tuple[float, ...]:
    """--group-temperatures as numbers ("" = none)."""
    return tuple(float(part) for part in text.split(",")) if text else ()


def canonical_group_temperatures(text: str | None) -> str:
    """--group-temperatures checked and written one way ("1.0,1,1.30" -> "1,1,1.3"); all ones is "" (the
    same plan as none, so the same bytes). A user's mistake is one line."""
    if text is None or str(text).strip() == "":
        return ""
    parts = str(text).split(",")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if not values or len(parts) > MAX_GROUPS or not all(math.isfinite(v) and 0 < v <= MAX_TEMPERATURE for v in values):
        raise UserError(
            f"--group-temperatures must be a comma-separated list of at most {MAX_GROUPS} numbers in "
            f"(0, {MAX_TEMPERATURE:g}], one per latent group, top first (got {storage.printable(str(text))[:60]!r})"
        )
    return "" if all(v == 1 for v in values) else ",".join(f"{v:g}" for v in values)


def check_options(
    num: int = 1,
    fmt: str = "png",
    seed: int = 0,
    temperature: float = 1.0,
    chunk: int = CHUNK,
    shard_size: int = SHARD,
    label: int | None = None,
    per_class: bool = False,
    actors: int | None = None,
    min_confidence: float | str = 0.0,
    max_copy_distance: float | str = 0.0,
    prior: str = "normal",
    group_temperatures: str | None = "",
    pixel_temperature: float | str = 1.0,
) -> None:
    """Every check that needs no files: run before anything else, and before --submit."""
    from .prior import PRIORS

    canonical_group_temperatures(group_temperatures)
    if pixel_temperature != "auto" and not (
        is_number(pixel_temperature) and MIN_PIXEL_TEMPERATURE <= pixel_temperature <= MAX_TEMPERATURE
    ):
        raise UserError(
            f"--pixel-temperature must be auto or a number in [{MIN_PIXEL_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] "
            f"(got {pixel_temperature})"
        )

    if prior not in PRIORS:
        raise UserError(f"--prior must be one of {', '.join(PRIORS)} (got {storage.printable(str(prior))[:40]!r})")
    if min_confidence != "auto" and not (is_number(min_confidence) and 0 <= min_confidence < 1):
        raise UserError(f"--min-confidence must be auto or a probability in [0, 1) (got {min_confidence})")
    if max_copy_distance != "auto" and not (
        is_number(max_copy_distance) and 0 <= max_copy_distance <= MAX_COPY_DISTANCE
    ):
        raise UserError(
            f"--max-copy-distance must be auto or a pixel distance in [0, {MAX_COPY_DISTANCE:g}] (got {max_copy_distance})"
        )
    if not 1 <= shard_size <= SHARD:
        raise UserError(f"--shard-size must be between 1 and {SHARD} (got {shard_size})")
    if not 1 <= chunk <= 65536:
        raise UserError(f"--batch-size must be between 1 and 65536 (got {chunk})")
    if not 1 <= num <= MAX_NUM:
        raise UserError(f"--num must be between 1 and {MAX_NUM:,} (got {num})")
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and 0 < temperature <= MAX_TEMPERATURE
    ):
        raise UserError(f"--temperature must be a finite number in (0, {MAX_TEMPERATURE:g}] (got {temperature})")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be between 0 and {2**32 - 1} (got {seed})")
    if label is not None and per_class:
        raise UserError("--label and --per-class exclude each other")
    if actors is not None and not 1 <= actors <= 10_000:
        raise UserError(f"--actors must be between 1 and 10000 (got {actors})")
    if -(-num // shard_size) > MAX_SHARDS:
        raise UserError(
            f"--num {num:,} in shards of {shard_size:,} makes more than {MAX_SHARDS:,} shards; raise --shard-size"
        )


@dataclass(frozen=True)
class GenerateOptions:
    """Every option of `vae-ray generate` but the checkpoint and --out, with
    its default: the one place they are typed, checked by `check()` (before
    anything is read, and before a job is submitted)."""

    num: int = 1
    fmt: str = "png"
    seed: int = 0
    actors: int | None = None
    gpu: bool | None = None
    temperature: float = 1.0
    label: int | None = None
    per_class: bool = False
    overwrite: bool = False
    batch_size: int | None = None
    shard_size: int = SHARD
    min_confidence: float | str = 0.0  # or "auto", resolved per class into the plan by Generation
    max_copy_distance: float | str = 0.0
    data: str | None = None
    judge_seed: int = FILTER_JUDGE_SEED
    prior: str = "normal"
    group_temperatures: str | None = None
    pixel_temperature: float | str = 1.0  # or "auto", resolved into the plan by Generation

    @property
    def chunk(self) -> int:
        return CHUNK if self.batch_size is None else self.batch_size

    def check(self) -> GenerateOptions:
        check_options(
            self.num,
            self.fmt,
            self.seed,
            self.temperature,
            self.chunk,
            self.shard_size,
            self.label,
            self.per_class,
            self.actors,
            self.min_confidence,
            self.max_copy_distance,
            self.prior,
            self.group_temperatures,
            self.pixel_temperature,
        )
        return self

    @classmethod
    def of(cls, options: dict[str, Any]) -> GenerateOptions:
        """From a command's options (a dict that may also name the checkpoint
        and --out), checked; an unknown name is the user's one-line mistake."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known - {"checkpoint", "out"})
        if unknown:
            raise UserError(f"generate: unknown option(s) {', '.join(unknown)}")
        return cls(**{k: v for k, v in options.items() if k in known}).check()


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
