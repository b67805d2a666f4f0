"""Refreshing cached verdicts after pushes, off the request path (the push answers at once;
reads meanwhile compute stale verdicts in memory)."""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger


class VerdictRefresher:
    """Refreshes cached verdicts after pushes, off the request path: pushes hand over the
    experiments they touched; one thread recomputes them once pushes have paused for `delay_s`
    (at most `max_wait_s` after the first), so a burst of pushes costs one pass, not one each."""

    def __init__(self, led: Ledger, delay_s: float = 0.5, max_wait_s: float = 10.0):
        self.led, self.delay_s, self.max_wait_s = led, delay_s, max_wait_s
        self._last = 0.0
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._thread: threading.Thread | None = None

    def schedule(self, exp_ids) -> None:
        exp_ids = set(exp_ids)
        if not exp_ids:
            return
        with self._lock:
            self._pending |= exp_ids
            self._last = time.monotonic()
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="verdict-refresher", daemon=True)
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        try:                       # Linux: this thread yields the CPU to request handlers
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                break
            first = time.monotonic()
            while not self._stop:                        # let a burst of pushes land first
                quiet = time.monotonic() - self._last
                if quiet >= self.delay_s or time.monotonic() - first >= self.max_wait_s:
                    break
                time.sleep(min(self.delay_s - quiet, 0.1) if quiet < self.delay_s else 0.01)
            with self._lock:
                todo, self._pending = self._pending, set()
            try:
                self.led.refresh_verdicts(sorted(todo))
            except Exception:                            # the cache stays stale; reads compute in memory
                logging.getLogger("quantatlas.web").exception("verdict refresh failed")
            with self._lock:
                if not self._pending:
                    self._idle.set()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        return self._idle.wait(timeout)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
