"""The driver side of training: `fit` checks the data, the run folder and the
cluster, builds the `TorchTrainer` (`build_trainer`, which a Tune trial not
trained in its actor uses too) and follows it until it ends. The per-worker
side is `worker.py`.

Order matters for the user's files: every check that can fail runs before
anything is written, and the run folder is locked for the whole command.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cluster as clusters
from . import compat, storage
from .config import TrainConfig
from .data import dataset_read_lock, load_split, read_meta, summary
from .errors import Interrupted, RunFailed, UserError, root_cause
from .ingest import choose_ingest, forget_eval_cache
from .progress import TrainingDisplay
from .rundir import RunDir, check_run
from .spec import ARCHITECTURES, LIKELIHOODS, ModelSpec, choose_arch, choose_loss
from .worker import train_loop

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer
# Ray is imported where a run uses it: a one-process run never does (about
# 0.8 s of a short command's start on 2 cores).


# ---------------------------------------------------------------------------
# Resolving a config against its data and cluster
# ---------------------------------------------------------------------------
def resolve(cfg: TrainConfig, meta: dict[str, Any]) -> TrainConfig:
    """Fill in `auto` choices from the dataset and reject impossible combinations."""
    compat.check_elastic(cfg.min_workers)
    h, w, c = meta["shape"]
    arch = cfg.arch if cfg.arch != "auto" else choose_arch(meta["shape"])
    step = ARCHITECTURES[arch].side_multiple
    if h % step or w % step:
        raise UserError(f"the {arch} network needs image sides divisible by {step}; {meta['root']} has {h}x{w}")
    loss = cfg.loss if cfg.loss != "auto" else choose_loss(meta["shape"])
    recipe = ARCHITECTURES[arch].recipe
    cfg = cfg.replace(batch_size=cfg.batch_size or recipe["batch_size"])
    n_train = meta["splits"]["train"]["count"]
    if cfg.batch_size > n_train:
        raise UserError(f"batch_size {cfg.batch_size} is larger than the {n_train} training images")
    smallest = max(cfg.min_workers, 1) if cfg.min_workers else cfg.workers
    for world in sorted({smallest, cfg.workers}):
        if (n_train // world) < math.ceil(cfg.batch_size / world):
            raise UserError(
                f"{world} workers get {n_train // world} images each, "
                f"fewer than a per-worker batch of {math.ceil(cfg.batch_size / world)}"
            )
    if cfg.conditional and meta["num_classes"] < 2:
        raise UserError(
            f"--conditional needs labelled data with at least 2 classes; {meta['root']} has {meta['num_classes']}"
        )
    if cfg.binarize and not LIKELIHOODS[loss].binarize:
        raise UserError(
            f"binarize applies to the {', '.join(n for n, lk in LIKELIHOODS.items() if lk.binarize)} loss only"
        )
    resolved = cfg.replace(
        arch=arch,
        loss=loss,
        data=meta["root"],
        out=storage.check_uri(cfg.out),
        lr=recipe["lr"] if cfg.lr is None else cfg.lr,
        lr_schedule=cfg.lr_schedule or recipe["lr_schedule"],
        adam_beta2=recipe["adam_beta2"] if cfg.adam_beta2 is None else cfg.adam_beta2,
        grad_clip=recipe.get("grad_clip", 0.0) if cfg.grad_clip is None else cfg.grad_clip,
        **_sizes(arch, cfg),
    )
    # Every rule of the model itself (a likelihood the network cannot output,
    # a latent too large), before a run folder or a cluster exists.
    ModelSpec.from_config(resolved, {"shape": meta["shape"], "num_classes": meta["num_classes"]})
    return resolved


def _sizes(arch: str, cfg: TrainConfig) -> dict[str, int]:
    """width and depth: the network's defaults written down, so a run's
    config says what it trained; a fixed network refuses them."""
    sizes = ARCHITECTURES[arch].sizes
    if sizes is None:
        if cfg.width or cfg.depth:
            raise UserError(f"the {arch} network has a fixed size: --width and --depth apply to hvae only")
        return {}
    width, depth = cfg.width or sizes["width"], cfg.depth or sizes["depth"]
    if width % 4:
        raise UserError(f"--width must be a multiple of 4 (got {width})")
    return {"width": width, "depth": depth}


def plan_scale(cfg: TrainConfig, cluster: clusters.Cluster) -> tuple[TrainConfig, bool]:
    """GPUs or not, and CPUs per worker when left at 0 (auto): the node's
    CPUs shared by the workers that land on it, one left for Ray Data.
    Raises UserError when the cluster cannot hold the run."""
    res = cluster.resources
    fewest = cfg.min_workers or cfg.workers
    gpus = int(res.get("GPU", 0))
    use_gpu = cfg.gpu if cfg.gpu is not None else gpus >= fewest > 0
    if use_gpu and gpus < fewest:
        raise UserError(f"--gpu asks for {fewest} GPU worker(s) but the cluster has {gpus} GPU(s)")
    if cfg.precision == "fp16" and not use_gpu:
        raise UserError("precision fp16 needs GPUs; use bf16 on CPUs")
    cpus_per_worker = cfg.cpus_per_worker or auto_cpus_per_worker(cfg.workers, cluster, use_gpu)
    available = int(os.cpu_count() or 1) if cluster.private else int(res.get("CPU", 0))
    need = fewest * cpus_per_worker
    if need > available:
        where = "this machine has" if cluster.private else "the cluster has"
        hint = (
            " (a local cluster runs at most one CPU per core; join a larger one with --address)"
            if cluster.private
            else ""
        )
        raise UserError(f"{fewest} workers x {cpus_per_worker} CPUs need {need} CPUs; {where} {available}{hint}")
    return cfg.replace(cpus_per_worker=cpus_per_worker, gpu=use_gpu), use_gpu


def auto_cpus_per_worker(workers: int, cluster: clusters.Cluster, use_gpu: bool) -> int:
    if cluster.private:
        return max(1, (os.cpu_count() or 1) // workers)
    nodes = [n["resources"] for n in cluster.nodes if not use_gpu or n["resources"].get("GPU", 0) >= 1]
    if not nodes:
        return 1
    node_cpus = min(int(n.get("CPU", 1)) for n in nodes)
    per_node = max(1, math.ceil(workers / len(nodes)))
    if use_gpu:
        per_node = max(1, min(per_node, min(int(n.get("GPU", 1)) for n in nodes)))
    return max(1, (node_cpus - 1) // per_node if node_cpus > 1 else 1)


def private_cluster_cpus(cfg: TrainConfig) -> int:
    """Logical CPUs for a private local cluster: the machine's, plus one for
    Ray Data's read tasks beside workers that take every core."""
    return (os.cpu_count() or 1) + 1


def run_summary(run: RunDir, **extra: Any) -> dict[str, Any]:
    history = run.history()
    return {
        "run_dir": run.uri,
        "epochs": len(history),
        "final": history[-1] if history else {},
        "checkpoint": run.latest() or "",
        **extra,
    }


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------
class RunDirRecorder:
    """After every report: append the epoch to metrics.jsonl (never twice)
    and point RUN/latest at its checkpoint. Ray Train calls it on its
    controller (ray_callback); a one-process run calls it itself."""

    def __init__(self, run_uri: str, lock_token: str = "", keep_best: str = "none"):
        self.run_uri, self.lock_token, self.keep_best = run_uri, lock_token, keep_best
        self.last_epoch: int | None = None  # read from metrics.jsonl once, on the controller
        self.best: float | None = None  # the kept best checkpoint's metric, read once

    def after_report(self, run_context, metrics, checkpoint):
        if self.lock_token:  # the driver's lock on the run is still its own: else stop writing
            storage.ensure_lock_held(self.run_uri, self.lock_token)
        run = RunDir(self.run_uri)
        m = metrics[0]
        if "stopped" in m:
            run.mark_stopped(m)
            return
        if self.last_epoch is None:
            self.last_epoch = run.last_epoch()
        if m["epoch"] > self.last_epoch:
            run.append_metrics(m)
            self.last_epoch = m["epoch"]
        if checkpoint is not None:
            run.point_latest(Path(checkpoint.path).name)
            self._keep_if_best(run, Path(checkpoint.path).name, m)

    def _keep_if_best(self, run: RunDir, checkpoint: str, m: dict) -> None:
        value = m.get(self.keep_best)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        if self.best is None:
            self.best = run.best_value(self.keep_best)
        if self.best is None or value < self.best:
            run.keep_best(checkpoint, m["epoch"])
            self.best = value


def ray_callback(run_uri: str, lock_token: str = "", keep_best: str = "none"):
    """A RunDirRecorder as the Ray Train callback it is on a Train controller."""
    import ray.train

    class RunDirCallback(RunDirRecorder, ray.train.UserCallback):
        pass

    return RunDirCallback(run_uri, lock_token, keep_best)


def build_trainer(
    cfg: TrainConfig,
    dataset: dict,
    run: RunDir,
    ingest: str,
    use_gpu: bool,
    callbacks: list | None = None,
    board: str | None = None,
    board_key: str = "",
    tracking: dict | None = None,
    lock_token: str = "",
    resources: dict[str, float] | None = None,
    resume_from: str | None = None,
    trial: bool = False,
) -> TorchTrainer:
    """The TorchTrainer for one run: `vae-ray train` and the Tune trials
    that start one (tune.trial_engine) use this. `lock_token` is the run
    lock's (storage.Lock.token): the Train controller checks it before each
    write into the run. `resources` are
    each worker's (default: its CPUs and, with `use_gpu`, one GPU); a trial
    sharing a GPU asks for a fraction of one. A `trial` logs each epoch
    before its report (a search may end the trial's workers right after it)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    datasets = {}
    if ingest == "stream":
        # A new block order every epoch (every execution), reproducible from the seed.
        datasets["train"] = load_split(cfg.data, "train", read_meta(cfg.data)).randomize_block_order(
            seed=compat.block_order_seed(cfg.seed)
        )
    fs, parent = storage.filesystem(run.parent)
    workers = (cfg.min_workers, cfg.workers) if cfg.min_workers else cfg.workers
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config(cfg, dataset, run, ingest, board, board_key, tracking, resume_from)
        | {"trial": trial},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=resources or {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=parent,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=[ray_callback(run.uri, lock_token, cfg.keep_best), *(callbacks or [])],
        ),
        datasets=datasets,
    )


def loop_config(
    cfg: TrainConfig,
    dataset: dict,
    run: RunDir,
    ingest: str,
    board: str | None = None,
    board_key: str = "",
    tracking: dict | None = None,
    resume_from: str | None = None,
) -> dict[str, Any]:
    """What `train_loop` is given. `resume_from`: the run's latest checkpoint,
    for a worker to which Ray Train hands none (one written in one process)."""
    return {
        "config": cfg.to_dict(),
        "dataset": dataset,
        "ingest": ingest,
        "progress_board": board,
        "progress_key": board_key,
        "tracking": tracking or {},
        "run": run.uri,
        "resume_from": resume_from,
    }


def fit(
    cfg: TrainConfig,
    resume: bool = False,
    show: bool = True,
    address: str | None = None,
    verbose: bool = False,
    tracking=None,
    finish: Callable[[RunDir], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train with Ray Train, or in this process when one_process() says so;
    return a summary. `tracking` (tracking.Tracking) is started once every
    check has passed; `finish(run)` (the run's pictures) runs while the run
    is still locked, and its result joins the summary."""
    meta = read_meta(cfg.data)
    cfg = resolve(cfg, meta)
    run = RunDir(cfg.out)
    # The dataset is read for the whole run: `data prepare --overwrite` must not swap it meanwhile.
    with dataset_read_lock(cfg.data), run.lock("vae-ray train") as lock:
        status = check_run(run, cfg, resume)
        if status == "complete":
            return run_summary(run, already_complete=True, complete=True)
        train_bytes = meta["splits"]["train"]["count"] * int(math.prod(meta["shape"]))
        local = one_process(cfg, address) and choose_ingest(cfg.cache, train_bytes, [machine_memory()]) == "memory"
        if local:
            cfg, device = plan_local(cfg)
            ingest, cluster = "memory", None
        else:
            cluster = clusters.connect(address, cpus_needed=private_cluster_cpus(cfg), verbose=verbose)
            cfg, use_gpu = plan_scale(cfg, cluster)
            ingest = choose_ingest(cfg.cache, train_bytes, cluster.node_memory)
        if cluster is not None and not cluster.private and not run.remote and len(cluster.nodes) > 1:
            storage.warn_user(
                f"the cluster has {len(cluster.nodes)} nodes but {run.uri} is a local path: every "
                f"node must see it (use s3:// or a shared filesystem)"
            )
        dataset = summary(meta)
        run.write_config(cfg.to_dict(), dataset)  # only now: every check has passed
        run.clear_stopped()
        info = tracking.start(cfg, run) if tracking is not None else {}
        if run.last_epoch() < cfg.epochs and local:
            _run_local(cfg, dataset, run, device, show, info, lock.token)
        elif run.last_epoch() < cfg.epochs:
            _run_trainer(cfg, dataset, run, cluster, use_gpu, ingest, show, info, lock.token)
        lock.ensure_held()
        stopped = run.stopped()
        if stopped:
            raise RunFailed(f"training stopped: {stopped['stopped']}; the last good checkpoint is {run.latest()}")
        done = run_summary(
            run,
            complete=run.last_epoch() >= cfg.epochs,
            ingest=ingest,
            workers=cfg.workers,
            cpus_per_worker=cfg.cpus_per_worker,
            engine="process" if local else "ray",  # trained in this process, or by Ray Train workers
        )
        return done | (finish(run) if finish is not None else {})


# ---------------------------------------------------------------------------
# One process: a run of one worker with no cluster named
# ---------------------------------------------------------------------------
def one_process(cfg: TrainConfig, address: str | None) -> bool:
    """Whether this run trains in this process, without Ray: one worker, not
    elastic, and no cluster named (--address, RAY_ADDRESS) or already joined
    by this process (ray.init in a notebook: the user chose that cluster).
    fit() also asks that the split fits in memory (a streamed split needs Ray Data)."""
    ray = sys.modules.get("ray")  # not imported: not initialized either
    return (
        cfg.workers == 1
        and not cfg.min_workers
        and clusters.given_address(address) is None
        and not (ray is not None and ray.is_initialized())
    )


def machine_memory() -> float:
    """What Ray would call this machine's memory: about 70% of it."""
    try:
        return 0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0.0


def plan_local(cfg: TrainConfig) -> tuple[TrainConfig, Any]:
    """The device and threads of a one-process run; the same refusals as plan_scale."""
    import torch

    cuda = torch.cuda.is_available()
    use_gpu = cfg.gpu if cfg.gpu is not None else cuda
    if use_gpu and not cuda:
        raise UserError("--gpu asks for 1 GPU worker(s) but this machine has no GPU torch can use")
    if cfg.precision == "fp16" and not use_gpu:
        raise UserError("precision fp16 needs GPUs; use bf16 on CPUs")
    cores = os.cpu_count() or 1
    cpus = cfg.cpus_per_worker or cores
    if cpus > cores:
        raise UserError(f"1 workers x {cpus} CPUs need {cpus} CPUs; this machine has {cores}")
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    return cfg.replace(cpus_per_worker=cpus, gpu=use_gpu), device


def _run_local(cfg: TrainConfig, dataset: dict, run: RunDir, device, show: bool, tracking: dict, lock_token: str):
    """train_loop in a thread of this process, followed like a TorchTrainer."""
    from .session import LocalBoard, LocalSession, Stopped

    board = LocalBoard()
    recorder = RunDirRecorder(run.uri, lock_token, cfg.keep_best)
    session = LocalSession(run, device, board, recorder, cfg.keep_checkpoints, lock_token)
    config = loop_config(cfg, dataset, run, "memory", tracking=tracking)

    def work() -> None:
        try:
            train_loop(config, session)
        except Stopped:
            pass
        finally:
            forget_eval_cache()  # the next run in this process (a notebook) reads its own test split

    def stop(outcome: dict) -> None:
        # The thread ends at its next progress update or report; one still
        # inside torch when the interpreter exits would abort the process.
        session.stop()
        _wait_until_ended(outcome, 60)

    outcome = _follow(work, board.get, run, cfg, show, stop, lambda: "the training step made none")
    if "error" in outcome:
        raise RunFailed(f"training failed: {root_cause(outcome['error'])}")


def _follow(work, poll, run: RunDir, cfg: TrainConfig, show: bool, stop, stall_reason) -> dict[str, Any]:
    """`work()` in a thread, followed by the progress display. Ctrl-C, SIGTERM
    or a stall call `stop(outcome)` and end the command in one line; else the
    outcome: {"result": ...} or {"error": exception}."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="vae-ray-train", daemon=True)
    display = TrainingDisplay(poll, enabled=show, history=run.history, stall_timeout=cfg.stall_timeout)
    thread.start()
    try:
        stalled = display.follow(thread)
    except (KeyboardInterrupt, Interrupted) as exc:
        stop(outcome)
        raise Interrupted.restated(
            exc,
            lambda by: (
                f"training stopped by {by} after {run.last_epoch()} epoch(s); "
                f"the run keeps its last checkpoint: continue it with --resume"
            ),
        ) from None
    if stalled:
        reason = stall_reason()  # asked before stop(): a shut-down cluster says nothing
        stop(outcome)
        raise RunFailed(
            f"no progress for {cfg.stall_timeout} s: {reason}; the run keeps its last checkpoint "
            f"(continue it with --resume)"
        )
    return outcome


def _wait_until_ended(outcome: dict, patience: float = 15) -> None:
    """Give the training thread a moment to end once told to: a thread still
    inside Ray's core or torch when the interpreter exits can crash it.
    Polled, not joined: a Thread.join() that a signal handler's exception
    interrupted can report a live thread as ended."""
    deadline = time.monotonic() + patience
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.1)


def _run_trainer(
    cfg: TrainConfig,
    dataset: dict,
    run: RunDir,
    cluster: clusters.Cluster,
    use_gpu: bool,
    ingest: str,
    show: bool,
    tracking: dict,
    lock_token: str = "",
) -> None:
    board_name = f"vae-ray-progress-{uuid.uuid4().hex[:8]}"
    board, poll = clusters.start_board(board_name)
    # Ray Train's preemption watcher (one more process per run) matters when
    # nodes may be taken away, which is what elastic runs are for.
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1" if cfg.min_workers else "0"
    trainer = build_trainer(
        cfg,
        dataset,
        run,
        ingest,
        use_gpu,
        board=board_name,
        tracking=tracking,
        lock_token=lock_token,
        resume_from=run.latest(),
    )

    def stop(outcome: dict) -> None:
        clusters.shutdown()  # ends this driver's trainer, its workers and a private cluster
        _wait_until_ended(outcome)

    outcome = _follow(trainer.fit, poll, run, cfg, show, stop, lambda: clusters.diagnose_stall(cfg, use_gpu))
    try:
        import ray

        ray.kill(board)
    except Exception:  # noqa: BLE001 - already gone with a failed run
        pass
    error = outcome.get("error") or getattr(outcome.get("result"), "error", None)
    if error is not None:
        where = ""
        if not run.remote:
            copied = clusters.copy_logs(cluster, Path(run.uri) / "ray-logs")
            where = f" (Ray logs: {copied})" if copied else ""
        if not where and not cluster.private:
            where = " (worker logs: the cluster's dashboard, or `ray logs`)"
        raise RunFailed(f"training failed: {root_cause(error)}{where}")
