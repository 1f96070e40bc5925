"""``usfm-core finetune``: label-efficient fine-tuning of a (pretrained) backbone.

One run per (label ratio, seed); with several, each goes to ``RUN/r<ratio>_s<seed>/`` and
``RUN/summary.json`` holds the mean ± std of the validation / test metrics per ratio.

Splits: ``--splits FILE`` (a ``splits.json``), else the manifest's ``split`` column
(train / val / test), else a grouped, stratified 70/15/15 split; the rule is recorded with the
model. Segmentation classes come from ``classes.json`` / the manifest's ``classes`` column /
the mask values: several structures train a softmax segmenter selected on the validation mean
per-class Dice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` sub-command."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a backbone for segmentation or classification (label-efficient)",
        description=__doc__,
    )
    p.add_argument(
        "--task",
        choices=["seg", "cls"],
        required=True,
        help="seg = segmentation (Dice+CE), cls = classification (CE)",
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder with manifest.csv (image, mask/label, optional group)",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument(
        "--backbone",
        type=Path,
        default=None,
        help="pretrained checkpoint folder (default: train from scratch)",
    )
    p.add_argument("--preset", default="tiny", help="backbone preset when training from scratch")
    p.add_argument(
        "--from-scratch-like",
        metavar="BACKBONE",
        default=None,
        help="train from random weights with exactly this backbone's architecture and config "
        "(model name or folder): the scratch baseline of --backbone BACKBONE",
    )
    p.add_argument(
        "--splits",
        type=Path,
        default=None,
        help='splits.json ({"train": [image paths], "val": [...], "test": [...]}, or a run\'s); '
        "default: the manifest's split column, else a grouped stratified 70/15/15 split",
    )
    p.add_argument(
        "--union",
        action="store_true",
        help="segmentation: one sigmoid on the union of all mask classes (mask > 0)",
    )
    p.add_argument(
        "--label-ratio",
        type=float,
        nargs="+",
        default=[1.0],
        help="share(s) of the training labels, e.g. 0.1 0.2 1.0",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (seg) / 1e-3 (cls)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=1.0,
        metavar="S",
        help="backbone learning rate = S x --lr (decoder/head keep --lr); e.g. 0.3 to move "
        "pretrained features less than the new layers (default 1: one rate for all)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--input-size", type=int, default=224, help="square size, multiple of 32")
    p.add_argument(
        "--linear-probe", action="store_true", help="freeze the backbone (= --freeze-backbone)"
    )
    p.add_argument(
        "--freeze-backbone",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train only the decoder / head over the fixed backbone (default: frozen for the "
        "unet-hrc decoder on a pretrained backbone, else trained)",
    )
    p.add_argument(
        "--decoder",
        choices=["auto", "unet", "unet-hr", "unet-hrc", "conv", "vss"],
        default="auto",
        help="segmentation decoder: auto (default: unet-hrc when the training masks' median "
        "structure is under 16 px wide at --input-size, else unet; the choice is printed and "
        "saved with the model), unet (conv + channel attention), unet-hr (unet plus a "
        "full-resolution path from the image, for structures a few pixels wide), unet-hrc "
        "(unet-hr plus a conv branch at stride 4, trained over a frozen pretrained backbone), "
        "conv (cheaper), vss (OpenUS's channel-aware VSS blocks; slow on CPU)",
    )
    p.add_argument("--patience", type=int, default=10, help="early-stopping patience (epochs)")
    p.add_argument(
        "--balanced",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="class-weighted cross-entropy: classification by inverse class frequency (default "
        "off); segmentation of several structures by square-root median pixel frequency "
        "(default on for two or more structures; --no-balanced turns it off)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps")
    p.add_argument(
        "--val-every",
        type=int,
        default=None,
        metavar="N",
        help="validate every N optimiser steps (default: every epoch); patience counts these",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop training after this many seconds (the best model so far is kept)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run every (ratio, seed) combination and summarise; returns 0."""
    from tqdm import tqdm

    from usfm_core.errors import ConfigError
    from usfm_core.evaluate.metrics import aggregate_runs
    from usfm_core.finetune.train import finetune
    from usfm_core.utils import atomic_write_text

    if args.linear_probe and args.freeze_backbone is False:
        raise ConfigError(
            "--linear-probe and --no-freeze-backbone contradict each other",
            hint="--linear-probe freezes the backbone; drop one of the two",
        )
    if args.from_scratch_like is not None and args.backbone is not None:
        raise ConfigError(
            "--backbone and --from-scratch-like exclude each other",
            hint="run once with --backbone NAME and once with --from-scratch-like NAME",
        )
    if args.splits is not None and not args.splits.is_file():
        raise ConfigError("splits file not found", path=args.splits, hint="check the path")

    from usfm_core.outputs import check_out_dir

    check_out_dir(args.out, [args.data])  # several runs write summary.json into --out itself
    combos = [(r, s) for r in args.label_ratio for s in args.seeds]
    summary: dict[str, dict] = {}
    for ratio, seed in combos:
        out = args.out if len(combos) == 1 else args.out / f"r{ratio:g}_s{seed}"
        bar = tqdm(desc=f"ratio {ratio:g} seed {seed}", unit="step")

        def progress(info: dict, bar=bar) -> None:
            bar.total = info["steps"]
            bar.update(info["step"] - bar.n)
            if "val" in info:
                bar.set_postfix(loss=f"{info['loss']:.3f}", epoch=info["epoch"])

        res = finetune(
            args.task,
            args.data,
            out,
            backbone_ckpt=args.backbone,
            backbone_preset=args.preset,
            from_scratch_like=args.from_scratch_like,
            n_classes=1 if args.union else None,
            splits_file=args.splits,
            val_every=args.val_every,
            time_budget_s=args.time_budget,
            label_ratio=ratio,
            seed=seed,
            epochs=args.epochs,
            lr=args.lr,
            optimizer=args.optimizer,
            backbone_lr_scale=args.backbone_lr_scale,
            freeze_backbone=True if args.linear_probe else args.freeze_backbone,
            batch_size=args.batch_size,
            input_size=args.input_size,
            device=args.device,
            max_steps=args.max_steps,
            patience=args.patience,
            balanced=args.balanced,
            decoder=args.decoder,
            progress=progress,
        )
        bar.close()
        if res.decoder_choice:
            c = res.decoder_choice
            print(
                f"{out}: decoder auto -> {c['decoder']} (median structure width "
                f"{c['median_width_px']} px at {c['input_size']}², threshold "
                f"{c['threshold_px']:g} px, {c['n_structures']} structures)"
                + ("; backbone frozen" if res.backbone_frozen else "")
            )
        print(
            f"{out}: {res.split_rule}; classes {res.classes}; best epoch {res.best_epoch}, "
            f"val {_short(res.val_metrics)}, test {_short(res.test_metrics)}"
        )
        summary.setdefault(f"{ratio:g}", {"val": [], "test": []})
        summary[f"{ratio:g}"]["val"].append(res.val_metrics)
        summary[f"{ratio:g}"]["test"].append(res.test_metrics)
    if len(combos) > 1:
        doc = {r: {k: aggregate_runs(v) for k, v in d.items()} for r, d in summary.items()}
        atomic_write_text(args.out / "summary.json", json.dumps(doc, indent=1))
    return 0


def _short(metrics: dict) -> str:
    keys = ("dice", "iou", "macro_f1", "accuracy")
    keys += tuple(k for k in metrics if k.startswith("dice_") and k != "dice_legacy")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics) or "-"
