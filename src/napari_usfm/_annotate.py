"""Annotate dock widget: the annotation-light loop (issue #17) on one image layer.

1. **Suggest** picks k frames to label (``usfm_core.finetune.suggest``; rule ``random`` by
   default, chosen on validation data, or the ``kcenter`` / ``typical`` rankings): a table of
   the frames with the model's uncertainty on each (click a row: the viewer jumps there) and an
   outline around those frames.
2. The user paints a few frames in the ``annotations`` Labels layer.
3. **Propagate** fine-tunes briefly from the last round's model (or the chosen model /
   backbone) on every painted frame and segments all frames into the ``propagated`` layer
   (``usfm_core.finetune.propagate``); each run is saved as a round in the model directory
   (``usfm_core.finetune.rounds``).
4. The user corrects propagated masks; **Accept corrections** copies the edited (or current,
   or all) frames into ``annotations`` and the next Propagate warm-starts from the last round.

Like the other widgets this one only wires layers to core functions: the work runs in napari
generator ``thread_worker``s (progress bar, Cancel at the next step / frame), torch is imported
inside the workers and capped to leave a core for the GUI.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    Label,
    PushButton,
    SpinBox,
    Table,
)
from qtpy.QtWidgets import QHeaderView, QSizePolicy

from napari_usfm import _layers
from napari_usfm._settings import default_device, model_dir
from napari_usfm._widgets import (
    _Base,
    _file_edit,
    _layer_choices,
    _limit_threads,
    _model_description,
    _model_label,
    _progress_bar,
    _wrap,
)

ANNOTATIONS = "annotations"
PROPAGATED = "propagated"
SUGGESTED = "suggested frames"
#: Preselected when shipped: the OpenUS-pretrained backbone.
DEFAULT_BACKBONE = "openus-small-fast"
#: Suggest rules: ``usfm_core.finetune.suggest.STRATEGIES``, default first (not imported here:
#: that module loads torch, which the widget only loads in its workers; a test keeps them equal).
SUGGEST_RULES = ("random", "kcenter", "typical")
#: Outline colour of suggested frames (predictions are cyan/magenta/…, references yellow).
SUGGEST_COLOR = "orangered"
#: Fine-tuning steps per Propagate. Twice ``propagate.DEFAULT_STEPS``: from the bare shipped
#: backbone (a fresh decoder) and two painted frames of the sample cine, 30 steps gave a mean
#: Dice of 0.25 on the other frames, 60 steps 0.60 (128 px, about 25 s of one core).
DEFAULT_STEPS = 60
#: Half-width in frames of the temporal logit window when smoothing is on.
SMOOTH = 2
#: Input side for a fresh decoder on a bare backbone under "auto": the shipped backbone's
#: pretraining crop (``views.global_size``), and half the CPU time of 224 px per step or more.
BACKBONE_INPUT = 128
#: Model input side: "auto" (0: a model's own, :data:`BACKBONE_INPUT` for a bare backbone) or
#: a fixed one.
INPUT_SIZES = [("auto size", 0), *((f"{s} px", s) for s in (64, 96, 128, 160, 224))]
TABLE_HEIGHT = 130  # header + 4 rows


# --------------------------------------------------------------------------- helpers


def _start_models() -> list[tuple[str, str]]:
    """Choices ``(label, path)`` to start from: backbones first, then segmentation models."""
    from usfm_core.models.zoo import list_models

    out = []
    for kind, tag in (("backbone", "backbone"), ("segmentation", "")):
        for entry in list_models(model_dir(), kind=kind):
            label = _model_label(entry) + (f" [{tag}]" if tag else "")
            out.append((label, str(entry.path)))
    return out


def default_start_model(choices: list[tuple[str, str]]) -> str | None:
    """The shipped backbone :data:`DEFAULT_BACKBONE` if listed, else the first segmentation
    model (backbones are listed first), else None."""
    for _label, path in choices:
        if Path(path).name == DEFAULT_BACKBONE:
            return path
    from usfm_core.models.zoo import list_models

    seg = {str(e.path) for e in list_models(model_dir(), kind="segmentation")}
    return next((path for _label, path in choices if path in seg), None)


def _slug(name: str) -> str:
    """A folder-name-safe version of a layer name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "image"


def _frame_outline(t: int, shape: tuple[int, int]) -> np.ndarray:
    """Rectangle ``(4, 3)`` ``(t, y, x)`` corners around frame ``t`` of size ``shape``."""
    h, w = shape
    return np.array([[t, 0, 0], [t, 0, w - 1], [t, h - 1, w - 1], [t, h - 1, 0]], float)


def edited_frames(current: np.ndarray, original: np.ndarray) -> list[int]:
    """Frames ``t`` where ``current (T, H, W)`` differs from ``original (T, H, W)``."""
    diff = np.asarray(current) != np.asarray(original)
    return [int(t) for t in np.flatnonzero(diff.reshape(diff.shape[0], -1).any(1))]


# --------------------------------------------------------------------------- workers


def _suggest_job(
    model_ref: str,
    get: Any,
    n: int,
    k: int,
    labelled: list[int],
    input_size: int | None,
    device: str,
    strategy: str = SUGGEST_RULES[0],
):
    """Worker: score every frame (yields frames done, an ``int``), then yields
    ``("result", [Suggestion, ...])`` (:func:`usfm_core.finetune.suggest.select_frames` with
    rule ``strategy``)."""
    _limit_threads()
    from usfm_core.finetune.suggest import iter_score_frames, select_frames

    frames = (get(i) for i in range(n))
    scores = yield from iter_score_frames(
        model_ref, frames, batch_size=4, input_size=input_size, device=device
    )
    yield ("result", select_frames(scores, k, labelled, strategy=strategy))


def _propagate_job(
    out_dir: str,
    start: str,
    frames: np.ndarray,
    labels: dict[int, np.ndarray],
    steps: int,
    smooth: int,
    input_size: int | None,
    device: str,
):
    """Worker: one round of :func:`usfm_core.finetune.rounds.iter_round` in ``out_dir``.

    Warm-starts from the latest round there (``start`` when there is none), fine-tunes on the
    labelled frames ``labels`` (index → ``(H, W)`` uint8 mask; some held back for validation
    once there are enough), segments every frame of ``frames (T, H, W) uint8`` and saves the
    round. Yields ``("progress", info)`` (the dicts of ``iter_propagate``: training steps, then
    frames), then ``("result", RoundResult)``; ``worker.quit()`` stops it at the next step or
    batch of frames and nothing is saved.
    """
    _limit_threads()
    from usfm_core.finetune.rounds import iter_round

    gen = iter_round(
        out_dir,
        frames,
        labels,
        start=start,
        steps=steps,
        smooth=smooth,
        input_size=input_size,
        decoder="auto",
        device=device,
    )
    while True:
        try:
            info = next(gen)
        except StopIteration as stop:
            yield ("result", stop.value)
            return
        yield ("progress", info)


# --------------------------------------------------------------------------- widget


class AnnotateWidget(_Base):
    """Suggest frames to label, propagate painted frames through the cine, correct, retrain."""

    def __init__(self, viewer: Any):
        super().__init__(viewer, labels=True)
        self._image = ComboBox(label="image", choices=_layer_choices(viewer, "Image"))
        self._model = ComboBox(label="start from", choices=lambda _w=None: _start_models())
        self._model.changed.connect(self._describe_model)
        start = default_start_model(_start_models())
        if start is not None:
            self._model.value = start
        self._describe_model()
        self._k = SpinBox(min=1, max=100, value=5, tooltip="number of frames to suggest")
        self._rule = ComboBox(
            choices=SUGGEST_RULES,
            value=SUGGEST_RULES[0],
            tooltip="random: a seeded random sample (best on validation data, "
            "docs/benchmarks/active_learning.md); kcenter: far from the labelled frames, then "
            "where the model is unsure; typical: dense frames of uncovered clusters",
        )
        self._suggest = PushButton(text="Suggest")
        self._table = Table(value={"frame": [], "uncertainty": []})
        self._table.native.setMinimumHeight(TABLE_HEIGHT)
        self._table.native.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self._table.native.cellClicked.connect(self._on_cell)
        self._table.native.setToolTip("click a row to show that frame")
        self._new_labels = PushButton(text="Paint annotations")
        self._steps = SpinBox(min=0, max=5000, value=DEFAULT_STEPS, tooltip="fine-tuning steps")
        self._size = ComboBox(choices=INPUT_SIZES, value=0, tooltip="model input size")
        self._smooth = CheckBox(text=f"temporal smoothing (±{SMOOTH} frames)", value=True)
        self._propagate = PushButton(text="Propagate")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self.progress = _progress_bar("progress")
        _wrap(self._status, lines=3)
        self._accept_scope = ComboBox(
            choices=["edited frames", "current frame", "all frames"],
            tooltip="which propagated frames become annotations",
        )
        self._accept = PushButton(text="Accept")
        self._dir = _file_edit(label="rounds in", mode="d", value=str(model_dir() / "annotate"))
        self._round = _wrap(Label(value=""), lines=4)
        for label in (self._status, self._round):  # full width, text from the left
            label.native.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self._suggest.changed.connect(self.suggest)
        self._new_labels.changed.connect(self._paint)
        self._propagate.changed.connect(self.propagate)
        self._cancel.changed.connect(self.cancel)
        self._accept.changed.connect(self.accept_corrections)
        self._image.changed.connect(self._image_changed)
        self.extend(
            [
                self._image,
                self._model,
                _row("suggest", self._rule),
                _row("k", self._k, self._suggest),
                self._table,
                self._new_labels,
                _row("steps", self._steps, self._size),
                self._smooth,
                _row("", self._propagate, self._cancel),
                self.progress,
                self._status,
                _row("corrections", self._accept_scope, self._accept),
                self._dir,
                self._round,
            ]
        )
        self.suggestions: list[Any] = []
        self.result: Any = None  # the last PropagateResult
        self.saved_round: Any = None  # the last Round saved
        self._original: np.ndarray | None = None  # propagated masks as the model wrote them
        self._auto_dir = str(self._dir.value)
        self._image_changed()

    # ---------------------------------------------------------------- plumbing

    def _describe_model(self, *_: Any) -> None:
        """The start model's description as the drop-down's tooltip."""
        self._model.tooltip = _model_description(self._model.value)[1] or None

    def _set_running(self, running: bool) -> None:
        self._suggest.enabled = self._propagate.enabled = not running
        self._accept.enabled = not running
        self._cancel.enabled = running

    def _image_changed(self, *_: Any) -> None:
        """Follow the image: the rounds folder defaults to ``<model dir>/annotate-<image>``
        (unless the user chose another one) and the round line shows that folder's state."""
        layer = self._image.value
        if layer is None:
            return
        if str(self._dir.value) == self._auto_dir:
            self._auto_dir = str(model_dir() / f"annotate-{_slug(layer.name)}")
            self._dir.value = self._auto_dir
        self._show_round()

    def rounds_dir(self) -> Path:
        """The folder rounds are saved in (the FileEdit's value)."""
        return Path(str(self._dir.value)).expanduser()

    def _show_round(self) -> None:
        from usfm_core.finetune.rounds import latest_round

        try:
            last = latest_round(self.rounds_dir())
        except Exception as exc:  # an unreadable folder: say so, never raise into Qt
            self._round.value = f"rounds folder unreadable: {exc}"
            return
        labelled = len(self.annotated_frames())
        self._round.value = _round_text(last, labelled)

    def _labels_for(self, base: str, create: bool, **kwargs: Any) -> Any:
        """The Labels layer ``base`` matching the image's shape (``base (image name)`` when a
        ``base`` layer of another size is there: it is someone's work and is never removed);
        created empty when ``create``, else None when absent."""
        layer = self._image.value
        if layer is None:
            return None
        shape = _frame_stack_shape(layer)
        names = (base, f"{base} ({layer.name})")
        for name in names:
            if name in self._viewer.layers and self._viewer.layers[name].data.shape == shape:
                return self._viewer.layers[name]
        if not create:
            return None
        free = [name for name in names if name not in self._viewer.layers]
        if not free:
            raise ValueError(
                f"layers '{names[0]}' and '{names[1]}' exist with another size than "
                f"'{layer.name}': rename or delete one"
            )
        return self._viewer.add_labels(
            np.zeros(shape, np.uint8), name=free[0], **_layers.geometry_kwargs(layer), **kwargs
        )

    def annotations_layer(self, create: bool = False) -> Any:
        """The ``annotations`` Labels layer of the image (created empty when ``create``)."""
        return self._labels_for(ANNOTATIONS, create)

    def propagated_layer(self, create: bool = False) -> Any:
        """The ``propagated`` Labels layer of the image, in the prediction colours."""
        return self._labels_for(
            PROPAGATED, create, opacity=0.5, colormap=_layers.prediction_colormap()
        )

    def _paint(self, *_: Any) -> None:
        labels = self.annotations_layer(create=True)
        if labels is None:
            self._notice("open an image first")
            return
        self._viewer.layers.selection.active = labels
        labels.mode = "paint"
        labels.selected_label = 1
        self._notice("paint the structure on a few frames, then Propagate")

    def annotated_frames(self) -> list[int]:
        """Frames with any non-zero pixel in ``annotations``."""
        labels = self.annotations_layer()
        return [] if labels is None else _layers.labelled_frames(labels)

    def jump_to(self, frame: int) -> None:
        """Show ``frame`` of the image (its time axis is the viewer's first axis)."""
        layer = self._image.value
        if layer is None or _layers.n_frames(layer) == 1:
            return
        axis = self._viewer.dims.ndim - _frame_stack_ndim(layer)
        step = list(self._viewer.dims.current_step)
        step[axis] = int(frame)
        self._viewer.dims.current_step = tuple(step)

    def _on_cell(self, row: int, _column: int) -> None:
        if 0 <= row < len(self.suggestions):
            self.jump_to(self.suggestions[row].frame)

    # ---------------------------------------------------------------- suggest

    def suggest(self, *_: Any) -> Any:
        """Pick the frames to label with the chosen rule; fills the table and outlines them."""
        layer = self._image.value
        if layer is None:
            self._notice("open an image first")
            return None
        if not self._model.value:
            self._notice("no backbone or segmentation model found: import one first")
            return None
        n = _layers.n_frames(layer)
        if n < 2:
            self._notice("one frame only: nothing to choose from; paint it and Propagate")
            return None
        if len(self.annotated_frames()) >= n:
            self._notice(f"all {n} frames are painted: nothing left to suggest; Propagate")
            return None
        try:
            device = self._device(default_device())
        except Exception as exc:
            self._notice(str(exc))
            return None
        start = self._start_ref()
        self.progress.max, self.progress.value, self.progress.visible = n, 0, True
        self._notice(f"scoring {n} frames…")
        return self._start(
            _suggest_job,
            start,
            _layers.frame_getter(layer),
            n,
            int(self._k.value),
            self.annotated_frames(),
            self.input_size(start),
            device,
            str(self._rule.value),
            total=n,
            desc="Suggest",
            on_yield=self._on_suggest,
        )

    def _start_ref(self) -> str:
        """The model to start from: the last round's if there is one, else the chosen one."""
        from usfm_core.finetune.rounds import latest_round

        last = latest_round(self.rounds_dir())
        return str(last.path) if last is not None else str(self._model.value)

    def input_size(self, start: str) -> int | None:
        """Model input side for a run from ``start``: the chosen size, else (auto) the model's
        own (None) or :data:`BACKBONE_INPUT` when ``start`` is a bare backbone."""
        from usfm_core.errors import CheckpointError
        from usfm_core.models.zoo import read_entry

        if int(self._size.value):
            return int(self._size.value)
        try:
            kind = read_entry(start).kind
        except CheckpointError:
            return None  # the core reports the bad folder with its fix
        return BACKBONE_INPUT if kind == "backbone" else None

    def _on_suggest(self, item: Any) -> None:
        if isinstance(item, int):
            self.progress.value = min(item, int(self.progress.max))
            return
        _kind, suggestions = item
        self.suggestions = list(suggestions)
        self._table.value = {
            "frame": [s.frame for s in self.suggestions],
            "uncertainty": [
                "—" if s.uncertainty is None else round(float(s.uncertainty), 3)
                for s in self.suggestions
            ],
        }
        self._table.row_headers = tuple(f"#{s.rank}" for s in self.suggestions)
        self._mark(self.suggestions)
        frames = ", ".join(str(s.frame) for s in self.suggestions)
        self._notice(f"paint frames {frames} first (click a row to go there)")

    def _mark(self, suggestions: list[Any]) -> None:
        """Outline the suggested frames (a Shapes layer with the rank as text)."""
        layer = self._image.value
        h, w = _layers.frame_getter(layer)(0).shape[:2]
        shapes = [_frame_outline(s.frame, (h, w)) for s in suggestions]
        ranks = [f"#{s.rank}: label me" for s in suggestions]
        if SUGGESTED in self._viewer.layers:
            self._viewer.layers.remove(SUGGESTED)
        marker = self._viewer.add_shapes(
            shapes,
            shape_type="rectangle",
            name=SUGGESTED,
            edge_color=SUGGEST_COLOR,
            face_color="transparent",
            edge_width=max(2, min(h, w) // 64),
            features={"rank": ranks},
            text={"string": "{rank}", "color": SUGGEST_COLOR, "anchor": "upper_left", "size": 10},
            **_layers.geometry_kwargs(layer),
        )
        marker.editable = False
        # Keep the painting tools on the annotations (or the image) rather than the outlines.
        self._viewer.layers.selection.active = self.annotations_layer() or layer

    # ---------------------------------------------------------------- propagate

    def training_set(self) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """``(frames (T, H, W) uint8, {frame index: mask (H, W) uint8})`` of the image and
        its painted ``annotations`` frames."""
        layer = self._image.value
        if layer is None:
            raise ValueError("open an image first")
        labels = self.annotations_layer()
        labelled = self.annotated_frames()
        if labels is None or not labelled:
            raise ValueError(
                f"nothing painted in '{ANNOTATIONS}': click Paint annotations and paint the "
                "structure on one or a few frames"
            )
        get = _layers.frame_getter(layer)
        frames = np.stack([get(i) for i in range(_layers.n_frames(layer))])
        lab = np.asarray(labels.data)
        masks = {i: (lab if lab.ndim == 2 else lab[i]).astype(np.uint8) for i in labelled}
        return frames, masks

    def propagate(self, *_: Any) -> Any:
        """Fine-tune from the last round (or the chosen model) on every painted frame, segment
        all frames into ``propagated`` and save the next round."""
        try:
            frames, labels = self.training_set()
            device = self._device(default_device())
            start = self._start_ref()
            self._target = self.propagated_layer(create=True)
        except Exception as exc:
            self._notice(str(exc))
            return None
        self.result = self.saved_round = None
        self.frames_done = 0
        self.progress.max, self.progress.value, self.progress.visible = 1, 0, True
        self._notice(f"fine-tuning on {len(labels)} labelled frame(s) from {Path(start).name}…")
        return self._start(
            _propagate_job,
            str(self.rounds_dir()),
            str(self._model.value),
            frames,
            labels,
            int(self._steps.value),
            SMOOTH if self._smooth.value else 0,
            self.input_size(start),
            device,
            total=None,
            desc="Propagate",
            on_yield=self._on_propagate,
            on_done=self._show_round,
        )

    def _on_propagate(self, item: tuple[str, Any]) -> None:
        kind, value = item
        if kind == "progress":
            self._progress(value)
            return
        self.result, self.saved_round = value.propagation, value.info
        if self.saved_round is None:
            self._notice("cancelled: no round saved, the propagated layer is unchanged")
            return
        masks = np.asarray(self.result.masks, np.uint8)
        data = self._target.data
        data[:] = masks if data.ndim == masks.ndim else masks[0]
        self._target.refresh()
        self._original = np.array(data)
        fit, again = self.result.fit_dice, self.result.retried
        fit_note = "" if fit is None else (
            f" (Dice on the painted frames {fit:.2f}"
            f"{', after a second, longer training' if again else ''})"
        )  # fmt: skip
        self._notice(
            f"round {self.saved_round.number} saved{fit_note}: correct masks in "
            f"'{PROPAGATED}', Accept, Propagate again"
        )

    def _progress(self, info: dict[str, Any]) -> None:
        """A progress message of ``propagate``: training steps, then frames segmented."""
        stage = info.get("stage", "train")
        total = int(info.get("total") or info.get("steps") or 0)
        done = int(info.get("done", info.get("step", 0)) or 0)
        if total:
            self.progress.max = max(1, total)
            self.progress.value = min(done, total)
            self.progress.label = stage
        if stage == "segment":
            self.frames_done = done
            self._notice(f"segmenting: {done}/{total} frames")
        elif stage == "retry":
            self._notice(
                f"the model missed the painted frames (Dice {info.get('fit_dice', 0):.2f} on "
                f"them): training again, twice as long: step {done}/{total}"
            )
        elif "loss" in info:
            self._notice(f"fine-tuning: step {done}/{total}  loss {info['loss']:.4f}")

    # ---------------------------------------------------------------- correct

    def accept_corrections(self, *_: Any) -> list[int]:
        """Copy propagated frames into ``annotations``: the edited ones (default), the current
        one, or all; returns the frame indices copied."""
        prop = self.propagated_layer()
        if prop is None or self._original is None:
            self._notice("Propagate first, then correct the propagated masks")
            return []
        data = np.asarray(prop.data)
        stack = data if data.ndim == 3 else data[None]
        original = self._original if self._original.ndim == 3 else self._original[None]
        scope = self._accept_scope.value
        if scope == "all frames":
            frames = list(range(stack.shape[0]))
        elif scope == "current frame":
            frames = [_layers.current_frame(self._viewer, self._image.value)]
        else:
            frames = edited_frames(stack, original)
        if not frames:
            self._notice("no edited frame: correct a propagated mask first (or accept current)")
            return []
        labels = self.annotations_layer(create=True)
        for t in frames:
            if labels.data.ndim == 2:
                labels.data[:] = stack[0]
            else:
                labels.data[t] = stack[t]
        labels.refresh()
        original[frames] = stack[frames]  # accepted: no longer "edited"
        self._notice(f"accepted {len(frames)} frame(s) into '{ANNOTATIONS}'; Propagate again")
        self._show_round()
        return frames


# --------------------------------------------------------------------------- text


def _round_text(last: Any, labelled_now: int) -> str:
    """The round line: number, labelled frames, validation Dice (or what it needs), and what
    the next Propagate trains on."""
    from usfm_core.finetune.rounds import MIN_LABELLED_FOR_VALIDATION

    if last is None:
        return f"round 0 (none saved) · {labelled_now} labelled"
    if last.val_dice is None:
        score = f"Dice needs ≥ {MIN_LABELLED_FOR_VALIDATION} labelled"
    else:
        score = f"Dice {last.val_dice:.2f} on {len(last.held_out)} held back"
    return (
        f"round {last.number} · {len(last.labelled)} labelled · {score} · "
        f"next: round {last.number + 1}, {labelled_now} labelled"
    )


def _row(label: str, *widgets: Any) -> Container:
    """Widgets side by side in one labelled row of the panel."""
    row = Container(layout="horizontal", labels=False, label=label)
    row.margins = (0, 0, 0, 0)
    row.extend(widgets)
    return row


def _frame_stack_ndim(layer: Any) -> int:
    return layer.data.ndim - (1 if getattr(layer, "rgb", False) else 0)


def _frame_stack_shape(layer: Any) -> tuple[int, ...]:
    """Shape of a Labels layer matching ``layer``: ``(T, H, W)`` or ``(H, W)``."""
    shape = tuple(layer.data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape
