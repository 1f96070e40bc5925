"""``usfm-core pretrain``: self-supervised pre-training (OpenUS, iBOT ablation)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` sub-command."""
    from usfm_core.pretrain.methods import available_methods  # light: no torch import

    p = subparsers.add_parser(
        "pretrain",
        help="pre-train a backbone (OpenUS self-adaptive masked distillation)",
        description=(
            "Pre-train a VMamba backbone on a folder of scans (one sub-folder per data set). "
            "Writes log.csv/log.jsonl, checkpoints/last/ and, at the end, backbone/ (the "
            "teacher, loadable by fine-tuning and the napari plugin). Multi-GPU: launch with "
            "torchrun --nproc_per_node N -m usfm_core.cli pretrain ..."
        ),
    )
    p.add_argument(
        "--config",
        default="small-cpu",
        help="preset (tiny, small-cpu, small-fast, openus-s) or a .json/.yaml file "
        "(default: small-cpu)",
    )
    p.add_argument("--data", required=True, help="data folder (one sub-folder per data set)")
    p.add_argument("--out", required=True, help="run folder (logs, checkpoints, backbone/)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check data and config, print the plan, write nothing",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after N steps (schedules still follow the configured epochs)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="override the config's device",
    )
    p.add_argument(
        "--method",
        choices=available_methods(),
        default=None,
        help="override the config's method (openus; ibot = ablation without reconstruction; "
        "other registered baselines)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set masking.ratio=0.6 (repeatable)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config, apply overrides, run :func:`usfm_core.pretrain.trainer.pretrain`."""
    from usfm_core.pretrain.config import load_config
    from usfm_core.pretrain.trainer import pretrain

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.method:
        overrides.append(f"method={args.method}")
    if args.max_steps is not None and args.max_steps < 1:
        from usfm_core.errors import ConfigError

        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    cfg = load_config(args.config, overrides)
    out = pretrain(
        cfg, args.data, args.out, resume=args.resume, dry_run=args.dry_run, max_steps=args.max_steps
    )
    if not args.dry_run:
        print(f"pretraining done: {out} (backbone in {out / 'backbone'})")
    return 0
