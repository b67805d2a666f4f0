"""Progress off a terminal: a line per finished arm x seed and at least every 30 s, with elapsed time
and an estimate of what is left; silent when disabled; rich bars on a terminal as before."""
import re
import time

from quantatlas.progress import Progress, duration


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


def logged(clock, **kw):
    lines = []
    bars = Progress(True, terminal=False, log=lines.append, clock=clock, background=False, **kw)
    return bars, lines


def test_durations():
    assert [duration(s) for s in (0, 12.4, 59.6, 60, 245, 3599, 3600, 3725)] == \
        ["0s", "12s", "1m00s", "1m00s", "4m05s", "59m59s", "1h00m", "1h02m"]


def test_disabled_is_silent_and_gives_no_ticks():
    lines = []
    with Progress(False, terminal=False, log=lines.append, background=False) as bars:
        assert bars.task("reference logits", 10) is None
        bars.finished("a", 0, 1.0, 1, 2)
        bars.beat()
    assert lines == []


def test_periodic_lines_come_every_30_seconds_not_more_often():
    clock = Clock()
    bars, lines = logged(clock)
    with bars:
        tick = bars.task("reference logits", 100)
        for _ in range(100):          # one unit per 2 s: 200 s in all
            clock.advance(2)
            tick(1)
    # a line when 30 s have passed since the last one: at 30, 60, ..., 180 s
    assert len(lines) == 6
    stamps = [_stamp(ln) for ln in lines]
    assert stamps == [30, 60, 90, 120, 150, 180]
    # what runs, its count, and the step's own estimate (2 s per unit): at 30 s, 15 done, 85 left = 170 s
    assert lines[0] == "[30s] reference logits 15/100 · about 2m50s left in this step"
    assert lines[-1] == "[3m00s] reference logits 90/100 · about 20s left in this step"


def test_a_line_per_finished_run_with_an_estimate_of_the_rest():
    clock = Clock()
    bars, lines = logged(clock)
    with bars:
        clock.advance(5)
        bars.finished("fp16", 0, done=1, total=5, note="stored")           # stored: not timed
        assert lines[-1] == "[5s] fp16 seed 0 finished stored (1/5 runs)"
        clock.advance(20)
        bars.finished("rtn4", 0, seconds=20, done=2, total=5)
        # one run of 20 s timed, 3 left: about 60 s
        assert lines[-1] == "[25s] rtn4 seed 0 finished in 20s (2/5 runs) · about 1m00s left"
        clock.advance(40)
        bars.finished("gptq4", 0, seconds=40, done=3, total=5)
        # 60 s for 2 runs (from the first run's start at 5 s): 30 s a run, 2 left
        assert lines[-1] == "[1m05s] gptq4 seed 0 finished in 40s (3/5 runs) · about 1m00s left"
        clock.advance(30)
        bars.beat()   # 30 s after the last line: the estimate has come down by what the current run took
        assert lines[-1] == "[1m35s] working · runs 3/5 done · about 30s left"
        clock.advance(29)
        bars.beat()   # 29 s after the last line: nothing
        assert len(lines) == 4
        clock.advance(1)
        bars.beat()   # the current run is over its share: at least the runs after it are left
        assert lines[-1] == "[2m05s] working · runs 3/5 done · about 30s left"
    assert len(lines) == 5


def test_finished_lines_restart_the_30_seconds():
    clock = Clock()
    bars, lines = logged(clock)
    with bars:
        tick = bars.task("a seed 0: quantize", 1000)
        for i in range(100):
            clock.advance(1)
            tick()
            if i in (20, 45):
                bars.finished("a", i, seconds=1.0)
    times = [_stamp(ln) for ln in lines]
    # finished at 21 s and 46 s; periodic lines 30 s after each line: 76 s
    assert times == [21, 46, 76]
    assert all(b - a <= 30 for a, b in zip([0] + times, times + [100]))
    assert lines[0] == "[21s] a seed 20 finished in 1s (1 so far)"


def test_parallel_runs_count_as_they_overlap():
    """Ray: runs finish together; the rate is wall time per finished run, not the sum of their seconds."""
    clock = Clock()
    bars, lines = logged(clock)
    with bars:
        clock.advance(100)
        for i in range(4):            # four runs of 100 s each, in parallel, all started at 0
            bars.finished("a", i, seconds=100, done=i + 1, total=8)
    assert lines[-1] == "[1m40s] a seed 3 finished in 1m40s (4/8 runs) · about 1m40s left"


def test_background_thread_writes_while_the_caller_is_busy():
    lines = []
    with Progress(True, terminal=False, log=lines.append, every=0.1) as bars:
        bars.task("one long step", 10)
        time.sleep(1.0)
    assert 3 <= len(lines) <= 10, lines    # one per 0.1 s at most
    assert all(ln.endswith("one long step 0/10") for ln in lines)


def test_terminal_keeps_the_bars():
    bars = Progress(True, terminal=True)
    assert bars.p is not None and not bars.logging
    with bars:
        tick = bars.task("x", 3)
        tick(2)
        bars.finished("a", 0, 1.0, 1, 1)      # the bars show it; no line
        assert bars.p.tasks[0].completed == 2


def _stamp(line: str) -> int:
    m = re.match(r"\[(?:(\d+)m)?(\d+)s\]", line)
    return 60 * int(m.group(1) or 0) + int(m.group(2))
