"""Burned-in annotations drawn over a finished B-mode frame, with exact pixel masks.

Each annotation is a :class:`Stroke`: the exact set of pixels it covers and one ink value.
Strokes are drawn without anti-aliasing, so a stroke's mask is exactly the pixels it sets.
Layers: ``text`` (labels, depth ticks), ``caliper`` (``+`` markers, dotted lines) and
``overlay`` (colour-Doppler box and colour bar; the frame becomes RGB).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from usfm_core.sim.config import SimConfig
from usfm_core.sim.geometry import ScanGeometry

LAYERS = ("text", "caliper", "overlay")
FONT = cv2.FONT_HERSHEY_SIMPLEX
EXAM_LABELS = ("ABD", "BREAST", "THYROID", "LIVER", "OB", "RENAL", "VASC")
VIEW_LABELS = ("SAG", "TRV", "LT", "RT", "LONG", "TRANS")
PointPair = tuple[tuple[int, int], tuple[int, int]]  # two (x, y) pixel positions


@dataclass
class Stroke:
    """Pixels ``mask`` (H, W) bool of one annotation layer, painted with ``ink``.

    ``ink`` is a gray level, or an RGB image ``(H, W, 3)`` uint8 (per-pixel colours, e.g. a
    colour-Doppler patch) read where ``mask`` is set.
    """

    layer: str
    mask: np.ndarray
    ink: int | np.ndarray


def _draw(shape: tuple[int, int], draw: Callable[[np.ndarray], object]) -> np.ndarray:
    """Run ``draw(canvas)`` on a black uint8 canvas; return the bool mask it painted."""
    canvas = np.zeros(shape, dtype=np.uint8)
    draw(canvas)
    return canvas > 0


def _font_scale(height: int) -> float:
    """Label font scale: about 8 px tall text on a 256-px frame."""
    return 0.3 * height / 256


def _text_stroke(
    shape: tuple[int, int], text: str, origin: tuple[int, int], ink: int, scale: float
) -> Stroke:
    """One text label with its bottom-left corner at ``origin`` (x, y) px."""
    return Stroke(
        "text",
        _draw(shape, lambda c: cv2.putText(c, text, origin, FONT, scale, 255, 1, cv2.LINE_8)),
        ink,
    )


def _text_block(
    shape: tuple[int, int], lines: list[str], corner: str, ink: int, scale: float
) -> list[Stroke]:
    """Lines of text stacked in one corner (``"tl" | "tr" | "bl" | "br"``) of the frame."""
    height, width = shape
    pad = max(2, round(3 * height / 256))
    strokes = []
    for i, line in enumerate(lines):
        (tw, th), base = cv2.getTextSize(line, FONT, scale, 1)
        step = th + base + 1
        x = pad if corner[1] == "l" else width - pad - tw
        if corner[0] == "t":
            y = pad + th + i * step
        else:
            y = height - pad - base - (len(lines) - 1 - i) * step
        strokes.append(_text_stroke(shape, line, (x, y), ink, scale))
    return strokes


def _depth_ticks(geom: ScanGeometry, ink: int, scale: float) -> list[Stroke]:
    """A depth scale at the right edge: a tick per cm, labelled every 2 cm (rows on-axis)."""
    shape = (geom.height, geom.width)
    col = geom.width - max(3, round(4 * geom.width / 256))
    tick = max(2, round(3 * geom.width / 256))
    y_face = geom.apex_radius_mm if geom.kind == "sector" else 0.0

    def rows_for(depths: list[int]) -> list[int]:
        return [round((y_face + 10 * d - geom.y_top_mm) / geom.pixel_mm) for d in depths]

    depths = list(range(0, int(geom.depth_mm // 10) + 1))
    rows = rows_for(depths)

    def draw_ticks(canvas: np.ndarray) -> None:
        for row in rows:
            if 0 <= row < geom.height:
                cv2.line(canvas, (col - tick, row), (col, row), 255, 1, cv2.LINE_8)

    strokes = [Stroke("text", _draw(shape, draw_ticks), ink)]
    for d, row in zip(depths, rows):
        if d and d % 2 == 0 and row < geom.height:
            (tw, th), _ = cv2.getTextSize(str(d), FONT, scale, 1)
            origin = (col - tick - 2 - tw, min(geom.height - 2, row + th // 2))
            strokes.append(_text_stroke(shape, str(d), origin, ink, scale))
    return strokes


def _inner_label(region: np.ndarray, text: str, ink: int, scale: float) -> list[Stroke]:
    """A view label (``SAG``, ``TRV`` ...) just inside the scan region's lower-left edge.

    Real scanners put some labels over the image; these are the hard cases for annotation
    removal. Returns no stroke when the label does not fit inside the region.
    """
    (tw, th), base = cv2.getTextSize(text, FONT, scale, 1)
    rows = np.nonzero(region.any(axis=1))[0]
    y = int(rows[0] + 0.8 * (rows[-1] - rows[0]))
    cols = np.nonzero(region[y - th])[0]
    if cols.size == 0:
        return []
    x = int(cols[0]) + max(3, tw // 4)
    if not region[y - th : y + base + 1, x : x + tw + 1].all():
        return []
    return [_text_stroke(region.shape, text, (x, y), ink, scale)]


def _caliper_points(
    lesion_mask: np.ndarray, region: np.ndarray, rng: np.random.Generator
) -> list[PointPair]:
    """Caliper end points (x, y): the long and short axes of the largest lesion.

    Without a lesion, one random pair inside the scan region.
    """
    labels, counts = np.unique(lesion_mask[lesion_mask > 0], return_counts=True)
    if labels.size == 0:
        ys, xs = np.nonzero(region)
        i, j = rng.choice(ys.size, size=2, replace=False)
        return [((int(xs[i]), int(ys[i])), (int(xs[j]), int(ys[j])))]
    ys, xs = np.nonzero(lesion_mask == labels[np.argmax(counts)])
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    centre = pts.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov((pts - centre).T) + 1e-9 * np.eye(2))
    pairs = []
    for axis in (vecs[:, 1], vecs[:, 0]):  # long axis, then short axis
        proj = (pts - centre) @ axis
        a, b = pts[np.argmin(proj)], pts[np.argmax(proj)]
        pairs.append(((round(a[0]), round(a[1])), (round(b[0]), round(b[1]))))
    return pairs


def _caliper_strokes(shape: tuple[int, int], pairs: list[PointPair], ink: int) -> list[Stroke]:
    """``+`` markers at both ends of each pair and a dotted line between them."""
    size = max(5, round(7 * shape[0] / 256)) | 1

    def draw(canvas: np.ndarray) -> None:
        for a, b in pairs:
            for p in (a, b):
                cv2.drawMarker(canvas, p, 255, cv2.MARKER_CROSS, size, 1, cv2.LINE_8)
            length = math.dist(a, b)
            for s in np.arange(size, length - size + 1, 3.0):
                x = round(a[0] + (b[0] - a[0]) * s / length)
                y = round(a[1] + (b[1] - a[1]) * s / length)
                canvas[y, x] = 255

    return [Stroke("caliper", _draw(shape, draw), ink)]


def _doppler_strokes(
    geom: ScanGeometry, region: np.ndarray, rng: np.random.Generator
) -> list[Stroke]:
    """A colour-Doppler ROI box with coloured flow inside, and a colour scale bar."""
    height, width = region.shape
    shape = (height, width)
    # ROI box: a rectangle fully inside the scan region.
    ys, xs = np.nonzero(region)
    bh, bw = int(0.25 * height), int(0.3 * width)
    box = None
    for _ in range(50):
        y0 = int(rng.integers(ys.min(), max(ys.min() + 1, ys.max() - bh)))
        x0 = int(rng.integers(xs.min(), max(xs.min() + 1, xs.max() - bw)))
        if region[y0 : y0 + bh + 1, x0 : x0 + bw + 1].all():
            box = (x0, y0, x0 + bw, y0 + bh)
            break
    strokes = []
    if box is not None:
        x0, y0, x1, y1 = box
        outline = _draw(shape, lambda c: cv2.rectangle(c, (x0, y0), (x1, y1), 255, 1))
        strokes.append(Stroke("overlay", outline, 200))
        # Flow: an elongated vessel through the box, red one way and blue the other.
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        cx, cy = (
            rng.uniform(x0 + 0.3 * bw, x1 - 0.3 * bw),
            rng.uniform(y0 + 0.3 * bh, y1 - 0.3 * bh),
        )
        ang = rng.uniform(-0.6, 0.6)
        v = -(xx - cx) * math.sin(ang) + (yy - cy) * math.cos(ang)
        radius = rng.uniform(0.08, 0.15) * bh
        inside_box = (xx > x0) & (xx < x1) & (yy > y0) & (yy < y1)
        vessel = (np.abs(v) < radius) & inside_box
        speed = np.clip(1 - (v / radius) ** 2, 0, 1)  # parabolic profile
        speed *= rng.uniform(0.6, 1.0, size=speed.shape).astype(np.float32)  # Doppler noise
        colour = _flow_colour(speed if rng.random() < 0.5 else -speed)
        strokes.append(Stroke("overlay", vessel & ~outline, colour))
    strokes.append(_colour_bar(shape))
    return strokes


def _flow_colour(velocity: np.ndarray) -> np.ndarray:
    """Map signed velocity in [-1, 1] to RGB uint8 (red towards, blue away; never gray)."""
    mag = 80 + 175 * np.abs(velocity)
    rgb = np.zeros((*velocity.shape, 3), dtype=np.float32)
    pos = velocity >= 0
    rgb[..., 0] = np.where(pos, mag, 0)
    rgb[..., 1] = np.where(
        pos, 0.6 * np.clip(mag - 200, 0, None), 0.6 * np.clip(mag - 200, 0, None)
    )
    rgb[..., 2] = np.where(pos, 0, mag)
    return rgb.astype(np.uint8)


def _colour_bar(shape: tuple[int, int]) -> Stroke:
    """Vertical colour scale bar in the top-right region, below the corner labels."""
    height, width = shape
    bar_w, bar_h = max(3, round(5 * width / 256)), round(0.25 * height)
    x0, y0 = width - bar_w - max(12, round(16 * width / 256)), round(0.28 * height)
    mask = np.zeros(shape, dtype=bool)
    mask[y0 : y0 + bar_h, x0 : x0 + bar_w] = True
    velocity = np.linspace(1, -1, bar_h)[:, None] * np.ones((1, bar_w))
    colour = np.zeros((height, width, 3), dtype=np.uint8)
    colour[y0 : y0 + bar_h, x0 : x0 + bar_w] = _flow_colour(velocity)
    return Stroke("overlay", mask, colour)


def plan_annotations(
    geom: ScanGeometry,
    cfg: SimConfig,
    region: np.ndarray,
    lesion_mask: np.ndarray,
    rng: np.random.Generator,
) -> tuple[list[Stroke], dict]:
    """Decide every annotation of a frame (or of all frames of a cine); return strokes + meta."""
    shape = (geom.height, geom.width)
    scale = _font_scale(geom.height)
    ink = int(rng.integers(200, 256))
    strokes: list[Stroke] = []
    meta: dict = {}
    measures: list[str] = []
    if cfg.calipers:
        pairs = _caliper_points(lesion_mask, region, rng)
        strokes += _caliper_strokes(shape, pairs, int(rng.integers(235, 256)))
        lengths = [math.dist(a, b) * geom.pixel_mm / 10 for a, b in pairs]
        measures = [f"{name} {cm:.2f}cm" for name, cm in zip(("L", "W"), lengths)]
        meta["calipers_px"] = [[list(a), list(b)] for a, b in pairs]
        meta["caliper_lengths_cm"] = lengths
    if cfg.text:
        left = [
            f"{cfg.frequency_mhz:.1f}MHz",
            f"D {cfg.depth_mm / 10:.1f}cm",
            f"G {int(rng.integers(40, 70))}",
            f"DR {cfg.dynamic_range_db:.0f}",
        ]
        right = [
            str(rng.choice(EXAM_LABELS)),
            f"{int(rng.integers(7, 18)):02d}:{int(rng.integers(0, 60)):02d}",
        ]
        strokes += _text_block(shape, left, "tl", ink, scale)
        strokes += _text_block(shape, right, "tr", ink, scale)
        if measures:
            strokes += _text_block(shape, measures, "bl", ink, scale)
        strokes += _depth_ticks(geom, ink, scale)
        view = str(rng.choice(VIEW_LABELS))
        inner = _inner_label(region, view, ink, scale)
        strokes += inner
        meta["text"] = left + right + measures + ([view] if inner else [])
    if cfg.colour_overlay:
        strokes += _doppler_strokes(geom, region, rng)
    return strokes, meta


def apply_annotations(
    clean: np.ndarray, strokes: list[Stroke], rgb: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Paint ``strokes`` over ``clean`` (H, W) uint8.

    Returns ``(clean_out, image, masks)``: the clean frame in the output format ((H, W, 3) when
    ``rgb``), the annotated frame, and a bool (H, W) mask per layer in :data:`LAYERS`.
    """
    base = np.repeat(clean[:, :, None], 3, axis=2) if rgb else clean
    image = base.copy()
    masks = {name: np.zeros(clean.shape, dtype=bool) for name in LAYERS}
    for stroke in strokes:
        m = stroke.mask
        if isinstance(stroke.ink, np.ndarray):
            image[m] = stroke.ink[m] if rgb else cv2.cvtColor(stroke.ink, cv2.COLOR_RGB2GRAY)[m]
        else:
            image[m] = stroke.ink
        masks[stroke.layer] |= m
    return base, image, masks
