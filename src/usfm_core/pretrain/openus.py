"""OpenUS pre-training (iBOT self-distillation + self-adaptive masked reconstruction).

One :meth:`OpenUS.training_step` = Alg. 1 + §3.2 of the paper:

1. the teacher (EMA of the student, eval mode, no drop-path) sees the *unmasked* global views
   and returns class/patch logits and its scan-attention importance ``(G·B, h, w)``;
2. global-view masks come from the mask generator (self-adaptive: ALP of the teacher
   importance and the per-image EMA of the student's reconstruction loss); local views get
   random block masks;
3. the student sees masked global and local views; L = L_cls + L_patch + L_rec,g + L_rec,l;
4. the student's per-cell reconstruction loss on the global views updates the loss EMA.

Views are stacked view-major: ``(V·B, ...)`` rows ``[view0 of all images, view1 ...]``.
"""

from __future__ import annotations

import copy
import dataclasses
import zlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from usfm_core.pretrain.base import PretrainMethod
from usfm_core.pretrain.config import PretrainConfig
from usfm_core.pretrain.ema import PerImageLossEMA, PositionalLossEMA, ema_update
from usfm_core.pretrain.heads import ProjectionHead, ReconstructionHead
from usfm_core.pretrain.losses import DistillationLoss, reconstruction_loss, teacher_stats
from usfm_core.pretrain.masking import BlockMaskGenerator, MaskGenerator, build_mask_generator
from usfm_core.pretrain.schedules import cosine_schedule, warmup_then_constant


def build_backbone(cfg: PretrainConfig, *, teacher: bool = False) -> nn.Module:
    """The VMamba backbone of ``cfg.backbone`` (teacher: drop-path disabled)."""
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    bcfg = VMambaConfig.preset(cfg.backbone.preset)
    overrides = dict(cfg.backbone.overrides)
    if hasattr(bcfg, "in_chans") and "in_chans" not in overrides:
        overrides["in_chans"] = cfg.views.in_chans  # gray (1) or colour (3) views
    if teacher:
        # The teacher is an EMA target: it must be deterministic (the authors' code keeps
        # drop-path on, a bug we do not reproduce).
        for name in ("drop_path_rate", "drop_path"):
            if hasattr(bcfg, name):
                overrides[name] = 0.0
    if overrides:
        bcfg = dataclasses.replace(bcfg, **overrides)
    return VMamba(bcfg)


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Row-major tokens (B, L, C) → feature map (B, C, h, w)."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1])


def _stack_views(views: torch.Tensor) -> torch.Tensor:
    """(B, V, C, S, S) → view-major (V·B, C, S, S)."""
    b, v = views.shape[:2]
    return views.transpose(0, 1).reshape(v * b, *views.shape[2:])


def cells_from_tokens(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Token-grid map (B, h, w) → mask-cell grid (B, H, W): bilinear when finer, else as is.

    Bilinear (not nearest) so the cells of one token do not tie in the ALP ranking.
    """
    if tuple(scores.shape[-2:]) == tuple(grid):
        return scores
    return F.interpolate(scores[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]


def token_weights(mask: torch.Tensor, token_grid: tuple[int, int]) -> torch.Tensor:
    """Cell mask (B, H, W) bool → masked fraction of each token (B, h, w) float in [0, 1]."""
    if tuple(mask.shape[-2:]) == tuple(token_grid):
        return mask.float()
    return F.adaptive_avg_pool2d(mask.float()[:, None], token_grid)[:, 0]


def distillation_logs(cls_targets: torch.Tensor, patch_targets: torch.Tensor) -> dict[str, float]:
    """Collapse diagnostics of the teacher targets (see :func:`losses.teacher_stats`).

    ``teacher_entropy_ratio`` / ``teacher_mi`` are the class-token values (the headline);
    ``*_cls`` and ``*_patch`` name each head's.
    """
    c, p = teacher_stats(cls_targets), teacher_stats(patch_targets)
    return {
        "teacher_entropy_ratio": c["entropy_ratio"],
        "teacher_entropy_ratio_cls": c["entropy_ratio"],
        "teacher_entropy_ratio_patch": p["entropy_ratio"],
        "teacher_mi": c["mi"],
        "teacher_mi_cls": c["mi"],
        "teacher_mi_patch": p["mi"],
    }


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, rank): masks are a pure function of the step,
    so a resumed run draws exactly the masks of the uninterrupted one."""
    key = zlib.crc32(f"{seed}:{step}:{rank}".encode())
    return torch.Generator().manual_seed(key)


class StudentNet(nn.Module):
    """Student backbone + projection head (+ reconstruction head); one forward for all views
    (one call per optimisation step keeps DistributedDataParallel simple)."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead, recon: ReconstructionHead | None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.recon = recon

    def forward(
        self,
        global_views: torch.Tensor,
        global_mask: torch.Tensor,
        local_views: torch.Tensor | None = None,
        local_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """global_views (G·B, C, S, S), global_mask (G·B, h, w); locals likewise or None.

        Returns ``cls_g (G·B, K)``, ``patch_g (G·B, L, Kp)``, ``rec_g (G·B, C, S, S)`` and, with
        local views, ``cls_l (Lc·B, K)``, ``rec_l``.
        """
        out: dict[str, torch.Tensor] = {}
        g = self.backbone(global_views, mask=global_mask)
        out["cls_g"] = self.head(g.global_token)
        out["patch_g"] = self.head.forward_patches(g.patch_tokens)
        if self.recon is not None:
            out["rec_g"] = self.recon(tokens_to_map(g.patch_tokens, tuple(g.grid)))
        if local_views is not None and local_views.shape[0] > 0:
            loc = self.backbone(local_views, mask=local_mask)
            out["cls_l"] = self.head(loc.global_token)
            if self.recon is not None:
                out["rec_l"] = self.recon(tokens_to_map(loc.patch_tokens, tuple(loc.grid)))
        return out


class TeacherNet(nn.Module):
    """Teacher backbone + projection head (no reconstruction head)."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead):
        super().__init__()
        self.backbone = backbone
        self.head = head


class OpenUS(PretrainMethod):
    """OpenUS student/teacher pair, losses, mask generators and loss EMA.

    ``total_steps`` / ``steps_per_epoch`` fix the schedules (α, r_t, teacher temperature,
    EMA momentum); ``n_items`` is the catalog size (keys of the per-image loss EMA).
    ``reconstruction=False`` and a block generator give the iBOT ablation.
    """

    method = "openus"

    def __init__(
        self,
        cfg: PretrainConfig,
        *,
        total_steps: int,
        steps_per_epoch: int,
        n_items: int,
        in_chans: int | None = None,
        reconstruction: bool = True,
        rank: int = 0,
    ):
        super().__init__()
        self.cfg = cfg
        self.rank = rank
        self.total_steps = max(total_steps, 1)
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.reconstruction = reconstruction
        backbone = build_backbone(cfg)
        dim = int(backbone.embed_dim)
        h = cfg.heads
        head_kwargs = dict(
            patch_out_dim=h.patch_out_dim,
            hidden=h.hidden,
            bottleneck=h.bottleneck,
            shared_head=h.shared_head,
            batch_norm=h.batch_norm,
        )
        in_chans = in_chans or cfg.views.in_chans
        self.in_chans = in_chans
        self.stride = 32
        recon = ReconstructionHead(dim, in_chans, self.stride) if reconstruction else None
        self.student = StudentNet(
            backbone,
            ProjectionHead(dim, h.out_dim, norm_last_layer=h.norm_last_layer, **head_kwargs),
            recon,
        )
        # The teacher starts as a copy of the student: a drop-path-free backbone with the
        # student's weights, and a deep copy of the head.
        t_backbone = build_backbone(cfg, teacher=True)
        t_backbone.load_state_dict(backbone.state_dict())
        self.teacher = TeacherNet(t_backbone, copy.deepcopy(self.student.head))
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.criterion = DistillationLoss(
            h.out_dim,
            h.patch_out_dim,
            student_temp=cfg.loss.student_temp,
            center_momentum=cfg.loss.center_momentum,
            centering=cfg.loss.centering,
            sinkhorn_iters=cfg.loss.sinkhorn_iters,
        )
        m = cfg.masking
        # Masks live on a grid of ``cell``-px cells (finer than or equal to the token grid).
        self.cell = int(m.cell)
        grid = (cfg.views.global_size // self.cell,) * 2
        self.global_grid = grid
        self.local_grid = (cfg.views.local_size // self.cell,) * 2
        self.global_masker: MaskGenerator = build_mask_generator(
            m.generator,
            m.ratio,
            total_steps=self.total_steps,
            alpha=(m.alpha_start, m.alpha_end),
            r=(m.r_start, m.r_end),
            weighting=m.score_weighting,
            min_patches=m.min_block_patches,
            aspect=m.block_aspect,
        )
        self.local_masker = BlockMaskGenerator(m.local_ratio, min_patches=1, aspect=m.block_aspect)
        if m.loss_ema == "per_image":
            self.loss_ema: nn.Module = PerImageLossEMA(n_items, grid, m.loss_ema_momentum)
        else:
            self.loss_ema = PositionalLossEMA(grid, m.loss_ema_momentum)
        lo = cfg.loss
        self.teacher_temp = warmup_then_constant(
            lo.warmup_teacher_temp,
            lo.teacher_temp,
            lo.warmup_teacher_temp_epochs * self.steps_per_epoch,
            self.total_steps,
        )
        self.ema_momentum = cosine_schedule(
            cfg.ema_momentum, cfg.ema_momentum_end, self.total_steps
        )

    # ------------------------------------------------------------------ plumbing
    def train(self, mode: bool = True) -> OpenUS:
        """Train the student; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _schedule(self, values, step: int) -> float:
        return float(values[min(step, len(values) - 1)])

    def before_optimizer_step(self, step: int) -> None:
        """Freeze the prototypes (last layers) during the first epoch(s): drop their grads."""
        if step < self.cfg.optim.freeze_last_layer_epochs * self.steps_per_epoch:
            for p in self.student.head.last_layer_parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Teacher ← EMA of the student with the cosine momentum schedule."""
        m = self._schedule(self.ema_momentum, step)
        ema_update(self.teacher.backbone, self.student.backbone, m)
        ema_update(self.teacher.head, self.student.head, m)

    def export_backbone(self) -> nn.Module:
        """The module fine-tuning uses: the teacher backbone (as in DINO/iBOT)."""
        return self.teacher.backbone

    # ------------------------------------------------------------------ the step
    def training_step(
        self, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One OpenUS step on a multi-crop batch → (total loss, logs of floats).

        batch: ``global_views (B, G, C, S, S)``, ``local_views (B, Lc, C, s, s)``,
        ``index (B,)`` catalog indices.
        """
        device = next(self.student.parameters()).device
        gviews = batch["global_views"].to(device, non_blocking=True)
        n_global = gviews.shape[1]
        globals_ = _stack_views(gviews)
        lviews = batch.get("local_views")
        locals_ = (
            _stack_views(lviews.to(device, non_blocking=True))
            if (lviews is not None and lviews.shape[1] > 0)
            else None
        )
        index = batch["index"].long().cpu()
        gen = step_generator(self.cfg.seed, step, self.rank)
        t_temp = self._schedule(self.teacher_temp, step)

        # 1. Teacher on unmasked globals (+ its scan-attention importance).
        with torch.no_grad():
            t_out = self.teacher.backbone(globals_, return_attention=True)
            t_cls = self.teacher.head(t_out.global_token)
            t_patch = self.teacher.head.forward_patches(t_out.patch_tokens)
            importance = t_out.importance
        token_grid = tuple(t_out.grid)
        grid = (globals_.shape[-2] // self.cell, globals_.shape[-1] // self.cell)

        # 2. Masks: global views from the generator, local views random blocks.
        loss_map = None
        if importance is not None:
            importance = cells_from_tokens(importance.detach().float().cpu(), grid)
        if self.reconstruction and int(self.loss_ema.n_updates) > 0:
            loss_map = self.loss_ema.get(index).repeat(n_global, 1, 1)
        gmask = self.global_masker(
            len(globals_), grid, scores=importance, loss_map=loss_map, step=step, generator=gen
        )
        lmask = None
        if locals_ is not None:
            lgrid = (locals_.shape[-2] // self.cell, locals_.shape[-1] // self.cell)
            lmask = self.local_masker(len(locals_), lgrid, step=step, generator=gen)
            lmask = lmask.to(device)
        gmask_dev = gmask.to(device)

        # 3. Student on masked views.
        runner = self.runner
        s_out = runner(globals_, gmask_dev, locals_, lmask)
        s_cls = (
            s_out["cls_g"] if "cls_l" not in s_out else torch.cat([s_out["cls_g"], s_out["cls_l"]])
        )
        lw = self.cfg.loss
        t_cls_p = self.criterion.cls_targets(t_cls, t_temp)
        t_patch_p = self.criterion.patch_targets(t_patch, t_temp)
        l_cls = self.criterion.cls_loss(s_cls, t_cls, n_global, t_temp, targets=t_cls_p)
        # Token weights = the masked fraction of each token's cells (1/0 when cell = 32).
        token_mask = token_weights(gmask_dev, token_grid).flatten(1)
        l_patch = self.criterion.patch_loss(
            s_out["patch_g"], t_patch, token_mask, t_temp, targets=t_patch_p
        )
        total = lw.weight_cls * l_cls + lw.weight_patch * l_patch
        logs = {"cls": float(l_cls.detach()), "patch": float(l_patch.detach())}
        logs.update(distillation_logs(t_cls_p, t_patch_p))
        if self.reconstruction:
            # Target = the normalised input view (the transform already normalised it).
            l_rec_g, rec_map = reconstruction_loss(s_out["rec_g"], globals_, gmask_dev, self.cell)
            total = total + lw.weight_rec_global * l_rec_g
            logs["rec_global"] = float(l_rec_g.detach())
            if "rec_l" in s_out:
                l_rec_l, _ = reconstruction_loss(s_out["rec_l"], locals_, lmask, self.cell)
                total = total + lw.weight_rec_local * l_rec_l
                logs["rec_local"] = float(l_rec_l.detach())
            self._update_loss_ema(index, rec_map.cpu(), gmask, n_global)
        self.criterion.update_centers(t_cls, t_patch)

        logs["loss"] = float(total.detach())
        logs["mask_ratio"] = float(gmask.float().mean())
        logs["teacher_temp"] = t_temp
        logs.update(self.global_masker.stats(step))
        return total, logs

    def _update_loss_ema(
        self, index: torch.Tensor, rec_map: torch.Tensor, gmask: torch.Tensor, n_global: int
    ) -> None:
        """Average the per-cell loss over the G global views (masked cells only), then update
        the EMA (gathered over ranks so every rank keeps the full table)."""
        g, h, w = n_global, *rec_map.shape[1:]
        maps = rec_map.view(g, -1, h, w)
        masks = gmask.view(g, -1, h, w).float()
        count = masks.sum(0)
        per_image = (maps * masks).sum(0) / count.clamp_min(1)
        valid = count > 0
        if dist.is_available() and dist.is_initialized():
            index, per_image, valid = _gather(index, per_image, valid)
        self.loss_ema.update(index, per_image, valid)


def _gather(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """all_gather equally-sized CPU/GPU tensors from every rank and concatenate them."""
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    out = []
    for t in tensors:
        src = t.to(backend_device)
        if src.dtype == torch.bool:
            src = src.to(torch.uint8)
        parts = [torch.empty_like(src) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, src.contiguous())
        cat = torch.cat(parts).cpu()
        out.append(cat.bool() if t.dtype == torch.bool else cat.to(t.dtype))
    return tuple(out)


def build_openus(cfg: PretrainConfig, **kwargs: Any) -> OpenUS:
    """Method-registry factory for ``method = "openus"``."""
    return OpenUS(cfg, reconstruction=True, **kwargs)


def build_ibot(cfg: PretrainConfig, **kwargs: Any) -> OpenUS:
    """iBOT ablation: no reconstruction, random block masks on the global views."""
    cfg = copy.deepcopy(cfg)
    cfg.masking.generator = "block"
    model = OpenUS(cfg, reconstruction=False, **kwargs)
    model.method = "ibot"
    return model
