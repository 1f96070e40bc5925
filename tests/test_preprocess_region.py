"""Scan-region mask: fans, rectangles, text, colour bars, cines, real BUSI images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from usfm_core.preprocess.region import crop_to_region, region_bbox, scan_region_mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def speckle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Rayleigh speckle with a dark cyst, (H, W) float in ~[0, 240]."""
    img = 80.0 * cv2.GaussianBlur(rng.rayleigh(1.0, shape), (0, 0), 1.0)
    h, w = shape
    cv2.ellipse(img, (w // 2, int(h * 0.6)), (w // 8, h // 10), 0, 0, 360, 3.0, -1)
    return np.clip(img, 0, 240)


def drawn_frame(seed: int, geometry: str, h: int = 200, w: int = 240):
    """A fan or a rectangle of speckle on black, with a text line above it and a colour bar.

    Returns (image (H, W, 3) uint8 RGB, ground-truth region (H, W) bool).
    """
    rng = np.random.default_rng(seed)
    region = np.zeros((h, w), np.uint8)
    if geometry == "sector":
        cv2.ellipse(region, (w // 2, 20), (h - 30, h - 30), 90, -30, 30, 1, -1)
    else:
        region[25 : h - 10, 40 : w - 40] = 1
    region = region.astype(bool)
    gray = (speckle(rng, (h, w)) * region).astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    cv2.putText(rgb, "C5-1 12cm 30Hz", (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255,) * 3, 1)
    bar = cv2.applyColorMap(np.linspace(255, 0, 60).astype(np.uint8)[:, None], 2)[:, 0, ::-1]
    rgb[60:120, w - 12 : w - 4] = bar[:, None]
    return rgb, region


@pytest.mark.parametrize("geometry", ["sector", "linear"])
def test_region_matches_drawn_geometry(geometry):
    rgb, truth = drawn_frame(1, geometry)
    mask = scan_region_mask(rgb)
    assert mask.shape == truth.shape and mask.dtype == bool
    score = iou(mask, truth)
    assert score > 0.95, f"{geometry}: IoU {score:.3f}"
    # Text line and colour bar are outside.
    assert not mask[:14].any() and not mask[60:120, -12:-4].any()


def test_region_of_grey_cine_ignores_static_text():
    rng = np.random.default_rng(2)
    truth = np.zeros((120, 160), bool)
    truth[20:110, 30:130] = True
    frames = np.stack([(speckle(rng, truth.shape) * truth).astype(np.uint8) for _ in range(4)])
    # A big static label touching the scan: one frame alone cannot tell it apart.
    frames[:, 5:40, 100:160] = 200
    assert iou(scan_region_mask(frames[0]), truth) < 0.9
    score = iou(scan_region_mask(frames), truth)
    assert score > 0.95, f"cine IoU {score:.3f}"


def test_black_and_fully_covered_frames_give_whole_frame():
    assert scan_region_mask(np.zeros((32, 48), np.uint8)).all()
    rng = np.random.default_rng(3)
    image = np.clip(speckle(rng, (100, 120)) + 20, 0, 255).astype(np.uint8)  # cropped scan
    assert scan_region_mask(image).all()


def test_region_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        scan_region_mask(np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError):
        scan_region_mask(np.zeros((2, 3, 10, 10), np.uint8))


def test_bbox_and_crop():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    assert region_bbox(mask) == (2, 3, 5, 9)
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    cropped, box = crop_to_region(image, mask, margin=1)
    assert box == (1, 2, 6, 10) and cropped.shape == (5, 8, 3)
    np.testing.assert_array_equal(cropped, image[1:6, 2:10])
    stack = np.zeros((4, 10, 12), np.uint8)
    assert crop_to_region(stack, mask, margin=50)[0].shape == (4, 10, 12)
    with pytest.raises(ValueError, match="empty"):
        region_bbox(np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="does not match"):
        crop_to_region(np.zeros((5, 5)), mask)


def test_busi_images_are_whole_frame_scans(shared_data):
    # BUSI images are already cropped to the scan: the region should be (nearly) everything.
    names = ["benign_1.png", "benign_102.png", "malignant_1.png", "normal_1.png"]
    for name in names:
        image = cv2.imread(str(shared_data / "busi" / "images" / name), cv2.IMREAD_UNCHANGED)
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        fraction = scan_region_mask(image).mean()
        assert fraction > 0.85, f"{name}: region covers only {fraction:.2f}"


@pytest.mark.parametrize("geometry", ["sector", "linear"])
def test_region_matches_simulator_ground_truth(geometry):
    from usfm_core.sim import simulate_frame

    for seed in (0, 1):
        frame = simulate_frame(
            seed=seed, geometry=geometry, text=True, calipers=True, colour_overlay=True
        )
        score = iou(scan_region_mask(frame.image), frame.region_mask)
        # Measured: 0.988 (sector, the hull closes the concave apex arc), 1.000 (linear).
        assert score > 0.96, f"{geometry} seed {seed}: IoU {score:.3f}"


def test_region_of_simulated_cine():
    from usfm_core.sim import simulate_cine

    cine = simulate_cine(n_frames=6, seed=3, text=True, calipers=True)
    score = iou(scan_region_mask(cine.frames), cine.region_mask)
    assert score > 0.96, f"cine IoU {score:.3f}"
