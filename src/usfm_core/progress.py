"""Progress display for long commands: a bar on a terminal, a few plain lines in logs.

:func:`progress_bar` returns an object with tqdm's small everyday API (``update``,
``set_postfix_str``, ``set_description``, ``total``, ``n``, ``close``, context manager):

- on a terminal (``stream.isatty()``): a tqdm bar with count, rate and ETA;
- otherwise (a log file, a pipe, CI): plain lines, at most one every ``interval_s`` seconds
  (``desc: 40/100 frame (40%), 3.1 frame/s, ETA 19 s``) and one summary line at the end
  (``desc: 100 frame in 31.9 s (3.1 frame/s)``), so a log shows the run is alive without
  thousands of carriage-return updates;
- disabled (``enabled=False``, ``--no-progress``): nothing at all.

``$USFM_PROGRESS`` (``bar`` | ``plain`` | ``off``) overrides the automatic choice, e.g.
``USFM_PROGRESS=plain`` for a terminal multiplexer that records its output;
``$USFM_PROGRESS_INTERVAL`` (seconds, default 30) sets the time between plain lines. Core code
only: no napari / Qt.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Generator
from typing import IO, Any

MODES = ("auto", "bar", "plain", "off")
DEFAULT_INTERVAL_S = 30.0


def progress_mode(stream: IO[str] | None = None, mode: str = "auto") -> str:
    """``"bar"``, ``"plain"`` or ``"off"`` for ``stream`` (default: stderr).

    An explicit ``mode`` other than ``"auto"`` wins; else ``$USFM_PROGRESS``; else ``"bar"``
    when the stream is a terminal and ``"plain"`` when it is not.
    """
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        mode = os.environ.get("USFM_PROGRESS", "auto").strip().lower() or "auto"
        if mode not in MODES:
            mode = "auto"
    if mode != "auto":
        return mode
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # closed or exotic streams
        return "plain"


def progress_bar(
    total: int | None = None,
    *,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    stream: IO[str] | None = None,
    mode: str = "auto",
    interval_s: float | None = None,
) -> Any:
    """A progress display for ``total`` items (None: unknown) written to ``stream`` (stderr).

    See the module docstring for the three behaviours. ``interval_s`` is the least time between
    two plain lines (the first comes after ``interval_s`` too: short runs print only the summary;
    default ``$USFM_PROGRESS_INTERVAL`` or 30 s).
    """
    if interval_s is None:
        interval_s = _env_interval()
    chosen = "off" if not enabled else progress_mode(stream, mode)
    if chosen == "bar":
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=desc or None,
            unit=unit,
            initial=initial,
            file=stream if stream is not None else sys.stderr,
            dynamic_ncols=True,
        )
    return PlainProgress(
        total, desc=desc, unit=unit, initial=initial, stream=stream,
        interval_s=interval_s, silent=chosen == "off",
    )  # fmt: skip


def _env_interval() -> float:
    """``$USFM_PROGRESS_INTERVAL`` as seconds ≥ 0, else :data:`DEFAULT_INTERVAL_S`."""
    try:
        value = float(os.environ.get("USFM_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``: durations for log lines."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class PlainProgress:
    """tqdm-like counter that prints a plain line every ``interval_s`` s and a summary at
    :meth:`close` (nothing when ``silent``). Rate = items / wall seconds since creation."""

    def __init__(
        self,
        total: int | None = None,
        *,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        stream: IO[str] | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        silent: bool = False,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = int(initial)
        self.postfix = ""
        self.stream, self.interval_s, self.silent = stream, float(interval_s), silent
        self.start = self._last = time.monotonic()
        self.closed = False

    # --- tqdm's API -------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        """Count ``n`` more items; print a line when ``interval_s`` passed since the last."""
        self.n += n
        now = time.monotonic()
        if not self.silent and now - self._last >= self.interval_s:
            self._last = now
            self._write(self.status_line(now))

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        """Text appended to the next line (e.g. the current file, the loss)."""
        self.postfix = str(text)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw) -> None:
        """``key=value`` pairs appended to the next line (floats with 4 significant digits)."""
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items()
        )

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        """Change the label in front of the lines."""
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw (tqdm compatibility)."""

    def close(self) -> None:
        """Print the summary line once (``desc: N unit in T (rate)``)."""
        if self.closed:
            return
        self.closed = True
        if not self.silent:
            self._write(self.summary_line(time.monotonic()))

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- lines ------------------------------------------------------------------------------
    def rate(self, now: float | None = None) -> float:
        """Items per second since creation (0 before the first item)."""
        elapsed = (now if now is not None else time.monotonic()) - self.start
        done = self.n - self.initial
        return done / elapsed if elapsed > 0 and done > 0 else 0.0

    def status_line(self, now: float | None = None) -> str:
        """``desc: n/total unit (p%), r unit/s, ETA t[, postfix]``."""
        rate = self.rate(now)
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {format_seconds(max(self.total - self.n, 0) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return self._prefix() + ", ".join(parts)

    def summary_line(self, now: float | None = None) -> str:
        """``desc: n unit in t (r unit/s)`` for the end of a run."""
        now = now if now is not None else time.monotonic()
        text = f"{self.n} {self.unit} in {format_seconds(now - self.start)}"
        text += f" ({self.rate(now):.3g} {self.unit}/s)"
        if self.postfix:
            text += f", {self.postfix}"
        return self._prefix() + text

    def _prefix(self) -> str:
        return f"{self.desc}: " if self.desc else ""

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(line, file=stream, flush=True)


def drain(gen: Generator[Any, None, Any], progress: Callable[[Any], None] | None = None) -> Any:
    """Run a progress generator to its end, passing every yielded item to ``progress``; its
    return value (``StopIteration.value``). The blocking form of the ``iter_*`` generators."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(item)
