"""Small helpers that read napari layers into what ``usfm_core`` functions take.

No model logic here: frame access, spacing and label bookkeeping only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def n_frames(layer: Any) -> int:
    """Number of frames of an image layer: 1 for a 2-D (or RGB 2-D) image, else axis 0."""
    spatial = 3 if getattr(layer, "rgb", False) else 2
    return 1 if layer.data.ndim <= spatial else int(layer.data.shape[0])


def frame_getter(layer: Any) -> Callable[[int], np.ndarray]:
    """``get(i) -> (H, W)`` grey frame ``i`` (uint8/float as stored; RGB is converted).

    Lazily indexes the layer's data, so a long cine is never loaded whole.
    """
    rgb = bool(getattr(layer, "rgb", False))
    data = layer.data

    def get(i: int) -> np.ndarray:
        arr = np.asarray(
            data if n_frames(layer) == 1 and data.ndim == (3 if rgb else 2) else data[int(i)]
        )
        if rgb:
            arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        if arr.dtype != np.uint8:
            lo, hi = float(np.min(arr)), float(np.max(arr))
            arr = ((arr - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)
        return arr

    return get


def spacing_mm(layer: Any) -> tuple[float, float] | None:
    """``(dy, dx)`` in mm from the layer's scale when its units are mm (else None)."""
    meta = getattr(layer, "metadata", {}) or {}
    if meta.get("spacing_mm"):
        dy, dx = meta["spacing_mm"][:2]
        return float(dy), float(dx)
    units = getattr(layer, "units", None)
    if units is not None and str(units[-1]) in ("mm", "millimeter"):
        return float(layer.scale[-2]), float(layer.scale[-1])
    return None


def current_frame(viewer: Any, layer: Any) -> int:
    """Index of the frame shown for ``layer`` (0 for single images)."""
    if n_frames(layer) == 1:
        return 0
    axis0 = viewer.dims.ndim - (layer.data.ndim - (1 if getattr(layer, "rgb", False) else 0))
    return int(viewer.dims.current_step[axis0])


def geometry_kwargs(layer: Any) -> dict[str, Any]:
    """``scale`` / ``translate`` / ``units`` / ``axis_labels`` to add an aligned layer."""
    ndim = layer.data.ndim - (1 if getattr(layer, "rgb", False) else 0)
    kw: dict[str, Any] = {
        "scale": tuple(layer.scale)[-ndim:],
        "translate": tuple(layer.translate)[-ndim:],
    }
    for attr in ("units", "axis_labels"):
        value = getattr(layer, attr, None)
        if value is not None:
            kw[attr] = tuple(str(v) for v in value)[-ndim:]
    return kw


def frame_geometry(layer: Any) -> dict[str, Any]:
    """Like :func:`geometry_kwargs` but for a single 2-D frame of ``layer``."""
    kw = geometry_kwargs(layer)
    return {k: tuple(v)[-2:] for k, v in kw.items()}


def labelled_frames(labels: Any) -> list[int]:
    """Indices of the frames of a Labels layer with any painted pixel (``[0]`` for 2-D)."""
    data = labels.data
    if data.ndim == 2:
        return [0] if np.any(np.asarray(data)) else []
    return [i for i in range(data.shape[0]) if np.any(np.asarray(data[i]))]


# Prediction and reference must never share a colour: napari draws label 1 of every Labels
# layer in the same red by default.
# Predicted classes 1, 2, 3, … in these colours (further classes in white); references in yellow.
PREDICTION_COLORS = ("cyan", "magenta", "lime", "orange", "dodgerblue", "pink")
REFERENCE_COLOR = "yellow"


def prediction_colormap() -> Any:
    """Labels colormap for model predictions: class k in ``PREDICTION_COLORS[k - 1]``."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[Any, str] = {None: "white", 0: "transparent"}
    colors.update({k + 1: c for k, c in enumerate(PREDICTION_COLORS)})
    return DirectLabelColormap(color_dict=colors)


def reference_colormap() -> Any:
    """Labels colormap for reference annotations: every label in ``REFERENCE_COLOR``."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: REFERENCE_COLOR, 0: "transparent"})
