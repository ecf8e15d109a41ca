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
