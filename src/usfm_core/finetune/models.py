"""Task heads on a pretrained backbone: image classifier and U-Net-like segmenter.

A backbone is any module whose ``forward(x (B, C, H, W))`` returns an object with
``.features`` (4 maps ``(B, C_i, H/2^{i+2}, W/2^{i+2})``, strides 4, 8, 16, 32) and
``.global_token`` ``(B, C)``, and which exposes ``.out_dims`` (the 4 channel counts) —
:class:`usfm_core.models.vmamba.VMamba` and :class:`usfm_core.models.vit.ViT`.

Models take a one-channel image ``(B, 1, H, W)`` normalised with
:func:`usfm_core.finetune.data.normalize` (repeated to the backbone's input channels if it wants
three); H and W must be divisible by 32.

Both are registered with :mod:`usfm_core.models.serialization` as ``"segmenter"`` and
``"classifier"``: ``save_model`` / ``load_model`` (or :func:`save_finetuned` /
:func:`load_finetuned`) store and rebuild backbone + head together.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from usfm_core.errors import CheckpointError, ConfigError
from usfm_core.finetune.postprocess import PostProcess


class ChannelAttention(nn.Module):
    """Squeeze-excite style gate: (avg-pool + max-pool) → bottleneck MLP → sigmoid → scale.

    ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + mx)


class ConvAttentionBlock(nn.Module):
    """Residual decoder block: conv3×3 → GELU → conv3×3, channel attention. ``(B, C, H, W)``."""

    def __init__(self, channels: int):
        super().__init__()
        groups = _norm_groups(channels)
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
        )
        self.attn = ChannelAttention(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.attn(self.body(x)))


class ChannelAwareVSSBlock(nn.Module):
    """OpenUS's decoder block: a VSS block (SS2D, d_state 4) then a channel-attention branch.

    ``(B, C, H, W) -> (B, C, H, W)``; needs :class:`usfm_core.models.vmamba.VSSBlock`.
    """

    def __init__(self, channels: int, d_state: int = 4):
        super().__init__()
        from usfm_core.models.vmamba import VMambaConfig, VSSBlock

        self.vss = VSSBlock(channels, VMambaConfig(d_state=d_state), drop_path=0.0)
        self.conv = ConvAttentionBlock(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vss(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # VSS works channels-last
        return self.conv(x)


class UNetDecoder(nn.Module):
    """Decoder over 4 multi-scale maps: up ×2 + 1×1 conv, additive skip, attention block.

    Stage-4 features (stride 32) go up through strides 16, 8, 4 adding the stage 3/2/1 skips,
    then a ×4 bilinear upsample and a 1×1 conv give ``(B, n_out, H, W)``. ``block`` builds
    each stage's block from its channel count (conv + channel attention, or VSS).
    """

    def __init__(
        self, in_dims: list[int], n_out: int, block: Callable[[int], nn.Module] = ConvAttentionBlock
    ):
        super().__init__()
        self.bottom = block(in_dims[3])
        self.ups = nn.ModuleList(nn.Conv2d(in_dims[i + 1], in_dims[i], 1) for i in (2, 1, 0))
        self.blocks = nn.ModuleList(block(in_dims[i]) for i in (2, 1, 0))
        self.head = nn.Conv2d(in_dims[0], n_out, 1)

    def decode_stride4(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The 4 maps → the decoded stride-4 map ``(B, in_dims[0], H/4, W/4)`` (before the
        head)."""
        x = self.bottom(feats[3])
        for up, block, skip in zip(self.ups, self.blocks, (feats[2], feats[1], feats[0])):
            x = up(F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            x = block(x + skip)
        return x

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = F.interpolate(
            self.decode_stride4(feats), scale_factor=4, mode="bilinear", align_corners=False
        )
        return self.head(x)


def _conv_norm_act(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """conv 3×3 (``stride``) → GroupNorm → GELU: ``(B, c_in, H, W) → (B, c_out, H/s, W/s)``."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.GroupNorm(_norm_groups(c_out), c_out),
        nn.GELU(),
    )


class SkipFuse(nn.Module):
    """U-Net skip: bilinear up to the skip's size, 1×1 conv to its width, concatenate, conv.

    ``x (B, C_in, h, w)``, ``skip (B, C, H, W)`` → ``(B, C, H, W)`` (conv 3×3 → GroupNorm →
    GELU over the ``2C`` concatenated channels).
    """

    def __init__(self, c_in: int, c: int):
        super().__init__()
        self.proj = nn.Conv2d(c_in, c, 1)
        self.fuse = _conv_norm_act(2 * c, c)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([self.proj(x), skip], dim=1))


class UNetHRDecoder(UNetDecoder):
    """:class:`UNetDecoder` plus a light full-resolution path from the input image.

    The backbone's stem has stride 4, so with the plain decoder nothing at strides 1 and 2 sees
    the image and structures a few pixels wide are lost. Here a small conv stem on the
    normalised image gives ``s1 (B, 16, H, W)`` (stride 1) and ``s2 (B, 32, H/2, W/2)``
    (stride 2); the decoded stride-4 map ``(B, in_dims[0], H/4, W/4)`` is fused with ``s2``
    then with ``s1`` (:class:`SkipFuse`: up ×2, concatenate, conv) before the 1×1 head:
    ``forward(feats, image (B, 1, H, W)) → (B, n_out, H, W)``.

    The head's bias starts at a foreground prior of :attr:`PRIOR` per class (RetinaNet's
    initialisation): a fresh decoder predicts background everywhere instead of 50 / 50, so the
    first optimiser steps go to the structures rather than to learning that most pixels are
    background (on small-structure phantoms the Dice loss did not move in 20 steps without it).

    :class:`Segmenter` passes the image to decoders whose ``wants_image`` is true.
    """

    wants_image = True
    HR_WIDTHS: tuple[int, int] = (16, 32)  # channels at strides 1 and 2
    PRIOR = 0.01  # initial foreground probability of each class

    def __init__(
        self, in_dims: list[int], n_out: int, block: Callable[[int], nn.Module] = ConvAttentionBlock
    ):
        super().__init__(in_dims, n_out, block)
        w1, w2 = self.HR_WIDTHS
        self.stem1 = _conv_norm_act(1, w1)
        self.stem2 = nn.Sequential(_conv_norm_act(w1, w2, stride=2), _conv_norm_act(w2, w2))
        self.fuse2 = SkipFuse(in_dims[0], w2)
        self.fuse1 = SkipFuse(w2, w1)
        self.head = nn.Conv2d(w1, n_out, 1)  # on the stride-1 map instead of the stride-4 one
        _prior_bias_(self.head.bias, self.PRIOR)

    def forward(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """``feats``: the backbone's 4 maps; ``image (B, 1, H, W)``, H and W divisible by 4."""
        s1 = self.stem1(image)
        s2 = self.stem2(s1)
        x = self.fuse2(self.decode_stride4(feats), s2)
        return self.head(self.fuse1(x, s1))


class UNetHRCDecoder(UNetHRDecoder):
    """:class:`UNetHRDecoder` with a richer stride-4 level, for small structures on a frozen
    pretrained backbone.

    The ``small-fast`` backbone's stride-4 map has 16 channels (VMamba's stem), a quarter of a
    plain U-Net's at that stride, and small structures live there. A trainable conv branch
    from the full-resolution path's stride-2 map down to stride 4 (:attr:`BRANCH_WIDTH`
    channels: conv 3×3 stride 2, conv 3×3) is concatenated with the backbone's stride-4 map, so
    the decoder's stride-4 level sees ``in_dims[0] + BRANCH_WIDTH`` channels:
    ``forward(feats, image (B, 1, H, W)) → (B, n_out, H, W)``.

    Trained with the pretrained backbone frozen (:attr:`FREEZE_BACKBONE`; ``finetune``'s
    ``freeze_backbone=None`` and ``propagate`` do so): on the small-structure phantoms that
    both steadied it (with the backbone trained, one seed in three lost a class) and bought
    30-40 % more steps per CPU-second (docs/benchmarks/small_structures.md).
    """

    BRANCH_WIDTH = 32
    FREEZE_BACKBONE = True

    def __init__(
        self, in_dims: list[int], n_out: int, block: Callable[[int], nn.Module] = ConvAttentionBlock
    ):
        super().__init__([in_dims[0] + self.BRANCH_WIDTH, *in_dims[1:]], n_out, block)
        w2, width = self.HR_WIDTHS[1], self.BRANCH_WIDTH
        self.branch4 = nn.Sequential(
            _conv_norm_act(w2, width, stride=2), _conv_norm_act(width, width)
        )

    def forward(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """``feats``: the backbone's 4 maps; ``image (B, 1, H, W)``, H and W divisible by 4."""
        s1 = self.stem1(image)
        s2 = self.stem2(s1)
        feats = [torch.cat([feats[0], self.branch4(s2)], dim=1), *feats[1:]]
        x = self.fuse2(self.decode_stride4(feats), s2)
        return self.head(self.fuse1(x, s1))


def trains_backbone_frozen(model: nn.Module) -> bool:
    """Whether a segmenter's decoder is meant to train over a frozen backbone
    (:attr:`UNetHRCDecoder.FREEZE_BACKBONE`)."""
    return bool(getattr(getattr(model, "decoder", None), "FREEZE_BACKBONE", False))


def _prior_bias_(bias: torch.Tensor, prior: float) -> None:
    """Set a head's bias ``(K,)`` so every foreground class starts at probability ``prior``:
    one sigmoid (``K = 1``): ``log(prior / (1 - prior))``; softmax: background
    ``log(1 / prior - K + 1)``, the others 0."""
    with torch.no_grad():
        if bias.numel() == 1:
            bias.fill_(math.log(prior / (1 - prior)))
        else:
            bias.zero_()
            bias[0] = math.log(1 / prior - bias.numel() + 1)


class VSSDecoder(UNetDecoder):
    """:class:`UNetDecoder` with channel-aware VSS blocks (OpenUS's segmentation decoder)."""

    def __init__(self, in_dims: list[int], n_out: int):
        super().__init__(in_dims, n_out, block=ChannelAwareVSSBlock)


class ConvDecoder(nn.Module):
    """Cheaper FPN-like decoder: 1×1 convs to ``width``, upsample to stride 4, sum, conv head."""

    def __init__(self, in_dims: list[int], n_out: int, width: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(d, width, 1) for d in in_dims)
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(_norm_groups(width), width),
            nn.GELU(),
            nn.Conv2d(width, n_out, 1),
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        x = sum(
            F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
            for lat, f in zip(self.lateral, feats)
        )
        x = self.fuse(x)
        return F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)


DECODERS: dict[str, type[nn.Module]] = {
    "unet": UNetDecoder,
    "unet-hr": UNetHRDecoder,
    "unet-hrc": UNetHRCDecoder,
    "conv": ConvDecoder,
    "vss": VSSDecoder,
}

#: ``decoder="auto"`` picks ``unet-hrc`` when the median foreground structure is narrower than
#: this many pixels at the model's input side: 4 cells of the stride-4 map that ``unet`` decodes
#: before its ×4 upsample, below which its masks lose small structures (small-structure
#: phantoms, median ≈ 9 px at 160²: ``unet`` 0-11 % Dice vs ``unet-hr`` 42-52 %, ``unet-hrc``
#: on the frozen backbone more; BUSI lesions and HC18 heads are several times wider and keep
#: ``unet``; docs/benchmarks/small_structures.md).
SMALL_STRUCTURE_PX = 16.0


def structure_widths(masks: Iterable[Any], input_size: int) -> list[float]:
    """Equivalent diameters (px at ``input_size``², i.e. ``2·sqrt(area / π)``) of the connected
    components of every foreground class in ``masks``: an iterable of integer ``(H, W)``
    masks (0 = background), each resized to ``input_size``² (nearest) first."""
    import cv2
    import numpy as np

    widths: list[float] = []
    for mask in masks:
        m = cv2.resize(
            np.asarray(mask).astype(np.uint8),
            (input_size, input_size),
            interpolation=cv2.INTER_NEAREST,
        )
        for value in np.unique(m[m > 0]):
            n, _, stats, _ = cv2.connectedComponentsWithStats((m == value).astype(np.uint8), 8)
            areas = stats[1:n, cv2.CC_STAT_AREA]
            widths += [float(2 * math.sqrt(a / math.pi)) for a in areas]
    return widths


def choose_decoder(masks: Iterable[Any], input_size: int) -> tuple[str, dict[str, Any]]:
    """The segmentation decoder for ``decoder="auto"``: ``unet-hrc`` when the median structure
    width of ``masks`` (:func:`structure_widths`) is under :data:`SMALL_STRUCTURE_PX`, else
    ``unet`` (also when the masks hold no foreground). Returns ``(name, evidence)`` with the
    median width, the component count and the threshold, to record with the model."""
    import numpy as np

    widths = structure_widths(masks, input_size)
    median = float(np.median(widths)) if widths else None
    name = "unet-hrc" if median is not None and median < SMALL_STRUCTURE_PX else "unet"
    return name, {
        "decoder": name,
        "median_width_px": None if median is None else round(median, 2),
        "n_structures": len(widths),
        "threshold_px": SMALL_STRUCTURE_PX,
        "input_size": input_size,
    }


class _TaskModel(nn.Module):
    """Shared plumbing: backbone, channel repeat, and the metadata saved with the model."""

    task = ""

    def __init__(self, backbone: nn.Module, n_classes: int, cfg: TaskModelConfig | None = None):
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.backbone = backbone
        self.n_classes = n_classes
        self.in_chans = _backbone_in_chans(backbone)
        self.classes: list[str] = list(cfg.classes) if cfg is not None else []
        self.input_size = int(cfg.input_size) if cfg is not None else 224

    @staticmethod
    def _resolve(
        backbone: nn.Module | TaskModelConfig, n_classes: int, head: str
    ) -> tuple[nn.Module, int, str, TaskModelConfig | None]:
        """``(backbone, n_classes, head, cfg)``; a :class:`TaskModelConfig` (the model being
        rebuilt by ``serialization.load_model``) supplies all of them and its backbone."""
        if isinstance(backbone, TaskModelConfig):
            return _backbone_from(backbone), backbone.n_classes, backbone.head, backbone
        return backbone, n_classes, head, None

    def _features(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"input must be (B, C, H, W) with H, W divisible by 32: {x.shape}")
        if x.shape[1] != self.in_chans:
            x = x.mean(1, keepdim=True).expand(-1, self.in_chans, -1, -1)
        return self.backbone(x)

    @property
    def head_name(self) -> str:
        return getattr(self, "head_type", None) or getattr(self, "decoder_type", "")

    @property
    def config(self) -> TaskModelConfig:
        """Current config (read by :func:`usfm_core.models.serialization.save_model`)."""
        return TaskModelConfig(
            backbone_type=_backbone_type(self.backbone),
            backbone_config=self.backbone.config.to_dict(),
            n_classes=self.n_classes,
            head=self.head_name,
            classes=list(self.classes),
            input_size=int(self.input_size),
        )

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (linear probe) or unfreeze the backbone's parameters."""
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)


class Classifier(_TaskModel):
    """Global token → linear layer. ``(B, 1, H, W) -> logits (B, n_classes)``."""

    task = "classification"

    def __init__(
        self, backbone: nn.Module | TaskModelConfig, n_classes: int = 2, head: str = "linear"
    ):
        backbone, n_classes, head, cfg = self._resolve(backbone, n_classes, head)
        super().__init__(backbone, n_classes, cfg)
        if head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")
        self.head_type = head
        dim = int(_backbone_dims(backbone)[-1])
        if head == "linear":
            self.head = nn.Linear(dim, n_classes)
        else:
            self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(x).global_token)


class Segmenter(_TaskModel):
    """Backbone + multi-scale decoder. ``(B, 1, H, W) -> logits (B, n_out, H, W)``.

    ``n_classes == 1`` is binary (one logit, sigmoid); otherwise ``n_classes`` softmax channels
    with 0 = background.
    """

    task = "segmentation"

    def __init__(
        self, backbone: nn.Module | TaskModelConfig, n_classes: int = 1, decoder: str = "unet"
    ):
        backbone, n_classes, decoder, cfg = self._resolve(backbone, n_classes, decoder)
        super().__init__(backbone, n_classes, cfg)
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {sorted(DECODERS)}, got {decoder!r}")
        self.decoder_type = decoder
        self.decoder = DECODERS[decoder]([int(d) for d in _backbone_dims(backbone)], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self._features(x).features, x)

    def decode(self, feats, x: torch.Tensor) -> torch.Tensor:
        """Decoder logits ``(B, n_out, H, W)`` from the backbone's 4 maps ``feats`` of the
        input ``x (B, C, H, W)``; a decoder whose ``wants_image`` is true (``unet-hr``) also
        gets the image as one channel ``(B, 1, H, W)`` (channel mean when ``C > 1``)."""
        if not getattr(self.decoder, "wants_image", False):
            return self.decoder(list(feats))
        image = x if x.shape[1] == 1 else x.mean(1, keepdim=True)
        return self.decoder(list(feats), image)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Label map ``(B, H, W)`` int64: threshold 0.5 (binary) or argmax (multi-class)."""
        logits = self(x)
        if self.n_classes == 1:
            return (logits[:, 0] > 0).long()
        return logits.argmax(1)


# ---------------------------------------------------------------------------- configs


@dataclass
class TaskModelConfig:
    """Everything that rebuilds a task model: backbone type + config, head, classes, size.

    ``backbone_type`` is a model type registered with :mod:`usfm_core.models.serialization`
    (``"vmamba"``, ``"vit"``), so ``load_model(dir)`` rebuilds backbone and head together.
    """

    backbone_type: str
    backbone_config: dict
    n_classes: int = 1
    head: str = "unet"
    classes: list[str] = field(default_factory=list)
    input_size: int = 224

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TaskModelConfig:
        """Inverse of :meth:`to_dict`, validated before anything is built: types and ranges
        from :data:`usfm_core.models.limits.TASK_FIELDS`, a registered *backbone* type (a task
        model cannot nest another) and a valid backbone config; :class:`ConfigError` names the
        field."""
        from usfm_core.models.limits import TASK_FIELDS, check_fields

        check_fields(
            data, TASK_FIELDS, "task config", required=("backbone_type", "backbone_config")
        )
        config = cls(**data)
        config.backbone_config_object()  # validates the nested backbone config
        return config

    def backbone_config_object(self):
        """The backbone's own config object (e.g. a ``VMambaConfig``), validated."""
        from usfm_core.errors import ConfigError
        from usfm_core.models import serialization
        from usfm_core.models.limits import plain_message

        registered = serialization._REGISTRY.get(self.backbone_type)
        if registered is None or self.backbone_type in MODEL_TYPES:
            backbones = [t for t in serialization.model_types() if t not in MODEL_TYPES]
            raise ConfigError(
                f"task config.backbone_type must be one of {backbones}, got {self.backbone_type!r}"
            )
        try:
            return registered[1].from_dict(dict(self.backbone_config))
        except ConfigError as exc:
            raise ConfigError(
                f"task config.backbone_config: {plain_message(exc)}", hint=exc.hint
            ) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"task config.backbone_config: {exc}") from None

    def estimate_params(self) -> int:
        """Parameters of the task model (backbone + head) from the config alone; the head is
        a classifier head for ``linear`` / ``mlp``, else a segmentation decoder."""
        from usfm_core.errors import ConfigError
        from usfm_core.models.serialization import _REGISTRY, estimate_params

        backbone = self.backbone_config_object()
        n = estimate_params(self.backbone_type, backbone)
        dims = getattr(backbone, "stage_dims", None) or [getattr(backbone, "dim", 0)]
        if not hasattr(backbone, "estimate_params"):  # a third-party backbone: ask it
            with torch.device("meta"):
                dims = list(getattr(_REGISTRY[self.backbone_type][0](backbone), "out_dims", []))
        k = self.n_classes
        if self.head in ("linear", "mlp"):
            d = dims[-1]
            return n + (d * d + d if self.head == "mlp" else 0) + d * k + k
        if len(dims) != 4:
            raise ConfigError(
                f"task config: a {self.head!r} decoder needs a backbone with 4 stages, "
                f"{self.backbone_type!r} has {len(dims)}"
            )
        return n + _decoder_params(self.head, dims, k)


def _conv_attention_params(c: int) -> int:
    """Parameters of :class:`ConvAttentionBlock` (two 3×3 convs, GroupNorms, gate)."""
    hidden = max(c // 8, 4)
    return 2 * (c * c * 9 + c) + 4 * c + (c * hidden + hidden + hidden * c + c)


def _decoder_params(head: str, dims: list[int], n_out: int) -> int:
    """Parameters of the decoder ``head`` over stage widths ``dims`` (mirrors DECODERS)."""
    if head == "conv":
        width = 64
        return (
            sum(d * width + width for d in dims)
            + width * width * 9
            + 3 * width
            + (width * n_out + n_out)
        )

    def block(c: int) -> int:
        if head != "vss":
            return _conv_attention_params(c)
        from usfm_core.models.vmamba import VMambaConfig, _vss_block_params

        return _vss_block_params(c, VMambaConfig(d_state=4)) + _conv_attention_params(c)

    n = block(dims[3]) + sum(block(dims[i]) for i in (2, 1, 0))
    n += sum(dims[i + 1] * dims[i] + dims[i] for i in (2, 1, 0))
    if head == "unet-hr":
        return n + _hr_path_params(dims[0], n_out)
    if head == "unet-hrc":
        width, w2 = UNetHRCDecoder.BRANCH_WIDTH, UNetHRCDecoder.HR_WIDTHS[1]
        branch = (w2 * width * 9 + 3 * width) + (width * width * 9 + 3 * width)
        return _decoder_params("unet-hr", [dims[0] + width, *dims[1:]], n_out) + branch
    return n + dims[0] * n_out + n_out


def _hr_path_params(c0: int, n_out: int) -> int:
    """Parameters of :class:`UNetHRDecoder`'s full-resolution path and head over a stride-4
    map of ``c0`` channels (stems, two :class:`SkipFuse`, 1×1 head)."""
    w1, w2 = UNetHRDecoder.HR_WIDTHS

    def conv(a: int, b: int) -> int:  # conv 3×3 + GroupNorm
        return a * b * 9 + b + 2 * b

    def fuse(c_in: int, c: int) -> int:
        return c_in * c + c + conv(2 * c, c)

    stems = conv(1, w1) + conv(w1, w2) + conv(w2, w2)
    return stems + fuse(c0, w2) + fuse(w2, w1) + w1 * n_out + n_out


def _backbone_from(config: TaskModelConfig) -> nn.Module:
    from usfm_core.models.serialization import build_model

    return build_model(config.backbone_type, config.backbone_config)


def _backbone_type(backbone: nn.Module) -> str:
    """The serialization type name of a backbone instance."""
    from usfm_core.models import serialization

    try:
        return serialization._type_of(backbone)
    except ValueError:
        raise CheckpointError(
            f"backbone {type(backbone).__name__} is not registered with serialization",
            hint="call usfm_core.models.serialization.register_model for it",
        ) from None


def build_backbone(preset: str = "tiny", kind: str = "vmamba") -> nn.Module:
    """A freshly initialised backbone from a named preset (the from-scratch baseline)."""
    if kind == "vmamba":
        from usfm_core.models.vmamba import VMamba, VMambaConfig

        return VMamba(VMambaConfig.preset(preset))
    if kind == "vit":
        from usfm_core.models.vit import ViT, ViTConfig

        return ViT(ViTConfig.preset(preset))
    raise ValueError(f"unknown backbone kind {kind!r}")


def build_like(backbone: nn.Module, seed: int | None = None) -> nn.Module:
    """A backbone of exactly ``backbone``'s type and config (depths, widths, drop-path, ...)
    with fresh random weights (seeded when ``seed`` is given): the from-scratch baseline that
    compares one architecture with its pretrained self."""
    from usfm_core.models.serialization import build_model

    if seed is not None:
        torch.manual_seed(seed)
    return build_model(_backbone_type(backbone), backbone.config.to_dict())


def load_backbone(ckpt_dir: str | Path) -> nn.Module:
    """The backbone inside a pretrained checkpoint folder (a bare backbone or a wrapper of one).

    ``ckpt_dir`` may be a model name (``usfm-core models``): a shipped or imported model of
    kind ``backbone``, or a fine-tuned model whose encoder is reused. A ``usfm-core pretrain``
    run folder is accepted too (its ``backbone/`` sub-folder is used), and a ``usfm-core
    finetune`` run folder (its ``model/``).

    Wrappers are unwrapped through ``.backbone``, ``.student`` / ``.encoder`` or
    ``.teacher`` attributes (a teacher-student pretrain model yields its teacher if present,
    as iBOT/DINO do for evaluation).
    """
    try:
        from usfm_core.models.serialization import load_model
    except ImportError as exc:  # pragma: no cover - depends on the models helper
        raise CheckpointError(
            "checkpoint loading is not available (models.serialization)", path=ckpt_dir
        ) from exc
    from usfm_core.models.zoo import resolve_model_dir

    ckpt_dir = resolve_model_dir(ckpt_dir)  # a path, or a shipped / user model's name
    for sub in ("backbone", "model"):  # a pretrain / finetune run folder: its saved model
        if (ckpt_dir / sub / "config.json").is_file() and not _is_model_folder(ckpt_dir):
            ckpt_dir = ckpt_dir / sub
            break
    model, _meta = load_model(ckpt_dir)
    for attr in ("teacher", "backbone", "encoder", "student"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            inner = getattr(inner, "backbone", inner)
            if hasattr(inner, "out_dims"):
                return inner
    if hasattr(model, "out_dims"):
        return model
    raise CheckpointError(
        "checkpoint holds no backbone with multi-scale outputs",
        path=ckpt_dir,
        hint="pass a pretrain run folder or a backbone folder",
    )


def _is_model_folder(folder: Path) -> bool:
    """True if ``folder/config.json`` is a saved model's (a run's config.json is not)."""
    from usfm_core.models.limits import read_json_file

    if not (folder / "config.json").is_file():
        return False
    try:
        meta = read_json_file(folder / "config.json")  # bounded: no RecursionError
    except CheckpointError:
        return False
    return isinstance(meta, dict) and "model_type" in meta


def _backbone_dims(backbone: nn.Module) -> list[int]:
    dims = getattr(backbone, "out_dims", None)
    if dims is None or len(dims) != 4:
        raise ValueError("backbone must expose .out_dims with 4 stage channel counts")
    return list(dims)


def _backbone_in_chans(backbone: nn.Module) -> int:
    for owner in (backbone, getattr(backbone, "config", None), getattr(backbone, "cfg", None)):
        for attr in ("in_chans", "in_channels"):
            val = getattr(owner, attr, None)
            if isinstance(val, int):
                return val
    return 1


def _norm_groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


# ---------------------------------------------------------------------------- save / load

MODEL_TYPES = {"segmenter": "segmentation", "classifier": "classification"}
FORMAT = "usfm-finetuned/1"


def _register() -> None:
    from usfm_core.models.serialization import register_model

    register_model("segmenter", Segmenter, TaskModelConfig)
    register_model("classifier", Classifier, TaskModelConfig)


_register()


def save_finetuned(
    model: Classifier | Segmenter, out_dir: str | Path, extra: dict | None = None
) -> Path:
    """Save with :func:`usfm_core.models.serialization.save_model` (atomic files).

    ``config.json`` also gets top-level ``"format": "usfm-finetuned/1"`` and ``"task"`` so
    :mod:`usfm_core.models.zoo` lists the folder as a segmentation / classification model.
    """
    import json

    from usfm_core.models.serialization import CONFIG_FILE, save_model
    from usfm_core.utils import atomic_write_text

    out = save_model(model, out_dir, extra=extra)
    meta = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
    meta.update(format=FORMAT, task=model.task)
    atomic_write_text(out / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return out


def load_finetuned(
    model_dir: str | Path, device: str = "cpu"
) -> tuple[Classifier | Segmenter, dict]:
    """Load a fine-tuned model folder (or a run folder holding ``model/``, or a model name).

    Returns ``(model in eval mode, meta)`` where ``meta["task"]`` is ``segmentation`` or
    ``classification``; anything else raises :class:`CheckpointError`.
    """
    from usfm_core.models.serialization import CONFIG_FILE, load_model
    from usfm_core.models.zoo import resolve_model_dir

    model_dir = resolve_model_dir(model_dir)  # a path, or a shipped / user model's name
    if not (model_dir / CONFIG_FILE).is_file() and (model_dir / "model" / CONFIG_FILE).is_file():
        model_dir = model_dir / "model"
    if not (model_dir / CONFIG_FILE).is_file():
        raise CheckpointError(
            "no config.json: not a fine-tuned model folder",
            path=model_dir,
            hint="pass the run folder written by `usfm-core finetune`",
        )
    model, meta = load_model(model_dir, device=device)
    kind = meta.get("model_type")
    if kind not in MODEL_TYPES:
        raise CheckpointError(
            f"holds a {kind!r} model, not a fine-tuned segmenter/classifier",
            path=model_dir,
            hint="fine-tune it first: usfm-core finetune",
        )
    meta["task"] = MODEL_TYPES[kind]
    # Inference options saved with the model (segment_frames reads them).
    extra = meta.get("extra") or {}
    model.tta = bool(extra.get("tta", False))
    model.infer_size = _infer_size(extra.get("infer_size"), model_dir)
    try:
        model.postprocess = PostProcess.from_dict(extra.get("postprocess"))
    except ConfigError as err:
        raise CheckpointError(
            str(err), path=model_dir, hint="fix or remove extra.postprocess in config.json"
        ) from err
    return model, meta


def _infer_size(value: Any, model_dir: Path) -> int | None:
    """A saved ``extra.infer_size`` (the square input side used at inference when it differs
    from the training ``input_size``; None: the same), checked: a positive multiple of 32."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 32:
        raise CheckpointError(
            f"extra.infer_size must be a positive multiple of 32, got {value!r}",
            path=model_dir,
            hint="fix or remove extra.infer_size in config.json",
        )
    return int(value)
