"""``usfm-core preprocess``: turn a folder of scans into clean pretraining frames."""

from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``preprocess`` sub-command."""
    p = subparsers.add_parser(
        "preprocess",
        help="sample frames, remove annotations, rescale and crop a folder of scans",
        description=(
            "Preprocess every scan under IN_DIR (DICOM, video, TIFF, NIfTI, images; subfolders "
            "included) as in USF-MAE/US-JEPA: 3 fps frame sampling, scan-region mask, removal of "
            "text/colour/marker annotations (inpainting), 2nd-98th percentile rescale inside the "
            "region, crop. Writes OUT_DIR/frames/*.png, OUT_DIR/region_masks/*.png, "
            "OUT_DIR/manifest.csv. Re-running skips finished scans. A file that cannot be read "
            "does not stop the run: every good scan is processed, failures are listed at the "
            "end and the exit code is 1 when any scan failed."
        ),
    )
    p.add_argument("in_dir", metavar="IN_DIR", help="folder of scans")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created)")
    p.add_argument(
        "--fps",
        type=_positive_float,
        default=3.0,
        help="frames per second kept from cines (default: 3)",
    )
    p.add_argument(
        "--max-frames",
        type=_positive_int,
        default=64,
        help="at most N frames per scan (default: 64)",
    )
    p.add_argument(
        "--no-text-removal",
        action="store_true",
        help="keep burned-in text, colour overlays and markers",
    )
    p.add_argument(
        "--no-ocr",
        action="store_true",
        help="detect text without Tesseract (glyph heuristic only; faster)",
    )
    p.add_argument("--no-crop", action="store_true", help="do not crop to the scan region")
    p.add_argument(
        "--size",
        type=_positive_int,
        default=None,
        help="letterbox frames to SIZE x SIZE pixels (default: keep size)",
    )
    p.add_argument(
        "--workers", type=_positive_int, default=1, help="parallel worker processes (default: 1)"
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress display (default: a bar with rate and ETA on a terminal, a plain "
        "line every 30 s and a summary when the output is a log)",
    )
    from usfm_core.commands.deidentify import add_preprocess_arguments

    add_preprocess_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run :func:`usfm_core.preprocess.pipeline.run_preprocessing` and print a summary."""
    from usfm_core.commands.deidentify import preprocess_deidentifier
    from usfm_core.preprocess.pipeline import PreprocessOptions, run_preprocessing

    deidentify = preprocess_deidentifier(args)  # None without --deidentify

    options = PreprocessOptions(
        target_fps=args.fps,
        max_frames_per_clip=args.max_frames,
        remove_text=not args.no_text_removal,
        crop=not args.no_crop,
        size=args.size,
        use_ocr=False if args.no_ocr else "auto",
    )
    summary = run_preprocessing(
        args.in_dir,
        args.out_dir,
        options,
        workers=args.workers,
        progress=not args.no_progress,
        deidentify=deidentify,
    )
    print(
        f"preprocessed {summary.n_sources} sources ({summary.n_processed} now, "
        f"{summary.n_skipped} already done, {len(summary.failures)} failed) -> "
        f"{summary.n_frames} frames in {summary.seconds:.1f} s"
    )
    print(f"manifest: {summary.manifest}")
    if deidentify is not None:
        print(f"pseudonym mapping (private): {deidentify.mapping}")
    for source, reason in summary.failures:
        print(f"  failed: {source}: {reason.splitlines()[0]}")
    # Failure policy (same as segment): every good source is done, failures are listed, and
    # the exit code is 1 when any source failed.
    return 1 if summary.failures else 0
