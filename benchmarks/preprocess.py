"""Benchmark of the preprocessing chain: reading, each step, the whole pipeline (frames/s).

Data: simulator frames/cines (always) and the first N BUSI images (when the shared data is
found). Prints a table and writes ``benchmarks/results/preprocess.json``.

    python benchmarks/preprocess.py [--busi-dir DIR] [--n-busi 20] [--n-sim 20] [--no-ocr]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from usfm_core.io import load_scan, write_dicom, write_image, write_video
from usfm_core.preprocess.annotations import remove_annotations, tesseract_available
from usfm_core.preprocess.intensity import percentile_rescale, resize_keep_aspect, to_uint8
from usfm_core.preprocess.pipeline import PreprocessOptions, run_preprocessing
from usfm_core.preprocess.region import crop_to_region, scan_region_mask, to_gray
from usfm_core.sim import simulate_cine, simulate_frame

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "preprocess.json"


def default_busi_dir() -> Path | None:
    """``$USFM_SHARED_DATA/busi/images`` or ``../shared/data/busi/images`` if present."""
    env = os.environ.get("USFM_SHARED_DATA")
    for root in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (root / "busi" / "images").is_dir():
            return root / "busi" / "images"
    return None


def frames_per_second(fn: Callable[[np.ndarray], object], frames: Sequence[np.ndarray]) -> float:
    """Run ``fn`` on every frame once (after one warm-up call); frames per second."""
    fn(frames[0])
    start = time.perf_counter()
    for frame in frames:
        fn(frame)
    return len(frames) / (time.perf_counter() - start)


def time_reading(paths: Sequence[Path]) -> float:
    """load_scan + decoding every frame of every file: frames per second."""
    start = time.perf_counter()
    n = 0
    for path in paths:
        with load_scan(path) as scan:
            for i in range(scan.n_frames):
                scan.frame(i)
                n += 1
    return n / (time.perf_counter() - start)


def time_steps(frames: Sequence[np.ndarray], ocr: bool) -> dict[str, float]:
    """Frames/s of each preprocessing step on (H, W[, 3]) uint8 frames."""
    masks = [scan_region_mask(f) for f in frames]
    pairs = list(zip(frames, masks))

    def annotations(use_ocr: bool) -> float:
        return frames_per_second(
            lambda p: remove_annotations(p[0], region_mask=p[1], use_ocr=use_ocr), pairs
        )

    steps = {
        "region_mask": frames_per_second(scan_region_mask, frames),
        "annotations_no_ocr": annotations(False),
        "rescale_crop_resize_256": frames_per_second(
            lambda p: resize_keep_aspect(
                crop_to_region(to_uint8(percentile_rescale(to_gray(p[0]), p[1])), p[1])[0], 256
            ),
            pairs,
        ),
    }
    if ocr:
        steps["annotations_ocr"] = annotations(True)
    return steps


def time_pipeline(in_dir: Path, ocr: bool) -> dict[str, float]:
    """Whole ``run_preprocessing`` on a folder (size 256), one worker: frames/s."""
    with tempfile.TemporaryDirectory() as out:
        options = PreprocessOptions(size=256, use_ocr="auto" if ocr else False)
        summary = run_preprocessing(in_dir, out, options, progress=False)
    return {
        "ocr": ocr,
        "frames": summary.n_frames,
        "seconds": round(summary.seconds, 3),
        "frames_per_s": summary.n_frames / summary.seconds,
    }


def simulator_data(tmp: Path, n_frames: int) -> tuple[list[np.ndarray], list[Path], Path]:
    """Annotated simulator frames, a cine written as AVI + DICOM, and a folder of them."""
    frames = [
        simulate_frame(
            seed=i,
            geometry="sector" if i % 2 else "linear",
            text=True,
            calipers=True,
            colour_overlay=True,
        ).image
        for i in range(n_frames)
    ]
    folder = tmp / "sim"
    for i, frame in enumerate(frames):
        write_image(folder / f"frame_{i:03d}.png", frame)
    cine = simulate_cine(n_frames=30, seed=0, text=True, calipers=True, fps=30.0)
    files = [
        write_video(folder / "cine.avi", cine.frames, fps=30.0),
        write_dicom(folder / "cine.dcm", cine.frames, spacing_mm=cine.spacing_mm, fps=30.0),
    ]
    return frames, files, folder


def busi_data(busi_dir: Path, n: int, tmp: Path) -> tuple[list[np.ndarray], list[Path], Path]:
    """The first ``n`` BUSI images (RGB or grey), their paths, and a folder of copies."""
    paths = sorted(busi_dir.glob("*.png"))[:n]
    frames = []
    folder = tmp / "busi"
    folder.mkdir()
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        frames.append(image)
        (folder / path.name).write_bytes(path.read_bytes())
    return frames, paths, folder


def run(args: argparse.Namespace) -> dict:
    """Measure everything; return the JSON-ready results."""
    cv2.setNumThreads(1)  # one core per frame, as in the one-worker pipeline
    ocr = args.ocr and tesseract_available()
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "opencv": cv2.__version__,
            "ocr": ocr,
        },
        "datasets": {},
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        datasets = {"simulator": simulator_data(tmp, args.n_sim)}
        busi_dir = args.busi_dir or default_busi_dir()
        if busi_dir is not None and args.n_busi > 0:
            datasets["busi"] = busi_data(busi_dir, args.n_busi, tmp)
        for name, (frames, files, folder) in datasets.items():
            entry = {
                "n_frames": len(frames),
                "frame_shape": list(frames[0].shape),
                "read_frames_per_s": time_reading(files),
                "steps_frames_per_s": time_steps(frames, ocr),
                "pipeline": time_pipeline(folder, False),
            }
            if ocr:
                entry["pipeline_ocr"] = time_pipeline(folder, True)
            results["datasets"][name] = entry
    return results


def print_table(results: dict) -> None:
    """One row per measurement: data set, what, frames per second."""
    print(f"{'data':<10} {'measurement':<28} {'frames/s':>9}")
    for name, entry in results["datasets"].items():
        rows = [("read (load_scan + frames)", entry["read_frames_per_s"])]
        rows += list(entry["steps_frames_per_s"].items())
        for key in ("pipeline", "pipeline_ocr"):
            if key in entry:
                label = f"{key} ({entry[key]['frames']} frames)"
                rows.append((label, entry[key]["frames_per_s"]))
        for what, fps in rows:
            print(f"{name:<10} {what:<28} {fps:>9.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busi-dir", type=Path, default=None, help="BUSI images folder")
    parser.add_argument("--n-busi", type=int, default=20, help="BUSI images to use")
    parser.add_argument("--n-sim", type=int, default=20, help="simulator frames to use")
    parser.add_argument("--no-ocr", dest="ocr", action="store_false", help="skip Tesseract")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    results = run(args)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
