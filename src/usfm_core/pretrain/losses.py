"""OpenUS / iBOT losses: global-token self-distillation, masked-patch distillation, pixels.

Views are stacked *view-major*: a tensor of ``V`` views of a batch of ``B`` images has its
rows ordered ``[view0 img0..imgB-1, view1 img0.., ...]``, i.e. shape ``(V·B, ...)``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks when torch.distributed is initialised (else ``x``)."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn–Knopp centring (SwAV / DINOv2), over every rank's rows.

    logits ``(N, K)`` → probabilities ``(N, K)`` (rows sum to 1) whose batch mean is close to
    uniform over the K prototypes: ``Q = exp(logits/τ)`` is alternately normalised so that each
    prototype gets mass 1/K and each row 1/N, ``n_iters`` times. Replaces the EMA centre.
    """
    q = (logits.float() / temp).exp().t()  # (K, N)
    # No max-subtraction (it would differ between ranks): the heads' logits are cosines, so
    # exp(logit/τ) stays finite in float32 for τ ≥ 0.012.
    k, n = q.shape
    n_total = n * _world_size()
    q /= _all_reduce_sum(q.sum())
    for _ in range(n_iters):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n_total
    return (q * n_total).t()


@torch.no_grad()
def teacher_stats(probs: torch.Tensor) -> dict[str, float]:
    """Collapse diagnostics of teacher targets ``(..., K)`` (rows are distributions).

    ``entropy_ratio`` = mean per-row entropy / ln K (1 = uniform outputs, the collapse of
    dead distillation; 0 = one-hot); ``mi`` (nats) = entropy of the mean distribution minus
    the mean per-row entropy, the mutual information between input and output (0 when every
    row is the same, at most ln K).
    """
    p = probs.reshape(-1, probs.shape[-1]).float()
    log_k = math.log(p.shape[-1])
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    mean_p = p.mean(0)
    ent_mean = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
    return {"entropy_ratio": float(ent) / log_k, "mi": float(ent_mean - ent)}


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks when torch.distributed is initialised (else ``x``)."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


class DistillationLoss(nn.Module):
    """Self-distillation cross-entropies with teacher centring (DINO + iBOT).

    Holds the EMA centres of the teacher's class-token logits ``center (1, K)`` and patch
    logits ``patch_center (1, 1, Kp)`` as buffers (saved with the model). ``centering="ema"``
    (DINO/iBOT) subtracts them before the teacher softmax; ``"sinkhorn"`` (DINOv2) makes the
    targets with :func:`sinkhorn_knopp` instead (the centres are still tracked, unused).
    """

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        *,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "ema",
        sinkhorn_iters: int = 3,
    ):
        super().__init__()
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn', got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iters = sinkhorn_iters
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("patch_center", torch.zeros(1, 1, patch_out_dim))

    def teacher_probs(
        self, logits: torch.Tensor, center: torch.Tensor, temp: float
    ) -> torch.Tensor:
        """softmax((logits − centre) / τ_t) in float32, over the last dimension."""
        return F.softmax((logits.float() - center) / temp, dim=-1)

    @torch.no_grad()
    def cls_targets(self, teacher: torch.Tensor, temp: float) -> torch.Tensor:
        """Teacher class-token targets: logits (G·B, K) → probabilities (G·B, K)."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher, temp, self.sinkhorn_iters)
        return self.teacher_probs(teacher, self.center, temp)

    @torch.no_grad()
    def patch_targets(self, teacher: torch.Tensor, temp: float) -> torch.Tensor:
        """Teacher patch targets: logits (G·B, L, Kp) → probabilities (G·B, L, Kp)."""
        if self.centering == "sinkhorn":
            flat = sinkhorn_knopp(teacher.reshape(-1, teacher.shape[-1]), temp, self.sinkhorn_iters)
            return flat.view(teacher.shape)
        return self.teacher_probs(teacher, self.patch_center, temp)

    def cls_loss(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        n_global: int,
        teacher_temp: float,
        *,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Global-token CE between teacher globals and *all* student views but the same one.

        student (V·B, K) for V = G + L views, teacher (G·B, K) logits (or precomputed
        ``targets`` (G·B, K) from :meth:`cls_targets`). Returns the mean over the
        ``G·V − G`` (teacher view, student view) pairs of the batch-mean CE.
        """
        if targets is None:
            targets = self.cls_targets(teacher, teacher_temp)
        t = targets.chunk(n_global)
        n_views = student.shape[0] // t[0].shape[0]
        s = F.log_softmax(student.float() / self.student_temp, dim=-1).chunk(n_views)
        total = student.new_zeros((), dtype=torch.float32)
        pairs = 0
        for iq, tq in enumerate(t):
            for v, sv in enumerate(s):
                if v == iq:
                    continue
                total = total + (-(tq * sv).sum(dim=-1)).mean()
                pairs += 1
        return total / max(pairs, 1)

    def patch_loss(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        mask: torch.Tensor,
        teacher_temp: float,
        *,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked-patch CE (same view): mean over masked patches per image, then over images.

        student, teacher (G·B, L, Kp) (or precomputed ``targets``); mask (G·B, L) bool, or
        float weights in [0, 1] (the masked fraction of each token when the mask grid is finer
        than the token grid): a weighted mean per image. Images without masked patches
        contribute 0 (as in iBOT). Returns a scalar.
        """
        t = self.patch_targets(teacher, teacher_temp) if targets is None else targets
        s = F.log_softmax(student.float() / self.student_temp, dim=-1)
        ce = -(t * s).sum(dim=-1)  # (G·B, L)
        m = mask.float()
        per_image = (ce * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-6)
        return per_image.mean()

    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """c ← m·c + (1−m)·mean(teacher logits), averaged over all ranks.

        teacher_cls (G·B, K); teacher_patch (G·B, L, Kp).
        """
        cls_mean = _all_reduce_mean(teacher_cls.float().mean(dim=0, keepdim=True))
        patch_mean = _all_reduce_mean(teacher_patch.float().mean(dim=(0, 1)).view(1, 1, -1))
        m = self.center_momentum
        self.center.mul_(m).add_(cls_mean, alpha=1 - m)
        self.patch_center.mul_(m).add_(patch_mean, alpha=1 - m)


def pixel_mask(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """Grid mask (B, h, w) bool → pixel mask (B, 1, h·stride, w·stride) float."""
    m = mask.float().unsqueeze(1)
    return F.interpolate(m, scale_factor=stride, mode="nearest")


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, stride: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-pixel MSE and the per-cell loss map.

    pred, target (B, C, H, W); mask (B, h, w) bool on the last-stage grid (H = h·stride).
    Returns ``(loss, loss_map)``: ``loss`` = mean squared error over masked pixels and
    channels (0 when nothing is masked), ``loss_map`` (B, h, w) = per-cell MSE for every cell
    (detached; it feeds the student loss EMA of the self-adaptive masking).
    """
    err = (pred.float() - target.float()).pow(2)  # (B, C, H, W)
    m = pixel_mask(mask, stride).to(err.dtype)
    denom = m.sum() * err.shape[1]
    loss = (err * m).sum() / denom.clamp_min(1.0)
    loss_map = F.avg_pool2d(err.detach().mean(dim=1, keepdim=True), stride).squeeze(1)
    return loss, loss_map
