"""The scan region: the fan, sector or rectangle of a frame that holds echo signal.

Recipe (after UltraBench's public scan-region code, see docs/preprocessing.md):
threshold a smoothed grey image just above the background level → morphological opening
(removes text strokes, caliper lines and thin markers outside the fan) → largest connected
component (drops colour bars and labels) → closing and hole filling (dark cysts, fluid,
shadows inside the fan) → convex hull (fans and rectangles are convex).

For a short cine (T > 1) the per-pixel temporal maximum gives the signal and the temporal
standard deviation separates moving tissue from static burned-in text.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

# Smallest accepted threshold and margin above the estimated background level (grey levels).
MIN_THRESHOLD = 4.0
BACKGROUND_MARGIN = 4.0  # in units of the background's noise (grey-level std)
# Corner patches flatter than this (grey-level std) are background, not speckle.
UNIFORM_STD = 2.0
# Pixels whose intensity changes less than this over a cine are static (text, bars, black).
STATIC_STD = 1.0


def to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3|4) uint8 RGB(A) → (H, W) uint8 luminance (a copy-free view for grey)."""
    img = np.asarray(image)
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] in (3, 4):
        return cv2.cvtColor(np.ascontiguousarray(img[:, :, :3]), cv2.COLOR_RGB2GRAY)
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {img.shape}")


def _as_gray_stack(image: np.ndarray) -> np.ndarray:
    """Any of (H, W), (H, W, 3), (T, H, W), (T, H, W, 3) → (T, H, W) uint8 grey stack.

    A 3-D array whose last axis is 3 or 4 is read as one colour frame, anything else 3-D as a
    grey stack.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {img.dtype}")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4)):
        return to_gray(img)[None]
    if img.ndim == 3:
        return img
    if img.ndim == 4 and img.shape[3] in (3, 4):
        return np.stack([to_gray(f) for f in img])
    raise ValueError(f"expected (H, W), (H, W, 3) or (T, H, W[, 3]) uint8, got {img.shape}")


def _kernel(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected component of a (H, W) bool mask."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, dtype=bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """Filled convex hull of the True pixels of a (H, W) bool mask."""
    points = cv2.findNonZero(mask.astype(np.uint8))
    hull = cv2.convexHull(points)
    out = np.zeros(mask.shape, dtype=np.uint8)
    cv2.fillConvexPoly(out, hull, 1)
    return out.astype(bool)


def _signal_map(stack: np.ndarray) -> np.ndarray:
    """(T, H, W) uint8 → (H, W) float32 'echo signal' image.

    One frame: the frame itself. Several frames: the temporal maximum, with pixels that never
    change (burned-in text, colour bars, black background) set to 0 — unless almost nothing
    moves (a frozen clip), then the maximum alone.
    """
    peak = stack.max(axis=0).astype(np.float32)
    if stack.shape[0] == 1:
        return peak
    moving = stack.std(axis=0) > STATIC_STD
    bright = peak > 2 * MIN_THRESHOLD
    moving_fraction = float(moving[bright].mean()) if bright.any() else 0.0
    if moving_fraction < 0.2:
        return peak
    return np.where(moving, peak, 0.0).astype(np.float32)


def _background_threshold(signal: np.ndarray) -> float:
    """Signal threshold just above a flat background, estimated from the image corners.

    A corner patch counts as background when it is flat (speckle never is): the threshold is
    its median plus ``BACKGROUND_MARGIN`` times its noise (at least ``MIN_THRESHOLD``), so
    clean digital black allows very dark tissue while JPEG-noisy black does not leak. Dark
    tissue is never that flat; an image cropped to the scan has no flat corner, and then
    every pixel above ``MIN_THRESHOLD`` may be signal.
    """
    h, w = signal.shape
    ph, pw = max(2, h // 20), max(2, w // 20)
    thresholds = []
    for patch in (signal[:ph, :pw], signal[:ph, -pw:], signal[-ph:, :pw], signal[-ph:, -pw:]):
        noise = float(patch.std())
        if noise < UNIFORM_STD:
            margin = max(MIN_THRESHOLD, BACKGROUND_MARGIN * noise)
            thresholds.append(float(np.median(patch)) + margin)
    return min(thresholds) if thresholds else MIN_THRESHOLD


def _touches_all_borders(mask: np.ndarray) -> bool:
    """Whether a (H, W) bool mask has pixels on all four image edges."""
    return bool(mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any())


def scan_region_mask(image: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Boolean mask of the scan region (fan/sector/rectangle with echo signal).

    Args:
        image: uint8 (H, W) grey, (H, W, 3) RGB, or a short stack (T, H, W[, 3]); for T > 1
            static pixels are excluded using the temporal standard deviation.
        threshold: grey level separating signal from background; ``None`` estimates it as the
            level and noise of flat image corners (at least ``MIN_THRESHOLD``).

    Returns:
        (H, W) bool mask. The whole frame when nothing above the background is found (a black
        frame: keeps cropping and rescaling defined) or when the signal reaches all four edges
        and fills most of the frame (an image already cropped to the scan, as in BUSI).
    """
    stack = _as_gray_stack(image)
    h, w = stack.shape[1:]
    signal = _signal_map(stack)
    # A median filter fills speckle gaps (dark tissue stays connected after thresholding)
    # without moving the fan's edge outwards as a Gaussian blur would.
    smooth = cv2.medianBlur(np.clip(signal, 0, 255).astype(np.uint8), 5).astype(np.float32)
    if threshold is None:
        threshold = _background_threshold(signal)
    mask = smooth > threshold
    # Opening with a kernel wider than text strokes and caliper lines cuts them off the fan.
    k = max(5, round(min(h, w) / 40) | 1)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _kernel(k)).astype(bool)
    mask = _largest_component(mask)
    if mask.sum() < 0.01 * h * w:
        return np.ones((h, w), dtype=bool)
    if _touches_all_borders(mask) and mask.mean() > 0.5:
        # Signal up to every edge (an image already cropped to the scan): the whole frame.
        return np.ones((h, w), dtype=bool)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, _kernel(2 * k + 1))
    mask = ndimage.binary_fill_holes(mask.astype(bool))
    return _convex_hull(mask)


def region_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box ``(y0, x0, y1, x1)`` of a (H, W) bool mask; ``y1``/``x1`` are exclusive."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("the region mask is empty: no bounding box")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def crop_to_region(
    image: np.ndarray, mask: np.ndarray, margin: int = 0
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop an image (or stack) to the bounding box of ``mask`` grown by ``margin`` pixels.

    Args:
        image: (H, W), (H, W, C) or (T, H, W) array whose (H, W) axes match ``mask``.
        mask: (H, W) bool scan-region mask.
        margin: pixels added on every side (clipped at the image border).

    Returns:
        ``(cropped, (y0, x0, y1, x1))`` with the box actually used (exclusive ends).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    img = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    y0, x0, y1, x1 = region_bbox(mask)
    y0, x0 = max(0, y0 - margin), max(0, x0 - margin)
    y1, x1 = min(h, y1 + margin), min(w, x1 + margin)
    if img.shape[:2] == (h, w):
        return img[y0:y1, x0:x1], (y0, x0, y1, x1)
    if img.ndim == 3 and img.shape[1:] == (h, w):
        return img[:, y0:y1, x0:x1], (y0, x0, y1, x1)
    raise ValueError(f"image shape {img.shape} does not match mask shape {mask.shape}")
