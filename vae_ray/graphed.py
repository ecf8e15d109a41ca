"""The training step captured once as a CUDA graph, then replayed (`--cuda-graph`).

A step of these small networks is launch-bound on a GPU: a few hundred
kernels of microseconds each, issued one at a time from Python. Replaying a
captured graph issues all of them with one call. Capture needs a step that
never asks the host anything and keeps its shapes, so it applies to:
- one rank (no DDP hooks) fed batches of one size (the in-memory feed);
- fp32 or bf16 (fp16's loss scaler reads the device to skip steps);
- Adam in its capturable form (its step count on the device), with the
  learning rate and the KL weight as device tensors filled before each replay.
The weight average (--ema) is updated after each replay, outside the graph:
its decay depends on the step.

`StaticStep` is that step with its static buffers; with capture=False (any
CPU) it runs the same body eagerly, so the suite tests all but the capture.
"""

from __future__ import annotations

import sys
import time
from dataclasses import fields
from typing import TYPE_CHECKING

import torch

from .model import BatchTerms

if TYPE_CHECKING:
    from .config import TrainConfig
    from .worker import Run

WARMUP_STEPS = 3  # eager steps on a side stream first: cuDNN picks its kernels, Adam makes its state
IMPLEMENTATION = ("capturable", "fused", "foreach")  # an optimizer's flags that a checkpoint carries


def blocker(cfg: TrainConfig, device: torch.device, world: int, ingest: str) -> str | None:
    """Why this run's steps cannot be captured, or None when they can."""
    if cfg.cuda_graph == "off":
        return "--cuda-graph off"
    if device.type != "cuda":
        return "not on a GPU"
    if world > 1:
        return "more than one worker (DDP)"
    if ingest != "memory":
        return "streamed batches"
    if cfg.precision == "fp16":
        return "fp16 loss scaling"
    return None


def implementation(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The flags each parameter group was built with (see keep_implementation)."""
    return [{k: group[k] for k in IMPLEMENTATION if k in group} for group in optimizer.param_groups]


def keep_implementation(optimizer: torch.optim.Optimizer, flags: list[dict]) -> None:
    """After a checkpoint is loaded: its parameter groups carry the flags of the
    optimizer that saved it (fused on a GPU, capturable under a graph, neither
    on a CPU). Keep the ones this run chose, and put Adam's step counts where
    that implementation reads them (on the device, or on the host)."""
    for group, kept in zip(optimizer.param_groups, flags, strict=True):
        group.update(kept)
        on_device = bool(kept.get("capturable") or kept.get("fused"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                where = param.device if on_device else torch.device("cpu")
                state["step"] = state["step"].to(where, torch.float32)


class StaticStep:
    """One optimiser step reading static buffers: captured as a CUDA graph at
    the first step after the warm-up when `capture`, else run eagerly."""

    def __init__(self, run: Run, binarize: bool, capture: bool):
        from . import worker  # which imports this module: its pieces are bound once, off the step's path

        self.step_loss, self.update_average = worker.step_loss, worker.update_average
        self.run, self.binarize, self.capture = run, binarize, capture
        self.autocast = worker.autocast_for(run.cfg.precision, run.device)
        self.lr = torch.tensor(run.cfg.lr, dtype=torch.float32, device=run.device)
        self.beta = torch.tensor(run.cfg.beta, dtype=torch.float32, device=run.device)
        for group in run.optimizer.param_groups:
            group["lr"] = self.lr  # the optimizer reads the tensor the replay sees
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out = None
        self.warm = 0
        self.side: torch.cuda.Stream | None = None
        self.setup_seconds = 0.0  # warm-up steps and capture, device time included (metrics: cuda_graph_setup_s)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float, beta: float):
        """The step on this batch (of the size of the first); returns (terms, loss) as train_step."""
        run = self.run
        self.lr.fill_(lr)  # a kernel, not a copy the host waits for
        self.beta.fill_(beta)
        if self.x is None:
            self.x, self.y = torch.empty_like(images), torch.empty_like(labels)
        self.x.copy_(images, non_blocking=True)
        self.y.copy_(labels, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            out = self.out
        elif not self.capture:
            out = self._body()
        else:
            started = time.perf_counter()
            if self.warm < WARMUP_STEPS:
                out = self._on_side_stream()
                self.warm += 1
            else:
                out = self._capture()
            torch.cuda.synchronize(run.device)  # a few steps once: the setup's cost, measured
            self.setup_seconds += time.perf_counter() - started
        run.global_step += 1
        if run.averaged is not None:
            self.update_average(run.averaged, run.core, run.cfg.ema, run.global_step)
        return out

    def _body(self):
        run = self.run
        terms, loss = self.step_loss(run, self.x, self.y, self.beta, self.autocast, self.binarize)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
        run.optimizer.step()
        # Nothing handed back holds the step's autograd graph: a graph kept
        # alive into the next step keeps its parameters' gradient nodes on the
        # stream that made them, and the next step (another stream) waits on it.
        return BatchTerms(**{f.name: getattr(terms, f.name).detach() for f in fields(terms)}), loss.detach()

    def _on_side_stream(self):
        # torch.cuda.graphs' recipe: warm-up iterations on a side stream, so
        # what they allocate lives outside the graph's memory pool.
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._body()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _side_stream(self) -> torch.cuda.Stream:
        if self.side is None:  # one for the warm-up and the capture
            self.side = torch.cuda.Stream(self.run.device)
        return self.side

    def _capture(self):
        """Capture the step and replay it for this batch. A network that asks the
        host something mid-step cannot be captured: training goes on eagerly."""
        graph = torch.cuda.CUDAGraph()
        self.run.optimizer.zero_grad(set_to_none=True)  # backward then allocates the gradients in the graph's pool
        try:
            # thread_local: the command's other threads (its display) may use CUDA meanwhile.
            with torch.cuda.graph(graph, stream=self._side_stream(), capture_error_mode="thread_local"):
                out = self._body()
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"CUDA graph capture failed ({first[:160]}); training goes on without it", file=sys.stderr)
            torch.cuda.synchronize(self.run.device)
            self.capture = False
            return self._body()
        self.graph, self.out = graph, out
        graph.replay()
        return out
