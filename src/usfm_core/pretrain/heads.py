"""Projection heads (iBOT) and the pixel reconstruction head (OpenUS)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _last_layer(bottleneck: int, out_dim: int, norm_last_layer: bool) -> nn.Linear:
    """Weight-normed ``bottleneck → out_dim`` linear layer without bias.

    The magnitude ``g`` starts at 1; with ``norm_last_layer`` it stays frozen at 1, so the
    logits are cosine similarities with learnable prototypes (DINO's stabiliser).
    """
    layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
    g = layer.parametrizations.weight.original0
    with torch.no_grad():
        g.fill_(1.0)
    g.requires_grad_(not norm_last_layer)
    return layer


class BatchStandardize(nn.Module):
    """Per-batch standardisation of features (DINO's BatchNorm-in-head, without running stats).

    x ``(..., C)``: every channel is standardised with the mean and (biased) variance over all
    leading positions of *this* call (images × tokens), then scaled and shifted by learnable
    ``weight``/``bias`` ``(C,)``. The same rule holds in train and eval mode and in the teacher:
    it removes the component all images share, so small per-image differences reach the
    prototypes instead of vanishing after centring (issue #12). One row standardises to
    ``bias``.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) → (..., C), standardised over every leading position."""
        flat = x.reshape(-1, x.shape[-1])
        var, mean = torch.var_mean(flat, dim=0, unbiased=False, keepdim=True)
        # (x − mean)·(rstd·weight) + bias: the scale is folded on the (1, C) row, so the
        # (rows, C) tensor sees two ops instead of four.
        out = torch.addcmul(self.bias, flat - mean, torch.rsqrt(var + self.eps) * self.weight)
        return out.view_as(x)


class ProjectionHead(nn.Module):
    """iBOT head: 3-layer MLP (GELU) → bottleneck → L2-norm → weight-normed prototypes.

    ``batch_norm=True`` inserts :class:`BatchStandardize` after the first two linear layers
    (DINO's ``use_bn``), computed per call over the images (and tokens) of the batch.

    ``forward`` maps class tokens ``(..., C) → (..., out_dim)``; ``forward_patches`` maps patch
    tokens ``(..., C) → (..., patch_out_dim)`` through the same MLP and either the same last
    layer (``shared_head``) or a separate one (default, as in iBOT/OpenUS code). Both accept
    ``(B, C)`` and ``(B, L, C)``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        patch_out_dim: int | None = None,
        hidden: int = 2048,
        bottleneck: int = 256,
        norm_last_layer: bool = True,
        shared_head: bool = False,
        batch_norm: bool = False,
    ):
        super().__init__()
        patch_out_dim = out_dim if patch_out_dim is None else patch_out_dim
        if shared_head and patch_out_dim != out_dim:
            raise ValueError("a shared head needs patch_out_dim == out_dim")
        layers: list[nn.Module] = []
        for width in (in_dim, hidden):
            layers.append(nn.Linear(width, hidden))
            if batch_norm:  # without it the module names stay those of older checkpoints
                layers.append(BatchStandardize(hidden))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden, bottleneck))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = _last_layer(bottleneck, out_dim, norm_last_layer)
        self.patch_last_layer = (
            self.last_layer
            if shared_head
            else _last_layer(bottleneck, patch_out_dim, norm_last_layer)
        )
        self.apply(_init_linear)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token logits. x (..., C) → (..., out_dim)."""
        return self.last_layer(self._embed(x))

    def forward_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-token logits. x (..., C) → (..., patch_out_dim)."""
        return self.patch_last_layer(self._embed(x))

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters frozen during the first epoch(s) (``optim.freeze_last_layer_epochs``)."""
        params = list(self.last_layer.parameters())
        if self.patch_last_layer is not self.last_layer:
            params += list(self.patch_last_layer.parameters())
        return params


def _init_linear(module: nn.Module) -> None:
    """Truncated-normal weights (std 0.02) and zero biases for the MLP layers."""
    if isinstance(module, nn.Linear) and not hasattr(module, "parametrizations"):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ReconstructionHead(nn.Module):
    """Lightweight pixel decoder: 1×1 conv to ``stride²·C_out`` channels + PixelShuffle(stride).

    Input: the last-stage feature map ``(B, C, h, w)``; output: pixels ``(B, C_out, h·stride,
    w·stride)`` (= the view's size for a 32-px-stride backbone).
    """

    def __init__(self, in_dim: int, out_channels: int, stride: int = 32):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, stride * stride * out_channels, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)
        self.stride = stride

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, C_out, h·stride, w·stride)."""
        return self.shuffle(self.proj(feature_map))
