"""The life of a set written shard by shard, exactly once, that `generate`
and `encode` share (ShardedJob), and how many decoder actors a cluster gets."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import storage
from .destination import MANIFEST, completed_shards
from .errors import UserError
from .genplan import FILTER_KEYS
from .shardstore import EncoderPool
from .swap import settle_swap

MAX_ACTORS_PER_GPU = 8
MAX_ENCODERS = 32  # encoder processes of a job on one machine (each holds a shard or two)
LOCAL_CPU_DECODE = 4  # cores up to which a job without a GPU decodes in the command's process


class ShardedJob:
    """The life of a set written shard by shard, exactly once, that generate
    and encode (vae_ray/encode.py) share: under the destination's lock, finish
    a swap a crash cut short, find the destination's state again, skip the
    marked shards, write the manifest first ("running") and last ("complete"),
    remove leftovers, swap an --overwrite in. A subclass says what its set is:
    `command`, `writer` (the shard writer: a Ray Data actor class), `last`
    (the names a swap removes last), its module's functions `_destination`
    (destination_state), `_read_set` and `_foreign` (foreign_in_set), and the
    methods `run` calls."""

    command = ""
    writer: type = object
    pipelined = False  # the writer decodes (decode_shard) apart from encoding and writing (shardstore)
    last: tuple[str, ...] = (MANIFEST,)
    _destination: Callable[..., str]
    _read_set: Callable[[str], tuple[dict[str, Any], Any] | None]
    _foreign: Callable[[str], list[str]]

    def run(self, address: str | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Write the shards; return the manifest (with `already_complete` when there was nothing to do)."""
        with storage.Lock(self.out, self.command) as lock:

            def tick(done: int, total: int) -> None:  # after every shard: is the lock still ours?
                lock.ensure_held()
                if progress:
                    progress(done, total)

            settle_swap(self.out, self._foreign, last=self.last)  # a swap a crash cut short
            self.state = self._destination(self.out, self.plan, self.overwrite)  # again, under the lock
            if self.state == "complete":
                self.path_taken = "nothing to do"
                return self._read_set(self.out)[0] | {"already_complete": True}
            root = self._root()
            existing = self._read_set(root)  # None, or this very plan's set (checked by _destination or _root)
            if existing is not None and existing[0]["status"] == "complete":  # an --overwrite whose swap was cut short
                self.path_taken = "the new set was complete; swapped in now"
                self._swap_in(root)
                return existing[0]
            done = completed_shards(root, self.plan)
            todo = [s for s in range(self.plan.num_shards) if s not in done]
            self._check_space(root, done)  # before the first write
            here = self._here(address)
            writer = None if here else self._connect(address)  # checks the cluster (GPUs) first
            started = time.time()
            identity = self._identity(root)
            if existing is None:
                storage.makedirs(root)
                storage.write_json(storage.join(root, MANIFEST), identity)
            for shard in todo:  # leftovers of an interrupted run are rewritten whole
                self._remove_partial(root, shard)
            written = sum(m["images"] for m in done.values())
            tick(written, self.plan.num)
            if here:
                self._write_here(here, root, todo, done, written, tick)
            else:
                done = writer(root, todo, done, written, tick)
            manifest = {
                **identity,
                "status": "complete",
                "shards": [done[s] for s in range(self.plan.num_shards)],
                "seconds": round(time.time() - started, 3),
                "path": self.path_taken,
            }
            self._summarise(manifest)
            lock.ensure_held()  # a writer that lost its lock never writes the manifest that calls a set complete
            self._before_manifest(root, manifest)
            storage.write_json(storage.join(root, MANIFEST), manifest)
            self._clean_leftovers(root)
            if self.state == "replace":
                lock.ensure_held()
                self._swap_in(root)
            return manifest

    # -- in this process ----------------------------------------------------
    def _here(self, address: str | None) -> str | None:
        """The device to decode on in this process, or None for the Ray Data
        path. A job of one shard runs here unless a cluster is named
        (--address, RAY_ADDRESS), --actors asks for actors, or --gpu finds no
        GPU. More shards (a pipelined writer's) run here on a machine of one
        GPU, or without a GPU on one of at most LOCAL_CPU_DECODE cores (beyond,
        one single-threaded Ray actor per core decodes faster), and not in a
        process that has joined a Ray cluster already. The device is chosen the
        same way on both paths: a GPU when there is one, unless --no-gpu."""
        from .cluster import given_address

        if given_address(address) is not None or self.actors is not None:
            return None
        if not self.pipelined:
            return "cpu" if not self.gpu and self.plan.num_shards == 1 else None
        cuda = torch.cuda.is_available()
        if self.gpu and not cuda:
            return None  # the Ray path says the cluster has no GPU
        device = "cuda" if cuda and self.gpu is not False else "cpu"
        if self.plan.num_shards == 1:
            return device
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            return None
        if device == "cuda" and torch.cuda.device_count() > 1:
            return None  # one decoder per GPU: the actors use them all
        if device == "cpu" and _threads() > LOCAL_CPU_DECODE:
            return None
        return device

    def _write_here(self, device: str, root: str, todo: list[int], done: dict, written: int, tick) -> None:
        """Decode shard after shard here; with more than one, a pool of encoder
        processes (shardstore.EncoderPool) encodes and writes them meanwhile.
        A set of several shards decodes in one thread on a CPU, as each Ray
        actor does, so that a set resumed on the other path is the same
        arithmetic. The process's torch settings are put back after."""
        cpus = _threads()
        encoders = 0 if len(todo) < 2 or not self.pipelined else min(len(todo), MAX_ENCODERS, max(1, cpus - 1))
        threads = cpus if device == "cpu" and self.plan.num_shards == 1 else 1
        kept = torch.get_num_threads(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
        try:
            shard_writer = self.writer(self.blob, **self._writer_options(root, device, threads))
            self._write_shards(shard_writer, device, encoders, todo, done, written, tick)
        finally:
            torch.set_num_threads(kept[0])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = kept[1], kept[2]

    def _write_shards(self, shard_writer, device: str, encoders: int, todo, done: dict, written: int, tick) -> None:
        where = "in this process" + (" on the GPU" if device == "cuda" else "")
        # A shard's record, as the Ray path and a resume (completed_shards) make it.
        filtered = getattr(shard_writer, "filtered", {}) if getattr(self.plan, "filtered", False) else {}

        def record(shard: int, n: int, checksum: str) -> None:
            nonlocal written
            done[shard] = {"shard": shard, "images": n, "sha256": checksum} | filtered.get(shard, {})
            written += n
            tick(written, self.plan.num)

        if not encoders:
            self.path_taken = f"{where} ({'one shard, ' if self.plan.num_shards == 1 else ''}no cluster named)"
            for shard in todo:
                record(shard, *shard_writer.write_shard(shard))
            return
        self.path_taken = f"{where}, {encoders} encoder process(es) (no cluster named)"
        with EncoderPool(encoders) as pool:
            for shard in todo:
                args = shard_writer.decode_shard(shard)
                for finished in pool.submit(shard, args[-1]["images"], *args):
                    record(*finished)
            for finished in pool.finish():
                record(*finished)

    # -- the Ray Data path --------------------------------------------------
    def _connect(self, address: str | None):
        import ray

        from .cluster import connect

        cluster = connect(address, cpus_needed=1, dashboard=False)
        resources = cluster.resources
        use_gpu = bool(resources.get("GPU", 0)) if self.gpu is None else self.gpu
        if use_gpu and not resources.get("GPU", 0):
            raise UserError("--gpu asks for GPU actors but the cluster has no GPUs")
        want, gpus_each = actor_plan(resources, use_gpu, self.actors)

        def write(root: str, todo: list[int], done: dict, written: int, progress) -> dict:
            pool = max(1, min(want, len(todo) or 1))
            shared = f", {gpus_each:g} GPU each" if use_gpu and gpus_each < 1 else ""
            self.path_taken = f"a Ray Data actor pool of {pool} {'GPU' if use_gpu else 'CPU'} actor(s){shared}"
            if not todo:
                return done
            ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
            results = ds.map_batches(
                self.writer,
                batch_size=1,
                compute=actor_pool(pool),
                fn_constructor_kwargs={
                    "model_blob": [ray.put(self.blob)],
                    **self._writer_options(root, "cuda" if use_gpu else "cpu", 1),
                },
                num_gpus=gpus_each,
                num_cpus=1,
            )
            for row in results.iter_rows():
                if row.get("error"):  # a user's mistake an actor found (raised there, Ray would print a traceback)
                    raise UserError(str(row["error"]))
                done[int(row["shard"])] = {
                    "shard": int(row["shard"]),
                    "images": int(row["images"]),
                    "sha256": str(row["sha256"]),
                } | {key: int(row[key]) for key in FILTER_KEYS if key in row}

                written += int(row["images"])
                if progress:
                    progress(written, self.plan.num)
            return done

        return write

    # -- what a subclass says -------------------------------------------------
    def _writer_options(self, root: str, device: str, threads: int) -> dict[str, Any]:
        """The writer's constructor arguments beside the model."""
        raise NotImplementedError

    def _before_manifest(self, root: str, manifest: dict[str, Any]) -> None:
        """Anything written just before the complete manifest (the last file)."""

    def _summarise(self, manifest: dict[str, Any]) -> None:
        """Totals of the shards' records, into the complete manifest."""


def _threads() -> int:
    """The CPUs this process may use: its affinity, and a container's CPU quota (cgroup v2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def actor_plan(resources: dict, use_gpu: bool, actors: int | None) -> tuple[int, float]:
    """How many decoder actors, and the GPU share of each.

    On CPUs: one single-threaded actor per CPU. On GPUs the decoding is a
    small part of a shard's work (the latents, the uint8 copy back, encoding
    and checksums run on the CPU), so one actor per GPU left the node's other
    cores idle: measured on one H100 with 16 cores, one actor wrote 1,000,000
    MNIST images to Parquet at 61,576 images/s. Several actors share each GPU
    instead, one CPU each, at most 8 per GPU (each holds a CUDA context of a
    few hundred MB), leaving a CPU per GPU for Ray Data."""
    cpus = max(1, int(resources.get("CPU", 1)))
    if not use_gpu:
        return actors or cpus, 0.0
    gpus = max(1, int(resources.get("GPU", 1)))
    want = actors or gpus * max(1, min(MAX_ACTORS_PER_GPU, cpus // gpus - 1))
    # Whole actors per GPU (3 actors on 2 GPUs take half a GPU each, or the
    # third would fit on neither), and Ray keeps resource amounts to 4
    # decimals: round the share down, or 7 actors of 1/7 (0.1429) would not fit.
    per_gpu = math.ceil(want / gpus)
    return want, math.floor(10_000 / per_gpu) / 10_000


def actor_pool(size: int):
    """A fixed actor pool that hands each actor one shard at a time. Ray
    Data's default queues several tasks per actor, so the first actor to start
    could take most of the shards while the others sat idle."""
    import ray

    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)
