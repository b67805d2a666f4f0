"""Progress of a run, on stderr: rich bars on a terminal; plain log lines otherwise.

A run with its output redirected to a file would otherwise print nothing until its table (minutes
to hours). Off a terminal every finished arm x seed gets a line, and while nothing finishes a line
comes at least every `every` seconds: what runs, the time elapsed and an estimate of what is left.

    with Progress(enabled) as bars:
        tick = bars.task("gptq4 seed 0: quantize", 98)    # None when disabled, else tick(n=1)
        ...
        bars.finished("gptq4", 0, seconds=61.8, done=3, total=10)

The estimate: the wall time per run so far (from the first timed run's start to the last finish,
so runs in parallel count as they overlap) times the runs left, less what the current one has
already taken; before any run finishes, the current step's own rate.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)   # sys.stderr looked up per line: it may be swapped


def duration(seconds: float) -> str:
    """1h02m, 4m05s, 12s."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


@dataclass
class _Step:
    description: str
    total: int
    started: float
    done: int = 0


class Progress:
    """`enabled` False: silent (`task` returns None). On a terminal (`terminal`, default: stderr is
    one): rich bars as the runner always showed. Otherwise log lines through `log` (default: stderr),
    timed by `clock` (injectable for tests); `background` runs a thread that writes the periodic
    line while the caller is busy in one long step (tests drive `beat()` themselves)."""

    def __init__(self, enabled: bool = True, *, terminal: bool | None = None,
                 log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 every: float = 30.0, background: bool = True):
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.log, self.clock, self.every = log or _to_stderr, clock, every
        self.background = background
        self.p = None          # the rich bars (terminal)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._steps: list[_Step] = []
        self._t0 = self._last_line = 0.0
        self._done = 0                       # arm x seed steps finished (stored ones too)
        self._total: int | None = None
        self._timed = 0                      # of them, runs that ran here (seconds given)
        self._runs_began: float | None = None
        self._last_finish: float | None = None
        if enabled and self.terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bars

            self.p = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), transient=True)

    @property
    def logging(self) -> bool:
        """Whether progress goes out as log lines (enabled, not on a terminal)."""
        return self.enabled and self.p is None

    def __enter__(self):
        if self.p is not None:
            self.p.__enter__()
        elif self.logging:
            self._t0 = self._last_line = self.clock()
            if self.background:
                self._thread = threading.Thread(target=self._beat_until_stopped, name="quantatlas-progress",
                                                daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.p is not None:
            self.p.__exit__(*exc)

    def task(self, description: str, total: int) -> Callable[[int], None] | None:
        """A step of `total` units; returns `tick(n=1)` to call as units complete (None when disabled)."""
        if not self.enabled:
            return None
        if self.p is not None:
            t = self.p.add_task(description, total=total)
            return lambda n=1: self.p.advance(t, n)
        with self._lock:
            step = _Step(description, int(total), self.clock())
            self._steps.append(step)

        def tick(n: int = 1) -> None:
            with self._lock:
                step.done += n
            self.beat()
        return tick

    def finished(self, arm: str, seed: int, seconds: float | None = None, done: int | None = None,
                 total: int | None = None, note: str | None = None) -> None:
        """Arm x seed finished: `seconds` it ran (None for a result stored or copied: not timed), `done`
        of the run's `total` arm x seed steps (default: counted here), `note` (e.g. "stored")."""
        if not self.logging:
            return
        with self._lock:
            now = self.clock()
            self._done = self._done + 1 if done is None else done
            if total is not None:
                self._total = total
            if seconds is not None:
                self._timed += 1
                began = now - seconds
                self._runs_began = began if self._runs_began is None else min(self._runs_began, began)
                self._last_finish = now
            how = f"in {duration(seconds)}" if seconds is not None else (note or "done")
            if seconds is not None and note:
                how += f", {note}"
            of = f"{self._done}/{self._total} runs" if self._total is not None else f"{self._done} so far"
            self._emit(now, f"{arm} seed {seed} finished {how} ({of})", self._left(now))

    def beat(self) -> None:
        """Write the periodic line if `every` seconds have passed since the last line."""
        if not self.logging:
            return
        with self._lock:
            now = self.clock()
            if now - self._last_line < self.every:
                return
            step = self._current()
            what = "working" if step is None else f"{step.description} {step.done}/{step.total}"
            if self._total is not None:
                what += f" · runs {self._done}/{self._total} done"
            left = self._left(now)
            if left is None and step is not None and 0 < step.done < step.total:
                rate = (now - step.started) / step.done
                left = f"about {duration(rate * (step.total - step.done))} left in this step"
            self._emit(now, what, left)

    # -- internals -------------------------------------------------------------------------------
    def _current(self) -> _Step | None:
        """The latest step not complete, else the latest step."""
        for step in reversed(self._steps):
            if step.done < step.total:
                return step
        return self._steps[-1] if self._steps else None

    def _left(self, now: float) -> str | None:
        """The estimate of the whole run's remaining time, once a run has been timed and the total is known."""
        if self._total is None or self._timed == 0:
            return None
        runs_left = max(0, self._total - self._done)
        per_run = (self._last_finish - self._runs_began) / self._timed
        since = now - self._last_finish
        left = max(per_run * runs_left - since, per_run * (runs_left - 1)) if runs_left else 0.0
        return f"about {duration(left)} left"

    def _emit(self, now: float, what: str, left: str | None) -> None:
        self._last_line = now
        self.log(f"[{duration(now - self._t0)}] {what}" + (f" · {left}" if left else ""))

    def _beat_until_stopped(self) -> None:
        while True:
            with self._lock:
                wait = max(0.05, self._last_line + self.every - self.clock())
            if self._stop.wait(wait):
                return
            self.beat()
