"""What each trial of a search asks of the cluster, and how many run at once.

The networks here keep a small part of a GPU busy, so on a GPU cluster a
one-worker trial asks for a quarter of a GPU by default and four trials
share each GPU; `--gpus-per-trial` sets the fraction. A trial with several
workers gets a whole GPU per worker: NCCL cannot place two ranks of one
process group on the same device. CPUs are split between
the workers that fit on a node, one CPU per node left for Ray Data's reads.

GPU scheduling can be rehearsed on a CPU cluster: a cluster that declares a
custom resource (`ray start --resources '{"rehearsal_gpu": 2}'`) and a driver
with VAE_RAY_GPU_RESOURCE=rehearsal_gpu schedule trials by that resource
exactly as by GPUs, while the workers compute on their CPUs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import UserError

TRIALS_PER_GPU = 4  # one-worker trials sharing a GPU by default
GPU_RESOURCE_ENV = "VAE_RAY_GPU_RESOURCE"
_EPS = 1e-9


def gpu_resource() -> str:
    """The resource GPU work is scheduled by: `GPU`, or a rehearsal's custom resource."""
    return os.environ.get(GPU_RESOURCE_ENV, "").strip() or "GPU"


@dataclass(frozen=True)
class TrialPlan:
    gpus_per_worker: float  # 0: the trial trains on CPUs
    cpus_per_worker: int
    concurrency: int
    resource: str = "GPU"  # what the GPU share is asked as

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def on_device(self) -> bool:
        """Workers compute on a CUDA device (not in a rehearsal on CPUs)."""
        return self.use_gpu and self.resource == "GPU"

    def worker_resources(self) -> dict[str, float]:
        share = {self.resource: self.gpus_per_worker} if self.use_gpu else {}
        return {"CPU": self.cpus_per_worker, **share}


def gpus_per_worker(workers: int, total_gpus: float, gpus_per_trial: float | None, gpu: bool | None) -> float:
    """The GPU share of each worker; 0 for CPU trials. `gpus_per_trial` None is auto."""
    if gpus_per_trial is None:
        if gpu is False or (gpu is None and total_gpus < _share(workers) * workers - _EPS):
            return 0.0
        share = _share(workers)
    elif gpus_per_trial < 0 or not math.isfinite(gpus_per_trial):
        raise UserError(f"--gpus-per-trial must be a number >= 0 (got {gpus_per_trial})")
    elif gpus_per_trial == 0:
        if gpu:
            raise UserError("--gpu and --gpus-per-trial 0 contradict each other")
        return 0.0
    else:
        if gpu is False:
            raise UserError(f"--no-gpu and --gpus-per-trial {gpus_per_trial} contradict each other")
        share = round(gpus_per_trial / workers, 4)  # Ray counts resources in ten-thousandths
        if workers > 1 and share < 1:
            raise UserError(
                f"--gpus-per-trial {gpus_per_trial} shares a GPU between the {workers} workers of one trial, "
                "which NCCL cannot do; give each worker a whole GPU or use --workers-per-trial 1"
            )
        if share > 1:
            raise UserError(
                f"--gpus-per-trial {gpus_per_trial} gives each of {workers} worker(s) more than one GPU; "
                "a worker trains on one"
            )
        if share <= 0:
            raise UserError(f"--gpus-per-trial {gpus_per_trial} is below the smallest share Ray schedules (0.0001)")
    if total_gpus < share * workers - _EPS:
        raise UserError(f"a trial needs {share * workers:g} GPU(s); the cluster has {total_gpus:g}")
    return share


def _share(workers: int) -> float:
    return 1.0 / TRIALS_PER_GPU if workers == 1 else 1.0


def plan(
    nodes: list[dict],
    *,
    workers: int,
    gpus_per_trial: float | None,
    gpu: bool | None,
    cpus_per_worker: int = 0,
    max_concurrent: int | None = None,
    local_cpus: int | None = None,
    resource: str = "GPU",
) -> TrialPlan:
    """The plan for trials of `workers` workers on `nodes` (each node's
    resources). `local_cpus` is the machine's cores for a private local
    cluster, whose declared CPUs include one extra for Ray Data."""
    gpus = [float(n.get(resource, 0)) for n in nodes]
    cpus = [float(n.get("CPU", 0)) for n in nodes]
    if local_cpus is not None:
        cpus = [float(local_cpus)] * len(nodes)
    share = gpus_per_worker(workers, sum(gpus), gpus_per_trial, gpu)
    if share:
        slots = [_slots(g, share) for g in gpus]
        by_gpu = max(1, sum(slots) // workers)
        wanted = max_concurrent or by_gpu
        per_worker = cpus_per_worker or _split_cpus(
            [(c, min(s, wanted * workers)) for c, s in zip(cpus, slots, strict=True) if s > 0]
        )
        # Workers that fit a node by its GPUs and its CPUs both: what Ray can place.
        fits = [min(s, int(c) // per_worker) for c, s in zip(cpus, slots, strict=True) if s > 0]
        if not any(fits):
            raise UserError(
                f"--cpus-per-worker {per_worker}: no node with GPUs has that many CPUs beside its GPU share"
            )
        by_gpu = max(1, sum(fits) // workers)
    else:
        by_gpu = None
        total = max(cpus, default=1)
        trials = max_concurrent or max(1, int(total) // workers)
        per_worker = cpus_per_worker or max(1, int(total) // (trials * workers))
        if per_worker > total:
            raise UserError(f"--cpus-per-worker {per_worker}: no node has that many CPUs (the largest: {total:g})")
    available = int(sum(cpus))
    per_trial = per_worker * workers
    concurrency = max_concurrent or max(1, min(available // per_trial, by_gpu or available))
    if concurrency * per_trial > available:
        raise UserError(
            f"{concurrency} concurrent trials x {per_trial} CPUs need {concurrency * per_trial} CPUs; "
            f"{'this machine' if local_cpus is not None else 'the cluster'} has {available}; lower --max-concurrent"
        )
    return TrialPlan(share, per_worker, concurrency, resource)


def _slots(gpus: float, share: float) -> int:
    """Workers a node's GPUs hold: a fraction of a GPU never spans two GPUs."""
    if share < 1:
        return int(gpus + _EPS) * math.floor(1 / share + _EPS)
    return math.floor(gpus / share + _EPS)


def _split_cpus(nodes: list[tuple[float, int]]) -> int:
    """CPUs per worker on GPU nodes: each node's CPUs, less one for Ray Data,
    shared by the workers its GPUs hold; the tightest node decides."""
    if not nodes:
        return 1
    return max(1, min(int(c - 1 if c > 1 else c) // slots for c, slots in nodes))
