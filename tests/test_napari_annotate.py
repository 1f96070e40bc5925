"""The Annotate widget (issue #17): suggest frames, propagate painted frames, correct, retrain.

Real napari viewer (pytest-qt under Xvfb), the shipped demo segmenter ``sim-lesion`` at a small
input size and short simulated cines, so the loop runs end to end (workers, rounds on disk,
Cancel) in well under a minute.
"""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

START = "sim-lesion"  # the shipped demo segmenter: a warm start that already knows lesions


@pytest.fixture(scope="module")
def cine():
    from usfm_core.sim import simulate_cine

    return simulate_cine(n_frames=10, seed=4, height=64, width=64)


@pytest.fixture()
def model_dir(tmp_path, monkeypatch):
    """An empty user model directory (never the real ~/.cache)."""
    d = tmp_path / "usfm-models"
    monkeypatch.setenv("USFM_MODEL_DIR", str(d))
    monkeypatch.setenv("USFM_DEVICE", "cpu")
    return d


def _wait(qtbot, widget, timeout=60_000):
    """Wait until the widget has handled its worker's `finished` (all yields delivered)."""
    qtbot.waitUntil(lambda: widget._worker is not None and not widget.busy, timeout=timeout)
    assert widget.error is None, widget.error


def _widget(viewer, cine, *, steps=2, size=0):
    from napari_usfm._annotate import AnnotateWidget
    from usfm_core.models.zoo import find_model

    viewer.add_image(cine.frames, name="cine")
    widget = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget._model.value = str(find_model(START).path)
    widget._steps.value = steps
    widget._size.value = size
    return widget


def test_default_start_is_the_shipped_backbone_else_a_segmenter():
    from napari_usfm._annotate import DEFAULT_BACKBONE, default_start_model

    seg = [("seg", "/models/sim-lesion")]
    with_backbone = [("bb", f"/models/{DEFAULT_BACKBONE}"), *seg]
    assert default_start_model(with_backbone).endswith(DEFAULT_BACKBONE)
    assert default_start_model([]) is None


@pytest.mark.gui
@pytest.mark.slow
def test_suggest_fills_the_table_marks_frames_and_a_click_jumps_there(
    make_napari_viewer, qtbot, model_dir, cine
):
    from usfm_core.finetune.suggest import suggest_frames

    viewer = make_napari_viewer()
    widget = _widget(viewer, cine)
    widget._k.value = 3
    widget.suggest()
    _wait(qtbot, widget)
    frames = [s.frame for s in widget.suggestions]
    # The widget only wires: the same frames as the core function on the same input.
    direct = suggest_frames(START, cine.frames, 3)
    assert frames == [s.frame for s in direct]
    assert len(set(frames)) == 3 and all(0 <= f < 10 for f in frames)
    table = widget._table.to_dict("list")
    assert table["frame"] == frames
    assert table["uncertainty"] == [round(float(s.uncertainty), 3) for s in direct]
    assert widget.progress.value == widget.progress.max == 10
    # Each suggested frame is outlined on its own frame (a rectangle at time t).
    marker = viewer.layers["suggested frames"]
    assert sorted(int(s[0, 0]) for s in marker.data) == sorted(frames)
    # Clicking a row of the table moves the viewer to that frame.
    for row in (2, 0):
        viewer.dims.current_step = (0, *viewer.dims.current_step[1:])
        widget._table.native.cellClicked.emit(row, 0)
        assert viewer.dims.current_step[0] == frames[row]
    # "auto" input size: a model's own, the pretraining crop for a bare backbone.
    from napari_usfm._annotate import BACKBONE_INPUT
    from usfm_core.models.zoo import find_model

    assert widget.input_size(str(find_model(START).path)) is None
    assert widget.input_size(str(find_model("openus-small-fast").path)) == BACKBONE_INPUT
    widget._size.value = 96
    assert widget.input_size(str(find_model(START).path)) == 96
    # Another rule: the widget passes it through (k-center, as the core ranks it).
    widget._size.value = 0
    widget._rule.value = "kcenter"
    widget.suggest()
    _wait(qtbot, widget)
    ranked = suggest_frames(START, cine.frames, 3, strategy="kcenter")
    assert [s.frame for s in widget.suggestions] == [s.frame for s in ranked]


@pytest.mark.gui
def test_suggest_with_every_frame_painted_says_so(make_napari_viewer, model_dir, cine):
    viewer = make_napari_viewer()
    widget = _widget(viewer, cine)
    widget._paint()
    viewer.layers["annotations"].data[:] = 1
    assert widget.suggest() is None and widget._worker is None
    assert "all 10 frames are painted" in widget._status.value


def test_suggest_rules_are_the_cores():
    from napari_usfm._annotate import SUGGEST_RULES
    from usfm_core.finetune.suggest import DEFAULT_STRATEGY, STRATEGIES

    assert SUGGEST_RULES == STRATEGIES and SUGGEST_RULES[0] == DEFAULT_STRATEGY


@pytest.mark.gui
@pytest.mark.slow
def test_propagate_fills_every_frame_saves_rounds_and_warm_starts_from_the_last(
    make_napari_viewer, qtbot, model_dir, cine
):
    from usfm_core.finetune.propagate import frame_dice
    from usfm_core.finetune.rounds import latest_round, list_rounds

    viewer = make_napari_viewer()
    widget = _widget(viewer, cine)
    truth = (cine.lesion_masks > 0).astype(np.uint8)
    # Nothing painted yet: a clear message, no worker.
    assert widget.propagate() is None
    assert "nothing painted" in widget._status.value
    widget._paint()
    ann = viewer.layers["annotations"]
    assert ann.data.shape == truth.shape
    ann.data[2] = truth[2]
    ann.data[7] = truth[7]
    widget.propagate()
    _wait(qtbot, widget)
    prop = viewer.layers["propagated"]
    result = widget.result
    assert result.n_segmented == 10 and not result.cancelled
    np.testing.assert_array_equal(prop.data, result.masks)
    np.testing.assert_array_equal(prop.data[[2, 7]], truth[[2, 7]])  # painted kept as painted
    dice = [frame_dice(prop.data[t], truth[t]) for t in range(10)]
    assert np.mean(dice) > 0.6, dice  # the lesion is found on the unpainted frames too
    first = latest_round(widget.rounds_dir())
    assert first is not None and first.number == 1 and list(first.labelled) == [2, 7]
    assert "round 1" in widget._round.value

    # Correct one propagated frame, accept it: the annotations gain that frame only.
    prop.data[5] = truth[5]
    assert widget.accept_corrections() == [5]
    assert widget.annotated_frames() == [2, 5, 7]
    np.testing.assert_array_equal(ann.data[5], truth[5])
    # Round 2 warm-starts from round 1 and trains on every corrected frame.
    widget.propagate()
    _wait(qtbot, widget)
    assert widget.result.warm_start == str(first.path)
    rounds = list_rounds(widget.rounds_dir())
    assert [r.number for r in rounds] == [1, 2]
    assert list(rounds[-1].labelled) == [2, 5, 7]
    assert "round 2" in widget._round.value


@pytest.mark.gui
@pytest.mark.slow
def test_cancel_stops_training_and_saves_no_round(make_napari_viewer, qtbot, model_dir, cine):
    from usfm_core.finetune.rounds import latest_round

    viewer = make_napari_viewer()
    widget = _widget(viewer, cine, steps=5000)
    widget._paint()
    viewer.layers["annotations"].data[3] = cine.lesion_masks[3] > 0
    widget.propagate()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=60_000)
    assert widget._cancel.enabled and not widget._propagate.enabled
    widget.cancel()
    _wait(qtbot, widget)
    assert widget._propagate.enabled and not widget._cancel.enabled
    assert widget.saved_round is None
    assert latest_round(widget.rounds_dir()) is None
    assert not viewer.layers["propagated"].data.any()


def test_importing_the_annotate_widget_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, napari_usfm._annotate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_round_line_shows_number_labels_and_dice_or_what_it_needs(tmp_path):
    from napari_usfm._annotate import _round_text
    from usfm_core.finetune.rounds import MIN_LABELLED_FOR_VALIDATION, RoundInfo

    assert _round_text(None, 0).startswith("round 0")
    few = RoundInfo(number=1, path=tmp_path, labelled=[2, 7])
    text = _round_text(few, 3)
    assert "round 1 · 2 labelled" in text
    assert f"Dice needs ≥ {MIN_LABELLED_FOR_VALIDATION} labelled" in text
    assert "next: round 2, 3 labelled" in text
    many = RoundInfo(number=4, path=tmp_path, labelled=list(range(8)), held_out=[2], val_dice=0.8)
    assert "Dice 0.80 on 1 held back" in _round_text(many, 8)
