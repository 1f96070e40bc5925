"""Propagate a few painted frames through a cine: quick warm-started fine-tune, then segment
every frame, optionally smoothed over time (issue #17).

:func:`propagate` (or its generator form :func:`iter_propagate`, for GUI workers)

1. **warm-starts** from a copy of the given segmenter (the caller's model is never modified), or
   builds a fresh :class:`~usfm_core.finetune.models.Segmenter` on a backbone (a bare backbone,
   or a classifier's);
2. **fine-tunes** it for ``steps`` optimiser steps on the labelled frames only: each step draws
   ``batch_size`` labelled frames with replacement (one painted frame still fills a batch) and
   augments each independently with the fine-tuning code's own augmentation
   (:class:`~usfm_core.finetune.data.SupervisedDataset`: flip, small affine, intensity jitter)
   and loss (:func:`~usfm_core.finetune.train.segmentation_loss`, soft Dice + CE), AdamW with a
   cosine schedule as :func:`~usfm_core.finetune.train.finetune`. It is a small in-memory loop
   rather than a call to ``finetune`` because ``finetune`` always builds a new decoder (it
   cannot warm-start a whole segmenter), splits train/val/test and writes a run folder;
3. **segments every frame** with the preprocessing of
   :func:`~usfm_core.finetune.infer.segment_frames` (``smooth=0`` and ``track=False`` give
   exactly its masks) with two optional temporal filters for cines:

   * ``smooth=r``: the logits of frame ``t`` are averaged with those of frames ``t-r .. t+r``
     (a uniform window, truncated at the ends) at model resolution before the threshold;
   * ``track=True``: going forward in time, each class keeps only the connected components
     (8-connected) that overlap the previous frame's mask of that class; when none does, the
     largest is kept (a structure that moved fast is not lost); a frame after one without the
     class keeps all its components.

   With ``keep_labels`` (default) the painted frames are given back as painted, and their
   logits are replaced by the painted labels (``±LABEL_LOGIT``) before smoothing, so
   neighbouring frames are pulled towards what the user drew.

Cancellation: ``cancel`` (a callable or a ``threading.Event``) is checked before every step and
every batch of frames; the result then has ``cancelled=True``, the model as trained so far, and
masks for the frames segmented so far (the rest 0). Closing the generator of
:func:`iter_propagate` stops it at once.

:func:`mask_flicker` measures how much masks jump between consecutive frames.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from usfm_core.errors import ConfigError
from usfm_core.optim import adamw, lr_factor

#: Logit given to painted pixels (and minus it to the others) when labels anchor smoothing.
LABEL_LOGIT = 8.0
DEFAULT_STEPS = 30
#: Steps when a fresh decoder is trained on a bare backbone (``steps=None``): from
#: openus-small-fast with 2 painted frames, 30 steps gave Dice 0.25 on the other frames of a
#: simulated cine and 60 steps 0.60 (128 px; measured for the napari Annotate widget).
DEFAULT_STEPS_NEW_DECODER = 60
DEFAULT_LR = 2e-4  # warm start: the whole segmenter is already trained
DEFAULT_LR_NEW_DECODER = 1e-3  # a fresh decoder on a backbone learns from scratch
#: A fresh decoder's learning-rate warm-up (fraction of its steps) and the backbone's rate
#: relative to the decoder's (warm starts use no warm-up and one rate). Without the warm-up,
#: full-rate updates from a random decoder can wreck the pretrained backbone in the first
#: steps (BUSI retrain rounds at Dice 0.04-0.10, recovered to 0.21-0.44 by it); chosen on the
#: validation split by ``benchmarks/propagate_recipe.py`` (docs/benchmarks/active_learning.md),
#: where a 0.1 backbone scale cost HC18 0.012-0.018 Dice and so stays 1.
DEFAULT_WARMUP_NEW_DECODER = 0.1
DEFAULT_BACKBONE_LR_SCALE_NEW_DECODER = 1.0
#: Below this Dice on its own painted frames a fine-tuned model has not learnt them (it came
#: back nearly empty: BUSI first rounds at fit 0.000-0.150 against 0.27-0.92 for the others);
#: propagate then trains again from the same start for RETRY_STEPS_FACTOR × the steps and keeps
#: the better fit. Of three retries tried on the validation split (another seed, the backbone at
#: 0.1×, twice the steps; docs/benchmarks/active_learning.md) only twice the steps lifted both
#: collapsed rounds (fit 0.000 → 0.528 and 0.077 → 0.335; validation Dice 0.000 → 0.273 and
#: 0.016 → 0.041).
FIT_RETRY_DICE = 0.2
RETRY_STEPS_FACTOR = 2


@dataclass
class PropagationResult:
    """What :func:`propagate` produced.

    Attributes:
        model: the fine-tuned segmenter (eval mode, on the device it ran on).
        masks: ``(T, H, W)`` uint8 label maps (0 background, 1.. classes; binary models give
            0/1), the painted frames as painted when ``keep_labels``.
        labelled: sorted indices of the frames it was trained on.
        steps: optimiser steps run; ``losses`` the training loss of each.
        warm_start: where the starting weights came from (a model name / folder / module).
        cancelled: stopped by ``cancel``; ``n_segmented`` frames have masks then.
        seconds: ``{"train": s, "segment": s}`` wall time.
        fit_dice: Dice of the model on its painted frames that show a structure (mean per
            frame, :func:`frame_dice`); None without such frames or training.
        retried: the first fit was below :data:`FIT_RETRY_DICE` and training ran again for
            :data:`RETRY_STEPS_FACTOR` × the steps (``fit_dice`` and the model: the better
            attempt; ``steps`` and ``losses``: the kept attempt's).
    """

    model: nn.Module
    masks: np.ndarray
    labelled: list[int]
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    warm_start: str = ""
    smooth: int = 0
    track: bool = False
    cancelled: bool = False
    n_segmented: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    fit_dice: float | None = None
    retried: bool = False


# ---------------------------------------------------------------------------- models


def start_model(
    model_or_backbone: nn.Module | str | Path,
    *,
    n_classes: int | None = None,
    decoder: str = "unet",
    seed: int = 0,
    masks: Iterable[np.ndarray] | None = None,
    input_size: int | None = None,
) -> tuple[nn.Module, str, bool]:
    """The segmenter to fine-tune: ``(model, description, is_new_decoder)``.

    A segmenter (module or name/folder) is copied; a backbone, or a classifier's backbone, gets
    a fresh ``decoder`` with ``n_classes`` outputs (1 = one sigmoid) seeded by ``seed``.
    ``decoder="auto"`` picks it from the painted ``masks`` (``(H, W)`` each) at the input side
    (``input_size``, else the backbone's) with
    :func:`~usfm_core.finetune.models.choose_decoder`; the choice is noted in the description.
    """
    from usfm_core.finetune.models import Segmenter, choose_decoder
    from usfm_core.finetune.suggest import load_model_or_backbone, model_kind

    if isinstance(model_or_backbone, nn.Module):
        module, source = model_or_backbone, f"module {type(model_or_backbone).__name__}"
    else:
        module, _ = load_model_or_backbone(model_or_backbone)
        source = str(model_or_backbone)
    kind = model_kind(module)
    if kind == "segmentation":
        return copy.deepcopy(module), source, False
    backbone = module if kind == "backbone" else module.backbone
    # A named backbone carries its pretraining crop side (load_model_or_backbone); else 224.
    side = int(getattr(backbone, "input_size", 0) or getattr(module, "input_size", 0) or 224)
    note = ""
    if decoder == "auto":
        if masks is None:
            raise ConfigError("decoder 'auto' needs the painted masks to choose from")
        size = int(input_size or side)
        decoder, why = choose_decoder(masks, size)
        note = f" (decoder auto: median structure {why['median_width_px']} px at {size}²)"
    torch.manual_seed(seed)
    model = Segmenter(copy.deepcopy(backbone), int(n_classes or 1), decoder)
    k = model.n_classes
    model.classes = ["background", "foreground"] if k == 1 else [
        "background", *(f"class{c}" for c in range(1, k))
    ]  # fmt: skip
    model.input_size = side
    return model, f"new {decoder} decoder on the backbone of {source}{note}", True


def label_classes(labels: Mapping[int, np.ndarray]) -> int:
    """Segmenter outputs needed for ``labels``: 1 (one sigmoid) for binary masks (values
    ``{0, v}``), else ``max value + 1`` (softmax over background + classes)."""
    values: set[int] = set()
    for mask in labels.values():
        values |= set(np.unique(np.asarray(mask)).tolist())
    fg = sorted(v for v in values if v != 0)
    return 1 if len(fg) <= 1 else int(fg[-1]) + 1


def _class_mask(mask: np.ndarray, n_classes: int, index: int, shape: tuple[int, int]) -> np.ndarray:
    """A painted mask as class indices ``(H, W)`` uint8 for a model with ``n_classes`` outputs."""
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ConfigError(
            f"the mask of frame {index} has shape {mask.shape}, the frame {shape}",
            hint="paint the labels on a layer of the image's size",
        )
    if n_classes == 1:
        return (mask > 0).astype(np.uint8)
    if mask.min() < 0 or mask.max() >= n_classes:
        raise ConfigError(
            f"the mask of frame {index} holds values {np.unique(mask)[:8].tolist()}, but the "
            f"model has classes 0..{n_classes - 1}",
            hint="paint with the model's class values, or start from a backbone",
        )
    return mask.astype(np.uint8)


# ---------------------------------------------------------------------------- frames


def frame_sequence(frames: Any) -> Sequence[np.ndarray]:
    """Random-access frames: a ``(T, H, W[, 3])`` array, a :class:`~usfm_core.io.Scan` (its
    lazy frames) or any sequence of frames (a single ``(H, W)`` frame is a one-frame cine)."""
    if hasattr(frames, "iter_frames"):
        return frames.frames
    if isinstance(frames, np.ndarray) and frames.ndim == 2:
        return frames[None]
    if not hasattr(frames, "__len__") or not hasattr(frames, "__getitem__"):
        raise ConfigError(
            f"propagate needs frames it can index, got {type(frames).__name__}",
            hint="pass a (T, H, W) array, a Scan or a list of frames",
        )
    return frames


def _gray(frame: np.ndarray) -> np.ndarray:
    from usfm_core.finetune.infer import _to_gray_u8

    return _to_gray_u8(frame)


# ---------------------------------------------------------------------------- training


def _training_set(
    frames: Sequence[np.ndarray], masks: dict[int, np.ndarray], n_classes: int, size: int, seed: int
):
    """:class:`~usfm_core.finetune.data.SupervisedDataset` over the painted frames (class-index
    masks of a model with ``n_classes`` outputs), augmented."""
    from usfm_core.finetune.data import LabelledSet, SupervisedDataset

    idx = sorted(masks)
    data = LabelledSet.from_arrays([_gray(frames[i]) for i in idx], masks=[masks[i] for i in idx])
    data.set_mask_classes(range(max(2, n_classes)))  # masks hold class indices already
    return SupervisedDataset(data, range(len(idx)), "segmentation", size, augment=True, seed=seed)


def _iter_train(
    model: nn.Module,
    dataset: Any,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    device: str,
    cancel: Any,
    losses: list[float],
    warmup: float = 0.0,
    backbone_lr_scale: float = 1.0,
) -> Iterator[dict[str, Any]]:
    """``steps`` AdamW steps with a cosine schedule on batches drawn with replacement; yields a
    progress dict after each step. Stops early (returning) when ``cancel`` is set.

    ``warmup``: the first ``warmup·steps`` steps (rounded) ramp the rate linearly up to ``lr``;
    ``backbone_lr_scale``: the backbone's rate as a fraction of ``lr``
    (:func:`~usfm_core.finetune.train.parameter_groups`)."""
    from usfm_core.finetune.models import trains_backbone_frozen
    from usfm_core.finetune.train import _is_cancelled, parameter_groups, segmentation_loss

    model.to(device).train()
    if trains_backbone_frozen(model):  # unet-hrc: only the decoder learns (models.py)
        model.backbone.eval()
        model.set_backbone_trainable(False)
    opt = adamw(parameter_groups(model, lr, backbone_lr_scale), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        if _is_cancelled(cancel):
            return
        pairs = [dataset[int(j)] for j in rng.integers(0, len(dataset), batch_size)]
        x = torch.stack([p[0] for p in pairs]).to(device)
        y = torch.stack([p[1] for p in pairs]).to(device)
        loss = segmentation_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.item()))
        yield {"stage": "train", "step": step, "steps": steps, "loss": losses[-1]}


# ---------------------------------------------------------------------------- segmentation


def _iter_logits(
    model: nn.Module,
    frames: Sequence[np.ndarray],
    size: int,
    batch_size: int,
    device: str,
) -> Iterator[tuple[int, tuple[int, int], torch.Tensor]]:
    """``(index, frame (H, W), logits (K, S, S) float32 on CPU)`` for every frame, in order,
    computed ``batch_size`` frames at a time (the input pipeline of ``segment_frames``)."""
    from usfm_core.finetune.suggest import prepare_batch

    model.to(device).eval()
    for start in range(0, len(frames), batch_size):
        gray = [_gray(frames[i]) for i in range(start, min(start + batch_size, len(frames)))]
        with torch.no_grad():
            logits = model(prepare_batch(gray, size).to(device)).float().cpu()
        for j, (g, lg) in enumerate(zip(gray, logits)):
            yield start + j, g.shape, lg


def _label_logits(mask: np.ndarray, n_classes: int, size: int) -> torch.Tensor:
    """A painted class mask ``(H, W)`` as confident logits ``(K, S, S)``."""
    import cv2

    small = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    t = torch.from_numpy(small.astype(np.int64))
    if n_classes == 1:
        return ((t > 0).float() * 2 - 1)[None] * LABEL_LOGIT
    onehot = torch.nn.functional.one_hot(t, n_classes).permute(2, 0, 1).float()
    return (onehot * 2 - 1) * LABEL_LOGIT


def _to_mask(logits: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Logits ``(K, S, S)`` → label map ``(H, W)`` uint8, resized as ``segment_frames`` does."""
    up = torch.nn.functional.interpolate(
        logits[None], size=shape, mode="bilinear", align_corners=False
    )[0]
    lab = (up[0] > 0) if up.shape[0] == 1 else up.argmax(0)
    return lab.numpy().astype(np.uint8)


def keep_overlapping(mask: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """``mask (H, W)`` with, per class, only the components overlapping ``previous``'s mask of
    that class (the largest when none overlaps; all when ``previous`` lacks the class)."""
    import cv2

    out = mask.copy()
    for value in np.unique(mask[mask > 0]):
        prev = previous == value
        if not prev.any():
            continue
        n, comp, stats, _ = cv2.connectedComponentsWithStats(
            (mask == value).astype(np.uint8), connectivity=8
        )
        if n <= 2:
            continue  # one component: nothing to choose
        hits = set(np.unique(comp[prev]).tolist()) - {0}
        if not hits:
            hits = {1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))}
        drop = (comp > 0) & ~np.isin(comp, list(hits))
        out[drop] = 0
    return out


def _iter_segment(
    model: nn.Module,
    frames: Sequence[np.ndarray],
    masks_out: np.ndarray,
    anchors: dict[int, np.ndarray],
    *,
    size: int,
    smooth: int,
    track: bool,
    batch_size: int,
    device: str,
    cancel: Any,
    done: list[int],
) -> Iterator[dict[str, Any]]:
    """Fill ``masks_out (T, H, W)`` frame by frame (smoothing / tracking as in the module doc);
    yields a progress dict after every model batch; ``done[0]`` counts finished frames."""
    from usfm_core.finetune.train import _is_cancelled

    k = int(getattr(model, "n_classes", 1))
    total = len(frames)
    window: deque[tuple[int, tuple[int, int], torch.Tensor]] = deque()
    previous: np.ndarray | None = None

    def emit(t: int, shape: tuple[int, int]) -> None:
        nonlocal previous
        if shape != masks_out.shape[1:]:
            raise ConfigError(
                f"frame {t} has shape {shape}, frame 0 {masks_out.shape[1:]}",
                hint="propagate works on a cine or a stack of frames of one size",
            )
        if t in anchors:
            mask = anchors[t]
        else:
            near = [lg for i, _, lg in window if abs(i - t) <= smooth]
            mask = _to_mask(torch.stack(near).mean(0) if len(near) > 1 else near[0], shape)
            if track and previous is not None:
                mask = keep_overlapping(mask, previous)
        masks_out[t] = mask
        previous = mask
        done[0] = t + 1

    next_out = 0
    for i, shape, logits in _iter_logits(model, frames, size, batch_size, device):
        if i in anchors:
            logits = _label_logits(anchors[i], k, size)
        window.append((i, shape, logits))
        while next_out <= i - smooth:  # frame next_out has all its right neighbours
            emit(next_out, window[next_out - window[0][0]][1])
            next_out += 1
            while window and window[0][0] < next_out - smooth:
                window.popleft()
        if (i + 1) % batch_size == 0 or i + 1 == total:
            if _is_cancelled(cancel):
                return
            yield {"stage": "segment", "done": done[0], "total": total}
    while next_out < total:
        emit(next_out, window[next_out - window[0][0]][1])
        next_out += 1
        while window and window[0][0] < next_out - smooth:
            window.popleft()
    yield {"stage": "segment", "done": total, "total": total}


# ---------------------------------------------------------------------------- public API


def iter_propagate(
    model_or_backbone: nn.Module | str | Path,
    frames: Any,
    labels: Mapping[int, np.ndarray],
    *,
    steps: int | None = None,
    lr: float | None = None,
    warmup: float | None = None,
    backbone_lr_scale: float | None = None,
    retry_unfit: bool = True,
    weight_decay: float = 5e-2,
    batch_size: int = 4,
    input_size: int | None = None,
    smooth: int = 0,
    track: bool = False,
    keep_labels: bool = True,
    n_classes: int | None = None,
    decoder: str = "unet",
    seed: int = 0,
    device: str = "cpu",
    cancel: Callable[[], bool] | Any | None = None,
) -> Generator[dict[str, Any], None, PropagationResult]:
    """Generator form of :func:`propagate` (same arguments): yields progress dicts
    (``{"stage": "train", "step", "steps", "loss"}`` after each optimiser step, then
    ``{"stage": "segment", "done", "total"}`` after each batch of frames) and returns the
    :class:`PropagationResult` (``StopIteration.value``; a napari worker's ``returned``)."""
    from usfm_core.finetune.suggest import model_input_size
    from usfm_core.utils import resolve_device

    if steps is not None and steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    if smooth < 0:
        raise ConfigError(f"smooth must be >= 0 frames, got {smooth}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if not labels:
        raise ConfigError(
            "no labelled frames to propagate from", hint="paint at least one frame first"
        )
    device = resolve_device(device)
    seq = frame_sequence(frames)
    n = len(seq)
    bad = sorted(i for i in labels if not 0 <= int(i) < n)
    if bad:
        raise ConfigError(f"labelled frame(s) {bad[:5]} outside 0..{n - 1}")
    shape = _gray(seq[0]).shape
    n_out = n_classes or label_classes(labels)

    def begin() -> tuple[nn.Module, str, bool]:
        """The start model: the caller's copied, or a fresh decoder (seeded; ``auto`` picks
        it from the painted structures at the input side). Called again for a retry."""
        return start_model(
            model_or_backbone,
            n_classes=n_out,
            decoder=decoder,
            seed=seed,
            masks=labels.values(),
            input_size=input_size,
        )

    model, source, new_decoder = begin()
    size = model_input_size(model, input_size)
    if steps is None:
        steps = DEFAULT_STEPS_NEW_DECODER if new_decoder else DEFAULT_STEPS
    k = int(model.n_classes)
    model.input_size = size
    masks = {int(i): _class_mask(m, k, int(i), shape) for i, m in labels.items()}
    lr = lr if lr is not None else DEFAULT_LR_NEW_DECODER if new_decoder else DEFAULT_LR
    if warmup is None:
        warmup = DEFAULT_WARMUP_NEW_DECODER if new_decoder else 0.0
    if backbone_lr_scale is None:
        backbone_lr_scale = DEFAULT_BACKBONE_LR_SCALE_NEW_DECODER if new_decoder else 1.0
    if not 0 <= warmup <= 1:
        raise ConfigError(f"warmup must be a fraction of the steps in [0, 1], got {warmup}")
    if not 0 < backbone_lr_scale <= 10:
        raise ConfigError(f"backbone_lr_scale must be in (0, 10], got {backbone_lr_scale}")
    from usfm_core.finetune.train import _is_cancelled

    def train(net: nn.Module, n_steps: int, losses: list[float]) -> Iterator[dict[str, Any]]:
        torch.manual_seed(seed)  # the same data order and augmentation for every attempt
        yield from _iter_train(
            net,
            _training_set(seq, masks, k, size, seed),
            steps=n_steps,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            seed=seed,
            device=device,
            cancel=cancel,
            losses=losses,
            warmup=warmup,
            backbone_lr_scale=backbone_lr_scale,
        )

    losses: list[float] = []
    t0 = time.perf_counter()
    yield from train(model, steps, losses)
    fit, retried = None, False
    if steps > 0 and not _is_cancelled(cancel):
        fit = fit_dice(model, seq, masks, size=size, batch_size=batch_size, device=device)
    if retry_unfit and fit is not None and fit < FIT_RETRY_DICE:
        # The model did not learn the frames it was trained on: train again from the same
        # start for longer, keep whichever attempt fits the painted frames better.
        again = begin()[0]
        again.input_size = size
        more: list[float] = []
        for info in train(again, RETRY_STEPS_FACTOR * steps, more):
            yield {**info, "stage": "retry", "fit_dice": fit}
        if not _is_cancelled(cancel):
            retried = True
            fit2 = fit_dice(again, seq, masks, size=size, batch_size=batch_size, device=device)
            if fit2 is not None and fit2 > fit:
                model, losses, fit = again, more, fit2
    t1 = time.perf_counter()
    out = np.zeros((n, *shape), np.uint8)
    done = [0]
    cancelled = _is_cancelled(cancel)
    if not cancelled:
        yield from _iter_segment(
            model,
            seq,
            out,
            masks if keep_labels else {},
            size=size,
            smooth=smooth,
            track=track,
            batch_size=batch_size,
            device=device,
            cancel=cancel,
            done=done,
        )
        cancelled = done[0] < n
    model.eval()
    return PropagationResult(
        model=model,
        masks=out,
        labelled=sorted(masks),
        steps=len(losses),
        losses=losses,
        warm_start=source,
        smooth=smooth,
        track=track,
        cancelled=cancelled,
        n_segmented=done[0],
        seconds={"train": t1 - t0, "segment": time.perf_counter() - t1},
        fit_dice=fit,
        retried=retried,
    )


def propagate(
    model_or_backbone: nn.Module | str | Path,
    frames: Any,
    labels: Mapping[int, np.ndarray],
    *,
    steps: int | None = None,
    lr: float | None = None,
    warmup: float | None = None,
    backbone_lr_scale: float | None = None,
    retry_unfit: bool = True,
    weight_decay: float = 5e-2,
    batch_size: int = 4,
    input_size: int | None = None,
    smooth: int = 0,
    track: bool = False,
    keep_labels: bool = True,
    n_classes: int | None = None,
    decoder: str = "unet",
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[dict[str, Any]], None] | None = None,
    cancel: Callable[[], bool] | Any | None = None,
    threads: int | None = None,
) -> PropagationResult:
    """Fine-tune quickly on the painted frames, then segment every frame (module doc).

    Args:
        model_or_backbone: the model to warm-start from (a segmenter module, or a name /
            folder: shipped ``sim-lesion``, a round folder, ...), or a backbone (module, name
            or folder) that gets a fresh decoder.
        frames: ``(T, H, W[, 3])`` array, a :class:`~usfm_core.io.Scan`, or a list of frames
            (all of one size).
        labels: frame index → painted mask ``(H, W)`` (0 = background; class values for a
            multi-class model; binary models take any non-zero value as foreground).
        steps: optimiser steps (0: no fine-tuning, just segment with the start model; default
            ``DEFAULT_STEPS`` (30) for a warm start, ``DEFAULT_STEPS_NEW_DECODER`` (60) for a
            fresh decoder).
        lr: default ``DEFAULT_LR`` (2e-4) for a warm start, ``DEFAULT_LR_NEW_DECODER`` (1e-3)
            for a fresh decoder.
        warmup: fraction of the steps over which the rate ramps up linearly (default
            ``DEFAULT_WARMUP_NEW_DECODER`` for a fresh decoder, 0 for a warm start).
        backbone_lr_scale: the backbone's rate as a fraction of ``lr`` (default
            ``DEFAULT_BACKBONE_LR_SCALE_NEW_DECODER`` for a fresh decoder, 1 for a warm start).
        retry_unfit: when the trained model's Dice on its own painted frames is below
            ``FIT_RETRY_DICE``, train again from the same start for ``RETRY_STEPS_FACTOR`` ×
            the steps and keep the better fit (``PropagationResult.fit_dice`` / ``retried``).
        batch_size: frames per step (drawn with replacement) and per inference batch.
        input_size: model input side (default: the model's; for a fresh decoder on a bare
            backbone its pretraining crop side when recorded, e.g. 128 for
            ``openus-small-fast``, else 224).
        smooth: temporal window half-width in frames (0 = off).
        track: keep the components overlapping the previous frame's mask.
        keep_labels: give painted frames back as painted and anchor smoothing on them.
        n_classes: outputs of a fresh decoder (default: 1 for binary labels, else max + 1).
        decoder: a fresh decoder's kind (``unet``, ``unet-hr``, ...), or ``auto``: ``unet-hrc``
            when the painted structures' median width at the input side is under 16 px
            (:func:`~usfm_core.finetune.models.choose_decoder`); noted in ``warm_start``. A
            ``unet-hrc`` model trains its decoder only (the backbone stays fixed).
        progress: called with every progress dict of :func:`iter_propagate`.
        cancel: callable returning True, or a ``threading.Event``, to stop early.
        threads: torch CPU threads for this call (restored afterwards).
    """
    from usfm_core.progress import drain
    from usfm_core.threads import torch_threads

    gen = iter_propagate(
        model_or_backbone,
        frames,
        labels,
        steps=steps,
        lr=lr,
        warmup=warmup,
        backbone_lr_scale=backbone_lr_scale,
        retry_unfit=retry_unfit,
        weight_decay=weight_decay,
        batch_size=batch_size,
        input_size=input_size,
        smooth=smooth,
        track=track,
        keep_labels=keep_labels,
        n_classes=n_classes,
        decoder=decoder,
        seed=seed,
        device=device,
        cancel=cancel,
    )
    with torch_threads(threads):
        return drain(gen, progress)


# ---------------------------------------------------------------------------- measures


def fit_dice(
    model: nn.Module,
    frames: Sequence[np.ndarray],
    masks: Mapping[int, np.ndarray],
    *,
    size: int,
    batch_size: int = 4,
    device: str = "cpu",
) -> float | None:
    """Mean :func:`frame_dice` of ``model``'s label maps against the painted class masks
    ``masks`` (frame index → ``(H, W)``) over the painted frames that show a structure (the
    frames are segmented at input side ``size``, as Propagate segments them); None when no
    painted frame has one. How well the model learnt what it was trained on."""
    idx = sorted(i for i, m in masks.items() if np.any(np.asarray(m) > 0))
    if not idx:
        return None
    picked = [frames[i] for i in idx]
    values = [
        frame_dice(_to_mask(logits, shape), masks[idx[j]])
        for j, shape, logits in _iter_logits(model, picked, size, batch_size, device)
    ]
    return float(np.mean(values))


def mask_flicker(masks: np.ndarray | Sequence[np.ndarray]) -> float:
    """Mean ``1 − IoU`` of the foreground (any non-zero label) of consecutive frames
    ``(T, H, W)``; 0 for a constant mask (two empty frames count as identical). Larger means
    more frame-to-frame jumping."""
    values = []
    for a, b in itertools.pairwise(masks):
        pa, pb = np.asarray(a) > 0, np.asarray(b) > 0
        union = np.logical_or(pa, pb).sum()
        values.append(0.0 if union == 0 else 1.0 - np.logical_and(pa, pb).sum() / union)
    return float(np.mean(values)) if values else 0.0


def frame_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of one frame's label maps ``(H, W)``: the mean over the classes present in either
    (any non-zero value for binary maps); 1.0 when both are empty."""
    from usfm_core.evaluate.metrics import dice

    pred, target = np.asarray(pred), np.asarray(target)
    values = (set(np.unique(pred).tolist()) | set(np.unique(target).tolist())) - {0}
    if not values:
        return 1.0
    if values <= {1, 255}:  # binary (0/1 or 0/255)
        return dice(pred > 0, target > 0)
    return float(np.mean([dice(pred == c, target == c) for c in sorted(values)]))
