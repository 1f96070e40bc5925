"""Unit tests of the MAE and JEPA/SALT baselines: masks, losses, block sampler, frozen teacher."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usfm_core.errors import CheckpointError, ConfigError
from usfm_core.pretrain.blocks import (
    box_counts,
    sample_block_size,
    sample_jepa_masks,
    valid_patches,
)
from usfm_core.pretrain.config import load_config
from usfm_core.pretrain.jepa import build_jepa, jepa_loss, resample_tokens
from usfm_core.pretrain.mae import build_mae, masked_patch_mse, random_patch_mask


def _cfg(method: str, *extra: str):
    return load_config(
        "tiny", [f"method={method}", "backbone.preset=vit-tiny-test", "device=cpu", *extra]
    )


def _batch(b: int = 2, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random global views (B, 2, 1, S, S) and a rectangular scan region (B, 2, S, S)."""
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(b, 2, 1, size, size, generator=g)
    regions = torch.zeros(b, 2, size, size, dtype=torch.bool)
    regions[:, :, 8 : size - 8, 20:] = True  # the 16-px patch column 0 holds no region pixel
    return {"global_views": views, "global_regions": regions, "index": torch.arange(b)}


# ---------------------------------------------------------------------------------- MAE
@pytest.mark.parametrize(("length", "ratio"), [(16, 0.25), (16, 0.75), (196, 0.25), (4, 0.1)])
def test_random_patch_mask_partitions_patches(length, ratio):
    mask, keep = random_patch_mask(3, length, ratio, torch.Generator().manual_seed(1))
    n_mask = min(max(round(ratio * length), 1), length - 1)
    assert mask.shape == (3, length) and keep.shape == (3, length - n_mask)
    assert (mask.sum(1) == n_mask).all()
    for row in range(3):
        assert keep[row].tolist() == torch.nonzero(~mask[row]).flatten().tolist()
    again, _ = random_patch_mask(3, length, ratio, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)  # a function of the generator (exact resume)


def test_masked_patch_mse_hand_case_counts_masked_patches_only():
    pred = torch.zeros(1, 4, 2)
    target = torch.tensor([[[1.0, 1.0], [5.0, 5.0], [2.0, 0.0], [7.0, 7.0]]])
    mask = torch.tensor([[True, False, True, False]])
    # Patch 0: mean(1, 1) = 1; patch 2: mean(4, 0) = 2 → 1.5. Patches 1 and 3 are visible.
    assert float(masked_patch_mse(pred, target, mask)) == pytest.approx(1.5)
    changed = pred.clone()
    changed[0, 1] = 100.0
    changed[0, 3] = -3.0
    assert float(masked_patch_mse(changed, target, mask)) == pytest.approx(1.5)
    changed[0, 2] = torch.tensor([2.0, 0.0])  # a perfect masked prediction lowers the loss
    assert float(masked_patch_mse(changed, target, mask)) == pytest.approx(0.5)
    # Per-patch normalised target: [1, 1] has zero variance → 0; [2, 0] → ±1/√(2 + 1e-6).
    expected = 0.5 * (0.0 + 2 / (2 + 1e-6) / 2)
    assert float(masked_patch_mse(pred, target, mask, norm_pix=True)) == pytest.approx(expected)


def test_mae_vit_prediction_ignores_pixels_of_masked_patches():
    torch.manual_seed(0)
    model = build_mae(_cfg("mae", "mae.ratio=0.5"), total_steps=4).eval()
    images = torch.randn(2, 1, 64, 64)
    mask, keep = random_patch_mask(2, 16, 0.5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.student(images, mask, keep)
        assert ref.shape == (2, 16, 16 * 16)
        hidden = mask.view(2, 4, 4).repeat_interleave(16, 1).repeat_interleave(16, 2)
        edited = torch.where(hidden[:, None], torch.randn_like(images) * 5, images)
        assert torch.equal(model.student(edited, mask, keep), ref)  # the encoder never saw them
        visible = torch.where(~hidden[:, None], images + 1.0, images)
        assert not torch.allclose(model.student(visible, mask, keep), ref)


def test_mae_vmamba_path_uses_the_mask_embedding():
    torch.manual_seed(0)
    cfg = load_config("tiny", ["method=mae", "mae.ratio=0.5", "device=cpu"])  # VMamba "tiny"
    model = build_mae(cfg, total_steps=4).eval()
    images = torch.randn(1, 1, 64, 64)
    mask = torch.tensor([[True, False, False, True]])  # 2×2 grid of 32-px cells
    keep = torch.tensor([[1, 2]])
    with torch.no_grad():
        ref = model.student(images, mask, keep)
        assert ref.shape == (1, 4, 32 * 32)
        edited = images.clone()
        edited[..., 4:28, 4:28] += 3.0  # inside masked cell 0, beyond the stem's reach
        assert torch.allclose(model.student(edited, mask, keep), ref, atol=1e-5)
        loss, logs = model.training_step(_batch(1), 0)
    assert math.isfinite(float(loss)) and logs["mask_ratio"] == 0.5


def test_mae_rejects_bad_ratio():
    with pytest.raises(ConfigError, match=r"mae\.ratio"):
        build_mae(_cfg("mae", "mae.ratio=1.0"), total_steps=1)


# ---------------------------------------------------------------------------------- blocks
def test_valid_patches_needs_one_region_pixel():
    region = torch.zeros(1, 32, 32, dtype=torch.bool)
    region[0, 17, 3] = True  # one pixel in patch (1, 0) of a 2×2 grid of 16-px patches
    assert valid_patches(region, 16)[0].tolist() == [[False, False], [True, False]]
    with pytest.raises(ValueError, match="divisible"):
        valid_patches(region, 5)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 9), w=st.integers(1, 9), bh=st.integers(1, 9), bw=st.integers(1, 9),
    seed=st.integers(0, 10_000),
)  # fmt: skip
def test_box_counts_match_brute_force(h, w, bh, bw, seed):
    bh, bw = min(bh, h), min(bw, w)
    mask = torch.rand(h, w, generator=torch.Generator().manual_seed(seed)) > 0.5
    counts = box_counts(mask, bh, bw)
    assert counts.shape == (h - bh + 1, w - bw + 1)
    for top in range(h - bh + 1):
        for left in range(w - bw + 1):
            assert counts[top, left] == int(mask[top : top + bh, left : left + bw].sum())


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(4, 40), w=st.integers(4, 40), s_lo=st.floats(0.02, 0.9),
    s_span=st.floats(0.0, 0.1), a_lo=st.floats(0.3, 2.0), a_span=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)  # fmt: skip
def test_block_size_obeys_scale_and_aspect(h, w, s_lo, s_span, a_lo, a_span, seed):
    scale, aspect = (s_lo, s_lo + s_span), (a_lo, a_lo + a_span)
    bh, bw = sample_block_size((h, w), scale, aspect, torch.Generator().manual_seed(seed))
    assert 1 <= bh <= h and 1 <= bw <= w
    n = h * w
    # Before rounding: bh = √(s·n·a), bw = √(s·n/a); rounding moves each by ≤ 0.5, and
    # clipping only ever shrinks a side to the grid (or grows it to 1).
    if bh > 1:  # not grown to 1
        assert bh <= math.sqrt(scale[1] * n * aspect[1]) + 0.5 + 1e-9
    if bh < h:  # not clipped to the grid
        assert bh >= math.sqrt(scale[0] * n * aspect[0]) - 0.5 - 1e-9
    if bw > 1:
        assert bw <= math.sqrt(scale[1] * n / aspect[0]) + 0.5 + 1e-9
    if bw < w:
        assert bw >= math.sqrt(scale[0] * n / aspect[1]) - 0.5 - 1e-9


@st.composite
def _valid_maps(draw):
    """A batch of valid-patch maps: a random rectangle (the fan's bounding box) plus speckle."""
    b, h, w = draw(st.integers(1, 3)), draw(st.integers(5, 14)), draw(st.integers(5, 14))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, h, w, generator=g) < draw(st.floats(0.0, 0.3))
    for i in range(b):
        top, left = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        valid[i, top : top + draw(st.integers(0, h)), left : left + draw(st.integers(0, w))] = 1
    return valid


def _cells(mask: torch.Tensor) -> set[int]:
    """Row-major indices of the True cells of a (h, w) mask."""
    return set(torch.nonzero(mask.flatten()).flatten().tolist())


@settings(max_examples=60, deadline=None)
@given(
    valid=_valid_maps(), n_targets=st.integers(1, 4), min_keep=st.integers(1, 12),
    t_scale=st.sampled_from([(0.075, 0.125), (0.15, 0.2), (0.02, 0.05)]),
    seed=st.integers(0, 10_000),
)  # fmt: skip
def test_jepa_blocks_obey_the_usrc_rules(valid, n_targets, min_keep, t_scale, seed):
    b, h, w = valid.shape
    masks = sample_jepa_masks(
        valid,
        n_targets=n_targets,
        target_scale=t_scale,
        target_aspect=(0.75, 1.5),
        context_scale=(0.85, 1.0),
        context_aspect=(1.0, 1.0),
        min_keep=min_keep,
        generator=torch.Generator().manual_seed(seed),
    )
    bh, bw = (int(v) for v in masks.target_boxes[0, 0, 2:])
    assert (masks.target_boxes[..., 2:] == torch.tensor([bh, bw])).all()  # one size per batch
    tau = min(min_keep, bh * bw)
    for i in range(b):
        used = masks.valid[i]
        if int(valid[i].sum()) > bh * bw:
            assert torch.equal(used, valid[i])  # USrc applied
        else:
            assert used.all()  # too little region: all-valid fallback
        counts = box_counts(used, bh, bw)
        covered = torch.zeros(h, w, dtype=torch.bool)
        for t in range(n_targets):
            top, left = (int(v) for v in masks.target_boxes[i, t, :2])
            box = torch.zeros(h, w, dtype=torch.bool)
            box[top : top + bh, left : left + bw] = True
            target = masks.targets[i, t]
            assert torch.equal(target, box & used)  # M_i = B_i ∩ P_valid
            assert int(target.sum()) >= 1
            if (counts >= tau).any():
                assert int(target.sum()) >= tau  # rejection rule |M_i| ≥ τ when satisfiable
            covered |= target
        ctx = masks.context[i]
        top, left, ch, cw = (int(v) for v in masks.context_boxes[i])
        assert ctx.any() and not (ctx & covered).any() and not (ctx & ~used).any()
        best = int(box_counts(used & ~covered, ch, cw).max())
        assert int(ctx.sum()) >= min(min_keep, best)  # |M_c| ≥ τ when satisfiable
        assert not ctx[:top].any() and not ctx[top + ch :].any()
        assert not ctx[:, :left].any() and not ctx[:, left + cw :].any()
        # Kept indices: a subset of the masks, equal lengths across the batch.
        assert set(masks.context_idx[i].tolist()) <= set(
            torch.nonzero(ctx.flatten()).flatten().tolist()
        )
        for t in range(n_targets):
            kept = set(masks.target_idx[i, t].tolist())
            assert kept <= _cells(masks.targets[i, t])
            assert len(kept) == masks.target_idx.shape[2]
    assert masks.target_idx.shape[2] == int(masks.targets.flatten(2).sum(2).min())
    assert masks.context_idx.shape[1] == int(masks.context.flatten(1).sum(1).min())


def test_jepa_blocks_reach_tau_on_a_roomy_grid():
    # 14×14 grid, region = left half: every target keeps ≥ τ = 10 valid patches (Tab. 5).
    valid = torch.zeros(4, 14, 14, dtype=torch.bool)
    valid[:, :, :7] = True
    masks = sample_jepa_masks(
        valid,
        n_targets=4,
        target_scale=(0.075, 0.125),
        target_aspect=(0.75, 1.5),
        context_scale=(0.85, 1.0),
        context_aspect=(1.0, 1.0),
        min_keep=10,
        generator=torch.Generator().manual_seed(0),
    )
    assert (masks.targets.flatten(2).sum(2) >= 10).all()
    assert not masks.targets[..., 7:].any() and not masks.context[..., 7:].any()
    assert masks.target_idx.shape[:2] == (4, 4) and masks.target_idx.shape[2] >= 10


def test_jepa_blocks_reject_targets_covering_the_grid():
    with pytest.raises(ValueError, match="whole"):
        sample_jepa_masks(
            torch.ones(1, 2, 2, dtype=torch.bool),
            n_targets=1,
            target_scale=(1.0, 1.0),
            target_aspect=(1.0, 1.0),
            context_scale=(1.0, 1.0),
            context_aspect=(1.0, 1.0),
            min_keep=1,
            generator=torch.Generator(),
        )


# ---------------------------------------------------------------------------------- JEPA
def test_jepa_loss_hand_case_ignores_unindexed_patches():
    targets = torch.zeros(1, 4, 2)
    pred = torch.tensor([[[[0.5, 0.5]], [[3.0, 0.0]]]])  # (B=1, T=2, N=1, C=2)
    idx = torch.tensor([[[1], [3]]])
    # Smooth-L1 (β = 1): 0.5·0.5² = 0.125 twice; |3| − 0.5 = 2.5 and 0 → mean 2.75 / 4.
    assert float(jepa_loss(pred, targets, idx)) == pytest.approx(2.75 / 4)
    targets[0, 0] = 1e6
    targets[0, 2] = float("nan")
    assert float(jepa_loss(pred, targets, idx)) == pytest.approx(2.75 / 4)


def test_resample_tokens_to_the_student_grid():
    fmap = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(resample_tokens(fmap, (4, 4)), fmap.flatten(2).transpose(1, 2))
    coarse = resample_tokens(fmap, (2, 2))
    assert coarse.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # 2×2 means
    assert resample_tokens(fmap[..., :2, :2], (4, 4)).shape == (1, 16, 1)


def test_jepa_teacher_stays_frozen_while_the_student_learns():
    torch.manual_seed(0)
    model = build_jepa(_cfg("jepa"), total_steps=4)
    before_t = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in model.student.state_dict().items()}
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-2)
    model.train()
    assert not model.teacher.training and model.student.training
    batch = _batch()
    for step in range(3):
        loss, _ = model.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        model.before_optimizer_step(step)
        opt.step()
        model.after_step(step)
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, before_t[key]), key  # bitwise unchanged
    assert not model.teacher.training
    changed = [k for k, v in model.student.state_dict().items() if not torch.equal(v, before_s[k])]
    assert changed  # the student did learn
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in model.teacher.parameters()}


def test_jepa_loss_covers_valid_patches_only(monkeypatch):
    torch.manual_seed(0)
    model = build_jepa(_cfg("jepa"), total_steps=4)
    batch = _batch()
    masks = model.sample_masks(batch, 0)
    valid = masks.valid.flatten(1)
    assert not valid[:, 0::4].any() and valid.float().mean() < 1  # column 0 lies outside
    assert valid.gather(1, masks.target_idx.flatten(1)).all()
    assert valid.gather(1, masks.context_idx).all()
    ref, logs = model.training_step(batch, 0)
    assert logs["valid_fraction"] < 1
    original = model.teacher_targets

    def poisoned(images, grid):
        tokens = original(images, grid).clone()
        tokens[~valid] = float("nan")  # outside the scan region: must never reach the loss
        return tokens

    monkeypatch.setattr(model, "teacher_targets", poisoned)
    loss, _ = model.training_step(batch, 0)
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(
        float(ref.detach()), rel=1e-6
    )


def test_jepa_without_region_uses_every_patch():
    model = build_jepa(_cfg("jepa", "jepa.use_region=false"), total_steps=4)
    assert model.sample_masks(_batch(), 0).valid.all()


def test_jepa_bad_teacher_path_and_config_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match=r"jepa\.teacher_ckpt"):
        build_jepa(_cfg("jepa", f"jepa.teacher_ckpt={tmp_path / 'missing'}"), total_steps=1)
    with pytest.raises(ConfigError, match=r"jepa\.target_scale"):
        build_jepa(_cfg("jepa", "jepa.target_scale=[0.5,0.2]"), total_steps=1)


# ------------------------------------------------------------------ the baselines' own views
def test_mae_sees_unblurred_views_openus_view0_is_blurred(shared_data):
    """Same crop geometry (the whole frame, no flips/rotation): what MAE's training step gets
    is the plainly resized frame, while OpenUS's first global view is always blurred."""
    import cv2
    import numpy as np

    from usfm_core.data.views import MultiCropTransform

    path = sorted((shared_data / "busi" / "images").glob("*.png"))[0]
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    side = min(image.shape)
    image = np.ascontiguousarray(image[:side, :side])  # square: the full crop is the frame
    region = np.ones_like(image, dtype=bool)
    geometry = [
        "views.global_scale=[1.0,1.0]",
        "views.aspect_ratio=[1.0,1.0]",
        "views.hflip_p=0",
        "views.vflip_p=0",
        "views.rotate_p=0",
        "views.mean=[0.0]",
        "views.std=[1.0]",
    ]
    plain = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    mae_cfg = _cfg("mae", *geometry)
    views = MultiCropTransform(mae_cfg.views)(image, region, np.random.default_rng(0))
    seen = []
    model = build_mae(mae_cfg, total_steps=1)
    model.set_student_runner(lambda images, *a: seen.append(images) or model.student(images, *a))
    model.training_step({"global_views": views["global_views"][None]}, 0)
    np.testing.assert_allclose(seen[0][0, 0].numpy(), plain, atol=1e-6)

    openus = load_config("tiny", [*geometry, "views.jitter_p=0", "views.gamma_p=0"])
    view0 = MultiCropTransform(openus.views)(image, region, np.random.default_rng(0))
    blurred = view0["global_views"][0, 0].numpy()

    def roughness(x: np.ndarray) -> float:
        return float(np.abs(np.diff(x, axis=1)).mean())

    # DINO's blur sigmas shrink with the 64² view (0.03–0.6 px): a mild but real smoothing.
    assert roughness(blurred) < 0.97 * roughness(plain)


def _run_recipe(tmp_path, env_extra: dict[str, str]):
    """``tools/pretrain_backbone.sh --method jepa --dry-run`` with a fake data folder."""
    import os
    import subprocess
    from pathlib import Path

    data = tmp_path / "data"
    for sub in ("busi", "hc18", "sim"):
        (data / "pretrain" / sub).mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve().parents[1] / "tools" / "pretrain_backbone.sh"
    env = {**os.environ, "HOME": str(tmp_path), **env_extra}
    return subprocess.run(
        ["bash", str(script), "--method", "jepa", "--dry-run", "--data", str(data),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300,
    )


def test_jepa_recipe_refuses_to_start_without_its_mae_teacher(tmp_path):
    """SALT needs a pretrained frozen teacher: the shipped-budget recipe stops (exit 2, naming
    the missing folder and the fix) instead of silently training against a random teacher."""
    res = _run_recipe(tmp_path, {})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "pretrain-small-fast-mae/backbone" in res.stderr
    assert "--method mae" in res.stderr


def test_jepa_recipe_uses_the_teacher_and_the_scaled_predictor(tmp_path):
    """With a teacher folder the recipe passes it as jepa.teacher_ckpt with the 128-wide
    predictor (paper: half the encoder's width)."""
    from usfm_core.models.serialization import save_model

    teacher = tmp_path / "teacher"
    cfg = load_config("tiny", ["method=jepa", "device=cpu"])
    save_model(build_jepa(cfg, total_steps=1).export_backbone(), teacher)
    res = _run_recipe(tmp_path, {"TEACHER": str(teacher)})
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("usfm-core pretrain"))
    assert f"jepa.teacher_ckpt={teacher}" in line
    assert "jepa.pred_dim=128" in line and "jepa.pred_heads=4" in line
