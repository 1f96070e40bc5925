"""De-identification on real scans: how much of each image changes, and the CPU cost.

Usage::

    python benchmarks/deidentify.py                 # 12 BUSI + 12 HC18 images from ../shared/data
    python benchmarks/deidentify.py --n 4 --data /path/to/shared/data

Runs :func:`usfm_core.preprocess.deidentify.run_deidentify` on copies of the first ``n`` images
of each set (BUSI images carry burned-in labels such as 'LEFT BREAST'; HC18 images carry none),
then reports per set the share of pixels changed (mean / max over images, the false-positive
cost on tissue), the images left untouched, and seconds per image: wall time and CPU time
(this process plus the Tesseract subprocesses). Prints a table and writes
``benchmarks/results/deidentify.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from usfm_core.io import load_scan
from usfm_core.preprocess.annotations import tesseract_available
from usfm_core.preprocess.deidentify import Pseudonymizer, run_deidentify

RESULTS = Path(__file__).resolve().parent / "results" / "deidentify.json"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SALT = "benchmark"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (Tesseract)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_set(images: list[Path], work: Path) -> dict[str, float]:
    """De-identify copies of ``images``; changed-pixel shares and seconds per image."""
    src, out = work / "in", work / "out"
    src.mkdir(parents=True)
    for path in images:
        shutil.copy(path, src / path.name)
    wall, cpu = time.perf_counter(), cpu_seconds()
    summary = run_deidentify(src, out, salt=SALT, mapping=work / "mapping.csv")
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    pseudo = Pseudonymizer.from_salt(SALT)
    changed = []
    for path in images:
        before = np.asarray(load_scan(src / path.name).frames)
        after = np.asarray(load_scan(out / f"{pseudo.name(path.name)}{path.suffix}").frames)
        changed.append(float(np.mean(before != after)))
    return {
        "n_images": len(images),
        "n_written": summary.n_written,
        "changed_px_mean": float(np.mean(changed)),
        "changed_px_max": float(np.max(changed)),
        "untouched_images": int(sum(c == 0 for c in changed)),
        "wall_s_per_image": wall / len(images),
        "cpu_s_per_image": cpu / len(images),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=12, help="images per data set")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared/data folder")
    args = parser.parse_args()
    if not tesseract_available():
        raise SystemExit("tesseract is not installed: apt-get install tesseract-ocr")
    sets = {
        name: sorted((args.data / name / "images").glob("*.png"))[: args.n]
        for name in ("busi", "hc18")
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, images in sets.items():
            if not images:
                raise SystemExit(f"no images in {args.data / name / 'images'}")
            results[name] = run_set(images, Path(tmp) / name)
    print(
        f"{'set':6} {'images':>6} {'changed px mean':>16} {'max':>7} {'untouched':>9} "
        f"{'wall s/img':>10} {'cpu s/img':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:6} {r['n_images']:6d} {100 * r['changed_px_mean']:15.2f}% "
            f"{100 * r['changed_px_max']:6.2f}% {r['untouched_images']:9d} "
            f"{r['wall_s_per_image']:10.2f} {r['cpu_s_per_image']:9.2f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "results": results,
    }
    RESULTS.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
