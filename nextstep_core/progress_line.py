"""The command line's progress line: tokens done/total, tokens per second, elapsed time and ETA.

A run can take minutes, so a bare counter is not enough. The speed estimate is the one the graph
editor's status line uses (web/nextstep_logic.js, trackProgress): measured over the last 20 s or
the later half of the pass, whichever is longer, so a slow first token (warm-up, compile) or a
short pause does not make the ETA jump, while a real change of speed still shows within seconds.
On a terminal the line is rewritten in place; into a file or pipe a plain line is written now and
then, so logs stay readable.

On a GPU the token callback runs when a token is queued, not when it is computed (the loop never
waits for the device). So the times the rate is measured from are read only when a line is
written, after `sync` waited for the device: the speed counts work done, and the device is waited
for once per line (at most four times a second), never per token.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TextIO

WINDOW_S = 20.0        # the rate covers at least this much of the recent past
TTY_INTERVAL_S = 0.25  # a terminal line is repainted at most this often
PLAIN_INTERVAL_S = 10.0  # a log gets a new line at most this often


def format_count(n: float) -> str:
    """1024 -> "1,024" (the grouping the status line in the graph editor uses)."""
    return f"{round(n):,}"


def format_duration(seconds: Optional[float]) -> str:
    """0:07, 12:34, 1:02:03; "—" when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "—"
    s = round(seconds)
    h, m = s // 3600, (s % 3600) // 60
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def format_rate(rate: Optional[float]) -> str:
    """3 significant digits below 100 tok/s, whole numbers above; "—" when unknown."""
    if rate is None or rate != rate or rate == float("inf"):
        return "—"
    if rate >= 100:
        return format_count(rate)
    return f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}"


@dataclass
class RateTracker:
    """Token rate of one pass from (time, tokens done) samples; a smaller count or another total
    starts a new pass."""
    window_s: float = WINDOW_S
    total: int = 0
    done: int = 0
    first_t: Optional[float] = None
    samples: list = field(default_factory=list)

    def starts_pass(self, done: int, total: int) -> bool:
        return self.first_t is None or total != self.total or done < self.done

    def add(self, done: int, total: int, t: float) -> bool:
        """Record one sample; True when it starts a new pass."""
        if self.starts_pass(done, total):
            self.total, self.done, self.first_t, self.samples = total, done, t, [(t, done)]
            return True
        if done == self.done:
            return False
        self.done = done
        self.samples.append((t, done))
        horizon = t - max(self.window_s, (t - self.first_t) / 2)
        cut = next(i for i, (ts, _) in enumerate(self.samples) if ts >= horizon)
        if cut > 1:  # keep the newest sample before the window as its start
            del self.samples[: cut - 1]
        return False

    @property
    def rate(self) -> Optional[float]:
        """Tokens per second, or None before two distinct samples exist."""
        if len(self.samples) < 2:
            return None
        (ta, va), (tb, vb) = self.samples[0], self.samples[-1]
        return (vb - va) / (tb - ta) if tb > ta and vb > va else None

    @property
    def eta(self) -> Optional[float]:
        """Seconds left at the current rate (0 when done, None while unknown)."""
        if self.total and self.done >= self.total:
            return 0.0
        rate = self.rate
        return (self.total - self.done) / rate if rate else None


def progress_text(done: int, total: int, rate: Optional[float], elapsed: float, eta: Optional[float]) -> str:
    """"412/1,024 tokens · 31.2 tok/s · 0:13 elapsed · ETA 0:20" ("done" instead of the ETA at the end)."""
    tail = "done" if total and done >= total else f"ETA {format_duration(eta)}"
    return (f"{format_count(done)}/{format_count(total)} tokens · {format_rate(rate)} tok/s · "
            f"{format_duration(elapsed)} elapsed · {tail}")


class ProgressLine:
    """`callback(done, total, tokens)` for `NextStepPipeline.run` that reports on `stream`.

    quiet: report nothing. tty: rewrite one line in place (default: whether `stream` is a
    terminal); otherwise write a plain line at most every PLAIN_INTERVAL_S, and always the last.
    passes: how many passes follow one another (storyboard panels): each line then starts with
    "panel k/n". sync: waits for the device before a line's time is read (None: nothing to wait
    for, as on the CPU). Elapsed time counts from construction, so prompt encoding and reasoning
    are included."""

    def __init__(self, stream: Optional[TextIO] = None, *, quiet: bool = False, tty: Optional[bool] = None,
                 passes: Optional[int] = None, clock: Callable[[], float] = time.monotonic,
                 sync: Optional[Callable[[], None]] = None):
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.clock = clock
        self.started = clock()
        self.tracker = RateTracker()
        self.last_write: Optional[float] = None
        self.width = 0  # characters of the line now on the terminal
        self.passes = passes
        self.pass_no = 0
        self.sync = sync

    def __call__(self, done: int, total: int, _tokens=None) -> None:
        if self.quiet:
            return
        now = self.clock()
        if self.tracker.starts_pass(done, total):
            self.pass_no += 1
            self.last_write = None  # a new panel is reported at once
        last = total > 0 and done >= total
        interval = TTY_INTERVAL_S if self.tty else PLAIN_INTERVAL_S
        if not last and self.last_write is not None and now - self.last_write < interval:
            return
        if self.sync is not None:
            self.sync()
            now = self.clock()
        self.tracker.add(done, total, now)
        self.last_write = now
        text = progress_text(done, total, self.tracker.rate, now - self.started, self.tracker.eta)
        if self.passes:
            text = f"panel {self.pass_no}/{self.passes} · {text}"
        if self.tty:
            pad = " " * max(0, self.width - len(text))  # blank out the rest of a longer earlier line
            self.width = len(text)
            self.stream.write(f"\r{text}{pad}" + ("\n" if last else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
