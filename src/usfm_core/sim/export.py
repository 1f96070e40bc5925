"""Write simulated frames and cines to disk, with their ground truth in a folder of its own.

For ``out/scan.dcm`` the ground truth goes to ``out/ground_truth/scan.dcm/``: ``lesions.tif``
(uint8 labels), ``annotations.tif`` (uint8 0/1), ``region.tif`` (uint8 0/1), ``clean.tif``
(frames without annotations) and ``meta.json``. The folder is named after the scan's full file
name, so ``cine.mp4`` and ``cine.dcm`` each keep their own set, and lies where no scan reader
looks (folder readers are not recursive; ``usfm-core preprocess`` skips ``ground_truth/``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from usfm_core.errors import USFMError
from usfm_core.outputs import GROUND_TRUTH_DIR
from usfm_core.sim.simulate import SimCine, SimFrame
from usfm_core.utils import atomic_write_text

# Accepted file suffixes per format; the first is used when the path has none.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "dicom": (".dcm", ".dicom"),
    "video": (".mp4", ".avi", ".mkv", ".mov", ".m4v"),
    "tiff": (".tif", ".tiff"),
    "png": (".png",),
}
CINE_FORMATS = ("dicom", "video", "tiff")
FRAME_FORMATS = ("png", "tiff", "dicom")


def _target(path: str | Path, format: str, allowed: tuple[str, ...]) -> Path:
    """Check ``format`` and give ``path`` its default suffix when it has none."""
    if format not in allowed:
        raise USFMError(f"cannot export as {format!r}", path=path, hint=f"use one of {allowed}")
    path = Path(path)
    if not path.suffix:
        return path.with_suffix(SUFFIXES[format][0])
    if path.suffix.lower() not in SUFFIXES[format]:
        raise USFMError(
            f"suffix {path.suffix!r} does not match format {format!r}",
            path=path,
            hint=f"use one of {SUFFIXES[format]} or no suffix",
        )
    return path


def ground_truth_dir(path: str | Path) -> Path:
    """Where the ground truth of the scan ``dir/name.ext`` lives: ``dir/ground_truth/name.ext``."""
    path = Path(path)
    return path.parent / GROUND_TRUTH_DIR / path.name


def _sidecar(path: Path, name: str) -> Path:
    """``dir/name.ext`` → ``dir/ground_truth/name.ext/<name>``."""
    return ground_truth_dir(path) / name


def _json_ready(value: Any) -> Any:
    """Turn numpy scalars/arrays (and tuples) in ``value`` into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_ground_truth(
    path: Path,
    lesions: np.ndarray,
    annotations: np.ndarray,
    region: np.ndarray,
    clean: np.ndarray,
    spacing_mm: tuple[float, float],
    fps: float | None,
    meta: dict[str, Any],
) -> dict[str, Path]:
    """Write the masks (T, H, W), region (H, W), clean frames and meta JSON of the scan
    ``path`` into :func:`ground_truth_dir` ``(path)``."""
    from usfm_core.io.writers import write_tiff

    out = {
        "lesions": write_tiff(
            _sidecar(path, "lesions.tif"), lesions, spacing_mm=spacing_mm, fps=fps
        ),
        "annotations": write_tiff(
            _sidecar(path, "annotations.tif"),
            annotations.astype(np.uint8),
            spacing_mm=spacing_mm,
            fps=fps,
        ),
        "region": write_tiff(
            _sidecar(path, "region.tif"), region[None].astype(np.uint8), spacing_mm=spacing_mm
        ),
        "clean": write_tiff(_sidecar(path, "clean.tif"), clean, spacing_mm=spacing_mm, fps=fps),
    }
    meta_path = _sidecar(path, "meta.json")
    info = {"spacing_mm": list(spacing_mm), "fps": fps, **meta}
    atomic_write_text(meta_path, json.dumps(_json_ready(info), indent=2))
    out["meta"] = meta_path
    return out


def export_cine(cine: SimCine, path: str | Path, format: str = "dicom") -> dict[str, Path]:
    """Write ``cine`` as ``format`` (``dicom`` | ``video`` | ``tiff``) plus its ground truth.

    Returns the written paths by role: ``scan``, ``lesions``, ``annotations``, ``region``,
    ``clean``, ``meta`` (ground truth in ``ground_truth/<scan name>/``). A path without suffix
    gets the format's default (.dcm, .mp4, .tif).
    """
    from usfm_core.io.writers import write_dicom, write_tiff, write_video

    path = _target(path, format, CINE_FORMATS)
    frames = cine.frames
    if format == "dicom":
        photometric = "RGB" if frames.ndim == 4 else "MONOCHROME2"
        scan = write_dicom(
            path, frames, spacing_mm=cine.spacing_mm, fps=cine.fps, photometric=photometric
        )
    elif format == "video":
        scan = write_video(path, frames, cine.fps)
    else:
        scan = write_tiff(path, frames, spacing_mm=cine.spacing_mm, fps=cine.fps)
    truth = _write_ground_truth(
        path,
        cine.lesion_masks,
        cine.annotation_masks,
        cine.region_mask,
        cine.clean_frames,
        cine.spacing_mm,
        cine.fps,
        cine.meta,
    )
    return {"scan": scan, **truth}


def export_frame(frame: SimFrame, path: str | Path, format: str = "png") -> dict[str, Path]:
    """Write ``frame`` as ``format`` (``png`` | ``tiff`` | ``dicom``) plus its ground truth.

    Returns the written paths by role, as :func:`export_cine` does (masks are 1-page TIFFs).
    """
    from usfm_core.io.writers import write_dicom, write_image, write_tiff

    path = _target(path, format, FRAME_FORMATS)
    if format == "png":
        scan = write_image(path, frame.image)
    elif format == "tiff":
        scan = write_tiff(path, frame.image[None], spacing_mm=frame.spacing_mm)
    else:
        photometric = "RGB" if frame.image.ndim == 3 else "MONOCHROME2"
        scan = write_dicom(
            path, frame.image[None], spacing_mm=frame.spacing_mm, photometric=photometric
        )
    truth = _write_ground_truth(
        path,
        frame.lesion_mask[None],
        frame.annotation_mask[None],
        frame.region_mask,
        frame.clean_image[None],
        frame.spacing_mm,
        None,
        frame.meta,
    )
    return {"scan": scan, **truth}
