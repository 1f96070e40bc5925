"""Dock widgets: Segment, Inspect (self-adaptive masking), Fine-tune, Preprocess.

Each widget only wires napari layers to ``usfm_core`` functions. Long work runs in a napari
generator ``thread_worker`` (one yield per frame / step drives a ``napari.utils.progress`` bar and
incremental layer updates); Cancel calls ``worker.quit()``, which takes effect at the next yield.
torch is imported inside the workers, never at napari start-up, and background work is capped to
leave a core for the GUI.
"""

from __future__ import annotations

import csv
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)
from psygnal import Signal

from napari_usfm import _layers
from napari_usfm._settings import default_device, model_dir, num_threads, precision

FROM_SCRATCH = "(from scratch: tiny VMamba)"
# The shipped OpenUS-pretrained backbone: Fine-tune's default and what Inspect shows.
DEFAULT_BACKBONE = "openus-small-fast"
RUN_FOLDER = "(a pretraining run folder, below)"


class _Events:
    """Plugin-wide signals: a new model was saved (Segment refreshes its model list)."""

    models_changed = Signal()


EVENTS = _Events()


def _limit_threads() -> None:
    """Cap torch's threads for background work so the GUI thread keeps a core."""
    import torch

    torch.set_num_threads(num_threads())


def _layer_choices(viewer: Any, kind: str):
    def choices(_widget: Any = None) -> list[tuple[str, Any]]:
        import napari

        cls = getattr(napari.layers, kind)
        return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, cls)]

    return choices


def _model_label(entry: Any) -> str:
    """Short drop-down label: the model's name, marked when it is the user's own."""
    return entry.name if entry.source == "builtin" else f"{entry.name} (yours)"


def _model_choices(kind: str, extra: tuple[str, ...] = ()):
    """Drop-down choices ``(short name, model path)``; the description goes below the box
    (a full description made the dock ~800 px wide and squeezed the canvas to nothing)."""

    def choices(_widget: Any = None) -> list[tuple[str, str]]:
        from usfm_core.models.zoo import list_models

        found = [(_model_label(e), str(e.path)) for e in list_models(model_dir(), kind=kind)]
        return [(x, x) for x in extra] + found

    return choices


def _prefer(combo: ComboBox, label: str) -> None:
    """Select the choice shown as ``label`` when there is one (else keep the first)."""
    value = combo.get_choice(label)
    if value is not None:
        combo.value = value


def _model_description(path: str | None) -> tuple[str, str]:
    """``(short, full)`` description of the model at ``path`` (``("", "")`` when unknown):
    ``short`` is what the model is for, ``full`` adds its name, kind and source."""
    if not path:
        return "", ""
    from usfm_core.models.zoo import list_models

    for entry in list_models(model_dir()):
        if str(entry.path) == str(path):
            extra = entry.config.get("extra", {}) or {}
            short = entry.info.get("description") or extra.get("description") or ""
            return short, entry.description + _inference_note(extra)
    return "", ""


def _inference_note(extra: dict) -> str:
    """The saved inference options of a model (flip TTA, post-processing) as a tooltip line,
    or ``""``; a malformed entry is left to the loader to report."""
    from usfm_core.finetune.postprocess import PostProcess

    try:
        post = PostProcess.from_dict(extra.get("postprocess"))
    except Exception:
        return ""
    parts = ([f"post-processing: {post.describe()}"] if not post.is_identity else []) + (
        ["flip TTA"] if extra.get("tta") else []
    )
    if extra.get("infer_size"):
        parts.append(f"input {extra['infer_size']}²")
    return ("\n" + "; ".join(parts)) if parts else ""


def _wrap(label: Label, lines: int = 2) -> Label:
    """Word-wrap ``label`` and reserve ``lines`` lines, so a squeezed dock never clips it."""
    label.native.setWordWrap(True)
    metrics = label.native.fontMetrics()
    label.native.setMinimumHeight(metrics.lineSpacing() * lines + 2)
    label.native.setMinimumWidth(0)
    return label


def _describe_into(combo: ComboBox, label: Label) -> None:
    """Keep ``label`` and ``combo``'s tooltip showing what the chosen model is for."""

    def update(*_: Any) -> None:
        short, full = _model_description(combo.value)
        label.value = short
        label.visible = bool(short)
        combo.tooltip = full or None

    _wrap(label, lines=3)
    combo.changed.connect(update)
    update()


def _file_edit(**kwargs: Any) -> FileEdit:
    """A FileEdit with a short "…" button ("Choose directory" alone took 150 px of the dock)."""
    edit = FileEdit(**kwargs)
    edit.choose_btn.text = "…"
    edit.choose_btn.tooltip = "browse"
    return edit


def _progress_bar(label: str = "progress") -> ProgressBar:
    """A progress bar inside the panel (napari's activity dock is collapsed by default)."""
    bar = ProgressBar(label=label, min=0, max=1, value=0, visible=False)
    return bar


class _Base(Container):
    """Shared plumbing: layer pickers that follow the layer list, a status line, a worker."""

    def __init__(self, viewer: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self._viewer = viewer
        self._worker: Any = None
        self.busy = False  # True from start until the worker's `finished` is handled
        self.error: Exception | None = None
        self._status = _wrap(Label(value=""))
        viewer.layers.events.inserted.connect(self._refresh)
        viewer.layers.events.removed.connect(self._refresh)

    def _refresh(self, *_: Any) -> None:
        self.reset_choices()

    def _notice(self, text: str) -> None:
        self._status.value = text

    def _device(self, choice: str) -> str:
        from usfm_core.utils import resolve_device

        dev = resolve_device(choice)
        if dev == "cpu":
            self._notice("running on CPU (no CUDA GPU selected/found): this can take a while")
        return dev

    def _start(
        self,
        gen_func: Any,
        *args: Any,
        total: int | None,
        desc: str,
        on_yield: Any,
        on_done: Any = None,
    ) -> Any:
        from napari.qt.threading import thread_worker

        progress = {"total": total, "desc": desc} if total else True
        worker = thread_worker(gen_func, progress=progress, start_thread=False)(*args)
        worker.yielded.connect(on_yield)
        worker.errored.connect(self._errored)
        worker.finished.connect(lambda: self._finished(on_done))
        self._worker = worker
        self.error = None
        self.busy = True
        self._set_running(True)
        worker.start()
        return worker

    def _errored(self, exc: Exception) -> None:
        self.error = exc
        self._notice(f"error: {exc}")

    def _finished(self, on_done: Any) -> None:
        self.busy = False
        self._set_running(False)
        if on_done is not None and self.error is None:
            on_done()

    def _set_running(self, running: bool) -> None:
        """Enable / disable the run and cancel buttons (subclasses own them)."""

    def cancel(self) -> None:
        """Ask the running worker to stop at its next frame / step."""
        if self._worker is not None:
            self._worker.quit()
            self._notice("cancelling…")


# --------------------------------------------------------------------------- Segment


def _segment_job(
    model_path: str,
    device: str,
    get: Any,
    indices: list[int],
    spacing: tuple[float, float] | None,
    names: tuple[str, str] = ("", ""),
):
    """Worker: load a fine-tuned segmenter, yield ``(frame, mask (H, W) uint8, rows)`` with the
    rows of ``measurements.csv`` (``usfm_core.finetune.infer.measurement_rows``; ``names``: the
    layer name and its source file)."""
    _limit_threads()
    from usfm_core.finetune.infer import measurement_rows, segment_frames
    from usfm_core.finetune.models import load_finetuned

    model, _ = load_finetuned(model_path, device=device)
    frames = (get(i) for i in indices)
    calibration = "layer scale" if spacing else "none"
    masks = segment_frames(model, frames, batch_size=1, device=device, precision=precision())
    for i, mask in zip(indices, masks):
        rows = measurement_rows(
            mask, spacing, file=names[0], source=names[1], frame=i, calibration=calibration
        )
        yield i, mask, rows


def _name_classes(labels: Any, model_ref: str) -> None:
    """Put the model's class names in the Labels layer's features (napari shows the class of
    the label under the cursor); a model whose config cannot be read is left unnamed."""
    from usfm_core.finetune.infer import label_names
    from usfm_core.models.zoo import find_model

    try:
        names = {k: v for k, v in label_names(find_model(model_ref).config).items() if k != 255}
    except Exception:  # naming is a convenience: never block segmentation on it
        return
    ids = sorted(names)
    labels.features = {"index": [0, *ids], "class": ["background", *(names[i] for i in ids)]}


class SegmentWidget(_Base):
    """Run a segmentation model on the current frame, all frames or a frame range."""

    def __init__(self, viewer: Any):
        super().__init__(viewer, labels=True)
        self._image = ComboBox(label="image", choices=_layer_choices(viewer, "Image"))
        self._model = ComboBox(label="model", choices=_model_choices("segmentation"))
        self._model_info = Label(value="")
        _describe_into(self._model, self._model_info)
        self._model_path = _file_edit(label="or folder", mode="d", value="")
        self._device_choice = ComboBox(
            label="device", choices=["auto", "cpu", "cuda"], value=default_device()
        )
        self._scope = ComboBox(
            label="frames",
            value="all frames",
            choices=["current frame", "all frames", "frame range"],
        )
        self._first = SpinBox(label="from", min=0, max=100000, value=0)
        self._last = SpinBox(label="to", min=0, max=100000, value=0)
        self._run = PushButton(text="Segment")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self.progress = _progress_bar("frames")
        # Same rows and numbering as usfm-core segment's measurements.csv (units in the names).
        self._columns = _summary_columns("mm")
        _wrap(self._status, lines=5)  # the done line names the largest object's circumference
        self._table = Table(value={key: [] for key in self._columns})
        self._csv = _file_edit(label="save to", mode="w", filter="*.csv", value="measurements.csv")
        self._save = PushButton(text="Save measurements")
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._save.changed.connect(self.save_measurements)
        self.extend(
            [
                self._image,
                self._model,
                self._model_info,
                self._model_path,
                self._device_choice,
                self._scope,
                self._first,
                self._last,
                self._run,
                self._cancel,
                self.progress,
                self._status,
                self._table,
                self._csv,
                self._save,
            ]
        )
        self.rows: list[dict[str, Any]] = []
        self.labels_layer: Any = None
        EVENTS.models_changed.connect(self._models_changed)

    def _set_running(self, running: bool) -> None:
        self._run.enabled, self._cancel.enabled = not running, running

    def _models_changed(self) -> None:
        try:
            self.reset_choices()
        except RuntimeError:  # this widget's Qt side was closed: stop listening
            EVENTS.models_changed.disconnect(self._models_changed)

    def select_model(self, name: str) -> bool:
        """Pick the listed model called ``name`` (shipped or user); False if none is listed."""
        from usfm_core.models.zoo import list_models

        for entry in list_models(model_dir(), kind="segmentation"):
            if entry.name == name and str(entry.path) in self._model.choices:
                self._model.value = str(entry.path)
                return True
        return False

    def _model_ref(self) -> str:
        chosen = str(self._model_path.value or "")
        if chosen and chosen != "." and Path(chosen).is_dir():
            return chosen
        if not self._model.value:
            raise ValueError(
                "no segmentation model: fine-tune one (Fine-tune widget) or pick a model folder"
            )
        return str(self._model.value)

    def _indices(self, layer: Any) -> list[int]:
        n = _layers.n_frames(layer)
        if self._scope.value == "current frame":
            return [_layers.current_frame(self._viewer, layer)]
        if self._scope.value == "frame range":
            lo, hi = sorted((int(self._first.value), int(self._last.value)))
            return list(range(max(lo, 0), min(hi, n - 1) + 1))
        return list(range(n))

    def run(self, *_: Any) -> Any:
        """Start segmenting; results stream into a Labels layer ``<image> segmentation``."""
        layer = self._image.value
        if layer is None:
            self._notice("open an image first")
            return None
        try:
            model_path = self._model_ref()
            device = self._device(self._device_choice.value)
        except Exception as exc:  # user-fixable: show it, don't raise into Qt
            self._notice(str(exc))
            return None
        indices = self._indices(layer)
        self.labels_layer = self._ensure_labels(layer)
        _name_classes(self.labels_layer, model_path)
        self.rows = []
        self.frames_done: list[int] = []
        self._table_updated = 0.0
        self._labels_refreshed = 0.0
        spacing = _layers.spacing_mm(layer)
        self._columns = _summary_columns("mm" if spacing else "px")
        source = str(getattr(getattr(layer, "source", None), "path", None) or "")
        self.progress.max, self.progress.value, self.progress.visible = len(indices), 0, True
        return self._start(
            _segment_job,
            model_path,
            device,
            _layers.frame_getter(layer),
            indices,
            spacing,
            (layer.name, source),
            total=len(indices),
            desc="Segment",
            on_yield=self._on_frame,
            on_done=self._segment_done,
        )

    def _ensure_labels(self, layer: Any) -> Any:
        name = f"{layer.name} segmentation"
        shape = layer.data.shape[:-1] if getattr(layer, "rgb", False) else layer.data.shape
        if name in self._viewer.layers and self._viewer.layers[name].data.shape == shape:
            return self._viewer.layers[name]
        data = np.zeros(shape, dtype=np.uint8)
        return self._viewer.add_labels(
            data,
            name=name,
            opacity=0.5,
            colormap=_layers.prediction_colormap(),
            **_layers.geometry_kwargs(layer),
        )

    def _on_frame(self, item: tuple[int, np.ndarray, dict]) -> None:
        index, mask, measures = item
        self.frames_done.append(index)
        self.progress.value = len(self.frames_done)
        data = self.labels_layer.data
        if data.ndim == 2:
            data[:] = mask
        else:
            data[index] = mask
        # Redraw when the shown frame changed, else at most 4 times a second (redraws cost
        # GUI time; the data is already in place for when the user scrolls).
        now = time.perf_counter()
        image = self._image.value
        shown = image is not None and index == _layers.current_frame(self._viewer, image)
        if shown or now - self._labels_refreshed > 0.25:
            self.labels_layer.refresh()
            self._labels_refreshed = now
        self.rows.extend(measures)
        # Rebuilding the table is O(rows): do it at most twice a second (and once at the end).
        now = time.perf_counter()
        if now - self._table_updated > 0.5:
            self._update_table()
            self._table_updated = now

    def _update_table(self) -> None:
        self._table.value = {
            key: [_shown(r.get(key, "")) for r in self.rows] for key in self._columns
        }

    def _segment_done(self) -> None:
        self.labels_layer.refresh()
        self._update_table()
        self._table.native.resizeColumnsToContents()  # the numbers, not just the first columns
        done = f"segmented {len(self.frames_done)} frame(s), {len(self.rows)} object(s)"
        self._notice(done + _largest_object_line(self.rows))

    def save_measurements(self, *_: Any) -> Path | None:
        """Write the measurements as CSV: the columns of ``usfm-core segment``'s
        ``measurements.csv`` (units in the names: ``area_mm2``, ``circumference_mm``, …)."""
        from usfm_core.finetune.infer import MEASUREMENT_COLUMNS
        from usfm_core.utils import atomic_path

        if not self.rows:
            self._notice("nothing to save yet: run Segment first")
            return None
        path = Path(self._csv.value)
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=MEASUREMENT_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        self._notice(f"saved {path}")
        return path


def _largest_object_line(rows: list[dict[str, Any]]) -> str:
    """``"; largest: circumference 170.7 mm, fit IoU 0.98"`` (IoU of the ellipse fit) for the
    largest object of a one-frame result (what a user segmenting one image looks for first,
    visible without scrolling the table), else ``""``."""
    objects = [r for r in rows if r.get("object") not in ("", None)]
    if not objects or len({r.get("frame") for r in rows}) != 1:
        return ""
    top = objects[0]  # rows are numbered largest first
    unit = "mm" if top.get("unit") == "mm" else "px"
    circ = float(top.get(f"circumference_{unit}") or "nan")
    iou = float(top.get("ellipse_iou") or "nan")
    return f"; largest: circumference {circ:.1f} {unit}, fit IoU {iou:.2f}"


def _summary_columns(unit: str) -> tuple[str, ...]:
    """Columns of the Segment table (``usfm_core.finetune.infer.summary_columns``)."""
    from usfm_core.finetune.infer import summary_columns

    return summary_columns(unit)


def _shown(value: Any) -> Any:
    """A table cell: floats with 3 decimals."""
    return round(value, 3) if isinstance(value, float) else value


# --------------------------------------------------------------------------- Fine-tune


def _finetune_job(
    images: np.ndarray,
    masks: np.ndarray,
    out_dir: str,
    backbone: str | None,
    epochs: int,
    lr: float,
    freeze: bool,
    device: str,
    input_size: int,
):
    """Worker: run :func:`usfm_core.finetune.train.finetune` in a thread, yield its progress."""
    _limit_threads()
    from usfm_core.finetune.train import finetune

    messages: queue.Queue = queue.Queue()
    stop = threading.Event()
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = finetune(
                "segmentation",
                (images, masks),
                out_dir,
                backbone_ckpt=backbone,
                epochs=epochs,
                lr=lr,
                # unticked: the default rule (frozen under the small-structure decoder)
                freeze_backbone=True if freeze else None,
                device=device,
                input_size=input_size,
                decoder="auto",
                batch_size=min(8, len(images)),
                patience=epochs,
                progress=messages.put,
                cancel=stop.is_set,
            )
        except Exception as exc:  # surfaced in the GUI through the worker
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not messages.empty():
            try:
                yield messages.get(timeout=0.1)
            except queue.Empty:
                continue
    finally:  # worker.quit() lands here: tell the training loop to stop
        stop.set()
        thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


class FinetuneWidget(_Base):
    """Fine-tune a segmentation model from a few painted frames, off the GUI thread."""

    def __init__(self, viewer: Any):
        super().__init__(viewer, labels=True)
        self._image = ComboBox(label="image", choices=_layer_choices(viewer, "Image"))
        self._labels = ComboBox(label="labels", choices=_layer_choices(viewer, "Labels"))
        self._backbone = ComboBox(
            label="backbone", choices=_model_choices("backbone", (FROM_SCRATCH,))
        )
        _prefer(self._backbone, DEFAULT_BACKBONE)
        self._backbone_info = Label(value="")
        _describe_into(self._backbone, self._backbone_info)
        self._epochs = SpinBox(label="epochs", min=1, max=1000, value=30)
        self._lr = FloatSpinBox(label="learning rate", min=1e-6, max=1.0, step=1e-4, value=1e-3)
        self._freeze = CheckBox(label="freeze backbone", value=False)
        self._size = ComboBox(label="input size", choices=[64, 96, 128, 160, 224], value=128)
        self._device_choice = ComboBox(
            label="device", choices=["auto", "cpu", "cuda"], value=default_device()
        )
        self._name = LineEdit(label="model name", value="my-segmenter")
        self._run = PushButton(text="Fine-tune")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self.progress = _progress_bar("steps")
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self.extend(
            [
                self._image,
                self._labels,
                self._backbone,
                self._backbone_info,
                self._epochs,
                self._lr,
                self._freeze,
                self._size,
                self._device_choice,
                self._name,
                self._run,
                self._cancel,
                self.progress,
                self._status,
            ]
        )
        _wrap(self._status, lines=5)  # the saved line: the decoder chosen, why, and if frozen
        self.losses: list[float] = []
        self.out_dir: Path | None = None

    def _set_running(self, running: bool) -> None:
        self._run.enabled, self._cancel.enabled = not running, running

    def training_set(self) -> tuple[np.ndarray, np.ndarray]:
        """``(images (N, H, W) uint8, masks (N, H, W) uint8)`` of the painted frames only."""
        image, labels = self._image.value, self._labels.value
        if image is None or labels is None:
            raise ValueError("choose an image layer and a Labels layer with painted frames")
        frames = _layers.labelled_frames(labels)
        if not frames:
            raise ValueError(f"'{labels.name}' has no painted pixels: paint a few frames first")
        get = _layers.frame_getter(image)
        lab = labels.data
        images = np.stack([get(i) for i in frames])
        masks = np.stack([np.asarray(lab if lab.ndim == 2 else lab[i]) for i in frames])
        if images.shape != masks.shape:
            raise ValueError(
                f"image frames {images.shape[1:]} and labels {masks.shape[1:]} differ in size"
            )
        return images, masks.astype(np.uint8)

    def run(self, *_: Any) -> Any:
        """Start fine-tuning into ``<model dir>/<model name>``."""
        try:
            images, masks = self.training_set()
            device = self._device(self._device_choice.value)
        except Exception as exc:
            self._notice(str(exc))
            return None
        backbone = None if self._backbone.value == FROM_SCRATCH else str(self._backbone.value)
        self.out_dir = model_dir() / str(self._name.value).strip().replace(os.sep, "_")
        self.losses = []
        self._notice(f"training on {len(images)} labelled frame(s)…")
        epochs = int(self._epochs.value)
        self.progress.max, self.progress.value, self.progress.visible = 1, 0, True
        return self._start(
            _finetune_job,
            images,
            masks,
            str(self.out_dir),
            backbone,
            epochs,
            float(self._lr.value),
            bool(self._freeze.value),
            device,
            int(self._size.value),
            total=None,
            desc="Fine-tune",
            on_yield=self._on_progress,
            on_done=self._done,
        )

    def _on_progress(self, info: dict[str, Any]) -> None:
        if info.get("steps") and info.get("step") is not None:
            self.progress.max = max(1, int(info["steps"]))
            self.progress.value = min(int(info["step"]), int(self.progress.max))
        if "loss" in info:
            self.losses.append(float(info["loss"]))
            self._notice(
                f"epoch {info.get('epoch', '?')}  step {info.get('step', '?')}  "
                f"loss {info['loss']:.4f}"
            )

    def _done(self) -> None:
        from usfm_core.errors import CheckpointError
        from usfm_core.models.zoo import read_entry

        if self.out_dir is None:
            return
        try:
            entry = read_entry(self.out_dir)
        except CheckpointError:
            self._notice("stopped before a model was saved")
            return
        extra = entry.config.get("extra") or {}
        choice = extra.get("decoder_choice") or {}
        width = choice.get("median_width_px")
        if width:  # which decoder "auto" chose, and why (4 lines in a narrow dock; 5 reserved)
            decoder = choice["decoder"]
            frozen = ", backbone frozen" if extra.get("freeze_backbone") else ""
            self._notice(
                f"saved {self.out_dir.name}: {decoder} (≈ {width:.0f} px structures){frozen}"
            )
        else:
            self._notice(f"saved {self.out_dir.name}: now selectable in Segment")
        EVENTS.models_changed.emit()


# --------------------------------------------------------------------------- Preprocess


class PreprocessWidget(_Base):
    """Scan-region mask and annotation removal on the current frame, shown as layers."""

    def __init__(self, viewer: Any):
        super().__init__(viewer, labels=True)
        self._image = ComboBox(label="image", choices=_layer_choices(viewer, "Image"))
        self._ocr = CheckBox(label="OCR text (Tesseract)", value=True)
        self._detect = PushButton(text="Detect")
        self._apply = PushButton(text="Apply to layer (current frame)", enabled=False)
        self._detect.changed.connect(self.detect)
        self._apply.changed.connect(self.apply)
        self.extend([self._image, self._ocr, self._detect, self._apply, self._status])
        self.result: Any = None
        self._frame = 0

    def detect(self, *_: Any) -> Any:
        """Compute region mask + annotation mask + cleaned frame, add them as layers."""
        from usfm_core.preprocess import remove_annotations, scan_region_mask

        layer = self._image.value
        if layer is None:
            self._notice("open an image first")
            return None
        self._frame = _layers.current_frame(self._viewer, layer)
        frame = _layers.frame_getter(layer)(self._frame)
        region = scan_region_mask(frame)
        self.result = remove_annotations(
            frame, region_mask=region, use_ocr="auto" if self._ocr.value else False
        )
        geo = _layers.frame_geometry(layer)
        self._put(f"{layer.name} scan region", region.astype(np.uint8), "labels", geo, opacity=0.25)
        self._put(
            f"{layer.name} annotations",
            self.result.mask.astype(np.uint8) * 2,
            "labels",
            geo,
            opacity=0.7,
        )
        self._put(f"{layer.name} cleaned", self.result.clean, "image", geo, visible=False)
        self._apply.enabled = True
        self._notice(
            f"region {region.mean():.0%} of the frame; "
            f"{int(self.result.mask.sum())} annotation pixels"
        )
        return self.result

    def _put(self, name: str, data: np.ndarray, kind: str, geo: dict, **kw: Any) -> None:
        if name in self._viewer.layers:
            self._viewer.layers[name].data = data
            return
        add = self._viewer.add_labels if kind == "labels" else self._viewer.add_image
        add(data, name=name, **geo, **kw)

    def apply(self, *_: Any) -> None:
        """Write the cleaned frame into the image layer (in memory; the file is untouched)."""
        layer = self._image.value
        if layer is None or self.result is None:
            return
        clean = self.result.clean
        if _layers.n_frames(layer) == 1 and not getattr(layer, "rgb", False):
            layer.data = clean
        else:
            data = np.array(layer.data)  # lazy stacks become an in-memory copy
            frame = data[self._frame]
            data[self._frame] = clean if frame.ndim == 2 else clean[..., None]
            layer.data = data
        self._notice("annotations removed from the layer (current frame)")


# --------------------------------------------------------------------------- Inspect


_INSPECT_CACHE: dict[tuple[str, str, float], Any] = {}


def _inspect_model(checkpoint: str, device: str) -> Any:
    """The module :func:`usfm_core.pretrain.inspect.load_run` builds for ``checkpoint``,
    kept for the next frame (one entry; a rewritten checkpoint is loaded again)."""
    from usfm_core.pretrain.inspect import load_run

    path = Path(checkpoint)
    stamp = max(
        (f.stat().st_mtime for f in (path / "checkpoints" / "last", path) if f.exists()),
        default=0.0,
    )
    key = (str(path), device, stamp)
    if key not in _INSPECT_CACHE:
        _INSPECT_CACHE.clear()
        _INSPECT_CACHE[key] = load_run(checkpoint, device)
    return _INSPECT_CACHE[key]


def _inspect_choices(_widget: Any = None) -> list[tuple[str, str]]:
    """Backbones that carry a reconstruction head (shipped first), then a run folder."""
    from usfm_core.models.zoo import list_models

    found = [
        (_model_label(e), str(e.path))
        for e in list_models(model_dir(), kind="backbone")
        if e.has_inspect
    ]
    return [*found, (RUN_FOLDER, RUN_FOLDER)]


def _inspect_job(
    checkpoint: str, frame: np.ndarray, alpha: float, r: float, ratio: float, size: int, device: str
):
    """Worker: teacher attention, student loss map, ALP, mask and reconstruction of a frame."""
    _limit_threads()
    from usfm_core.pretrain.inspect import inspect_frame

    model = _inspect_model(checkpoint, device)
    yield inspect_frame(model, frame, alpha=alpha, r=r, ratio=ratio, size=size, device=device)


class InspectWidget(_Base):
    """Heatmaps of OpenUS's self-adaptive masking for the current frame: the shipped
    pretrained backbone's (default) or those of a pretraining run folder."""

    def __init__(self, viewer: Any):
        super().__init__(viewer, labels=True)
        self._image = ComboBox(label="image", choices=_layer_choices(viewer, "Image"))
        self._model = ComboBox(label="model", choices=_inspect_choices)
        _prefer(self._model, DEFAULT_BACKBONE)
        self._model_info = Label(value="")
        _describe_into(self._model, self._model_info)
        _wrap(self._model_info, lines=4)
        self._ckpt = _file_edit(label="run folder", mode="d", value="")
        # Choosing a folder means inspecting it.
        self._ckpt.changed.connect(self._on_folder)
        self._alpha = FloatSlider(label="α (loss share)", min=0.0, max=1.0, value=0.5)
        self._r = FloatSlider(label="r (ALP share)", min=0.0, max=1.0, value=0.5)
        self._ratio = FloatSlider(label="mask ratio", min=0.05, max=0.95, value=0.6)
        self._size = ComboBox(label="input size", choices=[64, 128, 224], value=224)
        self._follow = CheckBox(label="update on frame change", value=True)
        self._run = PushButton(text="Inspect")
        self._run.changed.connect(self.run)
        self.extend(
            [
                self._image,
                self._model,
                self._model_info,
                self._ckpt,
                self._alpha,
                self._r,
                self._ratio,
                self._size,
                self._follow,
                self._run,
                self._status,
            ]
        )
        viewer.dims.events.current_step.connect(self._on_step)
        self.result: Any = None

    def _on_folder(self, *_: Any) -> None:
        folder = str(self._ckpt.value or "")
        if folder and folder != ".":
            self._model.value = RUN_FOLDER

    def checkpoint(self) -> str:
        """What is inspected: the chosen model's folder, or the run folder below it."""
        if self._model.value != RUN_FOLDER:
            return str(self._model.value or "")
        folder = str(self._ckpt.value or "")
        return "" if folder == "." else folder

    def _on_step(self, *_: Any) -> None:
        if self._follow.value and self.result is not None and self._worker_idle():
            self.run()

    def _worker_idle(self) -> bool:
        return not self.busy

    def run(self, *_: Any) -> Any:
        """Compute the maps for the current frame in a worker; layers update when done."""
        layer = self._image.value
        ckpt = self.checkpoint()
        if layer is None or not ckpt:
            self._notice("choose an image and a model (or a pretraining run folder)")
            return None
        frame = _layers.frame_getter(layer)(_layers.current_frame(self._viewer, layer))
        return self._start(
            _inspect_job,
            ckpt,
            frame,
            float(self._alpha.value),
            float(self._r.value),
            float(self._ratio.value),
            int(self._size.value),
            "cpu",
            total=1,
            desc="Inspect",
            on_yield=self._show,
        )

    def _show(self, result: Any) -> None:
        self.result = result
        layer = self._image.value
        geo = _layers.frame_geometry(layer) if layer is not None else {}
        # One heatmap visible at a time reads best over B-mode: ALP on, its two inputs off.
        maps = [
            ("teacher attention", result.attention, "inferno", False),
            ("student loss", result.loss_map, "viridis", False),
            ("ALP score", result.alp, "magma", True),
        ]
        for name, data, cmap, visible in maps:
            self._set_image(
                name,
                data,
                geo,
                colormap=cmap,
                opacity=0.45,
                blending="translucent",
                contrast_limits=(0.0, 1.0),
                visible=visible,
            )
        self._set_image("masked input", result.masked_input, geo, colormap="gray", visible=False)
        self._set_image(
            "reconstruction", result.reconstruction, geo, colormap="gray", visible=False
        )
        # Short: a wrapped status line in a narrow dock was clipped at 1280×720.
        self._notice(
            f"masked {result.mask.mean():.0%} of {result.mask.size} cells, "
            f"r={result.r:.2f}, α={result.alpha:.2f}"
        )

    def _set_image(self, name: str, data: np.ndarray, geo: dict, **kw: Any) -> None:
        if name in self._viewer.layers:
            self._viewer.layers[name].data = data
        else:
            self._viewer.add_image(data, name=name, **geo, **kw)
