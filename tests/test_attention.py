"""Scan-attention maps (OpenUS Eq. 4–5) against brute force and against the scan recurrence."""

from __future__ import annotations

import pytest
import torch

from usfm_core.models.attention import (
    _direction_map,
    direction_orders,
    model_attention,
    scan_attention_map,
)
from usfm_core.models.vmamba import VMamba, VMambaConfig


def random_scan(b: int, k: int, d: int, n: int, length: int, dt_scale: float = 1.0, seed: int = 0):
    """Random (delta ≥ 0, A < 0, B, C) in float64 with the shapes scan_attention_map takes."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.rand(b, k, d, length, generator=g, dtype=torch.float64) * dt_scale
    A = -torch.rand(k * d, n, generator=g, dtype=torch.float64) * 2 - 0.1
    B = torch.randn(b, k, n, length, generator=g, dtype=torch.float64)
    C = torch.randn(b, k, n, length, generator=g, dtype=torch.float64)
    return delta, A, B, C


def brute_force(delta, A, B, C, hw, include_delta_s=False):
    """Materialise the (B·K·D, L, L) decay tensor, as the reference implementation does."""
    b, k, d, length = delta.shape
    A = A.reshape(k * d, -1)
    n = A.shape[1]
    cum = delta.cumsum(-1).reshape(b * k * d, length)
    gap = cum[:, :, None] - cum[:, None, :]  # S_t − S_s: (BKD, L, L)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    a = A.reshape(1, k, d, n).expand(b, k, d, n).reshape(b * k * d, n)
    bb = B[:, :, None].expand(b, k, d, n, length).reshape(b * k * d, n, length)
    cc = C[:, :, None].expand(b, k, d, n, length).reshape(b * k * d, n, length)
    maps = torch.zeros(b * k * d, length, length, dtype=delta.dtype)
    for i in range(n):
        decay = torch.exp(a[:, i, None, None] * gap.clamp_min(0))
        maps += cc[:, i, :, None] * bb[:, i, None, :] * decay
    if include_delta_s:
        maps = maps * delta.reshape(b * k * d, 1, length)
    maps = (maps * causal).reshape(b, k, d, length, length).mean(2)  # (B, K, L, L)
    orders = direction_orders(*hw) if k == 4 else torch.arange(length)[None]
    total = torch.zeros(b, length, length, dtype=delta.dtype)
    for j in range(k):
        inv = torch.argsort(orders[j])  # row-major index → scan position
        total += maps[:, j][:, inv][:, :, inv]
    lo = total.amin((1, 2), keepdim=True)
    hi = total.amax((1, 2), keepdim=True)
    attn = (total - lo) / (hi - lo)
    return attn, attn.mean(1)


@pytest.mark.parametrize("include_delta_s", [False, True])
def test_matches_brute_force(include_delta_s: bool) -> None:
    hw = (3, 5)
    delta, A, B, C = random_scan(2, 4, 6, 3, 15)
    want, want_imp = brute_force(delta, A, B, C, hw, include_delta_s)
    for block, chunk in [(4, 2), (64, 256)]:  # blocking must not change the result
        got, imp = scan_attention_map(
            delta,
            A,
            B,
            C,
            directions_hw=hw,
            include_delta_s=include_delta_s,
            block=block,
            channel_chunk=chunk,
        )
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(imp, want_imp, rtol=1e-9, atol=1e-10)
    got32, _ = scan_attention_map(
        *(t.float() for t in (delta, A, B, C)), directions_hw=hw, include_delta_s=include_delta_s
    )
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-5)


def test_map_reproduces_the_selective_scan() -> None:
    """With Δ_s included, Σ_s attn[t, s] u_s is the scan output (one channel, D = 0)."""
    delta, A, B, C = random_scan(1, 1, 1, 4, 40)
    u = torch.randn(40, dtype=torch.float64)
    h = torch.zeros(4, dtype=torch.float64)
    ys = []
    for t in range(40):
        dt = delta[0, 0, 0, t]
        h = torch.exp(dt * A[0]) * h + dt * B[0, 0, :, t] * u[t]
        ys.append((h * C[0, 0, :, t]).sum())
    out = torch.zeros(1, 40, 40, dtype=torch.float64)
    attn = _direction_map(out, delta[:, 0], A, B[:, 0], C[:, 0], True, block=7)[0]
    torch.testing.assert_close(attn @ u, torch.stack(ys))


def test_long_sequence_with_strong_decay() -> None:
    """L = 3136 (stage 1 at 224²): finite, and rows match float64 brute force."""
    length = 56 * 56
    delta, A, B, C = random_scan(1, 1, 3, 2, length, dt_scale=4.0, seed=3)
    # The naive factorisation w_t = exp(A·S_t), K_s = B_s / w_s breaks down here.
    assert torch.exp(A[:, :1].float() * delta[0, 0].float().sum(-1, keepdim=True)).max() == 0
    f32 = [t.float() for t in (delta, A, B, C)]
    out = torch.zeros(1, length, length)
    raw = _direction_map(out, f32[0][:, 0], f32[1], f32[2][:, 0], f32[3][:, 0], False, 64)[0]
    assert torch.isfinite(raw).all()
    cum = delta[0, 0].cumsum(-1)  # (D, L)
    for t in (0, 1, 63, 64, 1500, length - 1):
        gap = (cum[:, t, None] - cum[:, : t + 1]).clamp_min(0)  # (D, t + 1)
        decay = torch.exp(A[:, :, None] * gap[:, None])  # (D, N, t + 1)
        row = (C[0, 0, :, t, None] * B[0, 0, :, : t + 1] * decay).sum((0, 1))
        torch.testing.assert_close(raw[t, : t + 1].double(), row, rtol=1e-3, atol=1e-5)
        assert torch.all(raw[t, t + 1 :] == 0)
    attn, imp = scan_attention_map(*f32)
    assert torch.isfinite(attn).all() and attn.min() == 0 and attn.max() == 1
    assert imp.shape == (1, length)


def test_bad_shapes_raise() -> None:
    delta, A, B, C = random_scan(1, 4, 2, 1, 6)
    with pytest.raises(ValueError, match="directions_hw"):
        scan_attention_map(delta, A, B, C)
    with pytest.raises(ValueError, match="B must be"):
        scan_attention_map(delta, A, B[:, :2], C, directions_hw=(2, 3))
    with pytest.raises(ValueError, match="K = 1 or 4"):
        scan_attention_map(delta[:, :2], A[:4], B[:, :2], C[:, :2])


def test_model_attention_matches_forward_importance() -> None:
    torch.manual_seed(0)
    model = VMamba(VMambaConfig.preset("tiny")).eval()
    x = torch.randn(2, 3, 64, 96)
    attn, imp = model_attention(model, x)
    with torch.no_grad():
        out = model(x, return_attention=True)
    assert attn.shape == (2, 6, 6) and imp.shape == (2, 2, 3)
    torch.testing.assert_close(imp, out.importance)
    # Importance = mean attention received (over query rows), min-max normalised.
    col = attn.mean(1)
    col = (col - col.amin(1, keepdim=True)) / (col.amax(1, keepdim=True) - col.amin(1, True))
    torch.testing.assert_close(imp.flatten(1), col)


def test_model_attention_against_brute_force_on_recorded_scan() -> None:
    """The map of stage 1 of a real model equals brute force on the recorded parameters."""
    torch.manual_seed(0)
    model = VMamba(VMambaConfig.preset("tiny")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), model.recording(1, 0) as ss2d:
        model(x)
        rec = ss2d.pop_record()
    assert rec["delta"].shape == (1, 4, model.get_ss2d(1, 0).d_inner, 64)
    want, _ = brute_force(*(rec[k].double() for k in ("delta", "A", "B", "C")), rec["hw"])
    attn, imp = model_attention(model, x, stage=1, block=0)
    torch.testing.assert_close(attn.double(), want, rtol=1e-3, atol=1e-4)
    assert imp.shape == (1, 8, 8)


@pytest.mark.slow
def test_model_attention_on_first_stage_at_224() -> None:
    """Stage 0 at 224² (L = 3136, D = 32 × 4 directions) runs and gives a valid map."""
    torch.manual_seed(0)
    model = VMamba(VMambaConfig.preset("tiny")).eval()
    attn, imp = model_attention(model, torch.randn(1, 3, 224, 224), stage=0, block=0)
    assert attn.shape == (1, 3136, 3136) and imp.shape == (1, 56, 56)
    assert torch.isfinite(attn).all() and torch.isfinite(imp).all()
