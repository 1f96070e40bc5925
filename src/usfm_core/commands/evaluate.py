"""``usfm-core evaluate``: score a fine-tuned model, or compare runs by label ratio.

``usfm-core evaluate MODEL_DIR --data DIR --out REPORT [--corruptions] [--split test]`` writes
``metrics.json``, ``summary.md`` (printed), ``per_image.csv`` and PNG plots: means, failure
counts (Dice < 0.5, < 0.1, empty predictions, false positives on empty masks, HC error > 10 mm),
p10 / median / p90 of Dice, HD95 and HC error, and the 10 worst images by name (the overlay
figure shows the worst four). ``usfm-core evaluate --label-efficiency RUN...
--out REPORT`` plots metric vs label ratio (mean ± std over seeds) from finished runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` sub-command."""
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a fine-tuned model (metrics, corruptions) or label efficiency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", type=Path, nargs="?", help="model name (usfm-core models), model or run folder"
    )
    p.add_argument("--data", type=Path, help="labelled folder with manifest.csv")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="items to score (default test: from --splits, the run's splits.json or the test "
        "items the model recorded; refused when none is known); all = every item",
    )
    p.add_argument(
        "--corruptions",
        action="store_true",
        help="also score under blur / contrast / speckle at severities 1-3",
    )
    p.add_argument(
        "--label-efficiency",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="fine-tuning run folders to compare by label ratio",
    )
    p.add_argument("--metric", default=None, help="metric for --label-efficiency")
    p.add_argument("--max-items", type=int, default=None, help="evaluate only the first N")
    p.add_argument(
        "--baseline",
        type=Path,
        help="a second model (e.g. the same recipe from scratch) scored on the same items",
    )
    p.add_argument(
        "--splits",
        type=Path,
        help="splits.json of a fine-tuning run (default: the model's run folder's, if any)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "auto"],
        help="fp32 (default: the model cards' numbers), bf16 autocast, or auto (bf16 where the "
        "CPU computes it natively)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the requested report; returns 0."""
    from usfm_core.errors import USFMError
    from usfm_core.evaluate.report import evaluate_model_dir, label_efficiency_report
    from usfm_core.utils import resolve_device

    if args.label_efficiency:
        doc = label_efficiency_report(args.label_efficiency, args.out, args.metric)
        print(f"{doc['metric']} by label ratio written to {args.out}")
        return 0
    if args.model is None or args.data is None:
        raise USFMError(
            "give MODEL_DIR and --data (or --label-efficiency RUN...)",
            hint="usfm-core evaluate RUN/model --data DATA --out REPORT",
        )
    res = evaluate_model_dir(
        args.model,
        args.data,
        args.out,
        split=args.split,
        corruptions=args.corruptions,
        device=resolve_device(args.device),
        batch_size=args.batch_size,
        max_items=args.max_items,
        baseline=args.baseline,
        splits_file=args.splits,
        precision=args.precision,
    )
    print((args.out / "summary.md").read_text(encoding="utf-8"))
    return 0 if res else 1
