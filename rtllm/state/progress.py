"""Progress of a long phase (pretraining, sampling, evaluation, ...) with the time left.

On a terminal: a tqdm bar. Elsewhere (a log file, CI): one line every `every_s` seconds, and
one at the end, each with the count, the rate and an estimate of the time left, so that a
minutes-long phase is never silent. Lives in the lowest room (it needs neither torch nor
files) so that every room above can use it.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

LINE_EVERY_S = 10.0


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """`update(n, **shown)` after each unit of work; `close()` at the end (or use `with`).

    total: units of the whole phase; initial: units already done (a resumed run); shown values
    (loss=...) are appended to the bar or the line. `enabled=False` prints nothing.
    """

    def __init__(self, total: int, desc: str, *, initial: int = 0, unit: str = "step",
                 stream: TextIO | None = None, every_s: float = LINE_EVERY_S, enabled: bool = True,
                 is_terminal: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be an int >= 0, got {total!r}")
        if not every_s > 0:
            raise ValueError(f"every_s must be positive, got {every_s!r}")
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self._initial, self._every_s, self._clock = initial, every_s, clock
        self._stream = stream if stream is not None else sys.stderr
        self._shown: dict[str, object] = {}
        self._enabled, self._closed = enabled, False
        self._start = self._last_line = clock()
        terminal = is_terminal if is_terminal is not None else _isatty(self._stream)
        self._bar = None
        if enabled and terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self._stream,
                             dynamic_ncols=True)

    def update(self, n: int = 1, **shown: object) -> None:
        self.done += n
        self._shown.update(shown)
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if shown:
                self._bar.set_postfix({k: _fmt(v) for k, v in self._shown.items()}, refresh=False)
            return
        now = self._clock()
        if now - self._last_line >= self._every_s and self.done < self.total:
            self._last_line = now
            self._print(self.line(now))

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left at the rate so far; None before any unit of this session is done."""
        now = self._clock() if now is None else now
        new = self.done - self._initial
        if new <= 0:
            return None
        return (now - self._start) / new * max(0, self.total - self.done)

    def line(self, now: float | None = None) -> str:
        now = self._clock() if now is None else now
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = self.eta_s(now)
        left = "" if eta is None or self.done >= self.total else f", about {_duration(eta)} left"
        shown = "".join(f", {k} {_fmt(v)}" for k, v in self._shown.items())
        units = self.unit + ("es" if self.unit.endswith("s") else "s")
        return (f"{self.desc}: {self.done}/{self.total} {units}{pct}, "
                f"{_duration(now - self._start)} elapsed{left}{shown}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elif self.done > self._initial:  # the last line: where the phase ended and how long it took
            self._print(self.line())

    def _print(self, text: str) -> None:
        print(text, file=self._stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
