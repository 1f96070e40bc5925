"""Inference and measurement: mask geometry, mm measurements, the ``segment`` CLI."""

from __future__ import annotations

import csv
import math

import cv2
import numpy as np
import pytest
import torch

from usfm_core.finetune.infer import measure_mask, ramanujan_circumference, segment_frames
from usfm_core.finetune.models import Segmenter, save_finetuned


def _tiny_segmenter(n_classes: int = 1) -> Segmenter:
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    torch.manual_seed(0)
    backbone = VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8))
    model = Segmenter(backbone, n_classes, "conv").eval()
    model.input_size = 64
    return model


def _ellipse(shape, center, axes_px, angle=0.0) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(mask, center, axes_px, angle, 0, 360, 1, thickness=-1)
    return mask


def test_measure_ellipse_anisotropic_spacing():
    # Semi-axes 20 mm (x) and 12 mm (y) drawn at dy = 0.2 mm, dx = 0.25 mm per pixel.
    dy, dx = 0.2, 0.25
    mask = _ellipse((200, 240), (120, 100), (round(20 / dx), round(12 / dy)))
    m = measure_mask(mask, (dy, dx))
    assert m["unit"] == "mm" and len(m["objects"]) == 1
    obj = m["objects"][0]
    assert obj["area"] == pytest.approx(math.pi * 20 * 12, rel=0.02)
    assert obj["max_diameter"] == pytest.approx(40, rel=0.02)
    assert obj["ellipse_major"] == pytest.approx(40, rel=0.03)
    assert obj["ellipse_minor"] == pytest.approx(24, rel=0.03)
    assert obj["circumference"] == pytest.approx(ramanujan_circumference(20, 12), rel=0.02)
    px = measure_mask(mask)
    assert px["unit"] == "px" and px["objects"][0]["n_pixels"] == int(mask.sum())


def test_measure_several_objects_and_labels():
    mask = np.zeros((64, 64), np.uint8)
    mask[5:15, 5:15] = 1
    mask[30:50, 30:50] = 2
    mask[60, 60] = 1  # below min_pixels
    m = measure_mask(mask, (0.5, 0.5))
    assert [o["label"] for o in m["objects"]] == [2, 1]
    assert m["objects"][0]["area"] == pytest.approx(400 * 0.25)
    assert m["total_area"] == pytest.approx(500 * 0.25)
    assert measure_mask(np.zeros((8, 8)))["objects"] == []
    with pytest.raises(ValueError, match="2-D"):
        measure_mask(np.zeros((2, 8, 8)))


def test_hc18_circumference_from_ground_truth(shared_data):
    rows = list(csv.DictReader(open(shared_data / "hc18" / "manifest.csv")))
    rows = [r for r in rows if float(r["mask_fraction"]) > 0.02][:12]
    errors = []
    for r in rows:
        mask = cv2.imread(str(shared_data / "hc18" / r["mask"]), cv2.IMREAD_GRAYSCALE) > 127
        px = float(r["pixel_size_mm"])
        obj = measure_mask(mask, (px, px))["objects"][0]
        errors.append(abs(obj["circumference"] / float(r["head_circumference_mm"]) - 1))
    assert np.median(errors) < 0.01 and max(errors) < 0.02  # measured: 0.2 % and 0.4 %


def test_segment_frames_keeps_geometry():
    model = _tiny_segmenter(3)
    frames = [np.random.default_rng(i).integers(0, 255, (70 + i, 90), np.uint8) for i in range(5)]
    done = []
    masks = list(segment_frames(model, iter(frames), batch_size=2, progress=done.append))
    assert [m.shape for m in masks] == [f.shape for f in frames]
    assert all(m.dtype == np.uint8 and m.max() < 3 for m in masks)
    assert done == [2, 4, 5]


def test_simulated_lesions_measured_in_mm(tmp_path):
    """Simulator → calibrated DICOM → load_scan spacing → mm areas of the exact lesion masks."""
    sim = pytest.importorskip("usfm_core.sim")
    from usfm_core.io import load_scan, write_dicom

    cine = sim.simulate_cine(2, seed=1)
    write_dicom(tmp_path / "sim.dcm", cine.frames, spacing_mm=cine.spacing_mm, fps=cine.fps)
    scan = load_scan(tmp_path / "sim.dcm")
    assert scan.shape[1:] == cine.lesion_masks.shape[1:]
    dy, dx = cine.spacing_mm
    n_measured = 0
    for lab in cine.lesion_masks:
        m = measure_mask(lab, scan.spacing_mm, min_pixels=1)
        assert m["unit"] == "mm"
        assert m["total_area"] == pytest.approx((lab > 0).sum() * dy * dx, rel=1e-3)
        for obj in m["objects"]:  # a filled blob's hull diameter bounds its area
            assert obj["area"] <= math.pi * (obj["max_diameter"] / 2) ** 2 * 1.05
            n_measured += 1
    assert n_measured >= 1


def test_segment_cli_dicom_cine_roundtrip(tmp_path):
    from usfm_core.cli import main
    from usfm_core.io import load_scan, write_dicom

    frames = np.random.default_rng(0).integers(0, 255, (4, 80, 100), np.uint8)
    write_dicom(tmp_path / "cine.dcm", frames, spacing_mm=(0.2, 0.3), fps=10)
    cv2.imwrite(str(tmp_path / "img.png"), frames[0])
    model = _tiny_segmenter(1)
    save_finetuned(model, tmp_path / "model")
    out = tmp_path / "out"
    rc = main(
        [
            "segment",
            str(tmp_path / "model"),
            str(tmp_path / "cine.dcm"),
            str(tmp_path / "img.png"),
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    stack = load_scan(out / "cine_mask.tif")
    assert stack.shape == (4, 80, 100)
    assert stack.spacing_mm == pytest.approx((0.2, 0.3))
    single = cv2.imread(str(out / "img_mask.png"), cv2.IMREAD_UNCHANGED)
    assert single.shape == (80, 100) and set(np.unique(single)) <= {0, 255}
    rows = list(csv.DictReader(open(out / "measurements.csv")))
    cine_rows = [r for r in rows if r["file"] == "cine"]
    assert {int(r["frame"]) for r in cine_rows} == {0, 1, 2, 3}
    assert all(r["unit"] == "mm" for r in cine_rows)
    assert all(r["unit"] == "px" and r["note"] for r in rows if r["file"] == "img")
    # The CSV agrees with measuring the written masks directly.
    for t in range(4):
        expect = measure_mask(stack.frame(t), (0.2, 0.3))["total_area"]
        got = sum(float(r["area_mm2"]) for r in cine_rows if int(r["frame"]) == t)
        assert got == pytest.approx(expect, rel=1e-3, abs=1e-3)


def test_segment_cli_rejects_classifier(tmp_path, capsys):
    from usfm_core.cli import main
    from usfm_core.finetune.models import Classifier

    clf = Classifier(_tiny_segmenter().backbone, 2)
    save_finetuned(clf, tmp_path / "clf")
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((64, 64), np.uint8))
    rc = main(
        [
            "segment",
            str(tmp_path / "clf"),
            str(tmp_path / "a.png"),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    assert rc == 1 and "classification" in capsys.readouterr().err
