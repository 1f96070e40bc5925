"""``usfm-core simulate OUT``: write a simulated B-mode frame or cine plus its ground truth."""

from __future__ import annotations

import argparse

DEFAULT_FORMAT = {"frame": "png", "cine": "dicom"}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` sub-command to the CLI."""
    p = sub.add_parser(
        "simulate",
        help="write a simulated B-mode frame or cine with lesion/annotation masks",
        description=(
            "Simulate a B-mode ultrasound phantom (speckle, tissue layers, lesions, attenuation, "
            "optional burned-in annotations) and write it to OUT, with its ground truth in "
            "ground_truth/<OUT's file name>/ beside it (lesions.tif, annotations.tif, "
            "region.tif, clean.tif, meta.json; one set per output file, never read as scans). "
            "OUT without suffix gets the format's default."
        ),
    )
    p.add_argument("out", help="output file (e.g. sample.png, cine.dcm, cine.mp4)")
    p.add_argument("--kind", choices=("frame", "cine"), default="frame", help="default: frame")
    p.add_argument("--frames", type=int, default=16, help="cine length (default 16)")
    p.add_argument("--fps", type=float, default=20.0, help="cine frame rate (default 20)")
    p.add_argument(
        "--motion", choices=("breathing", "probe", "none"), default="breathing", help="cine motion"
    )
    p.add_argument(
        "--format",
        choices=("dicom", "video", "tiff", "png"),
        help="default: from OUT's suffix, else png for a frame and dicom for a cine",
    )
    p.add_argument("--geometry", choices=("sector", "linear"), default="sector")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(256, 256))
    p.add_argument("--depth", type=float, default=60.0, help="imaging depth in mm (default 60)")
    p.add_argument("--annotations", action="store_true", help="burn in text and calipers")
    p.add_argument("--colour", action="store_true", help="add a colour-Doppler box and bar")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.set_defaults(func=run)


def _format_from_suffix(out: str) -> str | None:
    """The export format a file name's suffix implies (``x.mp4`` → video), if any."""
    from pathlib import Path

    from usfm_core.sim.export import SUFFIXES

    suffix = Path(out).suffix.lower()
    return next((fmt for fmt, suffixes in SUFFIXES.items() if suffix in suffixes), None)


def run(args: argparse.Namespace) -> int:
    """Simulate, export and print the written paths (one ``role: path`` per line)."""
    from usfm_core.errors import ConfigError
    from usfm_core.sim import SimConfig, export_cine, export_frame, simulate_cine, simulate_frame

    fmt = args.format or _format_from_suffix(args.out) or DEFAULT_FORMAT[args.kind]
    if args.kind == "frame" and fmt == "video":
        raise ConfigError("a single frame cannot be written as video", hint="use --kind cine")
    if args.kind == "cine" and fmt == "png":
        raise ConfigError("a cine cannot be written as png", hint="use dicom, video or tiff")
    cfg = SimConfig(
        height=args.size[0],
        width=args.size[1],
        geometry=args.geometry,
        depth_mm=args.depth,
        text=args.annotations,
        calipers=args.annotations,
        colour_overlay=args.colour,
        seed=args.seed,
    )
    if args.kind == "frame":
        sample = simulate_frame(cfg)
        paths = export_frame(sample, args.out, format=fmt)
    else:
        sample = simulate_cine(args.frames, cfg, fps=args.fps, motion=args.motion)
        paths = export_cine(sample, args.out, format=fmt)
    print(f"seed: {sample.meta['seed']}")
    for role, path in paths.items():
        print(f"{role}: {path}")
    return 0
