"""Connecting to Ray: a running cluster when one is named, else a local one.

Ray's own logging goes to its session folder, not to the user's terminal; a
run copies that folder into its run directory at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path


def quiet_ray_environment() -> None:
    """Environment switches that keep Ray's chatter out of the terminal.
    Set before `ray.init` so the workers inherit them."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    # Ray Data's advice about actor pools larger than a small input is
    # harmless here (the pool is sized from the data) and not for users.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")


def ensure_ray(cpus_needed: int = 1, address: str | None = None, dashboard: bool = True) -> dict:
    """Connect once per process; return the cluster's resources.

    With no address (and no RAY_ADDRESS), a local cluster starts with at least
    `cpus_needed` logical CPUs, so a run that asks for all the cores still
    leaves a slot for Ray Data's read tasks. Ray Data jobs (generate,
    evaluate) pass dashboard=False: they do not need it, and it costs about a
    second of start-up.
    """
    import ray

    quiet_ray_environment()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        common = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
        if address:
            ray.init(address=address, **common)
        else:
            # A private local cluster, even when another one runs on this
            # machine: two commands must never share (and starve) one cluster
            # by accident. Use --address auto to join a `ray start` cluster.
            # Ray's dashboard stays on (127.0.0.1): Train's and Tune's resource
            # clean-up between trials depends on it.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed),
                     include_dashboard=dashboard, **common)
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    # Ray Data configures its own logger (with its own handler) on import;
    # its per-dataset INFO/WARNING lines belong in the session logs, not here.
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _route_raylet_messages_to_log()
    return ray.cluster_resources()


def _route_raylet_messages_to_log() -> None:
    """The raylet pushes warnings (such as "N worker processes have been
    started ... startup concurrency", routine on a 2-core machine) to every
    driver's stdout, whatever `log_to_driver` says. Send those to logging; they
    are in the session's raylet.out, which the run copies, all the same."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    original = ray_worker.print_to_stdstream
    if getattr(original, "_vae_ray_filtered", False):
        return

    def filtered(data, ignore_prefix):
        if data.get("pid") == "raylet":
            logging.getLogger("vae_ray.raylet").info("%s", " ".join(data.get("lines", [])))
            return
        original(data, ignore_prefix)

    filtered._vae_ray_filtered = True
    ray_worker.print_to_stdstream = filtered


def copy_ray_logs(destination: Path) -> Path | None:
    """Copy this Ray session's log folder (local clusters only) into `destination`."""
    try:
        import ray

        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - remote cluster or no session: nothing to copy
        return None
    if not logs.is_dir():
        return None
    if destination.exists():
        shutil.rmtree(destination, ignore_errors=True)
    shutil.copytree(logs, destination, ignore=shutil.ignore_patterns("*.sock", "*.lock"),
                    dirs_exist_ok=True, ignore_dangling_symlinks=True)
    return destination
