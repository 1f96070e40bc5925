"""Writers: Labels layers to TIFF / PNG (stack) / NIfTI, keeping the spacing in mm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _spacing(meta: dict[str, Any]) -> tuple[float, float] | None:
    scale = meta.get("scale")
    units = meta.get("units")
    if scale is None or len(scale) < 2:
        return None
    if units is not None and str(units[-1]) not in ("mm", "millimeter"):
        return None
    return float(scale[-2]), float(scale[-1])


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save one Labels layer. ``.tif/.tiff`` (ImageJ, spacing kept), ``.png`` (one file per
    frame for stacks: ``name_0000.png`` …), ``.nii/.nii.gz`` (spacing kept)."""
    from usfm_core.io.writers import write_image, write_nifti, write_tiff

    arr = np.asarray(data)
    if arr.max(initial=0) > 255:
        arr = arr.astype(np.uint16)
    else:
        arr = arr.astype(np.uint8)
    out = Path(path)
    spacing = _spacing(meta)
    name = out.name.lower()
    if name.endswith((".tif", ".tiff")):
        return [str(write_tiff(out, arr if arr.ndim == 3 else arr[None], spacing_mm=spacing))]
    if name.endswith((".nii", ".nii.gz")):
        vol = arr if arr.ndim == 3 else arr[None]
        sz = (1.0, *(spacing or (1.0, 1.0)))
        return [str(write_nifti(out, vol, spacing_mm=sz))]
    if name.endswith(".png"):
        if arr.ndim == 2:
            return [str(write_image(out, arr))]
        stem = out.with_suffix("")
        return [str(write_image(f"{stem}_{i:04d}.png", frame)) for i, frame in enumerate(arr)]
    return []
