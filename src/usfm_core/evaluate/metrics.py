"""Evaluation metrics: classification (scikit-learn) and segmentation (numpy / scipy).

Segmentation metrics are implemented here rather than with MONAI or medpy to keep the
dependency list short; they follow the usual definitions:

* Dice ``2|A∩B| / (|A| + |B|)`` and IoU ``|A∩B| / |A∪B|`` per image (:func:`dice` / :func:`iou`
  give 1.0 when both masks are empty);
* reported segmentation scores (:func:`segmentation_metrics`, :func:`per_class_scores`) follow
  MONAI's ``DiceMetric(ignore_empty=True)``: per class, images whose ground truth lacks the
  class are left out (NaN), each class is averaged over the images that hold it and the mean is
  taken over classes, so a failing class cannot hide behind the others or behind empty images.
  The earlier definition (empty/empty = 1, classes merged) stays available as ``dice_legacy``;
* HD95: the larger of the two directed 95th percentiles of the boundary-to-boundary distances
  (MONAI's ``compute_hausdorff_distance(percentile=95)`` convention), in the units of
  ``spacing`` (pixels by default, mm when the pixel spacing is given).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    y_score: np.ndarray | None = None,
    n_classes: int | None = None,
) -> dict[str, float]:
    """Accuracy, macro precision / recall / F1 and (if scores are given) macro one-vs-rest AUROC.

    Args:
        y_true: true class indices, shape ``(N,)``.
        y_pred: predicted class indices, shape ``(N,)``.
        y_score: class probabilities ``(N, K)``; AUROC is NaN when absent or undefined (a
            class missing from ``y_true``).
        n_classes: number of classes ``K``; the macro averages run over all ``K`` classes.
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-D")
    k = n_classes or int(max(y_true.max(initial=0), y_pred.max(initial=0)) + 1)
    labels = list(range(k))
    out = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "precision": float(
            skm.precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "recall": float(
            skm.recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "auroc": float("nan"),
    }
    if y_score is not None and len(np.unique(y_true)) == k and k >= 2:
        scores = np.asarray(y_score, dtype=float)
        if k == 2:
            out["auroc"] = float(skm.roc_auc_score(y_true, scores[:, 1]))
        else:
            scores = scores / np.clip(scores.sum(axis=1, keepdims=True), 1e-12, None)
            out["auroc"] = float(
                skm.roc_auc_score(y_true, scores, multi_class="ovr", average="macro", labels=labels)
            )
    return out


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient of two binary masks of equal shape (1.0 when both are empty)."""
    p, t = _binary_pair(pred, target)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two binary masks (1.0 when both are empty)."""
    p, t = _binary_pair(pred, target)
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the boundaries of two binary masks.

    Args:
        pred, target: binary masks ``(H, W)`` (or any N-D shape).
        spacing: pixel size per axis, e.g. ``(dy, dx)`` in mm; pixels when None.

    Returns:
        The distance; 0.0 when both masks are empty, NaN when exactly one is empty.
    """
    p, t = _binary_pair(pred, target)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("nan")
    sampling = tuple(spacing) if spacing is not None else None
    bp, bt = _boundary(p), _boundary(t)
    # Distance of every pixel to the nearest boundary pixel of the other mask.
    dist_to_t = ndimage.distance_transform_edt(~bt, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~bp, sampling=sampling)
    return float(max(np.percentile(dist_to_t[bp], 95), np.percentile(dist_to_p[bt], 95)))


def segmentation_metrics_legacy(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Sequence[float] | None = None,
    n_classes: int = 1,
) -> dict[str, float]:
    """The earlier per-image definition: an empty prediction on an empty mask scores 1 and
    classes are averaged within the image (``n_classes <= 2`` merges all foreground).

    Kept for comparison with numbers recorded before (``dice_legacy`` in reports).
    """
    pred, target = np.asarray(pred), np.asarray(target)
    labels = [None] if n_classes <= 2 else list(range(1, n_classes))
    rows = []
    for lab in labels:
        p = pred > 0 if lab is None else pred == lab
        t = target > 0 if lab is None else target == lab
        rows.append((dice(p, t), iou(p, t), hd95(p, t, spacing)))
    d, j, h = (np.array(col, dtype=float) for col in zip(*rows))
    return {
        "dice": float(d.mean()),
        "iou": float(j.mean()),
        "hd95": float(np.nanmean(h)) if np.isfinite(h).any() else float("nan"),
    }


def class_scores(
    pred: np.ndarray,
    target: np.ndarray,
    n_classes: int = 1,
    spacing: Sequence[float] | None = None,
    with_hd95: bool = True,
) -> dict[str, np.ndarray]:
    """Per-class Dice / IoU / HD95 of one image, NaN where the class is absent from ``target``.

    Args:
        pred, target: label maps ``(H, W)``; binary (``n_classes <= 2``: any non-zero value is
            the foreground) or class indices ``0..n_classes-1`` (0 = background, not scored).
        n_classes: 1 (binary) or the number of classes including background.
        spacing: ``(dy, dx)`` for HD95 (mm); pixels when None.

    Returns:
        ``{"dice", "iou", "hd95"}`` each ``(C,)`` float, C = ``max(n_classes - 1, 1)``. HD95 is
        also NaN when the prediction lacks a class the ground truth has (MONAI's convention).
    """
    pred, target = np.asarray(pred), np.asarray(target)
    labels = [None] if n_classes <= 2 else list(range(1, n_classes))
    out = {k: np.full(len(labels), np.nan) for k in ("dice", "iou", "hd95")}
    for c, lab in enumerate(labels):
        p = pred > 0 if lab is None else pred == lab
        t = target > 0 if lab is None else target == lab
        if not t.any():
            continue  # class absent from the ground truth: ignored (MONAI ignore_empty)
        out["dice"][c], out["iou"][c] = dice(p, t), iou(p, t)
        if with_hd95:
            out["hd95"][c] = hd95(p, t, spacing)
    return out


def per_class_scores(
    rows: Sequence[Mapping[str, np.ndarray]], class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Aggregate :func:`class_scores` of many images: per class, then the mean over classes.

    Returns ``{"dice", "iou", "hd95"}`` (means over the classes that occur at all) plus
    ``"per_class": {name: {"dice", "iou", "hd95", "n"}}`` (``n`` = images holding the class);
    a class never present in the ground truth has NaN scores and does not enter the mean.
    """
    n_cls = len(rows[0]["dice"]) if rows else 0
    names = list(class_names or [])
    if len(names) != n_cls:
        names = ["foreground"] if n_cls == 1 else [f"class{c + 1}" for c in range(n_cls)]
    out: dict[str, Any] = {"per_class": {}}
    means: dict[str, list[float]] = {"dice": [], "iou": [], "hd95": []}
    for c, name in enumerate(names):
        entry: dict[str, float] = {}
        for key in means:
            vals = np.array([r[key][c] for r in rows], dtype=float)
            vals = vals[np.isfinite(vals)]
            entry[key] = float(vals.mean()) if vals.size else float("nan")
            if vals.size:
                means[key].append(entry[key])
        entry["n"] = int(sum(np.isfinite(r["dice"][c]) for r in rows))
        out["per_class"][name] = entry
    for key, vals in means.items():
        out[key] = float(np.mean(vals)) if vals else float("nan")
    return out


def segmentation_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Sequence[float] | None = None,
    n_classes: int = 1,
) -> dict[str, float]:
    """Dice, IoU and HD95 of one prediction: mean over the classes present in ``target``.

    Classes absent from the ground truth are ignored (MONAI ``ignore_empty``): NaN when no
    class is present. ``pred``/``target`` ``(H, W)`` label maps, ``n_classes`` as in
    :func:`class_scores`. ``dice_legacy`` adds the earlier definition
    (:func:`segmentation_metrics_legacy`).
    """
    rows = class_scores(pred, target, n_classes, spacing)
    out = {}
    for key, vals in rows.items():
        finite = vals[np.isfinite(vals)]
        out[key] = float(finite.mean()) if finite.size else float("nan")
    out["dice_legacy"] = segmentation_metrics_legacy(pred, target, spacing, n_classes)["dice"]
    return out


def percentiles(
    values: Iterable[float], name: str, qs: Sequence[int] = (10, 50, 90)
) -> dict[str, float]:
    """Tail statistics of per-image scores: ``{name}_p10``, ``{name}_median``, ``{name}_p90``.

    NaNs (images where the metric is undefined) are left out; NaN when no finite value is left.
    Linear interpolation between order statistics (``numpy.percentile``'s default).
    """
    arr = np.array([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    out = {}
    for q in qs:
        key = f"{name}_median" if q == 50 else f"{name}_p{q}"
        out[key] = float(np.percentile(arr, q)) if arr.size else float("nan")
    return out


def count_where(
    values: Iterable[float], *, below: float | None = None, above: float | None = None
) -> int:
    """Number of finite ``values`` strictly below ``below`` and/or strictly above ``above``
    (failure counts: Dice < 0.5, HC error > 10 mm); NaNs are not counted."""
    arr = np.array([v for v in values if v is not None], dtype=float)
    keep = np.isfinite(arr)
    if below is not None:
        keep &= arr < below
    if above is not None:
        keep &= arr > above
    return int(keep.sum())


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0.0 for a single value), NaNs ignored."""
    arr = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def aggregate_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean ± std over seeds for every numeric metric key: ``{key: {mean, std, n}}``."""
    keys = sorted({k for r in runs for k, v in r.items() if isinstance(v, (int, float))})
    out = {}
    for key in keys:
        vals = [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]
        m, s = mean_std(vals)
        out[key] = {"mean": m, "std": s, "n": len(vals)}
    return out


def _binary_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as boolean arrays of the same shape (ValueError otherwise)."""
    p, t = np.asarray(pred) > 0, np.asarray(target) > 0
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape} vs target {t.shape}")
    return p, t


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` that touch the background (4-connectivity), as a boolean array."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))
    return mask & ~eroded
