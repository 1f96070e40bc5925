"""TIFF / OME-TIFF / ImageJ stack reader, one page decoded per frame.

Calibration: ImageJ metadata (resolution + ``unit``, ``spacing`` for slices, ``finterval`` or
``fps`` for time), OME-XML (PhysicalSizeX/Y/Z with units, TimeIncrement), else the TIFF
resolution tags when their unit is centimetre (inch resolutions are nearly always a screen
DPI, not a physical pixel size, so they are ignored).
"""

from __future__ import annotations

import threading
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from usfm_core.errors import ScanReadError, ScanWarning
from usfm_core.io.checks import check_decoded_size
from usfm_core.io.scan import Scan

TIFF_EXTENSIONS = (".tif", ".tiff", ".ome.tif", ".ome.tiff")

# Length units -> millimetres (ImageJ and OME spellings).
_TO_MM = {
    "mm": 1.0,
    "millimeter": 1.0,
    "cm": 10.0,
    "centimeter": 10.0,
    "m": 1000.0,
    "meter": 1000.0,
    "um": 1e-3,
    "µm": 1e-3,
    "\u03bcm": 1e-3,  # Greek mu, also seen in the wild
    "micron": 1e-3,
    "micrometer": 1e-3,
    "nm": 1e-6,
    "inch": 25.4,
}
_TIME_TO_S = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "min": 60.0, "h": 3600.0}


class TiffFrames:
    """Frame source keeping one ``tifffile.TiffFile`` open; frame ``i`` = page ``i``."""

    def __init__(self, path: Path, n_frames: int, frame_shape: tuple[int, ...]):
        self.path = path
        self.n_frames = n_frames
        self.frame_shape = frame_shape
        self._tif = None
        self._memmap = None
        self._lock = threading.Lock()

    def _pages(self):
        import tifffile

        if self._tif is None:
            self._tif = tifffile.TiffFile(str(self.path))
        return self._tif.series[0].pages

    def read(self, index: int) -> np.ndarray:
        """Page ``index`` as (H, W) or (H, W, 3)."""
        with self._lock:
            pages = self._pages()
            try:
                if len(pages) >= self.n_frames:
                    arr = pages[index].asarray()
                else:
                    # ImageJ files > 4 GB hold one IFD for contiguous data: memory-map it.
                    arr = self._contiguous()[index]
            except Exception as exc:
                raise ScanReadError(
                    f"cannot decode TIFF page {index}: {exc}",
                    path=self.path,
                    hint="the file may be truncated or use an unsupported compression; re-save it",
                ) from exc
        return _to_frame(np.asarray(arr))

    def _contiguous(self) -> np.ndarray:
        import tifffile

        if self._memmap is None:
            data = tifffile.memmap(str(self.path), series=0, mode="r")
            self._memmap = data.reshape(self.n_frames, *self.frame_shape)
        return self._memmap

    def close(self) -> None:
        with self._lock:
            if self._tif is not None:
                self._tif.close()
                self._tif = None
            self._memmap = None


def _to_frame(arr: np.ndarray) -> np.ndarray:
    """A decoded page as (H, W) or (H, W, 3): planar (S, H, W) moved last, alpha dropped."""
    arr = np.squeeze(arr) if arr.ndim > 3 else arr
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3:
        arr = arr[..., :3]
    return arr


def _ome_calibration(xml: str) -> dict[str, float]:
    """``dx``, ``dy``, ``dz`` (mm) and ``dt`` (s) from OME-XML's first Pixels element."""
    root = ET.fromstring(xml)
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    out: dict[str, float] = {}
    if pixels is None:
        return out
    for axis in ("X", "Y", "Z"):
        size = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if size and unit in _TO_MM and float(size) > 0:
            out[f"d{axis.lower()}"] = float(size) * _TO_MM[unit]
    dt = pixels.get("TimeIncrement")
    if dt and float(dt) > 0:
        out["dt"] = float(dt) * _TIME_TO_S.get(pixels.get("TimeIncrementUnit", "s"), 1.0)
    return out


def _resolution(page: Any) -> tuple[float, float] | None:
    """Pixels per unit ``(y, x)`` from the page's resolution tags, or None."""
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    xn, xd = tags["XResolution"].value
    yn, yd = tags["YResolution"].value
    if not (xn and xd and yn and yd):
        return None
    return yn / yd, xn / xd


def _calibration(
    tif: Any,
) -> tuple[tuple[float, float] | None, float | None, float | None, dict[str, Any]]:
    """``(spacing_mm (dy, dx), slice_spacing_mm, fps, metadata)`` of an opened TiffFile."""
    page = tif.pages[0]
    res = _resolution(page)
    spacing = slice_spacing = fps = None
    meta: dict[str, Any] = {}
    if tif.is_imagej and tif.imagej_metadata:
        ij = tif.imagej_metadata
        meta["imagej"] = {k: v for k, v in ij.items() if isinstance(v, (int, float, str, bool))}
        scale = _TO_MM.get(str(ij.get("unit", "")).replace("\\u00B5", "µ"))
        if scale and res:
            spacing = (scale / res[0], scale / res[1])
        if scale and ij.get("spacing"):
            slice_spacing = float(ij["spacing"]) * scale
        if ij.get("finterval"):
            fps = 1.0 / float(ij["finterval"])
        elif ij.get("fps"):
            fps = float(ij["fps"])
    elif tif.is_ome and tif.ome_metadata:
        ome = _ome_calibration(tif.ome_metadata)
        meta["ome"] = ome
        if "dx" in ome and "dy" in ome:
            spacing = (ome["dy"], ome["dx"])
        slice_spacing = ome.get("dz")
        fps = 1.0 / ome["dt"] if "dt" in ome else None
    elif res and "ResolutionUnit" in page.tags and int(page.tags["ResolutionUnit"].value) == 3:
        spacing = (10.0 / res[0], 10.0 / res[1])  # pixels per cm -> mm per pixel
    return spacing, slice_spacing, fps, meta


def _safe_calibration(
    tif: Any, path: Path
) -> tuple[tuple[float, float] | None, float | None, float | None, dict[str, Any]]:
    """:func:`_calibration`, but malformed calibration metadata only warns (uncalibrated)."""
    try:
        return _calibration(tif)
    except Exception as exc:  # bad ImageJ / OME / resolution values: many error types
        warnings.warn(
            f"{path}: ignoring malformed TIFF calibration metadata ({exc!r:.80}); "
            "the scan is uncalibrated",
            ScanWarning,
            stacklevel=3,
        )
        return None, None, None, {}


def read_tiff(path: Path) -> Scan:
    """Open a TIFF stack as a lazy :class:`Scan` (one page per frame)."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            axes, shape, dtype = series.axes, tuple(series.shape), series.dtype
            spacing, slice_spacing, fps, meta = _safe_calibration(tif, path)
            n_pages = len(series.pages)
    except ScanReadError:
        raise
    except Exception as exc:
        raise ScanReadError(
            f"cannot read TIFF: {exc}",
            path=path,
            hint="the file is corrupt or truncated; re-save it",
        ) from exc
    if "Y" not in axes or "X" not in axes or not axes.endswith(("YX", "YXS", "SYX")):
        raise ScanReadError(
            f"TIFF series has axes {axes!r} {shape}; expected frames of (Y, X[, S]) pixels",
            path=path,
            hint="re-save it as a plain or ImageJ stack of 2-D images (e.g. with Fiji)",
        )
    if "S" in axes and shape[axes.index("S")] not in (1, 3, 4):
        raise ScanReadError(
            f"TIFF pixels have {shape[axes.index('S')]} samples; only gray, RGB or RGBA are read",
            path=path,
            hint="save the channels as separate gray stacks, or convert to RGB",
        )
    rgb = "S" in axes and shape[axes.index("S")] in (3, 4)
    spatial = sum(1 for a in axes if a in "YXS")
    n = int(np.prod(shape[: len(shape) - spatial], dtype=object)) if len(shape) > spatial else 1
    if n < 1 or 0 in shape:
        raise ScanReadError("TIFF holds zero frames", path=path, hint="re-save it")
    height, width = shape[axes.index("Y")], shape[axes.index("X")]
    meta.update(axes=axes, pages=n_pages)
    frame_shape = (height, width, shape[axes.index("S")]) if rgb else (height, width)
    check_decoded_size(path, n, frame_shape, np.dtype(dtype).itemsize)
    is_volume = "Z" in axes or (slice_spacing is not None and fps is None and n > 1)
    kind = "image" if n == 1 else "volume" if is_volume else "cine"
    return Scan(
        path=path,
        kind=kind,
        format="tiff",
        shape=(n, height, width, 3) if rgb else (n, height, width),
        dtype=dtype,
        is_rgb=rgb,
        source=TiffFrames(path, n, frame_shape),
        spacing_mm=spacing,
        slice_spacing_mm=slice_spacing if kind == "volume" else None,
        fps=fps if kind == "cine" else None,
        metadata=meta,
    )
