"""``load_scan``: open any supported scan file or folder as a lazy :class:`Scan`.

The format is recognised from the file's content first (DICOM preamble, PNG/JPEG/BMP/TIFF
magic bytes, NIfTI header, video containers) and from its extension second, so a DICOM file
without an extension, or with a wrong one, still opens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from usfm_core.errors import ScanReadError
from usfm_core.io.dicom import is_dicom, read_dicom
from usfm_core.io.images import IMAGE_EXTENSIONS, read_folder, read_image
from usfm_core.io.nifti import NIFTI_EXTENSIONS, read_nifti
from usfm_core.io.scan import Scan
from usfm_core.io.tiff import TIFF_EXTENSIONS, read_tiff
from usfm_core.io.video import VIDEO_EXTENSIONS, read_video

log = logging.getLogger(__name__)

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")

# Extension -> format name. DICOM files are also recognised without an extension.
SUPPORTED_EXTENSIONS: dict[str, str] = {
    **{ext: "dicom" for ext in DICOM_EXTENSIONS},
    **{ext: "video" for ext in VIDEO_EXTENSIONS},
    **{ext: "tiff" for ext in TIFF_EXTENSIONS},
    **{ext: "image" for ext in IMAGE_EXTENSIONS},
    **{ext: "nifti" for ext in NIFTI_EXTENSIONS},
}

_READERS: dict[str, Callable[[Path], Scan]] = {
    "dicom": read_dicom,
    "video": read_video,
    "tiff": read_tiff,
    "image": read_image,
    "nifti": read_nifti,
}


def extension_format(path: Path) -> str | None:
    """Format implied by the file name (longest matching suffix, case-insensitive), or None."""
    name = path.name.lower()
    matches = [ext for ext in SUPPORTED_EXTENSIONS if name.endswith(ext)]
    return SUPPORTED_EXTENSIONS[max(matches, key=len)] if matches else None


def sniff_format(path: Path) -> str | None:
    """Format recognised from the first bytes of the file, or None."""
    if is_dicom(path):
        return "dicom"
    with open(path, "rb") as fh:
        head = fh.read(352)
    if (
        head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"\xff\xd8\xff")
        or head[:2] == b"BM"
    ):
        return "image"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if (
        head[4:8] == b"ftyp"
        or head[:4] == b"\x1a\x45\xdf\xa3"
        or (head[:4] == b"RIFF" and head[8:11] == b"AVI")
    ):
        return "video"
    return None


def detect_format(path: Path) -> str:
    """The reader to use for ``path`` (a file), or raise :class:`ScanReadError`."""
    by_name = extension_format(path)
    by_content = sniff_format(path)
    if by_content and by_name and by_content != by_name:
        if by_name == "nifti" and path.name.lower().endswith(".gz"):
            return "nifti"
        log.warning(
            "%s: content is %s although the extension says %s; reading it as %s",
            path,
            by_content,
            by_name,
            by_content,
        )
    if by_content:
        return by_content
    if by_name == "dicom":
        raise ScanReadError(
            "not a DICOM Part 10 file (no 'DICM' marker at byte 128)",
            path=path,
            hint="the file is corrupt or a raw dataset; re-export it from the scanner/PACS",
        )
    if by_name:
        return by_name  # gzip'ed NIfTI, containers without a recognised signature
    raise ScanReadError(
        f"unknown scan format (extension {path.suffix or '(none)'!r}, content not recognised)",
        path=path,
        hint="supported: DICOM, "
        + ", ".join(sorted(SUPPORTED_EXTENSIONS))
        + ", or a folder of images",
    )


def load_scan(path: str | Path) -> Scan:
    """Open a scan file or image folder; frames are decoded lazily on access.

    Supports (multi-frame) DICOM with or without extension, videos, TIFF / OME-TIFF / ImageJ
    stacks, PNG/JPEG/BMP images, folders of same-size images, and NIfTI volumes. Raises
    :class:`~usfm_core.errors.ScanReadError` naming the file and the fix for missing, empty,
    truncated, corrupt or unsupported input.
    """
    path = Path(path).expanduser()
    try:
        exists, is_dir, is_file = path.exists(), path.is_dir(), path.is_file()
    except (OSError, ValueError) as exc:  # e.g. a name too long, or with a NUL byte
        raise ScanReadError(f"cannot access the path: {exc}", path=path) from exc
    if not exists:
        if path.is_symlink():
            raise ScanReadError(
                "broken symbolic link (its target is missing, or the link points to itself)",
                path=path,
                hint="fix the link or open its target directly",
            )
        raise ScanReadError(
            "no such file or folder", path=path, hint="check the path and its spelling"
        )
    try:
        return _open(path, is_dir, is_file)
    except OSError as exc:  # permissions, I/O errors, vanished files
        raise ScanReadError(
            f"cannot read: {exc.strerror or exc}",
            path=path,
            hint="check that the file is readable (permissions, disk, network share)",
        ) from exc


def _open(path: Path, is_dir: bool, is_file: bool) -> Scan:
    """Dispatch an existing path to the folder or file reader (see :func:`load_scan`)."""
    if is_dir:
        return read_folder(path)
    if not is_file:
        raise ScanReadError(
            "not a regular file (a device, pipe or socket)",
            path=path,
            hint="copy the scan to a regular file first",
        )
    if path.stat().st_size == 0:
        raise ScanReadError("file is empty (0 bytes)", path=path, hint="copy or export it again")
    fmt = detect_format(path)
    return _READERS[fmt](path)
