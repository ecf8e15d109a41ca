"""`vae-ray tune-sampling`: tune how to sample a trained model, not how to train it.

A Ray Tune grid over `generate`'s sampling settings (temperature, prior,
minimum confidence, pixel temperature, each latent group's temperature),
every trial a small set drawn exactly as `generate`
would draw it with those settings (the same plan, the same images), scored
against real images of the training split in the features of the dataset's
judge (seed 0):

    fd    Frechet distance (lower is better), with precision and recall
    tstr  accuracy, on those real images, of a classifier (seed 2) trained
          on the trial's images alone (higher is better; labelled sets)

The test split is left alone, for `evaluate-set` to score the set the best
settings make. The model is never retrained: every trial decodes with the
same checkpoint; a `gmm` prior is fitted once, before the search (see
vae_ray/prior.py). The search folder gets results.csv (a row per trial),
best.json (the best settings and the `generate` command that uses them)
and search.png, as a whole-folder output: a new or empty folder, or an
earlier search's, replaced once the new one is complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import storage
from .errors import RunFailed, UserError

METRICS = {"fd": "min", "tstr": "max"}
FILES = frozenset({"results.csv", "best.json", "search.png"})
WHAT = "a vae-ray sampling search"
STEPS = 450  # batches each tstr classifier trains on (the judge's own)
MAX_GRID = 64


def parse_grid(text: str, name: str, cast: Callable[[str], Any], sep: str = ",") -> list[Any]:
    """A comma-separated grid (`sep`), each value once, in the order given."""
    values: list[Any] = []
    for part in str(text).split(sep):
        if not part.strip():
            continue
        try:
            value = cast(part.strip())
        except ValueError:
            raise UserError(f"--{name}: {part.strip()!r} is not a valid value") from None
        if value not in values:
            values.append(value)
    if not values:
        raise UserError(f"--{name} needs at least one value")
    return values


def auto_or_float(text: str) -> float | str:
    """A grid value that may be auto (--min-confidences)."""
    return "auto" if text.lower() == "auto" else float(text)


def _strictest_confidence(values: list[float | str]) -> float | str:
    """The grid's filter that needs the most (auto also reads the test split)."""
    return "auto" if "auto" in values else max(values)


def _shown(value: float | str) -> str:
    """A number as the text that reads back as it (repr), auto as auto."""
    return value if isinstance(value, str) else repr(value)


def check_options(grid: dict[str, list], num: int, metric: str) -> None:
    from .genplan import check_options as check_generate

    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)} (got {storage.printable(metric)[:40]!r})")
    if not 100 <= num <= 10_000:
        raise UserError(f"--num must be between 100 and 10000 images a trial (got {num})")
    for name, values in grid.items():
        for value in values:
            check_generate(**{name: value})
    trials = grid_size(grid)
    if trials > MAX_GRID:
        raise UserError(f"the grid has {trials} trials; at most {MAX_GRID}")


def grid_size(grid: dict[str, list]) -> int:
    return math.prod(len(values) for values in grid.values())


def check_grid(
    temperatures: str = "0.8,0.9,1.0",
    priors: str = "normal,gmm",
    min_confidences: str = "0",
    num: int = 2000,
    metric: str = "fd",
    pixel_temperatures: str = "1",
    group_temperatures: str = "",
    **_: Any,
) -> dict[str, list]:
    """The grid, once every check that needs no files has passed (before a job
    is sent). Each group-temperature setting is itself a comma-separated list,
    so the settings are separated by semicolons ("" = every group at 1)."""
    from .genplan import canonical_group_temperatures

    grid = {
        "temperature": parse_grid(temperatures, "temperatures", float),
        "prior": parse_grid(priors, "priors", str),
        "min_confidence": parse_grid(min_confidences, "min-confidences", auto_or_float),
        "pixel_temperature": parse_grid(pixel_temperatures, "pixel-temperatures", float),
        "group_temperatures": [""]
        if not str(group_temperatures or "").strip()
        else parse_grid(group_temperatures, "group-temperatures", canonical_group_temperatures, sep=";"),
    }
    check_options(grid, num, metric)
    return grid


def _not_search_files(uri: str) -> list[str]:
    from .swap import unproven

    return storage.foreign_leaves(uri, FILES.__contains__) or unproven(uri, "best.json", "metric")


def search(
    checkpoint: str,
    out: str,
    *,
    data: str | None = None,
    temperatures: str = "0.8,0.9,1.0",
    priors: str = "normal,gmm",
    min_confidences: str = "0",
    num: int = 2000,
    metric: str = "fd",
    pixel_temperatures: str = "1",
    group_temperatures: str = "",
    max_copy_distance: float | str = 0.0,
    seed: int = 0,
    judge_seed: int = 1,
    steps: int = STEPS,
    address: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the grid; return the best settings and every trial's figures."""
    from . import judge
    from .checkpoint import load_blob
    from .data import dataset_read_lock, read_arrays, read_meta
    from .genplan import check_model_options
    from .swap import check_destination

    grid = check_grid(temperatures, priors, min_confidences, num, metric, pixel_temperatures, group_temperatures)
    target = storage.check_uri(out)
    check_destination(target, _not_search_files, WHAT)
    say = progress or (lambda *_: None)
    started = time.time()
    blob = load_blob(checkpoint)
    data = data or blob["config"].get("data")
    if not data:
        raise UserError(f"{checkpoint}: the checkpoint does not name its dataset; pass --data")
    meta = read_meta(data)
    if metric == "tstr" and not blob["config"]["conditional"]:
        raise UserError("--metric tstr trains on the set's labels: it needs a class-conditional model (--conditional)")
    if judge.load(data, meta) is None:
        raise UserError(f"{data}: no judge classifier; run `vae-ray classifier train --data {data}` first")
    job = {
        "checkpoint": blob["path"],  # resolved here: the trials' working folders are not this one
        "data": meta["root"],
        "num": num,
        "seed": seed,
        "judge_seed": judge_seed,
        "max_copy_distance": max_copy_distance,
        "metric": metric,
        "steps": steps,
    }
    # Everything a trial can get wrong, once, here: every pixel and group
    # temperature against this model, then the strongest settings of the grid
    # (a gmm prior is fitted now, on the cluster, and kept in the run).
    say("checking the settings", 0, 1)
    given = [text for text in str(group_temperatures or "").split(";") if text.strip()] or [
        ""
    ]  # as typed: "1,1" counts
    for pixel_temperature in grid["pixel_temperature"]:
        for setting in given:
            check_model_options(blob, setting, pixel_temperature)
    strongest = {name: values[0] for name, values in grid.items()}
    strongest |= {"prior": _strongest_prior(grid), "min_confidence": _strictest_confidence(grid["min_confidence"])}
    _generation(job, strongest, address, say)
    with dataset_read_lock(meta["root"]):
        train, labels = read_arrays(meta["root"], "train", meta=meta)
    pick = np.random.default_rng(seed).choice(len(train), min(num, len(train)), replace=False)
    job |= {"real": train[pick], "real_labels": labels[pick], "classes": meta["num_classes"]}
    rows = _run_grid(job, grid, address, say)
    key, mode = _metric_key(metric), METRICS[metric]
    ranked = sorted(rows, key=lambda r: r[key] if mode == "min" else -r[key])
    best = {k: ranked[0][k] for k in grid}
    summary = {
        "checkpoint": blob["path"],
        "data": meta["root"],
        "metric": metric,
        "mode": mode,
        "images_per_trial": num,
        "best": best,
        "best_value": ranked[0][key],
        "command": _command(checkpoint, best, judge_seed, max_copy_distance),
        "trials": ranked,
        "seconds": round(time.time() - started, 1),
    }
    _write(target, summary, grid)
    return summary | {"out": target}


def _strongest_prior(grid: dict[str, list]) -> str:
    return "gmm" if "gmm" in grid["prior"] else grid["prior"][0]


def _metric_key(metric: str) -> str:
    return "tstr_accuracy" if metric == "tstr" else "fd"


def _command(checkpoint: str, best: dict[str, Any], judge_seed: int, max_copy_distance: float | str) -> str:
    # repr: the shortest text that reads back as the same number, so the command makes the plan the trial scored
    parts = ["vae-ray generate", checkpoint, f"--temperature {best['temperature']!r}", f"--prior {best['prior']}"]
    if best["group_temperatures"]:
        parts.append(f"--group-temperatures {best['group_temperatures']}")
    if best["pixel_temperature"] != 1.0:
        parts.append(f"--pixel-temperature {best['pixel_temperature']!r}")
    if best["min_confidence"]:
        parts.append(f"--min-confidence {_shown(best['min_confidence'])} --judge-seed {judge_seed}")
    if max_copy_distance:
        parts.append(f"--max-copy-distance {max_copy_distance}")
    return " ".join(parts) + " --num N --out OUT"


def _generation(job: dict[str, Any], config: dict[str, Any], address: str | None = None, say=None):
    """The `generate` run these settings make (checked, never run: nothing is written)."""
    from .generate import Generation

    never_written = os.path.join(tempfile.gettempdir(), f"vae-ray-sampling-{uuid.uuid4().hex}")
    fitting = (lambda done, total: say("fitting the prior", done, total)) if say else None
    return Generation(
        job["checkpoint"],
        job["num"],
        never_written,
        seed=job["seed"],
        temperature=config["temperature"],
        prior=config["prior"],
        min_confidence=config["min_confidence"],
        pixel_temperature=config.get("pixel_temperature", 1.0),
        group_temperatures=config.get("group_temperatures", ""),
        max_copy_distance=job["max_copy_distance"],
        data=job["data"],
        judge_seed=job["judge_seed"],
        address=address,
        fitting=fitting,
    )


def trial(config: dict[str, Any], job: dict[str, Any]) -> None:
    """One Tune trial: draw the set these settings make, score it, report."""
    import torch
    from ray import tune

    torch.set_num_threads(1)
    tune.report(score(job, config))


def score(job: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The figures of the set one grid point makes (the images `generate` would write)."""
    from . import judge
    from .data import read_meta
    from .metrics import frechet_distance, precision_recall

    images, labels, tries = _generation(job, config).decoder().decode(0, job["num"])
    scorer, _ = judge.load(job["data"], read_meta(job["data"]))
    fake_features, _ = judge.features_and_probs(scorer, images)
    real_features, _ = judge.features_and_probs(scorer, job["real"])
    precision, recall = precision_recall(real_features, fake_features, k=3)
    figures = {
        "fd": frechet_distance(fake_features, real_features),
        "precision": precision,
        "recall": recall,
        "acceptance_rate": len(images) / float(np.abs(tries[:, 0]).sum()),
    }
    if job["metric"] == "tstr":
        epochs = math.ceil(job["steps"] * judge.BATCH / len(images))
        model = judge.fit(images, labels, job["classes"], epochs=epochs, seed=job["seed"] + 2)
        figures["tstr_accuracy"] = judge.accuracy(model, job["real"], job["real_labels"])
    return figures


def _run_grid(job: dict[str, Any], grid: dict[str, list], address: str | None, say) -> list[dict[str, Any]]:
    import logging

    from ray import tune

    from .cluster import connect

    connect(address, cpus_needed=1, dashboard=False)
    total = grid_size(grid)

    class Progress(tune.Callback):
        """Counts finished trials for the display; Tune saves its callbacks,
        and the display (locks, a terminal) is not saved with it."""

        def __init__(self, say, total: int):
            self.say, self.total, self.done = say, total, 0

        def __getstate__(self) -> dict[str, Any]:
            return {"say": None, "total": self.total, "done": self.done}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.say:
                self.say("trials", self.done, self.total)

        on_trial_error = on_trial_complete

    say("trials", 0, total)
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    key, mode = _metric_key(job["metric"]), METRICS[job["metric"]]
    with tempfile.TemporaryDirectory(prefix="vae-ray-sampling-") as scratch:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trial, job=job), {"CPU": 1}),
            param_space={name: tune.grid_search(values) for name, values in grid.items()},
            tune_config=tune.TuneConfig(metric=key, mode=mode),
            run_config=tune.RunConfig(
                name="sampling", storage_path=scratch, verbose=0, callbacks=[Progress(say, total)]
            ),
        )
        results = tuner.fit()
    rows = []
    for result in results:
        if result.error is not None:
            raise RunFailed(f"a trial of {result.config} failed: {str(result.error).strip().splitlines()[-1]}")
        rows.append({name: result.config[name] for name in grid} | {k: result.metrics[k] for k in _figures(job)})
    return rows


def _figures(job: dict[str, Any]) -> tuple[str, ...]:
    return ("fd", "precision", "recall", "acceptance_rate", *(("tstr_accuracy",) if job["metric"] == "tstr" else ()))


def _write(target: str, summary: dict[str, Any], grid: dict[str, list]) -> None:
    """results.csv, best.json and search.png, as one whole-folder output."""
    from .plots import metric_by_setting
    from .swap import check_destination, publish_folder, settle_swap

    with storage.Lock(target, "vae-ray tune-sampling"), tempfile.TemporaryDirectory() as tmp:
        settle_swap(target, _not_search_files)
        check_destination(target, _not_search_files, WHAT)
        folder = Path(tmp) / "search"
        folder.mkdir()
        rows = summary["trials"]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        (folder / "results.csv").write_text(text.getvalue())
        (folder / "best.json").write_text(
            json.dumps({k: v for k, v in summary.items() if k != "trials"}, indent=2) + "\n"
        )
        names = [_label(r, grid) for r in rows]
        series = {"Frechet distance (lower is better)": [r["fd"] for r in rows], "recall": [r["recall"] for r in rows]}
        if summary["metric"] == "tstr":
            series["TSTR accuracy"] = [r["tstr_accuracy"] for r in rows]
        metric_by_setting(names, series, folder / "search.png", "settings (best first)", "Sampling search")
        publish_folder(folder, target)


def _label(row: dict[str, Any], grid: dict[str, list]) -> str:
    """The settings that vary across the grid, short enough for an axis."""
    parts = []
    if len(grid["temperature"]) > 1:
        parts.append(f"T={row['temperature']:g}")
    if len(grid["prior"]) > 1:
        parts.append(row["prior"])
    if len(grid["min_confidence"]) > 1:
        parts.append(
            f"c={row['min_confidence'] if row['min_confidence'] == 'auto' else format(row['min_confidence'], 'g')}"
        )
    if len(grid["pixel_temperature"]) > 1:
        parts.append(f"pixel T={row['pixel_temperature']:g}")
    if len(grid["group_temperatures"]) > 1:
        parts.append(f"groups {row['group_temperatures'] or '1'}")
    return "\n".join(parts) or "the one setting"
