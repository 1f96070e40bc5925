"""CPU thread policy: how many threads torch (and the fused scan kernels) use.

On a machine shared with other busy processes, more threads than free cores is the worst
choice: OpenMP-style parallel loops end in barriers, and a thread whose core is taken by a
neighbour makes every other thread wait for its time slice (measured here: the ``torch`` scan
backend ran up to 10× slower with 2 threads on 2 busy cores, see docs/benchmarks/scan.md).

:func:`pick_threads` therefore takes the cores this process may run on
(``os.sched_getaffinity``) minus those already busy (the 1-minute load average), rounded,
and at least 1.  :func:`apply_threads` sets torch's intra-op threads to that (or to an explicit
count: ``usfm-core --threads N`` always wins); the C and numba scan kernels follow torch's
setting on every call (numba's capped by its pool).  An explicit ``OMP_NUM_THREADS`` or
``USFM_THREADS`` in the environment is honoured as the user's choice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

__all__ = ["ENV_VAR", "apply_threads", "available_cores", "busy_cores", "pick_threads"]

ENV_VAR = "USFM_THREADS"
log = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (affinity mask, else ``os.cpu_count()``), ≥ 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def busy_cores() -> float:
    """Runnable processes on the machine, averaged over the last minute (0 if unknown)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # Windows
        return 0.0


def pick_threads(cores: int | None = None, load: float | None = None) -> int:
    """Threads for compute: ``min(cores, max(1, round(cores − load)))``.

    ``cores`` defaults to :func:`available_cores`, ``load`` to :func:`busy_cores`.  The load
    average may count this process itself when it is already busy; call this before heavy work
    (the CLI does, at start-up).
    """
    cores = available_cores() if cores is None else max(1, int(cores))
    load = busy_cores() if load is None else max(0.0, float(load))
    return min(cores, max(1, round(cores - load)))


def _env_threads() -> int | None:
    """An explicit thread count from ``USFM_THREADS`` or ``OMP_NUM_THREADS`` (else None)."""
    for name in (ENV_VAR, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                log.warning("ignoring %s=%r: not an integer", name, value)
    return None


def apply_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads`` if given, else the environment's
    (``USFM_THREADS``/``OMP_NUM_THREADS``), else :func:`pick_threads`.  Returns the count.

    The C and numba scan backends read torch's count on each call, so this one setting covers
    all three.
    If torch is not imported yet, only ``OMP_NUM_THREADS`` is set (torch reads it when it
    starts), so commands that never need torch do not pay for importing it.
    """
    n = threads if threads is not None else _env_threads()
    source = "explicit" if n is not None else "auto"
    if n is None:
        n = pick_threads()
    n = max(1, int(n))
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = str(n)
    else:
        torch.set_num_threads(n)
    log.debug("threads: %d (%s; %d cores, load %.1f)", n, source, available_cores(), busy_cores())
    return n


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: unchanged), then restore
    the previous count (for library calls that take a ``threads`` argument)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
