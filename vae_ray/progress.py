"""Live progress of a distributed run on the driver's terminal.

Rank 0 posts its step, loss and speed to a tiny named actor (fire and forget,
every few steps); the driver polls it and draws a Rich progress bar, printing
one line per finished epoch above it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import ray
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def update(self, **values: Any) -> None:
        self.state.update(values)

    def get(self) -> dict[str, Any]:
        return dict(self.state)


def epoch_line(m: dict[str, Any]) -> str:
    return (f"epoch {m['epoch']:>3}  loss {m['train_loss']:.3f}  test ELBO {m['test_matlab_elbo']:.3f} "
            f"(-ELBO {m['test_neg_elbo_nats']:.1f} nats)  {m['train_images_per_s']:,.0f} img/s  "
            f"{m['epoch_seconds']:.1f} s")


class TrainingDisplay:
    def __init__(self, board, enabled: bool = True, history: Callable[[], list] | None = None,
                 console: Console | None = None):
        self.board, self.enabled, self.history = board, enabled, history or (lambda: [])
        self.console = console or Console(stderr=True, highlight=False)

    def follow(self, thread: threading.Thread) -> None:
        """Draw progress until `thread` (running trainer.fit) ends."""
        if not self.enabled:
            thread.join()
            return
        printed = {h["epoch"] for h in self.history()}
        columns = [TextColumn("[bold]{task.description}"), BarColumn(),
                   TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task("starting workers", total=None, detail="")
            while thread.is_alive():
                thread.join(timeout=0.5)
                for m in self.history():
                    if m["epoch"] not in printed:
                        printed.add(m["epoch"])
                        bar.console.print(epoch_line(m))
                state = self._poll()
                if "epoch" in state:
                    total = state["epochs"] * state["steps"]
                    done = (state["epoch"] - 1) * state["steps"] + state["step"]
                    bar.update(task, total=total, completed=done,
                               description=f"epoch {state['epoch']}/{state['epochs']}",
                               detail=f"step {state['step']}/{state['steps']}  loss {state['loss']:.3f}  "
                                      f"{state['images_per_s']:,.0f} img/s")
            for m in self.history():
                if m["epoch"] not in printed:
                    bar.console.print(epoch_line(m))

    def _poll(self) -> dict[str, Any]:
        try:
            return ray.get(self.board.get.remote(), timeout=2)
        except Exception:  # noqa: BLE001 - a missed poll only delays the bar
            time.sleep(0.1)
            return {}


class SearchDisplay:
    """A Tune callback (it runs in the driver) that draws the search's progress:
    epochs reported over all trials, and trials finished, stopped or failed."""

    def __init__(self, total: int, epochs: int, metric: str, enabled: bool = True, console: Console | None = None):
        from ray.tune import Callback

        class _Callback(Callback):
            """Forwards trial events to the display. Tune pickles its run
            config (callbacks included) into the experiment state, so the
            display itself (a live terminal) is left out of the pickle."""

            def __init__(self, display):
                self.display = display

            def __getstate__(self):
                return {"display": None}

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if self.display:
                    self.display.result(trial.trial_id, result)

            def on_trial_complete(self, iteration, trials, trial, **info):
                if self.display:
                    self.display.finished(trial.trial_id, "done")

            def on_trial_error(self, iteration, trials, trial, **info):
                if self.display:
                    self.display.finished(trial.trial_id, "failed")

        self.callback = _Callback(self)
        self.total, self.epochs, self.metric, self.enabled = total, epochs, metric, enabled
        self.console = console or Console(stderr=True, highlight=False)
        self.best: float | None = None
        self.done: dict[str, str] = {}
        self.reported = 0
        self.bar: Progress | None = None

    def __enter__(self) -> "SearchDisplay":
        if self.enabled:
            self.bar = Progress(TextColumn("[bold]search"), BarColumn(), TextColumn("{task.fields[detail]}"),
                                TimeElapsedColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("search", total=self.total * self.epochs, detail="starting trials")
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def result(self, trial_id: str, result: dict) -> None:
        self.reported += 1
        value = result.get(self.metric)
        if value is not None and (self.best is None or value < self.best):
            self.best = value
        self._draw()

    def finished(self, trial_id: str, how: str) -> None:
        self.done[trial_id] = how
        self._draw()

    def _draw(self) -> None:
        if self.bar is None:
            return
        best = f"best {self.metric} {self.best:.3f}" if self.best is not None else ""
        self.bar.update(self.task, completed=self.reported,
                        detail=f"{len(self.done)}/{self.total} trials ended  {best}")
