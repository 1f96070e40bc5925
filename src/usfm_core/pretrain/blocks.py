"""JEPA block masks with ultrasound region conditioning (US-JEPA §4.2, Tab. 5).

On a ``(h, w)`` patch grid, one batch gets:

* ``T`` target blocks per image. The block size ``(bh, bw)`` is drawn once per batch (as in
  I-JEPA) from a scale range (fraction of the grid) and an aspect range (``bh / bw``); only the
  position differs between images and blocks. ``M_i = B_i ∩ P_valid``.
* one context block per image (its own scale / aspect ranges); ``M_c = B_c ∩ P_valid`` minus
  every target patch.

USrc (Eq. 3–4): a patch is *valid* when it holds at least one scan-region pixel. A block is
accepted only when it keeps at least ``τ = min_keep`` valid patches. Rejection sampling with
unlimited tries is the uniform choice among the placements that satisfy the rule, so we count
the valid patches of every placement (summed-area table) and draw uniformly among the accepted
ones. Corner cases, so a batch never fails:

* τ is capped at the block's own patch count (a block cannot keep more than it holds);
* when no placement reaches τ, the placements with the most valid patches are used;
* an image whose valid patches do not exceed one target block (empty or tiny region) is
  treated as all-valid: USrc cannot be applied to it;
* a target placement must leave at least one valid patch uncovered, so every context keeps
  at least one valid, non-target patch (and every target at least one valid patch).

Tensors of one batch must share lengths, so the context and the targets are cut to the
smallest count in the batch by a random subset (I-JEPA truncates likewise); every kept index is
still a valid patch of its block, so the loss only ever covers valid patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class JEPAMasks:
    """Block masks of one batch on a ``(h, w)`` grid (row-major patch indices).

    ``context_idx (B, K)`` and ``target_idx (B, T, N)``: kept indices (sorted per row);
    ``context (B, h, w)``, ``targets (B, T, h, w)``: the full masks before cutting to K / N;
    ``context_boxes (B, 4)``, ``target_boxes (B, T, 4)``: ``(top, left, height, width)``;
    ``valid (B, h, w)``: the valid patches used (after the all-valid fallback).
    """

    context_idx: torch.Tensor
    target_idx: torch.Tensor
    context: torch.Tensor
    targets: torch.Tensor
    context_boxes: torch.Tensor
    target_boxes: torch.Tensor
    valid: torch.Tensor


def valid_patches(region: torch.Tensor, patch: int) -> torch.Tensor:
    """Scan-region mask ``(B, H, W)`` bool → valid patches ``(B, H/patch, W/patch)`` bool.

    A patch is valid when at least one of its pixels lies in the region (US-JEPA §4.2).
    """
    if region.dim() != 3:
        raise ValueError(f"region must be (B, H, W), got shape {tuple(region.shape)}")
    h, w = region.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"region {h}×{w} is not divisible by the patch size {patch}")
    pooled = F.max_pool2d(region[:, None].float(), kernel_size=patch, stride=patch)
    return pooled[:, 0] > 0


def sample_block_size(
    grid: tuple[int, int],
    scale: tuple[float, float],
    aspect: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int]:
    """Block ``(bh, bw)`` with area ≈ ``s·h·w`` and ``bh / bw ≈ a`` (s, a uniform in the ranges;
    ``a`` log-uniform), rounded and clipped to ``[1, h] × [1, w]``."""
    h, w = grid
    u = torch.rand(2, generator=generator).tolist()
    s = scale[0] + u[0] * (scale[1] - scale[0])
    log_a = math.log(aspect[0]) + u[1] * (math.log(aspect[1]) - math.log(aspect[0]))
    area = s * h * w
    bh = round(math.sqrt(area * math.exp(log_a)))
    bw = round(math.sqrt(area / math.exp(log_a)))
    return min(max(bh, 1), h), min(max(bw, 1), w)


def box_counts(mask: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """Number of True cells of ``mask (h, w)`` inside every ``bh × bw`` placement →
    ``(h - bh + 1, w - bw + 1)`` int64, indexed by the top-left corner."""
    table = F.pad(mask.long().cumsum(0).cumsum(1), (1, 0, 1, 0))
    return table[bh:, bw:] - table[:-bh, bw:] - table[bh:, :-bw] + table[:-bh, :-bw]


def _choose(ok: torch.Tensor, generator: torch.Generator) -> tuple[int, int]:
    """A uniformly drawn True cell ``(top, left)`` of the placement map ``ok``."""
    flat = torch.nonzero(ok.flatten()).flatten()
    pick = int(flat[torch.randint(len(flat), (1,), generator=generator)])
    return divmod(pick, ok.shape[1])


def _box(shape: tuple[int, int], top: int, left: int, bh: int, bw: int) -> torch.Tensor:
    box = torch.zeros(shape, dtype=torch.bool)
    box[top : top + bh, left : left + bw] = True
    return box


def sample_image_blocks(
    valid: torch.Tensor,
    target_size: tuple[int, int],
    context_size: tuple[int, int],
    n_targets: int,
    min_keep: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks of one image (see the module docstring for the rules).

    valid ``(h, w)`` bool. Returns ``targets (T, h, w)``, ``context (h, w)`` bool masks, their
    boxes ``(T, 4)`` / ``(4,)`` as ``(top, left, height, width)`` and the valid map used.
    """
    shape = tuple(valid.shape)
    bh, bw = target_size
    if int(valid.sum()) <= bh * bw:
        valid = torch.ones(shape, dtype=torch.bool)  # no usable region: USrc off for this image
    n_valid = int(valid.sum())
    counts = box_counts(valid, bh, bw)
    tau = min(min_keep, bh * bw)
    covered = torch.zeros(shape, dtype=torch.bool)
    targets, target_boxes = [], []
    for _ in range(n_targets):
        uncovered = n_valid - int((valid & covered).sum())
        new = box_counts(valid & ~covered, bh, bw)
        leaves_one = new <= uncovered - 1  # keep a valid patch for the context
        ok = leaves_one & (counts >= tau)
        if not ok.any():
            ok = leaves_one & (counts == counts[leaves_one].max())
        top, left = _choose(ok, generator)
        target = _box(shape, top, left, bh, bw) & valid
        covered |= target
        targets.append(target)
        target_boxes.append((top, left, bh, bw))

    free = valid & ~covered
    ch, cw = context_size
    c_counts = box_counts(free, ch, cw)
    # ≥ 1: some placement covers any free patch, and the targets left one free.
    best = int(c_counts.max())
    top, left = _choose(c_counts >= min(min_keep, best), generator)
    context = _box(shape, top, left, ch, cw) & free
    return (
        torch.stack(targets),
        context,
        torch.tensor(target_boxes),
        torch.tensor((top, left, ch, cw)),
        valid,
    )


def _cut(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bool masks ``(M, L)`` → sorted indices ``(M, n)`` of a random subset of ``n`` True cells
    each, ``n`` = the smallest count over the rows."""
    n = int(masks.sum(1).min())
    scores = torch.rand(masks.shape, generator=generator) + masks.float() * 2.0
    top = scores.topk(n, dim=1).indices  # True cells score > 2 > any False cell
    return top.sort(dim=1).values


def sample_jepa_masks(
    valid: torch.Tensor,
    *,
    n_targets: int,
    target_scale: tuple[float, float],
    target_aspect: tuple[float, float],
    context_scale: tuple[float, float],
    context_aspect: tuple[float, float],
    min_keep: int,
    generator: torch.Generator,
) -> JEPAMasks:
    """Context and ``n_targets`` target blocks for a batch; ``valid (B, h, w)`` bool (all True
    without region masks). See :class:`JEPAMasks` for the result."""
    if valid.dim() != 3:
        raise ValueError(f"valid must be (B, h, w), got shape {tuple(valid.shape)}")
    if n_targets < 1 or min_keep < 1:
        raise ValueError(f"need n_targets >= 1 and min_keep >= 1, got {n_targets}, {min_keep}")
    b, h, w = valid.shape
    valid = valid.bool().cpu()
    t_size = sample_block_size((h, w), target_scale, target_aspect, generator)
    if t_size[0] * t_size[1] >= h * w:
        raise ValueError(
            f"target blocks {t_size} cover the whole {h}×{w} grid: lower the target scale "
            "or use larger views / smaller patches"
        )
    c_size = sample_block_size((h, w), context_scale, context_aspect, generator)
    parts = [
        sample_image_blocks(valid[i], t_size, c_size, n_targets, min_keep, generator)
        for i in range(b)
    ]
    targets = torch.stack([p[0] for p in parts])
    context = torch.stack([p[1] for p in parts])
    target_idx = _cut(targets.reshape(b * n_targets, h * w), generator)
    return JEPAMasks(
        context_idx=_cut(context.reshape(b, h * w), generator),
        target_idx=target_idx.reshape(b, n_targets, -1),
        context=context,
        targets=targets,
        context_boxes=torch.stack([p[3] for p in parts]),
        target_boxes=torch.stack([p[2] for p in parts]),
        valid=torch.stack([p[4] for p in parts]),
    )
