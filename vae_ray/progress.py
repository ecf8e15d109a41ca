"""Live progress of distributed work on the driver's terminal, and the
watchdog that turns a silent hang into a message.

Rank 0 of every run posts its step, loss and speed to a tiny named actor
(`ProgressBoard`, fire and forget, every few steps, one entry per run); the
driver polls it, draws a Rich progress bar, prints one line per finished
epoch above it, and notices when nothing has moved for `stall_timeout`
seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


class ProgressBoard:
    """Step-level progress of one or more runs (a search's trials share one).
    Started as a Ray actor by its user: `ray.remote(num_cpus=0)(ProgressBoard)`."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}

    def update(self, key: str = "", **values: Any) -> None:
        self.state.setdefault(key, {}).update(values, at=time.time())

    def get(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.state.items()}


def epoch_line(m: dict[str, Any]) -> str:
    workers = f"  {m['workers']} workers" if m.get("workers", 1) > 1 else ""
    return (
        f"epoch {m['epoch']:>3}  loss {m['train_loss']:.3f}  test ELBO {m['test_matlab_elbo']:.3f} "
        f"(-ELBO {m['test_neg_elbo_nats']:.1f} nats)  {m['train_images_per_s']:,.0f} img/s  "
        f"{m['epoch_seconds']:.1f} s{workers}"
    )


class TrainingDisplay:
    """Follows `trainer.fit` running in a thread; returns True if it stalled."""

    def __init__(
        self,
        poll: Callable[[], dict],
        enabled: bool = True,
        history: Callable[[], list] | None = None,
        stall_timeout: float = 300,
        out: Console | None = None,
    ):
        self.poll_board, self.enabled, self.history = poll, enabled, history or (lambda: [])
        self.stall_timeout = stall_timeout
        self.console = out or console

    def follow(self, thread: threading.Thread) -> bool:
        printed = {h["epoch"] for h in self._history()}
        last_change, last_seen = time.monotonic(), None
        bar = None
        if self.enabled:
            bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            bar.start()
            task = bar.add_task("starting workers", total=None, detail="")
        try:
            while thread.is_alive():
                thread.join(timeout=0.5)
                for m in self._history():
                    if m["epoch"] not in printed:
                        printed.add(m["epoch"])
                        last_change = time.monotonic()
                        if bar is not None:
                            bar.console.print(epoch_line(m), markup=False)
                state = self._poll()
                mark = (state.get("epoch"), state.get("step"), state.get("at"))
                if "epoch" in state and mark != last_seen:
                    last_seen, last_change = mark, time.monotonic()
                if bar is not None and "epoch" in state:
                    total = state["epochs"] * state["steps"]
                    done = (state["epoch"] - 1) * state["steps"] + state["step"]
                    bar.update(
                        task,
                        total=total,
                        completed=done,
                        description=f"epoch {state['epoch']}/{state['epochs']}",
                        detail=f"step {state['step']}/{state['steps']}  loss {state['loss']:.3f}  "
                        f"{state['images_per_s']:,.0f} img/s",
                    )
                if time.monotonic() - last_change > self.stall_timeout:
                    return True
            if bar is not None:
                for m in self._history():
                    if m["epoch"] not in printed:
                        bar.console.print(epoch_line(m), markup=False)
            return False
        finally:
            if bar is not None:
                bar.stop()

    def _history(self) -> list:
        try:
            return self.history()
        except Exception:  # noqa: BLE001 - a run folder being written; the next poll reads it
            return []

    def _poll(self) -> dict[str, Any]:
        try:
            boards = self.poll_board()
        except Exception:  # noqa: BLE001 - a missed poll only delays the bar
            time.sleep(0.1)
            return {}
        return boards.get("", {})


# ---------------------------------------------------------------------------
# Stages of a batch job (prepare, generate, evaluate, classifier)
# ---------------------------------------------------------------------------
class Stages:
    """A Rich bar per named stage; call it as `progress(stage, done, total)`."""

    def __init__(self, enabled: bool = True, rate: bool = False):
        self.enabled, self.rate = enabled, rate
        self.tasks: dict[str, int] = {}
        self.started = time.perf_counter()
        self.bar: Progress | None = None

    def __enter__(self) -> Stages:
        # Bars are for a person at a terminal: in a pipe or a log they leave
        # nothing (transient) but a blank line before the command's last one.
        if self.enabled and console.is_terminal:
            columns = [
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
            ]
            # Transient: a finished (or failed) command leaves its one summary line, not bars.
            self.bar = Progress(*columns, console=console, transient=True)
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total, rate="")
            self.started = time.perf_counter()
        rate = f"{done / max(time.perf_counter() - self.started, 1e-9):,.0f}/s" if self.rate and done else ""
        self.bar.update(self.tasks[stage], completed=done, total=total, rate=rate)


# ---------------------------------------------------------------------------
# A search: epochs over all trials, trials ended, the best metric
# ---------------------------------------------------------------------------
class SearchDisplay:
    """The search's progress (fed by a Tune callback in the driver, see
    tune.DisplayCallback), and when anything last moved, for the watchdog."""

    def __init__(self, total: int, epochs: int, metric: str, enabled: bool = True):
        self.total, self.epochs, self.metric, self.enabled = total, epochs, metric, enabled
        self.best: float | None = None
        self.done: dict[str, str] = {}
        self.reported = 0
        self.last_change = time.monotonic()
        self.bar: Progress | None = None

    def __enter__(self) -> SearchDisplay:
        if self.enabled:
            self.bar = Progress(
                TextColumn("[bold]search"),
                BarColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("search", total=self.total * self.epochs, detail="starting trials")
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def touch(self) -> None:
        self.last_change = time.monotonic()

    def result(self, trial_id: str, result: dict) -> None:
        self.reported += 1
        self.touch()
        value = result.get(self.metric)
        if value is not None and (self.best is None or value < self.best):
            self.best = value
        self._draw()

    def finished(self, trial_id: str, how: str) -> None:
        self.done[trial_id] = how
        self.touch()
        self._draw()

    def _draw(self) -> None:
        if self.bar is None:
            return
        best = f"best {self.metric} {self.best:.3f}" if self.best is not None else ""
        self.bar.update(
            self.task, completed=self.reported, detail=f"{len(self.done)}/{self.total} trials ended  {best}"
        )
