"""Guards every reader applies, so that no scan lies about its data or exhausts memory.

* **Decoded-size limit**: before a reader allocates pixels it calls :func:`check_decoded_size`
  with the frame count and frame shape read from the header. A scan whose single frame would
  decode to more than ``USFM_MAX_FRAME_MB`` (default 256 MB; ultrasound frames are < 10 MB)
  or whose frames together would need more than ``USFM_MAX_DECODED_MB`` (default 2048 MB) is
  refused with a
  :class:`~usfm_core.errors.DecodedSizeError` naming the file, the size, the limit and how to
  raise it. The limits are read from the environment on every check and can be overridden
  in-process with :func:`set_decoded_limits`.
* **Calibration**: :func:`valid_spacing`, :func:`valid_length_mm` and :func:`valid_fps` drop a
  pixel size / slice step that is NaN, infinite, <= 0 or outside ``[1e-4, 100]`` mm, and a
  frame rate that is not in ``(0, 10000]`` fps, with a :class:`~usfm_core.errors.ScanWarning`
  naming the file: the scan is then uncalibrated, never inf/NaN downstream.
* **Non-finite pixels**: :func:`sanitize_frame` replaces NaN by the frame's smallest finite
  value and +/-inf by its largest / smallest finite value (0 when the frame has none), with a
  warning naming the file, the frame and the count.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from usfm_core.errors import DecodedSizeError, ScanWarning, USFMError

ENV_MAX_DECODED_MB = "USFM_MAX_DECODED_MB"
ENV_MAX_FRAME_MB = "USFM_MAX_FRAME_MB"
DEFAULT_MAX_DECODED_MB = 2048.0
DEFAULT_MAX_FRAME_MB = 256.0

# Physically plausible pixel size / slice step (mm) and frame rate (frames per second).
MIN_SPACING_MM = 1e-4
MAX_SPACING_MM = 100.0
MAX_FPS = 10_000.0

_MB = 1024 * 1024
# In-process overrides set by set_decoded_limits (None: use the environment / default).
_override: dict[str, float | None] = {"total": None, "frame": None}


def _env_mb(name: str, default: float) -> float:
    """A positive size in MB from environment variable ``name``, else ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise USFMError(
            f"environment variable {name}={raw!r} is not a positive number of MB",
            hint=f"set it to e.g. {name}={int(default)}, or unset it for the default",
        )
    return value


def decoded_limits() -> tuple[float, float]:
    """``(max MB for all frames of a scan, max MB for one frame)`` now in force."""
    total = _override["total"] or _env_mb(ENV_MAX_DECODED_MB, DEFAULT_MAX_DECODED_MB)
    frame = _override["frame"] or _env_mb(ENV_MAX_FRAME_MB, DEFAULT_MAX_FRAME_MB)
    return total, frame


def set_decoded_limits(
    total_mb: float | None = None, frame_mb: float | None = None
) -> tuple[float | None, float | None]:
    """Override the decoded-size limits for this process (None: back to env / default).

    Returns the previous overrides, so callers can restore them:
    ``old = set_decoded_limits(8192); ...; set_decoded_limits(*old)``.
    """
    for value in (total_mb, frame_mb):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise USFMError(f"decoded-size limit must be a positive number of MB, got {value}")
    previous = (_override["total"], _override["frame"])
    _override["total"], _override["frame"] = total_mb, frame_mb
    return previous


def _fmt_mb(nbytes: float) -> str:
    """Human size, e.g. ``1.2 GB`` or ``37 MB``."""
    mb = nbytes / _MB
    return f"{mb / 1024:.3g} GB" if mb >= 1024 else f"{mb:.3g} MB"


def check_decoded_size(
    path: str | Path,
    n_frames: int,
    frame_shape: Sequence[int],
    itemsize: int,
) -> int:
    """Raise :class:`DecodedSizeError` if the decoded frames would exceed the limits.

    Args:
        path: the file (named in the message).
        n_frames: number of frames the header declares.
        frame_shape: ``(H, W)`` or ``(H, W, C)`` of one decoded frame.
        itemsize: bytes per sample of the decoded dtype.

    Returns:
        The decoded size of all frames in bytes (Python ints: no overflow for absurd headers).
    """
    frame_bytes = int(itemsize)
    for dim in frame_shape:
        frame_bytes *= int(dim)
    total_bytes = frame_bytes * int(n_frames)
    total_mb, frame_mb = decoded_limits()
    shape = "x".join(str(int(d)) for d in frame_shape)
    if frame_bytes > frame_mb * _MB:
        raise DecodedSizeError(
            f"one frame ({shape}, {itemsize} byte(s) per sample) would decode to "
            f"{_fmt_mb(frame_bytes)}, over the limit of {frame_mb:g} MB per frame",
            path=path,
            hint=f"if the file is genuine, raise the limit: {ENV_MAX_FRAME_MB}=<MB> (or "
            "usfm_core.io.set_decoded_limits(frame_mb=...)); otherwise the header is corrupt",
        )
    if total_bytes > total_mb * _MB:
        raise DecodedSizeError(
            f"{int(n_frames)} frames of {shape} would decode to {_fmt_mb(total_bytes)}, over "
            f"the limit of {total_mb:g} MB per scan",
            path=path,
            hint=f"if the file is genuine, raise the limit: {ENV_MAX_DECODED_MB}=<MB> (or "
            "usfm_core.io.set_decoded_limits(total_mb=...)), or split the scan",
        )
    return total_bytes


def _warn(path: str | Path, message: str) -> None:
    """Emit a :class:`ScanWarning` ``"<path>: <message>"``."""
    warnings.warn(f"{path}: {message}", ScanWarning, stacklevel=3)


def _plausible_mm(value: float) -> bool:
    """True for a finite length in ``[MIN_SPACING_MM, MAX_SPACING_MM]``."""
    return math.isfinite(value) and MIN_SPACING_MM <= value <= MAX_SPACING_MM


def valid_spacing(
    path: str | Path, spacing: Sequence[float] | None, source: str = "pixel spacing"
) -> tuple[float, float] | None:
    """``(dy, dx)`` mm if both are plausible, else None with a warning naming the file."""
    if spacing is None:
        return None
    try:
        dy, dx = (float(v) for v in spacing)
    except (TypeError, ValueError):
        _warn(path, f"ignoring malformed {source} {spacing!r}; the scan is uncalibrated")
        return None
    if _plausible_mm(dy) and _plausible_mm(dx):
        return dy, dx
    _warn(
        path,
        f"ignoring implausible {source} ({dy:g}, {dx:g}) mm (allowed {MIN_SPACING_MM:g} to "
        f"{MAX_SPACING_MM:g} mm); the scan is treated as uncalibrated",
    )
    return None


def valid_length_mm(path: str | Path, value: float | None, source: str) -> float | None:
    """A plausible length in mm (slice step, voxel size), else None with a warning."""
    if value is None:
        return None
    try:
        mm = float(value)
    except (TypeError, ValueError):
        _warn(path, f"ignoring malformed {source} {value!r}")
        return None
    if _plausible_mm(mm):
        return mm
    _warn(
        path,
        f"ignoring implausible {source} {mm:g} mm (allowed {MIN_SPACING_MM:g} to "
        f"{MAX_SPACING_MM:g} mm)",
    )
    return None


def valid_fps(path: str | Path, value: float | None, source: str = "frame rate") -> float | None:
    """A frame rate in ``(0, MAX_FPS]`` frames/s, else None with a warning."""
    if value is None:
        return None
    try:
        fps = float(value)
    except (TypeError, ValueError):
        _warn(path, f"ignoring malformed {source} {value!r}")
        return None
    if math.isfinite(fps) and 0 < fps <= MAX_FPS:
        return fps
    _warn(path, f"ignoring implausible {source} {fps:g} fps (allowed > 0 and <= {MAX_FPS:g})")
    return None


def sanitize_frame(path: str | Path, index: int, frame: np.ndarray) -> np.ndarray:
    """Replace NaN / +-inf in a float frame (any shape) with finite values, warning if any.

    NaN becomes the frame's smallest finite value (background), +inf its largest and -inf its
    smallest; a frame without any finite value becomes all zeros. Integer frames are returned
    unchanged (no copy).
    """
    if frame.dtype.kind != "f":
        return frame
    finite = np.isfinite(frame)
    if finite.all():
        return frame
    bad = int(frame.size - np.count_nonzero(finite))
    out = np.array(frame, copy=True)
    if bad == frame.size:
        out[...] = 0
        _warn(path, f"frame {index} holds no finite value ({bad} NaN/inf pixels); shown as 0")
        return out
    values = frame[finite]
    lo, hi = values.min(), values.max()
    out[np.isnan(frame)] = lo
    out[np.isposinf(frame)] = hi
    out[np.isneginf(frame)] = lo
    _warn(
        path,
        f"frame {index}: {bad} of {frame.size} pixels are NaN/inf; replaced by the frame's "
        f"finite minimum {lo:g} (NaN, -inf) / maximum {hi:g} (+inf)",
    )
    return out
