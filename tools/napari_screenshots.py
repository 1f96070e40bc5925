"""Screenshots of the main job for the docs: ``python -m napari_usfm [--sample busi]`` after one
click on **Segment** with the preselected shipped model.

    xvfb-run -a -s "-screen 0 1920x1080x24" python tools/napari_screenshots.py [--out docs/images]

Writes ``napari_segment_hc18.png`` and ``napari_segment_busi.png`` (the whole window, widgets
included) and prints the measurements of the first object.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def segment_and_capture(sample: str, out: Path, timeout_s: float = 120.0) -> dict:
    """Open the sample as the main job does, click Segment, wait, save the window."""
    from qtpy.QtWidgets import QApplication

    from napari_usfm.__main__ import build_viewer

    viewer, widgets = build_viewer(sample, show=True)
    try:
        viewer.window._qt_window.resize(1800, 900)
        seg = widgets["Segment"]
        seg.run()
        start = time.perf_counter()
        while seg._worker is None or seg.busy:
            QApplication.processEvents()
            time.sleep(0.02)
            if time.perf_counter() - start > timeout_s:
                raise TimeoutError(f"Segment on {sample} did not finish in {timeout_s} s")
        if seg.error is not None:
            raise seg.error
        viewer.reset_view()
        for _ in range(20):  # let the canvas and table repaint
            QApplication.processEvents()
            time.sleep(0.02)
        viewer.screenshot(str(out), canvas_only=False)
        return seg.rows[0] if seg.rows else {}
    finally:
        viewer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for sample in ("hc18", "busi"):
        path = args.out / f"napari_segment_{sample}.png"
        row = segment_and_capture(sample, path)
        print(f"{sample}: {path}  first object: {row}")


if __name__ == "__main__":
    main()
