"""Fused selective scan compiled with numba (the ``"numba"`` CPU backend of :mod:`.scan`).

One kernel pass forward and one backward over ``(B, D, L)``, parallel over ``batch × channel``
(forward) and ``batch × group × channel-block`` (backward), with everything of mamba-ssm's
``selective_scan_fn`` inside: ``delta_bias``, softplus, the ``D`` skip and the ``z`` gate.

Design:

* Each ``(b, d)`` row is walked in chunks of :data:`CHUNK` steps.  Per chunk, the
  transcendental work (softplus of Δ, ``exp(Δ·A)``, ``silu(z)``) runs first as plain loops over
  the chunk that LLVM vectorises (own ``exp``/``log1p`` built from FMAs and an exponent
  bit-shift, accurate to ~1 ulp: libm calls cannot be vectorised without SVML); then the
  sequential recurrence ``h = a·h + Δ·u·B`` runs on the state held in locals
  (a scalar for ``N = 1``, a length-``N`` array otherwise).
* The forward stores only the state entering each chunk (``(B, D, ⌈L/CHUNK⌉, N)``: 1/CHUNK of
  the ``L×N`` states); the backward walks the chunks in reverse, recomputes each chunk's states
  from its stored border state (no reverse-decay division, so stable for any ``L`` and
  ``Δ·|A|``), and runs the adjoint recurrence ``q_t = g_t + a_{t+1} q_{t+1}`` in the same pass.
* The elementwise prepasses (softplus, ``exp``, sigmoid) run in the input dtype (float32 or
  float64: 8 or 4 SIMD lanes); the state ``h``, the adjoint ``q``, the border states and every
  sum (over ``N``, over ``L`` for ``∂A``, ``∂D``, ``∂delta_bias``, over channels for ``∂B``,
  ``∂C``) are float64 scalars/locals.  Latency of the sequential recurrence is the same in
  float64, and float32 states lost up to 1e-5 relative in ``∂A`` on long cancelling sums.
  ``fastmath`` is limited to FMA contraction (``{"contract"}``): no reassociation, no
  NaN/inf assumptions.
* ``cache=True`` stores the machine code next to this file, or where numba's own fallback or
  ``NUMBA_CACHE_DIR`` points when the install location is read-only (see
  :func:`_ensure_cache_dir`); the first call in a fresh install compiles (several seconds per
  dtype), later processes load the cache.
* ``nogil=True``: the GUI thread keeps running while a worker thread scans.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def _ensure_cache_dir() -> None:
    """Point numba's on-disk cache to a user cache dir when this package's folder is read-only.

    Numba writes compiled kernels to ``__pycache__`` beside the source; in a read-only install
    (system site-packages, containers) it would fall back to its own user-wide locator, which
    can also fail.  An explicit ``NUMBA_CACHE_DIR`` always wins.  Must run before numba imports.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = Path(__file__).resolve().parent
    pycache = here / "__pycache__"
    if os.access(pycache if pycache.exists() else here, os.W_OK):
        return
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = base / "usfm-core" / "numba"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # numba then compiles in memory each process; still correct
    os.environ["NUMBA_CACHE_DIR"] = str(target)


_ensure_cache_dir()

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.autograd.function import once_differentiable  # noqa: E402

from usfm_core.models._scan_c import backward_parts  # noqa: E402  (no numba/compiler needed)

__all__ = ["CHUNK", "numba_scan", "set_threads_from_torch", "unusable_after_fork"]

#: Steps per chunk: border states stored every CHUNK steps; per-chunk buffers stay in L1.
CHUNK = 128
_FASTMATH = {"contract"}
# error_model="numpy": a float division by zero gives inf/nan instead of a Python exception
# check (which would stop LLVM from vectorising every loop with a division).
_JIT = dict(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
_INLINE = dict(cache=True, fastmath=_FASTMATH, error_model="numpy")
_OVERLOAD = dict(jit_options={"fastmath": _FASTMATH, "error_model": "numpy"})


# --------------------------------------------------------------------------- vectorisable math
@intrinsic
def _times_pow2(typingctx, p, t, shift):  # type: ignore[no-untyped-def]
    """``p · 2^k`` where ``t = k + shift`` was rounded by adding ``shift`` (same float type).

    Adds ``k`` to ``p``'s exponent field with integer ops on the bits (vectorisable, unlike
    ``ldexp``).  Valid while the result stays a normal number (callers clamp the argument).
    """
    if p not in (types.float32, types.float64) or t != p or shift != p:
        return None
    width, mant = (32, 23) if p == types.float32 else (64, 52)

    def codegen(context, builder, signature, args):
        ity = ir.IntType(width)
        pb, tb, sb = (builder.bitcast(a, ity) for a in args)
        k = builder.sub(tb, sb)
        out = builder.add(pb, builder.shl(k, ir.Constant(ity, mant)))
        return builder.bitcast(out, context.get_value_type(signature.return_type))

    return p(p, p, p), codegen


def _vexp(x):  # pragma: no cover - replaced by the overload inside jitted code
    """``exp(x)`` for float32/float64 scalars, vectorisable (see the overload)."""
    raise NotImplementedError


_F32 = np.float32
_E32 = dict(
    lo=_F32(-86.0), hi=_F32(88.0), log2e=_F32(1.4426950408889634), shift=_F32(12582912.0),
    ln2hi=_F32(0.693359375), ln2lo=_F32(-2.12194440e-4),
    c=(_F32(1.0 / 5040), _F32(1.0 / 720), _F32(1.0 / 120), _F32(1.0 / 24), _F32(1.0 / 6),
       _F32(0.5), _F32(1.0), _F32(1.0)),
)  # fmt: skip
_E64_C = tuple(
    1.0 / float(np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(13, -1, -1)
)


@overload(_vexp, **_OVERLOAD)
def _vexp_impl(x):  # type: ignore[no-untyped-def]
    """Cody–Waite reduction ``x = k·ln2 + r`` (|r| ≤ ln2/2), Taylor polynomial of ``exp(r)``
    (degree 7 in float32, 13 in float64: below half an ulp), times ``2^k`` via the exponent.
    Arguments are clamped to [-86, 88] (float32) / [-700, 700] (float64): ``exp(-86)`` is
    4e-38, i.e. 0 for every use here."""
    if x == types.float32:
        lo, hi, log2e, shift = _E32["lo"], _E32["hi"], _E32["log2e"], _E32["shift"]
        ln2hi, ln2lo = _E32["ln2hi"], _E32["ln2lo"]
        c0, c1, c2, c3, c4, c5, c6, c7 = _E32["c"]

        def impl32(x):
            v = min(max(x, lo), hi)
            t = v * log2e + shift
            k = t - shift
            r = (v - k * ln2hi) - k * ln2lo
            p = ((((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5) * r + c6) * r + c7
            return _times_pow2(p, t, shift)

        return impl32
    if x == types.float64:
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13 = _E64_C

        def impl64(x):
            v = min(max(x, -700.0), 700.0)
            t = v * 1.4426950408889634 + 6755399441055744.0
            k = t - 6755399441055744.0
            r = (v - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
            p = ((((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5) * r + c6) * r + c7
            p = (((((p * r + c8) * r + c9) * r + c10) * r + c11) * r + c12) * r + c13
            return _times_pow2(p, t, 6755399441055744.0)

        return impl64
    return None


def _vlog1p_unit(e):  # pragma: no cover - replaced by the overload inside jitted code
    """``log1p(e)`` for ``e`` in [0, 1], vectorisable (see the overload)."""
    raise NotImplementedError


@overload(_vlog1p_unit, **_OVERLOAD)
def _vlog1p_unit_impl(e):  # type: ignore[no-untyped-def]
    """``log(1 + e) = 2·atanh(s)``, ``s = e / (2 + e)`` ≤ 1/3: an odd series in ``s`` that
    converges by ≥ 1/9 per term (8 terms in float32, 17 in float64)."""
    if e == types.float32:
        two = _F32(2.0)
        coef = tuple(_F32(1.0 / (2 * k + 1)) for k in range(7, -1, -1))

        k0, k1, k2, k3, k4, k5, k6, k7 = coef

        def impl32(e):
            s = e / (two + e)
            s2 = s * s
            p = (((((k0 * s2 + k1) * s2 + k2) * s2 + k3) * s2 + k4) * s2 + k5) * s2 + k6
            return two * s * (p * s2 + k7)

        return impl32
    if e == types.float64:
        coef64 = tuple(1.0 / (2 * k + 1) for k in range(16, -1, -1))

        (m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16) = coef64

        def impl64(e):
            s = e / (2.0 + e)
            s2 = s * s
            p = ((((((m0 * s2 + m1) * s2 + m2) * s2 + m3) * s2 + m4) * s2 + m5) * s2 + m6) * s2 + m7
            p = (
                (((((p * s2 + m8) * s2 + m9) * s2 + m10) * s2 + m11) * s2 + m12) * s2 + m13
            ) * s2 + m14
            return 2.0 * s * ((p * s2 + m15) * s2 + m16)

        return impl64
    return None


def _like(x, v):  # pragma: no cover - replaced by the overload inside jitted code
    """The number ``v`` in ``x``'s float type (numba widens float32 op int to float64)."""
    raise NotImplementedError


@overload(_like, **_OVERLOAD)
def _like_impl(x, v):  # type: ignore[no-untyped-def]
    if x == types.float32:
        return lambda x, v: np.float32(v)
    return lambda x, v: np.float64(v)


@njit(**_INLINE)
def _softplus(x):  # type: ignore[no-untyped-def]
    """torch's ``softplus`` (threshold 20): ``x`` above 20, else ``max(x, 0) + log1p(e^{-|x|})``."""
    e = _vexp(-abs(x))
    sp = max(x, _like(x, 0)) + _vlog1p_unit(e)
    return x if x > 20 else sp


@njit(**_INLINE)
def _sigmoid(x):  # type: ignore[no-untyped-def]
    """``1 / (1 + e^{-x})``."""
    one = _like(x, 1)
    return one / (one + _vexp(-x))


# --------------------------------------------------------------------------- per-chunk prepasses
@njit(**_INLINE)
def _prep_delta(delta, u, bias_d, softplus, slope, t0, tl, dtb, dub, sgb):  # type: ignore[no-untyped-def]
    """Chunk ``[t0, t0+tl)`` of one row: ``dtb = Δ`` (after bias/softplus), ``dub = Δ·u`` and,
    if ``slope``, ``sgb = ∂Δ/∂δ`` (sigmoid, or 1); vectorised loops."""
    if softplus and slope:
        for i in range(tl):  # one exp for both: e = exp(-|x|)
            x = delta[t0 + i] + bias_d
            one = _like(x, 1)
            e = _vexp(-abs(x))
            sp = max(x, _like(x, 0)) + _vlog1p_unit(e)
            inv = one / (one + e)
            dtb[i] = x if x > 20 else sp
            sgb[i] = one if x > 20 else (inv if x >= 0 else e * inv)
    elif softplus:
        for i in range(tl):
            dtb[i] = _softplus(delta[t0 + i] + bias_d)
    else:
        for i in range(tl):
            dtb[i] = delta[t0 + i] + bias_d
            sgb[i] = 1
    for i in range(tl):
        dub[i] = dtb[i] * u[t0 + i]


@njit(**_INLINE)
def _prep_decay(a_d, dtb, tl, ab):  # type: ignore[no-untyped-def]
    """``ab[n, i] = exp(Δ_i · A_n)`` for one chunk (vectorised over ``i``)."""
    for j in range(a_d.shape[0]):
        aj = a_d[j]
        for i in range(tl):
            ab[j, i] = _vexp(dtb[i] * aj)


# --------------------------------------------------------------------------- kernels
@njit(**_JIT)
def _forward_kernel(  # type: ignore[no-untyped-def]
    u, delta, A, Bm, Cm, Dv, bias, z, has_z, softplus, y, last, ckpt, store, dts, sgs, hs
):  # fmt: skip
    """Forward over all rows.

    ``u, delta, z, y (B, D, L)``; ``A (D, N)``; ``Bm, Cm (B, G, N, L)``; ``Dv, bias (D,)``;
    outputs ``y``, ``last (B, D, N)`` and ``ckpt (B, D, nc, N)`` (state entering each chunk).
    If ``store`` (``N = 1`` only), also ``dts, sgs (B, D, L)`` (Δ and ∂Δ/∂δ) and the states
    ``hs (B, D, L)`` (rounded to the input dtype: one rounding of a float64 state, half the
    memory traffic of float64) for the backward, which then recomputes nothing.
    """
    bsz, dim, length = u.shape
    n = A.shape[1]
    dg = dim // Bm.shape[1]
    nc = ckpt.shape[2]
    for row in prange(bsz * dim):
        b = row // dim
        d = row - b * dim
        g = d // dg
        dtb = np.empty(CHUNK, dtype=u.dtype)
        dub = np.empty(CHUNK, dtype=u.dtype)
        sgb = np.empty(CHUNK, dtype=u.dtype)
        ab = np.empty((n, CHUNK), dtype=u.dtype)
        yb = np.empty(CHUNK, dtype=np.float64)
        h = np.zeros(n, dtype=np.float64)
        ur, xr, yr = u[b, d], delta[b, d], y[b, d]
        Br, Cr = Bm[b, g], Cm[b, g]
        d_skip = Dv[d]
        for k in range(nc):
            t0 = k * CHUNK
            tl = min(CHUNK, length - t0)
            ckpt[b, d, k, :] = h
            _prep_delta(xr, ur, bias[d], softplus, store, t0, tl, dtb, dub, sgb)
            _prep_decay(A[d], dtb, tl, ab)
            if n == 1:
                h0 = h[0]
                b0, c0, a0 = Br[0], Cr[0], ab[0]
                for i in range(tl):
                    h0 = a0[i] * h0 + dub[i] * b0[t0 + i]
                    yb[i] = h0
                h[0] = h0
                if store:
                    hs[b, d, t0 : t0 + tl] = yb[:tl]
                    dts[b, d, t0 : t0 + tl] = dtb[:tl]
                    sgs[b, d, t0 : t0 + tl] = sgb[:tl]
                for i in range(tl):
                    yb[i] *= c0[t0 + i]
            else:
                for i in range(tl):
                    acc = _like(yb[i], 0)
                    for j in range(n):
                        hj = ab[j, i] * h[j] + dub[i] * Br[j, t0 + i]
                        h[j] = hj
                        acc += Cr[j, t0 + i] * hj
                    yb[i] = acc
            for i in range(tl):
                yb[i] += d_skip * ur[t0 + i]
            if has_z:
                zr = z[b, d]
                for i in range(tl):
                    zi = zr[t0 + i]
                    yb[i] *= zi * _sigmoid(zi)
            yr[t0 : t0 + tl] = yb[:tl]
        last[b, d, :] = h


@njit(**_JIT)
def _backward_kernel(  # type: ignore[no-untyped-def]
    u, delta, A, Bm, Cm, Dv, bias, z, has_z, softplus, ckpt, gy, glast, parts,
    gu, gdelta, gz, gA, gD, gbias, gBp, gCp, store, dts, sgs, hs,
):  # fmt: skip
    """Backward over ``parts`` channel blocks per ``(b, g)`` (one task each).

    Inputs as in :func:`_forward_kernel` plus ``gy (B, D, L)``, ``glast (B, D, N)``.  Outputs:
    ``gu, gdelta, gz (B, D, L)``; float64 partials ``gA (B, D, N)``, ``gD, gbias (B, D)``
    (summed over B by the caller) and ``gBp, gCp (parts, B, G, N, L)`` (summed over parts).
    """
    bsz, dim, length = u.shape
    n = A.shape[1]
    groups = Bm.shape[1]
    dg = dim // groups
    nc = ckpt.shape[2]
    for task in prange(bsz * groups * parts):
        b = task // (groups * parts)
        rem = task - b * groups * parts
        g = rem // parts
        p = rem - g * parts
        c_lo = g * dg + (p * dg) // parts
        c_hi = g * dg + ((p + 1) * dg) // parts
        dtb = np.empty(CHUNK, dtype=u.dtype)
        dub = np.empty(CHUNK, dtype=u.dtype)
        sgb = np.empty(CHUNK, dtype=u.dtype)
        yb = np.empty(CHUNK, dtype=np.float64)
        zs = np.empty(CHUNK, dtype=u.dtype)
        ab = np.empty((n, CHUNK), dtype=u.dtype)
        hb = np.empty((n, CHUNK + 1), dtype=np.float64)
        r = np.empty(n, dtype=np.float64)
        gA_acc = np.empty(n, dtype=np.float64)
        Br, Cr = Bm[b, g], Cm[b, g]
        gBr, gCr = gBp[p, b, g], gCp[p, b, g]
        for d in range(c_lo, c_hi):
            ur, xr, gyr = u[b, d], delta[b, d], gy[b, d]
            a_d = A[d]
            d_skip = Dv[d]
            r[:] = glast[b, d]
            gA_acc[:] = 0.0
            gD_acc = 0.0
            gb_acc = 0.0
            for k in range(nc - 1, -1, -1):
                t0 = k * CHUNK
                tl = min(CHUNK, length - t0)
                if store:  # N = 1 with Δ, ∂Δ/∂δ and the states kept by the forward
                    dtb[:tl] = dts[b, d, t0 : t0 + tl]
                    sgb[:tl] = sgs[b, d, t0 : t0 + tl]
                    for i in range(tl):
                        dub[i] = dtb[i] * ur[t0 + i]
                    _prep_decay(a_d, dtb, tl, ab)
                    hb0 = hb[0]
                    hb0[0] = hs[b, d, t0 - 1] if t0 > 0 else 0.0
                    hb0[1 : tl + 1] = hs[b, d, t0 : t0 + tl]
                    if has_z:
                        c0 = Cr[0]
                        for i in range(tl):
                            yb[i] = c0[t0 + i] * hb0[i + 1] + d_skip * ur[t0 + i]
                else:
                    _prep_delta(xr, ur, bias[d], softplus, True, t0, tl, dtb, dub, sgb)
                    _prep_decay(a_d, dtb, tl, ab)
                    hb[:, 0] = ckpt[b, d, k]
                if store:
                    pass
                elif n == 1:  # recompute the chunk's states (scalar state)
                    h0 = hb[0, 0]
                    a0, hb0, b0, c0 = ab[0], hb[0], Br[0], Cr[0]
                    for i in range(tl):
                        h0 = a0[i] * h0 + dub[i] * b0[t0 + i]
                        hb0[i + 1] = h0
                        yb[i] = c0[t0 + i] * h0 + d_skip * ur[t0 + i]
                else:
                    for i in range(tl):
                        acc = _like(yb[i], 0)
                        for j in range(n):
                            hj = ab[j, i] * hb[j, i] + dub[i] * Br[j, t0 + i]
                            hb[j, i + 1] = hj
                            acc += Cr[j, t0 + i] * hj
                        yb[i] = acc + d_skip * ur[t0 + i]
                if has_z:  # gate: yb becomes ∂ℓ/∂y_pre, gz written
                    zr, gzr = z[b, d], gz[b, d]
                    for i in range(tl):
                        zs[i] = _sigmoid(zr[t0 + i])
                    for i in range(tl):
                        zi, si, go = zr[t0 + i], zs[i], gyr[t0 + i]
                        one = _like(si, 1)
                        gzr[t0 + i] = go * yb[i] * (si * (one + zi * (one - si)))
                        yb[i] = go * zi * si
                else:
                    yb[:tl] = gyr[t0 : t0 + tl]
                if n == 1:  # scalar adjoint state: no store-to-load chain through memory
                    r0 = r[0]
                    gA0 = gA_acc[0]
                    a0, h0, b0, c0 = ab[0], hb[0], Br[0], Cr[0]
                    gB0, gC0, A0 = gBr[0], gCr[0], a_d[0]
                    for i in range(tl - 1, -1, -1):
                        t = t0 + i
                        gyp = yb[i]
                        q = r0 + gyp * c0[t]
                        r0 = a0[i] * q
                        gC0[t] += gyp * h0[i + 1]
                        gB0[t] += q * dub[i]
                        su = q * b0[t]
                        gla = q * a0[i] * h0[i]
                        gA0 += gla * dtb[i]
                        gu[b, d, t] = gyp * d_skip + su * dtb[i]
                        graw = (gla * A0 + su * ur[t]) * sgb[i]
                        gdelta[b, d, t] = graw
                        gb_acc += graw
                        gD_acc += gyp * ur[t]
                    r[0] = r0
                    gA_acc[0] = gA0
                    continue
                for i in range(tl - 1, -1, -1):  # adjoint, in reverse
                    t = t0 + i
                    gyp = yb[i]
                    gD_acc += gyp * ur[t]
                    su = _like(gyp, 0)
                    gdt = _like(gyp, 0)
                    dt_i = dtb[i]
                    for j in range(n):
                        q = r[j] + gyp * Cr[j, t]
                        gCr[j, t] += gyp * hb[j, i + 1]
                        gBr[j, t] += q * dub[i]
                        su += q * Br[j, t]
                        gla = q * ab[j, i] * hb[j, i]
                        gA_acc[j] += gla * dt_i
                        gdt += gla * a_d[j]
                        r[j] = ab[j, i] * q
                    gu[b, d, t] = gyp * d_skip + su * dt_i
                    graw = (gdt + su * ur[t]) * sgb[i]
                    gdelta[b, d, t] = graw
                    gb_acc += graw
            gA[b, d, :] = gA_acc
            gD[b, d] = gD_acc
            gbias[b, d] = gb_acc


# --------------------------------------------------------------------------- fork safety
_state = {"launched": False, "forked_after_launch": False}


def _after_fork_in_child() -> None:
    """GNU OpenMP is not fork-safe: once numba's pool ran, a forked child that launches a
    parallel kernel is terminated ("fork() called from a process already using GNU OpenMP")."""
    if _state["launched"]:
        _state["forked_after_launch"] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def unusable_after_fork() -> bool:
    """True in a process forked (not spawned) after its parent ran this kernel: the ``auto``
    backend then falls back to ``torch`` there (e.g. fork-based DataLoader workers)."""
    return _state["forked_after_launch"]


# --------------------------------------------------------------------------- torch glue
def set_threads_from_torch() -> int:
    """Use as many numba threads as torch uses (capped by numba's pool); returns the count."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


@contextlib.contextmanager
def _torch_threads_kept() -> Iterator[int]:
    """Run a kernel with torch's thread count, and give torch that count back afterwards.

    numba's OpenMP layer and torch can share one libgomp; starting numba's pool sets the
    OpenMP default to numba's pool size, which silently raised torch from 1 to all threads
    (and made every later torch op on a busy machine many times slower).
    """
    if _state["forked_after_launch"]:
        raise RuntimeError(
            "the numba scan cannot run in a process forked after its parent used it (GNU "
            "OpenMP is not fork-safe); use backend='torch' here, or the 'spawn' start method"
        )
    _state["launched"] = True
    before = torch.get_num_threads()
    try:
        yield set_threads_from_torch()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _np(t: Tensor) -> np.ndarray:
    """Contiguous numpy view of a CPU tensor (no copy when already contiguous)."""
    return t.detach().contiguous().numpy()


class _NumbaScan(torch.autograd.Function):
    """``(u, delta, A, B, C, D, z, delta_bias) -> (y, last)``; B, C 4-D; flags: softplus, and
    whether a backward will follow (then ``N = 1`` keeps Δ, its slope and the states)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, softplus, grad):  # type: ignore[override]
        bsz, dim, length = u.shape
        n = A.shape[1]
        nc = -(-length // CHUNK)
        Dv = D if D is not None else u.new_zeros(dim)
        bv = bias if bias is not None else u.new_zeros(dim)
        zv = z if z is not None else u
        y = u.new_empty(bsz, dim, length)
        last = u.new_empty(bsz, dim, n)
        ckpt = u.new_empty(bsz, dim, nc, n, dtype=torch.float64)
        # N = 1: keeping Δ, its slope and h (3 numbers per element) is cheaper than recomputing
        # them (softplus, sigmoid, exp and the sequential recurrence) in the backward.
        store = n == 1 and bool(grad)
        shape = (bsz, dim, length) if store else (1, 1, 1)
        dts, sgs = u.new_empty(shape), u.new_empty(shape)
        hs = u.new_empty(shape)
        with _torch_threads_kept():
            _forward_kernel(
                _np(u), _np(delta), _np(A), _np(B), _np(C), _np(Dv), _np(bv), _np(zv),
                z is not None, bool(softplus), y.numpy(), last.numpy(), ckpt.numpy(),
                store, dts.numpy(), sgs.numpy(), hs.numpy(),
            )  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, delta, A, B, C, Dv, bv, zv, ckpt, dts, sgs, hs)
        ctx.store = store
        ctx.flags = (D is not None, z is not None, bias is not None, bool(softplus))
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_last):  # type: ignore[override]
        u, delta, A, B, C, Dv, bv, zv, ckpt, dts, sgs, hs = ctx.saved_tensors
        has_d, has_z, has_bias, softplus = ctx.flags
        bsz, dim, _ = u.shape
        groups = B.shape[1]
        n = A.shape[1]
        gy = grad_y if grad_y is not None else u.new_zeros(u.shape)
        gl = grad_last if grad_last is not None else u.new_zeros(bsz, dim, n)
        threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        parts = backward_parts(bsz, groups, dim // groups, threads)
        gu, gdelta = torch.empty_like(u), torch.empty_like(u)
        gz = torch.empty_like(u) if has_z else u.new_empty(1, 1, 1)
        f64 = dict(dtype=torch.float64)
        gA = torch.empty(bsz, dim, n, **f64)
        gD = torch.empty(bsz, dim, **f64)
        gbias = torch.empty(bsz, dim, **f64)
        gBp = torch.zeros(parts, *B.shape, **f64)
        gCp = torch.zeros(parts, *C.shape, **f64)
        with _torch_threads_kept():
            _backward_kernel(
                _np(u), _np(delta), _np(A), _np(B), _np(C), _np(Dv), _np(bv), _np(zv), has_z,
                softplus, _np(ckpt), _np(gy), _np(gl), parts,
                gu.numpy(), gdelta.numpy(), gz.numpy(), gA.numpy(), gD.numpy(), gbias.numpy(),
                gBp.numpy(), gCp.numpy(), ctx.store, _np(dts), _np(sgs), _np(hs),
            )  # fmt: skip
        dtype = u.dtype
        return (
            gu,
            gdelta,
            gA.sum(0).to(dtype),
            gBp.sum(0).to(dtype),
            gCp.sum(0).to(dtype),
            gD.sum(0).to(dtype) if has_d else None,
            gz if has_z else None,
            gbias.sum(0).to(dtype) if has_bias else None,
            None,
            None,
        )


def numba_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused selective scan on CPU tensors of one float dtype (float32 or float64).

    ``u, delta, z (B, D, L)``, ``A (D, N)``, ``B, C (B, N, L) | (B, G, N, L)``,
    ``D, delta_bias (D,)`` -> ``y (B, D, L)`` (with ``D`` skip and ``z`` gate applied) and, if
    asked, the last state ``(B, D, N)``.  Shapes are checked by the caller.
    """
    B4 = B.unsqueeze(1) if B.dim() == 3 else B
    C4 = C.unsqueeze(1) if C.dim() == 3 else C
    inputs = (u, delta, A, B4, C4, D, z, delta_bias)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, last = _NumbaScan.apply(*inputs, delta_softplus, grad)
    return (y, last) if return_last_state else y
