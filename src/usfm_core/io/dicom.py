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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from usfm_core.errors import ScanReadError, ScanWarning
from usfm_core.io.checks import check_decoded_size, valid_fps, valid_length_mm, valid_spacing
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

# Uncompressed ("native") transfer syntaxes: pixel data is one plain byte string.
NATIVE_TRANSFER_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
)
ENHANCED_US_VOLUME = "1.2.840.10008.5.1.4.1.1.6.2"
_COLOR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
_GRAY = {"MONOCHROME1", "MONOCHROME2"}
# Header fields reported in Scan.metadata (and by `usfm-core info`): technical only, never
# patient, study or operator identifiers, dates or free-text descriptions.
TECHNICAL_FIELDS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "SOPClassUID",
    "PhotometricInterpretation",
    "BitsStored",
    "TransducerType",
    "TransducerFrequency",
)
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


def _field(ds: Any, name: str, path: Path, *, required: bool = False) -> Any:
    """Value of DICOM attribute ``name`` (None if absent or empty).

    A value pydicom cannot convert (e.g. NumberOfFrames "abc") raises
    :class:`ScanReadError` naming the field when ``required``, else is ignored with a warning.
    """
    try:
        value = getattr(ds, name, None)
    except Exception as exc:  # pydicom converts lazily: ValueError, TypeError, ...
        _bad_field(name, repr(exc), path, required)
        return None
    return None if value in (None, "") else value


def _bad_field(name: str, value: str, path: Path, required: bool) -> None:
    """Raise (required field) or warn (optional field) about a malformed value."""
    if required:
        raise ScanReadError(
            f"DICOM field {name} is malformed ({value})",
            path=path,
            hint="the header is corrupt; re-export the file from the scanner or PACS",
        )
    warnings.warn(
        f"{path}: ignoring malformed DICOM field {name} ({value})", ScanWarning, stacklevel=4
    )


def _int_field(ds: Any, name: str, path: Path, default: int | None, required: bool = False) -> Any:
    """Integer value of ``name`` (``default`` when absent); malformed -> error or warning."""
    value = _field(ds, name, path, required=required)
    if value is None:
        return default
    try:
        number = float(value)
        if not number.is_integer():
            raise ValueError("not an integer")
        return int(number)
    except (TypeError, ValueError, OverflowError):
        _bad_field(name, repr(value)[:60], path, required)
        return default


def _float_field(ds: Any, name: str, path: Path) -> float | None:
    """Float value of optional field ``name``, or None (absent / malformed, with a warning)."""
    value = _field(ds, name, path)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        _bad_field(name, repr(value)[:60], path, False)
        return None


def _float_list(ds: Any, name: str, path: Path, length: int | None = None) -> list[float] | None:
    """Multi-valued float field (e.g. PixelSpacing), or None (absent / malformed, warned)."""
    value = _field(ds, name, path)
    if value is None:
        return None
    try:
        many = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
        items = [float(v) for v in (value if many else [value])]
        if not items or (length is not None and len(items) != length):
            raise ValueError(f"expected {length} values")
    except (TypeError, ValueError) as exc:
        _bad_field(name, f"{str(value)[:60]!r}: {exc}", path, False)
        return None
    return items


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
            if self.invert_max is not None:
                flipped = self.invert_max - np.clip(arr.astype(np.int64), 0, self.invert_max)
                arr = flipped.astype(arr.dtype)
        except Exception as exc:  # decoder errors come in many types
            raise ScanReadError(
                f"cannot decode DICOM frame {index}: {exc}",
                path=self.path,
                hint="the file may be truncated or corrupt; re-export it from the scanner",
            ) from exc
        return arr

    def close(self) -> None:
        """Nothing held open: each read opens the file."""


def _transfer_syntax(ds: Any, path: Path) -> str:
    """Return the dataset's transfer syntax UID, or raise if this reader cannot decode it."""
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    uid = str(_field(meta, "TransferSyntaxUID", path) or "").strip()
    if not uid:
        raise ScanReadError(
            "DICOM file meta holds no TransferSyntaxUID (pixel encoding unknown)",
            path=path,
            hint="the header is corrupt; re-export the file from the scanner or PACS",
        )
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


def _check_pixel_data(ds: Any, path: Path, expected: int, uid: str) -> None:
    """Raise if the pixel data is missing, shorter or longer than the header promises, or not
    encapsulated the way the transfer syntax says."""
    raw = ds.get_item("PixelData", keep_deferred=True)
    if raw is None:
        raise ScanReadError(
            "DICOM file has no (complete) pixel data",
            path=path,
            hint="the file is truncated or holds no image (e.g. a structured report); re-export it",
        )
    length = getattr(raw, "length", None)
    encapsulated = length is None or length == 0xFFFFFFFF
    if encapsulated != (uid not in NATIVE_TRANSFER_SYNTAXES):
        raise ScanReadError(
            f"pixel data is {'' if encapsulated else 'not '}encapsulated (compressed), but the "
            f"transfer syntax {SUPPORTED_TRANSFER_SYNTAXES[uid][0]} says otherwise",
            path=path,
            hint="the header is corrupt; re-export the file from the scanner or PACS",
        )
    if encapsulated:
        return  # fragments are checked when the delimiter was found by dcmread
    size = path.stat().st_size
    if length < expected or raw.value_tell + length > size:
        have = min(length, size - raw.value_tell)
        raise ScanReadError(
            f"DICOM pixel data is truncated ({have} of {expected} bytes)",
            path=path,
            hint="copy the file again from the source; the transfer was interrupted",
        )
    if length > expected + 1:  # native data is exact (one pad byte for odd lengths)
        raise ScanReadError(
            f"DICOM pixel data holds {length} bytes but the header (Rows, Columns, "
            f"NumberOfFrames, SamplesPerPixel, BitsAllocated) describes {expected}",
            path=path,
            hint="the header is corrupt; re-export the file from the scanner or PACS",
        )


def _region(item: Any) -> dict[str, Any]:
    """One SequenceOfUltrasoundRegions item as a dict (raises on malformed values)."""
    bbox = (
        "RegionLocationMinX0",
        "RegionLocationMinY0",
        "RegionLocationMaxX1",
        "RegionLocationMaxY1",
    )
    return {
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
        "bbox_x0y0x1y1": [int(getattr(item, name, 0)) for name in bbox],
    }


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
    for item in _field(ds, "SequenceOfUltrasoundRegions", path) or []:
        try:
            regions.append(_region(item))
        except Exception as exc:  # one malformed region must not sink the scan
            _bad_field("SequenceOfUltrasoundRegions", repr(exc)[:80], path, False)
    usable = [
        r
        for r in regions
        if r["spatial_format"] == _SPATIAL_2D
        and r["units_yx"] == [_CM, _CM]
        and valid_spacing(path, [d * 10.0 for d in r["delta_yx_cm"]], "ultrasound region size")
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


def _pixel_measures(ds: Any, path: Path) -> Any:
    """The shared PixelMeasuresSequence item of an enhanced multi-frame file, or None."""
    try:
        shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
        measures = getattr(shared[0], "PixelMeasuresSequence", None) if shared else None
        return measures[0] if measures else None
    except Exception as exc:
        _bad_field("SharedFunctionalGroupsSequence", repr(exc)[:80], path, False)
        return None


def _spacing(ds: Any, path: Path) -> tuple[tuple[float, float] | None, list[dict[str, Any]]]:
    """``(dy, dx)`` mm from the ultrasound regions, else PixelSpacing / ImagerPixelSpacing
    (top level or in the shared functional groups of enhanced multi-frame files).

    Malformed values are skipped with a warning; plausibility is checked by :class:`Scan`.
    """
    spacing, regions = _region_spacing(ds, path)
    if spacing is None:
        for holder in (ds, _pixel_measures(ds, path)):
            if holder is None:
                continue
            for name in ("PixelSpacing", "ImagerPixelSpacing"):
                value = _float_list(holder, name, path, length=2)
                checked = valid_spacing(path, value, f"DICOM {name}") if value else None
                if checked is not None:
                    return checked, regions
    return spacing, regions


def _slice_spacing(ds: Any, path: Path) -> float | None:
    """Distance between slices (mm) of an enhanced US volume, or None (implausible: warned)."""
    for holder in (_pixel_measures(ds, path), ds):
        if holder is None:
            continue
        for name in ("SpacingBetweenSlices", "SliceThickness"):
            value = valid_length_mm(path, _float_field(holder, name, path), f"DICOM {name}")
            if value is not None:
                return value
    return None


def _fps(ds: Any, path: Path) -> float | None:
    """Frames per second from FrameTime (ms), FrameTimeVector, CineRate or display rate.

    The first plausible source wins; implausible ones (<= 0, NaN, > 10000 fps) are warned about.
    """
    frame_time = _float_field(ds, "FrameTime", path)
    if frame_time is not None:
        fps = 1000.0 / frame_time if frame_time != 0 else float("inf")
        if valid_fps(path, fps, f"DICOM FrameTime {frame_time:g} ms") is not None:
            return fps
    vector = _float_list(ds, "FrameTimeVector", path)
    if vector is not None and len(vector) > 1:
        # The first entry is the time of frame 1 (usually 0); the rest are increments.
        steps = [v for v in vector[1:] if v > 0]
        fps = 1000.0 / float(np.mean(steps)) if steps else float("nan")
        if valid_fps(path, fps, "DICOM FrameTimeVector") is not None:
            return fps
    for name in ("CineRate", "RecommendedDisplayFrameRate"):
        fps = valid_fps(path, _float_field(ds, name, path), f"DICOM {name}")
        if fps is not None:
            return fps
    return None


def _metadata(ds: Any, uid: str, regions: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """A small JSON-friendly subset of the header: technical fields only.

    No patient identifiers, dates, descriptions or institution names: ``usfm-core info``
    prints this dictionary.
    """
    out: dict[str, Any] = {
        "transfer_syntax": SUPPORTED_TRANSFER_SYNTAXES[uid][0],
        "transfer_syntax_uid": uid,
    }
    for name in TECHNICAL_FIELDS:
        value = _field(ds, name, path)
        if value is not None:
            out[name] = value if isinstance(value, (int, float)) else str(value)[:64]
    if regions:
        out["ultrasound_regions"] = regions
    return out


def _missing(name: str, path: Path) -> NoReturn:
    """Raise: a field the pixel decoder needs is absent."""
    raise ScanReadError(
        f"DICOM image lacks the required field {name}",
        path=path,
        hint="the header is corrupt or incomplete; re-export the file from the scanner or PACS",
    )


def _required_int(ds: Any, name: str, path: Path) -> int:
    """Integer value of a field the pixel decoder needs: absent or malformed -> error."""
    value = _int_field(ds, name, path, None, required=True)
    if value is None:
        _missing(name, path)
    return value


def _geometry(ds: Any, path: Path) -> tuple[int, int, int, int, str]:
    """``(n_frames, rows, cols, samples, photometric)`` from the header, validated."""
    rows = _int_field(ds, "Rows", path, None, required=True)
    cols = _int_field(ds, "Columns", path, None, required=True)
    if rows is None or cols is None:
        raise ScanReadError(
            "DICOM file holds no image (no Rows/Columns)",
            path=path,
            hint="it may be a structured report or a non-image object; open the image series",
        )
    n = _int_field(ds, "NumberOfFrames", path, 1, required=True)
    if n < 1 or rows < 1 or cols < 1:
        raise ScanReadError(
            f"DICOM image has zero frames or size ({n} x {rows} x {cols})",
            path=path,
            hint="the header is corrupt or the file holds no image; re-export it",
        )
    samples = _required_int(ds, "SamplesPerPixel", path)
    photometric = str(_field(ds, "PhotometricInterpretation", path) or "(missing)").strip()
    if not ((samples == 1 and photometric in _GRAY) or (samples == 3 and photometric in _COLOR)):
        raise ScanReadError(
            f"unsupported photometric interpretation {photometric[:32]!r} with {samples} samples",
            path=path,
            hint="convert the file to MONOCHROME2 or RGB (e.g. gdcmconv --raw)",
        )
    return n, rows, cols, samples, photometric


def _pixel_dtype(ds: Any, path: Path) -> tuple[np.dtype, int]:
    """Decoded dtype from BitsAllocated / PixelRepresentation, and BitsStored."""
    bits = _required_int(ds, "BitsAllocated", path)
    if bits not in (8, 16, 32):
        raise ScanReadError(
            f"unsupported BitsAllocated {bits} (supported: 8, 16, 32)",
            path=path,
            hint="the header is corrupt, or convert the file (e.g. gdcmconv --raw)",
        )
    stored = _required_int(ds, "BitsStored", path)
    if not 1 <= stored <= bits:
        raise ScanReadError(
            f"BitsStored {stored} does not fit BitsAllocated {bits}",
            path=path,
            hint="the header is corrupt; re-export the file",
        )
    representation = _required_int(ds, "PixelRepresentation", path)
    if representation not in (0, 1):
        raise ScanReadError(
            f"PixelRepresentation {representation} is invalid (0 unsigned, 1 signed)",
            path=path,
            hint="the header is corrupt; re-export the file",
        )
    return np.dtype(f"{'i' if representation else 'u'}{bits // 8}"), stored


def read_dicom(path: Path) -> Scan:
    """Open a (multi-frame) DICOM file as a lazy :class:`Scan`.

    Malformed required fields (Rows, NumberOfFrames, BitsAllocated ...) raise
    :class:`ScanReadError` naming the field; malformed optional ones (spacing, frame time,
    regions) are ignored with a :class:`~usfm_core.errors.ScanWarning`. The decoded size is
    checked against :func:`usfm_core.io.checks.check_decoded_size` before any frame is read.
    """
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
    n, rows, cols, samples, photometric = _geometry(ds, path)
    dtype, stored = _pixel_dtype(ds, path)
    frame_shape = (rows, cols, samples) if samples == 3 else (rows, cols)
    _check_pixel_data(ds, path, rows * cols * samples * n * dtype.itemsize, uid)
    check_decoded_size(path, n, frame_shape, dtype.itemsize)

    invert = (1 << stored) - 1 if photometric == "MONOCHROME1" else None
    spacing, regions = _spacing(ds, path)
    rgb = samples == 3
    is_volume = str(_field(ds, "SOPClassUID", path) or "") == ENHANCED_US_VOLUME and n > 1
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
        slice_spacing_mm=_slice_spacing(ds, path) if is_volume else None,
        fps=_fps(ds, path) if kind == "cine" else None,
        metadata=_metadata(ds, uid, regions, path),
    )
