"""Progress and logs go to stderr: a rich progress bar on a terminal, plain lines otherwise (cron mail
stays readable). Results go to stdout from the CLI, never from here."""

from __future__ import annotations

import sys
import time


class Reporter:
    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._progress = None
        self._task = None

    def log(self, msg: str) -> None:
        if not self.quiet:
            if self._progress is not None:
                self._progress.console.print(msg, highlight=False)
            else:
                print(msg, file=self.stream, flush=True)

    def start(self, total_steps: int, description: str = "train") -> None:
        if self.quiet or not self.tty:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                  console=Console(file=self.stream), transient=True)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total_steps, info="")

    def step(self, n: int = 1, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, info=info)

    def set_total(self, total_steps: int) -> None:
        """A new length for the progress bar (a time budget re-planned the run)."""
        if self._progress is not None:
            self._progress.update(self._task, total=total_steps)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def counter(self, total: int, description: str):
        """A callable advancing by n items: the progress bar on a terminal, otherwise a log line at every
        tenth of the way (long evaluations say how far they are, in cron mail too). Call .stop() after."""
        self.start(total, description)
        state = {"done": 0, "shown": 0, "t0": time.perf_counter()}

        def advance(n: int) -> None:
            state["done"] += n
            self.step(n)
            tenth = state["done"] * 10 // max(1, total)
            if self._progress is None and tenth > state["shown"]:
                state["shown"] = tenth
                self.log(f"{description}: {state['done']}/{total} images, {time.perf_counter() - state['t0']:.0f}s")

        return advance

