"""US-JEPA / SALT baseline (``method="jepa"``): predict a frozen teacher's patch embeddings.

US-JEPA §3–4 with Static-teacher Asymmetric Latent Training (SALT, Eq. 2 and 5):

* the teacher ``h_ψ`` is FROZEN: ``requires_grad`` off, always in eval mode, never updated (no
  EMA). ``jepa.teacher_ckpt`` names any backbone folder :func:`load_model` reads (an OpenUS,
  MAE or JEPA export, ViT or VMamba). Left empty, the teacher is a randomly initialised copy of
  the student's architecture; SALT shows students learn even from weak teachers, and its stage 1
  may simply be pixel reconstruction (``method=mae``), whose export can then be the teacher;
* the teacher sees the whole first global view; its last feature map, resampled to the
  student's patch grid when the two differ (area average when coarser, bilinear when finer)
  and layer-normalised (``jepa.target_norm``, as I-JEPA), gives the targets ``s_y (B, L, C_t)``;
* the student encoder sees one context block only (ViT: just those tokens; VMamba: the other
  cells become its mask embedding, SimMIM-style). A narrower transformer predictor takes the
  context tokens plus a learnable mask token with 2-D sine-cosine positions for every target
  patch and predicts each target block; a linear adapter maps it to the teacher's width;
* loss: Smooth-L1 between predictions and targets, averaged over the T blocks (Eq. 5);
* USrc: with ``jepa.use_region`` the scan-region masks of the batch (``global_regions``) define
  the valid patches; blocks follow the rules of :mod:`usfm_core.pretrain.blocks`, and the loss
  covers valid patches only.

``export_backbone()`` returns the student encoder (the product of SALT training).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from usfm_core.errors import CheckpointError, ConfigError
from usfm_core.models.vit import ViT, sincos_pos_embed_2d
from usfm_core.pretrain.base import PretrainMethod
from usfm_core.pretrain.blocks import JEPAMasks, sample_jepa_masks, valid_patches
from usfm_core.pretrain.config import PretrainConfig
from usfm_core.pretrain.mae import MaskTokenTransformer, build_encoder
from usfm_core.pretrain.openus import step_generator


def load_teacher(cfg: PretrainConfig) -> nn.Module:
    """The frozen teacher: ``jepa.teacher_ckpt`` loaded, or a fresh drop-path-free encoder."""
    path = cfg.jepa.teacher_ckpt
    if path:
        from usfm_core.models.serialization import load_model

        try:
            teacher, _ = load_model(path)
        except CheckpointError as exc:
            # The inner message already names the file and its fix.
            raise CheckpointError(
                f"cannot load the JEPA teacher (jepa.teacher_ckpt): {exc}",
                hint="or leave jepa.teacher_ckpt empty for a random frozen teacher",
            ) from exc
    else:
        teacher = build_encoder(cfg, frozen=True)
    teacher.requires_grad_(False)
    return teacher.eval()


def resample_tokens(fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Feature map ``(B, C, h', w')`` → row-major tokens ``(B, h·w, C)`` on ``grid = (h, w)``:
    area average onto a coarser grid, bilinear onto a finer one, unchanged when equal."""
    if tuple(fmap.shape[-2:]) != tuple(grid):
        if fmap.shape[-2] >= grid[0] and fmap.shape[-1] >= grid[1]:
            fmap = F.adaptive_avg_pool2d(fmap, grid)
        else:
            fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens ``(B, L, C)``, indices ``(B, *S)`` → ``(B, *S, C)``."""
    b, c = tokens.shape[0], tokens.shape[-1]
    flat = idx.reshape(b, -1, 1).expand(-1, -1, c)
    return torch.gather(tokens, 1, flat).reshape(*idx.shape, c)


def jepa_loss(
    pred: torch.Tensor, targets: torch.Tensor, target_idx: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """Smooth-L1 between predicted and teacher embeddings of the target patches (Eq. 5).

    pred ``(B, T, N, C)``; targets ``(B, L, C)`` teacher tokens of all patches; target_idx
    ``(B, T, N)``. All blocks hold N patches, so the element mean is the mean over the T blocks
    of each block's mean. Patches not indexed (e.g. outside the scan region) never count.
    """
    y = gather_tokens(targets, target_idx)
    return F.smooth_l1_loss(pred.float(), y.float(), beta=beta)


class JEPAPredictor(MaskTokenTransformer):
    """Narrow transformer: context tokens + positioned mask tokens → target embeddings."""

    def __init__(
        self,
        enc_dim: int,
        dim: int,
        depth: int,
        heads: int,
        out_dim: int,
        ref_grid: tuple[int, int],
    ):
        super().__init__(enc_dim, dim, depth, heads, ref_grid)
        # US-JEPA §4.4: a linear adapter from the predictor width to the teacher's.
        self.adapter = nn.Linear(dim, out_dim)

    def forward(
        self,
        context: torch.Tensor,
        context_idx: torch.Tensor,
        target_idx: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """context ``(B, K, C_enc)`` at ``context_idx (B, K)``; target_idx ``(B, T, N)`` →
        predictions ``(B, T, N, out_dim)``. Each target block is predicted on its own (the
        context is repeated T times), so blocks do not see each other's mask tokens."""
        b, t, n = target_idx.shape
        pos = sincos_pos_embed_2d(self.mask_token.shape[0], grid, self.ref_grid)
        pos = pos.to(context.device)
        x = self.embed(context)
        x = x + pos[context_idx].to(x.dtype)
        x = x.repeat_interleave(t, dim=0)  # (B·T, K, D), rows ordered (image, block)
        queries = self.mask_token.to(x.dtype) + pos[target_idx.reshape(b * t, n)].to(x.dtype)
        seq = torch.cat([x, queries], dim=1)
        for blk in self.blocks:
            seq = blk(seq)
        out = self.adapter(self.norm(seq[:, -n:]))
        return out.reshape(b, t, n, -1)


class JEPAStudent(nn.Module):
    """Context encoder + predictor; one forward per optimisation step (DDP-friendly)."""

    def __init__(self, encoder: nn.Module, cfg: PretrainConfig, teacher_dim: int):
        super().__init__()
        self.encoder = encoder
        self.is_vit = isinstance(encoder, ViT)
        self.patch = int(encoder.stride)
        ref = (encoder.config.img_size if self.is_vit else cfg.views.global_size) // self.patch
        j = cfg.jepa
        self.predictor = JEPAPredictor(
            encoder.embed_dim, j.pred_dim, j.pred_depth, j.pred_heads, teacher_dim, (ref, ref)
        )

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of images ``(B, C, H, W)``."""
        return images.shape[-2] // self.patch, images.shape[-1] // self.patch

    def encode_context(self, images: torch.Tensor, context_idx: torch.Tensor) -> torch.Tensor:
        """Encode only the context ``context_idx (B, K)`` of images ``(B, C, H, W)`` →
        ``(B, K, C_enc)``."""
        if self.is_vit:
            return self.encoder.forward_visible(images, context_idx)
        h, w = self.grid(images)
        hidden = torch.ones(len(images), h * w, dtype=torch.bool, device=images.device)
        hidden.scatter_(1, context_idx, False)
        out = self.encoder(images, mask=hidden.view(-1, h, w))
        return gather_tokens(out.patch_tokens, context_idx)

    def forward(
        self, images: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor
    ) -> torch.Tensor:
        """images ``(B, C, H, W)``, context_idx ``(B, K)``, target_idx ``(B, T, N)`` →
        predicted target embeddings ``(B, T, N, C_teacher)``."""
        context = self.encode_context(images, context_idx)
        return self.predictor(context, context_idx, target_idx, self.grid(images))


class JEPA(PretrainMethod):
    """US-JEPA / SALT pre-training module for the trainer (see the module docstring)."""

    method = "jepa"

    def __init__(self, cfg: PretrainConfig, *, total_steps: int, rank: int = 0, **_: Any):
        super().__init__()
        _validate(cfg)
        self.cfg = cfg
        self.rank = rank
        self.total_steps = max(total_steps, 1)
        self.teacher = load_teacher(cfg)
        teacher_dim = int(self.teacher.embed_dim)
        self.student = JEPAStudent(build_encoder(cfg), cfg, teacher_dim)

    # ------------------------------------------------------------------ plumbing
    def train(self, mode: bool = True) -> JEPA:
        """Train the student; the frozen teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def export_backbone(self) -> nn.Module:
        """The student (context) encoder."""
        return self.student.encoder

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Frozen teacher tokens of images ``(B, C, H, W)`` on the student ``grid`` →
        ``(B, h·w, C_t)`` float32 (layer-normalised with ``jepa.target_norm``)."""
        fmap = self.teacher(images).features[-1]
        tokens = resample_tokens(fmap.float(), grid)
        if self.cfg.jepa.target_norm:
            tokens = F.layer_norm(tokens, (tokens.shape[-1],))
        return tokens

    def sample_masks(self, batch: dict[str, torch.Tensor], step: int) -> JEPAMasks:
        """Context / target blocks of the step (USrc when region masks are in the batch)."""
        images = batch["global_views"][:, 0]
        h, w = self.student.grid(images)
        regions = batch.get("global_regions")
        if self.cfg.jepa.use_region and regions is not None:
            valid = valid_patches(regions[:, 0].bool().cpu(), self.student.patch)
        else:
            valid = torch.ones(len(images), h, w, dtype=torch.bool)
        j = self.cfg.jepa
        return sample_jepa_masks(
            valid,
            n_targets=j.n_targets,
            target_scale=j.target_scale,
            target_aspect=j.target_aspect,
            context_scale=j.context_scale,
            context_aspect=j.context_aspect,
            min_keep=j.min_keep,
            generator=step_generator(self.cfg.seed, step, self.rank),
        )

    def training_step(
        self, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One SALT step on the first global view ``(B, C, S, S)`` → (loss, logs)."""
        device = next(self.student.parameters()).device
        images = batch["global_views"][:, 0].to(device, non_blocking=True)
        masks = self.sample_masks(batch, step)
        context_idx = masks.context_idx.to(device)
        target_idx = masks.target_idx.to(device)
        targets = self.teacher_targets(images, self.student.grid(images))
        runner = self.runner
        pred = runner(images, context_idx, target_idx)
        loss = jepa_loss(pred, targets, target_idx, self.cfg.jepa.smooth_l1_beta)
        logs = {
            "loss": float(loss.detach()),
            "context_patches": float(context_idx.shape[1]),
            "target_patches": float(target_idx.shape[2]),
            "valid_fraction": float(masks.valid.float().mean()),
        }
        return loss, logs


def _validate(cfg: PretrainConfig) -> None:
    j = cfg.jepa

    def bad(key: str, hint: str) -> ConfigError:
        return ConfigError(f"invalid value {getattr(j, key)!r} for 'jepa.{key}'", hint=hint)

    for key in ("pred_dim", "pred_depth", "pred_heads", "n_targets", "min_keep"):
        if getattr(j, key) < 1:
            raise bad(key, "must be >= 1")
    if j.pred_dim % j.pred_heads or j.pred_dim % 4:
        raise bad("pred_dim", f"must be divisible by pred_heads ({j.pred_heads}) and by 4")
    for key in ("target_scale", "context_scale"):
        lo_hi = getattr(j, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise bad(key, "must be [low, high] with 0 < low <= high <= 1")
    for key in ("target_aspect", "context_aspect"):
        lo_hi = getattr(j, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise bad(key, "must be [low, high] with 0 < low <= high")
    if j.smooth_l1_beta <= 0:
        raise bad("smooth_l1_beta", "must be > 0")


def build_jepa(cfg: PretrainConfig, **kwargs: Any) -> JEPA:
    """Method-registry factory for ``method = "jepa"``."""
    return JEPA(cfg, **kwargs)
