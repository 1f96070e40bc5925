"""``usfm-core segment``: run a fine-tuned segmenter over scans, write masks + measurements.

Every input any :func:`usfm_core.io.load_scan` reader opens works (image, cine, volume slice by
slice). Frames are streamed: masks are written as they are produced, so memory stays flat.
Single images give ``<name>_mask.png``, stacks ``<name>_mask.tif`` (same H × W, one page per
frame, calibrated like the scan); binary masks are 0/255, multi-class masks hold class indices.
``measurements.csv`` lists every object of every frame, in mm when the scan is calibrated.

Arguments and inputs are checked before the model is loaded (missing or unreadable paths, an
output folder that is an input, an output that would replace an input). Inputs with the same
file name get distinct outputs (``a/scan.png``, ``b/scan.png`` → ``OUT/a/scan_mask.png``,
``OUT/b/scan_mask.png``). One input that cannot be read or segmented does not stop the batch:
every good input is segmented and measured, the failures are listed at the end and the exit
code is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

# Per-object values from usfm_core.finetune.infer.measure_mask, in CSV column order.
OBJECT_FIELDS = (
    "label",
    "area",
    "max_diameter",
    "ellipse_major",
    "ellipse_minor",
    "circumference",
    "centroid_y",
    "centroid_x",
    "n_pixels",
)
MEASURE_FIELDS = ("file", "frame", "object", "unit", *OBJECT_FIELDS, "note")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``segment`` sub-command."""
    p = subparsers.add_parser(
        "segment",
        help="segment scans with a fine-tuned model; writes masks and measurements.csv",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", type=str, help="model name (usfm-core models), model folder or run folder"
    )
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="scans to segment")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=4, help="frames per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--min-pixels", type=int, default=5, help="ignore smaller objects")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def check_inputs(paths: list[Path]) -> list[Path]:
    """Each input exists and is readable (a file we can open, or a folder we can list).

    Raises :class:`~usfm_core.errors.USFMError` naming every bad path at once.
    """
    import os

    from usfm_core.errors import USFMError

    problems = []
    for path in paths:
        path = path.expanduser()
        if not path.exists():
            problems.append(f"{path}: no such file or folder")
        elif path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):
                problems.append(f"{path}: folder is not readable (permissions)")
        else:
            try:
                with open(path, "rb") as fh:
                    fh.read(1)
            except OSError as exc:
                problems.append(f"{path}: cannot be read ({exc.strerror or exc})")
    if problems:
        raise USFMError(
            "bad input: " + "; ".join(problems),
            hint="check the paths (nothing was segmented)",
        )
    return [p.expanduser() for p in paths]


def plan_outputs(inputs: list[Path], out_dir: Path) -> dict[Path, str]:
    """Each input's output name (posix stem, may hold sub-folders), checked against the inputs.

    Names come from :func:`usfm_core.outputs.relative_keys` + :func:`output_stems`: unique
    ignoring case; ``OUT/<stem>_mask.png|tif`` and ``OUT/measurements.csv`` must not replace an
    input or land in an input folder (:class:`~usfm_core.errors.USFMError` otherwise).
    """
    from usfm_core.outputs import check_out_dir, check_outputs, output_stems, relative_keys

    check_out_dir(out_dir, inputs)
    keys = relative_keys(inputs)
    stems = output_stems(keys)
    plan = {path: stems[key] for path, key in zip(inputs, keys)}
    targets = [out_dir / "measurements.csv"]
    for stem in plan.values():
        targets += [out_dir / f"{stem}_mask.png", out_dir / f"{stem}_mask.tif"]
    check_outputs(targets, inputs)
    return plan


def run(args: argparse.Namespace) -> int:
    """Segment every input; returns 0 when all succeeded, 1 when any failed."""
    from usfm_core.errors import USFMError
    from usfm_core.finetune.models import load_finetuned
    from usfm_core.outputs import atomic_path, clean_stale_temporaries
    from usfm_core.utils import resolve_device

    if args.batch_size < 1:
        raise USFMError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.min_pixels < 0:
        raise USFMError(f"--min-pixels must be >= 0, got {args.min_pixels}")
    inputs = check_inputs(list(args.inputs))
    plan = plan_outputs(inputs, args.out)
    device = resolve_device(args.device)
    model, meta = load_finetuned(args.model, device=device)
    if meta["task"] != "segmentation":
        raise USFMError(
            "this is a classification model",
            path=args.model,
            hint="pass a model fine-tuned with --task seg",
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for folder in {(args.out / stem).parent for stem in plan.values()} | {args.out}:
        clean_stale_temporaries(folder)  # left by a killed run (e.g. a big stack's temporary)
    rows: list[dict] = []
    failures: list[tuple[Path, str]] = []
    n_done = 0
    for path, stem in plan.items():
        scan_rows: list[dict] = []
        try:
            segment_scan(
                model,
                path,
                args.out,
                scan_rows,
                stem=stem,
                batch_size=args.batch_size,
                device=device,
                min_pixels=args.min_pixels,
                progress=not args.no_progress,
            )
        except USFMError as exc:
            failures.append((path, str(exc).splitlines()[0]))
            continue
        except Exception as exc:  # one broken scan must not stop a batch (Ctrl-C still does)
            failures.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        rows += scan_rows
        n_done += 1
    with atomic_path(args.out / "measurements.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MEASURE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {n_done} mask(s) and {args.out / 'measurements.csv'}")
    if failures:
        print(f"{len(failures)} of {len(plan)} input(s) failed:", file=sys.stderr)
        for path, reason in failures:
            print(f"  failed: {path}: {reason}", file=sys.stderr)
        return 1
    return 0


def segment_scan(
    model,
    path: Path,
    out_dir: Path,
    rows: list[dict],
    *,
    stem: str | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    min_pixels: int = 5,
    progress: bool = True,
) -> Path:
    """Segment one scan: stream masks to ``out_dir/<stem>_mask.png|tif`` (atomically) and
    append its measurement rows to ``rows``; returns the mask path.

    ``stem`` (default: the file's stem) may hold sub-folders (``a/scan``). On an error nothing
    of this scan is written and ``rows`` is unchanged.
    """
    import cv2
    import numpy as np
    import tifffile
    from tqdm import tqdm

    from usfm_core.finetune.infer import measure_mask, segment_frames
    from usfm_core.io import load_scan
    from usfm_core.utils import atomic_path

    scan = load_scan(path)
    spacing = scan.spacing_mm
    note = "" if spacing else "uncalibrated scan: pixel units"
    binary = model.n_classes == 1
    if stem is None:
        stem = path.stem if path.is_file() else path.name
    single = scan.n_frames == 1
    target = out_dir / f"{stem}_mask.{'png' if single else 'tif'}"
    new_rows: list[dict] = []
    bar = tqdm(total=scan.n_frames, desc=stem, unit="frame", disable=not progress)
    masks = segment_frames(
        model,
        scan.iter_frames(),
        batch_size=batch_size,
        device=device,
        progress=lambda n: bar.update(n - bar.n),
    )
    try:
        with atomic_path(target) as tmp:
            tif = None if single else tifffile.TiffWriter(tmp)
            try:
                for i, mask in enumerate(masks):
                    stored = (mask * 255).astype(np.uint8) if binary else mask
                    if single:
                        tmp.write_bytes(cv2.imencode(".png", stored)[1].tobytes())
                    else:
                        kw = {}
                        if spacing:  # pixels per cm, as TIFF readers expect for unit = cm
                            kw = {
                                "resolution": (10 / spacing[1], 10 / spacing[0]),
                                "resolutionunit": "CENTIMETER",
                            }
                        tif.write(stored, contiguous=True, photometric="minisblack", **kw)
                    new_rows += _rows(stem, i, measure_mask(mask, spacing, min_pixels), note)
            finally:
                if tif is not None:
                    tif.close()
    finally:
        bar.close()
        scan.close()
    rows += new_rows
    return target


def _rows(name: str, frame: int, meas: dict, note: str) -> list[dict]:
    """One CSV row per object (or one empty row for a frame without objects)."""
    base = {"file": name, "frame": frame, "unit": meas["unit"], "note": note}
    if not meas["objects"]:
        return [{**base, "object": "", "area": 0.0}]
    return [
        {**base, "object": k, **{key: _fmt(obj[key]) for key in OBJECT_FIELDS}}
        for k, obj in enumerate(meas["objects"])
    ]


def _fmt(value: float) -> float | int:
    return round(value, 4) if isinstance(value, float) else value
