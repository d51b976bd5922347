"""Progress of long loops. On a terminal: a tqdm bar. Anywhere else (a log file, a job
scheduler's output): one plain line every 5% of the work or every 30 s, whichever comes first,
so a redirected run writes a few dozen lines instead of thousands of bar redraws."""

from __future__ import annotations

import math
import sys
import time

__all__ = ["Progress", "track"]


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """Counts `total` units of work (None: unknown) under the label `desc`.

    ``update(n)`` adds done units; ``set_postfix(values)`` sets the figures shown beside the
    count (on the bar, and in the next log line); ``close()`` ends it (a last log line if the
    last count was not logged yet). ``enabled=False`` shows nothing (e.g. ranks other than 0).
    Off a terminal, a line is written when the count crosses a multiple of `every` of the
    total, or `seconds` after the previous line."""

    def __init__(self, total=None, desc="", *, initial=0, unit="it", enabled=True, stream=None,
                 every=0.05, seconds=30.0, leave=True):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start = int(initial)
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.postfix: dict = {}
        self.bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                            dynamic_ncols=True, leave=leave)
        self.step = max(1, math.ceil(total * every)) if total else None
        self.seconds = seconds
        self.t0 = self.last_t = time.monotonic()
        self.logged = self.n

    def update(self, n=1):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            crossed = self.step is not None and self.n // self.step > self.logged // self.step
            if crossed or time.monotonic() - self.last_t >= self.seconds:
                self._log()

    def set_postfix(self, values: dict):
        self.postfix = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n != self.logged:
            self._log()
        self.enabled = False

    def _log(self):
        now = time.monotonic()
        elapsed = now - self.t0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {count} {self.unit}" if self.desc else f"{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        done = self.n - self.start
        parts.append(f"{_duration(elapsed)} elapsed")
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s" if rate < 1000 else f"{rate:.0f} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"~{_duration((self.total - self.n) / rate)} left")
        line = ", ".join(parts)
        if self.postfix:
            line += "; " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        print(line, file=self.stream, flush=True)
        self.logged, self.last_t = self.n, now

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def track(iterable, desc="", total=None, **kwargs):
    """Yields the items of `iterable`, counting one unit each (see :class:`Progress`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc, **kwargs) as p:
        for item in iterable:
            yield item
            p.update()
