"""napari reader: open ultrasound scans with their pixel size, frame rate and lazy frames.

napari's built-in readers drop the calibration of ultrasound files; this one sets ``scale`` in
mm (``(1, dy, dx)`` for a cine, ``(dz, dy, dx)`` for a volume), ``units``, ``axis_labels`` and
keeps fps / source path in the layer metadata. Cine frames stay on disk and are decoded when
napari shows them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[Any], list[LayerData]]


def _first_path(path: str | Path | Sequence[str | Path]) -> Path | None:
    """The path to open: ``path`` itself, or the first of a list (None for an empty list)."""
    if isinstance(path, (list, tuple)):
        return Path(path[0]) if path else None
    return Path(path)


def _can_read(path: Path) -> bool:
    """Cheap check (no decoding) that :func:`usfm_core.io.load_scan` handles ``path``."""
    from usfm_core.io.dicom import is_dicom
    from usfm_core.io.images import list_folder_images
    from usfm_core.io.readers import extension_format

    if path.is_dir():
        return bool(list_folder_images(path))
    if not path.is_file():
        return False
    return extension_format(path) is not None or is_dicom(path)


def get_reader(path: str | Path | Sequence[str | Path]) -> ReaderFunction | None:
    """Return :func:`read_scan` when ``path`` looks like a scan we read, else None.

    Never raises: napari calls it on every file dropped on the viewer to find a reader.
    For a list of paths only the first is considered.
    """
    try:
        first = _first_path(path)
        if first is None or not _can_read(first):
            return None
    except Exception:  # a reader probe must never break napari's file opening
        return None
    return read_scan


def _layer_name(path: Path) -> str:
    """File name without its scan extension (``.nii.gz`` and ``.ome.tif`` count as one)."""
    from usfm_core.io import SUPPORTED_EXTENSIONS

    name = path.name
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def scan_layer_kwargs(scan: Any) -> dict[str, Any]:
    """``add_image`` keyword arguments (scale, units, axis labels, metadata) for a Scan."""
    dy, dx = scan.spacing_mm or (1.0, 1.0)
    unit = "mm" if scan.spacing_mm else "pixel"
    kwargs: dict[str, Any] = {
        "name": _layer_name(scan.path),
        "rgb": scan.is_rgb,
        "metadata": {
            "source_path": str(scan.path),
            "kind": scan.kind,
            "format": scan.format,
            "spacing_mm": scan.spacing_mm,
            "slice_spacing_mm": scan.slice_spacing_mm,
            "fps": scan.fps,
            "n_frames": scan.n_frames,
        },
    }
    if scan.kind == "image":
        kwargs.update(scale=(dy, dx), units=(unit, unit), axis_labels=("y", "x"))
    elif scan.kind == "volume":
        dz = scan.slice_spacing_mm
        z_unit = "mm" if dz else "pixel"
        kwargs.update(
            scale=(dz or 1.0, dy, dx), units=(z_unit, unit, unit), axis_labels=("z", "y", "x")
        )
    else:
        # Time is indexed by frame (scale 1); fps stays in the metadata.
        kwargs.update(scale=(1.0, dy, dx), units=("pixel", unit, unit), axis_labels=("t", "y", "x"))
    if str(scan.dtype) == "uint8":
        # Fixed limits spare napari from scanning the lazy frames for a data range.
        kwargs["contrast_limits"] = (0, 255)
    return kwargs


def read_scan(path: str | Path | Sequence[str | Path]) -> list[LayerData]:
    """napari reader function: one image layer with lazy frames and calibration.

    ``data`` is the lazy ``(T, H, W[, 3])`` frame array for cines and volumes and a single
    ``(H, W[, 3])`` array for one image. Raises :class:`usfm_core.errors.ScanReadError` with a
    readable message for bad files (napari shows it).
    """
    from usfm_core.io import load_scan

    first = _first_path(path)
    if first is None:
        return []
    scan = load_scan(first)
    data = scan.frame(0) if scan.kind == "image" else scan.frames
    return [(data, scan_layer_kwargs(scan), "image")]
