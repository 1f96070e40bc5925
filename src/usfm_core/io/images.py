"""Single images (PNG, JPEG, BMP) and folders of them as one scan.

Folder frames are sorted naturally (``img2`` before ``img10``), must all have the same size, and
are decoded one at a time. Colour is decided by the first image; three identical channels
count as gray (many exported ultrasound PNGs are gray saved as RGB).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from usfm_core.errors import ScanReadError
from usfm_core.io.checks import check_decoded_size
from usfm_core.io.scan import Scan

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
FOLDER_EXTENSIONS = (*IMAGE_EXTENSIONS, ".tif", ".tiff")


def natural_key(name: str) -> list[object]:
    """Sort key putting ``frame2`` before ``frame10`` (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


# PNG colour type -> channels OpenCV decodes (palette expands to BGR).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}
# Pillow mode -> (channels, bytes per sample) of the decoded image.
_PIL_MODES = {"1": (1, 1), "L": (1, 1), "P": (3, 1), "RGB": (3, 1), "RGBA": (4, 1), "LA": (4, 1)}


def _png_header(head: bytes) -> tuple[int, int, int, int] | None:
    """``(H, W, channels, itemsize)`` from a PNG's IHDR chunk, or None if it has none."""
    if len(head) < 26 or not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return height, width, _PNG_CHANNELS.get(colour, 4), 2 if depth == 16 else 1


def declared_image_size(path: Path) -> tuple[int, int, int, int] | None:
    """``(H, W, channels, itemsize)`` an image file declares, read without decoding pixels.

    PNG headers are parsed directly (so the project's own size limit applies, not Pillow's);
    other formats go through Pillow's lazy ``Image.open``. None when the header is unreadable.
    """
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError:
        return None
    png = _png_header(head)
    if png is not None:
        return png
    try:
        with Image.open(path) as im:
            width, height = im.size
            mode = im.mode
    except Image.DecompressionBombError as exc:
        raise ScanReadError(
            f"image declares an implausibly large size ({exc})",
            path=path,
            hint="the header is corrupt or the image is a decompression bomb; re-export it",
        ) from exc
    except Exception:
        return None
    channels, itemsize = _PIL_MODES.get(mode, (4, 2))
    return height, width, channels, itemsize


def check_image_size(path: Path, n_frames: int = 1) -> tuple[int, int] | None:
    """Refuse an image whose declared size is over the decoded-size limit; ``(H, W)`` or None."""
    declared = declared_image_size(path)
    if declared is None:
        return None
    height, width, channels, itemsize = declared
    check_decoded_size(path, n_frames, (height, width, channels), itemsize)
    return height, width


def decode_image(path: Path) -> np.ndarray:
    """Decode an image file to (H, W) or (H, W, 3) RGB, keeping its bit depth; alpha dropped.

    The declared size is checked against the decoded-size limit before decoding.
    """
    import cv2

    check_image_size(path)

    data = np.fromfile(str(path), dtype=np.uint8)  # np.fromfile + imdecode handles any path
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ScanReadError(
            "cannot decode image (corrupt, truncated, or not an image)",
            path=path,
            hint="open it in an image viewer to check, or re-export it as PNG",
        )
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    elif img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return img


def _channels_equal(img: np.ndarray) -> bool:
    """True for an (H, W, 3) image whose three channels are identical."""
    return bool(
        np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    )


def _conform(img: np.ndarray, rgb: bool) -> np.ndarray:
    """Make a decoded image (H, W) gray or (H, W, 3) RGB as the scan says."""
    if rgb and img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    if not rgb and img.ndim == 3:
        if _channels_equal(img):
            return np.ascontiguousarray(img[..., 0])
        weights = np.array([0.299, 0.587, 0.114])
        return np.round(img @ weights).astype(img.dtype)
    return img


class ArrayFrames:
    """Frame source over frames already in memory (a single image)."""

    def __init__(self, frames: np.ndarray):
        self.frames = frames

    def read(self, index: int) -> np.ndarray:
        return self.frames[index]

    def close(self) -> None:
        """Nothing to release."""


class FileListFrames:
    """Frame source decoding ``files[i]`` on demand."""

    def __init__(self, files: list[Path], rgb: bool, shape: tuple[int, int], dtype: np.dtype):
        self.files = files
        self.rgb = rgb
        self.shape = shape
        self.dtype = dtype

    def read(self, index: int) -> np.ndarray:
        img = _conform(decode_image(self.files[index]), self.rgb)
        if img.shape[:2] != self.shape:
            raise ScanReadError(
                f"image is {img.shape[:2]}, the folder's first image is {self.shape}",
                path=self.files[index],
                hint="all images of a folder scan must have the same size; move the odd one out",
            )
        if img.dtype != self.dtype:
            raise ScanReadError(
                f"image is {img.dtype}, the folder's first image is {self.dtype}",
                path=self.files[index],
                hint="all images of a folder scan must have the same bit depth; convert it",
            )
        return img

    def close(self) -> None:
        """Nothing held open."""


def read_image(path: Path) -> Scan:
    """Open a single PNG/JPEG/BMP image as a one-frame :class:`Scan`."""
    img = decode_image(path)
    rgb = img.ndim == 3 and not _channels_equal(img)
    img = _conform(img, rgb)
    return Scan(
        path=path,
        kind="image",
        format="image",
        shape=(1, *img.shape),
        dtype=img.dtype,
        is_rgb=rgb,
        source=ArrayFrames(img[None]),
        metadata={"file_format": path.suffix.lower().lstrip(".")},
    )


def list_folder_images(folder: Path) -> list[Path]:
    """Image files of ``folder`` (not recursive, hidden files skipped), naturally sorted."""
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FOLDER_EXTENSIONS
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def read_folder(folder: Path) -> Scan:
    """Open a folder of same-size images as a lazy :class:`Scan` (one image per frame)."""
    files = list_folder_images(folder)
    if not files:
        raise ScanReadError(
            "folder holds no images",
            path=folder,
            hint=f"put {', '.join(FOLDER_EXTENSIONS)} frames in it, or open a single file",
        )
    check_image_size(files[0], n_frames=len(files))  # all frames have the first one's size
    first = decode_image(files[0])
    rgb = first.ndim == 3 and not _channels_equal(first)
    first = _conform(first, rgb)
    size = first.shape[:2]
    for f in files[1:]:
        other = check_image_size(f)
        if other is None:
            raise ScanReadError("cannot read image header (corrupt or not an image)", path=f)
        if other != size:
            raise ScanReadError(
                f"image is {other[0]}x{other[1]} (HxW) but {files[0].name} is {size[0]}x{size[1]}",
                path=f,
                hint="all images of a folder scan must have the same size; resize or move it out",
            )
    n = len(files)
    return Scan(
        path=folder,
        kind="cine" if n > 1 else "image",
        format="folder",
        shape=(n, *first.shape),
        dtype=first.dtype,
        is_rgb=rgb,
        source=FileListFrames(files, rgb, size, first.dtype),
        metadata={"files": [f.name for f in files]},
    )
