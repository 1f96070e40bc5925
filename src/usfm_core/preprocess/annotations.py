"""Removal of burned-in annotations (text, colour overlays, grey markers), after USF-MAE §2.2.

Three detectors, each giving an (H, W) bool mask:

* ``text``: Tesseract OCR word boxes on the grey image (when the ``tesseract`` binary is
  installed), plus a glyph heuristic — word-sized groups of thin, light, contrasted strokes
  (inside the scan region only near-white, glyph-shaped ones) — which is also the fallback
  without Tesseract.
* ``color``: saturated pixels in HSV (after CLAHE), clustered with k-means (k = 3); clusters
  that are saturated and not dark are kept, then connected components of >= 20 px.
* ``markers``: CLAHE → Canny(50, 150) → 3×3 dilation → external contours with
  30 < area < 2000. Unlike the original recipe this is *guarded* so anatomy survives: a
  contour counts only outside/at the edge of the scan region, or, inside it, where it holds a
  thin near-white structure (calipers, '+'). Added: straight lines of one constant grey (ROI
  boxes), dotted measurement lines, and every light stroke outside the region (depth ticks).

The union is closed (5×5) and dilated (3×3) — an opening, as in the paper, deletes thin text
strokes — and inpainted with OpenCV's Navier–Stokes method.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from usfm_core.errors import USFMError
from usfm_core.preprocess.region import scan_region_mask, to_gray

log = logging.getLogger(__name__)

# OCR: minimum Tesseract word confidence (0-100) and the page-segmentation mode for sparse text.
OCR_MIN_CONFIDENCE = 60.0
OCR_CONFIG = "--psm 11"
OCR_MIN_LIGHT_FRACTION = 0.05  # a word box must hold this share of light, contrasted pixels
# Colour: HSV saturation/value thresholds (0-255) of the USF-MAE notebook.
COLOR_MIN_SATURATION = 40
COLOR_MIN_VALUE = 20
COLOR_MIN_CHROMA = 12  # max-min over RGB; dark JPEG noise has a high S but no real colour
COLOR_MIN_COMPONENT = 20
# Grey markers: contour area bounds (px) of the USF-MAE notebook, and the guard's levels.
MARKER_MIN_AREA = 30
MARKER_MAX_AREA = 2000
NEAR_WHITE = 225  # grey level of burned-in white graphics (calipers, glyphs)
CHAR_MAX = 16  # px: largest side of a glyph-like stroke piece inside the scan region
WORD_GROWTH_STEPS = 4  # letters added left/right of an accepted glyph, at most
LIGHT = 150  # outside the region, on a dark background, any light stroke is a graphic
TOPHAT_CONTRAST = 60  # how much brighter than their surroundings such strokes are
# Straight lines (ROI boxes): min run (px), min difference to the pixels 2 px across (grey
# levels), and the level of clipped tissue left out inside the region; dotted lines: dot size.
LINE_MIN_LENGTH = 25
LINE_CONTRAST = 8
SATURATED = 250
DOT_MAX_AREA = 4
BORDER_BAND = 6  # px: contours touching this band at the region's edge count as outside

_warned_no_tesseract = False


@dataclass
class AnnotationResult:
    """Output of :func:`remove_annotations`.

    Attributes:
        clean: inpainted image, uint8, same shape as the input.
        mask: (H, W) bool, every pixel that was inpainted.
        parts: (H, W) bool masks by detector: ``"text"``, ``"color"``, ``"markers"``.
    """

    clean: np.ndarray
    mask: np.ndarray
    parts: dict[str, np.ndarray] = field(default_factory=dict)


def _clahe(gray: np.ndarray) -> np.ndarray:
    """CLAHE (clip 2.0, 8×8 tiles) of a (H, W) uint8 image."""
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)


def _clahe_rgb(rgb: np.ndarray) -> np.ndarray:
    """CLAHE on the L channel of CIELAB, (H, W, 3) RGB uint8 → same."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lab[:, :, 0] = _clahe(np.ascontiguousarray(lab[:, :, 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def _is_color(image: np.ndarray) -> bool:
    """True for an (H, W, 3) image whose channels actually differ."""
    if image.ndim != 3:
        return False
    rgb = image[:, :, :3]
    return bool(np.any(rgb[:, :, 0] != rgb[:, :, 1]) or np.any(rgb[:, :, 1] != rgb[:, :, 2]))


def _tophat(gray: np.ndarray, size: int = 15) -> np.ndarray:
    """White top-hat: how much each pixel exceeds the local background (strokes < size px)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    return cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, kernel)


def _bright_strokes(gray: np.ndarray, level: int = NEAR_WHITE) -> np.ndarray:
    """(H, W) bool: pixels >= ``level`` standing out from their neighbourhood (graphics)."""
    return (gray >= level) & (_tophat(gray) >= TOPHAT_CONTRAST)


def tesseract_available() -> bool:
    """Whether the ``tesseract`` executable pytesseract would call can be found."""
    try:
        import pytesseract
    except ImportError:
        return False
    return shutil.which(pytesseract.pytesseract.tesseract_cmd) is not None


def _warn_no_tesseract() -> None:
    global _warned_no_tesseract
    if not _warned_no_tesseract:
        _warned_no_tesseract = True
        log.warning(
            "tesseract not found, install tesseract-ocr (apt install tesseract-ocr) for OCR "
            "text removal; falling back to the bright-glyph text heuristic"
        )


def ocr_text_mask(gray: np.ndarray) -> np.ndarray:
    """(H, W) bool filled Tesseract word boxes (confidence > ``OCR_MIN_CONFIDENCE``).

    Raises ``pytesseract.TesseractNotFoundError`` when the binary is missing.
    """
    import pytesseract

    # Tesseract's OpenMP threads fight with our workers on small machines.
    os.environ["OMP_THREAD_LIMIT"] = "1"
    data = pytesseract.image_to_data(gray, config=OCR_CONFIG, output_type=pytesseract.Output.DICT)
    h, w = gray.shape
    # Burned-in text is light and contrasted; OCR "words" read in speckle are not.
    light = _bright_strokes(gray, LIGHT)
    mask = np.zeros((h, w), dtype=np.uint8)
    for text, conf, x, y, bw, bh in zip(
        data["text"], data["conf"], data["left"], data["top"], data["width"], data["height"]
    ):
        word = str(text).strip()
        # Real labels have letters/digits; boxes taller than h/6 are speckle read as glyphs.
        if float(conf) <= OCR_MIN_CONFIDENCE or not any(c.isalnum() for c in word):
            continue
        if bh > h / 6 or light[y : y + bh, x : x + bw].mean() < OCR_MIN_LIGHT_FRACTION:
            continue
        cv2.rectangle(mask, (x - 1, y - 1), (x + bw, y + bh), 1, thickness=-1)
    return mask.astype(bool)


def _inner_region(region: np.ndarray) -> np.ndarray:
    """(H, W) bool: the region shrunk by ``BORDER_BAND`` px (its edge band counts as outside)."""
    kernel = np.ones((2 * BORDER_BAND + 1,) * 2, np.uint8)
    return cv2.erode(region.astype(np.uint8), kernel).astype(bool)


def _thin_strokes(gray: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(H, W) bool thin graphic strokes: light, high local contrast, gone after a 5×5 opening.

    Outside the scan region any light stroke counts. Inside, tissue (fascia, reflectors) can be
    bright and thin too, so only glyph-like pieces count there: near-white, both sides of the
    bounding box between 5 px and ``CHAR_MAX`` px, and sparse (a '+', '1', 'x'), which long
    streaks and compact blobs are not.
    """
    strokes = np.where(region, _bright_strokes(gray, NEAR_WHITE), _bright_strokes(gray, LIGHT))
    # Thick bright blobs (reflectors, saturated tissue) survive an opening; strokes do not.
    thick = cv2.morphologyEx(strokes.astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    thin = strokes & ~cv2.dilate(thick, np.ones((3, 3), np.uint8)).astype(bool)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(thin.astype(np.uint8), connectivity=8)
    bw = stats[:, cv2.CC_STAT_WIDTH]
    bh = stats[:, cv2.CC_STAT_HEIGHT]
    small = np.maximum(bw, bh) <= CHAR_MAX
    fill = stats[:, cv2.CC_STAT_AREA] / np.maximum(bw * bh, 1)
    glyph_like = small & (np.minimum(bw, bh) >= 5) & (fill < 0.6)
    inside = np.bincount(labels.ravel(), weights=region.ravel(), minlength=n) > 0
    keep = glyph_like | ~inside
    keep[0] = False
    # Narrow pieces ('I', '1', '-', broken diagonals) count when they sit beside accepted
    # glyphs, as letters of one word do.
    word = cv2.getStructuringElement(cv2.MORPH_RECT, (9, 5))
    for _ in range(WORD_GROWTH_STEPS):
        near = cv2.dilate(keep[labels].astype(np.uint8), word).astype(bool)
        touching = np.bincount(labels[near], minlength=n) > 0
        grown = keep | (small & touching)
        grown[0] = False
        if np.array_equal(grown, keep):
            break
        keep = grown
    return keep[labels]


def glyph_text_mask(gray: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """(H, W) bool heuristic text mask: word-sized groups of thin bright strokes.

    Args:
        gray: (H, W) uint8 image.
        region: (H, W) bool scan region (``None``: everything counts as outside, i.e. the
            permissive rule); inside it only glyph-like stroke pieces count.
    """
    region = np.zeros(gray.shape, bool) if region is None else region
    thin = _thin_strokes(gray, region).astype(np.uint8)
    # Join the letters of a word, then keep only word-sized groups.
    words = cv2.dilate(thin, cv2.getStructuringElement(cv2.MORPH_RECT, (7, 3)))
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(words, connectivity=8)
    h = gray.shape[0]
    heights = stats[:, cv2.CC_STAT_HEIGHT]
    keep = (heights >= 4) & (heights <= max(12, h // 12)) & (stats[:, cv2.CC_STAT_AREA] >= 12)
    keep[0] = False
    return keep[labels] & cv2.dilate(thin, np.ones((3, 3), np.uint8)).astype(bool)


def color_mask(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool colour overlays of an (H, W, 3) RGB uint8 image (HSV + k-means, k = 3)."""
    enhanced = _clahe_rgb(rgb)
    hsv = cv2.cvtColor(enhanced, cv2.COLOR_RGB2HSV)
    chroma = enhanced.max(axis=2).astype(np.int16) - enhanced.min(axis=2)
    candidates = (hsv[:, :, 1] > COLOR_MIN_SATURATION) & (chroma >= COLOR_MIN_CHROMA)
    mask = np.zeros(rgb.shape[:2], dtype=bool)
    n = int(candidates.sum())
    if n == 0:
        return mask
    features = hsv[candidates].astype(np.float32)
    if n >= 3:
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1.0)
        cv2.setRNGSeed(0)  # k-means++ seeding is random; keep results reproducible
        _, labels, centers = cv2.kmeans(features, 3, None, criteria, 2, cv2.KMEANS_PP_CENTERS)
        good = (centers[:, 1] > COLOR_MIN_SATURATION) & (centers[:, 2] > COLOR_MIN_VALUE)
        keep = good[labels.ravel()]
    else:
        keep = (features[:, 1] > COLOR_MIN_SATURATION) & (features[:, 2] > COLOR_MIN_VALUE)
    mask[candidates] = keep
    return _drop_small(mask, COLOR_MIN_COMPONENT)


def _drop_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Remove 8-connected components smaller than ``min_area`` pixels."""
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return keep[labels]


def marker_mask(gray: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(H, W) bool grey markers: Canny contours (30 < area < 2000) with an anatomy guard.

    Args:
        gray: (H, W) uint8 image.
        region: (H, W) bool scan-region mask.

    A contour is kept whole when it lies mostly outside the region or touches its edge band;
    inside the region only its thin near-white strokes (calipers, dashes) are kept.
    """
    edges = cv2.Canny(_clahe(gray), 50, 150)
    edges = cv2.dilate(edges, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    inner = _inner_region(region)
    thin_strokes = _thin_strokes(gray, region)
    kept = [c for c in contours if MARKER_MIN_AREA < cv2.contourArea(c) < MARKER_MAX_AREA]
    labels = np.zeros(gray.shape, dtype=np.int32)
    for i, contour in enumerate(kept, start=1):
        cv2.drawContours(labels, [contour], -1, i, thickness=-1)
    n = len(kept) + 1
    inner_fraction = np.bincount(labels.ravel(), weights=inner.ravel(), minlength=n) / np.maximum(
        np.bincount(labels.ravel(), minlength=n), 1
    )
    # Outside the fan or at its edge there is no anatomy to lose: take the whole contour.
    outside = inner_fraction < 0.5
    outside[0] = False
    out = outside[labels] | ((labels > 0) & thin_strokes)
    return out


def straight_line_mask(
    gray: np.ndarray, region: np.ndarray, min_length: int = LINE_MIN_LENGTH
) -> np.ndarray:
    """(H, W) bool thin horizontal/vertical lines of one constant grey (ROI boxes, rulers).

    A pixel is on such a line when it equals (±1) its two neighbours along the line, differs
    by ``LINE_CONTRAST`` from the pixels two rows (columns) away across it, and the run of such
    pixels is at least ``min_length`` long. Speckle is never constant over that many pixels;
    inside the scan region saturated pixels are left out (clipped tissue forms flat runs).
    """
    g = gray.astype(np.int16)
    light = (gray >= LIGHT) & ~(region & (gray >= SATURATED))
    out = np.zeros(gray.shape, dtype=bool)
    for along, across, kernel in ((1, 0, (1, min_length)), (0, 1, (min_length, 1))):
        flat = (np.abs(g - np.roll(g, 1, axis=along)) <= 1) & (
            np.abs(g - np.roll(g, -1, axis=along)) <= 1
        )
        thin = (np.abs(g - np.roll(g, 2, axis=across)) >= LINE_CONTRAST) & (
            np.abs(g - np.roll(g, -2, axis=across)) >= LINE_CONTRAST
        )
        candidate = (flat & thin & light).astype(np.uint8)
        # Opening with a line-shaped kernel keeps only runs at least min_length long.
        opened = cv2.morphologyEx(candidate, cv2.MORPH_OPEN, np.ones(kernel, np.uint8))
        # A run's end pixels (one equal neighbour) and corners: grow by one light pixel.
        out |= cv2.dilate(opened, np.ones((3, 3), np.uint8)).astype(bool) & (gray >= LIGHT)
    return out


def dotted_line_mask(gray: np.ndarray) -> np.ndarray:
    """(H, W) bool dotted measurement lines: >= 4 tiny near-white dots on a straight line.

    Dots are components of at most ``DOT_MAX_AREA`` bright, contrasted pixels; dots within
    a few pixels of each other form a chain, kept when the dots are collinear (spread across
    the chain's main axis below 1 px).
    """
    bright = _bright_strokes(gray, NEAR_WHITE).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(bright, connectivity=8)
    is_dot = stats[:, cv2.CC_STAT_AREA] <= DOT_MAX_AREA
    is_dot[0] = False
    dots = is_dot[labels].astype(np.uint8)
    if not dots.any():
        return np.zeros(gray.shape, dtype=bool)
    chains = cv2.dilate(dots, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    _, chain_labels = cv2.connectedComponents(chains, connectivity=8)
    dot_ids = np.flatnonzero(is_dot)
    cy = np.clip(np.rint(centroids[dot_ids, 1]).astype(int), 0, gray.shape[0] - 1)
    cx = np.clip(np.rint(centroids[dot_ids, 0]).astype(int), 0, gray.shape[1] - 1)
    chain_of_dot = chain_labels[cy, cx]
    keep = np.zeros(n, dtype=bool)
    for chain in np.unique(chain_of_dot):
        members = dot_ids[chain_of_dot == chain]
        if members.size < 4:
            continue
        pts = centroids[members] - centroids[members].mean(axis=0)
        spread = np.sqrt(np.linalg.eigvalsh(pts.T @ pts / members.size))  # ascending
        if spread[0] < 1.0 and spread[1] >= 3.0:
            keep[members] = True
    return keep[labels]


def _combine(parts: dict[str, np.ndarray]) -> np.ndarray:
    """Union of the part masks, closed 5×5 and dilated 3×3 (covers stroke anti-aliasing)."""
    union = np.zeros(next(iter(parts.values())).shape, dtype=np.uint8)
    for part in parts.values():
        union |= part.astype(np.uint8)
    union = cv2.morphologyEx(union, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    union = cv2.dilate(union, np.ones((3, 3), np.uint8))
    return union.astype(bool)


def text_mask(
    gray: np.ndarray, region: np.ndarray, use_ocr: bool | Literal["auto"] = "auto"
) -> np.ndarray:
    """(H, W) bool text: OCR word boxes (when asked/possible) united with the glyph heuristic.

    Args:
        gray: (H, W) uint8 image.
        region: (H, W) bool scan region.
        use_ocr: as in :func:`remove_annotations`.
    """
    heuristic = glyph_text_mask(gray, region)
    if use_ocr is False:
        return heuristic
    if not tesseract_available():
        if use_ocr is True:
            raise USFMError(
                "OCR text removal was requested but the tesseract executable is missing",
                hint="install tesseract-ocr (e.g. apt install tesseract-ocr) or use use_ocr='auto'",
            )
        _warn_no_tesseract()
        return heuristic
    import pytesseract

    try:
        return ocr_text_mask(gray) | heuristic
    except pytesseract.TesseractNotFoundError:
        if use_ocr is True:
            raise
        _warn_no_tesseract()
        return heuristic


def remove_annotations(
    image: np.ndarray,
    *,
    region_mask: np.ndarray | None = None,
    use_ocr: bool | Literal["auto"] = "auto",
    inpaint_radius: int = 3,
    extra_text_mask: np.ndarray | None = None,
) -> AnnotationResult:
    """Detect burned-in annotations and inpaint them (Navier–Stokes).

    Args:
        image: uint8 (H, W) grey or (H, W, 3) RGB frame.
        region_mask: (H, W) bool scan region; computed with
            :func:`~usfm_core.preprocess.region.scan_region_mask` when ``None``.
        use_ocr: ``"auto"`` uses Tesseract when installed (one warning otherwise),
            ``True`` requires it, ``False`` uses only the glyph heuristic for text.
        inpaint_radius: neighbourhood radius (px) of ``cv2.inpaint``.
        extra_text_mask: optional (H, W) bool text found beforehand, added to the text part —
            e.g. the OCR of a cine's first frame reused for every frame (burned-in text is
            static), so Tesseract runs once per clip rather than once per frame.

    Returns:
        :class:`AnnotationResult` with ``clean`` of the input's shape (grey stays grey).
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) image, got {img.dtype} {img.shape}")
    if use_ocr not in (True, False, "auto"):
        raise ValueError(f"use_ocr must be True, False or 'auto', got {use_ocr!r}")
    gray = to_gray(img)
    region = scan_region_mask(img) if region_mask is None else np.asarray(region_mask, bool)
    if region.shape != gray.shape:
        raise ValueError(f"region_mask shape {region.shape} does not match image {gray.shape}")
    # Grey markers: Canny contours (paper), straight ROI-box lines and dotted caliper lines.
    markers = marker_mask(gray, region) | straight_line_mask(gray, region) | dotted_line_mask(gray)
    # Outside the scan there is no anatomy: every light, contrasted stroke is a graphic
    # (depth ticks, scale marks, short labels the detectors above skip).
    markers |= _bright_strokes(gray, LIGHT) & ~region
    parts = {
        "text": text_mask(gray, region, use_ocr),
        "color": color_mask(img) if _is_color(img) else np.zeros(gray.shape, dtype=bool),
        "markers": markers,
    }
    if extra_text_mask is not None:
        if extra_text_mask.shape != gray.shape:
            raise ValueError(
                f"extra_text_mask shape {extra_text_mask.shape} does not match {gray.shape}"
            )
        parts["text"] = parts["text"] | extra_text_mask.astype(bool)
    mask = _combine(parts)
    if not mask.any():
        return AnnotationResult(clean=img.copy(), mask=mask, parts=parts)
    clean = cv2.inpaint(
        np.ascontiguousarray(img), mask.astype(np.uint8), inpaint_radius, cv2.INPAINT_NS
    )
    return AnnotationResult(clean=clean, mask=mask, parts=parts)
