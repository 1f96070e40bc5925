"""Fuzz suite: >= 200 malformed / edge inputs through every reader and three entry points.

Each generated input (DICOM header and pixel-data variants, TIFF, NIfTI, PNG/JPEG/BMP, video,
folders, symbolic links, odd names) is opened through

1. ``load_scan`` + decoding every frame (under ``tracemalloc``, memory peak checked),
2. ``usfm-core info`` in-process (``usfm_core.cli.main``), output captured,
3. the napari reader function (``napari_usfm._reader.get_reader`` then the reader itself),

and must either *load correctly* (shape and pixel values checked against what was written,
calibration checked) or fail with a ``USFMError`` whose message names the file and the cause.
Anything else is counted: tracebacks (any other exception), hangs (per-case alarm), silently
wrong data, memory over the cap, unclear errors. The counts are printed at the end of the run
and all must be 0. Inputs are written once into a session temporary folder, deterministically.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import signal
import struct
import tracemalloc
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from napari_usfm._reader import get_reader
from usfm_core.cli import main
from usfm_core.errors import DecodedSizeError, ScanWarning, USFMError
from usfm_core.io import load_scan, write_dicom, write_video
from usfm_core.io.checks import set_decoded_limits

# Limits in force during the fuzz run: every accepted input must stay far below them, and
# inputs declaring more must be refused before any allocation.
TOTAL_CAP_MB, FRAME_CAP_MB = 256, 64
MEMORY_CAP = FRAME_CAP_MB * 1024 * 1024  # traced peak allowed for one load + decode of a case
HUGE_PEAK = 16 * 1024 * 1024  # a refused huge input may not allocate more than this
CASE_TIMEOUT_S = 30
PHI = ("DOE^JOHN", "MRN12345678", "19700101", "20240102", "ACC998877", "St Example Hospital")


@dataclass
class Case:
    """One fuzz input: how to write it and what reading it must give.

    ``expect``: ``"ok"`` (must load; ``frames`` compared within ``tol`` and ``check`` run),
    ``"error"`` (must raise USFMError naming the file, matching ``cause``), or ``"either"``
    (error, or a load whose decodable frames match ``frames`` / pass ``check``).
    """

    name: str
    build: Callable[[Path], Path]
    expect: str
    frames: np.ndarray | None = None
    tol: int = 0
    cause: str | None = None
    warn: str | None = None
    check: Callable[[Any], None] | None = None
    huge: bool = False
    info_absent: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


CASES: list[Case] = []


def case(name: str, build: Callable[[Path], Path], expect: str, **kw: Any) -> None:
    """Register a case (names are unique test ids)."""
    assert all(c.name != name for c in CASES), name
    CASES.append(Case(name, build, expect, **kw))


def rand_u8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random uint8 array (lossless formats)."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth(n: int = 3, h: int = 32, w: int = 48, rgb: bool = False) -> np.ndarray:
    """Smooth uint8 frames (codec friendly) (n, h, w[, 3]), distinct per frame."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.stack([np.clip(40 + 2.5 * xx + 1.5 * yy + 20 * t, 0, 255) for t in range(n)])
    out = out.astype(np.uint8)
    if rgb:
        out = np.stack([out, out // 2, 255 - out], axis=-1)
    return out


G = rand_u8((3, 16, 20), 1)  # the base DICOM / TIFF cine


def spacing_is(expected: tuple[float, float] | None) -> Callable[[Any], None]:
    """Check a loaded scan's pixel spacing (None: uncalibrated)."""

    def check(scan: Any) -> None:
        if expected is None:
            assert scan.spacing_mm is None, scan.spacing_mm
        else:
            assert scan.spacing_mm == pytest.approx(expected)

    return check


def fps_is(expected: float | None) -> Callable[[Any], None]:
    """Check a loaded scan's frame rate (None: unknown)."""

    def check(scan: Any) -> None:
        if expected is None:
            assert scan.fps is None, scan.fps
        else:
            assert scan.fps == pytest.approx(expected)

    return check


def slice_is(expected: float | None) -> Callable[[Any], None]:
    """Check a loaded volume's slice spacing (None: unknown)."""

    def check(scan: Any) -> None:
        if expected is None:
            assert scan.slice_spacing_mm is None, scan.slice_spacing_mm
        else:
            assert scan.slice_spacing_mm == pytest.approx(expected)

    return check


# =========================================================================== DICOM
def set_raw(ds: Any, keyword: str, vr: str, value: bytes | str) -> None:
    """Store ``value`` verbatim (no validation) as element ``keyword`` of ``ds``."""
    tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
    data = value.encode("latin1") if isinstance(value, str) else value
    if len(data) % 2:
        data += b" " if vr not in ("OB", "OW", "UN") else b"\0"
    ds._dict[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)


def dicom(
    frames: np.ndarray = G,
    *,
    raw: dict[str, tuple[str, bytes | str]] | None = None,
    delete: tuple[str, ...] = (),
    edit: Callable[[Any], None] | None = None,
    post: Callable[[bytes], bytes] | None = None,
    name: str = "x.dcm",
    **write_kw: Any,
) -> Callable[[Path], Path]:
    """Builder: ``write_dicom`` then raw element overrides, deletions, edits and byte surgery."""
    write_kw.setdefault("spacing_mm", (0.2, 0.3))
    write_kw.setdefault("fps", 25.0)

    def build(d: Path) -> Path:
        path = d / name
        write_dicom(d / "base.dcm", frames, **write_kw)
        if raw or delete or edit:
            ds = pydicom.dcmread(d / "base.dcm")
            for kw in delete:
                if kw in ds:
                    delattr(ds, kw)
            if edit:
                edit(ds)
            for kw, (vr, value) in (raw or {}).items():
                set_raw(ds, kw, vr, value)
            ds.save_as(d / "base.dcm")
        data = (d / "base.dcm").read_bytes()
        (d / "base.dcm").unlink()
        path.write_bytes(post(data) if post else data)
        return path

    return build


def us(value: int) -> bytes:
    """A little-endian US (uint16) value."""
    return struct.pack("<H", value)


def no_rates(ds: Any) -> None:
    """Remove the frame-rate sources other than FrameTime."""
    for kw in ("CineRate", "RecommendedDisplayFrameRate"):
        if kw in ds:
            delattr(ds, kw)


def no_fps(ds: Any) -> None:
    """Remove every frame-rate source."""
    no_rates(ds)
    for kw in ("FrameTime", "FrameIncrementPointer"):
        if kw in ds:
            delattr(ds, kw)


def set_region(**values: Any) -> Callable[[Any], None]:
    """Edit the first ultrasound region's attributes."""

    def edit(ds: Any) -> None:
        item = ds.SequenceOfUltrasoundRegions[0]
        for k, v in values.items():
            setattr(item, k, v)

    return edit


def _dicom_cases() -> None:
    g16 = np.random.default_rng(2).integers(0, 65535, (2, 12, 10), dtype=np.uint16)
    rgb = rand_u8((2, 12, 14, 3), 3)
    case("dcm_ok_explicit", dicom(), "ok", frames=G, check=spacing_is((0.2, 0.3)))
    case("dcm_ok_implicit", dicom(transfer_syntax="implicit_le"), "ok", frames=G)
    case("dcm_ok_mono1", dicom(photometric="MONOCHROME1"), "ok", frames=G)
    case("dcm_ok_uint16", dicom(g16), "ok", frames=g16)
    case("dcm_ok_mono1_uint16", dicom(g16, photometric="MONOCHROME1"), "ok", frames=g16)
    case("dcm_ok_rgb", dicom(rgb, photometric="RGB"), "ok", frames=rgb)
    case("dcm_ok_ybr", dicom(rgb, photometric="YBR_FULL"), "ok", frames=rgb, tol=3)
    sm = smooth(3, 32, 48)
    case("dcm_ok_jpeg", dicom(sm, transfer_syntax="jpeg_baseline"), "ok", frames=sm, tol=12)
    case("dcm_ok_rle", dicom(transfer_syntax="rle_lossless"), "ok", frames=G)
    case("dcm_ok_one_frame", dicom(G[:1]), "ok", frames=G[:1])
    case("dcm_ok_no_extension", dicom(name="scan"), "ok", frames=G)
    case("dcm_ok_named_png", dicom(name="scan.png"), "ok", frames=G)
    case(
        "dcm_ok_pixel_spacing",
        dicom(spacing_in="pixel_spacing"),
        "ok",
        frames=G,
        check=spacing_is((0.2, 0.3)),
    )
    case("dcm_ok_no_calibration", dicom(spacing_mm=None, fps=None), "ok", frames=G)
    case("dcm_ok_trailing_pad", dicom(post=lambda b: b + b"\0" * 2), "either", frames=G)
    # --- NumberOfFrames
    for i, (text, expect, frames, cause) in enumerate(
        [
            ("abc", "error", None, "NumberOfFrames"),
            ("", "error", None, "pixel data"),
            ("0", "error", None, "zero frames"),
            ("-3", "error", None, "zero frames"),
            ("2", "error", None, "pixel data"),
            ("4", "error", None, "truncated"),
            ("3.5", "error", None, "NumberOfFrames"),
            ("1e9", "error", None, "truncated"),
            ("2000000000", "error", None, "truncated"),
            (" 3 ", "ok", G, None),
            ("3\\4", "error", None, "NumberOfFrames"),
            ("\xff\xfe", "error", None, "NumberOfFrames"),
        ]
    ):
        case(
            f"dcm_nframes_{i}",
            dicom(raw={"NumberOfFrames": ("IS", text)}),
            expect,
            frames=frames,
            cause=cause,
        )
    case("dcm_nframes_missing", dicom(delete=("NumberOfFrames",)), "error", cause="pixel data")
    case(
        "dcm_nframes_implicit_abc",
        dicom(transfer_syntax="implicit_le", raw={"NumberOfFrames": ("IS", "abc")}),
        "error",
        cause="NumberOfFrames",
    )
    # --- geometry and pixel format fields
    for kw, value, cause in [
        ("Rows", us(0), "zero frames or size"),
        ("Rows", us(65535), "truncated"),
        ("Rows", b"x ", "truncated"),
        ("Rows", us(8), "pixel data"),
        ("Columns", us(0), "zero frames or size"),
        ("Columns", us(1), "pixel data"),
        ("Columns", us(65535), "truncated"),
        ("BitsAllocated", us(12), "BitsAllocated"),
        ("BitsAllocated", us(0), "BitsAllocated"),
        ("BitsAllocated", us(1), "BitsAllocated"),
        ("BitsAllocated", us(16), "truncated"),
        ("BitsAllocated", us(32), "truncated"),
        ("BitsAllocated", us(64), "BitsAllocated"),
        ("BitsStored", us(20), "BitsStored"),
        ("BitsStored", us(0), "BitsStored"),
        ("SamplesPerPixel", us(3), "photometric"),
        ("SamplesPerPixel", us(0), "photometric"),
        ("SamplesPerPixel", us(2), "photometric"),
    ]:
        case(
            f"dcm_{kw}_{int.from_bytes(value[:2], 'little')}",
            dicom(raw={kw: ("US", value)}),
            "error",
            cause=cause,
        )
    case("dcm_rows_missing", dicom(delete=("Rows",)), "error", cause="Rows")
    case("dcm_columns_missing", dicom(delete=("Columns",)), "error", cause="Columns")
    case(
        "dcm_signed",
        dicom(raw={"PixelRepresentation": ("US", us(1))}),
        "ok",
        frames=G.view(np.int8),
    )
    case(
        "dcm_pixrep_2",
        dicom(raw={"PixelRepresentation": ("US", us(2))}),
        "error",
        cause="PixelRepresentation",
    )
    for i, (text, expect, frames) in enumerate(
        [
            ("PALETTE COLOR", "error", None),
            ("HSV", "error", None),
            ("", "error", None),
            ("MONOCHROME1", "ok", 255 - G),
            ("RGB", "error", None),
            ("\x01\xfe", "error", None),
            ("A" * 64, "error", None),
            ("monochrome2", "error", None),
        ]
    ):
        case(
            f"dcm_photometric_{i}",
            dicom(raw={"PhotometricInterpretation": ("CS", text)}),
            expect,
            frames=frames,
            cause=None if frames is not None else "photometric",
        )
    # --- pixel spacing (PixelSpacing only, no regions)
    for i, (text, expected) in enumerate(
        [
            ("abc\\def", None),
            ("0.1", None),
            ("inf\\inf", None),
            ("nan\\0.1", None),
            ("-0.1\\-0.1", None),
            ("0\\0", None),
            ("1e-9\\1e-9", None),
            ("500\\500", None),
            ("0.2\\0.3\\0.4", None),
            ("0.25\\0.5", (0.25, 0.5)),
            ("", None),
        ]
    ):
        case(
            f"dcm_pixel_spacing_{i}",
            dicom(spacing_in="pixel_spacing", raw={"PixelSpacing": ("DS", text)}),
            "ok",
            frames=G,
            check=spacing_is(expected),
            warn=None if expected or not text else "PixelSpacing",
        )
    case(
        "dcm_imager_spacing_text",
        dicom(spacing_mm=None, raw={"ImagerPixelSpacing": ("DS", "x\\y")}),
        "ok",
        frames=G,
        check=spacing_is(None),
        warn="ImagerPixelSpacing",
    )
    # --- ultrasound regions
    for i, values in enumerate(
        [
            {"PhysicalDeltaX": float("inf")},
            {"PhysicalDeltaX": float("nan")},
            {"PhysicalDeltaX": -0.01},
            {"PhysicalDeltaX": 0.0},
            {"PhysicalDeltaX": 1e6},
            {"PhysicalDeltaX": 1e-9, "PhysicalDeltaY": 1e-9},
        ]
    ):
        case(
            f"dcm_region_bad_{i}",
            dicom(edit=set_region(**values)),
            "ok",
            frames=G,
            check=spacing_is(None),
            warn="region",
        )
    case(
        "dcm_region_units_seconds",
        dicom(edit=set_region(PhysicalUnitsXDirection=4)),
        "ok",
        frames=G,
        check=spacing_is(None),
    )
    case(
        "dcm_region_3d",
        dicom(edit=set_region(RegionSpatialFormat=2)),
        "ok",
        frames=G,
        check=spacing_is(None),
    )

    def empty_region(ds: Any) -> None:
        ds.SequenceOfUltrasoundRegions.append(pydicom.Dataset())

    case("dcm_region_empty_item", dicom(edit=empty_region), "ok", frames=G)

    def good_and_nan(ds: Any) -> None:
        bad = copy.deepcopy(ds.SequenceOfUltrasoundRegions[0])
        bad.PhysicalDeltaX = float("nan")
        bad.RegionLocationMaxX1 = 10_000
        ds.SequenceOfUltrasoundRegions.append(bad)

    case(
        "dcm_region_good_and_nan",
        dicom(edit=good_and_nan),
        "ok",
        frames=G,
        check=spacing_is((0.2, 0.3)),
        warn="region",
    )
    # --- frame rate sources
    for i, (text, expected) in enumerate(
        [
            ("fast", None),
            ("0", None),
            ("-5", None),
            ("1e-9", None),
            ("nan", None),
            ("inf", None),
            ("40", 25.0),
        ]
    ):
        case(
            f"dcm_frame_time_{i}",
            dicom(edit=no_rates, raw={"FrameTime": ("DS", text)}),
            "ok",
            frames=G,
            check=fps_is(expected),
            warn=None if expected else "FrameTime",
        )
    for i, (kw, vr, text, expected) in enumerate(
        [
            ("FrameTimeVector", "DS", "a\\b", None),
            ("FrameTimeVector", "DS", "0\\40\\40", 25.0),
            ("FrameTimeVector", "DS", "0\\-1\\-1", None),
            ("CineRate", "IS", "abc", None),
            ("CineRate", "IS", "-1", None),
            ("CineRate", "IS", "1000000000", None),
            ("CineRate", "IS", "30", 30.0),
            ("RecommendedDisplayFrameRate", "IS", "x", None),
        ]
    ):
        case(
            f"dcm_rate_{i}",
            dicom(edit=no_fps, raw={kw: (vr, text)}),
            "ok",
            frames=G,
            check=fps_is(expected),
            warn=None if expected else kw,
        )
    # --- transfer syntax
    for i, (uid, expect) in enumerate(
        [
            ("1.2.3.4", "error"),
            ("not-a-uid", "error"),
            ("1.2.840.10008.1.2.4.50", "error"),
            ("1.2.840.10008.1.2.4.90", "error"),
            ("1.2.840.10008.1.2.5", "error"),
            ("", "error"),
        ]
    ):
        case(
            f"dcm_transfer_syntax_{i}",
            dicom(post=lambda b, u=uid: _retag_transfer_syntax(b, u)),
            expect,
            frames=G,
        )
    # --- enhanced US volume and slice spacing
    for i, (text, expected) in enumerate(
        [("1.5", 1.5), ("abc", None), ("-1", None), ("1e9", None), ("nan", None)]
    ):

        def edit_volume(ds: Any) -> None:
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.2"

        case(
            f"dcm_volume_slice_{i}",
            dicom(edit=edit_volume, raw={"SpacingBetweenSlices": ("DS", text)}),
            "ok",
            frames=G,
            check=slice_is(expected),
        )

    # --- privacy: info prints no identifier
    def phi(ds: Any) -> None:
        ds.PatientName = PHI[0]
        ds.PatientID = PHI[1]
        ds.PatientBirthDate = PHI[2]
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = PHI[3]
        ds.AccessionNumber = PHI[4]
        ds.InstitutionName = PHI[5]
        ds.SeriesDescription = f"breast {PHI[0]}"
        ds.StudyDescription = f"follow-up {PHI[1]}"
        ds.ReferringPhysicianName = "DR^WHO"
        ds.OperatorsName = "SONO^GRAPHER"

    case("dcm_phi", dicom(edit=phi), "ok", frames=G, info_absent=(*PHI, "DR^WHO", "SONO"))
    case(
        "dcm_bad_charset",
        dicom(
            raw={
                "SpecificCharacterSet": ("CS", "ISO_IR 999"),
                "SeriesDescription": ("LO", b"\xff\xfe"),
            }
        ),
        "ok",
        frames=G,
    )
    # --- pixel data surgery
    case("dcm_no_pixel_data", dicom(delete=("PixelData",)), "error", cause="pixel data")
    case("dcm_empty_pixel_data", dicom(raw={"PixelData": ("OB", b"")}), "error")
    for frac in (0.5, 0.9, 0.999):
        case(
            f"dcm_truncated_{frac}",
            dicom(post=lambda b, f=frac: b[: int(len(b) * f)]),
            "error",
            cause="truncated",
        )
    case("dcm_truncated_to_preamble", dicom(post=lambda b: b[:132]), "error")
    case("dcm_truncated_to_300", dicom(post=lambda b: b[:300]), "error")
    case("dcm_trailing_garbage", dicom(post=lambda b: b + bytes(range(97))), "either", frames=G)
    case(
        "dcm_random_with_marker",
        lambda d: _write(d / "r.dcm", b"\0" * 128 + b"DICM" + rand_u8((3000,), 9).tobytes()),
        "error",
    )
    case("dcm_marker_only", lambda d: _write(d / "m.dcm", b"\0" * 128 + b"DICM"), "error")
    case("dcm_no_marker", lambda d: _write(d / "n.dcm", rand_u8((600,), 4).tobytes()), "error")
    for seed in range(12):
        case(
            f"dcm_header_flips_{seed}",
            dicom(post=lambda b, s=seed: _flip_header(b, s)),
            "either",
            frames=G,
        )
    jpeg_kw = {"transfer_syntax": "jpeg_baseline"}
    case(
        "dcm_jpeg_truncated",
        dicom(sm, post=lambda b: b[: int(len(b) * 0.8)], **jpeg_kw),
        "either",
        frames=sm,
        tol=12,
    )
    case(
        "dcm_jpeg_huge_frame_count",
        dicom(sm, raw={"NumberOfFrames": ("IS", "2000000000")}, **jpeg_kw),
        "error",
        cause="limit",
        huge=True,
    )
    case(
        "dcm_jpeg_huge_rows",
        dicom(sm, raw={"Rows": ("US", us(65535)), "Columns": ("US", us(65535))}, **jpeg_kw),
        "error",
        cause="limit",
        huge=True,
    )
    case(
        "dcm_jpeg_more_frames_than_fragments",
        dicom(sm, raw={"NumberOfFrames": ("IS", "5")}, **jpeg_kw),
        "either",
        frames=sm,
        tol=12,
    )
    case(
        "dcm_jpeg_wrong_rows",
        dicom(sm, raw={"Rows": ("US", us(16))}, **jpeg_kw),
        "either",
        frames=sm[:, :16],
        tol=12,
    )


def _retag_transfer_syntax(data: bytes, uid: str) -> bytes:
    """Rewrite a Part 10 file's meta header with TransferSyntaxUID ``uid`` (dataset untouched)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    (group_length,) = struct.unpack_from("<I", data, 140)
    meta_end = 144 + group_length
    meta = pydicom.dcmread(io.BytesIO(data)).file_meta
    meta.TransferSyntaxUID = uid
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=False)
    return data[:132] + buf.getvalue() + data[meta_end:]


def _flip_header(data: bytes, seed: int) -> bytes:
    """Flip 6 random bytes between the preamble and the pixel data."""
    rng = np.random.default_rng(100 + seed)
    end = data.rfind(b"\xe0\x7f\x10\x00")  # the PixelData tag
    out = bytearray(data)
    for pos in rng.integers(132, max(133, end), 6):
        out[int(pos)] ^= int(rng.integers(1, 256))
    return bytes(out)


def _write(path: Path, data: bytes) -> Path:
    """Write bytes and return the path."""
    path.write_bytes(data)
    return path


# =========================================================================== TIFF
def tiff(arr: np.ndarray, name: str = "x.tif", **kw: Any) -> Callable[[Path], Path]:
    """Builder: ``tifffile.imwrite(arr, **kw)``."""

    kw.setdefault("photometric", "minisblack")  # a 3-frame stack is not planar RGB

    def build(d: Path) -> Path:
        tifffile.imwrite(d / name, arr, **kw)
        return d / name

    return build


def with_nan(arr: np.ndarray, fill: float, count: int = 7) -> np.ndarray:
    """Float copy of ``arr`` with ``count`` pixels of frame 0 set to ``fill``."""
    out = np.array(arr, dtype=np.float32, order="C", copy=True)
    flat = out[0].reshape(-1)
    flat[np.random.default_rng(5).choice(flat.size, count, replace=False)] = fill
    return out


def sanitized(arr: np.ndarray) -> np.ndarray:
    """What the readers promise for NaN/inf: NaN -> finite min, +inf -> max, -inf -> min."""
    out = np.array(arr, copy=True)
    for frame in out:
        finite = np.isfinite(frame)
        if not finite.any():
            frame[...] = 0
            continue
        lo, hi = frame[finite].min(), frame[finite].max()
        frame[np.isnan(frame)] = lo
        frame[np.isposinf(frame)] = hi
        frame[np.isneginf(frame)] = lo
    return out


def _tiff_cases() -> None:
    f32 = np.random.default_rng(6).normal(size=(3, 10, 12)).astype(np.float32)
    u16 = np.random.default_rng(7).integers(0, 65535, (2, 10, 12), dtype=np.uint16)
    rgb = rand_u8((2, 10, 12, 3), 8)
    ij = {"imagej": True}
    case(
        "tif_ok_imagej_cine",
        tiff(
            G,
            imagej=True,
            resolution=(1 / 0.3, 1 / 0.2),
            metadata={"unit": "mm", "finterval": 0.04},
        ),
        "ok",
        frames=G,
        check=lambda s: (spacing_is((0.2, 0.3))(s), fps_is(25.0)(s)),
    )
    case(
        "tif_ok_imagej_volume",
        tiff(G, imagej=True, metadata={"axes": "ZYX", "spacing": 1.5, "unit": "mm"}),
        "ok",
        frames=G,
        check=slice_is(1.5),
    )
    case("tif_ok_rgb", tiff(rgb, photometric="rgb"), "ok", frames=rgb)
    case(
        "tif_ok_planar_rgb",
        tiff(
            np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)),
            photometric="rgb",
            planarconfig="separate",
        ),
        "ok",
        frames=rgb,
    )
    case("tif_ok_uint16", tiff(u16), "ok", frames=u16)
    case("tif_ok_float32", tiff(f32), "ok", frames=f32)
    case("tif_ok_float64", tiff(f32.astype(np.float64)), "ok", frames=f32.astype(np.float64))
    case("tif_ok_single_page", tiff(G[0]), "ok", frames=G[:1])
    case("tif_1x1", tiff(G[:, :1, :1]), "either", frames=G[:, :1, :1])
    case("tif_ok_zlib", tiff(G, compression="zlib"), "ok", frames=G)
    case("tif_ok_bool", tiff(G > 128), "ok", frames=G > 128)
    case("tif_ok_int8", tiff(G.view(np.int8)), "ok", frames=G.view(np.int8))
    hyper = rand_u8((2, 3, 2, 8, 9), 11)
    case(
        "tif_ok_hyperstack",
        tiff(hyper, imagej=True, metadata={"axes": "TZCYX"}),
        "ok",
        frames=hyper.reshape(-1, 8, 9),
    )
    case("tif_ok_named_dcm", tiff(G, name="x.dcm"), "ok", frames=G)
    case("tif_ok_no_extension", tiff(G, name="stack"), "ok", frames=G)
    # --- NaN / inf
    case(
        "tif_nan",
        tiff(with_nan(f32, np.nan)),
        "ok",
        frames=sanitized(with_nan(f32, np.nan)),
        warn="NaN",
    )
    case(
        "tif_posinf",
        tiff(with_nan(f32, np.inf)),
        "ok",
        frames=sanitized(with_nan(f32, np.inf)),
        warn="NaN/inf",
    )
    case(
        "tif_neginf",
        tiff(with_nan(f32, -np.inf)),
        "ok",
        frames=sanitized(with_nan(f32, -np.inf)),
        warn="NaN/inf",
    )
    all_nan = f32.copy()
    all_nan[1] = np.nan
    case("tif_all_nan_frame", tiff(all_nan), "ok", frames=sanitized(all_nan), warn="no finite")
    f16 = with_nan(f32, np.nan).astype(np.float16)
    case("tif_nan_float16", tiff(f16), "ok", frames=sanitized(f16), warn="NaN")
    case(
        "tif_nan_imagej",
        tiff(with_nan(f32, np.nan), **ij),
        "ok",
        frames=sanitized(with_nan(f32, np.nan)),
    )
    # --- calibration
    for i, (meta, res, check) in enumerate(
        [
            ({"unit": "mm", "finterval": -1.0}, None, fps_is(None)),
            ({"unit": "mm", "finterval": 1e-9}, None, fps_is(None)),
            ({"unit": "mm", "fps": 1e9}, None, fps_is(None)),
            ({"unit": "mm", "fps": "abc"}, None, fps_is(None)),
            ({"unit": "mm"}, (1e-12, 1e-12), spacing_is(None)),
            ({"unit": "mm"}, (1e9, 1e9), spacing_is(None)),
            ({"unit": "parsec"}, (2.0, 2.0), spacing_is(None)),
            ({"axes": "ZYX", "unit": "mm", "spacing": -2.0}, None, slice_is(None)),
            ({"axes": "ZYX", "unit": "mm", "spacing": 1e9}, None, slice_is(None)),
            ({"unit": "mm", "finterval": 0.0}, None, fps_is(None)),
        ]
    ):
        kw: dict[str, Any] = {"imagej": True, "metadata": meta}
        if res:
            kw["resolution"] = res
        case(f"tif_calibration_{i}", tiff(G, **kw), "ok", frames=G, check=check)
    for i, (size, check) in enumerate(
        [
            ("nan", spacing_is(None)),
            ("-1", spacing_is(None)),
            ("abc", spacing_is(None)),
            ("1e9", spacing_is(None)),
            ("200", spacing_is((0.2, 0.2))),
        ]
    ):
        case(f"tif_ome_size_{i}", lambda d, s=size: _ome(d, s), "ok", frames=G, check=check)
    # --- broken files
    case("tif_truncated_half", _cut_tiff(G, 0.5), "either", frames=G)
    case("tif_truncated_100", _cut_tiff(G, 100), "error")
    case(
        "tif_magic_garbage",
        lambda d: _write(d / "g.tif", b"II*\0" + rand_u8((500,), 3).tobytes()),
        "error",
    )
    case("tif_magic_only", lambda d: _write(d / "m.tif", b"II*\0"), "error")
    case("tif_zero_bytes", lambda d: _write(d / "z.tif", b""), "error", cause="empty")
    case("tif_huge_declared", _huge_tiff, "error", cause="limit", huge=True)
    case(
        "tif_two_samples",
        tiff(rand_u8((2, 8, 9, 2), 4), photometric="minisblack", planarconfig="contig"),
        "either",
    )
    case(
        "tif_imagej_claims_many_images",
        lambda d: _imagej_images(d, 10**9),
        "either",
        frames=G,
    )


def _cut_tiff(arr: np.ndarray, keep: float) -> Callable[[Path], Path]:
    """Builder: a TIFF cut to ``keep`` bytes (int) or fraction (float)."""

    def build(d: Path) -> Path:
        path = d / "cut.tif"
        tifffile.imwrite(path, arr, photometric="minisblack")
        data = path.read_bytes()
        n = int(len(data) * keep) if isinstance(keep, float) else int(keep)
        path.write_bytes(data[:n])
        return path

    return build


def _ome(d: Path, size: str) -> Path:
    """OME-TIFF of G whose PhysicalSizeX/Y are ``size`` micrometres (written verbatim)."""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
        '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" '
        f'SizeX="20" SizeY="16" SizeC="1" SizeZ="1" SizeT="3" PhysicalSizeX="{size}" '
        f'PhysicalSizeY="{size}"><Channel ID="Channel:0:0" SamplesPerPixel="1"/>'
        "<TiffData/></Pixels></Image></OME>"
    )
    path = d / "x.ome.tif"
    tifffile.imwrite(path, G, description=xml, metadata=None, photometric="minisblack")
    return path


def _patch_tag(path: Path, names_values: dict[str, int]) -> None:
    """Overwrite the inline values of first-page tags (SHORT/LONG) in place."""
    with tifffile.TiffFile(path) as tif:
        spots = [
            (tif.pages[0].tags[name].valueoffset, tif.pages[0].tags[name].dtype, v)
            for name, v in names_values.items()
        ]
    data = bytearray(path.read_bytes())
    for offset, dtype, value in spots:
        fmt = "<H" if int(dtype) == 3 else "<I"
        struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


def _huge_tiff(d: Path) -> Path:
    """A 1 KB TIFF whose first page declares 65535 x 65535 pixels."""
    path = d / "huge.tif"
    tifffile.imwrite(path, G[0])
    _patch_tag(path, {"ImageWidth": 65535, "ImageLength": 65535})
    return path


def _imagej_images(d: Path, images: int) -> Path:
    """An ImageJ TIFF of G whose description claims ``images`` images."""
    path = d / "many.tif"
    tifffile.imwrite(path, G, imagej=True)
    data = path.read_bytes().replace(b"images=3", f"images={images}".encode(), 1)
    path.write_bytes(data)
    return path


# =========================================================================== NIfTI
def nifti(
    vol: np.ndarray,
    zooms: tuple[float, ...] = (0.3, 0.2, 1.5),
    name: str = "v.nii",
    affine: np.ndarray | None = None,
    header: Callable[[Any], None] | None = None,
    post: Callable[[bytes], bytes] | None = None,
) -> Callable[[Path], Path]:
    """Builder: NIfTI-1 of ``vol`` in nibabel (x, y, z[, t]) order with ``zooms``."""

    def build(d: Path) -> Path:
        aff = np.eye(4) if affine is None else affine
        img = nib.Nifti1Image(vol, aff)
        img.header.set_zooms((*zooms, 1.0, 1.0)[: vol.ndim])
        img.header.set_xyzt_units("mm")
        if header:
            header(img.header)
        path = d / name
        nib.save(img, str(path))
        if post:
            path.write_bytes(post(path.read_bytes()))
        return path

    return build


def as_frames(vol: np.ndarray) -> np.ndarray:
    """Expected scan frames (Z, H, W) of a (x, y, z) NIfTI array."""
    return np.ascontiguousarray(vol.transpose(2, 1, 0))


def _nifti_dim(data: bytes, dims: tuple[int, ...]) -> bytes:
    """Rewrite the NIfTI-1 ``dim`` field (offset 40, 8 x int16)."""
    out = bytearray(data)
    struct.pack_into("<8h", out, 40, *dims, *([1] * (8 - len(dims))))
    return bytes(out)


def _nifti_pixdim(data: bytes, zooms: tuple[float, ...]) -> bytes:
    """Rewrite pixdim[1:4] (offset 80, float32) verbatim, bypassing nibabel's checks."""
    out = bytearray(data)
    struct.pack_into("<3f", out, 80, *zooms)
    return bytes(out)


def _nifti_sform(data: bytes, value: float) -> bytes:
    """Make the sform (codes at 252/254, srow at 280) all ``value`` and the only transform."""
    out = bytearray(data)
    struct.pack_into("<hh", out, 252, 0, 1)
    struct.pack_into("<12f", out, 280, *([value] * 12))
    return bytes(out)


def _nifti_cases() -> None:
    v8 = rand_u8((12, 10, 4), 12)
    vf = np.random.default_rng(13).normal(size=(12, 10, 4)).astype(np.float32)
    case(
        "nii_ok_uint8",
        nifti(v8),
        "ok",
        frames=as_frames(v8),
        check=lambda s: (spacing_is((0.2, 0.3))(s), slice_is(1.5)(s)),
    )
    case("nii_ok_gz", nifti(v8, name="v.nii.gz"), "ok", frames=as_frames(v8))
    case(
        "nii_ok_int16",
        nifti(v8.astype(np.int16) - 100),
        "ok",
        frames=as_frames(v8.astype(np.int16) - 100),
    )
    case("nii_ok_float32", nifti(vf), "ok", frames=as_frames(vf))
    case("nii_ok_2d", nifti(v8[:, :, 0]), "ok", frames=as_frames(v8[:, :, :1]))
    case("nii_ok_4d_t1", nifti(v8[..., None]), "ok", frames=as_frames(v8))

    def scaled(h: Any) -> None:
        h.set_slope_inter(2.0, 1.0)

    case(
        "nii_ok_scaled",
        nifti(v8, header=scaled),
        "ok",
        frames=as_frames(v8.astype(np.float64) * 2 + 1),
    )
    case(
        "nii_nan_affine",
        nifti(v8, post=lambda b: _nifti_sform(b, float("nan"))),
        "ok",
        frames=as_frames(v8),
    )
    case(
        "nii_singular_affine",
        nifti(v8, post=lambda b: _nifti_sform(b, 0.0)),
        "ok",
        frames=as_frames(v8),
    )
    for i, (zooms, spacing, dz) in enumerate(
        [
            ((np.nan, 0.2, 1.5), None, 1.5),
            ((0.0, 0.0, 0.0), None, None),
            ((-1.0, -1.0, -1.0), None, None),
            ((1e9, 1e9, 1e9), None, None),
            ((1e-9, 1e-9, 1e-9), None, None),
            ((np.inf, np.inf, np.inf), None, None),
            ((0.3, 0.2, 1.5), (0.2, 0.3), 1.5),
        ]
    ):
        case(
            f"nii_zooms_{i}",
            nifti(v8, post=lambda b, z=zooms: _nifti_pixdim(b, z)),
            "ok",
            frames=as_frames(v8),
            check=lambda s, sp=spacing, z=dz: (spacing_is(sp)(s), slice_is(z)(s)),
        )
    vn = with_nan(vf.transpose(2, 1, 0), np.nan).transpose(2, 1, 0)
    case(
        "nii_nan",
        nifti(np.ascontiguousarray(vn)),
        "ok",
        frames=sanitized(as_frames(vn)),
        warn="NaN",
    )
    vi = with_nan(vf.transpose(2, 1, 0), np.inf).transpose(2, 1, 0)
    case(
        "nii_inf",
        nifti(np.ascontiguousarray(vi)),
        "ok",
        frames=sanitized(as_frames(vi)),
        warn="NaN/inf",
    )
    va = vf.copy()
    va[:, :, 2] = np.nan
    case("nii_all_nan_slice", nifti(va), "ok", frames=sanitized(as_frames(va)), warn="no finite")
    case("nii_4d", nifti(rand_u8((6, 5, 4, 3), 14)), "error", cause="3-D")
    case("nii_1d", nifti(rand_u8((30,), 14)), "error")
    case("nii_zero_dim", nifti(v8, post=lambda b: _nifti_dim(b, (3, 12, 10, 0))), "error")
    case("nii_negative_dim", nifti(v8, post=lambda b: _nifti_dim(b, (3, 12, -10, 4))), "error")
    case(
        "nii_huge_dims",
        nifti(v8, post=lambda b: _nifti_dim(b, (3, 30000, 30000, 30000))),
        "error",
        cause="limit",
        huge=True,
    )
    case(
        "nii_huge_slice",
        nifti(v8, post=lambda b: _nifti_dim(b, (3, 32767, 32767, 1))),
        "error",
        cause="limit",
        huge=True,
    )
    case(
        "nii_truncated", nifti(v8, post=lambda b: b[: len(b) - 200]), "either", frames=as_frames(v8)
    )
    case("nii_truncated_header", nifti(v8, post=lambda b: b[:200]), "error")
    case("nii_gz_garbage", lambda d: _write(d / "g.nii.gz", rand_u8((900,), 15).tobytes()), "error")
    case("nii_gz_of_garbage", lambda d: _write(d / "h.nii.gz", zlib.compress(b"x" * 500)), "error")
    case(
        "nii_rgb24",
        lambda d: _nifti_rgb(d),
        "error",
    )
    case("nii_complex", nifti(vf.astype(np.complex64)), "error")

    def bad_datatype(b: bytes) -> bytes:
        out = bytearray(b)
        struct.pack_into("<h", out, 70, 9999)
        return bytes(out)

    case("nii_bad_datatype", nifti(v8, post=bad_datatype), "error")

    def far_offset(b: bytes) -> bytes:
        out = bytearray(b)
        struct.pack_into("<f", out, 108, 1e9)
        return bytes(out)

    case("nii_vox_offset_beyond_file", nifti(v8, post=far_offset), "error")


def _nifti_rgb(d: Path) -> Path:
    """A NIfTI with RGB24 voxels."""
    rgb = np.zeros((4, 5, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    img = nib.Nifti1Image(rgb, np.eye(4))
    nib.save(img, str(d / "rgb.nii"))
    return d / "rgb.nii"


# =========================================================================== images
def cv_image(
    arr: np.ndarray, name: str, post: Callable[[bytes], bytes] | None = None
) -> Callable[[Path], Path]:
    """Builder: OpenCV-encoded image of ``arr`` (RGB order given, stored as BGR)."""

    def build(d: Path) -> Path:
        img = arr
        if arr.ndim == 3 and arr.shape[2] == 3:
            img = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
        elif arr.ndim == 3 and arr.shape[2] == 4:
            img = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
        ok, buf = cv2.imencode(Path(name).suffix if Path(name).suffix else ".png", img)
        assert ok
        data = buf.tobytes()
        return _write(d / name, post(data) if post else data)

    return build


def pil_image(
    arr: np.ndarray, mode: str, name: str = "p.png", **save: Any
) -> Callable[[Path], Path]:
    """Builder: Pillow image ``Image.fromarray(arr).convert(mode)`` saved as ``name``."""

    def build(d: Path) -> Path:
        Image.fromarray(arr).convert(mode).save(d / name, **save)
        return d / name

    return build


def png_bytes(width: int, height: int, depth: int = 8, colour: int = 0, rows: int = 4) -> bytes:
    """A PNG declaring ``width x height`` whose IDAT holds only ``rows`` (tiny file)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    channels = {0: 1, 2: 3, 6: 4}[colour]
    # Only the first rows' worth of zeros (at most 1 MB): the file stays tiny whatever it declares.
    payload = bytes(min(rows * (1 + width * channels * depth // 8), 1 << 20))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(payload))
        + chunk(b"IEND", b"")
    )


def jpeg_declaring(height: int, width: int) -> Callable[[Path], Path]:
    """Builder: a small JPEG whose SOF0 header is patched to ``height x width``."""

    def build(d: Path) -> Path:
        _ok, buf = cv2.imencode(".jpg", smooth(1)[0])
        data = bytearray(buf.tobytes())
        sof = data.find(b"\xff\xc0")
        struct.pack_into(">HH", data, sof + 5, height, width)
        return _write(d / "huge.jpg", bytes(data))

    return build


def bmp_declaring(height: int, width: int) -> Callable[[Path], Path]:
    """Builder: a small BMP whose header is patched to ``height x width``."""

    def build(d: Path) -> Path:
        _ok, buf = cv2.imencode(".bmp", smooth(1)[0])
        data = bytearray(buf.tobytes())
        struct.pack_into("<ii", data, 18, width, height)
        return _write(d / "huge.bmp", bytes(data))

    return build


def _image_cases() -> None:
    gray = rand_u8((24, 30), 20)
    rgb = rand_u8((24, 30, 3), 21)
    rgba = rand_u8((24, 30, 4), 22)
    g16 = np.random.default_rng(23).integers(0, 65535, (24, 30), dtype=np.uint16)
    rgb16 = np.random.default_rng(24).integers(0, 65535, (24, 30, 3), dtype=np.uint16)
    sm = smooth(1, 32, 48)[0]
    smc = smooth(1, 32, 48, rgb=True)[0]
    case("png_ok_gray", cv_image(gray, "g.png"), "ok", frames=gray[None])
    case("png_ok_rgb", cv_image(rgb, "c.png"), "ok", frames=rgb[None])
    case("png_ok_rgba", cv_image(rgba, "a.png"), "ok", frames=rgba[None, ..., :3])
    case(
        "png_ok_gray_as_rgb",
        cv_image(np.repeat(gray[..., None], 3, 2), "gg.png"),
        "ok",
        frames=gray[None],
    )
    case("png_ok_16bit", cv_image(g16, "g16.png"), "ok", frames=g16[None])
    case("png_ok_16bit_rgb", cv_image(rgb16, "c16.png"), "ok", frames=rgb16[None])
    palette = np.asarray(Image.fromarray(rgb).convert("P").convert("RGB"))
    case("png_ok_palette", pil_image(rgb, "P"), "ok", frames=palette[None])
    case("png_ok_gray_alpha", pil_image(gray, "LA", "la.png"), "ok", frames=gray[None])
    case(
        "png_ok_1bit",
        pil_image(gray, "1", "b.png"),
        "ok",
        frames=(np.asarray(Image.fromarray(gray).convert("1")).astype(np.uint8) * 255)[None],
    )
    case(
        "png_ok_interlaced", pil_image(gray, "L", "i.png", optimize=False), "ok", frames=gray[None]
    )
    case("jpg_ok_gray", cv_image(sm, "g.jpg"), "ok", frames=sm[None], tol=10)
    case("jpg_ok_rgb", cv_image(smc, "c.jpg"), "ok", frames=smc[None], tol=14)
    case("bmp_ok_gray", cv_image(gray, "g.bmp"), "ok", frames=gray[None])
    case("bmp_ok_rgb", cv_image(rgb, "c.bmp"), "ok", frames=rgb[None])
    case("png_ok_1x1", cv_image(gray[:1, :1], "one.png"), "ok", frames=gray[None, :1, :1])
    wide = rand_u8((1, 3000), 25)
    case("png_ok_1x3000", cv_image(wide, "wide.png"), "ok", frames=wide[None])
    case("png_named_jpg", _renamed(cv_image(gray, "r.png"), "r.jpg"), "ok", frames=gray[None])
    case("jpg_named_png", _renamed(cv_image(sm, "r.jpg"), "r.png"), "ok", frames=sm[None], tol=10)
    case("png_no_extension", _renamed(cv_image(gray, "r.png"), "noext"), "ok", frames=gray[None])
    case(
        "png_trailing_garbage",
        cv_image(gray, "t.png", post=lambda b: b + b"garbage" * 10),
        "ok",
        frames=gray[None],
    )
    # --- broken
    case("png_zero_bytes", lambda d: _write(d / "z.png", b""), "error", cause="empty")
    for frac in (0.2, 0.5, 0.95):
        case(
            f"png_truncated_{frac}",
            cv_image(gray, "t.png", post=lambda b, f=frac: b[: int(len(b) * f)]),
            "error",
        )
        case(
            f"jpg_truncated_{frac}",
            cv_image(sm, "t.jpg", post=lambda b, f=frac: b[: int(len(b) * f)]),
            "error",
        )
    case("png_header_only", cv_image(gray, "h.png", post=lambda b: b[:33]), "error")
    case("png_text", lambda d: _write(d / "t.png", b"hello, not an image\n" * 20), "error")

    def bad_crc(b: bytes) -> bytes:
        out = bytearray(b)
        idat = out.find(b"IDAT")
        out[idat + 10] ^= 0xFF
        return bytes(out)

    case("png_corrupt_idat", cv_image(gray, "crc.png", post=bad_crc), "either", frames=gray[None])
    case("png_gif_inside", lambda d: _gif(d), "either")
    case("png_width_zero", lambda d: _write(d / "w0.png", png_bytes(0, 10)), "error")
    # --- declared huge: refused from the header, before decoding
    case(
        "png_huge_20000",
        lambda d: _write(d / "huge.png", png_bytes(20000, 20000, rows=2000)),
        "error",
        cause="limit",
        huge=True,
    )
    case(
        "png_huge_rgb",
        lambda d: _write(d / "huge.png", png_bytes(70000, 70000, colour=2)),
        "error",
        cause="limit",
        huge=True,
    )
    case(
        "png_huge_16bit",
        lambda d: _write(d / "huge.png", png_bytes(9000, 9000, depth=16, colour=6)),
        "error",
        cause="limit",
        huge=True,
    )
    case(
        "png_huge_max",
        lambda d: _write(d / "huge.png", png_bytes(2**31 - 1, 2**31 - 1)),
        "error",
        huge=True,
    )
    case("jpg_huge_declared", jpeg_declaring(60000, 60000), "error", cause="large|limit", huge=True)
    case("bmp_huge_declared", bmp_declaring(50000, 50000), "error", cause="large|limit", huge=True)
    case("bmp_negative_height", bmp_declaring(-32, 48), "either")


def _renamed(build: Callable[[Path], Path], name: str) -> Callable[[Path], Path]:
    """Builder: ``build`` then rename the file to ``name``."""

    def wrapped(d: Path) -> Path:
        return build(d).rename(d / name)

    return wrapped


def _gif(d: Path) -> Path:
    """A GIF file named .png."""
    Image.fromarray(rand_u8((10, 12), 26)).save(d / "gif.png", format="GIF")
    return d / "gif.png"


# =========================================================================== video
def video(
    frames: np.ndarray, name: str, fps: float = 10.0, post: Callable[[bytes], bytes] | None = None
) -> Callable[[Path], Path]:
    """Builder: ``write_video`` then optional byte surgery."""

    def build(d: Path) -> Path:
        path = write_video(d / name, frames, fps=fps)
        if post:
            path.write_bytes(post(path.read_bytes()))
        return path

    return build


def _shape_as_container(scan: Any) -> None:
    """The scan's frame size is what the container declares (OpenCV writers round odd sizes)."""
    cap = cv2.VideoCapture(str(scan.path))
    declared = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
    cap.release()
    assert scan.shape[1:3] == declared and scan.n_frames == 3, (scan.shape, declared)


def _avi_lie(data: bytes) -> bytes:
    """AVI headers claiming 60000 x 60000 pixels and 2e9 frames (the JPEG frames say 32 x 48)."""
    out = bytearray(data)
    avih = out.find(b"avih") + 8
    struct.pack_into("<I", out, avih + 16, 2_000_000_000)  # dwTotalFrames
    struct.pack_into("<II", out, avih + 32, 60000, 60000)  # dwWidth, dwHeight
    strf = out.find(b"strf") + 8
    struct.pack_into("<ii", out, strf + 4, 60000, 60000)  # biWidth, biHeight
    return bytes(out)


def _zero_frame_avi(d: Path) -> Path:
    """An AVI container without frames."""
    path = d / "none.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 32))
    writer.release()
    return path


def _video_cases() -> None:
    sm = smooth(5, 32, 48)
    smc = smooth(4, 32, 48, rgb=True)
    one = smooth(1, 32, 48)
    case("avi_one_frame", video(one, "one.avi"), "ok", frames=one, tol=12)
    case("mp4_one_frame", video(one, "one.mp4"), "ok", frames=one, tol=12)
    case("avi_two_frames", video(sm[:2], "two.avi"), "ok", frames=sm[:2], tol=12)
    case("avi_gray", video(sm, "g.avi"), "ok", frames=sm, tol=12, check=fps_is(10.0))
    case("mp4_gray", video(sm, "g.mp4"), "ok", frames=sm, tol=12)
    case("mp4_rgb", video(smc, "c.mp4"), "ok", frames=smc, tol=25)
    case("mkv_gray", video(sm, "g.mkv"), "either", frames=sm, tol=12)
    case("mov_gray", video(sm, "g.mov"), "either", frames=sm, tol=12)
    odd = smooth(3, 15, 17)
    case("avi_odd_size", video(odd, "odd.avi"), "ok", check=_shape_as_container)
    case("avi_fps_huge", video(sm, "f.avi", fps=1e6), "either", frames=sm, tol=12)
    case("avi_lying_header", video(sm, "l.avi", post=_avi_lie), "ok", frames=sm, tol=12)
    case("avi_zero_frames", _zero_frame_avi, "error")
    case("mp4_random", lambda d: _write(d / "r.mp4", rand_u8((4000,), 30).tobytes()), "error")
    case(
        "avi_riff_garbage",
        lambda d: _write(d / "r.avi", b"RIFF\0\0\0\0AVI " + rand_u8((900,), 31).tobytes()),
        "error",
    )
    case(
        "avi_truncated_half",
        video(smooth(10, 32, 48), "t.avi", post=lambda b: b[: len(b) // 2]),
        "either",
        frames=smooth(10, 32, 48),
        tol=12,
    )
    case(
        "mp4_truncated_half",
        video(smooth(10, 32, 48), "t.mp4", post=lambda b: b[: len(b) // 2]),
        "either",
        frames=smooth(10, 32, 48),
        tol=12,
    )
    case("avi_truncated_200", video(sm, "t2.avi", post=lambda b: b[:200]), "error")
    case("mkv_empty_named", lambda d: _write(d / "e.mkv", b"\x1a\x45\xdf\xa3"), "error")


# =========================================================================== folders
def folder(files: dict[str, Callable[[Path], Any]], name: str = "scan") -> Callable[[Path], Path]:
    """Builder: a folder whose entries are made by ``files[name](path)``."""

    def build(d: Path) -> Path:
        root = d / name
        root.mkdir()
        for fname, make in files.items():
            make(root / fname)
        return root

    return build


def png(arr: np.ndarray) -> Callable[[Path], Any]:
    """Entry maker: write ``arr`` as an image with OpenCV (RGB given)."""

    def make(p: Path) -> None:
        img = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
        ext = p.suffix.lower() if p.suffix.lower() in (".png", ".tif", ".jpg", ".bmp") else ".png"
        ok, buf = cv2.imencode(ext, img)
        assert ok
        p.write_bytes(buf.tobytes())

    return make


def _folder_cases() -> None:
    fr = rand_u8((4, 12, 14), 40)
    case("dir_ok_pngs", folder({f"f{i}.png": png(fr[i]) for i in range(4)}), "ok", frames=fr)
    order = {
        "img10.png": png(fr[3]),
        "img2.png": png(fr[1]),
        "img1.png": png(fr[0]),
        "img3.png": png(fr[2]),
    }
    case("dir_ok_natural_order", folder(order), "ok", frames=fr)
    case("dir_ok_single", folder({"a.png": png(fr[0])}), "ok", frames=fr[:1])
    case(
        "dir_ok_ignores_other_files",
        folder(
            {
                "a.png": png(fr[0]),
                "b.png": png(fr[1]),
                "notes.txt": lambda p: p.write_text("x"),
                ".hidden.png": lambda p: p.write_bytes(b"junk"),
            }
        ),
        "ok",
        frames=fr[:2],
    )
    case(
        "dir_ok_dangling_link",
        folder({"a.png": png(fr[0]), "b.png": lambda p: p.symlink_to(p.parent / "missing.png")}),
        "ok",
        frames=fr[:1],
    )
    case(
        "dir_ok_link_loop",
        folder({"a.png": png(fr[0]), "loop.png": lambda p: p.symlink_to(p)}),
        "ok",
        frames=fr[:1],
    )
    case("dir_ok_tiffs", folder({f"t{i}.tif": png(fr[i]) for i in range(3)}), "ok", frames=fr[:3])
    g16 = np.random.default_rng(41).integers(0, 65535, (2, 12, 14), dtype=np.uint16)
    case("dir_ok_16bit", folder({f"s{i}.png": png(g16[i]) for i in range(2)}), "ok", frames=g16)
    many = rand_u8((40, 6, 7), 42)
    case(
        "dir_ok_40_frames",
        folder({f"m{i:03d}.png": png(many[i]) for i in range(40)}),
        "ok",
        frames=many,
    )
    case(
        "dir_ok_unicode",
        folder({"bild ü 1.png": png(fr[0]), "bild ü 2.png": png(fr[1])}, name="süß 超音波"),
        "ok",
        frames=fr[:2],
    )
    rgb = rand_u8((12, 14, 3), 43)
    case("dir_mixed_gray_rgb", folder({"a.png": png(fr[0]), "b.png": png(rgb)}), "either")
    case("dir_empty", folder({}), "error", cause="no images")
    case("dir_only_subfolder", folder({"sub": lambda p: p.mkdir()}), "error", cause="no images")
    case(
        "dir_only_text", folder({"a.txt": lambda p: p.write_text("x")}), "error", cause="no images"
    )
    case(
        "dir_mixed_sizes",
        folder({"a.png": png(fr[0]), "b.png": png(rand_u8((13, 14), 44))}),
        "error",
        cause="size",
    )
    case(
        "dir_corrupt_second",
        folder(
            {
                "a.png": png(fr[0]),
                "b.png": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 40),
            }
        ),
        "error",
    )
    case(
        "dir_corrupt_first",
        folder({"a.png": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n"), "b.png": png(fr[0])}),
        "error",
    )
    case(
        "dir_mixed_bit_depth",
        folder({"a.png": png(fr[0]), "b.png": png(g16[0])}),
        "either",
        frames=fr[:2],
    )
    case(
        "dir_huge_declared",
        folder({"a.png": png(fr[0]), "b.png": lambda p: p.write_bytes(png_bytes(20000, 20000))}),
        "error",
        huge=True,
    )
    case(
        "dir_huge_first",
        folder({"a.png": lambda p: p.write_bytes(png_bytes(30000, 30000)), "b.png": png(fr[0])}),
        "error",
        cause="limit",
        huge=True,
    )
    case(
        "dir_too_many_frames_for_cap",
        folder(
            {
                f"b{i}.png": (lambda p: p.write_bytes(png_bytes(7000, 7000, colour=2)))
                for i in range(3)
            }
        ),
        "error",
        cause="limit",
        huge=True,
    )


# =========================================================================== links, names
def named(name: str, make: Callable[[Path], Any] | None = None) -> Callable[[Path], Path]:
    """Builder: a small valid PNG (or ``make``) at ``d / name``."""

    def build(d: Path) -> Path:
        path = d / name
        (make or png(rand_u8((10, 12), 50)))(path)
        return path

    return build


def _link_cases() -> None:
    img = rand_u8((10, 12), 50)

    def link_to_dicom(d: Path) -> Path:
        target = dicom()(d)
        (d / "link.dcm").symlink_to(target)
        return d / "link.dcm"

    case("link_to_dicom", link_to_dicom, "ok", frames=G)

    def link_chain(d: Path) -> Path:
        target = named("t.png")(d)
        (d / "l1.png").symlink_to(target)
        (d / "l2.png").symlink_to(d / "l1.png")
        (d / "l3").symlink_to(d / "l2.png")
        return d / "l3"

    case("link_chain", link_chain, "ok", frames=img[None])

    def link_to_folder(d: Path) -> Path:
        (d / "real").mkdir()
        for i in range(2):
            png(img)(d / "real" / f"{i}.png")
        (d / "alias").symlink_to(d / "real")
        return d / "alias"

    case("link_to_folder", link_to_folder, "ok", frames=np.stack([img, img]))

    def hardlink(d: Path) -> Path:
        target = named("t.png")(d)
        os.link(target, d / "h.png")
        return d / "h.png"

    case("hardlink", hardlink, "ok", frames=img[None])

    def dangling(d: Path) -> Path:
        (d / "gone.dcm").symlink_to(d / "nowhere.dcm")
        return d / "gone.dcm"

    case("link_dangling", dangling, "error", cause="link")

    def self_loop(d: Path) -> Path:
        (d / "self.dcm").symlink_to(d / "self.dcm")
        return d / "self.dcm"

    case("link_self_loop", self_loop, "error", cause="link")

    def two_cycle(d: Path) -> Path:
        (d / "a.png").symlink_to(d / "b.png")
        (d / "b.png").symlink_to(d / "a.png")
        return d / "a.png"

    case("link_two_cycle", two_cycle, "error", cause="link")

    def fifo(d: Path) -> Path:
        os.mkfifo(d / "pipe.dcm")
        return d / "pipe.dcm"

    case("fifo_named_dcm", fifo, "error", cause="regular file")
    case("dev_null", lambda d: Path(os.devnull), "error", cause="regular file")
    case("missing_path", lambda d: d / "does-not-exist.dcm", "error", cause="no such file")
    case("nul_in_name", lambda d: Path(str(d / "bad\0name.png")), "error")

    def dir_named_dcm(d: Path) -> Path:
        (d / "scan.dcm").mkdir()
        return d / "scan.dcm"

    case("dir_named_dcm", dir_named_dcm, "error", cause="no images")
    for i, name in enumerate(
        [
            "with space.png",
            "süß 超音波.png",
            "new\nline.png",
            "tab\tname.png",
            "x" * 240 + ".png",
            "%s{}[]*?.png",
            "-dash.png",
            ".hidden.png",
            "UPPER.PNG",
            "quote'\"name.png",
            "a;rm -rf ~.png",
            "emoji_🩻.png",
        ]
    ):
        case(f"name_{i}", named(name), "ok", frames=img[None])
    case("name_png_as_dcm", named("image.dcm"), "ok", frames=img[None])
    case("name_double_ext", named("scan.png.dcm"), "ok", frames=img[None])
    case("name_dicom_unicode", dicom(name="Müller 心臓 cine.dcm"), "ok", frames=G)
    case("name_dicom_newline", dicom(name="line\nbreak.dcm"), "ok", frames=G)


for _register in (
    _dicom_cases,
    _tiff_cases,
    _nifti_cases,
    _image_cases,
    _video_cases,
    _folder_cases,
    _link_cases,
):
    _register()


# =========================================================================== the runner
class _Hang(Exception):
    """Raised by the alarm when a case runs past its time budget."""


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise :class:`_Hang` in the main thread after ``seconds``."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


TALLY: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _fuzz_limits(request: pytest.FixtureRequest):
    """Small decoded-size limits for the run; print the tally at the end."""
    import resource

    from usfm_core.commands.info import compute_report

    compute_report()  # import torch & co. first: the RSS baseline is then the readers' own
    old = set_decoded_limits(total_mb=TOTAL_CAP_MB, frame_mb=FRAME_CAP_MB)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    set_decoded_limits(*old)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    line = (
        f"fuzz: {TALLY['inputs']} inputs x 3 entry points; loaded {TALLY['loaded']}, "
        f"refused {TALLY['refused']}, napari declined {TALLY['declined']}; tracebacks "
        f"{TALLY['traceback']}, hangs {TALLY['hang']}, silently wrong {TALLY['wrong']}, "
        f"over cap {TALLY['overcap']}, unclear errors {TALLY['unclear']}; max RSS grew "
        f"{(rss1 - rss0) / 1024:.0f} MB"
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session folder holding one sub-folder per case."""
    return tmp_path_factory.mktemp("fuzz")


def _names_file(exc: USFMError, path: Path) -> bool:
    """True when the error message names ``path`` (or a file inside it, for folders)."""
    if exc.path is None:
        return False
    same = exc.path == path or path in exc.path.parents
    shown = str(exc.path)
    shown = shown if shown.isprintable() else repr(shown)[1:-1]
    return same and shown in str(exc)


def _compare(frames: list[np.ndarray], case_: Case, scan: Any) -> str | None:
    """Why the decoded frames disagree with what was written (None when they agree)."""
    exp = case_.frames
    if exp is None:
        return None
    if case_.expect == "ok" and len(frames) != len(exp):
        return f"{len(frames)} frames, expected {len(exp)}"
    if len(frames) > len(exp):
        return f"{len(frames)} frames, only {len(exp)} were written"
    for i, got in enumerate(frames):
        want = exp[i]
        if got.shape != want.shape:
            return f"frame {i} shape {got.shape}, expected {want.shape}"
        if got.dtype != want.dtype and case_.tol == 0 and want.dtype.kind != "f":
            return f"frame {i} dtype {got.dtype}, expected {want.dtype}"
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        if not np.isfinite(got.astype(np.float64)).all():
            return f"frame {i} holds NaN/inf"
        if diff.max() > case_.tol + (1e-6 if want.dtype.kind == "f" else 0):
            return f"frame {i} differs by {diff.max():g} (tolerance {case_.tol})"
    return None


def _entry_load(case_: Case, path: Path, problems: list[str]) -> bool:
    """``load_scan`` + every frame, memory traced. Returns True when the scan loaded."""
    tracemalloc.start()
    loaded = False
    frames: list[np.ndarray] = []
    error: USFMError | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scan = load_scan(path)
            loaded = True
            for i in range(scan.n_frames):
                frames.append(scan.frame(i))
            detail = _compare(frames, case_, scan)
            if detail is None and case_.check is not None:
                try:
                    case_.check(scan)
                except AssertionError as exc:
                    detail = f"check failed: {exc}"
            if detail is None:
                detail = _scan_sane(scan)
            if detail:
                problems.append(f"wrong: load_scan: {detail}")
            scan.close()
        except USFMError as exc:
            error = exc
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    cap = HUGE_PEAK if case_.huge else MEMORY_CAP
    if peak > cap:
        problems.append(
            f"overcap: load_scan traced peak {peak / 2**20:.0f} MB > {cap / 2**20:.0f} MB"
        )
    if error is not None:
        _check_error(case_, path, error, problems, "load_scan", partial=loaded)
        if loaded and frames and not any("wrong" in p for p in problems):
            # A scan that opened and then failed on a frame: the frames it gave must be right.
            detail = _compare(frames, case_, None) if case_.frames is not None else None
            if detail and case_.expect != "error":
                problems.append(f"wrong: frames before the error: {detail}")
        return False
    if case_.expect == "error":
        problems.append("wrong: load_scan accepted an input that must be refused")
    if case_.warn:
        messages = [str(w.message) for w in caught if issubclass(w.category, ScanWarning)]
        if not any(re.search(case_.warn, m) for m in messages):
            problems.append(f"wrong: no ScanWarning matching {case_.warn!r} (got {messages})")
    return loaded


def _scan_sane(scan: Any) -> str | None:
    """Calibration that napari / manifests can use: finite, positive, or None."""
    values = [*list(scan.spacing_mm or []), scan.slice_spacing_mm or 1.0, scan.fps or 1.0]
    if not all(np.isfinite(v) and v > 0 for v in values):
        return f"calibration not finite/positive: {values}"
    if scan.frames.nbytes > TOTAL_CAP_MB * 2**20:
        return f"accepted {scan.frames.nbytes} bytes of frames, over the cap"
    return None


def _check_error(
    case_: Case, path: Path, exc: USFMError, problems: list[str], entry: str, partial: bool = False
) -> None:
    """An error is fine for "error"/"either" cases if it names the file and the cause."""
    if case_.expect == "ok":
        problems.append(f"wrong: {entry} refused a valid input: {exc}")
        return
    if not _names_file(exc, path):
        problems.append(f"unclear: {entry} error does not name the file: {exc}")
    if case_.cause and case_.expect == "error" and not re.search(case_.cause, str(exc), re.I):
        problems.append(f"unclear: {entry} error lacks cause {case_.cause!r}: {exc}")
    if case_.huge and case_.expect == "error" and case_.cause == "limit":
        if not isinstance(exc, DecodedSizeError) or "MB" not in str(exc):
            problems.append(f"wrong: {entry}: huge input not refused by the size limit: {exc}")


def _entry_info(case_: Case, path: Path, loaded: bool, problems: list[str]) -> None:
    """``usfm-core info PATH`` in-process: exit code, no traceback, no identifiers."""
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["info", str(path)])
    text = out.getvalue() + err.getvalue()
    if "Traceback" in text:
        problems.append("traceback: info printed a traceback")
    if loaded and code != 0:
        problems.append(f"wrong: info exit {code} on a scan load_scan opens: {text[-300:]}")
    if not loaded and code not in (0, 1):
        problems.append(f"wrong: info exit code {code}")
    if code == 1:
        shown = str(path) if str(path).isprintable() else repr(str(path))[1:-1]
        if (
            path.name
            and path.name.isprintable()
            and path.name not in err.getvalue()
            and shown not in err.getvalue()
        ):
            problems.append(f"unclear: info error does not name the file: {err.getvalue()[:300]}")
    for secret in case_.info_absent:
        if secret in text:
            problems.append(f"wrong: info printed identifier {secret!r}")


def _entry_napari(case_: Case, path: Path, loaded: bool, problems: list[str]) -> None:
    """napari reader function: layer data shape and finite scale, or a USFMError."""
    reader = get_reader(str(path))
    if reader is None:
        TALLY["declined"] += 1
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            [(data, kwargs, layer_type)] = reader(str(path))
        except USFMError as exc:
            if loaded:
                problems.append(f"wrong: napari reader refused what load_scan opened: {exc}")
            elif not _names_file(exc, path):
                problems.append(f"unclear: napari error does not name the file: {exc}")
            return
    if layer_type != "image":
        problems.append(f"wrong: napari layer type {layer_type}")
    scale = np.asarray(kwargs["scale"], dtype=float)
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        problems.append(f"wrong: napari scale {scale}")
    if case_.frames is not None and case_.expect == "ok":
        single = kwargs["metadata"]["kind"] == "image"
        want = case_.frames.shape[1:] if single else case_.frames.shape
        if tuple(data.shape) != tuple(want):
            problems.append(f"wrong: napari data shape {data.shape}, expected {want}")


@pytest.mark.parametrize("case_", CASES, ids=[c.name for c in CASES])
def test_fuzz_input(case_: Case, fuzz_root: Path) -> None:
    """One input through load_scan (+ frames), ``usfm-core info`` and the napari reader."""
    work = fuzz_root / case_.name
    work.mkdir()
    path = case_.build(work)
    TALLY["inputs"] += 1
    problems: list[str] = []
    for entry in ("load", "info", "napari"):
        try:
            with _time_limit(CASE_TIMEOUT_S):
                if entry == "load":
                    loaded = _entry_load(case_, path, problems)
                    TALLY["loaded" if loaded else "refused"] += 1
                elif entry == "info":
                    _entry_info(case_, path, loaded, problems)
                else:
                    _entry_napari(case_, path, loaded, problems)
        except _Hang as exc:
            problems.append(f"hang: {entry}: {exc}")
        except Exception as exc:  # anything but USFMError escaping an entry point
            problems.append(f"traceback: {entry}: {type(exc).__name__}: {exc}")
    for p in problems:
        TALLY[p.split(":", 1)[0]] += 1
    assert not problems, "\n".join(problems)


def test_fuzz_has_enough_inputs() -> None:
    """The suite covers >= 200 inputs across every reader family."""
    assert len(CASES) >= 200
    prefixes = {c.name.split("_", 1)[0] for c in CASES}
    assert {
        "dcm",
        "tif",
        "nii",
        "png",
        "jpg",
        "bmp",
        "avi",
        "mp4",
        "dir",
        "link",
        "name",
    } <= prefixes
    assert sum(c.huge for c in CASES) >= 10
