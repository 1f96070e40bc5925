"""The :class:`Scan` returned by :func:`usfm_core.io.load_scan` and its lazy frame array.

A scan is a stack of ``T`` frames, ``(T, H, W)`` gray or ``(T, H, W, 3)`` RGB, plus calibration
(pixel size in mm, frame rate or slice spacing) and source metadata. Frames are decoded only
when asked for, through a small :class:`FrameSource` that each format implements, so opening a
long cine to show frame 0 costs one frame of decoding.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from usfm_core.errors import ScanReadError
from usfm_core.io.checks import sanitize_frame, valid_fps, valid_length_mm, valid_spacing

KINDS = ("image", "cine", "volume")


class FrameSource(Protocol):
    """What a format reader provides: decode one frame on demand."""

    def read(self, index: int) -> np.ndarray:
        """Return frame ``index`` (0-based, already range-checked) as (H, W) or (H, W, 3)."""

    def close(self) -> None:
        """Release file handles / decoders (further reads may reopen them)."""


class LazyFrames:
    """Array-like view ``(T, H, W[, 3])`` of a scan's frames that decodes on indexing.

    Supports ``shape``, ``dtype``, ``ndim``, ``size``, ``len()``, and ``[...]`` with ints,
    slices, integer lists/arrays and Ellipsis on the frame axis (the other axes are indexed
    with NumPy after decoding), so napari and ``dask.array.from_array`` can use it directly.
    ``np.asarray(frames)`` reads everything.
    """

    def __init__(
        self,
        source: FrameSource,
        shape: tuple[int, ...],
        dtype: np.dtype,
        path: str | Path | None = None,
    ):
        self._source = source
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.path = Path(path) if path is not None else None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyFrames(shape={self.shape}, dtype={self.dtype})"

    def _frame(self, index: int) -> np.ndarray:
        """Decode frame ``index`` (negative allowed), shape ``shape[1:]``."""
        n = self.shape[0]
        if not -n <= index < n:
            raise IndexError(f"frame index {index} out of range for {n} frames")
        index %= n
        frame = np.asarray(self._source.read(index))
        where = self.path if self.path is not None else "scan"
        if frame.shape != self.shape[1:]:
            raise ScanReadError(
                f"frame {index} decodes to shape {frame.shape}, the header says {self.shape[1:]}",
                path=where,
                hint="the file's header contradicts its pixel data (corrupt); re-export it",
            )
        if frame.dtype != self.dtype:
            if not np.can_cast(frame.dtype, self.dtype, casting="safe"):
                raise ScanReadError(
                    f"frame {index} decodes to {frame.dtype}, the header says {self.dtype}",
                    path=where,
                    hint="the file's header contradicts its pixel data (corrupt); re-export it",
                )
            frame = frame.astype(self.dtype)
        return sanitize_frame(where, index, frame)

    def _expand(self, key: Any) -> tuple[Any, ...]:
        """Normalise an index to a tuple without Ellipsis (missing axes become ``:``)."""
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            used = sum(1 for k in key if k is not None and k is not Ellipsis)
            fill = (slice(None),) * (self.ndim - used)
            key = key[:i] + fill + key[i + 1 :]
        if any(k is None for k in key):
            raise IndexError("LazyFrames does not support np.newaxis; index np.asarray(...)")
        return key

    def __getitem__(self, key: Any) -> np.ndarray:
        key = self._expand(key)
        if not key:
            return np.asarray(self)
        first, rest = key[0], key[1:]
        try:
            index = operator.index(first)
        except TypeError:
            index = None
        if index is not None:
            out = self._frame(index)
            return out[rest] if rest else out
        if isinstance(first, slice):
            indices = range(*first.indices(self.shape[0]))
        else:
            arr = np.asarray(first)
            if arr.dtype == bool:
                arr = np.flatnonzero(arr)
            indices = [int(i) for i in arr.ravel()]
        frames = [self._frame(i)[rest] if rest else self._frame(i) for i in indices]
        if frames:
            return np.stack(frames)
        # An empty selection still has the right trailing shape.
        probe = np.empty(self.shape[1:], self.dtype)
        return np.empty((0, *probe[rest].shape), self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.shape[0]):
            yield self._frame(i)


@dataclass(eq=False)
class Scan:
    """One opened scan: geometry, calibration, metadata and lazily decoded frames.

    Attributes:
        path: the file or folder it came from.
        kind: ``"image"`` (one frame), ``"cine"`` (frames over time) or ``"volume"`` (slices).
        format: ``"dicom" | "video" | "tiff" | "image" | "folder" | "nifti"``.
        shape: ``(T, H, W)`` or ``(T, H, W, 3)`` (T = 1 for a single image).
        dtype: pixel dtype of the decoded frames (uint8, uint16, float32 ...).
        is_rgb: True when frames are ``(H, W, 3)`` RGB.
        spacing_mm: ``(dy, dx)`` pixel size in mm, or None when the source is uncalibrated
            (values outside ``[1e-4, 100]`` mm, NaN or inf are dropped with a warning).
        slice_spacing_mm: distance between slices in mm (volumes), else None (same bounds).
        fps: frames per second (cines), else None (must be in ``(0, 10000]``).
        metadata: source metadata (tags, codec, ...), JSON-friendly values.
    """

    path: Path
    kind: str
    format: str
    shape: tuple[int, ...]
    dtype: np.dtype
    is_rgb: bool
    source: FrameSource = field(repr=False)
    spacing_mm: tuple[float, float] | None = None
    slice_spacing_mm: float | None = None
    fps: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.shape = tuple(int(s) for s in self.shape)
        self.dtype = np.dtype(self.dtype)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        # Every reader's calibration passes the same plausibility checks (warn + drop).
        self.spacing_mm = valid_spacing(self.path, self.spacing_mm)
        self.slice_spacing_mm = valid_length_mm(self.path, self.slice_spacing_mm, "slice spacing")
        self.fps = valid_fps(self.path, self.fps)
        self._frames = LazyFrames(self.source, self.shape, self.dtype, path=self.path)

    @property
    def n_frames(self) -> int:
        """Number of frames (slices for a volume)."""
        return self.shape[0]

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """``(H, W)`` or ``(H, W, 3)``."""
        return self.shape[1:]

    @property
    def frames(self) -> LazyFrames:
        """Lazy ``(T, H, W[, 3])`` array-like; indexing decodes only the frames asked for."""
        return self._frames

    def frame(self, index: int) -> np.ndarray:
        """Decode frame ``index``: ``(H, W)`` or ``(H, W, 3)`` of :attr:`dtype`."""
        return self._frames[int(index)]

    def iter_frames(self) -> Iterator[np.ndarray]:
        """Yield the frames one by one, ``(H, W)`` or ``(H, W, 3)``, decoding as it goes."""
        yield from self._frames

    def to_gray(self, index: int) -> np.ndarray:
        """Frame ``index`` as a single-channel ``(H, W)`` image.

        uint8 RGB frames use the ITU-R 601 luma weights (OpenCV) and stay uint8; other dtypes
        are converted to float32 with the same weights. Gray frames are returned as is.
        """
        img = self.frame(index)
        if img.ndim == 2:
            return img
        if img.dtype == np.uint8:
            import cv2

            return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return img.astype(np.float32) @ weights

    def close(self) -> None:
        """Release the underlying file handles (frames can still be read; they reopen)."""
        self.source.close()

    def __enter__(self) -> Scan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (no pixel data), as printed by ``usfm-core info``."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "format": self.format,
            "shape": list(self.shape),
            "n_frames": self.n_frames,
            "dtype": str(self.dtype),
            "is_rgb": self.is_rgb,
            "spacing_mm": list(self.spacing_mm) if self.spacing_mm else None,
            "slice_spacing_mm": self.slice_spacing_mm,
            "fps": self.fps,
        }
