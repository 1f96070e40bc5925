"""Does post-processing fix the fetal-head HC tail? Ellipse-fit variants on a split's masks.

Segments the recipe's validation split of HC18 (``make_splits`` seed 0, as ``usfm-core
finetune``) with the shipped ``fetal-head`` model once (masks cached in ``--cache``), then
measures the head circumference of the largest predicted object with several fits and prints
mean / median / p90 |error|, bias and the counts above 7 and 10 mm::

    python tools/hc_fit_variants.py --data $HOME/usfm_runs/data/hc18 --split val

Variants: ``current`` (the product's least-squares fit, :func:`circumference_error_mm`), OpenCV's
``ams`` and ``direct`` fits, ``trim F`` (refit twice without the fraction F of contour points
farthest from the ellipse; ``trimout``: only points outside it) and ``open K`` (morphological
opening with a K-px disc before the fit). Used on the validation split only
(docs/models/fetal-head.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from usfm_core.evaluate.report import circumference_error_mm
from usfm_core.finetune.data import LabelledSet, make_splits, read_image
from usfm_core.finetune.infer import ramanujan_circumference, segment_frames
from usfm_core.finetune.models import load_finetuned


def largest(mask: np.ndarray) -> np.ndarray | None:
    """The largest connected foreground object of ``mask`` (H, W) as uint8, or None."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8))
    if n <= 1:
        return None
    return (lab == 1 + np.argmax(stats[1:, cv2.CC_STAT_AREA])).astype(np.uint8)


def contour(obj: np.ndarray) -> np.ndarray:
    """Outer contour points ``(P, 2)`` (x, y) float32 of a binary object."""
    cs, _ = cv2.findContours(obj, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return np.concatenate([c[:, 0, :] for c in cs]).astype(np.float32)


def radius_ratio(pts: np.ndarray, ellipse) -> np.ndarray:
    """Normalised radius ``(P,)`` of points in the frame of a cv2 ellipse (1 on the ellipse)."""
    (cx, cy), (w, h), ang = ellipse
    t = np.deg2rad(ang)
    x, y = pts[:, 0] - cx, pts[:, 1] - cy
    xr, yr = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    return np.sqrt((xr / (w / 2)) ** 2 + (yr / (h / 2)) ** 2)


def circumference(ellipse, px: float) -> float:
    """Ramanujan circumference (mm) of a cv2 ellipse in pixels of size ``px`` mm."""
    w, h = ellipse[1]
    return ramanujan_circumference(max(w, h) / 2 * px, min(w, h) / 2 * px)


def fit_variant(obj: np.ndarray, name: str, arg: float):
    """The cv2 ellipse of variant ``name`` (see the module docstring) for one object."""
    if name == "open":
        ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(arg), int(arg)))
        obj = largest(cv2.morphologyEx(obj, cv2.MORPH_OPEN, ker)) if obj.any() else obj
        obj = obj if obj is not None else np.zeros((1, 1), np.uint8)
    pts = contour(obj)
    if name == "ams":
        return cv2.fitEllipseAMS(pts)
    if name == "direct":
        return cv2.fitEllipseDirect(pts)
    ellipse = cv2.fitEllipse(pts)
    if name in ("trim", "trimout"):
        for _ in range(2):
            r = radius_ratio(pts, ellipse) - 1
            dev = np.abs(r) if name == "trim" else r
            ellipse = cv2.fitEllipse(pts[dev <= np.quantile(dev, 1 - arg)])
    return ellipse


VARIANTS = [("current", 0), ("ams", 0), ("direct", 0)]
VARIANTS += [(n, f) for f in (0.1, 0.2, 0.3) for n in ("trim", "trimout")]
VARIANTS += [("open", k) for k in (15, 31, 61)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="HC18 folder (manifest.csv)")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--model", default="fetal-head")
    ap.add_argument("--cache", type=Path, default=None, help="masks .npz (made if missing)")
    args = ap.parse_args()
    data = LabelledSet.from_folder(args.data, "segmentation")
    idx = make_splits(data.labels, data.groups, seed=0)[args.split]
    cache = args.cache or Path(f"hc_masks_{args.model}_{args.split}.npz")
    if cache.exists():
        preds = dict(np.load(cache))
    else:
        model, _ = load_finetuned(args.model)
        frames = (read_image(data.items[i]) for i in idx)
        masks = segment_frames(model, frames, batch_size=8)
        preds = {data.items[i].key: m.astype(np.uint8) for i, m in zip(idx, masks)}
        np.savez_compressed(cache, **preds)
    errors: dict[str, list[float]] = {f"{n} {a:g}" if a else n: [] for n, a in VARIANTS}
    for i in idx:
        item = data.items[i]
        px, ref, pred = item.pixel_size_mm, item.circumference_mm, preds[item.key]
        obj = largest(pred)
        for (name, arg), key in zip(VARIANTS, errors):
            if name == "current":
                errors[key].append(circumference_error_mm(pred, px, ref))
            else:
                hc = circumference(fit_variant(obj, name, arg), px) if obj is not None else 0.0
                errors[key].append(hc - ref)
    print(f"{args.model} on {args.split} ({len(idx)} images): |HC error| in mm")
    for key, err in errors.items():
        e = np.asarray(err)
        a = np.abs(e)
        print(
            f"{key:12s} mean {a.mean():.3f} median {np.median(a):.2f} p90 "
            f"{np.percentile(a, 90):.2f} bias {e.mean():+.2f} >10 mm {(a > 10).sum()} "
            f">7 mm {(a > 7).sum()}"
        )


if __name__ == "__main__":
    main()
