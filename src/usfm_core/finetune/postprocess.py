"""Post-processing of a segmenter's output, saved with the model and chosen on validation.

A segmenter trained with Dice + BCE returns *some* foreground on nearly every frame: the shipped
``breast-lesion`` model marked a lesion on each of the 20 normal (lesion-free) BUSI test images.
Three optional steps, applied per frame to the logits already resized to the frame
(:func:`usfm_core.finetune.infer.segment_frames`), fix the common failure modes:

* ``min_confidence`` (a **presence gate**): the frame's mask is emptied when the *mean*
  probability of the predicted labels over its foreground pixels is below this value (sigmoid
  for one output, softmax otherwise; the mask itself is ``p > 0.5`` / argmax as before, so
  ``0`` or any value ≤ 0.5 switches the gate off). The mean separated BUSI's lesion images from
  its normal ones better than the peak probability or the mask's area (validation AUC 0.90 vs
  0.87 / 0.72 for the shipped ``breast-lesion``); it is applied first, to the raw mask;
* ``keep_largest``: only the largest 8-connected object of each class is kept;
* ``fill_holes``: holes inside each class's objects are filled.

They are stored in a saved model's ``config.json`` as ``extra.postprocess`` (a dict of the
three fields) and read back by :func:`usfm_core.finetune.models.load_finetuned`;
``segment_frames(..., postprocess=PostProcess())`` switches them off for one call.

:func:`choose_postprocess` picks them on a validation split from cached logits: every
candidate of a small grid fixed beforehand (:func:`candidate_grid`) is scored by the mean
per-image Dice over **all** items, where an empty prediction on an empty ground truth counts
1 and any foreground there 0 (so false lesions on normal images and lost lesions both cost);
the best wins, ties going to the earlier (simpler) candidate of the grid. By default a
candidate is eligible only if it loses no structure the raw mask found on validation
(``max_lost=0``; *lost*: an image whose raw mask overlaps its ground truth and which the
candidate empties): a missed lesion costs a patient more than a false mark, so the gate may
only remove marks that validation shows to be false or misplaced.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from usfm_core.errors import ConfigError

#: Presence-gate thresholds (mean foreground probability) tried by :func:`choose_postprocess`
#: (0: off).
GATE_GRID: tuple[float, ...] = (0.0, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


@dataclass(frozen=True)
class PostProcess:
    """What :func:`apply_postprocess` does to a frame's mask (module doc). The default does
    nothing."""

    min_confidence: float = 0.0
    keep_largest: bool = False
    fill_holes: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.min_confidence) < 1.0:
            raise ConfigError(
                f"postprocess min_confidence must be in [0, 1), got {self.min_confidence!r}"
            )

    @property
    def is_identity(self) -> bool:
        """True when it changes nothing."""
        return self.min_confidence <= 0.5 and not self.keep_largest and not self.fill_holes

    def to_dict(self) -> dict[str, Any]:
        """The JSON form saved as ``extra.postprocess``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> PostProcess:
        """From a saved ``extra.postprocess`` (None or missing: the identity). Unknown keys and
        wrong types are refused with the field named."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError(f"extra.postprocess must be a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - {"min_confidence", "keep_largest", "fill_holes"})
        if unknown:
            raise ConfigError(f"extra.postprocess has unknown key(s) {unknown}")
        conf = data.get("min_confidence", 0.0)
        if isinstance(conf, bool) or not isinstance(conf, (int, float)):
            raise ConfigError(f"extra.postprocess.min_confidence must be a number, got {conf!r}")
        flags = {k: data.get(k, False) for k in ("keep_largest", "fill_holes")}
        for k, v in flags.items():
            if not isinstance(v, bool):
                raise ConfigError(f"extra.postprocess.{k} must be true or false, got {v!r}")
        return cls(min_confidence=float(conf), **flags)

    def describe(self) -> str:
        """One line for logs and cards, e.g. ``presence gate 0.9, largest object``."""
        parts = []
        if self.min_confidence > 0.5:
            parts.append(f"presence gate {self.min_confidence:g}")
        if self.keep_largest:
            parts.append("largest object")
        if self.fill_holes:
            parts.append("holes filled")
        return ", ".join(parts) or "none"


def labels_from_logits(logits: torch.Tensor, post: PostProcess | None = None) -> np.ndarray:
    """Label map ``(H, W)`` uint8 (0 = background) from one frame's logits ``(K, H, W)``
    (``K = 1``: one sigmoid, foreground where the logit > 0; else argmax), post-processed."""
    post = post or PostProcess()
    if post.is_identity:  # every frame of a model without post-processing: no probabilities
        return _threshold(logits)
    labels, prob = raw_labels(logits)
    return apply_postprocess(labels, prob, post)


def _threshold(logits: torch.Tensor) -> np.ndarray:
    """The label map ``(H, W)`` uint8 of logits ``(K, H, W)``: logit > 0 for one sigmoid,
    else argmax."""
    lab = logits[0] > 0 if logits.shape[0] == 1 else logits.argmax(0)
    return lab.numpy().astype(np.uint8)


def raw_labels(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, prob)``, both ``(H, W)``, from logits ``(K, H, W)``: the thresholded / argmax
    label map (uint8) and each pixel's probability of its label (for one sigmoid: of the
    foreground)."""
    if logits.shape[0] == 1:
        prob = torch.sigmoid(logits[0])
    else:
        prob = torch.softmax(logits, 0).max(0).values
    return _threshold(logits), prob.numpy()


def apply_postprocess(labels: np.ndarray, prob: np.ndarray, post: PostProcess) -> np.ndarray:
    """``labels (H, W)`` uint8 after ``post``; ``prob (H, W)`` is each pixel's probability of
    its own label (the foreground probability for one sigmoid)."""
    if post.is_identity or not labels.any():
        return labels
    import cv2
    from scipy import ndimage

    if post.min_confidence > 0.5 and float(prob[labels > 0].mean()) < post.min_confidence:
        return np.zeros_like(labels)
    out = labels.copy()
    for c in np.unique(labels[labels > 0]):
        mask = labels == c
        if post.keep_largest:
            n, comp, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
            if n > 2:
                keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
                out[mask & (comp != keep)] = 0
                mask = comp == keep
        if post.fill_holes:
            filled = ndimage.binary_fill_holes(mask)
            out[filled & (out == 0)] = c
    return out


def candidate_grid() -> list[PostProcess]:
    """The candidates :func:`choose_postprocess` scores, simplest first: the presence gates of
    :data:`GATE_GRID` × (nothing, largest object, largest object + holes filled)."""
    shapes = ((False, False), (True, False), (True, True))
    return [
        PostProcess(min_confidence=g, keep_largest=k, fill_holes=f)
        for (k, f) in shapes
        for g in GATE_GRID
    ]


def image_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Foreground Dice of one image, classes merged; 1 when both are empty, 0 for any
    foreground on an empty ground truth."""
    from usfm_core.evaluate.metrics import dice

    return dice(pred > 0, target > 0)


def choose_postprocess(
    logits: Sequence[torch.Tensor],
    targets: Sequence[np.ndarray],
    grid: Iterable[PostProcess] | None = None,
    max_lost: int | None = 0,
) -> tuple[PostProcess, list[dict[str, Any]]]:
    """The candidate with the best mean :func:`image_dice` over validation items.

    Args:
        logits: per item ``(K, H, W)`` float logits at the ground truth's size.
        targets: per item ``(H, W)`` integer ground truth (0 = background).
        grid: candidates in order of preference on ties (default :func:`candidate_grid`).
        max_lost: most images a candidate may *lose* (module doc; None: no limit).

    Returns:
        ``(best, table)``: one row per candidate with its settings, ``score`` (the mean),
        ``dice_fg`` (mean over items with foreground), ``fp_on_empty`` and ``emptied``
        (images with a structure left empty), ``lost`` counts and ``eligible``.
    """
    if len(logits) != len(targets) or not len(logits):
        raise ConfigError(f"need as many logits as targets (> 0): {len(logits)} / {len(targets)}")
    cands = list(grid or candidate_grid())
    # Probabilities and raw label maps once; candidates only re-run the cheap post-processing.
    raw = [raw_labels(lg) for lg in logits]
    has_fg = [bool((t > 0).any()) for t in targets]
    # Images whose raw mask overlaps the ground truth: emptying one loses a found structure.
    found = [bool(((lab0 > 0) & (t > 0)).any()) for (lab0, _), t in zip(raw, targets)]
    table: list[dict[str, Any]] = []
    for cand in cands:
        d, fp, emptied, lost = [], 0, 0, 0
        for (lab0, prob), t, fg, hit in zip(raw, targets, has_fg, found):
            pred = apply_postprocess(lab0, prob, cand)
            d.append(image_dice(pred, t))
            empty = not (pred > 0).any()
            fp += int(not fg and not empty)
            emptied += int(fg and empty)
            lost += int(hit and empty)
        fg_d = [x for x, f in zip(d, has_fg) if f]
        table.append(
            {
                **cand.to_dict(),
                "score": float(np.mean(d)),
                "dice_fg": float(np.mean(fg_d)) if fg_d else float("nan"),
                "fp_on_empty": fp,
                "emptied": emptied,
                "lost": lost,
                "eligible": max_lost is None or lost <= max_lost,
            }
        )
    ok = [i for i, row in enumerate(table) if row["eligible"]] or [0]
    best = max(ok, key=lambda i: (table[i]["score"], -i))
    return cands[best], table
