"""Inference with a fine-tuned segmenter, and measurements of the masks it produces.

:func:`segment_frames` streams frames through the model in small batches (memory stays flat for
long cines) and gives masks back in each frame's own geometry. :func:`measure_mask` turns a mask
into per-object areas, diameters and ellipse-fit circumferences, in mm when the pixel spacing
is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from usfm_core.finetune.data import normalize, to_uint8
from usfm_core.finetune.postprocess import PostProcess, labels_from_logits


def _to_gray_u8(frame: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3|4)`` of any dtype → ``(H, W) uint8``."""
    import cv2

    frame = np.asarray(frame)
    if frame.ndim == 3 and frame.shape[-1] in (3, 4):
        frame = cv2.cvtColor(to_uint8(frame[..., :3]), cv2.COLOR_RGB2GRAY)
    if frame.ndim != 2:
        raise ValueError(f"expected a 2-D frame (H, W) or (H, W, 3), got shape {frame.shape}")
    return to_uint8(frame)


def segment_frames(
    model: torch.nn.Module,
    frames: Iterable[np.ndarray],
    *,
    postprocess: PostProcess | None = None,
    **options: Any,
) -> Iterator[np.ndarray]:
    """Segment frames one batch at a time; yields ``(H, W) uint8`` label maps (0 = background).

    The logits of :func:`frame_logits` (at each frame's own size, so the mask overlays the
    frame exactly; ``options``: its ``batch_size``, ``device``, ``progress``, ``input_size``,
    ``tta`` and ``precision``) are thresholded (one sigmoid) or arg-maxed, then post-processed:
    ``postprocess`` is the presence gate / largest object / hole filling of
    :mod:`usfm_core.finetune.postprocess`, default ``model.postprocess`` (a saved model's
    ``extra.postprocess``), else none.
    """
    post = postprocess or getattr(model, "postprocess", None) or PostProcess()
    for logits in frame_logits(model, frames, **options):
        yield labels_from_logits(logits, post)


def frame_logits(
    model: torch.nn.Module,
    frames: Iterable[np.ndarray],
    *,
    batch_size: int = 4,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    input_size: int | None = None,
    tta: bool | None = None,
    precision: str = "fp32",
) -> Iterator[torch.Tensor]:
    """A segmenter's float32 logits ``(K, H, W)`` per frame, at the frame's own ``(H, W)``.

    Frames are streamed in batches of ``batch_size``: each is made gray uint8, resized to the
    model's square input (``input_size`` if given, else the model's saved inference size
    ``model.infer_size`` — ``extra.infer_size``, chosen on validation — else its training
    ``model.input_size``; ``cv2.INTER_AREA``), normalised,
    segmented, and its logits resized back (bilinear). ``progress(n_done)`` is called after
    each batch. ``tta``: average the logits of the frame and of its horizontal mirror (flipped
    back): two forward passes, smoother outlines; default ``model.tta`` (a saved model's
    ``extra.tta``), else off. ``precision``: ``"fp32"`` (default), ``"bf16"`` or ``"auto"``
    (bf16 where the CPU computes it natively, :mod:`usfm_core.models.precision`); the logits
    are float32 either way.
    """
    import cv2

    from usfm_core.models.precision import autocast, resolve_precision

    saved = getattr(model, "infer_size", None) or getattr(model, "input_size", 224)
    size = int(input_size or saved)
    tta = bool(getattr(model, "tta", False)) if tta is None else tta
    precision = resolve_precision(precision, device)  # refuse a bad name before any work
    model = model.to(device).eval()
    done = 0
    batch: list[np.ndarray] = []

    def run(batch: list[np.ndarray]) -> list[torch.Tensor]:
        x = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in batch])
        xt = torch.from_numpy(normalize(x))[:, None].to(device)
        with torch.no_grad(), autocast(precision, device):
            logits = model(xt).float().cpu()
            if tta:  # mirror, segment, mirror back, average the logits
                logits = 0.5 * (logits + model(xt.flip(-1)).float().cpu().flip(-1))
        return [
            torch.nn.functional.interpolate(
                lg[None], size=f.shape, mode="bilinear", align_corners=False
            )[0]
            for f, lg in zip(batch, logits)
        ]

    for frame in frames:
        batch.append(_to_gray_u8(frame))
        if len(batch) == batch_size:
            yield from run(batch)
            done += len(batch)
            batch = []
            if progress is not None:
                progress(done)
    if batch:
        yield from run(batch)
        if progress is not None:
            progress(done + len(batch))


def ramanujan_circumference(a: float, b: float) -> float:
    """Ellipse perimeter from semi-axes ``a``, ``b`` (Ramanujan's first approximation)."""
    return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))


def measure_mask(
    mask: np.ndarray,
    spacing_mm: Sequence[float] | None = None,
    min_pixels: int = 5,
    with_iou: bool = True,
) -> dict:
    """Per-object measurements of a label map ``(H, W)`` (any non-zero value is foreground).

    Returns ``{"unit": "mm" | "px", "total_area": float, "objects": [ ... ]}`` where each
    object (8-connected, ≥ ``min_pixels``, largest first) has ``label`` (its class value),
    ``area`` (mm² or px²), ``max_diameter`` (largest distance between hull points),
    ``ellipse_major`` / ``ellipse_minor`` (full axes of ``cv2.fitEllipse`` on the outer contour),
    ``circumference`` (Ramanujan on the fitted ellipse), ``ellipse_iou`` (overlap of that
    filled ellipse with the object: how far the circumference can be trusted),
    ``centroid_y`` / ``centroid_x`` (px) and ``n_pixels``. ``spacing_mm`` is ``(dy, dx)``;
    without it everything is in pixels. ``with_iou=False`` skips ``ellipse_iou`` (NaN; it does
    not depend on the unit, so a second, calibrated pass need not compute it again).
    """
    import cv2

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    dy, dx = (float(spacing_mm[0]), float(spacing_mm[1])) if spacing_mm is not None else (1, 1)
    unit = "mm" if spacing_mm is not None else "px"
    objects = []
    for value in np.unique(mask[mask > 0]):
        n, comp, stats, cents = cv2.connectedComponentsWithStats(
            (mask == value).astype(np.uint8), connectivity=8
        )
        for i in range(1, n):
            npx = int(stats[i, cv2.CC_STAT_AREA])
            if npx < min_pixels:
                continue
            obj = _measure_object(comp == i, dy, dx, with_iou)
            obj.update(
                label=int(value),
                n_pixels=npx,
                area=npx * dy * dx,
                centroid_y=float(cents[i, 1]),
                centroid_x=float(cents[i, 0]),
            )
            objects.append(obj)
    objects.sort(key=lambda o: -o["area"])
    return {"unit": unit, "total_area": float(sum(o["area"] for o in objects)), "objects": objects}


def _measure_object(obj: np.ndarray, dy: float, dx: float, with_iou: bool = True) -> dict:
    """Max diameter and ellipse fit of one binary object, contour scaled by ``(dy, dx)``."""
    import cv2

    contours, _ = cv2.findContours(obj.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate([c[:, 0, :] for c in contours]).astype(np.float32)  # (P, 2) as (x, y)
    pts_mm = pts * np.array([dx, dy], np.float32)  # scale before fitting: spacing may differ
    hull = cv2.convexHull(pts_mm)[:, 0, :]
    diffs = hull[:, None, :] - hull[None, :, :]
    max_diam = float(np.sqrt((diffs**2).sum(-1)).max()) if len(hull) > 1 else 0.0
    out = {
        "max_diameter": max_diam,
        "ellipse_major": float("nan"),
        "ellipse_minor": float("nan"),
        "circumference": float("nan"),
    }
    major = minor = angle = float("nan")
    centre = (float("nan"), float("nan"))
    if len(np.unique(pts_mm, axis=0)) >= 6:
        centre, (w, h), degrees = cv2.fitEllipse(pts_mm)
        major, minor = max(w, h), min(w, h)
        angle = math.radians(degrees if w >= h else degrees + 90)  # of the major axis
    # A least-squares fit to a few nearly collinear contour points is ill-conditioned: it
    # returned a 46-px ellipse for a 5-pixel speck, differing run to run in the last bits.
    # An ellipse much longer than the object itself is such a fit: use the moments instead.
    if not np.isfinite(major) or major > 1.5 * max_diam + 2 * max(dy, dx):
        centre, major, minor, angle = _moment_ellipse(obj, dy, dx)
    out.update(
        ellipse_major=float(major),
        ellipse_minor=float(minor),
        circumference=ramanujan_circumference(major / 2, minor / 2),
        ellipse_iou=(
            _ellipse_iou(obj, dy, dx, centre, major, minor, angle) if with_iou else float("nan")
        ),
    )
    return out


def _ellipse_iou(
    obj: np.ndarray,
    dy: float,
    dx: float,
    centre: tuple[float, float],
    major: float,
    minor: float,
    angle: float,
) -> float:
    """IoU ``[0, 1]`` of the object ``(H, W)`` and the filled ellipse fitted to it (centre
    ``(x, y)``, full axes, major-axis ``angle`` in radians; units of ``(dy, dx)``), counted on
    the pixel grid of a box holding both.

    A plausibility check of the circumference: a head mask that is an ellipse scores
    0.95-0.99 (HC18 validation, shipped ``fetal-head``); a mask joined to a neighbouring
    structure, or a partial one, scores low, and its ellipse (hence its HC) is not to be
    trusted. 0 for a degenerate (zero-width) fit, e.g. of a one-pixel-wide line.
    """
    if not all(np.isfinite(v) for v in (*centre, major, minor, angle)) or minor <= 0:
        return 0.0
    ys, xs = np.nonzero(obj)
    a, b = major / 2, minor / 2
    # the box: the object's and the ellipse's (its half-extent is at most a), in pixels
    x0 = int(min(xs.min(), math.floor((centre[0] - a) / dx))) - 1
    x1 = int(max(xs.max(), math.ceil((centre[0] + a) / dx))) + 2
    y0 = int(min(ys.min(), math.floor((centre[1] - a) / dy))) - 1
    y1 = int(max(ys.max(), math.ceil((centre[1] + a) / dy))) + 2
    gy, gx = np.mgrid[y0:y1, x0:x1]
    u = gx * dx - centre[0]
    v = gy * dy - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    inside = ((u * c + v * s) / a) ** 2 + ((-u * s + v * c) / b) ** 2 <= 1.0
    mask = np.zeros(inside.shape, bool)
    mask[ys - y0, xs - x0] = True
    union = int((inside | mask).sum())
    return float((inside & mask).sum()) / union if union else 0.0


def _moment_ellipse(
    obj: np.ndarray, dy: float, dx: float
) -> tuple[tuple[float, float], float, float, float]:
    """The ellipse with the second moments of ``obj`` (H, W), in the units of ``(dy, dx)``:
    centre ``(x, y)``, full axes ``major``, ``minor`` and the major axis's angle (radians from
    +x). A filled ellipse of semi-axis ``a`` has variance ``a²/4`` along it, so the full axis
    is ``4·√λ`` (+ one pixel, the extent of a pixel centre)."""
    ys, xs = np.nonzero(obj)
    coords = np.stack([xs * dx, ys * dy]).astype(np.float64)  # (2, P)
    cov = np.cov(coords) if coords.shape[1] > 1 else np.zeros((2, 2))
    lam, vec = np.linalg.eigh(np.atleast_2d(cov))
    lam = np.clip(lam, 0.0, None)
    pixel = min(dy, dx)
    centre = (float(coords[0].mean()), float(coords[1].mean()))
    angle = math.atan2(vec[1, -1], vec[0, -1])
    return centre, 4 * math.sqrt(lam[-1]) + pixel, 4 * math.sqrt(lam[0]) + pixel, angle


# --- measurement rows: the one table behind measurements.csv and the napari Segment table -----

# Lengths measured per object (``measure_mask`` keys), each given as ``<name>_mm`` / ``<name>_px``.
LENGTH_KEYS = (
    "max_diameter",
    "ellipse_major",
    "ellipse_minor",
    "circumference",
    "centroid_y",
    "centroid_x",
)
MEASUREMENT_COLUMNS: tuple[str, ...] = (
    "file",
    "source",
    "frame",
    "object",
    "label",
    "class",
    "unit",
    "area_mm2",
    *(f"{k}_mm" for k in LENGTH_KEYS),
    "area_px2",
    *(f"{k}_px" for k in LENGTH_KEYS),
    "ellipse_iou",
    "pixel_size_y_mm",
    "pixel_size_x_mm",
    "calibration",
    "note",
)


def label_names(model: torch.nn.Module | dict) -> dict[int, str]:
    """Label value → class name of a segmenter's masks (as ``segment`` writes them).

    ``model`` is a segmenter or its saved ``config.json`` (parsed). A softmax model whose
    ``classes`` name every output gives ``{1: classes[1], ...}``; a one-structure model
    ``{1: name}`` when its classes are ``["background", name]``, else ``{1: "foreground"}``
    (older models saved the image classes of their data set there). Binary masks are stored
    0/255 by ``usfm-core segment``, so 255 gets the same name.
    """
    if isinstance(model, dict):
        cfg = model.get("config", model)
        k, names = int(cfg.get("n_classes", 1)), list(cfg.get("classes") or [])
    else:
        k = int(getattr(model, "n_classes", 1))
        names = list(getattr(model, "classes", []) or [])
    if k > 1:
        return {c: names[c] if len(names) == k else f"class{c}" for c in range(1, k)}
    name = names[1] if len(names) == 2 and names[0] == "background" else "foreground"
    return {1: name, 255: name}


def summary_columns(unit: str) -> tuple[str, ...]:
    """The columns a short table shows (napari's Segment table): ``unit`` is ``"mm"`` or
    ``"px"``; lengths in that unit, the area in its square, and ``ellipse_iou`` beside the
    circumference (how far the ellipse fit, hence the circumference, matches the object)."""
    return (
        "frame",
        "object",
        "label",
        f"area_{unit}2",
        f"max_diameter_{unit}",
        f"circumference_{unit}",
        "ellipse_iou",
        "unit",
    )


def measurement_rows(
    mask: np.ndarray,
    spacing_mm: Sequence[float] | None = None,
    *,
    file: str = "",
    source: str = "",
    frame: int = 0,
    min_pixels: int = 5,
    calibration: str = "",
    note: str = "",
    digits: int = 4,
    class_names: Mapping[int, str] | None = None,
) -> list[dict]:
    """Rows of :data:`MEASUREMENT_COLUMNS` for one frame's label map ``(H, W)``.

    One row per object of :func:`measure_mask` (8-connected, ≥ ``min_pixels``), numbered
    ``object`` = 1, 2, … largest first within the frame (all classes together; ``label`` is
    the class value). ``*_px`` columns are always filled (lengths in pixels, area in px²,
    centroid as row / column pixel index); ``*_mm`` columns (area in mm², lengths and the
    centroid from the top-left pixel's centre in mm, with ``spacing_mm = (dy, dx)``) only when
    calibrated, else empty. A frame without objects gives one row with an empty ``object`` and
    zero area. Floats are rounded to ``digits`` decimals. ``class_names`` (label value → name,
    e.g. :func:`label_names` of the model) fills the ``class`` column.
    """
    unit = "mm" if spacing_mm is not None else "px"
    dy, dx = (float(spacing_mm[0]), float(spacing_mm[1])) if spacing_mm is not None else (0, 0)
    base = {
        "file": file,
        "source": source,
        "frame": int(frame),
        "unit": unit,
        "pixel_size_y_mm": _round(dy, 8) if unit == "mm" else "",
        "pixel_size_x_mm": _round(dx, 8) if unit == "mm" else "",
        "calibration": calibration or ("none" if unit == "px" else ""),
        "note": note,
    }
    px = measure_mask(mask, None, min_pixels)["objects"]
    mm = (
        measure_mask(mask, (dy, dx), min_pixels, with_iou=False)["objects"]
        if unit == "mm"
        else [None] * len(px)
    )
    if not px:
        empty = {"object": "", "label": "", "area_px2": 0}
        return [{**base, **empty, **({"area_mm2": 0.0} if unit == "mm" else {})}]
    rows = []
    for k, (obj_px, obj_mm) in enumerate(zip(px, mm), start=1):
        row = {**base, "object": k, "label": obj_px["label"], "area_px2": obj_px["n_pixels"]}
        row["ellipse_iou"] = _round(obj_px["ellipse_iou"], 3)
        row["class"] = (class_names or {}).get(int(obj_px["label"]), "")
        for key in LENGTH_KEYS:
            row[f"{key}_px"] = _round(obj_px[key], digits)
        if obj_mm is not None:
            assert obj_mm["n_pixels"] == obj_px["n_pixels"]  # same objects, same order
            row["area_mm2"] = _round(obj_mm["area"], digits)
            for key in LENGTH_KEYS[:4]:
                row[f"{key}_mm"] = _round(obj_mm[key], digits)
            row["centroid_y_mm"] = _round(obj_px["centroid_y"] * dy, digits)
            row["centroid_x_mm"] = _round(obj_px["centroid_x"] * dx, digits)
        rows.append(row)
    return rows


def _round(value: float, digits: int) -> float:
    """``round`` that keeps nan (an ellipse needs 5 contour points) as nan."""
    value = float(value)
    return value if math.isnan(value) else round(value, digits)
