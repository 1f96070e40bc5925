"""How responsive napari stays while Segment and Fine-tune run in the background.

A 10 ms QTimer ticks on the GUI thread while a job runs; the event-loop delay is how late each
tick fires (interval − 10 ms). Reported: median, p99 and max delay, for an idle viewer and during
Segment (a tiny segmenter on a 120-frame cine) and Fine-tune (8 painted frames, 3 epochs).

Run under a display (Xvfb): ``xvfb-run -a python benchmarks/gui_responsiveness.py``.
Writes ``benchmarks/results/gui_responsiveness.json``.

``--scenario annotate`` (issue #17): one annotation-loop round in the Annotate widget on a
simulated 100-frame 256×256 cine, as a user runs it: Propagate from the preselected start model
(the shipped backbone ``openus-small-fast``, a fresh decoder) with two painted frames, then a
second round warm-started from the first with one corrected frame more. Reports the event-loop
delay during each round and its wall time (train / segment split), with ``uptime`` beside them;
writes ``benchmarks/results/gui_responsiveness_annotate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

TICK_MS = 10


def _measure(app, job_running, min_seconds: float = 0.0) -> dict[str, float]:
    """Tick a timer until ``job_running()`` is False; return delay statistics in ms."""
    from qtpy.QtCore import QTimer

    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(TICK_MS)
    start = time.perf_counter()
    while job_running() or time.perf_counter() - start < min_seconds:
        app.processEvents()
        time.sleep(0.001)
    timer.stop()
    delay = np.maximum(np.diff(ticks) * 1000 - TICK_MS, 0)
    return {
        "seconds": time.perf_counter() - start,
        "ticks": len(ticks),
        "median_ms": float(np.median(delay)),
        "p99_ms": float(np.percentile(delay, 99)),
        "max_ms": float(delay.max()),
    }


def _uptime() -> str:
    """``uptime`` output: the machine's load next to the numbers."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _mean_dice(masks: np.ndarray, truth: np.ndarray, frames: list[int]) -> float:
    """Mean per-frame Dice of ``masks (T, H, W)`` against ``truth`` over ``frames``."""
    from usfm_core.finetune.propagate import frame_dice

    return float(np.mean([frame_dice(masks[t], truth[t]) for t in frames]))


def annotate(frames: int, out: Path) -> dict:
    """Two rounds of the Annotate widget on a ``frames``-frame 256² cine (module doc)."""
    tmp = Path(tempfile.mkdtemp(prefix="usfm-gui-bench-"))
    os.environ["USFM_MODEL_DIR"] = str(tmp / "models")
    os.environ["USFM_DEVICE"] = "cpu"

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_usfm._annotate import AnnotateWidget
    from napari_usfm._settings import num_threads
    from usfm_core.sim import simulate_cine

    cine = simulate_cine(n_frames=frames, seed=1, height=256, width=256)
    truth = (cine.lesion_masks > 0).astype(np.uint8)
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.add_image(cine.frames, name="cine")
    widget = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Annotate")
    results: dict = {
        "frames": frames,
        "size": [256, 256],
        "start": Path(str(widget._model.value)).name,
        "steps": int(widget._steps.value),
        "smooth": bool(widget._smooth.value),
        "threads_background": num_threads(),
        "idle": _measure(app, lambda: False, min_seconds=2.0),
    }
    widget._paint()
    labels = widget.annotations_layer()
    painted = [frames // 4, (3 * frames) // 4]
    for round_no, extra in ((1, None), (2, frames // 2)):
        if extra is not None:  # the user corrects one propagated frame and accepts it
            viewer.layers["propagated"].data[extra] = truth[extra]
            widget._accept_scope.value = "edited frames"
            widget.accept_corrections()
            painted.append(extra)
        else:
            for t in painted:
                labels.data[t] = truth[t]
        load, cpu = _uptime(), time.process_time()
        widget.propagate()
        row = _measure(app, lambda: widget.busy)
        row["cpu_s"] = time.process_time() - cpu  # both threads: the round's cost unloaded
        if widget.error is not None:
            raise widget.error
        res = widget.result
        others = [t for t in range(frames) if t not in painted]
        row.update(
            uptime_before=load,
            uptime_after=_uptime(),
            labelled=sorted(painted),
            warm_start=Path(res.warm_start).name,
            train_s=res.seconds["train"],
            segment_s=res.seconds["segment"],
            mean_dice_unlabelled=_mean_dice(res.masks, truth, others),
            round=widget.saved_round.number,
        )
        results[f"round{round_no}"] = row
    viewer.close()
    print(
        f"{'job':<8} {'seconds':>8} {'CPU s':>6} {'train s':>8} {'segm. s':>8} {'median ms':>10} "
        f"{'p99 ms':>8} {'max ms':>8} {'Dice':>6}"
    )
    for job in ("idle", "round1", "round2"):
        r = results[job]
        print(
            f"{job:<8} {r['seconds']:8.1f} {r.get('cpu_s', 0):6.1f} {r.get('train_s', 0):8.1f} "
            f"{r.get('segment_s', 0):8.1f} "
            f"{r['median_ms']:10.1f} {r['p99_ms']:8.1f} {r['max_ms']:8.1f} "
            f"{r.get('mean_dice_unlabelled', float('nan')):6.3f}"
        )
    print(results["round1"]["uptime_before"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tick_ms": TICK_MS, "cores": os.cpu_count(), **results}, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["segment-finetune", "annotate"], default=None)
    parser.add_argument("--frames", type=int, default=None, help="120 (annotate: 100)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.scenario == "annotate":
        out = args.out or "benchmarks/results/gui_responsiveness_annotate.json"
        annotate(args.frames or 100, Path(out))
        return
    args.frames = args.frames or 120
    args.out = args.out or "benchmarks/results/gui_responsiveness.json"
    tmp = Path(tempfile.mkdtemp(prefix="usfm-gui-bench-"))
    os.environ["USFM_MODEL_DIR"] = str(tmp / "models")
    os.environ["USFM_DEVICE"] = "cpu"

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_usfm._widgets import FinetuneWidget, SegmentWidget
    from usfm_core.finetune.train import finetune
    from usfm_core.sim import simulate_cine

    cine = simulate_cine(n_frames=args.frames, seed=1, height=256, width=256)
    masks = (cine.lesion_masks > 0).astype(np.uint8)
    finetune(
        "segmentation",
        (cine.frames[:8], masks[:8]),
        tmp / "seg",
        backbone_preset="tiny",
        epochs=1,
        input_size=128,
        batch_size=4,
        device="cpu",
        max_steps=2,
    )

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.add_image(cine.frames, name="cine")
    painted = np.zeros_like(masks)
    painted[:8] = masks[:8]
    viewer.add_labels(painted, name="painted")
    seg, ft = SegmentWidget(viewer), FinetuneWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment")
    viewer.window.add_dock_widget(ft, name="Fine-tune")

    results = {"idle": _measure(app, lambda: False, min_seconds=2.0)}
    seg._model_path.value = tmp / "seg"
    seg.run()
    results["segment"] = _measure(app, lambda: seg.busy)
    results["segment"]["frames_per_s"] = len(seg.frames_done) / results["segment"]["seconds"]
    ft._epochs.value = 3
    ft._size.value = 128
    ft.run()
    results["finetune"] = _measure(app, lambda: ft.busy)
    viewer.close()

    print(f"{'job':<10} {'seconds':>8} {'median ms':>10} {'p99 ms':>8} {'max ms':>8}")
    for job, r in results.items():
        print(
            f"{job:<10} {r['seconds']:8.1f} {r['median_ms']:10.1f} {r['p99_ms']:8.1f} "
            f"{r['max_ms']:8.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tick_ms": TICK_MS, "cores": os.cpu_count(), **results}, indent=1))


if __name__ == "__main__":
    main()
