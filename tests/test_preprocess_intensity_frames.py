"""Percentile rescaling, resizing, normalisation and frame sampling."""

from __future__ import annotations

import numpy as np
import pytest

from usfm_core.preprocess.frames import DEFAULT_STEP_WITHOUT_FPS, sample_frame_indices
from usfm_core.preprocess.intensity import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    keep_aspect_scale,
    normalize,
    percentile_rescale,
    resize_keep_aspect,
    to_uint8,
)


def test_percentile_rescale_uses_only_region_pixels():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    image[mask] = rng.integers(50, 151, mask.sum())  # region values 50..150
    image[:4, :4] = 255  # burned-in white label outside the region
    out = percentile_rescale(image, mask)
    assert out.dtype == np.float32 and out.shape == image.shape
    lo, hi = np.percentile(image[mask], [2, 98])
    expected = np.clip((image.astype(np.float32) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # ~2 % of the region at 0 and ~2 % at 1, the black background clipped to 0.
    assert 0.005 < (out[mask] == 0).mean() < 0.05
    assert 0.005 < (out[mask] == 1).mean() < 0.05
    assert (out[~mask & (image == 0)] == 0).all()
    # Without the mask the black background dominates the low percentile instead.
    assert percentile_rescale(image)[mask].min() > 0.1


def test_percentile_rescale_constant_and_bad_input():
    assert not percentile_rescale(np.full((8, 8), 7, np.uint8)).any()
    with pytest.raises(ValueError, match="low < high"):
        percentile_rescale(np.zeros((4, 4)), low=98, high=2)
    with pytest.raises(ValueError, match="mask shape"):
        percentile_rescale(np.zeros((4, 4)), mask=np.ones((3, 3), bool))


def test_to_uint8_rounds_and_clips():
    out = to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0], np.float32))
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255])


def test_resize_keep_aspect_letterbox_and_scale():
    image = np.full((50, 100), 200, np.uint8)
    out = resize_keep_aspect(image, 64)
    assert out.shape == (64, 64)
    assert keep_aspect_scale(image.shape, 64) == pytest.approx(0.64)
    rows = np.flatnonzero(out[:, 32])
    assert rows.size == 32 and rows[0] == 16  # 50 * 0.64 = 32 rows, centred
    assert resize_keep_aspect(image, 64, pad=False).shape == (32, 64)
    rgb = np.zeros((30, 20, 3), np.uint8)
    assert resize_keep_aspect(rgb, 60).shape == (60, 60, 3)


def test_normalize_imagenet_replicates_grey():
    image = np.full((4, 4), 0.5, np.float32)
    out = normalize(image)
    assert out.shape == (4, 4, 3)
    expected = (0.5 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(normalize(np.full((2, 2), 255, np.uint8), 0.5, 0.25), 2.0)
    with pytest.raises(ValueError, match="channels"):
        normalize(np.zeros((2, 2, 4), np.float32))


def test_sample_frame_indices_rate():
    # 30 fps clip of 4 s at 3 fps: every 10th frame -> 12 frames.
    assert sample_frame_indices(120, 30.0) == list(range(0, 120, 10))
    # Fractional step (25 fps -> 3 fps): spacing 8 or 9 frames, about 3 per second.
    idx = sample_frame_indices(250, 25.0)
    assert set(np.diff(idx)) <= {8, 9} and len(idx) == 30
    # Target above the clip's rate keeps everything.
    assert sample_frame_indices(5, 2.0) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(7, 30.0, target_fps=None) == list(range(7))


def test_sample_frame_indices_edge_cases():
    assert sample_frame_indices(1, 30.0) == [0]
    assert sample_frame_indices(0, 30.0) == []
    assert sample_frame_indices(3, None) == [0]
    assert sample_frame_indices(35, None) == list(range(0, 35, DEFAULT_STEP_WITHOUT_FPS))
    capped = sample_frame_indices(3000, 30.0, max_frames=5)
    assert len(capped) == 5 and capped[0] == 0 and capped[-1] == 2990
    with pytest.raises(ValueError):
        sample_frame_indices(-1, 30.0)
    with pytest.raises(ValueError):
        sample_frame_indices(10, 30.0, target_fps=0)
    with pytest.raises(ValueError):
        sample_frame_indices(10, 30.0, max_frames=0)
