"""(Multi-frame) ultrasound DICOM reader.

The header is parsed once with the pixel data deferred (not read); each frame is then decoded
on demand with :func:`pydicom.pixels.pixel_array` ``(path, index=i)``, which reads only that
frame's bytes (native data) or fragments (JPEG and other encapsulated data).

Calibration follows the ultrasound conventions: the pixel size comes from the
SequenceOfUltrasoundRegions (the 2-D tissue region, physical deltas in cm), else PixelSpacing /
ImagerPixelSpacing; the frame rate from FrameTime, FrameTimeVector, CineRate or
RecommendedDisplayFrameRate. Enhanced US Volume files are read as ``kind="volume"`` with the
pixel and slice spacing of their shared functional groups.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from usfm_core.errors import ScanReadError
from usfm_core.io.scan import Scan

_JPEG_FIX = "pip install pylibjpeg pylibjpeg-libjpeg (or Pillow), or convert with gdcmconv --raw"

# Transfer syntaxes this reader handles: UID -> (name, what decoding needs / how to fix).
SUPPORTED_TRANSFER_SYNTAXES: dict[str, tuple[str, str]] = {
    "1.2.840.10008.1.2": ("Implicit VR Little Endian", "built in"),
    "1.2.840.10008.1.2.1": ("Explicit VR Little Endian", "built in"),
    "1.2.840.10008.1.2.2": ("Explicit VR Big Endian", "built in"),
    "1.2.840.10008.1.2.1.99": ("Deflated Explicit VR Little Endian", "built in"),
    "1.2.840.10008.1.2.5": ("RLE Lossless", "built in"),
    "1.2.840.10008.1.2.4.50": ("JPEG Baseline (Process 1)", _JPEG_FIX),
    "1.2.840.10008.1.2.4.51": ("JPEG Extended (Process 2 and 4)", _JPEG_FIX),
    "1.2.840.10008.1.2.4.57": (
        "JPEG Lossless (Process 14)",
        "pip install pylibjpeg pylibjpeg-libjpeg",
    ),
    "1.2.840.10008.1.2.4.70": ("JPEG Lossless SV1", "pip install pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.80": ("JPEG-LS Lossless", "pip install pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.81": ("JPEG-LS Near-Lossless", "pip install pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.90": ("JPEG 2000 Lossless", "pip install pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.91": ("JPEG 2000", "pip install pylibjpeg pylibjpeg-openjpeg"),
}

ENHANCED_US_VOLUME = "1.2.840.10008.5.1.4.1.1.6.2"
_COLOR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
_GRAY = {"MONOCHROME1", "MONOCHROME2"}
# RegionSpatialFormat 1 = 2-D image; RegionDataType 1 = tissue; PhysicalUnits 3 = cm.
_SPATIAL_2D, _TISSUE, _CM = 1, 1, 3


def is_dicom(path: Path) -> bool:
    """True when ``path`` has the DICOM Part 10 preamble ("DICM" at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


class DicomFrames:
    """Frame source decoding one frame at a time from a DICOM file."""

    def __init__(self, path: Path, invert_max: int | None):
        self.path = path
        self.invert_max = invert_max  # MONOCHROME1: stored 0 is white, so flip to max - value

    def read(self, index: int) -> np.ndarray:
        """Frame ``index`` as (H, W) or (H, W, 3) RGB (YBR converted by pydicom)."""
        from pydicom.pixels import pixel_array

        try:
            arr = pixel_array(str(self.path), index=index)
        except Exception as exc:  # decoder errors come in many types
            raise ScanReadError(
                f"cannot decode DICOM frame {index}: {exc}",
                path=self.path,
                hint="the file may be truncated or corrupt; re-export it from the scanner",
            ) from exc
        if self.invert_max is not None:
            arr = self.invert_max - arr
        return arr

    def close(self) -> None:
        """Nothing held open: each read opens the file."""


def _transfer_syntax(ds: Any, path: Path) -> str:
    """Return the dataset's transfer syntax UID, or raise if this reader cannot decode it."""
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    uid = str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    entry = SUPPORTED_TRANSFER_SYNTAXES.get(uid)
    if entry is None:
        try:
            from pydicom.uid import UID

            name = UID(uid).name
        except Exception:  # pragma: no cover - unknown UID
            name = uid
        raise ScanReadError(
            f"unsupported DICOM transfer syntax {name} ({uid})",
            path=path,
            hint="convert it to uncompressed DICOM (gdcmconv --raw IN OUT) or export the cine"
            " as MP4/AVI; supported: "
            + ", ".join(n for n, _ in SUPPORTED_TRANSFER_SYNTAXES.values()),
        )
    name, fix = entry
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ScanReadError(
            f"no decoder installed for transfer syntax {name} ({uid})", path=path, hint=fix
        )
    return uid


def _check_pixel_data(ds: Any, path: Path, expected: int) -> None:
    """Raise if the pixel data is missing or shorter than the header promises (truncation)."""
    raw = ds.get_item("PixelData", keep_deferred=True)
    if raw is None:
        raise ScanReadError(
            "DICOM file has no (complete) pixel data",
            path=path,
            hint="the file is truncated or holds no image (e.g. a structured report); re-export it",
        )
    length = getattr(raw, "length", None)
    if length is None or length == 0xFFFFFFFF:
        return  # encapsulated: fragments are checked when the delimiter was found by dcmread
    size = path.stat().st_size
    if length < expected or raw.value_tell + length > size:
        have = min(length, size - raw.value_tell)
        raise ScanReadError(
            f"DICOM pixel data is truncated ({have} of {expected} bytes)",
            path=path,
            hint="copy the file again from the source; the transfer was interrupted",
        )


def _region_area(region: dict[str, Any]) -> int:
    """Pixel area of a region's bounding box."""
    x0, y0, x1, y1 = region["bbox_x0y0x1y1"]
    return (x1 - x0 + 1) * (y1 - y0 + 1)


def _region_spacing(ds: Any, path: Path) -> tuple[tuple[float, float] | None, list[dict[str, Any]]]:
    """Pixel size ``(dy, dx)`` mm from SequenceOfUltrasoundRegions, plus the regions as dicts.

    Prefers 2-D tissue regions in cm; among several with different spacing, warns and takes the
    largest one (the main B-mode image, not an inset).
    """
    regions = []
    for item in getattr(ds, "SequenceOfUltrasoundRegions", None) or []:
        regions.append(
            {
                "spatial_format": int(getattr(item, "RegionSpatialFormat", 0)),
                "data_type": int(getattr(item, "RegionDataType", 0)),
                "units_yx": [
                    int(getattr(item, "PhysicalUnitsYDirection", 0)),
                    int(getattr(item, "PhysicalUnitsXDirection", 0)),
                ],
                "delta_yx_cm": [
                    float(getattr(item, "PhysicalDeltaY", 0.0)),
                    float(getattr(item, "PhysicalDeltaX", 0.0)),
                ],
                "bbox_x0y0x1y1": [
                    int(getattr(item, name, 0))
                    for name in (
                        "RegionLocationMinX0",
                        "RegionLocationMinY0",
                        "RegionLocationMaxX1",
                        "RegionLocationMaxY1",
                    )
                ],
            }
        )
    usable = [
        r
        for r in regions
        if r["spatial_format"] == _SPATIAL_2D
        and r["units_yx"] == [_CM, _CM]
        and min(r["delta_yx_cm"]) > 0
    ]
    tissue = [r for r in usable if r["data_type"] == _TISSUE] or usable
    if not tissue:
        return None, regions
    spacings = {tuple(round(d * 10.0, 9) for d in r["delta_yx_cm"]) for r in tissue}
    best = max(tissue, key=_region_area)
    spacing = (best["delta_yx_cm"][0] * 10.0, best["delta_yx_cm"][1] * 10.0)
    if len(spacings) > 1:
        msg = (
            f"{path}: {len(tissue)} ultrasound regions have different pixel sizes "
            f"{sorted(spacings)} mm; using the largest region's {spacing} mm"
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
    return spacing, regions


def _pixel_measures(ds: Any) -> Any:
    """The shared PixelMeasuresSequence item of an enhanced multi-frame file, or None."""
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    measures = getattr(shared[0], "PixelMeasuresSequence", None) if shared else None
    return measures[0] if measures else None


def _spacing(ds: Any, path: Path) -> tuple[tuple[float, float] | None, list[dict[str, Any]]]:
    """``(dy, dx)`` mm from the ultrasound regions, else PixelSpacing / ImagerPixelSpacing
    (top level or in the shared functional groups of enhanced multi-frame files)."""
    spacing, regions = _region_spacing(ds, path)
    if spacing is None:
        for holder in (ds, _pixel_measures(ds)):
            for name in ("PixelSpacing", "ImagerPixelSpacing"):
                value = getattr(holder, name, None)
                if value is not None and len(value) == 2 and min(float(v) for v in value) > 0:
                    return (float(value[0]), float(value[1])), regions
    return spacing, regions


def _slice_spacing(ds: Any) -> float | None:
    """Distance between slices (mm) of an enhanced US volume, or None."""
    for holder in (_pixel_measures(ds), ds):
        for name in ("SpacingBetweenSlices", "SliceThickness"):
            value = getattr(holder, name, None)
            if value not in (None, "") and float(value) > 0:
                return float(value)
    return None


def _fps(ds: Any) -> float | None:
    """Frames per second from FrameTime (ms), FrameTimeVector, CineRate or display rate."""
    frame_time = getattr(ds, "FrameTime", None)
    if frame_time and float(frame_time) > 0:
        return 1000.0 / float(frame_time)
    vector = getattr(ds, "FrameTimeVector", None)
    if vector is not None and len(vector) > 1:
        # The first entry is the time of frame 1 (usually 0); the rest are increments.
        steps = [float(v) for v in list(vector)[1:] if float(v) > 0]
        if steps:
            return 1000.0 / float(np.mean(steps))
    for name in ("CineRate", "RecommendedDisplayFrameRate"):
        value = getattr(ds, name, None)
        if value and float(value) > 0:
            return float(value)
    return None


def _metadata(ds: Any, uid: str, regions: list[dict[str, Any]]) -> dict[str, Any]:
    """A small JSON-friendly subset of the header (no patient identifiers)."""
    out: dict[str, Any] = {
        "transfer_syntax": SUPPORTED_TRANSFER_SYNTAXES[uid][0],
        "transfer_syntax_uid": uid,
    }
    for name in (
        "Modality",
        "Manufacturer",
        "ManufacturerModelName",
        "SOPClassUID",
        "SeriesDescription",
        "StudyDate",
        "PhotometricInterpretation",
        "BitsStored",
        "TransducerType",
        "TransducerFrequency",
    ):
        value = getattr(ds, name, None)
        if value not in (None, ""):
            out[name] = value if isinstance(value, (int, float)) else str(value)
    if regions:
        out["ultrasound_regions"] = regions
    return out


def read_dicom(path: Path) -> Scan:
    """Open a (multi-frame) DICOM file as a lazy :class:`Scan`."""
    import pydicom

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(str(path), defer_size=1024)
        except Exception as exc:
            raise ScanReadError(
                f"cannot parse DICOM header: {exc}",
                path=path,
                hint="the file is corrupt or truncated; re-export it from the scanner or PACS",
            ) from exc
    if any("End of file" in str(w.message) for w in caught):
        raise ScanReadError(
            "DICOM file ends before its pixel data does (truncated)",
            path=path,
            hint="copy the file again from the source; the transfer was interrupted",
        )
    uid = _transfer_syntax(ds, path)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except AttributeError as exc:
        raise ScanReadError("DICOM file holds no image (no Rows/Columns)", path=path) from exc
    n_value = getattr(ds, "NumberOfFrames", None)
    n = 1 if n_value in (None, "") else int(n_value)
    if n < 1 or rows < 1 or cols < 1:
        raise ScanReadError(
            f"DICOM image has zero frames or size ({n} x {rows} x {cols})", path=path
        )
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip()
    if not ((samples == 1 and photometric in _GRAY) or (samples == 3 and photometric in _COLOR)):
        raise ScanReadError(
            f"unsupported photometric interpretation {photometric} with {samples} samples",
            path=path,
            hint="convert the file to MONOCHROME2 or RGB (e.g. gdcmconv --raw)",
        )
    bits = int(getattr(ds, "BitsAllocated", 8))
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{max(1, bits // 8)}")
    _check_pixel_data(ds, path, rows * cols * samples * n * dtype.itemsize)

    invert = None
    if photometric == "MONOCHROME1":
        invert = (1 << int(getattr(ds, "BitsStored", bits))) - 1
    spacing, regions = _spacing(ds, path)
    rgb = samples == 3
    is_volume = str(getattr(ds, "SOPClassUID", "")) == ENHANCED_US_VOLUME and n > 1
    kind = "volume" if is_volume else "cine" if n > 1 else "image"
    return Scan(
        path=path,
        kind=kind,
        format="dicom",
        shape=(n, rows, cols, 3) if rgb else (n, rows, cols),
        dtype=dtype,
        is_rgb=rgb,
        source=DicomFrames(path, invert),
        spacing_mm=spacing,
        slice_spacing_mm=_slice_spacing(ds) if is_volume else None,
        fps=_fps(ds) if kind == "cine" else None,
        metadata=_metadata(ds, uid, regions),
    )
