"""Metrics and corruptions against hand-computed values and their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from usfm_core.evaluate import corruptions as C
from usfm_core.evaluate.metrics import (
    aggregate_runs,
    class_scores,
    classification_metrics,
    dice,
    hd95,
    iou,
    mean_std,
    per_class_scores,
    segmentation_metrics,
)


def test_dice_iou_tiny_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 px
    b[0, 1:] = True  # 3 px, overlap 2
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert iou(a, b) == pytest.approx(2 / 4)
    assert dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, np.zeros((5, 5)))


def test_hd95_offset_squares_and_spacing():
    a = np.zeros((40, 40), bool)
    b = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b[10:20, 13:23] = True  # shifted 3 columns right
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(1.0, 0.5)) == pytest.approx(1.5)  # shift is along x
    assert hd95(a, a) == 0.0
    assert np.isnan(hd95(a, np.zeros_like(a)))
    m = segmentation_metrics(a, b)
    assert m["dice"] == pytest.approx(2 * 70 / 200) and m["hd95"] == pytest.approx(3.0)


def test_multiclass_segmentation_averages_foreground():
    t = np.zeros((8, 8), int)
    t[:4, :4], t[4:, 4:] = 1, 2
    p = t.copy()
    p[4:, 4:] = 0  # class 2 missed entirely
    m = segmentation_metrics(p, t, n_classes=3)
    assert m["dice"] == pytest.approx(0.5)


def test_per_class_scores_ignore_classes_absent_from_ground_truth():
    """MONAI ignore_empty: a class is averaged over the images that hold it; an empty
    prediction on an empty mask no longer scores 1; the old value stays as dice_legacy."""
    t1 = np.zeros((8, 8), int)
    t1[:4, :4], t1[4:, 4:] = 1, 2
    p1 = t1.copy()
    p1[4:, 4:] = 0  # class 2 missed
    t2 = np.zeros((8, 8), int)
    t2[:2, :2] = 1  # class 2 absent from this image's ground truth
    p2 = t2.copy()
    rows = [class_scores(p1, t1, 3), class_scores(p2, t2, 3)]
    assert np.isnan(rows[1]["dice"][1]) and rows[0]["dice"][1] == 0.0
    agg = per_class_scores(rows, ["a", "b"])
    assert agg["per_class"]["a"] == pytest.approx({"dice": 1.0, "iou": 1.0, "hd95": 0.0, "n": 2})
    assert agg["per_class"]["b"]["dice"] == 0.0 and agg["per_class"]["b"]["n"] == 1
    assert agg["dice"] == pytest.approx(0.5)  # mean over classes, not images
    # Binary: an image without foreground is ignored (was counted 1 if predicted empty).
    empty = np.zeros((8, 8), int)
    m = segmentation_metrics(empty, empty)
    assert np.isnan(m["dice"]) and m["dice_legacy"] == 1.0
    half = np.zeros((8, 8), int)
    half[:4] = 1
    rows = [
        class_scores(half, half, 1),
        class_scores(empty, empty, 1),
        class_scores(half, empty, 1),
    ]
    assert per_class_scores(rows)["dice"] == 1.0  # only the image with a structure counts
    # A class that never occurs is NaN and stays out of the mean.
    agg = per_class_scores([class_scores(t2, t2, 3)])
    assert np.isnan(agg["per_class"]["class2"]["dice"]) and agg["dice"] == 1.0


def test_macro_f1_matches_formula():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    # per class: (tp, fp, fn) = (2,0,1), (1,1,1), (1,1,0)
    f1 = [2 * 2 / (2 * 2 + 0 + 1), 2 * 1 / (2 + 1 + 1), 2 * 1 / (2 + 1 + 0)]
    m = classification_metrics(y_true, y_pred, n_classes=3)
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert np.isnan(m["auroc"])
    scores = np.eye(3)[y_pred] * 0.8 + 0.1
    assert 0.5 < classification_metrics(y_true, y_pred, scores, 3)["auroc"] <= 1.0


def test_mean_std_and_aggregate():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2)))
    assert mean_std([5.0]) == (5.0, 0.0)
    agg = aggregate_runs([{"dice": 0.5, "name": "x"}, {"dice": 0.7}])
    assert agg["dice"]["mean"] == pytest.approx(0.6) and agg["dice"]["n"] == 2
    assert "name" not in agg


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((96, 96), np.uint8)
    img[8:88, 8:88] = rng.integers(40, 220, size=(80, 80))
    return img


def test_blur_matches_gaussian_definition(image):
    import cv2

    region = np.ones(image.shape, bool)
    for eps in (1, 2, 3):
        out = C.gaussian_blur(image.astype(np.float32), eps, region)
        k = 2 * int(2 * eps) + 1
        ref = cv2.GaussianBlur(
            image.astype(np.float32), (k, k), eps, borderType=cv2.BORDER_REFLECT_101
        )
        np.testing.assert_allclose(out, ref, atol=1e-4)
        # Independent check away from the borders: scipy with the same truncation.
        sp = ndimage.gaussian_filter(image.astype(np.float64), eps, truncate=int(2 * eps) / eps)
        np.testing.assert_allclose(out[10:-10, 10:-10], sp[10:-10, 10:-10], atol=0.05)


def test_contrast_keeps_median_and_scales_spread(image):
    region = image > 0
    med = np.median(image[region].astype(float))
    for eps, alpha in C.CONTRAST_ALPHA.items():
        out = C.contrast_depletion(image.astype(np.float32), eps, region)
        assert np.median(out[region]) == pytest.approx(med)
        assert out[region].std() == pytest.approx(alpha * image[region].std(), rel=1e-4)
        assert (out[~region] == image[~region]).all()  # outside the scan left alone


def test_speckle_mean_one_and_grows(image):
    flat = np.full((128, 128), 100.0, np.float32)
    stds = []
    for eps in (1, 2, 3):
        factor = C.correlated_speckle(flat, eps, None, rng=eps) / 100.0
        assert factor.mean() == pytest.approx(1.0, abs=0.02)
        stds.append(factor.std())
        # Correlated: neighbouring pixels share most of their noise.
        assert np.corrcoef(factor[:, :-1].ravel(), factor[:, 1:].ravel())[0, 1] > 0.5
    assert stds[0] < stds[1] < stds[2]
    a = C.corrupt(image, "speckle", 2, rng=1)
    assert a.dtype == np.uint8 and (a[image == 0] == 0).all()
    np.testing.assert_array_equal(a, C.corrupt(image, "speckle", 2, rng=1))


def test_corrupt_rejects_bad_input(image):
    with pytest.raises(ValueError, match="unknown corruption"):
        C.corrupt(image, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(image, "blur", 4)
    assert (C.corrupt(image, "blur", 0) == image).all()
