"""The one place that knows how the Ray releases vae-ray supports differ.

vae-ray needs Ray 2.53 or later:

- Ray 2.51 made Train V2 the default `ray.train` (`UserCallback.after_report`,
  `report(..., checkpoint_dir_name=...)`, `RunConfig(storage_filesystem=...)`,
  `ray.tune.integration.ray_train.TuneReportCallback`); before it they sit
  behind the beta switch RAY_TRAIN_V2_ENABLED=1.
- Ray 2.52 brought token authentication (RAY_AUTH_MODE=token).
- Ray 2.53 frees the workers of a Train run whose controller is killed (its
  PlacementGroupCleaner). A search relies on it: a trial ASHA stops is killed
  with its Train controller (tune.py), and on 2.51 and 2.52 its workers keep
  their CPUs, so the search stalls.

What came later, each with the release that brought it:

- Ray 2.55: `ray.data.RandomSeedConfig` (`block_order_seed`) and elastic
  training, `ScalingConfig(num_workers=(min, max))` (`check_elastic`).
- Ray 2.57: Train's preemption watcher (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER);
  older releases have no watcher and ignore the variable.

`make test` runs the suite against the newest release of the range,
`make test-ray-range` (.ci/ray_range.sh) the fast tier and a smoke run of
train, tune, generate and a submitted job against the oldest.
"""

from __future__ import annotations

from typing import Any

from .errors import UserError

OLDEST = (2, 53)  # the lower bound of pyproject.toml's ray requirement
ELASTIC = (2, 55)  # ScalingConfig(num_workers=(min, max))
SEED_CONFIG = (2, 55)  # ray.data.RandomSeedConfig(reseed_after_execution=True)


def installed() -> str:
    import ray

    return ray.__version__


def ray_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of the installed Ray (or of `version`); a nightly
    (3.0.0.dev0) counts as newer than every release."""
    major, minor = (version or installed()).split(".")[:2]
    return int(major), int(minor)


def has(release: tuple[int, int]) -> bool:
    return ray_release() >= release


def block_order_seed(seed: int) -> Any:
    """The `seed` for Dataset.randomize_block_order in training: a new block
    order every epoch (every execution of the dataset), reproducible from `seed`.

    Before Ray 2.55 an int seed gives the same block order every epoch, so
    there no seed is passed: every epoch still gets a new order, not a
    reproducible one (rows within a batch stay seeded per epoch: ingest.py)."""
    if not has(SEED_CONFIG):
        return None
    from ray.data import RandomSeedConfig

    return RandomSeedConfig(seed=seed, reseed_after_execution=True)


def check_elastic(min_workers: int) -> None:
    """One line, before anything is written, when --min-workers asks for elastic
    training on a Ray release without it (before 2.55 ScalingConfig takes
    only a fixed number of workers)."""
    if min_workers and not has(ELASTIC):
        raise UserError(
            f"--min-workers (elastic training) needs Ray {ELASTIC[0]}.{ELASTIC[1]} or later; "
            f"this is Ray {installed()} (use a fixed --workers, or upgrade Ray)"
        )
