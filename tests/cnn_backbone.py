"""A small CNN stand-in backbone for fine-tuning tests: fast on one CPU thread.

Four conv stages at strides 4, 8, 16, 32 (``convs`` 3×3 convs each, widths w, 2w, 4w, 8w);
``forward`` returns the ``(features, global_token)`` pair the task heads expect. Registered
once as model type ``cnn-test`` so saved test models reload through the normal path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from usfm_core.models.serialization import register_model


@dataclass
class CnnCfg:
    width: int = 8
    in_chans: int = 1
    convs: int = 1  # 3×3 convs per stage

    def to_dict(self) -> dict:
        return {"width": self.width, "in_chans": self.in_chans, "convs": self.convs}

    @classmethod
    def from_dict(cls, d: dict) -> CnnCfg:
        return cls(**d)


@dataclass
class _Out:
    features: list
    global_token: torch.Tensor


def _stage(c_in: int, c_out: int, stride: int, convs: int) -> nn.Sequential:
    """``convs`` conv + GELU pairs, the first with ``stride``: ``(B, c_in, H, W)`` →
    ``(B, c_out, H/stride, W/stride)``."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GELU()]
    for _ in range(convs - 1):
        layers += [nn.Conv2d(c_out, c_out, 3, padding=1), nn.GELU()]
    return nn.Sequential(*layers)


class CnnBackbone(nn.Module):
    """``(B, C, H, W)`` → features ``[(B, w, H/4, W/4), …, (B, 8w, H/32, W/32)]`` and a
    global token ``(B, 8w)`` (mean of the last stage)."""

    def __init__(self, cfg: CnnCfg | None = None):
        super().__init__()
        self.config = cfg or CnnCfg()
        w = self.config.width
        self.out_dims = [w, 2 * w, 4 * w, 8 * w]
        chans = [self.config.in_chans, *self.out_dims]
        self.stages = nn.ModuleList(
            _stage(chans[i], chans[i + 1], 4 if i == 0 else 2, self.config.convs)
            for i in range(4)
        )

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return _Out(feats, x.mean((2, 3)))


register_model("cnn-test", CnnBackbone, CnnCfg)
