"""Inspecting a pretraining run: teacher attention, student loss, ALP, mask, reconstruction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def run_and_frame(tiny_pretrain_run):
    from usfm_core.pretrain.inspect import load_run
    from usfm_core.sim import simulate_frame

    model = load_run(tiny_pretrain_run)
    frame = simulate_frame(seed=42, height=96, width=120).image
    return model, frame


@pytest.mark.slow
def test_maps_have_frame_geometry_and_unit_range(run_and_frame):
    from usfm_core.pretrain.inspect import inspect_frame

    model, frame = run_and_frame
    res = inspect_frame(model, frame, alpha=0.3, r=0.5, ratio=0.5, size=64)
    for m in (res.attention, res.loss_map, res.alp, res.masked_input, res.reconstruction):
        assert m.shape == frame.shape and np.isfinite(m).all()
        assert m.min() >= -1e-6 and m.max() <= 1 + 1e-6
    assert res.mask.shape == (2, 2)  # 64 / 32
    assert res.mask.sum() == math.ceil(4 * 0.5)
    assert res.mask_image.shape == frame.shape
    # masked cells are blanked in the masked input
    assert np.all(res.masked_input[res.mask_image] == 0)


@pytest.mark.slow
def test_alp_is_the_papers_mix_and_top_cells_are_masked(run_and_frame):
    from usfm_core.pretrain.inspect import inspect_frame

    model, frame = run_and_frame
    a0 = inspect_frame(model, frame, alpha=0.0, r=1.0, ratio=0.25, size=128)
    a1 = inspect_frame(model, frame, alpha=1.0, r=1.0, ratio=0.25, size=128)
    np.testing.assert_allclose(a0.alp, a0.attention, atol=1e-5)
    np.testing.assert_allclose(a1.alp, a1.loss_map, atol=1e-5)
    mid = inspect_frame(model, frame, alpha=0.5, r=1.0, ratio=0.25, size=128)
    np.testing.assert_allclose(mid.alp, 0.5 * a0.attention + 0.5 * a1.loss_map, atol=1e-5)
    # r = 1: the mask is exactly the top-ALP cells on the model grid.
    h, w = mid.mask.shape
    grid_alp = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(mid.alp)[None, None], (h, w)
    )[0, 0]
    assert (
        grid_alp[torch.from_numpy(mid.mask)].mean() >= grid_alp[~torch.from_numpy(mid.mask)].mean()
    )


@pytest.mark.slow
def test_seeded_and_deterministic(run_and_frame):
    from usfm_core.pretrain.inspect import inspect_frame

    model, frame = run_and_frame
    a = inspect_frame(model, frame, r=0.0, ratio=0.5, size=64, seed=1)
    b = inspect_frame(model, frame, r=0.0, ratio=0.5, size=64, seed=1)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.reconstruction, b.reconstruction)


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    from usfm_core.errors import CheckpointError
    from usfm_core.pretrain.inspect import load_run

    with pytest.raises(CheckpointError, match="usfm-core pretrain"):
        load_run(tmp_path)
