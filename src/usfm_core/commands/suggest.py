"""``usfm-core suggest``: rank the frames of a cine (or a folder of images) most worth labelling.

MODEL_OR_BACKBONE is a shipped or user model name (sim-lesion, fetal-head, breast-lesion, ...),
a model folder or a run folder, and may be a bare backbone folder. INPUT is any scan
usfm_core.io.load_scan opens (its frames are numbered from 0) or a folder of images (numbered in
the order segment uses: its manifest.csv, else natural file-name order).

Rules (see usfm_core.finetune.suggest), --strategy: random (the default) draws the frames in a
seeded random order: on the validation splits of BUSI and HC18 it beat both rankings below
(docs/benchmarks/active_learning.md). kcenter ranks by the model's uncertainty (mean predictive
entropy + disagreement under a horizontal flip; none for a bare backbone) combined with diversity
in the backbone's embedding space (greedy k-center started from the --labelled frames): with
nothing labelled pure diversity (the first frame is the most typical one), then (1 - w) x
normalised distance to the labelled set + w x normalised uncertainty, w = --uncertainty-weight
(default 0.5). typical picks the densest frame of the least-covered k-means cluster. Every rule
reports each frame's uncertainty and diversity.

Prints a table (rank, frame, score, uncertainty, diversity; file for a folder input) and, with
--out, writes it as CSV or JSON (by suffix) atomically; --out may not be the input, nor an
existing file unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLUMNS = ("rank", "frame", "score", "uncertainty", "diversity")
#: usfm_core.finetune.suggest.STRATEGIES and its default (not imported: that module loads torch,
#: and the CLI parser must start fast; a test keeps the two equal).
STRATEGIES = ("random", "kcenter", "typical")
DEFAULT_STRATEGY = "random"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``suggest`` sub-command."""
    p = subparsers.add_parser(
        "suggest",
        help="choose the frames to label next (random by default; uncertainty + diversity)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", metavar="MODEL_OR_BACKBONE", help="model name, model / run folder or backbone"
    )
    p.add_argument("input", type=Path, metavar="INPUT", help="a cine / scan, or a folder of images")
    p.add_argument("--k", type=int, default=5, help="number of frames to suggest (default 5)")
    p.add_argument(
        "--labelled",
        type=_frame_list,
        default=[],
        metavar="I,J,A-B",
        help="frames already labelled (0-based; e.g. 3,17,20-25): never suggested, and the "
        "start of the diversity search",
    )
    p.add_argument(
        "--uncertainty-weight",
        type=float,
        default=None,
        metavar="W",
        help="weight of uncertainty vs diversity in [0, 1] (default: 0 with nothing labelled, "
        "else 0.5; always 0 for a bare backbone)",
    )
    p.add_argument(
        "--strategy",
        choices=list(STRATEGIES),
        default=DEFAULT_STRATEGY,
        help=f"rule (default {DEFAULT_STRATEGY}): random (a seeded random sample; it beat both "
        "rankings on validation data, docs/benchmarks/active_learning.md), kcenter (farthest "
        "from the labelled frames, mixed with uncertainty) or typical (TypiClust: the densest "
        "frame of the least-covered k-means cluster)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the table: FILE.csv or FILE.json")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file (never the input)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="frames per forward pass")
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="square model input (default: the model's; 224 for a bare backbone)",
    )
    p.add_argument("--no-flip", action="store_true", help="skip the flip-disagreement pass")
    p.add_argument("--seed", type=int, default=0, help="tie-breaking seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="hide the progress display")
    p.set_defaults(func=run)


def _frame_list(text: str) -> list[int]:
    """``"3,17,20-22"`` → ``[3, 17, 20, 21, 22]`` (argparse type)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a frame number or range (e.g. 3,17,20-25)"
            ) from None
    if any(i < 0 for i in out):
        raise argparse.ArgumentTypeError("frame numbers start at 0")
    return sorted(set(out))


def check_out(out: Path, input_path: Path, *, overwrite: bool = False) -> None:
    """Refuse an ``--out`` that is not CSV / JSON, that would replace or land in the input, or
    that names an existing file (unless ``overwrite``: the user's file is never replaced
    silently)."""
    from usfm_core.errors import USFMError
    from usfm_core.outputs import check_outputs

    check_outputs([out], [input_path])  # first: "would replace the input" says the most
    if out.suffix.lower() not in (".csv", ".json"):
        raise USFMError(
            f"--out must end in .csv or .json, got {out.name!r}", hint="e.g. --out frames.csv"
        )
    if out.is_dir():
        raise USFMError("--out is a folder", path=out, hint="give a file name, e.g. frames.csv")
    if out.exists() and not overwrite:
        raise USFMError(
            "--out already exists", path=out, hint="give a new file name, or pass --overwrite"
        )


def input_frames(path: Path) -> tuple[Any, list[str] | None, int | None]:
    """``(frames, file of each frame or None, frame count if known)`` of a scan or folder."""
    from usfm_core.commands.segment import folder_scans
    from usfm_core.io import load_scan

    if not path.is_dir():
        scan = load_scan(path)
        return scan, None, scan.n_frames
    files = folder_scans(path)

    def frames():
        for file in files:
            with load_scan(file) as scan:
                yield from scan.iter_frames()

    names: list[str] = []
    for file in files:  # one name per frame (a multi-frame file gives several)
        with load_scan(file) as scan:
            names += [file.name] * scan.n_frames
    return frames(), names, len(names)


def run(args: argparse.Namespace) -> int:
    """Score the frames, print the ranking, optionally write it; returns 0."""
    from usfm_core.commands.segment import check_inputs
    from usfm_core.errors import USFMError
    from usfm_core.finetune.suggest import load_model_or_backbone, score_frames, select_frames
    from usfm_core.progress import progress_bar
    from usfm_core.utils import resolve_device

    if args.k < 1:
        raise USFMError(f"--k must be >= 1, got {args.k}")
    if args.batch_size < 1:
        raise USFMError(f"--batch-size must be >= 1, got {args.batch_size}")
    (input_path,) = check_inputs([args.input])
    if args.out is not None:
        check_out(args.out, input_path, overwrite=args.overwrite)
    device = resolve_device(args.device)
    model, kind = load_model_or_backbone(args.model, device)
    frames, names, total = input_frames(input_path)
    bar = progress_bar(total, desc="suggest", unit="frame", enabled=not args.no_progress)
    try:
        with bar:
            scores = score_frames(
                model,
                frames,
                batch_size=args.batch_size,
                input_size=args.input_size,
                device=device,
                flip=not args.no_flip,
                progress=lambda done: bar.update(done - bar.n),
            )
    finally:
        if hasattr(frames, "close"):
            frames.close()
    suggestions = select_frames(
        scores,
        args.k,
        args.labelled,
        uncertainty_weight=args.uncertainty_weight,
        seed=args.seed,
        strategy=args.strategy,
    )
    rows = [s.to_row() for s in suggestions]
    if names is not None:
        for row in rows:
            row["file"] = names[row["frame"]]
    no_unc = ""
    if scores.uncertainty is None:
        no_unc = "; no uncertainty" + (": diversity only" if args.strategy != "random" else "")
    print(
        f"{len(rows)} of {scores.n_frames} frame(s) suggested by {args.model} ({kind}; "
        f"rule {args.strategy}{no_unc})"
    )
    print(format_table(rows))
    if args.out is not None:
        write_rows(rows, args.out)
        print(f"wrote {args.out}")
    return 0


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned plain-text table of suggestion rows (``-`` for a missing value)."""
    cols = [*COLUMNS, *(["file"] if rows and "file" in rows[0] else [])]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    table = [cols, *([cell(r.get(c)) for c in cols] for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)


def write_rows(rows: list[dict[str, Any]], out: Path) -> None:
    """Write the rows as CSV (empty cell for None) or JSON (a list), atomically."""
    import csv
    import io

    from usfm_core.utils import atomic_write_text

    if out.suffix.lower() == ".json":
        atomic_write_text(out, json.dumps(rows, indent=1) + "\n")
        return
    cols = [*COLUMNS, *(["file"] if rows and "file" in rows[0] else [])]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows({c: "" if r.get(c) is None else r.get(c) for c in cols} for r in rows)
    atomic_write_text(out, buf.getvalue())
