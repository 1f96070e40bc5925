"""Folder → pretraining frames: the whole preprocessing chain, restart-safe and parallel.

For every scan under the input folder: sample frames (3 fps), find the scan region (one mask
per source, from the temporal statistics of its sampled frames), inpaint annotations, convert to
grey, rescale intensities inside the region (2nd–98th percentile), blank what lies outside it,
crop to the region and optionally resize. Outputs::

    OUT/frames/<relative-source-stem>_f<idx>.png   grey uint8 frames
    OUT/region_masks/<relative-source-stem>.png    region mask aligned with the frames (0/255)
    OUT/manifest.csv                               one row per frame (MANIFEST_COLUMNS)
    OUT/summary.json                               counts, failures, seconds
    OUT/.done/<relative-source>.json               per-source completion markers

Every file is written atomically; a source counts as done only once its marker exists, and the
manifest is rebuilt from the markers at the end, so an interrupted run leaves no half-written
file and a re-run skips finished sources. Output names follow :mod:`usfm_core.outputs` (unique
ignoring case, from the relative source path); the only files ever deleted are the toolkit's own
temporaries of killed runs (``.usfm-tmp-<pid>-…``) in the folders written here. The simulator's
ground truth (``ground_truth/`` folders, and the older ``X_lesions.tif`` … beside ``X_meta.json``)
is never taken for a scan. Worker processes end when the parent process dies.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from usfm_core.errors import USFMError
from usfm_core.outputs import GROUND_TRUTH_DIR, clean_stale_temporaries
from usfm_core.outputs import output_stems as output_stems  # re-exported (was defined here)
from usfm_core.preprocess.annotations import remove_annotations, text_mask
from usfm_core.preprocess.frames import sample_frame_indices
from usfm_core.preprocess.intensity import (
    keep_aspect_scale,
    percentile_rescale,
    resize_keep_aspect,
    to_uint8,
)
from usfm_core.preprocess.region import region_bbox, scan_region_mask, to_gray
from usfm_core.utils import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

MANIFEST_COLUMNS: tuple[str, ...] = (
    "png",
    "source",
    "frame_index",
    "spacing_dy_mm",
    "spacing_dx_mm",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "n_annotation_px",
    "fps",
    "region_mask",
)
# Files that are certainly not scans (notes, tables, configs) are not even tried.
SKIP_SUFFIXES = frozenset({".csv", ".txt", ".json", ".md", ".yaml", ".yml", ".xml", ".log", ".py"})
# Frames of one source used to estimate its region mask (temporal max/std).
REGION_FRAMES = 16
MARKER_DIR = ".done"
MARKER_VERSION = 2  # 2: the output stem is part of the fingerprint
# Folders of OUT this pipeline writes (inputs may not live there; stale temporaries are cleaned).
OUTPUT_SUBDIRS = ("frames", "region_masks", MARKER_DIR)
# Ground truth the simulator of older versions wrote beside X.ext when X_meta.json exists.
LEGACY_SIM_SIDECARS = ("_lesions.tif", "_annotations.tif", "_region.tif", "_clean.tif")


@dataclass(frozen=True)
class PreprocessOptions:
    """Settings of one preprocessing run (stored in the markers: changing them redoes work)."""

    target_fps: float | None = 3.0
    max_frames_per_clip: int | None = 64
    remove_text: bool = True
    crop: bool = True
    size: int | None = None
    use_ocr: bool | Literal["auto"] = "auto"
    deidentify: bool = False  # names are pseudonyms; OCR text mask of preprocess.deidentify


@dataclass
class PreprocessSummary:
    """What a run did: ``manifest`` path, source/frame counts, failures ``(source, reason)``."""

    manifest: Path
    n_sources: int = 0
    n_processed: int = 0
    n_skipped: int = 0
    n_frames: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _is_simulator_ground_truth(path: Path, rel: Path) -> bool:
    """True inside a ``ground_truth/`` folder, or for an older simulator side file."""
    if any(part.casefold() == GROUND_TRUTH_DIR for part in rel.parts[:-1]):
        return True
    name = path.name
    for tail in LEGACY_SIM_SIDECARS:
        if name.endswith(tail) and path.with_name(name[: -len(tail)] + "_meta.json").is_file():
            return True
    return False


def find_sources(in_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Candidate scan files under ``in_dir`` (recursive, sorted), skipping hidden files, notes
    and tables, the simulator's ground truth, and anything inside ``out_dir``."""
    out_resolved = out_dir.resolve() if out_dir is not None else None
    found = []
    for path in sorted(in_dir.rglob("*")):
        rel = path.relative_to(in_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in SKIP_SUFFIXES or _is_simulator_ground_truth(path, rel):
            continue
        if out_resolved is not None and out_resolved in path.resolve().parents:
            continue
        found.append(path)
    return found


def _fingerprint(source: Path, options: PreprocessOptions, stem: str) -> dict[str, Any]:
    """What a completion marker must match for its source to be skipped (``stem``: the output
    name, which changes when a new source would clash with it)."""
    stat = source.stat()
    return {
        "version": MARKER_VERSION,
        "stem": stem,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "options": asdict(options),
    }


def _frames_to_uint8(frames: list[np.ndarray]) -> list[np.ndarray]:
    """uint16/float frames (DICOM, NIfTI, TIFF) → uint8 with one window for the whole source."""
    if all(f.dtype == np.uint8 for f in frames):
        return frames
    stack = np.stack([np.asarray(f, dtype=np.float32) for f in frames])
    lo, hi = np.percentile(stack, [0.5, 99.5])
    scaled = np.zeros_like(stack) if hi <= lo else (stack - lo) / (hi - lo)
    return list(to_uint8(scaled))


def _encode_png(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 grey
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _prepare_frame(
    frame: np.ndarray,
    region: np.ndarray,
    bbox: tuple[int, int, int, int],
    options: PreprocessOptions,
    static_text: np.ndarray | None,
) -> tuple[np.ndarray, int]:
    """One (H, W[, 3]) uint8 frame → (output grey uint8 frame, inpainted pixel count).

    ``static_text``: the clip's OCR text mask computed once (cines), or None to run OCR here.
    """
    n_annotation = 0
    if options.remove_text:
        use_ocr = False if static_text is not None else options.use_ocr
        result = remove_annotations(
            frame, region_mask=region, use_ocr=use_ocr, extra_text_mask=static_text
        )
        frame, n_annotation = result.clean, int(result.mask.sum())
    gray = to_uint8(percentile_rescale(to_gray(frame), mask=region))
    gray[~region] = 0  # leftover labels and bars outside the scan
    y0, x0, y1, x1 = bbox
    gray = gray[y0:y1, x0:x1]
    if options.size:
        gray = resize_keep_aspect(gray, options.size, pad=True)
    return gray, n_annotation


def process_source(
    source: Path, rel: Path, stem: str, out_dir: Path, options: PreprocessOptions
) -> list[dict[str, Any]]:
    """Preprocess one scan; write its frames, region mask and completion marker.

    Returns the manifest rows (dicts keyed by ``MANIFEST_COLUMNS``). Raises
    :class:`~usfm_core.errors.ScanReadError` for unreadable files.
    """
    from usfm_core.io import load_scan

    fingerprint = _fingerprint(source, options, stem)
    with load_scan(source) as scan:
        indices = sample_frame_indices(
            scan.n_frames, scan.fps, options.target_fps, options.max_frames_per_clip
        )
        frames = _frames_to_uint8([scan.frame(i) for i in indices])
        spacing, fps = scan.spacing_mm, scan.fps
    if not frames:
        raise USFMError("the scan has no frames", path=source)
    step = max(1, len(frames) // REGION_FRAMES)
    region_input = frames[0] if len(frames) == 1 else np.stack(frames[::step])
    region = scan_region_mask(region_input)
    h, w = region.shape
    bbox = region_bbox(region) if options.crop else (0, 0, h, w)
    y0, x0, y1, x1 = bbox
    scale = keep_aspect_scale((y1 - y0, x1 - x0), options.size) if options.size else 1.0
    dy, dx = (s / scale for s in spacing) if spacing else ("", "")

    mask_out = (region[y0:y1, x0:x1] * 255).astype(np.uint8)
    if options.size:
        mask_out = resize_keep_aspect(mask_out, options.size, pad=True)
        mask_out = np.where(mask_out >= 128, 255, 0).astype(np.uint8)
    mask_rel = f"region_masks/{stem}.png"
    atomic_write_bytes(out_dir / mask_rel, _encode_png(mask_out))

    # Burned-in text does not move: OCR a cine once (its first frame), not every frame.
    static_text = None
    if options.remove_text and options.use_ocr is not False and len(frames) > 1:
        static_text = text_mask(to_gray(frames[0]), region, options.use_ocr)
    if options.deidentify:
        from usfm_core.preprocess.deidentify import preprocess_text_mask

        static_text = preprocess_text_mask(frames, static_text, options.use_ocr)
    rows = []
    for index, frame in zip(indices, frames):
        image, n_annotation = _prepare_frame(frame, region, bbox, options, static_text)
        png_rel = f"frames/{stem}_f{index:05d}.png"
        atomic_write_bytes(out_dir / png_rel, _encode_png(image))
        rows.append(
            {
                "png": png_rel,
                "source": rel.as_posix(),
                "frame_index": index,
                "spacing_dy_mm": dy,
                "spacing_dx_mm": dx,
                "bbox_y0": y0,
                "bbox_x0": x0,
                "bbox_y1": y1,
                "bbox_x1": x1,
                "n_annotation_px": n_annotation,
                "fps": fps if fps else "",
                "region_mask": mask_rel,
            }
        )
    marker = {"fingerprint": fingerprint, "rows": rows}
    atomic_write_text(_marker_path(out_dir, rel), json.dumps(marker, indent=1))
    return rows


def _marker_path(out_dir: Path, rel: Path) -> Path:
    return out_dir / MARKER_DIR / f"{rel.as_posix()}.json"


def _done_rows(
    source: Path, rel: Path, out_dir: Path, options: PreprocessOptions, stem: str
) -> list[dict[str, Any]] | None:
    """The rows of a finished source whose marker still matches, else None (redo it)."""
    marker = _marker_path(out_dir, rel)
    if not marker.exists():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("fingerprint") != json.loads(json.dumps(_fingerprint(source, options, stem))):
        return None
    rows = data.get("rows", [])
    if not all((out_dir / row["png"]).exists() for row in rows):
        return None
    return rows


def _run_one(
    source: Path, rel: Path, stem: str, out_dir: Path, options: PreprocessOptions
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """Process one source, turning failures into a reason string (worker entry point)."""
    try:
        return process_source(source, rel, stem, out_dir, options), None
    except USFMError as exc:
        return None, str(exc)
    except Exception as exc:  # one broken scan must not stop a long batch
        log.exception("unexpected error on %s", source)
        return None, f"{type(exc).__name__}: {exc}"


def _worker_init(parent_pid: int | None = None) -> None:
    """Each worker process: one OpenCV thread (the pool provides the parallelism), and no life
    after the parent's death (SIGTERM/SIGKILL of the main process)."""
    import cv2

    cv2.setNumThreads(1)
    if parent_pid is not None:
        exit_with_parent(parent_pid)


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Make this (worker) process die as soon as ``parent_pid`` does.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; everywhere: a daemon thread that checks
    ``os.getppid()`` every ``poll_s`` seconds and ends the process when it has changed.
    """
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="usfm-parent-watch", daemon=True).start()


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete the toolkit's temporaries left by killed runs in the folders written here only
    (``.usfm-tmp-<pid>-…`` of dead processes; nothing else, see :mod:`usfm_core.outputs`)."""
    clean_stale_temporaries(out_dir)
    for sub in OUTPUT_SUBDIRS:
        clean_stale_temporaries(out_dir / sub, recursive=True)


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _check_dirs(in_dir: Path, out_dir: Path) -> None:
    if not in_dir.exists():
        raise USFMError("input folder does not exist", path=in_dir, hint="check the path")
    if not in_dir.is_dir():
        raise USFMError("input is not a folder", path=in_dir, hint="pass the folder holding scans")
    if out_dir.exists() and not out_dir.is_dir():
        raise USFMError("the output path exists and is not a folder", path=out_dir)
    if out_dir.resolve() == in_dir.resolve():
        raise USFMError(
            "the output folder must differ from the input folder",
            path=out_dir,
            hint="choose a new or separate output folder",
        )
    for sub in OUTPUT_SUBDIRS:
        managed = (out_dir / sub).resolve()
        if in_dir.resolve() == managed or managed in in_dir.resolve().parents:
            raise USFMError(
                f"the input folder lies inside the output's {sub}/ folder",
                path=in_dir,
                hint="choose an output folder that does not contain the input",
            )


def run_preprocessing(
    in_dir: str | Path,
    out_dir: str | Path,
    options: PreprocessOptions | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
    deidentify: Any = None,
) -> PreprocessSummary:
    """Preprocess every scan under ``in_dir`` into ``out_dir``; see the module docstring.

    ``deidentify``: a :class:`~usfm_core.preprocess.deidentify.PreprocessDeidentifier`; every
    name written (frames, masks, markers, manifest ``source``, failures) is then a pseudonym.

    Unreadable files are logged, listed in ``summary.failures`` and skipped; sources finished by
    an earlier run with the same options (and unchanged files) are skipped.
    """
    from usfm_core.progress import progress_bar

    start = time.perf_counter()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    options = options or PreprocessOptions()
    if workers < 1:
        raise USFMError(f"workers must be >= 1, got {workers}", hint="use --workers 1 or more")
    _check_dirs(in_dir, out_dir)
    sources = find_sources(in_dir, out_dir)
    if not sources:
        raise USFMError(
            "input folder holds no scan files",
            path=in_dir,
            hint="put DICOM, video, TIFF, NIfTI or image files in it (subfolders are searched)",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    rels = [src.relative_to(in_dir) for src in sources]
    stems = output_stems(rels)
    real: dict[Path, tuple[Path, Path]] = {}  # pseudonym -> (source, relative path)
    if deidentify is not None:
        deidentify.write_mapping(rels)
        options = replace(options, deidentify=True, remove_text=True, use_ocr=deidentify.ocr)
        real = {Path(deidentify.stem(rel)): (src, rel) for src, rel in zip(sources, rels)}
        rels = list(real)
        stems = {rel: rel.as_posix() for rel in rels}
    summary = PreprocessSummary(manifest=out_dir / "manifest.csv", n_sources=len(sources))
    rows_by_source: dict[Path, list[dict[str, Any]]] = {}
    todo = []
    for src, rel in zip(sources, rels):
        done = _done_rows(src, rel, out_dir, options, stems[rel])
        if done is None:
            todo.append((src, rel))
        else:
            rows_by_source[rel] = done
    summary.n_skipped = len(sources) - len(todo)

    def record(rel: Path, rows: list[dict[str, Any]] | None, reason: str | None) -> None:
        if rows is None:
            if rel in real:  # the reason names the file: redact it
                reason = deidentify.redact(reason or "", *real[rel])
            log.warning("skipped %s: %s", rel, reason)
            summary.failures.append((rel.as_posix(), reason or "unknown error"))
        else:
            rows_by_source[rel] = rows
            summary.n_processed += 1

    bar = progress_bar(  # a bar on a terminal, plain lines in logs (usfm_core.progress)
        len(sources), initial=summary.n_skipped, enabled=progress, unit="scan", desc="preprocess"
    )
    with bar:
        if workers == 1 or len(todo) <= 1:
            for src, rel in todo:
                record(rel, *_run_one(src, rel, stems[rel], out_dir, options))
                bar.update()
        else:
            # "spawn": forking a process that already runs OpenMP/torch threads can deadlock.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
            ) as pool:
                futures = {
                    pool.submit(_run_one, src, rel, stems[rel], out_dir, options): rel
                    for src, rel in todo
                }
                for future in as_completed(futures):
                    record(futures[future], *future.result())
                    bar.update()

    all_rows = [row for rel in rels if rel in rows_by_source for row in rows_by_source[rel]]
    _write_manifest(summary.manifest, all_rows)
    summary.n_frames = len(all_rows)
    summary.seconds = time.perf_counter() - start
    summary_json = {**asdict(summary), "manifest": str(summary.manifest)}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary_json, indent=1))
    return summary


def preprocess_folder(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    target_fps: float | None = 3.0,
    max_frames_per_clip: int | None = 64,
    remove_text: bool = True,
    crop: bool = True,
    size: int | None = None,
    workers: int = 1,
    progress: bool = True,
    use_ocr: bool | Literal["auto"] = "auto",
) -> Path:
    """Preprocess a folder of scans for pretraining; return the path of ``OUT/manifest.csv``.

    Args:
        in_dir: folder of scans (searched recursively; any format ``load_scan`` reads).
        out_dir: output folder (created); must not be ``in_dir``.
        target_fps: frames per second kept from cines (USF-MAE: 3); None keeps all.
        max_frames_per_clip: cap on frames per source (None: no cap).
        remove_text: detect and inpaint text, colour overlays and markers.
        crop: crop frames to the scan-region bounding box.
        size: if given, letterbox every frame to ``size``×``size`` (spacing adjusted).
        workers: processes; > 1 uses a ``ProcessPoolExecutor``.
        progress: show a tqdm progress bar.
        use_ocr: Tesseract use for text removal (see ``remove_annotations``).
    """
    options = PreprocessOptions(
        target_fps=target_fps,
        max_frames_per_clip=max_frames_per_clip,
        remove_text=remove_text,
        crop=crop,
        size=size,
        use_ocr=use_ocr,
    )
    return run_preprocessing(in_dir, out_dir, options, workers=workers, progress=progress).manifest
