"""OpenUS / iBOT losses: global-token self-distillation, masked-patch distillation, pixels.

Views are stacked *view-major*: a tensor of ``V`` views of a batch of ``B`` images has its
rows ordered ``[view0 img0..imgB-1, view1 img0.., ...]``, i.e. shape ``(V·B, ...)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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
    logits ``patch_center (1, 1, Kp)`` as buffers (saved with the model).
    """

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        *,
        student_temp: float = 0.07,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("patch_center", torch.zeros(1, 1, patch_out_dim))

    def teacher_probs(
        self, logits: torch.Tensor, center: torch.Tensor, temp: float
    ) -> torch.Tensor:
        """softmax((logits − centre) / τ_t) in float32, over the last dimension."""
        return F.softmax((logits.float() - center) / temp, dim=-1)

    def cls_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, n_global: int, teacher_temp: float
    ) -> torch.Tensor:
        """Global-token CE between teacher globals and *all* student views but the same one.

        student (V·B, K) for V = G + L views, teacher (G·B, K). Returns the mean over the
        ``G·V − G`` (teacher view, student view) pairs of the batch-mean CE.
        """
        t = self.teacher_probs(teacher, self.center, teacher_temp).chunk(n_global)
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
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """Masked-patch CE (same view): mean over masked patches per image, then over images.

        student, teacher (G·B, L, Kp); mask (G·B, L) bool. Images without masked patches
        contribute 0 (as in iBOT). Returns a scalar.
        """
        t = self.teacher_probs(teacher, self.patch_center, teacher_temp)
        s = F.log_softmax(student.float() / self.student_temp, dim=-1)
        ce = -(t * s).sum(dim=-1)  # (G·B, L)
        m = mask.float()
        per_image = (ce * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
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
