"""Screenshots of the main job for the docs: ``python -m napari_usfm [--sample busi]`` after one
click on **Segment** with the preselected shipped model.

    xvfb-run -a -s "-screen 0 1280x720x24" python tools/napari_screenshots.py --suffix _1280x720
    xvfb-run -a -s "-screen 0 1600x1000x24" python tools/napari_screenshots.py

Writes ``napari_segment_hc18{suffix}.png`` and ``napari_segment_busi{suffix}.png`` (the whole
window, widgets included, at the size the main job opens on that screen) and prints the
measurements of the first object and the canvas share of the window width.
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
        # The reference outline is shown beside the prediction (different colours).
        for layer in viewer.layers:
            if layer.name.endswith("annotation"):
                layer.visible = True
        for _ in range(20):  # let the canvas and table repaint
            QApplication.processEvents()
            time.sleep(0.02)
        viewer.screenshot(str(out), canvas_only=False)
        window = viewer.window._qt_window.width()
        canvas = viewer.window._qt_viewer.canvas.native.width()
        row = dict(seg.rows[0]) if seg.rows else {}
        row["canvas_share"] = round(canvas / window, 2)
        return row
    finally:
        viewer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    ap.add_argument("--suffix", default="", help="appended to the file names, e.g. _1280x720")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for sample in ("hc18", "busi"):
        path = args.out / f"napari_segment_{sample}{args.suffix}.png"
        row = segment_and_capture(sample, path)
        print(f"{sample}: {path}  first object: {row}")


if __name__ == "__main__":
    main()
