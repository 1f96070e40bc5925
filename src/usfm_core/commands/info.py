"""``usfm-core info [FILE] [--json]``: what a scan holds and what this machine can compute with."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from usfm_core.errors import ScanWarning

# Metadata values longer than this are shortened in the text output (lists of files, affines).
_MAX_VALUE_CHARS = 120


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``info`` sub-command to the CLI."""
    p = sub.add_parser(
        "info",
        help="describe a scan (kind, shape, spacing, fps, metadata) and the compute setup",
        description=(
            "Print a scan's kind, format, shape, dtype, pixel spacing, frame rate and key "
            "metadata without decoding its frames, then the torch / CUDA / selective-scan setup. "
            "Without FILE only the compute section is printed."
        ),
    )
    p.add_argument("file", nargs="?", help="DICOM, video, TIFF, NIfTI, image file or image folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def compute_report() -> dict[str, Any]:
    """torch version, CUDA availability, what ``--precision auto`` picks on the CPU (and the
    native-bf16 flags behind it) and the selective-scan backend report (if available)."""
    import torch

    report: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "threads": torch.get_num_threads(),
    }
    from usfm_core.models.precision import cpu_bf16_flags, resolve_precision

    report["precision"] = {
        "auto": resolve_precision("auto", "cpu"),
        "cpu_bf16_flags": list(cpu_bf16_flags()),
    }
    try:
        from usfm_core.models.scan import backend_report

        report["selective_scan"] = backend_report()
    except (ImportError, AttributeError) as exc:
        report["selective_scan"] = {"error": f"backend report unavailable: {exc}"}
    return report


# Metadata keys `info` may print: technical facts only. Free text that can carry patient
# identifiers (DICOM descriptions and dates, ImageJ "Info"/"Labels", file names) is never shown.
_TECHNICAL_KEYS = frozenset(
    {
        "transfer_syntax",
        "transfer_syntax_uid",
        # + usfm_core.io.dicom.TECHNICAL_FIELDS (added where used: --help stays import-free)
        "ultrasound_regions",
        "codec",
        "container",
        "axes",
        "pages",
        "ome",
        "file_format",
        "axcodes",
        "space_unit",
        "affine",
    }
)
_IMAGEJ_KEYS = frozenset(
    {"ImageJ", "images", "frames", "slices", "channels", "unit", "spacing", "finterval", "fps"}
)


def technical_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The subset of a scan's metadata that holds no patient identifiers (allow-list)."""
    from usfm_core.io.dicom import TECHNICAL_FIELDS

    keys = _TECHNICAL_KEYS | set(TECHNICAL_FIELDS)
    out = {k: v for k, v in metadata.items() if k in keys}
    imagej = metadata.get("imagej")
    if isinstance(imagej, dict):
        out["imagej"] = {k: v for k, v in imagej.items() if k in _IMAGEJ_KEYS}
    if isinstance(metadata.get("files"), list):
        out["n_files"] = len(metadata["files"])
    return out


def scan_report(path: str) -> dict[str, Any]:
    """Summary and technical metadata of the scan at ``path`` (frames are not decoded)."""
    from usfm_core.io import load_scan

    with load_scan(path) as scan:
        return {**scan.summary(), "metadata": technical_metadata(scan.metadata)}


def _short(value: Any) -> str:
    """One-line rendering of a metadata value, shortened if long."""
    text = json.dumps(value, default=str) if isinstance(value, (list, dict, tuple)) else str(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _print_text(scan: dict[str, Any] | None, compute: dict[str, Any]) -> None:
    """Human-readable report."""
    if scan is not None:
        spacing = scan["spacing_mm"]
        print(f"file:        {scan['path']}")
        print(f"kind:        {scan['kind']}")
        print(f"format:      {scan['format']}")
        print(f"shape:       {tuple(scan['shape'])}  ({'RGB' if scan['is_rgb'] else 'gray'})")
        print(f"dtype:       {scan['dtype']}")
        print(f"frames:      {scan['n_frames']}")
        if spacing:
            print(f"spacing:     dy={spacing[0]:.4g} mm, dx={spacing[1]:.4g} mm")
        else:
            print("spacing:     uncalibrated (no pixel size in the file)")
        if scan["slice_spacing_mm"]:
            print(f"slice step:  {scan['slice_spacing_mm']:.4g} mm")
        fps = f"{scan['fps']:.4g}" if scan["fps"] else "-"
        print(f"fps:         {fps}")
        if scan["metadata"]:
            print("metadata:")
            for key, value in scan["metadata"].items():
                print(f"  {key}: {_short(value)}")
    print("compute:")
    print(f"  torch: {compute['torch']}")
    devices = ", ".join(compute["cuda_devices"]) or "none"
    print(f"  cuda available: {compute['cuda_available']} (devices: {devices})")
    print(f"  torch threads: {compute['threads']}")
    prec = compute["precision"]
    why = ", ".join(prec["cpu_bf16_flags"]) or "no native bf16 on this CPU"
    print(f"  precision: --precision auto picks {prec['auto']} ({why})")
    backend = compute["selective_scan"]
    if "error" in backend:
        print(f"  selective scan: {backend['error']}")
    else:
        print("  selective scan: " + ", ".join(f"{k}={_short(v)}" for k, v in backend.items()))


def run(args: argparse.Namespace) -> int:
    """Print the report; returns the exit code (bad files raise ScanReadError -> exit 1).

    Reader warnings (dropped calibration, malformed optional fields) are printed to stderr as
    one line each, ``usfm-core info: warning: <file>: <what>``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ScanWarning)
        scan = scan_report(args.file) if args.file else None
    for warning in caught:
        if issubclass(warning.category, ScanWarning):
            print(f"usfm-core info: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    compute = compute_report()
    if args.json:
        print(json.dumps({"scan": scan, "compute": compute}, indent=1, default=str))
    else:
        _print_text(scan, compute)
    return 0
