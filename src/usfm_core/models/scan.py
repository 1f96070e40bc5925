"""Selective scan (Mamba S6) with interchangeable backends.

The recurrence, per batch ``b``, channel ``d`` and state ``n`` (Mamba, Gu & Dao 2023)::

    Δ_t = softplus(δ_t + bias_d)        (if delta_softplus, else δ_t + bias_d)
    h_t = exp(Δ_t A_dn) h_{t-1} + Δ_t B_tn u_t
    y_t = Σ_n C_tn h_tn + D_d u_t ;     y_t *= silu(z_t)   (if z is given)

Shapes follow mamba-ssm's ``selective_scan_fn``: ``u, delta, z`` are ``(B, D, L)``, ``A`` is
``(D, N)`` (real, negative), ``B, C`` are ``(B, N, L)`` or grouped ``(B, G, N, L)`` where group
``g`` serves channels ``g·D/G … (g+1)·D/G − 1``, ``D`` and ``delta_bias`` are ``(D,)``.

Backends:

* ``"reference"``: a plain loop over ``L`` (the test oracle).
* ``"torch"``: a chunked scan for any device (see :mod:`usfm_core.models._scan_chunked`);
  a few ``2·√L`` small kernel launches instead of ``L``, with a hand-written backward.  The
  fallback when numba is missing, and the second reference.
* ``"numba"``: a fused CPU kernel compiled with numba (:mod:`usfm_core.models._scan_numba`):
  one pass forward, one backward, parallel over batch × channels, softplus / delta bias /
  ``D`` skip / ``z`` gate inside.  The first call in a fresh install compiles it (tens of
  seconds per dtype on a busy 2-core machine); the machine code is cached on disk, so later
  processes start in a few seconds.
* ``"c"``: a fused kernel in plain C for one state and no gate (``N = 1``, ``z`` absent: every
  model of this toolkit), compiled on first use with the machine's C compiler and cached
  (:mod:`usfm_core.models._scan_c`); 1.4-2.2× the numba kernel's speed because everything but
  the two one-FMA recurrences is vectorised along time.  For VMamba's 2-D scan
  (:func:`cross_selective_scan`) it also fuses the four directions with cross-scan and
  cross-merge, so the ``(B, 4, D, L)`` permuted copies are never made.  Calls it does not
  handle (``N > 1``, a ``z`` gate) go to ``numba`` (else ``torch``).
* ``"cuda"``: mamba-ssm's fused kernel, only for CUDA tensors when ``mamba_ssm`` imports.

``"auto"`` picks ``cuda`` for CUDA tensors when mamba_ssm imports; for CPU tensors ``c`` when
the call has ``N = 1`` and no gate and the kernel compiled, else ``numba`` when numba imports,
else ``torch``.  The choice can be forced per call (``backend=``),
process-wide (:func:`set_default_backend`) or by the environment variable
``USFM_SCAN_BACKEND``.  The scan always runs in float32 (float64 inputs stay float64): inputs
are cast up, autocast is switched off inside, and the output is cast back to ``u``'s dtype.
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from usfm_core.models._scan_chunked import chunked_scan_core

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_report",
    "cross_merge",
    "cross_scan",
    "cross_selective_scan",
    "get_default_backend",
    "resolve_backend",
    "selective_scan",
    "selective_scan_reference",
    "set_default_backend",
    "to_direction_order",
    "tune_cpu_allocator",
]

BACKENDS = ("reference", "torch", "numba", "c", "cuda")
# With the "c" backend, cross_selective_scan runs VMamba's four directions, cross-scan and
# cross-merge in one kernel; False sends it through cross_scan / selective_scan / cross_merge
# (benchmarks/backbone.py's "c-unfused" column; the results are the same within float32).
FUSE_CROSS_SCAN = True
ENV_VAR = "USFM_SCAN_BACKEND"
_default_backend: str | None = None


# --------------------------------------------------------------------------- backend choice
@lru_cache(maxsize=1)
def _mamba_ssm_status() -> tuple[bool, str]:
    """Whether ``mamba_ssm``'s CUDA selective scan imports, and why not if it does not."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA extension (OSError, ...)
        return False, f"mamba_ssm does not import ({type(exc).__name__}: {exc})"
    return True, "mamba_ssm imports"


@lru_cache(maxsize=1)
def _numba_status() -> tuple[bool, str]:
    """Whether the numba CPU kernel imports (numba installed and working), and why not."""
    try:
        import numba

        from usfm_core.models import _scan_numba  # noqa: F401
    except Exception as exc:  # ImportError, or numba/llvmlite broken for this numpy
        return False, f"numba backend unavailable ({type(exc).__name__}: {exc})"
    return True, f"numba {numba.__version__} imports"


def _c_status() -> tuple[bool, str]:
    """Whether the compiled C kernel (``N = 1``) is usable, and why not / how it was built."""
    from usfm_core.models import _scan_c

    return _scan_c.status()


def _numba_usable() -> tuple[bool, str]:
    """:func:`_numba_status`, and not in a child forked after the parent ran the kernel."""
    ok, why = _numba_status()
    if ok:
        from usfm_core.models import _scan_numba

        if _scan_numba.unusable_after_fork():
            return False, (
                "this process was forked after its parent ran the numba kernel (GNU OpenMP is "
                "not fork-safe); the torch backend is used here"
            )
    return ok, why


def set_default_backend(name: str | None) -> None:
    """Set the process-wide backend used when ``backend="auto"`` (``None`` resets to auto)."""
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"unknown scan backend {name!r}; choose one of auto, {', '.join(BACKENDS)}"
        )
    global _default_backend
    _default_backend = None if name == "auto" else name


def get_default_backend() -> str:
    """The backend ``"auto"`` resolves through: set_default_backend > $USFM_SCAN_BACKEND > auto."""
    if _default_backend is not None:
        return _default_backend
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(
                f"environment variable {ENV_VAR}={env!r} is not a scan backend; "
                f"use one of auto, {', '.join(BACKENDS)} (or unset it)"
            )
        return env
    return "auto"


def available_backends() -> list[str]:
    """Backends usable in this process (``numba`` needs numba; ``cuda`` needs mamba_ssm and a
    CUDA device)."""
    names = ["reference", "torch"]
    if _numba_usable()[0]:
        names.append("numba")
    if _c_status()[0]:
        names.append("c")
    if _mamba_ssm_status()[0] and torch.cuda.is_available():
        names.append("cuda")
    return names


def resolve_backend(
    backend: str, device: torch.device | str, n_state: int = 1, gated: bool = False
) -> str:
    """Concrete backend for tensors on ``device`` and a call with ``n_state`` states (and a
    ``z`` gate if ``gated``); ``auto`` never picks ``cuda`` for CPU tensors or a CPU kernel for
    CUDA tensors.  ``c`` on a call it does not handle (``N > 1`` or gated) gives ``numba``
    (else ``torch``)."""
    name = get_default_backend() if backend == "auto" else backend
    if name not in ("auto", *BACKENDS):
        raise ValueError(
            f"unknown scan backend {name!r}; choose one of auto, {', '.join(BACKENDS)}"
        )
    on_cuda = torch.device(device).type == "cuda"
    c_fits = n_state == 1 and not gated
    if name == "auto":
        if on_cuda:
            return "cuda" if _mamba_ssm_status()[0] else "torch"
        if c_fits and _c_status()[0]:
            return "c"
        return "numba" if _numba_usable()[0] else "torch"
    if name == "c":
        if on_cuda:
            raise ValueError("scan backend 'c' needs CPU tensors; use 'cuda' or 'torch'")
        ok, why = _c_status()
        if not ok:
            raise ValueError(f"scan backend 'c' unavailable: {why}")
        if not c_fits:  # the C kernel has one state and no gate
            return "numba" if _numba_usable()[0] else "torch"
    if name == "numba":
        if on_cuda:
            raise ValueError("scan backend 'numba' needs CPU tensors; use 'cuda' or 'torch'")
        ok, why = _numba_usable()
        if not ok:
            raise ValueError(f"scan backend 'numba' unavailable: {why}; pip install numba")
    if name == "cuda":
        if not on_cuda:
            raise ValueError("scan backend 'cuda' needs CUDA tensors; use 'torch' for CPU tensors")
        ok, why = _mamba_ssm_status()
        if not ok:
            raise ValueError(f"scan backend 'cuda' unavailable: {why}; pip install mamba-ssm")
    return name


def backend_report() -> dict[str, Any]:
    """What ``auto`` would pick on CPU and on CUDA, and why (for ``usfm-core info``)."""
    numba_ok, numba_why = _numba_usable()
    c_ok, c_why = _c_status()
    ok, why = _mamba_ssm_status()
    cuda_ok = torch.cuda.is_available()
    if ok and cuda_ok:
        cuda_pick, reason = "cuda", "mamba_ssm imports and a CUDA device is present"
    elif not cuda_ok:
        cuda_pick, reason = "torch", "no CUDA device visible to torch"
    else:
        cuda_pick, reason = "torch", why
    return {
        "default": get_default_backend(),
        "env": os.environ.get(ENV_VAR),
        "available": available_backends(),
        "auto_cpu": "c" if c_ok else ("numba" if numba_ok else "torch"),
        "cpu_reason": (f"C kernel {c_why} (N = 1; numba for N > 1: {numba_why})" if c_ok
                       else f"{c_why}; {numba_why}"),
        "auto_cuda": cuda_pick,
        "cuda_available": cuda_ok,
        "mamba_ssm": ok,
        "reason": reason if cuda_pick != "cuda" else why,
    }


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc recycle freed large blocks instead of unmapping them (Linux only).

    By default glibc serves each allocation above a (dynamic) threshold with a fresh ``mmap``
    and returns it on free, so every big temporary is page-faulted in again; on virtualised
    machines that costs ~1 ms per 4 MB and dominated the CPU scan (and the loop's backward)
    here.  This keeps up to ``trim_threshold`` bytes of freed memory for reuse, like jemalloc
    or tcmalloc would.  Process-wide and opt-in: call it once at start-up (CLI, training).
    Returns whether both settings were accepted.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    ok_mmap = libc.mallopt(m_mmap_threshold, int(mmap_threshold)) == 1
    ok_trim = libc.mallopt(m_trim_threshold, int(trim_threshold)) == 1
    return ok_mmap and ok_trim


# --------------------------------------------------------------------------- validation
def _check_shapes(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the offending argument when shapes do not fit together."""
    if u.dim() != 3:
        raise ValueError(f"u must be (B, D, L), got shape {tuple(u.shape)}")
    bsz, dim, length = u.shape
    if tuple(delta.shape) != (bsz, dim, length):
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) = ({dim}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported; pass a real, negative A")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            ok = tuple(t.shape) == (bsz, n, length)
        elif t.dim() == 4:
            ok = t.shape[0] == bsz and t.shape[2:] == (n, length) and t.shape[1] >= 1
            if ok and dim % t.shape[1] != 0:
                raise ValueError(f"{name} has G={t.shape[1]} groups, which must divide D={dim}")
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must be (B, N, L) = ({bsz}, {n}, {length}) or (B, G, N, L), "
                f"got {tuple(t.shape)}"
            )
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same groups, got {B.shape[1]} and {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must be ({dim},), got {tuple(t.shape)}")
    if z is not None and tuple(z.shape) != (bsz, dim, length):
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def _grouped(t: Tensor, dim: int) -> Tensor:
    """``(B, N, L)`` or ``(B, G, N, L)`` -> ``(B, D, N, L)`` (a broadcast view, no copy)."""
    if t.dim() == 3:
        return t.unsqueeze(1).expand(-1, dim, -1, -1)
    g = t.shape[1]
    return t.unsqueeze(2).expand(-1, -1, dim // g, -1, -1).reshape(t.shape[0], dim, *t.shape[2:])


# --------------------------------------------------------------------------- reference
def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Plain sequential scan over ``L`` (readable oracle); ``delta`` already final (post-softplus).

    ``u, delta (B, D, L)``, ``A (D, N)``, ``B, C (B, N, L) | (B, G, N, L)`` -> ``y (B, D, L)``
    without the ``D``/``z`` terms, and the last state ``(B, D, N)`` if asked.  Uses ``unbind``
    so that autograd's backward stays linear in ``L``.
    """
    dim = u.shape[1]
    Bx = _grouped(B, dim)
    Cx = _grouped(C, dim)
    decay = torch.exp(delta.unsqueeze(2) * A.unsqueeze(-1))  # (B, D, N, L)
    drive = (delta * u).unsqueeze(2) * Bx  # (B, D, N, L)
    h = u.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for a_t, x_t, c_t in zip(decay.unbind(-1), drive.unbind(-1), Cx.unbind(-1), strict=True):
        h = a_t * h + x_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    return (y, h) if return_last_state else y


# --------------------------------------------------------------------------- backends
def _scan_cuda(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, return_last_state: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's fused CUDA kernel (delta already final; D, z applied by the caller)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(
        u.contiguous(),
        delta.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        return_last_state=return_last_state,
    )


def selective_scan(
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
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` signature and semantics.

    Args:
        u: input ``(B, D, L)``.
        delta: step sizes before bias/softplus ``(B, D, L)``.
        A: state matrix ``(D, N)``, real and negative.
        B, C: input/output projections ``(B, N, L)`` or ``(B, G, N, L)``.
        D: skip weights ``(D,)``; z: gate ``(B, D, L)``; delta_bias: ``(D,)``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final state ``(B, D, N)``.
        backend: ``"auto" | "reference" | "torch" | "numba" | "c" | "cuda"``.

    Returns:
        ``y (B, D, L)`` in ``u``'s dtype, or ``(y, last_state)``.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device, A.shape[1], z is not None)
    out_dtype = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32

    with torch.autocast(device_type=u.device.type, enabled=False):
        if name in ("c", "numba"):  # fused: bias, softplus, D (and z for numba) inside
            if name == "c":  # N = 1 and no gate (resolve_backend)
                from usfm_core.models._scan_c import c_scan as fused
            else:
                from usfm_core.models._scan_numba import numba_scan as fused

            gate = () if name == "c" else (z,)
            cast = [None if t is None else t.to(work) for t in (u, delta, A, B, C, D, *gate)]
            bias = None if delta_bias is None else delta_bias.to(work)
            out = fused(*cast, bias, delta_softplus, return_last_state)
            y, last = out if return_last_state else (out, None)
            y = y.to(out_dtype)
            return (y, last) if return_last_state else y
        u32, delta32, A32, B32, C32 = (t.to(work) for t in (u, delta, A, B, C))
        if delta_bias is not None:
            delta32 = delta32 + delta_bias.to(work).unsqueeze(-1)
        if delta_softplus:
            delta32 = F.softplus(delta32)
        if name == "reference":
            out = selective_scan_reference(u32, delta32, A32, B32, C32, return_last_state)
        elif name == "cuda":
            out = _scan_cuda(u32, delta32, A32, B32, C32, return_last_state)
        else:
            out = chunked_scan_core(u32, delta32, A32, B32, C32, return_last_state)
        y, last = out if return_last_state else (out, None)
        if D is not None:
            y = y + u32 * D.to(work).unsqueeze(-1)
        if z is not None:
            y = y * F.silu(z.to(work))
        y = y.to(out_dtype)
    return (y, last) if return_last_state else y


# --------------------------------------------------------------------------- 2-D (SS2D)
def cross_scan(x: Tensor) -> Tensor:
    """``(B, D, H, W)`` → ``(B, 4, D, L)``: row-major, column-major, reversed row, reversed col."""
    b, d, h, w = x.shape
    xs = x.new_empty(b, 4, d, h * w)
    xs[:, 0] = x.flatten(2)
    xs[:, 1].view(b, d, w, h).copy_(x.transpose(2, 3))  # write the transpose straight in
    xs[:, 2:] = xs[:, :2].flip(-1)
    return xs


def cross_merge(y: Tensor, h: int, w: int) -> Tensor:
    """``(B, 4, D, L)`` outputs of the 4 directions → ``(B, D, L)`` row-major, summed."""
    b, _, d, _ = y.shape
    out = y[:, 0] + y[:, 2].flip(-1)
    col = y[:, 1] + y[:, 3].flip(-1)
    out.view(b, d, h, w).add_(col.view(b, d, w, h).transpose(2, 3))
    return out


def to_direction_order(t: Tensor, h: int, w: int) -> Tensor:
    """``(B, 4, C, L)`` row-major maps, one per direction → each in its direction's order
    (block ``k`` as :func:`cross_scan` orders direction ``k``).  A per-position linear map
    commutes with these permutations, so ``W_k · cross_scan(x)_k`` equals
    ``to_direction_order(W_k · x)_k``: SS2D projects the ``D``-channel map once and permutes
    only the few projected channels."""
    b, _, c, _ = t.shape
    out = torch.empty_like(t)
    out[:, 0] = t[:, 0]
    out[:, 1].view(b, c, w, h).copy_(t[:, 1].view(b, c, h, w).transpose(2, 3))
    out[:, 2] = t[:, 2].flip(-1)
    out[:, 3].view(b, c, w, h).copy_(t[:, 3].view(b, c, h, w).transpose(2, 3))
    out[:, 3] = out[:, 3].flip(-1)
    return out


def cross_selective_scan(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """VMamba's 2-D selective scan: ``cross_merge(selective_scan(cross_scan(x), ...))``.

    ``x (B, D, H, W)``; ``delta (B, 4, D, L)``, ``B, C (B, 4, N, L)`` with each direction in
    its own order (:func:`cross_scan`, :func:`to_direction_order`); ``A (4 D, N)``, ``D`` and
    ``delta_bias`` ``(4 D,)`` (channel ``k D + d``) -> ``y (B, D, L)`` row-major, the sum of
    the four directions.  With the ``c`` backend (``N = 1``) the four directions run in one
    fused kernel that reads ``x`` and writes ``y`` in place of the ``(B, 4, D, L)`` copies;
    every other backend goes through :func:`cross_scan`, :func:`selective_scan` and
    :func:`cross_merge`.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, D, H, W), got shape {tuple(x.shape)}")
    bsz, dim, h, w = x.shape
    length = h * w
    if tuple(delta.shape) != (bsz, 4, dim, length):
        raise ValueError(
            f"delta must be (B, 4, D, L) = ({bsz}, 4, {dim}, {length}), got {tuple(delta.shape)}"
        )
    n = A.shape[-1] if A.dim() == 2 else -1
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (bsz, 4, n, length):
            raise ValueError(
                f"{name} must be (B, 4, N, L) = ({bsz}, 4, {n}, {length}), got {tuple(t.shape)}"
            )
    if A.dim() != 2 or A.shape[0] != 4 * dim:
        raise ValueError(f"A must be (4 D, N) = ({4 * dim}, N), got {tuple(A.shape)}")
    for arg, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (4 * dim,):
            raise ValueError(f"{arg} must be (4 D,) = ({4 * dim},), got {tuple(t.shape)}")
    name = resolve_backend(backend, x.device, n, False)
    if name == "c" and FUSE_CROSS_SCAN:
        if A.is_complex():
            raise ValueError("complex A is not supported; pass a real, negative A")
        from usfm_core.models._scan_c import c_cross_scan

        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            cast = [None if t is None else t.to(work) for t in (x, delta, A, B, C, D, delta_bias)]
            y = c_cross_scan(*cast[:7], delta_softplus=delta_softplus)  # type: ignore[arg-type]
        return y.to(x.dtype)
    ys = selective_scan(
        cross_scan(x).reshape(bsz, 4 * dim, length),
        delta.reshape(bsz, 4 * dim, length),
        A,
        B,
        C,
        D=D,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        backend=name,
    )
    return cross_merge(ys.view(bsz, 4, dim, length), h, w)
