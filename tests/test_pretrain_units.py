"""Unit tests of the OpenUS pre-training pieces (no real data, stand-in backbone)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from usfm_core.errors import ConfigError
from usfm_core.pretrain import openus as openus_mod
from usfm_core.pretrain.config import PretrainConfig, load_config, preset
from usfm_core.pretrain.ema import PerImageLossEMA, PositionalLossEMA, ema_update
from usfm_core.pretrain.heads import BatchStandardize, ProjectionHead, ReconstructionHead
from usfm_core.pretrain.losses import DistillationLoss, reconstruction_loss
from usfm_core.pretrain.masking import (
    AttentionMaskGenerator,
    BlockMaskGenerator,
    RandomMaskGenerator,
    SelfAdaptiveMaskGenerator,
    num_masked,
)
from usfm_core.pretrain.schedules import cosine_schedule, linear_schedule, warmup_then_constant


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ schedules
def test_cosine_schedule_warmup_and_end_points():
    s = cosine_schedule(1.0, 0.1, 10, warmup_steps=4, warmup_start=0.0)
    assert s.shape == (10,)
    np.testing.assert_allclose(s[:4], [0.0, 0.25, 0.5, 0.75])
    assert s[4] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    mid = cosine_schedule(0.0, 1.0, 3)[1]
    assert mid == pytest.approx(0.5)  # half-way on the cosine = mean of the ends
    assert np.all(np.diff(s[4:]) <= 0)


def test_linear_and_warmup_then_constant():
    np.testing.assert_allclose(linear_schedule(0.1, 0.9, 5), [0.1, 0.3, 0.5, 0.7, 0.9])
    t = warmup_then_constant(0.04, 0.07, 3, 6)
    np.testing.assert_allclose(t, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])


# ------------------------------------------------------------------------------ masking
@pytest.mark.parametrize("grid", [(2, 2), (3, 3), (7, 7), (14, 14), (4, 6)])
@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.8])
def test_every_generator_masks_exactly_the_ratio(grid, ratio):
    n = grid[0] * grid[1]
    expected = min(math.ceil(n * ratio - 1e-9), n - 1)
    scores = torch.rand(3, *grid, generator=_gen(1))
    loss_map = torch.rand(3, *grid, generator=_gen(2))
    gens = [
        RandomMaskGenerator(ratio),
        BlockMaskGenerator(ratio),
        AttentionMaskGenerator(ratio),
        SelfAdaptiveMaskGenerator(ratio, 10),
    ]
    for g in gens:
        m = g(3, grid, scores=scores, loss_map=loss_map, step=3, generator=_gen(3))
        assert m.shape == (3, *grid) and m.dtype == torch.bool
        assert m.flatten(1).sum(1).tolist() == [expected] * 3, type(g).__name__


def test_num_masked_keeps_one_visible_cell():
    assert num_masked(49, 0.8) == 40
    assert num_masked(4, 0.8) == 3  # ceil(3.2) = 4 would hide everything
    assert num_masked(1, 0.3) == 0
    assert num_masked(5, 0.8) == 4  # 0.8·5 is 4.000000000000001 in floating point


def test_self_adaptive_schedules_alpha_cosine_r_linear():
    g = SelfAdaptiveMaskGenerator(0.8, 101, alpha=(0.1, 0.9), r=(0.1, 0.9))
    assert g.alpha(0) == pytest.approx(0.1) and g.alpha(100) == pytest.approx(0.9)
    assert g.alpha(50) == pytest.approx(0.5)
    assert g.alpha(25) == pytest.approx(0.9 + 0.5 * (0.1 - 0.9) * (1 + math.cos(math.pi / 4)))
    assert g.r(0) == pytest.approx(0.1) and g.r(100) == pytest.approx(0.9)
    assert g.r(25) == pytest.approx(0.3)
    assert g.r(10_000) == pytest.approx(0.9)  # clamped past the end


@pytest.mark.parametrize("weighting", ["paper", "code"])
def test_self_adaptive_alp_and_top_k_cells_are_masked(weighting):
    grid, b, steps = (7, 7), 4, 11
    gen = SelfAdaptiveMaskGenerator(0.6, steps, weighting=weighting)
    scores = torch.rand(b, *grid, generator=_gen(5)) * 3.0 + 1.0
    loss_map = torch.rand(b, *grid, generator=_gen(6)) * 0.01
    step = 5
    a = gen.alpha(step)

    def mm(x):
        lo, hi = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
        return (x - lo) / (hi - lo)

    w_t, w_s = (1 - a, a) if weighting == "paper" else (a, 1 - a)
    alp = w_t * mm(scores) + w_s * mm(loss_map)
    torch.testing.assert_close(gen.alp(scores, loss_map, step), alp)
    mask = gen(b, grid, scores=scores, loss_map=loss_map, step=step, generator=_gen(7))
    k = math.floor(49 * gen.r(step))
    assert 0 < k < num_masked(49, 0.6)
    for i in range(b):
        top = alp[i].flatten().topk(k).indices
        assert mask[i].flatten()[top].all()
    # The remaining masked cells are random: two seeds give different extras.
    other = gen(b, grid, scores=scores, loss_map=loss_map, step=step, generator=_gen(8))
    assert not torch.equal(mask, other)


def test_self_adaptive_late_steps_take_only_top_cells():
    gen = SelfAdaptiveMaskGenerator(0.5, 2, r=(0.9, 0.9))
    scores = torch.arange(16.0).view(1, 4, 4)
    mask = gen(1, (4, 4), scores=scores, step=1, generator=_gen(0))
    # k = floor(16·0.9) = 14 ≥ n_mask = 8: exactly the 8 highest-scoring cells.
    assert mask.flatten().nonzero().flatten().tolist() == list(range(8, 16))


def test_masks_are_deterministic_under_a_seed():
    scores = torch.rand(2, 6, 6, generator=_gen(0))
    for g in (RandomMaskGenerator(0.5), BlockMaskGenerator(0.4), SelfAdaptiveMaskGenerator(0.7, 5)):
        a = g(2, (6, 6), scores=scores, step=2, generator=_gen(42))
        b = g(2, (6, 6), scores=scores, step=2, generator=_gen(42))
        c = g(2, (6, 6), scores=scores, step=2, generator=_gen(43))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_block_masks_are_contiguous_unlike_random_masks():
    block = BlockMaskGenerator(0.3)(16, (14, 14), generator=_gen(0))
    rand = RandomMaskGenerator(0.3)(16, (14, 14), generator=_gen(0))
    comps_block = [ndimage.label(m.numpy())[1] for m in block]
    comps_rand = [ndimage.label(m.numpy())[1] for m in rand]
    assert np.mean(comps_block) < 6
    assert np.mean(comps_rand) > 2 * np.mean(comps_block)
    # Every block component is at least a few cells (no scattered single cells).
    sizes = [np.bincount(ndimage.label(m.numpy())[0].ravel())[1:] for m in block]
    assert np.median(np.concatenate(sizes)) >= 4


def test_attention_generator_masks_most_important_cells():
    scores = torch.tensor([[[0.9, 0.1], [0.5, 0.7]]])
    mask = AttentionMaskGenerator(0.5)(1, (2, 2), scores=scores, generator=_gen(0))
    assert mask.tolist() == [[[True, False], [False, True]]]
    with pytest.raises(ValueError, match="scores"):
        AttentionMaskGenerator(0.5)(1, (2, 2))


# ------------------------------------------------------------------------------ losses
def _ce(p: np.ndarray, q_logits: np.ndarray, temp: float) -> float:
    q = np.exp(q_logits / temp) / np.exp(q_logits / temp).sum()
    return float(-(p * np.log(q)).sum())


def test_cls_loss_matches_hand_computation_two_classes():
    loss = DistillationLoss(2, 2, student_temp=0.5)
    loss.center.copy_(torch.tensor([[0.2, -0.2]]))
    # G = 2 global + 1 local view, B = 1 image, K = 2 classes.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    got = loss.cls_loss(student, teacher, n_global=2, teacher_temp=0.25)

    def tprob(t):
        z = (t - np.array([0.2, -0.2])) / 0.25
        return np.exp(z) / np.exp(z).sum()

    t0, t1 = tprob(np.array([2.0, 0.0])), tprob(np.array([0.0, 0.0]))
    s = student.numpy()
    pairs = [(t0, s[1]), (t0, s[2]), (t1, s[0]), (t1, s[2])]  # no same-view pairs
    expected = np.mean([_ce(t, sv, 0.5) for t, sv in pairs])
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_patch_loss_averages_masked_patches_per_image_then_batch():
    loss = DistillationLoss(2, 2, student_temp=1.0)
    student = torch.tensor(
        [[[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]], [[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]
    )
    teacher = torch.tensor(
        [[[5.0, 0.0], [0.0, 5.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0], [9.0, 9.0]]]
    )
    mask = torch.tensor([[True, False, True], [True, False, False]])
    got = loss.patch_loss(student, teacher, mask, teacher_temp=1.0)
    tp = lambda t: np.exp(t) / np.exp(t).sum()  # noqa: E731
    img0 = np.mean(
        [
            _ce(tp(np.array([5.0, 0.0])), np.array([0.0, 0.0]), 1.0),
            _ce(tp(np.array([1.0, 1.0])), np.array([0.0, 3.0]), 1.0),
        ]
    )
    img1 = _ce(tp(np.array([0.0, 0.0])), np.array([2.0, 0.0]), 1.0)
    assert float(got) == pytest.approx((img0 + img1) / 2, rel=1e-5)
    # No masked patch → 0 for that image.
    none = loss.patch_loss(student, teacher, torch.zeros(2, 3, dtype=torch.bool), 1.0)
    assert float(none) == 0.0


def test_center_update_is_an_ema_of_the_teacher_batch_mean():
    loss = DistillationLoss(3, 2, center_momentum=0.9)
    loss.center.fill_(1.0)
    cls = torch.tensor([[0.0, 3.0, 6.0], [2.0, 1.0, 0.0]])
    patch = torch.arange(8.0).view(2, 2, 2)
    loss.update_centers(cls, patch)
    torch.testing.assert_close(loss.center, 0.9 + 0.1 * torch.tensor([[1.0, 2.0, 3.0]]))
    torch.testing.assert_close(loss.patch_center, 0.1 * torch.tensor([[[3.0, 4.0]]]))


def test_reconstruction_loss_counts_masked_pixels_only():
    target = torch.zeros(1, 2, 64, 64)
    pred = torch.zeros(1, 2, 64, 64)
    pred[:, :, :32, :32] = 2.0  # error 4 in cell (0, 0)
    pred[:, :, 32:, 32:] = 1.0  # error 1 in cell (1, 1)
    mask = torch.tensor([[[True, False], [False, False]]])
    loss, cell_map = reconstruction_loss(pred, target, mask, stride=32)
    assert float(loss) == pytest.approx(4.0)
    torch.testing.assert_close(cell_map, torch.tensor([[[4.0, 0.0], [0.0, 1.0]]]))
    empty, _ = reconstruction_loss(pred, target, torch.zeros_like(mask), stride=32)
    assert float(empty) == 0.0


# ------------------------------------------------------------------------------ EMA
def test_ema_update_math_and_ddp_prefix():
    teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.75)
    for p_t, old, p_s in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(p_t, 0.75 * old + 0.25 * p_s.detach())
    wrapped = nn.Module()
    wrapped.module = student  # names "module.weight", like DDP
    ema_update(teacher, wrapped, 0.0)
    torch.testing.assert_close(teacher.weight, student.weight.detach())


def test_per_image_loss_ema_is_keyed_with_mean_fallback():
    ema = PerImageLossEMA(n_items=5, grid=(2, 2), momentum=0.5)
    assert torch.equal(ema.get(torch.tensor([3])), torch.zeros(1, 2, 2))
    ema.update(
        torch.tensor([0, 2]), torch.stack([torch.full((2, 2), 4.0), torch.full((2, 2), 2.0)])
    )
    ema.update(torch.tensor([0]), torch.full((1, 2, 2), 8.0))
    got = ema.get(torch.tensor([0, 2, 4]))
    assert torch.allclose(got[0], torch.full((2, 2), 6.0))  # 0.5·4 + 0.5·8
    assert torch.allclose(got[1], torch.full((2, 2), 2.0))
    assert torch.allclose(got[2], torch.full((2, 2), 4.0))  # unseen: mean of seen maps
    # Only valid (masked) cells update; flips mirror the map.
    valid = torch.tensor([[[True, False], [False, False]]])
    ema.update(torch.tensor([2]), torch.full((1, 2, 2), 10.0), valid)
    assert ema.get(torch.tensor([2]))[0].tolist() == [[6.0, 2.0], [2.0, 2.0]]
    flipped = ema.get(torch.tensor([2]), flips=torch.tensor([True]))
    assert flipped[0].tolist() == [[2.0, 6.0], [2.0, 2.0]]
    fresh = PerImageLossEMA(5, (2, 2), 0.5)
    fresh.load_state_dict(ema.state_dict())
    assert torch.equal(fresh.get(torch.arange(5)), ema.get(torch.arange(5)))


def test_positional_loss_ema_is_a_batch_average_prior():
    ema = PositionalLossEMA((1, 2), momentum=0.7)
    ema.update(torch.tensor([0, 1]), torch.tensor([[[1.0, 3.0]], [[3.0, 5.0]]]))
    assert ema.get(torch.tensor([9, 8, 7])).tolist() == [[[2.0, 4.0]]] * 3
    ema.update(torch.tensor([5]), torch.tensor([[[12.0, 4.0]]]))
    torch.testing.assert_close(ema.map, torch.tensor([[0.7 * 2 + 0.3 * 12, 0.7 * 4 + 0.3 * 4]]))


# ------------------------------------------------------------------------------ heads
def test_projection_head_shapes_and_frozen_norm():
    head = ProjectionHead(16, 32, patch_out_dim=24, hidden=20, bottleneck=8)
    assert head(torch.randn(3, 16)).shape == (3, 32)
    assert head.forward_patches(torch.randn(3, 5, 16)).shape == (3, 5, 24)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    # Weight norm with g = 1: each prototype has unit norm, so |logit| <= 1.
    assert head(torch.randn(10, 16)).abs().max() <= 1.0 + 1e-5
    shared = ProjectionHead(16, 32, hidden=20, bottleneck=8, shared_head=True)
    x = torch.randn(2, 16)
    torch.testing.assert_close(shared(x), shared.forward_patches(x))
    assert len(shared.last_layer_parameters()) == 2  # g and v of the one shared layer
    assert len(head.last_layer_parameters()) == 4  # separate patch prototypes


def test_reconstruction_head_returns_input_sized_pixels():
    head = ReconstructionHead(8, out_channels=1, stride=32)
    assert head(torch.randn(2, 8, 3, 2)).shape == (2, 1, 96, 64)


# ------------------------------------------------------------------------------ config
def test_presets_overrides_and_files(tmp_path):
    tiny = preset("tiny")
    assert tiny.views.global_size == 64 and tiny.heads.out_dim == 256
    s = preset("openus-s")
    assert (s.masking.ratio, s.loss.student_temp, s.optim.lr) == (0.8, 0.1, 5e-4)
    assert (s.masking.cell, tiny.masking.cell, preset("small-fast").masking.cell) == (32, 32, 16)
    cfg = load_config(
        "tiny",
        [
            "masking.ratio=0.6",
            "masking.score_weighting=code",
            "optim.betas=[0.9,0.95]",
            "backbone.overrides.drop_path_rate=0.1",
        ],
    )
    assert cfg.masking.ratio == 0.6 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.backbone.overrides == {"drop_path_rate": 0.1}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "tiny", "epochs": 3, "loss": {"student_temp": 0.2}}))
    from_file = load_config(path)
    assert (from_file.epochs, from_file.loss.student_temp, from_file.views.local_size) == (
        3,
        0.2,
        32,
    )
    yml = tmp_path / "run.yaml"
    yml.write_text("preset: tiny\nmasking:\n  loss_ema: positional\n")
    assert load_config(yml).masking.loss_ema == "positional"
    assert PretrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "override, key",
    [
        ("masking.ratio=1.5", "masking.ratio"),
        ("masking.generator=foo", "masking.generator"),
        ("masking.nope=1", "masking.nope"),
        ("optim.lr=abc", "optim.lr"),
        ("method=nope", "method"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", [override])


def test_config_errors_for_missing_file_and_bad_views(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="views"):
        load_config("tiny", ["views.global_size=50"])


# ------------------------------------------------------------------------------ OpenUS step
@dataclass
class _Out:
    features: list
    patch_tokens: torch.Tensor
    global_token: torch.Tensor
    tokens: torch.Tensor
    grid: tuple[int, int]
    importance: torch.Tensor | None = None


class _StandInBackbone(nn.Module):
    """Patchify by 8, mask, pool to 32-px tokens + a linear mixer: the VMamba interface
    (masks on any grid that tiles the 8-px embedding) at a tiny cost."""

    stride = 32

    def __init__(self, in_chans: int = 1, dim: int = 16):
        super().__init__()
        self.embed = nn.Conv2d(in_chans, dim, 8, stride=8)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.mix = nn.Linear(dim, dim)
        self.embed_dim = dim

    def forward(self, x, mask=None, return_attention=False):
        f = self.embed(x).permute(0, 2, 3, 1)  # (B, H/8, W/8, C)
        if mask is not None:
            k = f.shape[1] // mask.shape[1]
            m = mask.repeat_interleave(k, 1).repeat_interleave(k, 2)
            f = torch.where(m[..., None], self.mask_token, f)
        f = nn.functional.avg_pool2d(f.permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1)
        b, h, w, c = f.shape
        tok = f.reshape(b, h * w, c)
        tok = tok + self.mix(tok.mean(1, keepdim=True))
        glob = tok.mean(1)
        imp = tok.norm(dim=-1).view(b, h, w) if return_attention else None
        return _Out([], tok, glob, torch.cat([glob[:, None], tok], 1), (h, w), imp)


@pytest.fixture
def stand_in_backbone(monkeypatch):
    monkeypatch.setattr(
        openus_mod,
        "build_backbone",
        lambda cfg, teacher=False: _StandInBackbone(cfg.views.in_chans),
    )


def _batch(b=3, seed=0):
    g = _gen(seed)
    return {
        "global_views": torch.randn(b, 2, 1, 64, 64, generator=g),
        "local_views": torch.randn(b, 2, 1, 32, 32, generator=g),
        "index": torch.arange(b),
    }


def test_openus_training_step_with_stand_in(stand_in_backbone):
    cfg = load_config("tiny", ["masking.ratio=0.5", "masking.cell=16"])
    model = openus_mod.build_openus(cfg, total_steps=4, steps_per_epoch=2, n_items=3)
    assert model.loss_ema.maps.shape[1:] == (4, 4)  # the loss EMA lives on the cell grid
    teacher_before = [p.clone() for p in model.teacher.backbone.parameters()]
    loss, logs = model.training_step(_batch(), 0)
    assert torch.isfinite(loss) and loss.requires_grad
    assert set(logs) >= {
        "cls",
        "patch",
        "rec_global",
        "rec_local",
        "loss",
        "alpha",
        "r",
        "mask_ratio",
        "teacher_temp",
    }
    assert logs["loss"] == pytest.approx(
        logs["cls"] + logs["patch"] + logs["rec_global"] + logs["rec_local"], rel=1e-5
    )
    assert logs["mask_ratio"] == pytest.approx(8 / 16)  # 4×4 grid of 16-px cells
    for key in ("teacher_entropy_ratio_cls", "teacher_entropy_ratio_patch"):
        assert 0.0 < logs[key] <= 1.0 + 1e-6
    assert logs["teacher_mi"] >= -1e-6 and logs["teacher_mi_patch"] >= -1e-6
    assert logs["teacher_temp"] == pytest.approx(0.04)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.loss_ema.valid_cells[:3].any()  # the loss EMA was fed
    with torch.no_grad():
        for p in model.student.backbone.parameters():
            p.add_(1.0)
    model.after_step(0)  # momentum 0.996 at step 0: teacher moves 0.004 towards the student
    for before, after in zip(teacher_before, model.teacher.backbone.parameters()):
        torch.testing.assert_close(after, before + 0.004)
    # The step's masks are a function of (seed, step): same step → same loss.
    model2 = openus_mod.build_openus(cfg, total_steps=4, steps_per_epoch=2, n_items=3)
    model2.load_state_dict(model.state_dict())
    a, _ = model.training_step(_batch(), 1)
    b, _ = model2.training_step(_batch(), 1)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-6)


def test_ibot_ablation_has_no_reconstruction(stand_in_backbone):
    cfg = preset("tiny")
    model = openus_mod.build_ibot(cfg, total_steps=2, steps_per_epoch=1, n_items=3)
    assert model.student.recon is None and model.cfg.masking.generator == "block"
    _, logs = model.training_step(_batch(), 0)
    assert "rec_global" not in logs and "alpha" not in logs
    assert cfg.masking.generator == "self_adaptive"  # caller's config untouched


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_roundtrip_and_crash_recovery(stand_in_backbone, tmp_path):
    from usfm_core.pretrain.trainer import find_checkpoint, load_checkpoint, save_checkpoint

    cfg = preset("tiny")
    model = openus_mod.build_openus(cfg, total_steps=4, steps_per_epoch=2, n_items=3)
    opt = torch.optim.AdamW(model.param_groups(0.04), lr=1e-3)
    loss, _ = model.training_step(_batch(), 0)
    loss.backward()
    opt.step()
    root = tmp_path / "checkpoints"
    save_checkpoint(root, model, opt, {"step": 1}, cfg)
    save_checkpoint(root, model, opt, {"step": 2}, cfg)  # replaces last/ atomically
    assert sorted(p.name for p in root.iterdir()) == ["last"]
    fresh = openus_mod.build_openus(cfg, total_steps=4, steps_per_epoch=2, n_items=3)
    fresh_opt = torch.optim.AdamW(fresh.param_groups(0.04), lr=1e-3)
    assert load_checkpoint(root / "last", fresh, fresh_opt) == {"step": 2}
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    # A crash between the two renames of a save leaves only the old copy: it is found.
    (root / "last").rename(root / ".last.old-123")
    assert find_checkpoint(root) == root / ".last.old-123"
    (root / ".last.old-123" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(Exception, match="cannot read checkpoint"):
        load_checkpoint(root / ".last.old-123", fresh, fresh_opt)


# ------------------------------------------------------------------------------ issue 12
def test_temperatures_are_refused_without_sharpening_unless_forced():
    with pytest.raises(ConfigError, match=r"loss\.teacher_temp.*0\.7") as info:
        load_config("openus-s", ["loss.student_temp=0.07"])  # the old pairing: τ_t = τ_s
    assert "force_temperatures" in info.value.hint
    old = ["loss.student_temp=0.07", "loss.teacher_temp=0.07"]
    with pytest.raises(ConfigError, match="force_temperatures"):
        load_config("tiny", old)
    forced = load_config("tiny", [*old, "loss.force_temperatures=true"])
    assert forced.loss.teacher_temp == forced.loss.student_temp == 0.07
    default = preset("openus-s").loss
    assert (default.warmup_teacher_temp, default.teacher_temp, default.student_temp) == (
        0.04,
        0.07,
        0.1,
    )


@pytest.mark.parametrize("cell", [12, 64, 0])
def test_mask_cell_must_tile_the_token_stride(cell):
    with pytest.raises(ConfigError, match=r"masking\.cell"):
        load_config("tiny", [f"masking.cell={cell}"])


def test_teacher_stats_hand_cases():
    from usfm_core.pretrain.losses import teacher_stats

    uniform = teacher_stats(torch.full((5, 4), 0.25))
    assert uniform["entropy_ratio"] == pytest.approx(1.0) and uniform["mi"] == pytest.approx(0.0)
    onehot = teacher_stats(torch.eye(4))  # every input its own class: MI = ln 4, entropy 0
    assert onehot["entropy_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert onehot["mi"] == pytest.approx(math.log(4), rel=1e-5)
    same = teacher_stats(torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(3, 1))  # no information
    assert same["mi"] == pytest.approx(0.0, abs=1e-6) and 0 < same["entropy_ratio"] < 1


def test_sinkhorn_targets_are_balanced_over_the_batch_and_sharper_than_ema():
    from usfm_core.pretrain.losses import sinkhorn_knopp, teacher_stats

    g = _gen(3)
    # Nearly identical rows (the collapse symptom): one shared logit vector + small noise.
    logits = torch.randn(1, 16, generator=g) * 0.5 + 0.02 * torch.randn(64, 16, generator=g)
    q = sinkhorn_knopp(logits, temp=0.05, n_iters=3)
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    torch.testing.assert_close(q.mean(0), torch.full((16,), 1 / 16), atol=0.02, rtol=0)
    # EMA centring starts from a zero centre: the shared component picks one class for all.
    ema = DistillationLoss(16, 16).teacher_probs(logits, torch.zeros(1, 16), 0.05)
    assert teacher_stats(ema)["entropy_ratio"] < 0.5 and teacher_stats(ema)["mi"] < 0.2
    assert teacher_stats(q)["mi"] > teacher_stats(ema)["mi"]
    torch.testing.assert_close(  # one row standardises to the bias, without an error
        ProjectionHead(8, 4, hidden=16, bottleneck=8, batch_norm=True).mlp[1](torch.randn(1, 16)),
        torch.zeros(1, 16),
    )


def test_head_batch_standardisation_removes_the_shared_component():
    torch.manual_seed(0)
    head = ProjectionHead(8, 32, hidden=16, bottleneck=8, batch_norm=True)
    x = torch.randn(6, 8)
    out = head(x)
    torch.testing.assert_close(head(x + 5.0 * torch.randn(1, 8)), out, atol=1e-3, rtol=1e-3)
    assert head.forward_patches(torch.randn(2, 5, 8)).shape == (2, 5, 32)
    plain = ProjectionHead(8, 32, hidden=16, bottleneck=8)
    assert [n for n, _ in plain.named_parameters() if n.startswith("mlp")] == [
        f"mlp.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")
    ]  # older checkpoints still load


def test_token_weights_and_cell_upsampling():
    from usfm_core.pretrain.openus import cells_from_tokens, token_weights

    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    mask[0, 2, 2] = True
    w = token_weights(mask, (2, 2))
    torch.testing.assert_close(w, torch.tensor([[[1.0, 0.0], [0.0, 0.25]]]))
    up = cells_from_tokens(torch.tensor([[[0.0, 1.0], [2.0, 3.0]]]), (4, 4))
    assert up.shape == (1, 4, 4) and len(up.unique()) > 4  # no ties among a token's cells


def test_baseline_methods_get_their_own_views_and_optimiser():
    mae = load_config("tiny", ["method=mae"])
    assert mae.views.global_blur_p == (0.0,) and mae.views.n_global == 1
    assert (mae.views.vflip_p, mae.views.rotate_p, mae.views.rotate_degrees) == (0.5, 1.0, (0, 90))
    assert (mae.optim.lr, mae.optim.lr_reference_batch, mae.optim.weight_decay) == (1e-3, 64, 0.01)
    assert mae.views.global_size == 64  # sizes stay the preset's
    jepa = load_config("tiny", ["method=jepa"])
    assert jepa.views.global_scale == (0.6, 1.0) and jepa.views.speckle_p > 0
    assert (jepa.optim.lr, jepa.optim.weight_decay_end) == (5e-5, 0.4)
    # The user's keys win over the method's defaults; OpenUS keeps the preset.
    assert load_config("tiny", ["method=mae", "optim.lr=0.01"]).optim.lr == 0.01
    assert load_config("tiny").views.global_blur_p == (1.0, 0.1)


def test_batch_standardize_is_batch_norm_over_every_leading_position():
    """BatchStandardize = batch norm in training mode without running statistics, over images
    and tokens together: values and gradients equal F.batch_norm's on the flattened rows."""
    torch.manual_seed(0)
    bs = BatchStandardize(6).double()
    with torch.no_grad():
        bs.weight.normal_()
        bs.bias.normal_()
    x = (2 * torch.randn(3, 5, 6, dtype=torch.float64) + 0.5).requires_grad_()
    got = bs(x)
    want = nn.functional.batch_norm(
        x.reshape(-1, 6), None, None, bs.weight, bs.bias, training=True, eps=bs.eps
    ).view_as(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    got_g = torch.autograd.grad(got, (x, bs.weight, bs.bias), g)
    want_g = torch.autograd.grad(want, (x, bs.weight, bs.bias), g)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    flat = got.detach().reshape(-1, 6)  # each channel: mean = bias, std = |weight| (to eps)
    torch.testing.assert_close(flat.mean(0), bs.bias.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        flat.std(0, unbiased=False), bs.weight.detach().abs(), rtol=1e-5, atol=0
    )
