"""USF-MAE baseline (``method="mae"``): masked autoencoding (USF-MAE §2.3–2.4, He et al. MAE).

The backbone is a config choice (``backbone.preset``):

* a ViT preset (``vit-*``): the encoder sees only the visible patches (``forward_visible``); a
  light transformer decoder takes the encoded visible tokens plus a learnable mask token at
  every masked position, adds fixed 2-D sine-cosine positions and predicts each patch's pixels;
* a VMamba preset: SimMIM-style; masked 32-px cells of the stem features are replaced by the
  backbone's mask embedding, all cells are encoded, and a 1×1 conv + PixelShuffle head predicts
  the pixels of each cell (the stem convolutions see a few pixels across cell borders).

Masks are uniform random without replacement, ``round(ratio·L)`` of the ``L`` patches (USF-MAE:
25 %, MAE: 75 %), drawn from a generator seeded by (seed, step, rank) so resumes are exact.
Loss: mean squared error over the *masked* patches only, optionally against per-patch
normalised targets (``mae.norm_pix_loss``). Only the first global view of each image is used.
There is no teacher; :attr:`MAE.teacher` is an empty module so the trainer's plan counts 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from usfm_core.errors import ConfigError
from usfm_core.models.vit import Block, ViT, ViTConfig, patchify, sincos_pos_embed_2d
from usfm_core.pretrain.base import PretrainMethod
from usfm_core.pretrain.config import PretrainConfig
from usfm_core.pretrain.heads import ReconstructionHead
from usfm_core.pretrain.openus import build_backbone, step_generator


def is_vit_preset(name: str) -> bool:
    """Whether ``backbone.preset`` names a ViT (else a VMamba) configuration."""
    return name in ViTConfig.preset_names()


def build_encoder(cfg: PretrainConfig, *, frozen: bool = False) -> nn.Module:
    """The ViT or VMamba of ``cfg.backbone`` (input channels and, for a ViT, the reference image
    size follow ``cfg.views``); ``frozen=True`` turns drop-path off (a deterministic teacher)."""
    if not is_vit_preset(cfg.backbone.preset):
        return build_backbone(cfg, teacher=frozen)
    overrides = {"in_chans": cfg.views.in_chans, "img_size": cfg.views.global_size}
    overrides.update(cfg.backbone.overrides)
    if frozen:
        overrides["drop_path_rate"] = 0.0
    try:
        return ViT(ViTConfig.preset(cfg.backbone.preset, **overrides))
    except TypeError as exc:
        raise ConfigError(f"invalid backbone.overrides for a ViT: {exc}") from exc


def transformer_blocks(dim: int, depth: int, heads: int) -> nn.ModuleList:
    """``depth`` pre-norm ViT blocks of width ``dim`` (decoders and predictors)."""
    cfg = ViTConfig(dim=dim, depth=depth, heads=heads)
    return nn.ModuleList(Block(cfg, 0.0) for _ in range(depth))


def random_patch_mask(
    batch: int, length: int, ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform masking without replacement: ``round(ratio·L)`` masked patches per image
    (at least 1, at most L − 1).

    Returns ``mask (B, L)`` bool (True = masked) and ``keep_idx (B, L − n)`` sorted indices of
    the visible patches.
    """
    n_mask = min(max(round(ratio * length), 1), length - 1)
    order = torch.rand(batch, length, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_mask], True)
    keep_idx = order[:, n_mask:].sort(dim=1).values
    return mask, keep_idx


def masked_patch_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False
) -> torch.Tensor:
    """MSE over the masked patches only.

    pred, target ``(B, L, P)`` patch pixels; mask ``(B, L)`` bool. With ``norm_pix`` the target
    of each patch is standardised (mean 0, variance 1 over its P values). Returns the mean over
    the masked patches of the per-patch mean squared error (0 when nothing is masked).
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    err = (pred.float() - target).pow(2).mean(dim=-1)  # (B, L)
    m = mask.float()
    return (err * m).sum() / m.sum().clamp_min(1.0)


class MaskTokenTransformer(nn.Module):
    """Shared trunk of the MAE decoder and the JEPA predictor: encoder tokens projected to
    ``dim`` (``embed``), a learnable ``mask_token`` placed at the positions to predict, ``depth``
    transformer blocks and a final LayerNorm; ``ref_grid`` is the positional-embedding grid."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, ref_grid: tuple[int, int]):
        super().__init__()
        self.ref_grid = ref_grid
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.blocks = transformer_blocks(dim, depth, heads)
        self.norm = nn.LayerNorm(dim, eps=1e-6)


class MAEDecoder(MaskTokenTransformer):
    """Light transformer decoder: visible tokens + mask tokens at their positions → pixels."""

    def __init__(
        self,
        enc_dim: int,
        dim: int,
        depth: int,
        heads: int,
        patch_pixels: int,
        ref_grid: tuple[int, int],
    ):
        super().__init__(enc_dim, dim, depth, heads, ref_grid)
        self.pred = nn.Linear(dim, patch_pixels)

    def forward(
        self, visible: torch.Tensor, keep_idx: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """visible ``(B, K, C_enc)`` at row-major positions ``keep_idx (B, K)`` of ``grid`` →
        predicted pixels ``(B, L, P)`` for all ``L = h·w`` patches."""
        x = self.embed(visible)
        b, _, d = x.shape
        length = grid[0] * grid[1]
        full = self.mask_token.to(x.dtype).expand(b, length, d)
        full = full.scatter(1, keep_idx[..., None].expand(-1, -1, d), x)
        pos = sincos_pos_embed_2d(d, grid, self.ref_grid).to(full.device, full.dtype)
        full = full + pos[None]
        for blk in self.blocks:
            full = blk(full)
        return self.pred(self.norm(full))


class MAEStudent(nn.Module):
    """Encoder + decoder (ViT) or encoder + pixel head (VMamba); one forward per step."""

    def __init__(self, encoder: nn.Module, cfg: PretrainConfig, out_chans: int):
        super().__init__()
        self.encoder = encoder
        self.out_chans = out_chans
        self.is_vit = isinstance(encoder, ViT)
        self.patch = int(encoder.stride)
        m = cfg.mae
        if self.is_vit:
            ref = encoder.config.img_size // self.patch
            self.decoder: nn.Module = MAEDecoder(
                encoder.embed_dim,
                m.decoder_dim,
                m.decoder_depth,
                m.decoder_heads,
                self.patch * self.patch * out_chans,
                (ref, ref),
            )
        else:
            self.decoder = ReconstructionHead(encoder.embed_dim, out_chans, self.patch)

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of images ``(B, C, H, W)``."""
        return images.shape[-2] // self.patch, images.shape[-1] // self.patch

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, keep_idx: torch.Tensor
    ) -> torch.Tensor:
        """images ``(B, C, H, W)``, mask ``(B, L)`` bool, keep_idx ``(B, K)`` → predicted patch
        pixels ``(B, L, p·p·C)`` (same layout as :func:`~usfm_core.models.vit.patchify`)."""
        grid = self.grid(images)
        if self.is_vit:
            visible = self.encoder.forward_visible(images, keep_idx)
            return self.decoder(visible, keep_idx, grid)
        out = self.encoder(images, mask=mask.view(-1, *grid))
        fmap = out.patch_tokens.transpose(1, 2).reshape(len(images), -1, *grid)
        return patchify(self.decoder(fmap), self.patch)


class MAE(PretrainMethod):
    """USF-MAE pre-training module for the trainer (see the module docstring)."""

    method = "mae"

    def __init__(self, cfg: PretrainConfig, *, total_steps: int, rank: int = 0, **_: Any):
        super().__init__()
        _validate(cfg)
        self.cfg = cfg
        self.rank = rank
        self.total_steps = max(total_steps, 1)
        self.student = MAEStudent(build_encoder(cfg), cfg, cfg.views.in_chans)
        self.teacher = nn.ModuleList()  # no teacher: keeps the trainer's plan generic

    def export_backbone(self) -> nn.Module:
        """The encoder (the decoder is discarded after pre-training, USF-MAE §2.3)."""
        return self.student.encoder

    def training_step(
        self, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Masked reconstruction of the first global view ``batch["global_views"][:, 0]``
        ``(B, C, S, S)`` → (loss, logs)."""
        device = next(self.student.parameters()).device
        images = batch["global_views"][:, 0].to(device, non_blocking=True)
        h, w = self.student.grid(images)
        gen = step_generator(self.cfg.seed, step, self.rank)
        mask, keep_idx = random_patch_mask(len(images), h * w, self.cfg.mae.ratio, gen)
        mask, keep_idx = mask.to(device), keep_idx.to(device)
        runner = self.runner
        pred = runner(images, mask, keep_idx)
        target = patchify(images, self.student.patch)
        loss = masked_patch_mse(pred, target, mask, self.cfg.mae.norm_pix_loss)
        return loss, {"loss": float(loss.detach()), "mask_ratio": float(mask.float().mean())}


def _validate(cfg: PretrainConfig) -> None:
    m = cfg.mae
    if not 0.0 < m.ratio < 1.0:
        raise ConfigError(
            f"invalid value {m.ratio!r} for 'mae.ratio'", hint="must be in (0, 1), e.g. 0.25"
        )
    for key in ("decoder_dim", "decoder_depth", "decoder_heads"):
        if getattr(m, key) < 1:
            raise ConfigError(f"invalid value {getattr(m, key)!r} for 'mae.{key}'", hint=">= 1")
    if m.decoder_dim % m.decoder_heads or m.decoder_dim % 4:
        raise ConfigError(
            f"mae.decoder_dim {m.decoder_dim} must be divisible by decoder_heads "
            f"({m.decoder_heads}) and by 4"
        )


def build_mae(cfg: PretrainConfig, **kwargs: Any) -> MAE:
    """Method-registry factory for ``method = "mae"``."""
    return MAE(cfg, **kwargs)
