"""``usfm-core segment``: run a fine-tuned segmenter over scans, write masks + measurements.

Every input any :func:`usfm_core.io.load_scan` reader opens works (image, cine, volume slice by
slice). Frames are streamed: masks are written as they are produced, so memory stays flat.
Single images give ``<name>_mask.png``, stacks ``<name>_mask.tif`` (same H × W, one page per
frame, calibrated like the scan); binary masks are 0/255, multi-class masks hold class indices.
``measurements.csv`` lists every object of every frame, in mm when the scan is calibrated.
"""

from __future__ import annotations

import argparse
import csv
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
        "model", type=Path, help="model name (usfm-core models), model folder or run folder"
    )
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="scans to segment")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=4, help="frames per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--min-pixels", type=int, default=5, help="ignore smaller objects")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Segment every input; returns 0 on success."""
    from usfm_core.errors import USFMError
    from usfm_core.finetune.models import load_finetuned
    from usfm_core.utils import atomic_path, resolve_device

    device = resolve_device(args.device)
    model, meta = load_finetuned(args.model, device=device)
    if meta["task"] != "segmentation":
        raise USFMError(
            "this is a classification model",
            path=args.model,
            hint="pass a model fine-tuned with --task seg",
        )
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "measurements.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MEASURE_FIELDS)
        writer.writeheader()
        for path in args.inputs:
            segment_scan(
                model,
                path,
                args.out,
                writer,
                batch_size=args.batch_size,
                device=device,
                min_pixels=args.min_pixels,
                progress=not args.no_progress,
            )
            fh.flush()
    print(f"wrote masks and {args.out / 'measurements.csv'}")
    return 0


def segment_scan(
    model,
    path: Path,
    out_dir: Path,
    writer: csv.DictWriter,
    *,
    batch_size: int = 4,
    device: str = "cpu",
    min_pixels: int = 5,
    progress: bool = True,
) -> Path:
    """Segment one scan: stream masks to PNG/TIFF and rows to ``writer``; returns the mask path."""
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
    stem = path.stem if path.is_file() else path.name
    single = scan.n_frames == 1
    target = out_dir / f"{stem}_mask.{'png' if single else 'tif'}"
    bar = tqdm(total=scan.n_frames, desc=stem, unit="frame", disable=not progress)
    masks = segment_frames(
        model,
        scan.iter_frames(),
        batch_size=batch_size,
        device=device,
        progress=lambda n: bar.update(n - bar.n),
    )
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
                _write_rows(writer, stem, i, measure_mask(mask, spacing, min_pixels), note)
        finally:
            if tif is not None:
                tif.close()
    bar.close()
    return target


def _write_rows(writer: csv.DictWriter, name: str, frame: int, meas: dict, note: str) -> None:
    """One CSV row per object (or one empty row for a frame without objects)."""
    base = {"file": name, "frame": frame, "unit": meas["unit"], "note": note}
    if not meas["objects"]:
        writer.writerow({**base, "object": "", "area": 0.0})
    for k, obj in enumerate(meas["objects"]):
        writer.writerow(
            {
                **base,
                "object": k,
                **{key: _fmt(obj[key]) for key in OBJECT_FIELDS},
            }
        )


def _fmt(value: float) -> float | int:
    return round(value, 4) if isinstance(value, float) else value
