"""Screenshots of the main job for the docs: ``python -m napari_usfm [--sample busi]`` after one
click on **Segment** with the preselected shipped model.

    xvfb-run -a -s "-screen 0 1280x720x24" python tools/napari_screenshots.py --suffix _1280x720
    xvfb-run -a -s "-screen 0 1600x1000x24" python tools/napari_screenshots.py
    xvfb-run -a -s "-screen 0 1280x720x24" python tools/napari_screenshots.py --inspect
    xvfb-run -a -s "-screen 0 1280x720x24" python tools/napari_screenshots.py --annotate \
        --suffix _1280x720
    xvfb-run -a -s "-screen 0 1280x720x24" python tools/napari_screenshots.py --finetune

Writes ``napari_segment_hc18{suffix}.png`` and ``napari_segment_busi{suffix}.png`` (the whole
window, widgets included, at the size the main job opens on that screen) and prints the
measurements of the first object and the canvas share of the window width.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def wait_for(widget, what: str, timeout_s: float) -> None:
    """Pump the Qt event loop until ``widget``'s worker has finished; re-raise its error."""
    from qtpy.QtWidgets import QApplication

    start = time.perf_counter()
    while widget._worker is None or widget.busy:
        QApplication.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"{what} did not finish in {timeout_s} s")
    if widget.error is not None:
        raise widget.error


def settle(rounds: int = 25) -> None:
    """Let the canvas, layers and tables repaint before a screenshot (``rounds`` × 20 ms)."""
    from qtpy.QtWidgets import QApplication

    for _ in range(rounds):
        QApplication.processEvents()
        time.sleep(0.02)


def segment_and_capture(sample: str, out: Path, timeout_s: float = 120.0) -> dict:
    """Open the sample as the main job does, click Segment, wait, save the window."""

    from napari_usfm.__main__ import build_viewer

    viewer, widgets = build_viewer(sample, show=True)
    try:
        seg = widgets["Segment"]
        seg.run()
        wait_for(seg, f"Segment on {sample}", timeout_s)
        # The reference outline is shown beside the prediction (different colours).
        for layer in viewer.layers:
            if layer.name.endswith("annotation"):
                layer.visible = True
        settle(20)  # let the canvas and table repaint
        viewer.screenshot(str(out), canvas_only=False)
        window = viewer.window._qt_window.width()
        canvas = viewer.window._qt_viewer.canvas.native.width()
        row = dict(seg.rows[0]) if seg.rows else {}
        row["canvas_share"] = round(canvas / window, 2)
        return row
    finally:
        viewer.close()


def inspect_and_capture(out: Path, timeout_s: float = 180.0) -> dict:
    """Open the simulated cine, click Inspect (the shipped backbone ``openus-small-fast`` is
    preselected) and save the window twice: ALP heatmap, then the student's reconstruction."""

    from napari_usfm.__main__ import build_viewer

    viewer, widgets = build_viewer("cine", show=True)
    try:
        viewer.window._dock_widgets["Inspect"].raise_()
        ins = widgets["Inspect"]
        ins.run()
        wait_for(ins, "Inspect", timeout_s)
        shots = {"alp": out, "reconstruction": out.with_name(f"{out.stem}_reconstruction.png")}
        for name, path in shots.items():
            if name == "reconstruction":
                viewer.layers["ALP score"].visible = False
                viewer.layers["reconstruction"].visible = True
                viewer.layers.selection.active = viewer.layers["reconstruction"]
            settle(20)
            viewer.screenshot(str(path), canvas_only=False)
        return {"model": ins._model.current_choice, "mask": float(ins.result.mask.mean())}
    finally:
        viewer.close()


def annotate_and_capture(
    out_dir: Path, suffix: str = "", size=(1280, 720), timeout_s: float = 900.0
) -> dict:
    """The annotation loop on the simulated cine (``--sample cine``) with the Annotate tab:
    **Suggest** (the shipped backbone preselected), paint two suggested frames from the
    sample's ground truth (a stand-in for the user), **Propagate**; saves the window after
    Suggest (``napari_annotate_suggest{suffix}.png``: outlined frame + table) and after
    Propagate (``napari_annotate_propagate{suffix}.png``: the propagated masks on an unpainted
    frame with the simulator's mask outlined, the round line)."""

    from napari_usfm.__main__ import DOCK_MAX_WIDTH, build_viewer, fit_window
    from napari_usfm._annotate import AnnotateWidget
    from napari_usfm._layers import reference_colormap

    # Rounds go to a temporary model directory, never the user's.
    os.environ["USFM_MODEL_DIR"] = tempfile.mkdtemp(prefix="usfm-screenshots-")
    viewer, _widgets = build_viewer("cine", show=True)
    try:
        ann = AnnotateWidget(viewer)
        ann.native.setMaximumWidth(DOCK_MAX_WIDTH)
        viewer.window.add_dock_widget(ann, name="Annotate", area="right", tabify=True)
        fit_window(viewer, size)
        ann._k.value = 4
        ann.suggest()
        wait_for(ann, "Annotate", timeout_s)
        frames = [s.frame for s in ann.suggestions]
        ann.jump_to(frames[0])
        settle()
        shots = {"suggest": out_dir / f"napari_annotate_suggest{suffix}.png"}
        viewer.screenshot(str(shots["suggest"]), canvas_only=False)
        truth = viewer.layers["simulated cine ground truth"].data
        ann._paint()
        painted = sorted(frames[:2])
        labels = ann.annotations_layer()
        for t in painted:
            labels.data[t] = truth[t]
        labels.refresh()
        t0 = time.perf_counter()
        ann.propagate()
        wait_for(ann, "Annotate", timeout_s)
        seconds = time.perf_counter() - t0
        others = [t for t in range(truth.shape[0]) if t not in painted]
        shown = others[len(others) // 2]
        ann.jump_to(shown)
        viewer.layers["suggested frames"].visible = False
        # The simulator's exact mask as a yellow outline, to judge the propagated (cyan) one.
        reference = viewer.layers["simulated cine ground truth"]
        reference.colormap = reference_colormap()
        reference.contour, reference.opacity, reference.visible = 2, 1.0, True
        viewer.layers.selection.active = viewer.layers["propagated"]
        settle()
        shots["propagate"] = out_dir / f"napari_annotate_propagate{suffix}.png"
        viewer.screenshot(str(shots["propagate"]), canvas_only=False)
        from usfm_core.finetune.propagate import frame_dice

        masks = viewer.layers["propagated"].data
        dice = [frame_dice(masks[t], truth[t]) for t in others]
        window = viewer.window._qt_window.width()
        canvas = viewer.window._qt_viewer.canvas.native.width()
        return {
            "suggested": frames,
            "painted": painted,
            "shown_frame": shown,
            "propagate_s": round(seconds, 1),
            "mean_dice_unpainted": round(float(np.mean(dice)), 3),
            "round": ann._round.value,
            "canvas_share": round(canvas / window, 2),
            **{k: str(v) for k, v in shots.items()},
        }
    finally:
        viewer.close()


def finetune_and_capture(out: Path, timeout_s: float = 900.0) -> str:
    """The Fine-tune tab on six small-structure phantoms (160², two classes, their masks as the
    painted Labels layer): from the shipped backbone, 1 epoch at 160², into a temporary model
    directory; saves the window after training (``napari_finetune_auto.png``: the status line
    names the decoder ``auto`` chose and why) and returns that status line."""
    import napari

    from napari_usfm.__main__ import DOCK_MAX_WIDTH, fit_window
    from napari_usfm._widgets import FinetuneWidget
    from usfm_core.sim.structures import simulate_small_structures

    os.environ["USFM_MODEL_DIR"] = tempfile.mkdtemp(prefix="usfm-screenshots-")
    pairs = [simulate_small_structures(s, 160) for s in range(6)]
    viewer = napari.Viewer(title="napari-usfm", show=True)
    try:
        viewer.add_image(np.stack([p[0] for p in pairs]), name="phantoms")
        viewer.add_labels(np.stack([p[1] for p in pairs]).astype(np.uint8), name="painted")
        ft = FinetuneWidget(viewer)
        ft.native.setMaximumWidth(DOCK_MAX_WIDTH)
        viewer.window.add_dock_widget(ft, name="Fine-tune", area="right")
        fit_window(viewer)
        ft._image.reset_choices()
        ft._labels.reset_choices()
        ft._image.value, ft._labels.value = viewer.layers["phantoms"], viewer.layers["painted"]
        ft._epochs.value, ft._size.value, ft._name.value = 1, 160, "small-structures"
        ft.run()
        wait_for(ft, "Fine-tune", timeout_s)
        settle()
        viewer.screenshot(str(out), canvas_only=False)
        return str(ft._status.value)
    finally:
        viewer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    ap.add_argument("--suffix", default="", help="appended to the file names, e.g. _1280x720")
    ap.add_argument(
        "--inspect",
        action="store_true",
        help="the Inspect tab on the simulated cine instead (napari_inspect{suffix}.png and "
        "napari_inspect{suffix}_reconstruction.png)",
    )
    ap.add_argument(
        "--annotate",
        action="store_true",
        help="the Annotate tab on the simulated cine instead: Suggest, paint two suggested "
        "frames, Propagate (napari_annotate_suggest{suffix}.png, napari_annotate_propagate"
        "{suffix}.png)",
    )
    ap.add_argument(
        "--finetune",
        action="store_true",
        help="the Fine-tune tab on small-structure phantoms (napari_finetune_auto.png): the "
        "decoder chosen by --decoder auto in the status line",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.finetune:
        path = args.out / f"napari_finetune_auto{args.suffix}.png"
        print(f"finetune: {path} {finetune_and_capture(path)!r}")
        return
    if args.annotate:
        print(f"annotate: {annotate_and_capture(args.out, args.suffix)}")
        return
    if args.inspect:
        path = args.out / f"napari_inspect{args.suffix}.png"
        print(f"inspect: {path} {inspect_and_capture(path)}")
        return
    for sample in ("hc18", "busi"):
        path = args.out / f"napari_segment_{sample}{args.suffix}.png"
        row = segment_and_capture(sample, path)
        print(f"{sample}: {path}  first object: {row}")


if __name__ == "__main__":
    main()
