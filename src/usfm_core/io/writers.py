"""Writers for the scan formats :func:`usfm_core.io.load_scan` reads.

Used to export results and, in tests, to build realistic files (multi-frame ultrasound DICOM
with calibration regions, cine videos, ImageJ TIFF stacks, NIfTI volumes, PNG frames) without
shipping binary fixtures. Every writer writes to a temporary file beside the target and renames
it on success, so a crash never leaves a half-written scan.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from usfm_core.errors import USFMError
from usfm_core.outputs import atomic_path

# DICOM UIDs used by the writer.
US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
TRANSFER_SYNTAX_UIDS = {
    "explicit_le": "1.2.840.10008.1.2.1",
    "implicit_le": "1.2.840.10008.1.2",
    "jpeg_baseline": "1.2.840.10008.1.2.4.50",
    "rle_lossless": "1.2.840.10008.1.2.5",
}
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL")

# Video containers and the FourCC written into them.
VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


@contextlib.contextmanager
def _atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path with the same suffix(es) as ``path``; rename onto it on success.

    :func:`usfm_core.outputs.atomic_path` (toolkit-marked temporary that keeps the real
    extension, which OpenCV, tifffile and nibabel use to pick the container / compression;
    final mode from the umask).
    """
    with atomic_path(path, fsync=False) as tmp:
        yield tmp


def _as_frames(frames: np.ndarray, what: str = "frames") -> np.ndarray:
    """Validate and return ``frames`` as ``(T, H, W)`` or ``(T, H, W, 3)``.

    A single 2-D ``(H, W)`` image is promoted to ``(1, H, W)``; an ``(H, W, 3)`` image is *not*
    (it would be ambiguous with three frames of width 3), pass ``frames[None]`` instead.
    """
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] != 3):
        raise USFMError(
            f"{what} must have shape (T, H, W) or (T, H, W, 3), got {arr.shape}",
            hint="stack single images with frames[None]",
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise USFMError(f"{what} is empty (shape {arr.shape})")
    return arr


def _region_item(region: dict[str, Any], height: int, width: int) -> Any:
    """Build one SequenceOfUltrasoundRegions item from a region dict (spacing given in mm)."""
    from pydicom.dataset import Dataset

    dy, dx = region["spacing_mm"]
    x0, y0, x1, y1 = region.get("bbox", (0, 0, width - 1, height - 1))
    item = Dataset()
    item.RegionSpatialFormat = int(region.get("spatial_format", 1))  # 1 = 2-D tissue image
    item.RegionDataType = int(region.get("data_type", 1))  # 1 = tissue (B-mode)
    item.RegionFlags = 0
    item.RegionLocationMinX0 = int(x0)
    item.RegionLocationMinY0 = int(y0)
    item.RegionLocationMaxX1 = int(x1)
    item.RegionLocationMaxY1 = int(y1)
    item.PhysicalUnitsXDirection = int(region.get("units", 3))  # 3 = cm
    item.PhysicalUnitsYDirection = int(region.get("units", 3))
    item.PhysicalDeltaX = float(dx) / 10.0  # mm -> cm
    item.PhysicalDeltaY = float(dy) / 10.0
    item.ReferencePixelX0 = int(x0)
    item.ReferencePixelY0 = int(y0)
    return item


def _jpeg_fragments(frames: np.ndarray, quality: int = 95) -> list[bytes]:
    """Encode each frame of ``frames`` (T, H, W[, 3]) uint8 as a baseline JPEG (4:2:2 chroma)."""
    from PIL import Image

    out = []
    for frame in frames:
        buf = io.BytesIO()
        # subsampling=1 is 4:2:2, which is what DICOM's YBR_FULL_422 describes.
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality, subsampling=1)
        out.append(buf.getvalue())
    return out


def write_dicom(
    path: str | Path,
    frames: np.ndarray,
    *,
    spacing_mm: tuple[float, float] | None = None,
    fps: float | None = None,
    regions: Sequence[dict[str, Any]] | None = None,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = "explicit_le",
    spacing_in: str = "regions",
) -> Path:
    """Write ``frames`` as an ultrasound (multi-frame) DICOM file and return its path.

    Args:
        frames: ``(T, H, W)`` gray or ``(T, H, W, 3)`` RGB, uint8 (uint16 for gray with
            uncompressed syntaxes); ``T = 1`` allowed, a 2-D image is taken as one frame.
        spacing_mm: ``(dy, dx)`` pixel size in mm, written as one tissue 2-D ultrasound region
            (cm units) or, with ``spacing_in="pixel_spacing"``, as PixelSpacing.
        fps: frame rate; written as FrameTime (ms), CineRate and RecommendedDisplayFrameRate.
        regions: several regions instead of ``spacing_mm``: dicts with ``spacing_mm`` (dy, dx)
            and optionally ``bbox`` (x0, y0, x1, y1), ``spatial_format`` (1 = 2-D),
            ``data_type`` (1 = tissue), ``units`` (3 = cm).
        photometric: how pixels are stored. ``MONOCHROME1`` stores inverted values (the reader
            inverts them back); ``YBR_FULL`` stores RGB input converted to YCbCr. With
            ``jpeg_baseline`` colour frames are always stored as ``YBR_FULL_422``.
        transfer_syntax: ``explicit_le`` | ``implicit_le`` | ``jpeg_baseline`` | ``rle_lossless``.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    arr = _as_frames(frames)
    n, height, width = arr.shape[:3]
    rgb = arr.ndim == 4
    if transfer_syntax not in TRANSFER_SYNTAX_UIDS:
        raise USFMError(
            f"unknown transfer_syntax {transfer_syntax!r}",
            hint=f"use one of {list(TRANSFER_SYNTAX_UIDS)}",
        )
    if photometric not in PHOTOMETRICS:
        raise USFMError(f"unknown photometric {photometric!r}", hint=f"use one of {PHOTOMETRICS}")
    if rgb != (photometric in ("RGB", "YBR_FULL")):
        raise USFMError(
            f"photometric {photometric} does not match frames of shape {arr.shape}",
            hint="use RGB/YBR_FULL for (T, H, W, 3) and MONOCHROME1/2 for (T, H, W)",
        )
    if spacing_in not in ("regions", "pixel_spacing"):
        raise USFMError(
            f"unknown spacing_in {spacing_in!r}", hint="use 'regions' or 'pixel_spacing'"
        )
    if arr.dtype not in (np.uint8, np.uint16) or (
        arr.dtype == np.uint16 and (rgb or transfer_syntax == "jpeg_baseline")
    ):
        raise USFMError(f"frames dtype {arr.dtype} not supported", hint="convert to uint8")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_MULTIFRAME_STORAGE if n > 1 else US_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    # RLE is produced by compressing an uncompressed dataset, so start from explicit LE.
    compress_later = transfer_syntax == "rle_lossless"
    meta.TransferSyntaxUID = TRANSFER_SYNTAX_UIDS[
        "explicit_le" if compress_later else transfer_syntax
    ]

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.Manufacturer = "usfm-core"
    ds.SeriesDescription = "written by usfm_core.io.write_dicom"
    ds.PatientName = "Anonymous"
    ds.PatientID = "0"
    ds.InstanceNumber = 1

    ds.Rows, ds.Columns = height, width
    ds.NumberOfFrames = n
    ds.SamplesPerPixel = 3 if rgb else 1
    bits = 8 * arr.dtype.itemsize
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if rgb:
        ds.PlanarConfiguration = 0

    if fps:
        ds.FrameTime = f"{1000.0 / fps:.6g}"
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
        ds.CineRate = max(1, round(fps))
        ds.RecommendedDisplayFrameRate = max(1, round(fps))

    if regions is None and spacing_mm is not None and spacing_in == "regions":
        regions = [{"spacing_mm": spacing_mm}]
    if regions:
        ds.SequenceOfUltrasoundRegions = [_region_item(r, height, width) for r in regions]
    if spacing_mm is not None and spacing_in == "pixel_spacing":
        ds.PixelSpacing = [f"{spacing_mm[0]:.6g}", f"{spacing_mm[1]:.6g}"]

    stored = arr
    if photometric == "MONOCHROME1":
        stored = np.iinfo(arr.dtype).max - arr
    elif photometric == "YBR_FULL" and transfer_syntax != "jpeg_baseline":
        from pydicom.pixels import convert_color_space

        stored = convert_color_space(arr, "RGB", "YBR_FULL")

    if transfer_syntax == "jpeg_baseline":
        ds.PhotometricInterpretation = "YBR_FULL_422" if rgb else photometric
        ds.PixelData = encapsulate(_jpeg_fragments(stored))
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    else:
        ds.PhotometricInterpretation = photometric
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
        if compress_later:
            ds.compress(TRANSFER_SYNTAX_UIDS[transfer_syntax])

    path = Path(path)
    with _atomic_target(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Write ``frames`` (T, H, W) gray or (T, H, W, 3) RGB uint8 as a video; return its path.

    The codec follows the extension: ``mp4v`` for .mp4/.m4v/.mov, ``MJPG`` for .avi/.mkv.
    """
    import cv2

    arr = _as_frames(frames)
    path = Path(path)
    codec = VIDEO_CODECS.get(path.suffix.lower())
    if codec is None:
        raise USFMError(
            f"cannot write video with extension {path.suffix!r}",
            path=path,
            hint=f"use one of {sorted(VIDEO_CODECS)}",
        )
    if arr.dtype != np.uint8:
        raise USFMError(f"video frames must be uint8, got {arr.dtype}", path=path)
    if not fps or fps <= 0:
        raise USFMError(f"fps must be > 0, got {fps}", path=path)
    height, width = arr.shape[1:3]
    with _atomic_target(path) as tmp:
        writer = cv2.VideoWriter(
            str(tmp), cv2.VideoWriter_fourcc(*codec), float(fps), (width, height)
        )
        if not writer.isOpened():
            raise USFMError(f"OpenCV cannot open a {codec} video writer", path=path)
        try:
            for frame in arr:
                bgr = cv2.cvtColor(
                    frame, cv2.COLOR_GRAY2BGR if frame.ndim == 2 else cv2.COLOR_RGB2BGR
                )
                writer.write(bgr)
        finally:
            writer.release()
    return path


def write_tiff(
    path: str | Path,
    frames: np.ndarray,
    *,
    spacing_mm: tuple[float, float] | None = None,
    fps: float | None = None,
    imagej: bool = True,
    slice_spacing_mm: float | None = None,
) -> Path:
    """Write ``frames`` (T, H, W) or (T, H, W, 3) as a multi-page TIFF; return its path.

    With ``imagej=True`` the ImageJ metadata carries the calibration: resolution in pixels per
    mm with ``unit="mm"``, ``finterval`` (s) for the frame rate, and ``spacing`` (mm) plus axis
    ``Z`` when ``slice_spacing_mm`` is given (a volume). Otherwise the resolution is written in
    pixels per centimetre (ResolutionUnit = CENTIMETER).
    """
    import tifffile

    arr = _as_frames(frames)
    rgb = arr.ndim == 4
    kwargs: dict[str, Any] = {"photometric": "rgb" if rgb else "minisblack"}
    if imagej:
        # ImageJ only knows uint8, uint16 and float32 stacks.
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        elif arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        elif arr.dtype not in (np.uint8, np.uint16):
            raise USFMError(
                f"ImageJ TIFF cannot hold {arr.dtype} frames",
                path=path,
                hint="convert to uint8/uint16/float32, or pass imagej=False",
            )
        metadata: dict[str, Any] = {
            "axes": ("Z" if slice_spacing_mm else "T") + "YX" + ("S" if rgb else "")
        }
        if spacing_mm is not None:
            kwargs["resolution"] = (1.0 / spacing_mm[1], 1.0 / spacing_mm[0])
            metadata["unit"] = "mm"
        if fps:
            metadata["finterval"] = 1.0 / fps
        if slice_spacing_mm:
            metadata["spacing"] = float(slice_spacing_mm)
        kwargs.update(imagej=True, metadata=metadata)
    else:
        if spacing_mm is not None:
            kwargs["resolution"] = (10.0 / spacing_mm[1], 10.0 / spacing_mm[0])
            kwargs["resolutionunit"] = "CENTIMETER"
        kwargs["metadata"] = {"axes": "TYX" + ("S" if rgb else "")}
    path = Path(path)
    with _atomic_target(path) as tmp:
        tifffile.imwrite(tmp, arr, **kwargs)
    return path


def write_nifti(
    path: str | Path, volume: np.ndarray, spacing_mm: tuple[float, float, float]
) -> Path:
    """Write ``volume`` (Z, H, W) as NIfTI-1 (.nii or .nii.gz) with voxel size (z, y, x) mm.

    The data array is stored in NIfTI's (i, j, k) = (x, y, z) order with a diagonal affine, so
    :func:`usfm_core.io.load_scan` gives back slices ``(H, W)`` along z.
    """
    import nibabel as nib

    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise USFMError(f"volume must have shape (Z, H, W), got {vol.shape}", path=path)
    dz, dy, dx = (float(s) for s in spacing_mm)
    img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), np.diag([dx, dy, dz, 1.0]))
    img.header.set_xyzt_units("mm")
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise USFMError("NIfTI file name must end in .nii or .nii.gz", path=path)
    with _atomic_target(path) as tmp:
        nib.save(img, str(tmp))
    return path


def write_image(path: str | Path, frame: np.ndarray) -> Path:
    """Write one frame (H, W) gray or (H, W, 3) RGB, uint8/uint16, as PNG/JPEG/BMP/TIFF."""
    import cv2

    img = np.asarray(frame)
    if img.ndim == 3 and img.shape[-1] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim != 2:
        raise USFMError(f"frame must have shape (H, W) or (H, W, 3), got {img.shape}", path=path)
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".png", img)
    if not ok:
        raise USFMError(f"OpenCV cannot encode {path.suffix!r} images", path=path, hint="use .png")
    with _atomic_target(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return path
