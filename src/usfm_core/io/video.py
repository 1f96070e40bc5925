"""Cine video reader (MP4, AVI, MOV, MKV ...) through OpenCV, decoding frames on demand.

Reading frame ``i`` right after frame ``i - 1`` is a plain decode; any other index seeks
(``CAP_PROP_POS_FRAMES``), so showing frame 0 of a long cine decodes one frame.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from usfm_core.errors import ScanReadError
from usfm_core.io.checks import check_decoded_size
from usfm_core.io.scan import Scan

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".avi", ".mov", ".mkv", ".wmv", ".mpg", ".mpeg", ".webm")

# Lossy codecs leave a little chroma noise on gray video: channels within this are "gray".
_GRAY_TOLERANCE = 6


def _is_gray(bgr: np.ndarray) -> bool:
    """True when a decoded (H, W, 3) BGR frame is gray up to codec noise."""
    b, g, r = (bgr[..., c].astype(np.int16) for c in range(3))
    return bool(np.abs(b - g).max() <= _GRAY_TOLERANCE and np.abs(r - g).max() <= _GRAY_TOLERANCE)


class VideoFrames:
    """Frame source over one ``cv2.VideoCapture``, kept open between reads."""

    def __init__(self, path: Path, gray: bool):
        self.path = path
        self.gray = gray
        self._cap = None
        self._next = 0  # index the capture will decode next without seeking
        self._lock = threading.Lock()  # napari/dask may read from worker threads

    def _capture(self):
        import cv2

        if self._cap is None:
            self._cap = cv2.VideoCapture(str(self.path))
            self._next = 0
        return self._cap

    def read_bgr(self, index: int) -> np.ndarray | None:
        """Decode frame ``index`` as (H, W, 3) BGR, or None when the decoder has no such frame.

        The next frame is a plain decode; any other index seeks. When the seek fails (FFmpeg
        cannot seek in very short videos, e.g. a one-frame AVI/MP4) the video is reopened and
        decoded forward to ``index``.
        """
        import cv2

        with self._lock:
            cap = self._capture()
            if index != self._next:
                cap.set(cv2.CAP_PROP_POS_FRAMES, index)
            ok, bgr = cap.read()
            if not ok and index != self._next:
                ok, bgr = self._decode_forward(index)
            self._next = index + 1 if ok else -1
        return bgr if ok else None

    def _decode_forward(self, index: int) -> tuple[bool, np.ndarray | None]:
        """Reopen the capture and decode frames 0..index (lock held); ``(ok, bgr)``."""
        self.close_unlocked()
        cap = self._capture()
        for _ in range(index):
            if not cap.grab():
                return False, None
        return cap.read()

    def read(self, index: int) -> np.ndarray:
        """Frame ``index`` as (H, W) uint8 gray or (H, W, 3) uint8 RGB."""
        import cv2

        bgr = self.read_bgr(index)
        if bgr is None:
            raise ScanReadError(
                f"cannot decode video frame {index}",
                path=self.path,
                hint="the video may be truncated; re-export it, or convert it with"
                " ffmpeg -i IN -c:v libx264 OUT.mp4",
            )
        code = cv2.COLOR_BGR2GRAY if self.gray else cv2.COLOR_BGR2RGB
        return cv2.cvtColor(bgr, code)

    def count_by_decoding(self) -> int:
        """Count frames by decoding them all (when the container's frame count is wrong)."""
        import cv2

        with self._lock:
            cap = cv2.VideoCapture(str(self.path))
            n = 0
            while cap.grab():
                n += 1
            cap.release()
        return n

    def close_unlocked(self) -> None:
        """Release the capture (caller holds the lock)."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def close(self) -> None:
        with self._lock:
            self.close_unlocked()


def _finite_int(value: float | None) -> int:
    """An OpenCV property as int (0 for missing, NaN, inf or negative values)."""
    try:
        number = float(value or 0.0)
    except (TypeError, ValueError):
        return 0
    return int(number) if np.isfinite(number) and number > 0 else 0


def read_video(path: Path) -> Scan:
    """Open a video file as a lazy cine :class:`Scan` (uint8, gray when the video is gray)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ScanReadError(
                "OpenCV cannot open this video (corrupt, truncated or unknown codec)",
                path=path,
                hint="convert it with ffmpeg -i IN -c:v libx264 OUT.mp4, or export frames as PNG",
            )
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        n = _finite_int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        codec = _finite_int(cap.get(cv2.CAP_PROP_FOURCC))
        declared_hw = (
            _finite_int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            _finite_int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
        )
    finally:
        cap.release()
    check_decoded_size(path, 1, (*declared_hw, 3), 1)  # before decoding the first frame
    source = VideoFrames(path, gray=False)
    first = source.read_bgr(0)
    if first is None:
        raise ScanReadError(
            "video has zero decodable frames",
            path=path,
            hint="the file is empty, truncated or not a video",
        )
    # The container's frame count can be missing or too large (truncated file): check the
    # last frame once and fall back to counting by decoding.
    if n <= 0 or source.read_bgr(n - 1) is None:
        counted = source.count_by_decoding()
        log.warning(
            "%s: container reports %d frames, %d decodable; using %d", path, n, counted, counted
        )
        n = counted
    source.gray = _is_gray(first)
    height, width = first.shape[:2]
    check_decoded_size(path, n, (height, width) if source.gray else (height, width, 3), 1)
    fourcc = "".join(chr((codec >> (8 * i)) & 0xFF) for i in range(4)).strip("\x00")
    return Scan(
        path=path,
        kind="cine" if n > 1 else "image",
        format="video",
        shape=(n, height, width) if source.gray else (n, height, width, 3),
        dtype=np.uint8,
        is_rgb=not source.gray,
        source=source,
        fps=fps if fps != 0 else None,  # implausible rates are dropped (warned) by Scan
        metadata={"codec": fourcc, "container": path.suffix.lower().lstrip(".")},
    )
