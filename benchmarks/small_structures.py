"""Small structures at equal CPU-seconds: ``unet`` vs ``unet-hr`` decoder vs a plain U-Net (#14).

Issue #14 item 2: on small structures with two foreground classes the ``small-fast``
segmenter (decoder ``unet``: nothing at strides 1 and 2 sees the image, the VMamba stem has
stride 4) lost far behind a plain U-Net at the same CPU budget. This benchmark trains, from
scratch and side by side in one process (one torch thread), three arms on the same items with
the same recipe and the same budget of CPU-seconds of training (``time.process_time()``,
batch loading and augmentation included):

* ``small-fast + unet``: the toolkit's segmenter as it was;
* ``small-fast + unet-hr``: the same with the full-resolution path (a conv stem on the image at
  strides 1 and 2 fused U-Net style before the head, :class:`UNetHRDecoder`);
* ``BasicUNet``: MONAI's plain U-Net (features 32-32-64-128-256-32, about 2 M parameters) or,
  without MONAI, its copy ``PlainUNet`` in ``benchmarks/unet_anchor.py``;
* ``basicunet-prior``: the same with its head bias at ``unet-hr``'s 1 % foreground prior (so
  that the new decoder's initialisation is not what the comparison measures);
* ``unet-pre`` / ``unet-hr-pre``: the toolkit's segmenters started as a user's fine-tune starts,
  from the shipped ``openus-small-fast`` backbone (fresh decoder), same recipe and budget;
* ``unet-hrw-pre``: a prototype (benchmark only) of a wider full-resolution path, shaped like
  BasicUNet's top level: 32 channels at strides 1 and 2, two convs in each stem and after the
  stride-1 fusion (:class:`WideHRDecoder`), from the shipped backbone;
* ``unet-hrc-pre``: ``unet-hr`` plus a trainable 32-channel conv branch to stride 4 beside the
  VMamba stem's 16 channels (:func:`conv4_hr_decoder`: the product's ``unet-hrc`` decoder);
* ``unet-hrb-pre``: a prototype with BasicUNet's own top two levels (32 channels, two convs,
  instance norm, LeakyReLU) under the VMamba features (:func:`basic_hr_decoder`);
* ``unet-hrn-pre``: a prototype of a narrower full-resolution path (8 and 16 channels at strides
  1 and 2 instead of 16 and 32), for more steps per CPU-second (:func:`narrow_hr_decoder`);
* ``unet-hr-pre-mfb``: ``unet-hr-pre`` with the cross-entropy term class-weighted by median
  frequency balancing (Eigen & Fergus 2015: weight_c = median_f / f_c over the training masks'
  pixel frequencies), a benchmark-only test of the class-collapse diagnosis; ``-sqrtfb``: the
  gentler square root of those weights (any arm + ``-sqrtfb``: the same weighting on that arm,
  e.g. ``basicunet-prior-sqrtfb`` as the control, ``unet-hrw-pre-sqrtfb``);
* ``-fastdec`` (any ``-pre`` arm): the fresh decoder and head at :data:`FAST_DECODER` × the
  recipe's learning rate, the pretrained backbone at the recipe's;
* recipe suffixes on any arm: ``-bs4`` (batch 4 instead of 8: more, smaller steps in the same
  CPU-seconds), ``-warm`` (linear warm-up over the first 10 % of the budget), ``-frozen`` (the
  backbone's parameters fixed), ``-thaw`` (frozen until half the budget, then the backbone at
  0.1 × the learning rate). ``unet-hrc-pre-sqrtfb-frozen`` is what ``usfm-core finetune
  --decoder auto`` now does for small structures from the shipped backbone: ``unet-hrc-pre``
  builds the product's :class:`~usfm_core.finetune.models.UNetHRCDecoder` (first measured as a
  benchmark prototype with the same modules and initial weights), which trains over the frozen
  backbone (``tests/test_unet_hr_decoder.py`` checks the arm against the product model);
* ``unet-hr-pre-slowbb``: ``unet-hr-pre`` with the pretrained backbone's learning rate at
  :data:`SLOW_BACKBONE` × the recipe's (``usfm-core finetune --backbone-lr-scale``), the fresh
  decoder at the full rate.

Tasks (input 160²): ``phantoms``: simulator frames with three to five small cysts and
echogenic masses (mean radius 0.8–2 mm, 3–8 px;
:func:`usfm_core.sim.structures.simulate_small_structures`), two foreground classes, 100
training frames and 50 held-out frames of other seeds; ``phantoms-dev``: the same kind of
set from another simulator seed, for choosing recipe changes (``phantoms`` stays the report);
``busi``: BUSI lesions (binary), trained on the shipped ``breast-lesion`` model's train split
and scored on its validation split (the test split is never read). Recipe: AdamW lr 2e-3,
weight decay 5e-2, cosine schedule over the CPU budget, batch 8, soft Dice + cross-entropy,
``usfm-core finetune``'s augmentation; the last weights are scored by ``usfm-core evaluate``'s
scorer (native resolution, per-class Dice with empty ground truth ignored, mean over classes).
``segment_256_s`` is the CPU time of one 256² frame through the network (median of 5, one
thread).

    python benchmarks/small_structures.py --smoke          # ~1 CPU-min: tiny sets, 64², 3 s
    python benchmarks/small_structures.py                  # full: 2 tasks × 3 arms × 2 seeds

Results go to ``benchmarks/results/small_structures.json`` after every run (a re-run skips
the runs already there; ``--fresh`` starts over); ``--smoke`` writes
``small_structures_smoke.json``. Two processes must not share one ``--out``: run them with
their own ``--out`` and fold those files in with ``--merge A.json B.json``.
``docs/benchmarks/small_structures.md`` holds the reading.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
ARMS = (
    "unet",
    "unet-hr",
    "basicunet",
    "basicunet-prior",
    "unet-pre",
    "unet-hr-pre",
    "unet-hr-pre-slowbb",
    "unet-hrw-pre",
    "unet-hr-pre-mfb",
    "unet-hr-pre-sqrtfb",
    "unet-hrw-pre-sqrtfb",
    "basicunet-prior-sqrtfb",
    "unet-hr-pre-bd",
    "unet-hr-pre-sqrtfb-bd",
    "basicunet-prior-bd",
    "unet-hrn-pre-sqrtfb",
    "unet-hr-pre-sqrtfb-fastdec",
    "unet-hrb-pre-sqrtfb",
    "unet-hrc-pre-sqrtfb",
    "unet-hr-pre-sqrtfb-bs4",
    "unet-hr-pre-sqrtfb-warm",
    "unet-hr-pre-sqrtfb-frozen",
    "unet-hrb-pre-sqrtfb-frozen",
    "unet-hrc-pre-sqrtfb-frozen",
    "unet-hr-pre-sqrtfb-frozen-bs4",
    "unet-hrc-pre-sqrtfb-frozen-bs4",
    "basicunet-prior-bs4",
    "unet-hrc-pre-sqrtfb-bs4",
    "unet-hrc-pre-sqrtfb-thaw",
)
SMALL_BATCH = 4  # batch size of the ``-bs4`` arms (the recipe's 8 otherwise)
WARMUP = 0.1  # ``-warm``: linear warm-up over this fraction of the CPU budget, then the cosine
THAW_AT, THAW_LR = 0.5, 0.1  # ``-thaw``: backbone frozen until this budget fraction, then × lr
FAST_DECODER = 3.0  # decoder / head learning-rate scale of the ``-fastdec`` arm
SLOW_BACKBONE = 0.1  # backbone learning-rate scale of the ``-slowbb`` arm
# The ``-pre`` arms start from this shipped backbone instead of a random one (what a user's
# fine-tune does); everything else is the same recipe.
PRETRAINED = "openus-small-fast"
TASKS = ("phantoms", "busi", "phantoms-dev")
RECIPE = {"lr": 2e-3, "weight_decay": 5e-2, "batch_size": 8, "input_size": 160}
PHANTOMS = {"n_train": 100, "n_heldout": 50, "seed": 0}
PHANTOMS_DEV_SEED = 100_000  # dev frames use seeds 100000+ (frame i: seed + i; the report 0-149)
SMOKE = {"n_train": 8, "n_heldout": 4, "input_size": 64, "batch_size": 4, "budget_s": 3.0}


@functools.cache
def _anchor_module():
    """``benchmarks/unet_anchor.py`` (the plain U-Net, the BUSI split, ``machine()``), loaded
    once per process."""
    spec = importlib.util.spec_from_file_location(
        "unet_anchor_for_small", ROOT / "benchmarks" / "unet_anchor.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Net(nn.Module):
    """A network with the attributes ``usfm-core evaluate``'s scorer reads: ``(B, 1, S, S)``
    normalised frames → ``(B, n_out, S, S)`` logits (``n_classes`` 1 = one sigmoid)."""

    task = "segmentation"

    def __init__(
        self, net: nn.Module, n_classes: int, input_size: int, backbone_lr_scale: float = 1.0
    ):
        super().__init__()
        self.net, self.n_classes, self.input_size, self.classes = net, n_classes, input_size, []
        self.backbone_lr_scale = backbone_lr_scale
        self.balanced_ce = 0.0  # -mfb / -sqrtfb: CE weights = median-frequency weights ** this
        self.batch_dice = False  # -bd: one soft Dice per class over the batch
        self.decoder_lr_scale = 1.0  # -fastdec: everything but the backbone at lr × this
        self.batch_size: int | None = None  # -bs4: this batch size instead of the recipe's
        self.warmup = 0.0  # -warm: linear warm-up over this fraction of the budget
        self.thaw_at: float | None = None  # -thaw: unfreeze the backbone at this budget fraction

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """AdamW groups: the net's ``backbone`` (if any) at ``lr × backbone_lr_scale``, the
        rest at ``lr × decoder_lr_scale``; each group keeps its scale as ``lr_scale`` for the
        schedule."""
        backbone = getattr(self.net, "backbone", None)
        if backbone is None or self.backbone_lr_scale == self.decoder_lr_scale == 1.0:
            return [{"params": list(self.parameters()), "lr": lr, "lr_scale": 1.0}]
        ids = {id(p) for p in backbone.parameters()}
        rest = [p for p in self.parameters() if id(p) not in ids]
        scale, fast = self.backbone_lr_scale, self.decoder_lr_scale
        return [
            {"params": list(backbone.parameters()), "lr": lr * scale, "lr_scale": scale},
            {"params": rest, "lr": lr * fast, "lr_scale": fast},
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def wide_hr_decoder(in_dims: list[int], n_out: int) -> nn.Module:
    """The ``unet-hrw-pre`` prototype: :class:`~usfm_core.finetune.models.UNetHRDecoder` with
    32 channels at strides 1 and 2 and two 3×3 convs in each stem and after the stride-1 fusion
    (BasicUNet's top level has two 32-channel convs down and two up)."""
    from usfm_core.finetune.models import UNetHRDecoder, _conv_norm_act, _prior_bias_

    class WideHRDecoder(UNetHRDecoder):
        HR_WIDTHS = (32, 32)

        def __init__(self, in_dims: list[int], n_out: int):
            super().__init__(in_dims, n_out)
            w1, _ = self.HR_WIDTHS
            self.stem1 = nn.Sequential(_conv_norm_act(1, w1), _conv_norm_act(w1, w1))
            self.post1 = _conv_norm_act(w1, w1)
            _prior_bias_(self.head.bias, self.PRIOR)

        def forward(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
            s1 = self.stem1(image)
            s2 = self.stem2(s1)
            x = self.fuse2(self.decode_stride4(feats), s2)
            return self.head(self.post1(self.fuse1(x, s1)))

    return WideHRDecoder(in_dims, n_out)


def narrow_hr_decoder(in_dims: list[int], n_out: int) -> nn.Module:
    """The ``unet-hrn-pre`` prototype: :class:`~usfm_core.finetune.models.UNetHRDecoder` with
    half the channels at strides 1 and 2 (8, 16 instead of 16, 32): the two skip fusions at
    strides 1 and 2 are ~70 % of the decoder's multiply-adds at 160², so this buys steps."""
    from usfm_core.finetune.models import UNetHRDecoder

    class NarrowHRDecoder(UNetHRDecoder):
        HR_WIDTHS = (8, 16)

    return NarrowHRDecoder(in_dims, n_out)


def basic_hr_decoder(in_dims: list[int], n_out: int) -> nn.Module:
    """The ``unet-hrb-pre`` prototype: the toolkit's stride-4 U-Net decoder on the VMamba
    features, under BasicUNet's own top two levels: at strides 1 and 2 two 3×3 convs of 32
    channels each with instance norm and LeakyReLU (MONAI's defaults), max-pool down, and after
    each fusion (bilinear up, 1×1 to 32, concatenate) two more such convs; 1×1 head."""
    from torch.nn import functional as F

    from usfm_core.finetune.models import UNetHRDecoder, _prior_bias_

    def two_convs(c_in: int, c: int) -> nn.Sequential:
        return nn.Sequential(
            *(
                m
                for i in range(2)
                for m in (
                    nn.Conv2d(c_in if i == 0 else c, c, 3, padding=1),
                    nn.InstanceNorm2d(c, affine=True),
                    nn.LeakyReLU(0.1),
                )
            )
        )

    class BasicHRDecoder(UNetHRDecoder):
        def __init__(self, in_dims: list[int], n_out: int):
            super().__init__(in_dims, n_out)
            w = 32
            self.stem1 = two_convs(1, w)
            self.stem2 = nn.Sequential(nn.MaxPool2d(2), two_convs(w, w))
            self.proj2, self.proj1 = nn.Conv2d(in_dims[0], w, 1), nn.Conv2d(w, w, 1)
            self.fuse2, self.fuse1 = two_convs(2 * w, w), two_convs(2 * w, w)
            self.head = nn.Conv2d(w, n_out, 1)
            _prior_bias_(self.head.bias, self.PRIOR)

        def forward(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
            s1 = self.stem1(image)
            s2 = self.stem2(s1)
            x = F.interpolate(self.decode_stride4(feats), size=s2.shape[-2:], mode="bilinear")
            x = self.fuse2(torch.cat([self.proj2(x), s2], 1))
            x = F.interpolate(x, size=s1.shape[-2:], mode="bilinear")
            return self.head(self.fuse1(torch.cat([self.proj1(x), s1], 1)))

    return BasicHRDecoder(in_dims, n_out)


def conv4_hr_decoder(in_dims: list[int], n_out: int) -> nn.Module:
    """The ``unet-hrc-pre`` arm's decoder: the product's
    :class:`~usfm_core.finetune.models.UNetHRCDecoder` (``unet-hr`` plus a trainable 32-channel
    conv branch from the stride-2 stem to stride 4). It began here as a prototype of the same
    modules, created in the same order, so the runs made with it start from the same weights."""
    from usfm_core.finetune.models import UNetHRCDecoder

    return UNetHRCDecoder(in_dims, n_out)


# Decoders under the shipped backbone (prototypes, and the product's unet-hrc): arm → (builder,
# description).
PROTOTYPE_DECODERS = {
    "unet-hrw-pre": (wide_hr_decoder, "wide unet-hr"),
    "unet-hrn-pre": (narrow_hr_decoder, "narrow unet-hr"),
    "unet-hrb-pre": (basic_hr_decoder, "BasicUNet-top"),
    "unet-hrc-pre": (conv4_hr_decoder, "unet-hr + stride-4 conv branch"),
}


def build_arm(arm: str, n_classes: int, input_size: int, seed: int) -> tuple[Net, str]:
    """The arm's network, freshly initialised from ``seed``; returns it and a description."""
    from usfm_core.finetune.models import Segmenter, build_backbone

    if arm.endswith("-fastdec"):  # the fresh decoder at FAST_DECODER × the recipe's rate
        model, what = build_arm(arm.removesuffix("-fastdec"), n_classes, input_size, seed)
        model.decoder_lr_scale = FAST_DECODER
        return model, what + f", decoder lr x{FAST_DECODER:g}"
    if arm.endswith("-bs4"):  # more, smaller steps in the same CPU-seconds
        model, what = build_arm(arm.removesuffix("-bs4"), n_classes, input_size, seed)
        model.batch_size = SMALL_BATCH
        return model, what + f", batch {SMALL_BATCH}"
    if arm.endswith("-warm"):  # linear warm-up before the cosine
        model, what = build_arm(arm.removesuffix("-warm"), n_classes, input_size, seed)
        model.warmup = WARMUP
        return model, what + f", linear warm-up over {WARMUP:.0%} of the budget"
    if arm.endswith("-thaw"):  # frozen first, then the backbone at THAW_LR × the rate
        model, what = build_arm(arm.removesuffix("-thaw") + "-frozen", n_classes, input_size, seed)
        model.thaw_at, model.backbone_lr_scale = THAW_AT, THAW_LR
        return model, what + f" until {THAW_AT:.0%} of the budget, then at lr x{THAW_LR:g}"
    if arm.endswith("-frozen"):  # the pretrained backbone frozen: no backward through it
        model, what = build_arm(arm.removesuffix("-frozen"), n_classes, input_size, seed)
        model.net.set_backbone_trainable(False)
        return model, what + ", backbone frozen"
    if arm.endswith("-bd"):  # soft Dice over the whole batch instead of per image
        model, what = build_arm(arm.removesuffix("-bd"), n_classes, input_size, seed)
        model.batch_dice = True
        return model, what + ", batch soft Dice"
    for suffix, power in (("-sqrtfb", 0.5), ("-mfb", 1.0)):
        if arm.endswith(suffix):  # class-weighted cross-entropy on top of the base arm
            model, what = build_arm(arm.removesuffix(suffix), n_classes, input_size, seed)
            model.balanced_ce = power
            return model, what + f", cross-entropy weighted by (median frequency)^{power:g}"
    torch.manual_seed(seed)
    n_out = n_classes
    if arm in ("unet", "unet-hr"):
        net: nn.Module = Segmenter(build_backbone("small-fast"), n_classes, arm)
        what = f"VMamba small-fast (scratch) + {arm} decoder"
    elif arm in PROTOTYPE_DECODERS:  # the shipped backbone under a prototype decoder
        from usfm_core.finetune.models import _backbone_dims, load_backbone
        from usfm_core.models.zoo import find_model

        make, name = PROTOTYPE_DECODERS[arm]
        net = Segmenter(load_backbone(find_model(PRETRAINED).path), n_classes, "unet-hr")
        torch.manual_seed(seed)
        net.decoder = make([int(d) for d in _backbone_dims(net.backbone)], n_classes)
        what = f"VMamba small-fast from the shipped {PRETRAINED} backbone + {name} (proto)"
    elif arm in ("unet-pre", "unet-hr-pre", "unet-hr-pre-slowbb"):
        from usfm_core.finetune.models import load_backbone
        from usfm_core.models.zoo import find_model

        decoder = arm.split("-pre")[0]
        net = Segmenter(load_backbone(find_model(PRETRAINED).path), n_classes, decoder)
        what = f"VMamba small-fast from the shipped {PRETRAINED} backbone + {decoder} decoder"
        if arm.endswith("-slowbb"):
            what += f", backbone lr x{SLOW_BACKBONE:g}"
            return Net(net, n_classes, input_size, backbone_lr_scale=SLOW_BACKBONE), what
    elif arm in ("basicunet", "basicunet-prior"):
        anchor = _anchor_module()
        if anchor.monai_version():
            from monai.networks.nets import BasicUNet

            net = BasicUNet(
                spatial_dims=2, in_channels=1, out_channels=n_out, features=anchor.FEATURES
            )
            what = f"MONAI {anchor.monai_version()} BasicUNet"
        else:
            net, what = anchor.PlainUNet(out_channels=n_out), "PlainUNet (BasicUNet's copy)"
        if arm == "basicunet-prior":  # the same foreground-prior head bias as unet-hr's
            from usfm_core.finetune.models import UNetHRDecoder, _prior_bias_

            _prior_bias_(net.final_conv.bias, UNetHRDecoder.PRIOR)
            what += f", head bias at a {UNetHRDecoder.PRIOR:g} foreground prior"
    else:
        raise SystemExit(f"unknown arm {arm!r}: one of {ARMS}")
    return Net(net, n_classes, input_size), what


# ---------------------------------------------------------------------------------- data
def phantom_set(work: Path, n_train: int, n_heldout: int, size: int, seed: int = 0):
    """Small-structure phantoms of simulator ``seed`` as a labelled folder under ``work``
    (written once): ``(LabelledSet, {"train": [...], "heldout": [...]})``."""
    from usfm_core.finetune.data import LabelledSet
    from usfm_core.sim.structures import write_structures_folder

    n = n_train + n_heldout
    folder = work / f"phantoms_small_{size}_{n}{f'_seed{seed}' if seed else ''}"
    if not (folder / "manifest.csv").is_file():
        write_structures_folder(folder, n, size, seed=seed, test_fraction=n_heldout / n, small=True)
    data = LabelledSet.from_folder(folder, "segmentation")
    data.resolve_mask_classes()
    train = [i for i, it in enumerate(data.items) if it.split != "test"]
    heldout = [i for i, it in enumerate(data.items) if it.split == "test"]
    return data, {"train": train, "heldout": heldout}


def busi_set(shared: Path, work: Path):
    """BUSI lesions on the shipped ``breast-lesion`` split: train, and its val split as the
    held-out part (the test split is left alone)."""
    data, splits = _anchor_module().load_task("breast-lesion", shared, work)
    return data, {"train": splits["train"], "heldout": splits["val"]}


# ------------------------------------------------------------------------------ training
def train_budget(
    model: Net, data, indices: list[int], *, seed: int, budget_s: float, batch_size: int
) -> dict[str, Any]:
    """Train ``model`` until ``budget_s`` CPU-seconds of this process have passed
    (``time.process_time()``; batches, augmentation, forward, backward, step), the learning
    rate following a cosine over the budget. The dataset cache is filled before the clock
    starts. Returns ``{"steps", "cpu_s", "wall_s", "cpu_s_per_step", "final_loss"}``."""

    from usfm_core.finetune.data import SupervisedDataset, training_loader
    from usfm_core.finetune.train import (
        median_frequency_weights,
        segmentation_loss,
    )

    torch.manual_seed(seed)
    ds = SupervisedDataset(data, indices, "segmentation", model.input_size, augment=True, seed=seed)
    for i in range(len(ds)):
        ds._load(i)  # decode + resize once, outside the budget
    loader = training_loader(ds, model.batch_size or batch_size, seed)
    weights = None
    if model.balanced_ce and model.n_classes > 1:  # binary masks: one sigmoid, no CE weights
        # the product's weights (``usfm-core finetune``'s default for several structures)
        masks = (ds._load(i)[1] for i in range(len(ds)))
        weights = median_frequency_weights(masks, model.n_classes, model.balanced_ce)
    groups = [  # a frozen backbone's group stays only if it is thawed later
        {**g, "params": [p for p in g["params"] if p.requires_grad or model.thaw_at]}
        for g in model.param_groups(RECIPE["lr"])
    ]
    opt = torch.optim.AdamW(groups, weight_decay=RECIPE["weight_decay"])
    model.train()
    steps, losses, cpu0, wall0 = 0, [], time.process_time(), time.perf_counter()
    while True:
        for x, y in loader:
            used = time.process_time() - cpu0
            if used >= budget_s:
                break
            if model.thaw_at and used >= model.thaw_at * budget_s:
                model.thaw_at = None
                model.net.set_backbone_trainable(True)
            for group in opt.param_groups:
                cosine = 0.5 * (1 + math.cos(math.pi * used / budget_s))
                if model.warmup:
                    cosine *= min(1.0, used / (model.warmup * budget_s))
                group["lr"] = RECIPE["lr"] * group["lr_scale"] * cosine
            logits = model(x)
            loss = segmentation_loss(logits, y, weights, batch_dice=model.batch_dice)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            losses.append(float(loss.detach()))
        else:
            continue
        break
    cpu = time.process_time() - cpu0
    return {
        "steps": steps,
        "cpu_s": round(cpu, 1),
        "wall_s": round(time.perf_counter() - wall0, 1),
        "cpu_s_per_step": round(cpu / max(steps, 1), 3),
        "final_loss": round(float(np.mean(losses[-10:])), 4) if losses else None,
    }


@torch.no_grad()
def segment_cpu_s(model: Net, side: int = 256, repeats: int = 5) -> float:
    """Median CPU-seconds of one ``side²`` frame through ``model`` (after one warm-up)."""
    model.eval()
    x = torch.randn(1, 1, side, side)
    model(x)
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        model(x)
        times.append(time.process_time() - c0)
    return round(statistics.median(times), 4)


def score(model: Net, data, indices: list[int]) -> dict[str, Any]:
    """``usfm-core evaluate``'s metrics on ``indices``, reduced to Dice: mean over classes,
    per class, and the failure count (image Dice < 0.5)."""
    from usfm_core.evaluate.report import score_items

    full = score_items(model, data, indices, batch_size=8)
    return {
        "dice": full["dice"],
        "per_class": {k: v["dice"] for k, v in (full.get("per_class") or {}).items()},
        "n_scored": full.get("n_scored"),
        "n_dice_below_0.5": full.get("n_dice_below_0.5"),
    }


# ------------------------------------------------------------------------------- reports
def summary(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {arm: {dice_mean, dice_std, seeds, per_class, steps, cpu_s_per_step,
    segment_256_s}}}`` over the runs made with the current budget and learning rate."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    budget, lr = results["recipe"]["budget_cpu_s"], results["recipe"]["lr"]
    for run in results["runs"].values():
        if run.get("budget_cpu_s") != budget or run.get("lr", 5e-4) != lr:
            continue
        out.setdefault(run["task"], {}).setdefault(run["arm"], []).append(run)  # type: ignore[arg-type]
    for arms in out.values():
        for arm, runs in list(arms.items()):
            dice = [r["test"]["dice"] for r in runs]
            classes = sorted({c for r in runs for c in r["test"]["per_class"]})
            arms[arm] = {
                "seeds": sorted(r["seed"] for r in runs),
                "dice_mean": float(np.mean(dice)),
                "dice_std": float(np.std(dice)),
                "dice_by_seed": {str(r["seed"]): r["test"]["dice"] for r in runs},
                "per_class": {
                    c: float(np.nanmean([r["test"]["per_class"].get(c, np.nan) for r in runs]))
                    for c in classes
                },
                "steps": float(np.mean([r["train"]["steps"] for r in runs])),
                "cpu_s": float(np.mean([r["train"]["cpu_s"] for r in runs])),
                "cpu_s_per_step": float(np.mean([r["train"]["cpu_s_per_step"] for r in runs])),
                "segment_256_s": float(np.median([r["segment_256_s"] for r in runs])),
                "params": runs[0]["params"],
            }
    return out


def table(results: dict[str, Any]) -> list[str]:
    """Markdown rows: per task and arm, Dice mean ± std over seeds and per class, steps."""
    lines = [
        "| task | arm | params | seeds | Dice (mean ± std) | per class | train CPU-s | steps "
        "| CPU-s / step | Segment 256² (CPU-s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, arms in summary(results).items():
        for arm in ARMS:
            s = arms.get(arm)
            if s is None:
                continue
            per = ", ".join(f"{c} {100 * v:.1f}" for c, v in s["per_class"].items())
            lines.append(
                f"| {task} | {arm} | {s['params'] / 1e6:.2f} M | {len(s['seeds'])} "
                f"| {100 * s['dice_mean']:.1f} ± {100 * s['dice_std']:.1f} | {per} "
                f"| {s['cpu_s']:.0f} | {s['steps']:.0f} | {s['cpu_s_per_step']:.2f} "
                f"| {s['segment_256_s']:.3f} |"
            )
    return lines


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", choices=TASKS, help=f"default: {' '.join(TASKS)}")
    ap.add_argument("--arms", nargs="+", choices=ARMS, help=f"default: {' '.join(ARMS[:3])}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budget", type=float, default=100.0, help="CPU-seconds of training")
    ap.add_argument("--lr", type=float, default=RECIPE["lr"], help="peak learning rate")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=ROOT / "work" / "small_structures")
    ap.add_argument("--out", type=Path, help="results JSON (default by mode)")
    ap.add_argument("--smoke", action="store_true", help="tiny sets, 64², 3 CPU-s per run")
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in --out")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        help="results JSONs of runs made in parallel (--out elsewhere) to merge into --out; "
        "a run re-measured there replaces the one in --out (kept under 'superseded'); "
        "with --merge and no --tasks / --arms nothing is trained",
    )
    args = ap.parse_args(argv)
    merge_only = bool(args.merge) and args.tasks is None and args.arms is None
    args.tasks = args.tasks or list(TASKS)
    args.arms = args.arms or list(ARMS[:3])
    if args.smoke:
        args.seeds = args.seeds[:1]
    torch.set_num_threads(args.threads)
    RECIPE["lr"] = args.lr
    from usfm_core.utils import atomic_write_text

    anchor = _anchor_module()
    size = SMOKE["input_size"] if args.smoke else RECIPE["input_size"]
    batch = SMOKE["batch_size"] if args.smoke else RECIPE["batch_size"]
    budget = SMOKE["budget_s"] if args.smoke else args.budget
    name = "small_structures_smoke.json" if args.smoke else "small_structures.json"
    out = args.out or RESULTS_DIR / name
    results: dict[str, Any] = {}
    if out.is_file() and not args.fresh:
        results = json.loads(out.read_text())
    results.update(
        benchmark="small_structures",
        mode="smoke" if args.smoke else "full",
        recipe={**RECIPE, "input_size": size, "batch_size": batch, "budget_cpu_s": budget},
        machine=results.get("machine") or anchor.machine(),
    )
    runs = results.setdefault("runs", {})
    for other in args.merge:  # a re-measured run replaces the older one, which is kept aside
        for key, run in json.loads(other.read_text())["runs"].items():
            if key in runs and runs[key] != run:
                results.setdefault("superseded", {}).setdefault(key, []).append(runs[key])
            runs[key] = run
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["machine_last"] = anchor.machine()
        atomic_write_text(out, json.dumps(results, indent=1))

    if merge_only:
        save()
        print(f"merged {len(args.merge)} file(s) into {out}: {len(runs)} runs")
        return 0

    for task in args.tasks:
        if task in ("phantoms", "phantoms-dev"):
            n = SMOKE if args.smoke else PHANTOMS
            seed0 = PHANTOMS_DEV_SEED if task == "phantoms-dev" else PHANTOMS["seed"]
            data, splits = phantom_set(args.work, n["n_train"], n["n_heldout"], size, seed0)
            n_classes = 3
        else:
            data, splits = busi_set(args.shared, args.work)
            if args.smoke:
                splits = {k: v[: SMOKE[f"n_{k}"]] for k, v in splits.items()}
            n_classes = 1
        for seed in args.seeds:
            for arm in args.arms:
                key = f"{task}/{arm}/{seed}/{budget:g}/lr{args.lr:g}"
                if key in runs:
                    print(f"{key}: done before, kept")
                    continue
                model, what = build_arm(arm, n_classes, size, seed)
                print(f"{key}: training {what}", flush=True)
                train = train_budget(
                    model, data, splits["train"], seed=seed, budget_s=budget, batch_size=batch
                )
                test = score(model, data, splits["heldout"])
                runs[key] = {
                    "task": task,
                    "arm": arm,
                    "seed": seed,
                    "budget_cpu_s": budget,
                    "lr": args.lr,
                    "what": what,
                    "params": sum(p.numel() for p in model.parameters()),
                    "n_train": len(splits["train"]),
                    "n_heldout": len(splits["heldout"]),
                    "train": train,
                    "test": test,
                    "segment_256_s": segment_cpu_s(model),
                    "uptime": anchor.machine()["uptime"],
                }
                print(
                    f"{key}: held-out Dice {test['dice']:.3f} after {train['steps']} steps "
                    f"({train['cpu_s']} CPU-s, {train['wall_s']} wall-s)",
                    flush=True,
                )
                save()
    results["summary"] = summary(results)
    save()
    print("\n".join(table(results)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
