"""Chunked, blocked selective scan in plain PyTorch (the ``"torch"`` backend of :mod:`.scan`).

Why not the obvious code: a Python loop over ``L`` costs ``L`` tiny kernel launches per op (and
autograd as many again), while fully vectorised forms build ``(B, D, N, L)`` tensors whose
memory traffic, and on this machine whose *page faults* on fresh allocations, dominate.

The scan here:

* **Chunks** the sequence into ``nc`` chunks of ``T ≈ √L`` steps, laid out ``(T, …, nc)`` with
  position ``l = k·T + t``.  A loop over the ``T`` in-chunk steps advances all chunks at once
  (one ``addcmul`` on a contiguous slice per step); a loop over the ``nc`` chunks carries the
  state across borders using each chunk's total decay ``exp(Σ_chunk Δ·A)`` (an exponent ``≤ 0``
  summed inside the chunk only: no overflow whatever ``L`` and ``Δ·|A|``); a second in-chunk
  pass, started from the carried state, writes ``h``.  That is ``≈ 3√L`` launches, not ``L``.
* **Blocks** the ``(batch, channel)`` axes so that each block's ``(T, …, N, nc)`` temporaries
  hold about :data:`BLOCK_ELEMENTS` numbers: they stay in cache and are recycled by the
  allocator instead of being faulted in fresh.
* Has a hand-written backward (:class:`_ChunkedScan`): the adjoint ``q_t = ∂ℓ/∂h_t`` obeys the
  same recurrence run in reverse, ``q_t = g_t + a_{t+1} q_{t+1}``.  Like mamba-ssm, the forward
  keeps only the small chunk-border states; ``h`` is recomputed block by block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["BLOCK_ELEMENTS", "chunk_size", "chunked_scan_core"]

#: Target size (elements) of one ``(T, b, g, d, N, nc)`` temporary of a block (4 MiB in fp32).
BLOCK_ELEMENTS = 1 << 20


def chunk_size(length: int) -> int:
    """Steps per chunk: ``⌈√L⌉`` balances the in-chunk and across-chunk loops."""
    return max(1, math.isqrt(max(length - 1, 0)) + 1)


# --------------------------------------------------------------------------- layout helpers
def _to_chunks(t: Tensor, steps: int, nc: int) -> Tensor:
    """``(..., L)`` -> contiguous zero-padded ``(T, ..., nc)`` with ``l = k·T + t``.

    Written as one 2-D transpose ``(R·nc, T) -> (T, R·nc)``, which PyTorch copies with a
    cache-blocked kernel (a general permute-copy is several times slower here).
    """
    lead = t.shape[:-1]
    pad = steps * nc - t.shape[-1]
    if pad:
        t = F.pad(t, (0, pad))
    flat = t.contiguous().view(-1, steps)
    return flat.t().contiguous().view(steps, *lead, nc)


def _from_chunks(t: Tensor, length: int) -> Tensor:
    """Inverse of :func:`_to_chunks`: ``(T, ..., nc)`` -> ``(..., L)`` (also a 2-D transpose)."""
    steps, *lead, nc = t.shape
    flat = t.contiguous().view(steps, -1)
    return flat.t().contiguous().view(*lead, nc * steps)[..., :length]


def _sum_state(t: Tensor) -> Tensor:
    """Sum over the state axis (``-2`` of ``(T, b, g, d, N, nc)``), keeping it as size 1."""
    return t if t.shape[-2] == 1 else t.sum(-2, keepdim=True)


# --------------------------------------------------------------------------- scan kernels
def _border_states(a: Tensor, x: Tensor, total: Tensor, h0: Tensor | None) -> Tensor:
    """State entering each chunk, ``(M, nc)``, for ``h_t = a_t h_{t-1} + x_t`` on ``(T, M, nc)``.

    ``total (M, nc)`` is each chunk's whole decay ``Π_t a_t``; ``h0 (M,)`` an optional start.
    """
    steps, m, nc = x.shape
    carry = torch.zeros(nc, m, dtype=x.dtype, device=x.device)
    if h0 is not None:
        carry[0] = h0
    if nc > 1:
        end = torch.zeros(m, nc, dtype=x.dtype, device=x.device)
        for t in range(steps):  # every chunk from a zero state: its local end state
            torch.addcmul(x[t], a[t], end, out=end)
        ends = end.t().contiguous()
        total = total.t().contiguous()  # (nc, M) whole-chunk decay
        for k in range(1, nc):
            torch.addcmul(ends[k - 1], total[k - 1], carry[k - 1], out=carry[k])
    return carry.t().contiguous()


def _scan_from(a: Tensor, x: Tensor, start: Tensor) -> Tensor:
    """``h (T, M, nc)`` of ``h_t = a_t h_{t-1} + x_t``; chunk k is entered with ``start[:, k]``."""
    h = torch.empty_like(x)
    torch.addcmul(x[0], a[0], start, out=h[0])
    for t in range(1, x.shape[0]):
        torch.addcmul(x[t], a[t], h[t - 1], out=h[t])
    return h


def _reverse_scan(a: Tensor, g: Tensor, total: Tensor) -> Tensor:
    """Adjoint ``q_t = g_t + a_{t+1} q_{t+1}`` (``q_{L-1} = g_{L-1}``) on ``(T, M, nc)``.

    ``total (M, nc)`` is each chunk's whole decay, as in :func:`_border_states`.
    """
    steps, m, nc = g.shape
    carry = torch.zeros(m, nc, dtype=g.dtype, device=g.device)  # added at each chunk's end
    if nc > 1:
        r = g[-1].clone()  # local q at the chunk start, from a zero carry
        for t in range(steps - 2, -1, -1):
            torch.addcmul(g[t], a[t + 1], r, out=r)
        w = (a[0] * r).t().contiguous()  # (nc, M): what chunk k+1 hands to chunk k ...
        total = total.t().contiguous()  # ... plus total decay × its own carry
        back = torch.zeros(nc, m, dtype=g.dtype, device=g.device)
        for k in range(nc - 2, -1, -1):
            torch.addcmul(w[k + 1], total[k + 1], back[k + 1], out=back[k])
        carry = back.t().contiguous()
    q = torch.empty_like(g)
    torch.add(g[-1], carry, out=q[-1])
    for t in range(steps - 2, -1, -1):
        torch.addcmul(g[t], a[t + 1], q[t + 1], out=q[t])
    return q


# --------------------------------------------------------------------------- blocks
def _plan_blocks(
    bsz: int, groups: int, dg: int, unit: int, budget: int
) -> list[tuple[slice, slice, slice]]:
    """Split ``(batch, group, channel-in-group)`` into blocks of about ``budget`` elements.

    ``unit = N·L_padded`` elements per (batch, channel).  Blocks take whole images when one
    fits, else whole groups, else channel ranges inside one group.
    """
    full = slice(None)
    per_image = groups * dg * unit
    if per_image <= budget:
        bb = max(1, budget // per_image)
        return [(slice(b, b + bb), full, full) for b in range(0, bsz, bb)]
    if dg * unit <= budget:
        gb = max(1, budget // (dg * unit))
        return [
            (slice(b, b + 1), slice(g, g + gb), full)
            for b in range(bsz)
            for g in range(0, groups, gb)
        ]
    db = max(1, budget // unit)
    return [
        (slice(b, b + 1), slice(g, g + 1), slice(d, d + db))
        for b in range(bsz)
        for g in range(groups)
        for d in range(0, dg, db)
    ]


class _Block:
    """One block's inputs in chunk layout: delta/u ``(T, b, g, d, 1, nc)``, B/C ``(T, b, g, 1,
    N, nc)``, A ``(g, d, N, 1)``; derived: ``a = exp(Δ·A)`` and ``x = Δ·u·B`` as ``(T, M, nc)``
    and each chunk's total decay ``exp(A·Σ_chunk Δ)`` as ``(M, nc)`` (from the small Δ)."""

    def __init__(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, steps: int):
        length = u.shape[-1]
        nc = -(-length // steps)
        self.u = _to_chunks(u.unsqueeze(-2), steps, nc)
        self.delta = _to_chunks(delta.unsqueeze(-2), steps, nc)
        self.B = _to_chunks(B.unsqueeze(2), steps, nc)
        self.C = _to_chunks(C.unsqueeze(2), steps, nc)
        self.A = A.unsqueeze(-1)
        self.du = self.delta * self.u
        self.full_shape = (steps, *u.shape[:3], A.shape[-1], nc)
        flat = (steps, -1, nc)
        self.a = (self.delta * self.A).exp_().contiguous().view(flat)
        self.total = (self.delta.sum(0) * self.A).exp_().view(-1, nc)
        self.x = (self.du * self.B).contiguous().view(flat)

    def full(self, t: Tensor) -> Tensor:
        """``(T, M, nc)`` -> ``(T, b, g, d, N, nc)``."""
        return t.view(self.full_shape)


class _ChunkedScan(torch.autograd.Function):
    """Blocked chunked scan ``(u, delta, A, B, C) -> (y, last_state)``; delta already final.

    Shapes: ``u, delta (B, G, D/G, L)``, ``A (G, D/G, N)``, ``B, C (B, G, N, L)`` ->
    ``y (B, G, D/G, L)``, ``last (B, G, D/G, N)``.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):  # type: ignore[override]
        bsz, groups, dg, length = u.shape
        n = A.shape[-1]
        steps = chunk_size(length)
        nc = -(-length // steps)
        blocks = _plan_blocks(bsz, groups, dg, n * steps * nc, BLOCK_ELEMENTS)
        y = u.new_empty(u.shape)
        last = u.new_empty(bsz, groups, dg, n)
        starts = []
        for bs, gs, ds in blocks:
            blk = _Block(u[bs, gs, ds], delta[bs, gs, ds], A[gs, ds], B[bs, gs], C[bs, gs], steps)
            start = _border_states(blk.a, blk.x, blk.total, None)
            h = blk.full(_scan_from(blk.a, blk.x, start))
            y[bs, gs, ds] = _from_chunks(_sum_state(h * blk.C).squeeze(-2), length)
            last[bs, gs, ds] = h[-1, ..., -1]  # padding has a = 1, x = 0: h stays put
            starts.append(start)
        ctx.set_materialize_grads(False)  # an unused output (often `last`) gets None, not zeros
        ctx.save_for_backward(u, delta, A, B, C, *starts)
        ctx.blocks = blocks
        ctx.steps = steps
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_last):  # type: ignore[override]
        u, delta, A, B, C, *starts = ctx.saved_tensors
        length = u.shape[-1]
        grads = [torch.zeros_like(t) for t in (u, delta, A, B, C)]
        gu, gdelta, gA, gB, gC = grads
        for (bs, gs, ds), start in zip(ctx.blocks, starts, strict=True):
            blk = _Block(
                u[bs, gs, ds], delta[bs, gs, ds], A[gs, ds], B[bs, gs], C[bs, gs], ctx.steps
            )
            h = blk.full(_scan_from(blk.a, blk.x, start))
            gh = torch.zeros(blk.full_shape, dtype=u.dtype, device=u.device)
            if grad_y is not None:
                gy = _to_chunks(grad_y[bs, gs, ds].unsqueeze(-2), ctx.steps, blk.full_shape[-1])
                gh.addcmul_(gy, blk.C)
                gC[bs, gs] += _from_chunks((gy * h).sum(3), length)
            if grad_last is not None:
                gh[-1, ..., -1] += grad_last[bs, gs, ds]
            flat = gh.view(blk.a.shape)
            q = blk.full(_reverse_scan(blk.a, flat, blk.total))
            # ∂ℓ/∂log a_t = q_t · a_t h_{t-1}  and  a_t h_{t-1} = h_t − x_t (no shifted copy).
            g_log_a = h.sub_(blk.full(blk.x)).mul_(q)
            g_du = _sum_state(q * blk.B)
            gB[bs, gs] += _from_chunks((q * blk.du).sum(3), length)
            gA[gs, ds] += (g_log_a * blk.delta).sum((0, 1, -1))
            g_delta = _sum_state(g_log_a * blk.A).add_(g_du * blk.u)
            gdelta[bs, gs, ds] = _from_chunks(g_delta.squeeze(-2), length)
            gu[bs, gs, ds] = _from_chunks((g_du * blk.delta).squeeze(-2), length)
        return gu, gdelta, gA, gB, gC


def chunked_scan_core(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked selective scan without the ``D``/``z`` terms; ``delta`` already final.

    ``u, delta (B, D, L)``, ``A (D, N)``, ``B, C (B, N, L) | (B, G, N, L)`` ->
    ``y (B, D, L)`` and, if asked, the last state ``(B, D, N)``.
    """
    bsz, dim, length = u.shape
    n = A.shape[1]
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    groups = B.shape[1]
    grouped = (bsz, groups, dim // groups, length)
    y, last = _ChunkedScan.apply(
        u.reshape(grouped),
        delta.reshape(grouped),
        A.reshape(groups, dim // groups, n),
        B.contiguous(),
        C.contiguous(),
    )
    y = y.reshape(bsz, dim, length)
    return (y, last.reshape(bsz, dim, n)) if return_last_state else y
