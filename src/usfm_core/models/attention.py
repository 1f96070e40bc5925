"""Scan-attention maps of SS2D (OpenUS §3.3.1, Eq. 4–5).

A selective scan is a causal linear attention with a data-dependent decay.  Writing
``S_t = Σ_{r≤t} Δ_r`` (per channel ``d``), the contribution of token ``s`` to the output at
token ``t ≥ s`` is, per direction ``k``::

    attn_k[t, s] = mean_d Σ_n C[t, n] · B[s, n] · exp(A[d, n] · (S_t,d − S_s,d))

i.e. ``(Q ⊙ w)(K / w)ᵀ ⊙ M`` with ``Q = C``, ``K = B``, ``w_t = exp(A S_t)`` and the causal mask
``M`` of Eq. 5.  Directions 2–4 are mapped back to row-major token order and summed, the map is
min-max normalised once, and a token's importance is the mean attention it receives (mean over
the rows = queries).

Computing ``w_t`` and ``1 / w_s`` separately under- and overflows on long sequences, and the
naive ``(B·4·D, L, L)`` tensor does not fit in memory for early stages (L = 3136 at 224²).  Here
the queries are processed in blocks of ``block`` tokens.  For keys *before* a query block the
decay is split at the block start ``t0``::

    exp(A (S_t − S_s)) = exp(A (S_t − S_t0)) · exp(A (S_t0 − S_s)),

both factors are ``exp`` of a non-positive number (A < 0, Δ ≥ 0), so nothing overflows, and
the sum over ``(d, n)`` becomes one matrix product.  Within the (small) diagonal block the
exponent is formed explicitly.  Memory stays ``O(L · D · N + block · L)`` per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from usfm_core.models.vmamba import VMamba

__all__ = [
    "direction_orders",
    "minmax_normalise",
    "model_attention",
    "scan_attention_map",
]


def direction_orders(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """Row-major token index visited at each scan position, for the 4 SS2D directions.

    Returns a long tensor ``(4, L)`` with ``L = h·w``: row ``k`` lists, for scan step ``p``, the
    row-major index of the token read at that step.  Order: row-major, column-major, reversed
    row-major, reversed column-major (as VMamba's cross-scan).
    """
    idx = torch.arange(h * w, device=device).view(h, w)
    row = idx.flatten()
    col = idx.t().flatten()
    return torch.stack([row, col, row.flip(0), col.flip(0)])


def minmax_normalise(x: Tensor, dims: tuple[int, ...], eps: float = 1e-12) -> Tensor:
    """Min-max normalise ``x`` to [0, 1] over ``dims`` (per remaining index, e.g. per image)."""
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo).div_((hi - lo).clamp_min(eps))


def _direction_map(
    out: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    include_delta_s: bool,
    block: int,
    scale: float = 1.0,
) -> Tensor:
    """Add the causal scan-attention of one direction, summed over channels, into ``out``.

    Args:
        out: ``(b, L, L)`` accumulator (entries above the diagonal are left untouched).
        delta: ``(b, D, L)`` step sizes after softplus (≥ 0).
        A: ``(D, N)`` negative state matrix.
        B, C: ``(b, N, L)`` input / output projections.
        scale: factor applied to the added map (e.g. ``1 / D_total`` for the channel mean).
    Adds ``scale · Σ_d Σ_n C_t,n B_s,n exp(A_dn Σ_{s<r≤t} Δ_r,d)`` at ``[t, s]`` for
    ``s ≤ t`` (times ``Δ_s,d`` when ``include_delta_s``) and returns ``out``.
    """
    b, d, length = delta.shape
    n = A.shape[1]
    # Cumulative sums in float64: differences of large sums would lose precision in float32.
    cum = delta.double().cumsum(dim=-1)  # S_t: (b, D, L)
    a = A.view(1, d, n, 1)
    C = C * scale
    for t0 in range(0, length, block):
        t1 = min(t0 + block, length)
        # Diagonal block: explicit exponent (t, s both in [t0, t1)), causal-masked.
        seg = cum[:, :, t0:t1]  # (b, D, T)
        # S_t − S_s from the block's own sums S_t − S_t0 (small, so the working dtype keeps
        # them to ~1e-7 relative): (b, D, T, T) in float32 instead of float64 + a cast.
        rel = (seg - seg[:, :, :1]).to(delta.dtype)
        diff = rel.unsqueeze(-1) - rel.unsqueeze(-2)  # (b, D, T, T): S_t − S_s
        causal = torch.ones(t1 - t0, t1 - t0, dtype=torch.bool, device=delta.device).tril()
        # A·(S_t − S_s) ≤ 0 on and below the diagonal; above it (s > t) the exponent would be
        # positive, so it is clamped to 0 (a finite 1) and zeroed by `causal` below. In place on
        # one (b, D, N, T, T) buffer: this block is most of the readout's time on small maps
        # (the last stage's 4×4 tokens in every pretraining step).
        decay = (a.unsqueeze(-1) * diff.unsqueeze(2)).clamp_max_(0.0).exp_()  # (b, D, N, T, T)
        if include_delta_s:
            decay.mul_(delta[:, :, None, None, t0:t1])
        cb = C[:, :, t0:t1, None] * B[:, :, None, t0:t1]  # (b, N, T, T)
        # Σ_d Σ_n decay · C_t B_s = Σ_n C_t B_s Σ_d decay: sum the channels first.
        out[:, t0:t1, t0:t1] += (decay.sum(dim=1) * cb).sum(dim=1) * causal
        if t0 == 0:
            continue
        # Earlier keys: split the decay at t0 so both factors are exp(≤ 0).
        ref = cum[:, :, t0 - 1 : t0]  # S_{t0-1}: the sum over (s, t] = (S_t−S_ref)+(S_ref−S_s)
        q_gap = (seg - ref).to(delta.dtype).unsqueeze(2)
        k_gap = (ref - cum[:, :, :t0]).to(delta.dtype).unsqueeze(2)
        q = C[:, None, :, t0:t1] * torch.exp(a * q_gap)  # (b, D, N, T)
        k = B[:, None, :, :t0] * torch.exp(a * k_gap)  # (b, D, N, t0)
        if include_delta_s:
            k = k * delta[:, :, None, :t0]
        q = q.reshape(b, d * n, t1 - t0)
        k = k.reshape(b, d * n, t0)
        out[:, t0:t1, :t0].baddbmm_(q.transpose(1, 2), k)
    return out


def scan_attention_map(
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    include_delta_s: bool = False,
    directions_hw: tuple[int, int] | None = None,
    block: int = 64,
    channel_chunk: int = 256,
) -> tuple[Tensor, Tensor]:
    """Scan-attention map and per-token importance (OpenUS Eq. 4–5).

    Args:
        delta: ``(B, K, D, L)`` step sizes *after* bias + softplus (K = 4 directions, or 1).
        A: ``(K, D, N)`` or ``(K·D, N)``: the (negative) state matrix ``−exp(A_log)``.
        B, C: ``(B, K, N, L)`` input / output projections of each direction.
        include_delta_s: multiply by ``Δ_s`` (the exact ZOH input weight); OpenUS leaves it out.
        directions_hw: ``(h, w)`` token grid; needed for K = 4 to map each direction back to
            row-major order. With K = 1 the single direction is taken as row-major.
        block: query block size (memory/speed trade-off only; results do not depend on it).
        channel_chunk: channels processed at once (memory only).

    Returns:
        ``attn`` ``(B, L, L)`` in row-major token order, min-max normalised to [0, 1] per image,
        and ``importance`` ``(B, L)`` = mean of ``attn`` over its rows (queries).
    """
    if delta.dim() != 4:
        raise ValueError(f"delta must be (B, K, D, L), got shape {tuple(delta.shape)}")
    bsz, k_dirs, d, length = delta.shape
    A = A.reshape(k_dirs, d, -1)
    n = A.shape[-1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (bsz, k_dirs, n, length):
            raise ValueError(f"{name} must be {(bsz, k_dirs, n, length)}, got {tuple(t.shape)}")
    if k_dirs == 4:
        if directions_hw is None or directions_hw[0] * directions_hw[1] != length:
            raise ValueError(f"directions_hw=(h, w) with h·w = {length} is needed for 4 directions")
    elif k_dirs != 1:
        raise ValueError(f"expected K = 1 or 4 scan directions, got {k_dirs}")

    # float32 at least (the scan runs in fp32 under autocast too); float64 inputs stay float64.
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    delta, A, B, C = (t.to(dtype) for t in (delta, A, B, C))

    def direction(out: Tensor, k: int) -> Tensor:
        """Add direction ``k``'s channel-mean map (in its own scan order) into ``out``."""
        for c0 in range(0, d, channel_chunk):
            c1 = min(c0 + channel_chunk, d)
            dk = (delta[:, k, c0:c1], A[k, c0:c1], B[:, k], C[:, k])
            _direction_map(out, *dk, include_delta_s, block, scale=1.0 / d)
        return out

    # Row-major (k = 0) accumulates in place; its reverse (k = 2) is flipped back (scan position
    # p of a reversed direction is position L − 1 − p of the forward one). The column-major
    # pair (1, 3) is merged the same way, then transposed into row-major tokens.
    total = direction(delta.new_zeros(bsz, length, length), 0)
    if k_dirs == 4:
        h, w = directions_hw
        scratch = direction(delta.new_zeros(bsz, length, length), 2)
        total += scratch.flip(1, 2)
        col = direction(delta.new_zeros(bsz, length, length), 1)
        col += direction(scratch.zero_(), 3).flip(1, 2)
        del scratch
        # column-major scan position x·h + y is row-major token y·w + x
        total.view(bsz, h, w, h, w).add_(col.view(bsz, w, h, w, h).permute(0, 2, 1, 4, 3))
    attn = minmax_normalise(total, dims=(1, 2))
    return attn, attn.mean(dim=1)


@torch.no_grad()
def model_attention(
    model: VMamba, x: Tensor, stage: int = -1, block: int = -1
) -> tuple[Tensor, Tensor]:
    """Scan-attention of one VSS block of ``model`` for images ``x`` ``(B, C, H, W)``.

    Runs one forward pass (no grad) recording the scan parameters of block ``block`` of stage
    ``stage`` (negative = counted from the end). Returns ``attn`` ``(B, L, L)`` and the
    importance ``(B, h, w)`` (min-max normalised per image) on that stage's token grid.
    """
    with model.recording(stage, block) as ss2d:
        model(x)
        rec = ss2d.pop_record()
    attn, imp = scan_attention_map(
        rec["delta"], rec["A"], rec["B"], rec["C"], directions_hw=rec["hw"]
    )
    h, w = rec["hw"]
    return attn, minmax_normalise(imp, dims=(1,)).view(-1, h, w)
