"""Fused selective scan for one state (``N = 1``) in C: the ``"c"`` CPU backend of :mod:`.scan`.

Every model of this toolkit scans with ``d_state = 1`` and no ``z`` gate, which is what this
kernel does (``_scan_c.c``: one pass forward, one backward, softplus / delta bias / ``D`` skip
inside, states and per-channel sums in float64).  It runs at 1.4-2.2× the numba kernel's speed
(``docs/benchmarks/scan.md``) because all work except the two recurrences is vectorised along
time, and four channels' recurrences are interleaved to hide the multiply-add latency.
:func:`c_cross_scan` is VMamba's four-direction scan with cross-scan and cross-merge fused:
the four directions of one channel are the four interleaved recurrences, reading the map and
its transpose in place.

Build: on first use the template is instantiated for float32 and float64 and compiled with
the machine's C compiler (``$CC``, else ``cc`` / ``gcc`` / ``clang``) for this CPU
(``-O3 -march=native -fopenmp``; then without OpenMP, one thread; then without
``-march=native`` for compilers that lack it), in about a second.  The library is cached under
``$XDG_CACHE_HOME/usfm-core/cscan`` (else ``~/.cache/...``), keyed by a hash of the source,
the flags, the compiler's version and the CPU's feature flags, and written atomically, so
concurrent first calls are safe; a cached file that does not load is rebuilt once.  Without a
working compiler the backend is unavailable and ``auto`` keeps the numba kernel
(:func:`status` says why).

Threads: the rows (forward) and ``(batch, group, channel block)`` tasks (backward) are split
into contiguous ranges, one per OpenMP thread.  The library links ``libgomp.so.1`` by soname,
so it runs on the OpenMP runtime torch already loaded, on the same threads as torch's parallel
ops (a separate pool of Python threads competed with torch's spin-waiting workers for the two
cores and made the 2-thread scan slower than 1 thread).  The count follows
``torch.get_num_threads()`` (the thread policy, :mod:`usfm_core.threads`); with one thread no
OpenMP region is entered, so a process forked from a parent that used the kernel (e.g. a
DataLoader worker, which torch sets to one thread) runs it safely.  ctypes releases the GIL
during each call, so a GUI thread keeps running.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["backward_parts", "c_scan", "status"]

_SOURCE = Path(__file__).with_name("_scan_c.c")
_FLAGS = ("-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
          "-ffp-contract=fast", "-fPIC", "-shared", "-std=c99")  # fmt: skip
#: Extra flags, tried in this order: the parallel split on the process's OpenMP runtime (see
#: ``_scan_c.c``) for this CPU's vector units; one thread; a compiler without -march=native.
_VARIANTS = (("-march=native", "-fopenmp"), ("-march=native",), ())
_CTYPES = {torch.float32: ("f32", "float"), torch.float64: ("f64", "double")}


def _source_text() -> str:
    """The template instantiated for float32 and float64 (one translation unit)."""
    template = _SOURCE.read_text()
    parts = [
        template.replace("_SFX", f"_{sfx}").replace("REAL", ctype)
        for sfx, ctype in _CTYPES.values()
    ]
    return "\n".join(parts)


def _compiler() -> str | None:
    """The C compiler to use: ``$CC`` if set (first word), else the first of cc, gcc, clang."""
    env = os.environ.get("CC", "").split()
    for name in ([env[0]] if env else []) + ["cc", "gcc", "clang"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` code runs only where they all exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "usfm-core" / "cscan"


def _build(cc: str, source: str, target: Path) -> None:
    """Compile ``source`` into ``target`` atomically (a temporary file renamed into place):
    with OpenMP if the compiler has it, else without (the split then runs serially)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".usfm-tmp-cscan-", dir=target.parent) as tmp:
        src = Path(tmp) / "scan.c"
        src.write_text(source)
        out = Path(tmp) / "scan.so"
        msg: list[str] = []
        for extra in _VARIANTS:
            proc = subprocess.run(
                [cc, *_FLAGS, *extra, "-o", str(out), str(src)],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            if proc.returncode == 0 and out.exists():
                os.replace(out, target)
                return
            msg = (proc.stderr or proc.stdout).strip().splitlines() or [str(proc.returncode)]
        raise OSError(f"{Path(cc).name} failed: {' | '.join(msg[-3:])}")


def _declare(lib: ctypes.CDLL) -> None:
    """Argument types of the four entry points (pointers as void*, sizes as int64)."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    for sfx in ("f32", "f64"):
        fwd = getattr(lib, f"usfm_fwd_par_{sfx}")
        fwd.argtypes = [p] * 7 + [i32, i64, i64, i64, p, p, p, p, p, i64, i32]
        fwd.restype = None
        bwd = getattr(lib, f"usfm_bwd_par_{sfx}")
        bwd.argtypes = [p] * 7 + [i32, i64, i64, i64, i64, i64] + [p] * 12 + [i64, i32]
        bwd.restype = None
    for sfx in ("f32", "f64"):
        fwd = getattr(lib, f"usfm_ss2d_fwd_par_{sfx}")
        fwd.argtypes = [p] * 7 + [i32, i64, i64, i64, p, p, p, p, i64, i32]
        fwd.restype = i32
        bwd = getattr(lib, f"usfm_ss2d_bwd_par_{sfx}")
        bwd.argtypes = [p] * 7 + [i32, i64, i64, i64, i64, i64] + [p] * 11 + [i64, i32]
        bwd.restype = i32
    lib.usfm_openmp.argtypes = []
    lib.usfm_openmp.restype = i32


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """Compile (first time) or load the cached library; ``(None, why)`` when that fails."""
    if os.environ.get("USFM_SCAN_C", "").strip().lower() in ("0", "off", "no", "false"):
        return None, "disabled by USFM_SCAN_C=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc)"
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[:1]
        source = _source_text()
        key = hashlib.sha256(
            "\n".join([source, repr((_FLAGS, _VARIANTS)), *version, _cpu_flags(),
                       platform.machine()])
            .encode()
        ).hexdigest()[:16]
        target = _cache_dir() / f"scan-{key}.so"
        if not target.exists():
            _build(cc, source, target)
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:  # a cached file that does not load (another machine's?): rebuild once
            _build(cc, source, target)
            lib = ctypes.CDLL(str(target))
        _declare(lib)
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        return None, f"C scan kernel unavailable ({exc})"
    threads = "OpenMP threads" if lib.usfm_openmp() else "one thread: no OpenMP"
    return lib, f"compiled with {Path(cc).name} ({' '.join(version) or '?'}; {threads})"


def status() -> tuple[bool, str]:
    """Whether the compiled kernel is usable in this process, and why not / how it was built."""
    lib, why = _load()
    return lib is not None, why


# --------------------------------------------------------------------------- glue
def _threads() -> int:
    return max(1, torch.get_num_threads())


def _ptr(t: Tensor | None) -> int | None:  # None is NULL
    return None if t is None else t.data_ptr()


def backward_parts(bsz: int, groups: int, dg: int, threads: int) -> int:
    """Channel blocks per ``(b, g)`` in the backward of this and the numba kernel: ≥ 2 tasks
    per thread when possible."""
    return max(1, min(dg, -(-2 * threads // (bsz * groups))))


class _CScan(torch.autograd.Function):
    """``(u, delta, A, B, C, D, delta_bias) -> (y, last)`` for ``N = 1``; B, C ``(B, G, L)``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, bias, softplus, grad):  # type: ignore[override]
        lib, _ = _load()
        assert lib is not None
        sfx = _CTYPES[u.dtype][0]
        bsz, dim, length = u.shape
        groups = B.shape[1]
        u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
        a = A.reshape(dim).contiguous()
        dv = D.contiguous() if D is not None else u.new_zeros(dim)
        bv = bias.contiguous() if bias is not None else u.new_zeros(dim)
        y = torch.empty_like(u)
        last = u.new_empty(bsz, dim, dtype=torch.float64)
        hs = torch.empty_like(u) if grad else None
        # with softplus, Δ and its slope are kept too (cheaper than recomputing softplus)
        keep = grad and bool(softplus)
        dts = torch.empty_like(u) if keep else None
        sgs = torch.empty_like(u) if keep else None
        args = (
            _ptr(u), _ptr(delta), _ptr(a), _ptr(B), _ptr(C), _ptr(dv), _ptr(bv),
            int(bool(softplus)), dim, length, groups, _ptr(y), _ptr(last), _ptr(hs),
            _ptr(dts), _ptr(sgs),
        )  # fmt: skip
        getattr(lib, f"usfm_fwd_par_{sfx}")(*args, bsz * dim, _threads())
        ctx.set_materialize_grads(False)
        if grad:
            ctx.save_for_backward(u, delta, a, B, C, dv, bv, hs, dts, sgs)
        ctx.flags = (D is not None, bias is not None, bool(softplus))
        return y, last.to(u.dtype).unsqueeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_last):  # type: ignore[override]
        lib, _ = _load()
        assert lib is not None
        u, delta, a, B, C, dv, bv, hs, dts, sgs = ctx.saved_tensors
        has_d, has_bias, softplus = ctx.flags
        bsz, dim, length = u.shape
        groups = B.shape[1]
        sfx = _CTYPES[u.dtype][0]
        gy = grad_y.contiguous() if grad_y is not None else torch.zeros_like(u)
        f64 = dict(dtype=torch.float64)
        gl = (
            grad_last.reshape(bsz, dim).to(torch.float64).contiguous()
            if grad_last is not None
            else torch.zeros(bsz, dim, **f64)
        )
        threads = _threads()
        parts = backward_parts(bsz, groups, dim // groups, threads)
        gu, gdelta = torch.empty_like(u), torch.empty_like(u)
        gA = torch.empty(bsz, dim, **f64)
        gD = torch.empty(bsz, dim, **f64)
        gbias = torch.empty(bsz, dim, **f64)
        gBp = torch.zeros(parts, bsz, groups, length, **f64)
        gCp = torch.zeros(parts, bsz, groups, length, **f64)
        args = (
            _ptr(u), _ptr(delta), _ptr(a), _ptr(B), _ptr(C), _ptr(dv), _ptr(bv),
            int(softplus), bsz, dim, length, groups, parts, _ptr(hs), _ptr(dts), _ptr(sgs),
            _ptr(gy), _ptr(gl),
            _ptr(gu), _ptr(gdelta), _ptr(gA), _ptr(gD), _ptr(gbias), _ptr(gBp), _ptr(gCp),
        )  # fmt: skip
        getattr(lib, f"usfm_bwd_par_{sfx}")(*args, bsz * groups * parts, threads)
        dtype = u.dtype
        return (
            gu,
            gdelta,
            gA.sum(0).to(dtype).unsqueeze(-1),
            gBp.sum(0).to(dtype),
            gCp.sum(0).to(dtype),
            gD.sum(0).to(dtype) if has_d else None,
            gbias.sum(0).to(dtype) if has_bias else None,
            None,
            None,
        )


def c_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused ``N = 1`` selective scan on CPU tensors of one float dtype (float32 or float64).

    ``u, delta (B, D, L)``, ``A (D, 1)``, ``B, C (B, 1, L) | (B, G, 1, L)``,
    ``D, delta_bias (D,)`` -> ``y (B, D, L)`` (``D`` skip applied) and, if asked, the last
    state ``(B, D, 1)``.  Shapes are checked by the caller (:func:`.scan.selective_scan`).
    """
    B3 = B.reshape(B.shape[0], -1, B.shape[-1])  # (B, G, L): N = 1
    C3 = C.reshape(C.shape[0], -1, C.shape[-1])
    inputs = (u, delta, A, B3, C3, D, delta_bias)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, last = _CScan.apply(*inputs, delta_softplus, grad)
    return (y, last) if return_last_state else y


class _CSS2D(torch.autograd.Function):
    """VMamba's four-direction scan with cross-scan and cross-merge fused (``N = 1``):
    ``u (B, D, L)`` row-major map, ``delta (B, 4 D, L)``, ``A (4 D,)``, ``B, C (B, 4, L)``
    (each direction in its own order), ``D, bias (4 D,)`` -> ``y (B, D, L)`` row-major, the sum
    of the four directions' outputs (see ``usfm_ss2d_fwd`` in ``_scan_c.c``)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, bias, softplus, hw, grad):  # type: ignore[override]
        lib, _ = _load()
        assert lib is not None
        sfx = _CTYPES[u.dtype][0]
        bsz, dim, _ = u.shape
        h, w = hw
        u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
        a = A.reshape(-1).contiguous()
        k_dim = a.shape[0]
        dv = D.contiguous() if D is not None else u.new_zeros(k_dim)
        bv = bias.contiguous() if bias is not None else u.new_zeros(k_dim)
        y = torch.empty_like(u)
        hs = torch.empty_like(delta) if grad else None
        keep = grad and bool(softplus)
        dts = torch.empty_like(delta) if keep else None
        sgs = torch.empty_like(delta) if keep else None
        rc = getattr(lib, f"usfm_ss2d_fwd_par_{sfx}")(
            _ptr(u), _ptr(delta), _ptr(a), _ptr(B), _ptr(C), _ptr(dv), _ptr(bv),
            int(bool(softplus)), dim, h, w, _ptr(y), _ptr(hs), _ptr(dts), _ptr(sgs),
            bsz * dim, _threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError(f"fused SS2D scan: no memory for its {h}×{w} work buffers")
        ctx.set_materialize_grads(False)
        if grad:
            ctx.save_for_backward(u, delta, a, B, C, dv, bv, hs, dts, sgs)
        ctx.flags = (D is not None, bias is not None, bool(softplus), h, w)
        ctx.a_shape = A.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        lib, _ = _load()
        assert lib is not None
        u, delta, a, B, C, dv, bv, hs, dts, sgs = ctx.saved_tensors
        has_d, has_bias, softplus, h, w = ctx.flags
        if grad_y is None:
            return (None,) * 10
        bsz, dim, _ = u.shape
        sfx = _CTYPES[u.dtype][0]
        gy = grad_y.contiguous()
        f64 = dict(dtype=torch.float64)
        threads = _threads()
        parts = max(1, min(dim, -(-2 * threads // bsz)))
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gA = torch.empty(bsz, a.shape[0], **f64)
        gD = torch.empty(bsz, a.shape[0], **f64)
        gbias = torch.empty(bsz, a.shape[0], **f64)
        gBp = torch.zeros(parts, *B.shape, **f64)
        gCp = torch.zeros(parts, *C.shape, **f64)
        rc = getattr(lib, f"usfm_ss2d_bwd_par_{sfx}")(
            _ptr(u), _ptr(delta), _ptr(a), _ptr(B), _ptr(C), _ptr(dv), _ptr(bv),
            int(softplus), bsz, dim, h, w, parts, _ptr(hs), _ptr(dts), _ptr(sgs), _ptr(gy),
            _ptr(gu), _ptr(gdelta), _ptr(gA), _ptr(gD), _ptr(gbias), _ptr(gBp), _ptr(gCp),
            bsz * parts, threads,
        )  # fmt: skip
        if rc != 0:
            raise MemoryError(f"fused SS2D scan: no memory for its {h}×{w} work buffers")
        dtype = u.dtype
        return (
            gu,
            gdelta,
            gA.sum(0).to(dtype).view(ctx.a_shape),
            gBp.sum(0).to(dtype),
            gCp.sum(0).to(dtype),
            gD.sum(0).to(dtype) if has_d else None,
            gbias.sum(0).to(dtype) if has_bias else None,
            None,
            None,
            None,
        )


def c_cross_scan(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Fused four-direction ``N = 1`` scan (cross-scan, scan, cross-merge) on CPU tensors of
    one float dtype.

    ``x (B, D, H, W)``, ``delta (B, 4, D, L)``, ``A (4 D, 1)``, ``B, C (B, 4, 1, L)`` (each
    direction in its own order, as :func:`.scan.cross_scan` makes them), ``D, delta_bias
    (4 D,)`` -> ``y (B, D, L)`` row-major: what ``cross_merge(selective_scan(cross_scan(x),
    ...))`` computes.  Shapes are checked by the caller (:func:`.scan.cross_selective_scan`).
    """
    bsz, dim, h, w = x.shape
    u = x.reshape(bsz, dim, h * w)
    delta3 = delta.reshape(bsz, -1, h * w)
    B3 = B.reshape(bsz, -1, h * w)  # (B, 4, L): N = 1
    C3 = C.reshape(bsz, -1, h * w)
    inputs = (u, delta3, A, B3, C3, D, delta_bias)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y = _CSS2D.apply(*inputs, delta_softplus, (h, w), grad)
    return y
