"""``usfm-core deidentify IN OUT``: scrub DICOM tags, burned-in text and file names."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``deidentify`` sub-command."""
    p = subparsers.add_parser(
        "deidentify",
        help="remove patient identifiers: DICOM tags, burned-in text, file names",
        description=(
            "De-identify a scan file or a folder of scans (every format usfm-core reads) into "
            "OUT: DICOM tags scrubbed per the DICOM PS3.15 basic confidentiality profile "
            "(UIDs replaced by keyed hashes, private tags, curves and overlays removed; pixel "
            "spacing, ultrasound regions and frame timing kept), burned-in text removed from "
            "the pixels (Tesseract OCR + glyph heuristic, inside and outside the scan region), "
            "files renamed to stable pseudonyms. The pseudonym -> source mapping and the secret "
            "key go to private files (mode 0600) outside OUT. See docs/deidentification.md; "
            "not a legal guarantee: review the output."
        ),
    )
    p.add_argument("input", metavar="IN", help="scan file or folder of scans")
    p.add_argument("out_dir", metavar="OUT", help="output folder (created)")
    p.add_argument(
        "--mapping",
        metavar="CSV",
        default=None,
        help="private pseudonym -> source mapping (default: OUT.mapping.csv beside OUT)",
    )
    secret = p.add_mutually_exclusive_group()
    secret.add_argument(
        "--key",
        metavar="FILE",
        default=None,
        help="secret key of the pseudonyms and UID hashes (default: beside the mapping; "
        "created when missing; reuse it to get the same pseudonyms later)",
    )
    secret.add_argument(
        "--salt",
        metavar="TEXT",
        default=None,
        help="a secret text to derive the pseudonyms from instead of a key file",
    )
    p.add_argument(
        "--allow-no-ocr",
        action="store_true",
        help="run without Tesseract (burned-in text found by a heuristic only; may survive)",
    )
    p.set_defaults(func=run)


def add_preprocess_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--deidentify`` and its options to the ``preprocess`` parser."""
    group = p.add_argument_group("de-identification (docs/deidentification.md)")
    group.add_argument(
        "--deidentify",
        action="store_true",
        help="name frames, masks and manifest sources by keyed pseudonyms (private mapping "
        "outside OUT_DIR) and remove burned-in text with OCR (refuses without Tesseract)",
    )
    group.add_argument(
        "--allow-no-ocr",
        action="store_true",
        help="with --deidentify: run without Tesseract (text found by a heuristic only)",
    )
    group.add_argument(
        "--mapping",
        metavar="CSV",
        default=None,
        help="with --deidentify: "
        "private mapping file (default: OUT_DIR.mapping.csv beside OUT_DIR)",
    )
    secret = group.add_mutually_exclusive_group()
    secret.add_argument(
        "--key",
        metavar="FILE",
        default=None,
        help="with --deidentify: secret key file (default: beside the mapping)",
    )
    secret.add_argument(
        "--salt",
        metavar="TEXT",
        default=None,
        help="with --deidentify: secret text instead of a key file",
    )


def preprocess_deidentifier(args: argparse.Namespace) -> Any:
    """The :class:`~usfm_core.preprocess.deidentify.PreprocessDeidentifier` for a parsed
    ``preprocess`` command line, or None without ``--deidentify``; refuses flags that would
    keep burned-in text."""
    from usfm_core.errors import USFMError
    from usfm_core.preprocess.deidentify import PreprocessDeidentifier

    if not args.deidentify:
        if args.allow_no_ocr or args.mapping or args.key or args.salt:
            raise USFMError(
                "--allow-no-ocr, --mapping, --key and --salt only apply with --deidentify",
                hint="add --deidentify, or drop those options",
            )
        return None
    if args.no_text_removal or args.no_ocr:
        raise USFMError(
            "--deidentify removes burned-in text with OCR; --no-text-removal / --no-ocr would "
            "keep it",
            hint="drop --no-text-removal / --no-ocr (use --allow-no-ocr only without Tesseract)",
        )
    return PreprocessDeidentifier.setup(
        args.in_dir,
        args.out_dir,
        mapping=args.mapping,
        key=args.key,
        salt=args.salt,
        allow_no_ocr=args.allow_no_ocr,
    )


def run(args: argparse.Namespace) -> int:
    """Run :func:`usfm_core.preprocess.deidentify.run_deidentify` and print a summary."""
    from usfm_core.preprocess.deidentify import run_deidentify

    summary = run_deidentify(
        args.input,
        args.out_dir,
        mapping=args.mapping,
        key=args.key,
        salt=args.salt,
        allow_no_ocr=args.allow_no_ocr,
    )
    print(
        f"de-identified {summary.n_written} of {summary.n_sources} files -> {summary.out_dir} "
        f"({summary.n_scrubbed_px} pixels of burned-in text removed"
        + ("" if summary.ocr else ", WITHOUT OCR")
        + ")"
    )
    print(f"mapping (private): {summary.mapping}")
    if summary.key is not None:
        print(f"key (private):     {summary.key}")
    for source, reason in summary.failures:
        print(f"  not written: {source}: {reason.splitlines()[0]}")
    return 1 if summary.failures else 0
