"""preprocess_folder end to end: outputs, manifest, re-run skip, crash safety, CLI."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from usfm_core.cli import main
from usfm_core.io import write_dicom, write_image, write_video
from usfm_core.outputs import TMP_PREFIX
from usfm_core.preprocess import pipeline
from usfm_core.preprocess.pipeline import (
    MANIFEST_COLUMNS,
    PreprocessOptions,
    preprocess_folder,
    run_preprocessing,
)

FAST = PreprocessOptions(size=64, use_ocr=False)


def fan_frames(n: int, seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """(n, H, W) uint8 speckle fans (moving speckle) with a static white label above."""
    rng = np.random.default_rng(seed)
    region = np.zeros((h, w), np.uint8)
    cv2.ellipse(region, (w // 2, 10), (h - 16, h - 16), 90, -35, 35, 1, -1)
    frames = []
    for _ in range(n):
        speckle = 90 * cv2.GaussianBlur(rng.rayleigh(1.0, (h, w)), (0, 0), 1.0)
        frame = (np.clip(speckle, 0, 230) * region).astype(np.uint8)
        cv2.putText(frame, "L12", (2, 9), cv2.FONT_HERSHEY_SIMPLEX, 0.3, 255, 1)
        frames.append(frame)
    return np.stack(frames)


@pytest.fixture
def scan_folder(tmp_path: Path) -> Path:
    """A small mixed folder: 2 grey images, an annotated RGB simulator frame, a 20-frame 10 fps
    video, a calibrated DICOM cine, a note (ignored) and a corrupt file (a failure)."""
    from usfm_core.sim import simulate_frame

    src = tmp_path / "in"
    write_image(src / "a.png", fan_frames(1, 0)[0])
    sim = simulate_frame(seed=0, text=True, calipers=True, colour_overlay=True)
    write_image(src / "sim.png", sim.image)
    np.save(tmp_path / "sim_annotation.npy", sim.annotation_mask)
    write_image(src / "sub" / "b.png", fan_frames(1, 1)[0])
    write_video(src / "clip.avi", fan_frames(20, 2), fps=10.0)
    write_dicom(src / "probe.dcm", fan_frames(6, 3), spacing_mm=(0.2, 0.25), fps=30.0)
    (src / "notes.txt").write_text("not a scan")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n-truncated")
    return src


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_end_to_end_outputs_and_manifest(scan_folder, tmp_path):
    out = tmp_path / "out"
    summary = run_preprocessing(scan_folder, out, FAST, progress=False)
    assert summary.n_sources == 6  # notes.txt is not tried
    assert [s for s, _ in summary.failures] == ["broken.png"]
    rows = read_manifest(summary.manifest)
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    by_source: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    assert sorted(by_source) == ["a.png", "clip.avi", "probe.dcm", "sim.png", "sub/b.png"]
    # 10 fps video at 3 fps: frames 0, 3, 6, 10, 13, 16; 30 fps DICOM of 6 frames: frame 0.
    assert [int(r["frame_index"]) for r in by_source["clip.avi"]] == [0, 3, 6, 10, 13, 16]
    assert [int(r["frame_index"]) for r in by_source["probe.dcm"]] == [0]
    assert summary.n_frames == len(rows) == 10
    for row in rows:
        image = cv2.imread(str(out / row["png"]), cv2.IMREAD_UNCHANGED)
        assert image.shape == (64, 64) and image.dtype == np.uint8
        assert (out / row["region_mask"]).exists()
    assert by_source["sub/b.png"][0]["png"] == "frames/sub/b_f00000.png"
    # Spacing follows crop + resize: 0.2 mm * (longer side of the crop / 64).
    dcm = by_source["probe.dcm"][0]
    box_h = int(dcm["bbox_y1"]) - int(dcm["bbox_y0"])
    box_w = int(dcm["bbox_x1"]) - int(dcm["bbox_x0"])
    assert box_h < 96 and box_w < 128, "not cropped to the fan"
    factor = max(box_h, box_w) / 64
    assert float(dcm["spacing_dy_mm"]) == pytest.approx(0.2 * factor)
    assert float(dcm["spacing_dx_mm"]) == pytest.approx(0.25 * factor)
    assert by_source["a.png"][0]["spacing_dy_mm"] == ""
    assert float(by_source["clip.avi"][0]["fps"]) == pytest.approx(10.0)
    # The label above the fan is outside the region: blanked, never in the output.
    assert int(by_source["a.png"][0]["n_annotation_px"]) > 0
    # The simulator's text, calipers and colour overlay were inpainted (mask a bit dilated).
    sim_truth = np.load(tmp_path / "sim_annotation.npy")
    assert int(by_source["sim.png"][0]["n_annotation_px"]) > 0.9 * sim_truth.sum()
    assert not list(out.rglob(f"{TMP_PREFIX}*"))


def test_rerun_skips_done_sources_and_redoes_changed_ones(scan_folder, tmp_path):
    out = tmp_path / "out"
    first = run_preprocessing(scan_folder, out, FAST, progress=False)
    manifest_text = first.manifest.read_text()
    again = run_preprocessing(scan_folder, out, FAST, progress=False)
    assert (again.n_processed, again.n_skipped) == (0, 5)
    assert again.manifest.read_text() == manifest_text
    # A changed file and changed options are redone.
    stat = (scan_folder / "a.png").stat()
    os.utime(scan_folder / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run_preprocessing(scan_folder, out, FAST, progress=False).n_processed == 1
    other = PreprocessOptions(size=32, use_ocr=False)
    assert run_preprocessing(scan_folder, out, other, progress=False).n_processed == 5


def test_interrupted_run_leaves_no_partial_output(scan_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    real = pipeline.remove_annotations

    def crash_on_third_frame(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # like Ctrl-C or a kill in the middle of a source
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "remove_annotations", crash_on_third_frame)
    with pytest.raises(KeyboardInterrupt):
        run_preprocessing(scan_folder, out, FAST, progress=False)
    assert not (out / "manifest.csv").exists()
    assert not list(out.rglob(f"{TMP_PREFIX}*"))  # the toolkit's temporaries
    # Sources run in sorted order: a.png done, broken.png failed, clip.avi hit on its 2nd frame.
    done_markers = list((out / pipeline.MARKER_DIR).rglob("*.json"))
    assert [p.name for p in done_markers] == ["a.png.json"]
    for png in out.rglob("*.png"):  # what was written is whole
        assert cv2.imread(str(png), cv2.IMREAD_UNCHANGED) is not None, png
    monkeypatch.setattr(pipeline, "remove_annotations", real)
    resumed = run_preprocessing(scan_folder, out, FAST, progress=False)
    assert resumed.n_skipped == len(done_markers)
    assert resumed.n_skipped + resumed.n_processed == 5
    fresh = run_preprocessing(scan_folder, tmp_path / "fresh", FAST, progress=False)
    assert resumed.manifest.read_text() == fresh.manifest.read_text()


@pytest.mark.slow
def test_parallel_workers_match_serial(scan_folder, tmp_path):
    serial = preprocess_folder(scan_folder, tmp_path / "s", size=64, use_ocr=False, progress=False)
    parallel = preprocess_folder(
        scan_folder, tmp_path / "p", size=64, use_ocr=False, workers=2, progress=False
    )
    assert serial.read_text() == parallel.read_text()
    for row in read_manifest(serial):
        a = cv2.imread(str(tmp_path / "s" / row["png"]), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "p" / row["png"]), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(a, b)


def test_output_inside_input_is_not_reprocessed(scan_folder):
    out = scan_folder / "derived"
    run_preprocessing(scan_folder, out, FAST, progress=False)
    again = run_preprocessing(scan_folder, out, FAST, progress=False)
    assert again.n_sources == 6 and again.n_processed == 0


def test_cli_summary_and_errors(scan_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        ["preprocess", str(scan_folder), str(out), "--size", "48", "--no-ocr", "--no-progress"]
    )
    printed = capsys.readouterr()
    assert code == 1  # broken.png failed: the good sources are done, the failure is listed
    assert "6 sources" in printed.out and "1 failed" in printed.out and "10 frames" in printed.out
    assert "broken.png" in printed.out
    assert cv2.imread(str(next((out / "frames").glob("a_*.png"))), 0).shape == (48, 48)

    assert main(["preprocess", str(tmp_path / "missing"), str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["preprocess", str(tmp_path / "empty"), str(out)]) == 1
    assert "no scan files" in capsys.readouterr().err
    assert main(["preprocess", str(scan_folder), str(scan_folder)]) == 1
    with pytest.raises(SystemExit):
        main(["preprocess", str(scan_folder), str(out), "--fps", "0"])


def test_cine_is_ocred_once(tmp_path, monkeypatch):
    from usfm_core.preprocess import annotations

    src = tmp_path / "in"
    write_video(src / "clip.avi", fan_frames(20, 4), fps=10.0)
    calls = []

    def fake_ocr(gray):
        calls.append(gray.shape)
        return np.zeros(gray.shape, bool)

    monkeypatch.setattr(annotations, "tesseract_available", lambda: True)
    monkeypatch.setattr(annotations, "ocr_text_mask", fake_ocr)
    options = PreprocessOptions(use_ocr="auto")
    summary = run_preprocessing(src, tmp_path / "out", options, progress=False)
    assert summary.n_frames == 6 and len(calls) == 1
