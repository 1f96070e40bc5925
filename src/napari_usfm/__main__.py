"""``python -m napari_usfm``: napari with a built-in sample and the four widgets docked, the
Segment widget set to the shipped model made for that sample."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Open the demo viewer (``--sample hc18|busi|cine|dicom``); returns when the window closes."""
    parser = argparse.ArgumentParser(prog="python -m napari_usfm", description=__doc__)
    parser.add_argument("--sample", choices=list(SAMPLE_MODELS), default="hc18")
    parser.add_argument("path", nargs="?", help="open this scan instead of a sample")
    args = parser.parse_args(argv)
    build_viewer(args.sample, args.path)
    import napari

    napari.run()
    return 0


# The shipped model the Segment widget starts with, per sample.
SAMPLE_MODELS = {
    "hc18": "fetal-head",
    "busi": "breast-lesion",
    "cine": "sim-lesion",
    "dicom": "sim-lesion",
}


def build_viewer(sample: str = "hc18", path: str | None = None, show: bool = True):
    """``(viewer, {name: widget})``: the sample (or ``path``) with Segment / Fine-tune /
    Inspect / Preprocess docked on the right (tabbed), Segment set to the sample's model."""
    import napari

    from napari_usfm import _sample_data
    from napari_usfm._reader import get_reader
    from napari_usfm._widgets import (
        FinetuneWidget,
        InspectWidget,
        PreprocessWidget,
        SegmentWidget,
    )

    viewer = napari.Viewer(title="napari-usfm", show=show)
    if path:
        reader = get_reader(path)
        if reader is None:
            raise SystemExit(f"napari-usfm cannot read {path}")
        layers = reader(path)
    else:
        layers = {
            "cine": _sample_data.simulated_cine,
            "dicom": _sample_data.simulated_dicom,
            "hc18": _sample_data.hc18_image,
            "busi": _sample_data.busi_image,
        }[sample]()
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widgets = {}
    # Tabbed on the right; the last one added (Segment) is the tab shown first.
    for name, cls in [
        ("Preprocess", PreprocessWidget),
        ("Fine-tune", FinetuneWidget),
        ("Inspect", InspectWidget),
        ("Segment", SegmentWidget),
    ]:
        widgets[name] = cls(viewer)
        viewer.window.add_dock_widget(widgets[name], name=name, area="right", tabify=True)
    if not path:
        widgets["Segment"].select_model(SAMPLE_MODELS[sample])
    return viewer, widgets


if __name__ == "__main__":
    sys.exit(main())
