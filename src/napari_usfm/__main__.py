"""python -m napari_usfm: napari with a built-in sample (or your scan) and the five widgets
docked, the Segment widget set to the shipped model made for that sample."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The dock panels' widths: enough for short model names and the measurements table, so the
# canvas keeps most of a 1280-px-wide window.
DOCK_MAX_WIDTH = 290
LEFT_DOCK_WIDTH = 240  # napari's layer controls / layer list


def main(argv: list[str] | None = None) -> int:
    """Open the demo viewer (``--sample hc18|busi|cine|dicom``); returns when the window closes."""
    parser = argparse.ArgumentParser(prog="python -m napari_usfm", description=__doc__)
    parser.add_argument("--sample", choices=list(SAMPLE_MODELS), default="hc18")
    parser.add_argument("path", nargs="?", help="open this scan instead of a sample")
    args = parser.parse_args(argv)
    if args.path:
        problem = check_path(args.path)
        if problem:
            print(f"python -m napari_usfm: {problem}", file=sys.stderr)
            return 2
    try:
        build_viewer(args.sample, args.path)
    except Exception as exc:  # a bad scan: one line with the cause and the fix, no traceback
        print(f"python -m napari_usfm: {_one_line(exc)}", file=sys.stderr)
        return 2
    import napari

    napari.run()
    return 0


def check_path(path: str) -> str | None:
    """Why ``path`` cannot be opened before napari starts (None when it may be readable)."""
    from napari_usfm._reader import get_reader

    p = Path(path)
    if not p.exists():
        hint = " (a broken link)" if p.is_symlink() else ""
        return f"no such file or folder: {path}{hint}; check the path"
    if get_reader(path) is None:
        return (
            f"cannot open {path}: not a scan format napari-usfm reads (DICOM, mp4/avi/mov/mkv, "
            "TIFF, PNG/JPG/BMP or a folder of them, NIfTI); convert it or pick another file"
        )
    return None


def _one_line(exc: BaseException) -> str:
    """``exc`` as one line: USFMError messages already name the file, the cause and the fix."""
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


# The shipped model the Segment widget starts with, per sample.
SAMPLE_MODELS = {
    "hc18": "fetal-head",
    "busi": "breast-lesion",
    "cine": "sim-lesion",
    "dicom": "sim-lesion",
}


def build_viewer(sample: str = "hc18", path: str | None = None, show: bool = True):
    """``(viewer, {name: widget})``: the sample (or ``path``) with Segment / Annotate /
    Fine-tune / Inspect / Preprocess docked on the right (tabbed), Segment set to the sample's
    model."""
    import napari

    from napari_usfm import _sample_data
    from napari_usfm._annotate import AnnotateWidget
    from napari_usfm._reader import get_reader
    from napari_usfm._widgets import (
        FinetuneWidget,
        InspectWidget,
        PreprocessWidget,
        SegmentWidget,
    )

    if path:
        problem = check_path(path)
        if problem:
            raise ValueError(problem)
        reader = get_reader(path)
        assert reader is not None  # check_path said it is readable
        layers = reader(path)  # before the window opens: a bad file fails fast
    else:
        layers = {
            "cine": _sample_data.simulated_cine,
            "dicom": _sample_data.simulated_dicom,
            "hc18": _sample_data.hc18_image,
            "busi": _sample_data.busi_image,
        }[sample]()
    viewer = napari.Viewer(title="napari-usfm", show=show)
    for data, kwargs, kind in layers:
        layer = getattr(viewer, f"add_{kind}")(data, **kwargs)
        if kind == "labels" and layer.metadata.get("role") == "reference":
            layer.contour = 2  # an outline, so the prediction under it stays visible
    widgets = {}
    # Tabbed on the right; the last one added (Segment) is the tab shown first.
    for name, cls in [
        ("Preprocess", PreprocessWidget),
        ("Fine-tune", FinetuneWidget),
        ("Inspect", InspectWidget),
        ("Annotate", AnnotateWidget),
        ("Segment", SegmentWidget),
    ]:
        widgets[name] = cls(viewer)
        widgets[name].native.setMaximumWidth(DOCK_MAX_WIDTH)
        viewer.window.add_dock_widget(widgets[name], name=name, area="right", tabify=True)
    if not path:
        widgets["Segment"].select_model(SAMPLE_MODELS[sample])
    if show:
        fit_window(viewer)
    return viewer, widgets


def fit_window(viewer, size: tuple[int, int] | None = None) -> None:
    """Size the window to the screen, give the canvas most of it, centre the image.

    napari opens at a fixed size with wide docks; on a laptop screen (1280×720) that left the
    canvas a sliver. The window takes most of the screen (all of a small one), the side docks
    get bounded widths, and the view is reset once the canvas has its final size (else the
    image sits off-centre). ``size`` ``(width, height)`` overrides the screen-derived size.
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication, QDockWidget

    window = viewer.window._qt_window
    screen = window.screen() or QApplication.primaryScreen()
    if size is not None:
        window.resize(*size)
    elif screen is not None:
        avail = screen.availableGeometry()
        share = 1.0 if avail.width() < 1600 else 0.9
        window.resize(int(avail.width() * share), int(avail.height() * share))
    QApplication.processEvents()
    docks = [d for d in window.findChildren(QDockWidget) if d.isVisible()]
    left = [d for d in docks if window.dockWidgetArea(d) == Qt.DockWidgetArea.LeftDockWidgetArea]
    right = [d for d in docks if window.dockWidgetArea(d) == Qt.DockWidgetArea.RightDockWidgetArea]
    width = window.width()
    for dock in left:  # napari's layer controls ask for ~330 px; they work in 240
        dock.setMaximumWidth(min(LEFT_DOCK_WIDTH, width // 5))
    sizes = [min(LEFT_DOCK_WIDTH, width // 5)] * len(left) + [
        min(DOCK_MAX_WIDTH, width // 4)
    ] * len(right)
    if left or right:
        window.resizeDocks(left + right, sizes, Qt.Orientation.Horizontal)
    QApplication.processEvents()
    viewer.reset_view()


if __name__ == "__main__":
    sys.exit(main())
