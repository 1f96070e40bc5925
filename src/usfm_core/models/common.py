"""Pieces shared by the backbones (VMamba, ViT)."""

from __future__ import annotations

from torch import Tensor


def adapt_input(x: Tensor, in_chans: int, multiple: int) -> Tensor:
    """Check images ``(B, C, H, W)`` and match the model's channels.

    A 1-channel image is repeated for a 3-channel model and a 3-channel one averaged for a
    1-channel model; H and W must be positive multiples of ``multiple`` (the model's stride or
    patch size). Raises ``ValueError`` naming the problem otherwise.
    """
    if x.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if c != in_chans:
        if c == 1 and in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c == 3 and in_chans == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"model takes {in_chans} channel(s) (or 1/3), got {c}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise ValueError(
            f"image size {h}×{w} must be a positive multiple of {multiple}; resize or pad the input"
        )
    return x
