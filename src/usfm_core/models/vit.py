"""A plain Vision Transformer (Dosovitskiy et al.) for USF-MAE and US-JEPA, with the same
``forward(x, mask) -> BackboneOutput`` interface as :class:`~usfm_core.models.vmamba.VMamba`.

Positional embeddings are fixed 2-D sine-cosine.  For a grid other than the configured one
(``img_size / patch_size``), token coordinates are rescaled onto the configured grid before the
sines are taken, i.e. the embedding is interpolated, so any image size divisible by the patch
size works with the frequencies the model was trained with.

Global token: the mean of the final patch tokens by default (USF-MAE / US-JEPA style); with
``cls_token=True`` a learnable class token is prepended and its output is the global token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usfm_core.errors import ConfigError
from usfm_core.models.common import adapt_input
from usfm_core.models.limits import VIT_FIELDS, check_fields, check_param_budget
from usfm_core.models.vmamba import BackboneOutput, DropPath

__all__ = ["ViT", "ViTConfig", "patchify", "sincos_pos_embed_2d", "unpatchify"]

_PRESETS: dict[str, dict] = {
    "vit-tiny-test": {"img_size": 64, "dim": 64, "depth": 2, "heads": 2},
    "vit-s": {"dim": 384, "depth": 12, "heads": 6},
    "vit-b": {"dim": 768, "depth": 12, "heads": 12},
}


@dataclass
class ViTConfig:
    """Hyper-parameters of :class:`ViT` (``dim`` must be divisible by ``heads`` and by 4)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    cls_token: bool = False

    def __post_init__(self) -> None:
        # Types and ranges (usfm_core.models.limits.VIT_FIELDS), then consistency.
        check_fields(asdict(self), VIT_FIELDS, "ViT config", from_json=False)
        if self.in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 or 3, got {self.in_chans}")
        if self.dim % self.heads or self.dim % 4:
            raise ConfigError(f"dim {self.dim} must be divisible by heads ({self.heads}) and 4")
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} not divisible by {self.patch_size}")
        if self.depth < 1 or self.patch_size < 1:
            raise ConfigError("depth and patch_size must be ≥ 1")
        check_param_budget(self.estimate_params(), "this ViT config")  # before allocating

    @classmethod
    def preset(cls, name: str, **overrides) -> ViTConfig:
        """Named configuration: "vit-tiny-test", "vit-s", "vit-b"."""
        if name not in _PRESETS:
            raise ConfigError(f"unknown ViT preset {name!r}", hint=f"use one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> list[str]:
        """Names accepted by :meth:`preset`."""
        return list(_PRESETS)

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        """Inverse of :meth:`to_dict`. Unknown keys, wrong types and out-of-range values (see
        :data:`usfm_core.models.limits.VIT_FIELDS`) raise :class:`ConfigError` naming the
        field, before anything is allocated."""
        check_fields(data, VIT_FIELDS, "ViT config")
        return cls(**data)

    def estimate_params(self) -> int:
        """Number of parameters :class:`ViT` would have, from the config alone."""
        d, hidden = self.dim, int(self.dim * self.mlp_ratio)
        n = self.in_chans * d * self.patch_size**2 + d + d  # patch embed, mask token
        n += d if self.cls_token else 0
        block = 4 * d  # two LayerNorms
        block += d * 3 * d + (3 * d if self.qkv_bias else 0) + d * d + d  # qkv, proj
        block += d * hidden + hidden + hidden * d + d  # MLP
        return n + self.depth * block + 2 * d  # blocks, final norm


def patchify(imgs: Tensor, p: int) -> Tensor:
    """``(B, C, H, W)`` → ``(B, L, p·p·C)`` row-major patches (pixel order ``(py, px, c)``)."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image {h}×{w} not divisible by patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, grid: tuple[int, int], chans: int) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, L, p·p·C)`` → ``(B, C, h·p, w·p)``."""
    b = x.shape[0]
    h, w = grid
    if x.shape[1] != h * w or x.shape[2] != p * p * chans:
        raise ValueError(f"tokens {tuple(x.shape)} do not match grid {grid}, p={p}, C={chans}")
    x = x.reshape(b, h, w, p, p, chans).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, chans, h * p, w * p)


def sincos_pos_embed_2d(
    dim: int, grid: tuple[int, int], ref_grid: tuple[int, int] | None = None
) -> Tensor:
    """Fixed 2-D sine-cosine embedding ``(h·w, dim)`` (first half: rows, second half: columns).

    With ``ref_grid``, coordinates are scaled by ``ref / grid`` (interpolation onto the grid the
    model was configured for).
    """
    h, w = grid
    rh, rw = ref_grid or grid
    ys = torch.arange(h, dtype=torch.float64) * (rh / h)
    xs = torch.arange(w, dtype=torch.float64) * (rw / w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def embed(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(yy), embed(xx)], dim=1).float()


class Attention(nn.Module):
    """Multi-head self-attention on ``(B, N, C)``."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DP(Attn(LN x))``, ``x + DP(MLP(LN x))``."""

    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Plain ViT encoder. Input ``(B, C, H, W)`` with H, W divisible by ``patch_size``; 1- vs
    3-channel inputs are adapted as in :class:`VMamba` (repeat / average)."""

    def __init__(self, config: ViTConfig | None = None):
        super().__init__()
        self.config = cfg = config or ViTConfig()
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(cfg.dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.cls_token else None
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def stride(self) -> int:
        """Pixels per token side."""
        return self.config.patch_size

    @property
    def embed_dim(self) -> int:
        """Token width."""
        return self.config.dim

    @property
    def out_dims(self) -> list[int]:
        """Width of the single feature map."""
        return [self.config.dim]

    def pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """``(1, h·w, dim)`` positional embedding for a token grid (interpolated, see module)."""
        ref = self.config.img_size // self.config.patch_size
        pe = sincos_pos_embed_2d(self.config.dim, grid, (ref, ref))
        return pe.to(self.patch_embed.weight.device)[None]

    def _adapt_input(self, x: Tensor) -> Tensor:
        return adapt_input(x, self.config.in_chans, self.config.patch_size)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch embeddings ``(B, L, C)`` (no positions yet) and the grid ``(h, w)``."""
        x = self.patch_embed(self._adapt_input(x))
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid

    def _encode(self, tokens: Tensor) -> Tensor:
        """Run blocks + final norm on ``(B, N, C)``, with the cls token if configured."""
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> BackboneOutput:
        """Encode ``x`` ``(B, C, H, W)``; ``mask`` bool ``(B, h, w)`` or ``(B, L)`` on the patch
        grid: masked patch embeddings are replaced by :attr:`mask_token` (before positions)."""
        tokens, (h, w) = self.embed(x)
        b, length, c = tokens.shape
        if mask is not None:
            if mask.shape[0] != b or mask[0].numel() != length:
                raise ValueError(
                    f"mask must be (B, {h}, {w}) or (B, {length}), got {tuple(mask.shape)}"
                )
            m = mask.reshape(b, length, 1).bool()
            tokens = torch.where(m, self.mask_token.to(tokens.dtype), tokens)
        out = self._encode(tokens + self.pos_embed((h, w)))
        patch = out[:, -length:]
        glob = out[:, 0] if self.cls is not None else patch.mean(dim=1)
        fmap = patch.transpose(1, 2).reshape(b, c, h, w)
        tokens_all = torch.cat([glob[:, None], patch], dim=1)
        return BackboneOutput([fmap], patch, glob, tokens_all, (h, w))

    def forward_visible(self, x: Tensor, keep_idx: Tensor) -> Tensor:
        """Encode only the kept patches (MAE encoder): ``keep_idx`` ``(B, K)`` row-major patch
        indices → ``(B, K, C)`` (the cls token, if any, is used but not returned)."""
        tokens, grid = self.embed(x)
        b, length, c = tokens.shape
        if keep_idx.dim() != 2 or keep_idx.shape[0] != b:
            raise ValueError(f"keep_idx must be (B={b}, K), got {tuple(keep_idx.shape)}")
        if keep_idx.numel() and (keep_idx.min() < 0 or keep_idx.max() >= length):
            raise ValueError(f"keep_idx out of range [0, {length})")
        tokens = tokens + self.pos_embed(grid)
        kept = torch.gather(tokens, 1, keep_idx[..., None].long().expand(-1, -1, c))
        out = self._encode(kept)
        return out[:, 1:] if self.cls is not None else out
