"""The compiled C selective scan (``"c"`` backend, ``N = 1``): exactness against the float64
loop, gradcheck, the whole VMamba, backend choice, threads, fork and a missing compiler."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_scan import (
    _as_float64,
    assert_rel,
    check_against_reference,
    check_property_float32,
    make_inputs,
    run,
)
from usfm_core.models import _scan_c, scan
from usfm_core.models.scan import resolve_backend, selective_scan, set_default_backend

pytestmark = pytest.mark.skipif(not _scan_c.status()[0], reason="no C compiler here")

# (b, d, L, groups, D, bias, softplus, last): the kernel's chunk is 256 steps
CASES = [
    (2, 4, 1, None, True, True, True, True),  # L = 1
    (2, 4, 17, None, True, True, True, True),  # odd L
    (1, 6, 300, 3, True, True, True, True),  # two chunks, G > 1
    (2, 8, 49, 4, False, False, True, False),  # VMamba-like: 4 groups, no D / bias
    (1, 5, 513, 1, True, True, False, True),  # no softplus, 3 chunks, a block of 4 + 1 row
    (3, 2, 256, None, True, False, True, False),  # exactly one chunk
    (1, 4, 7, 4, True, False, True, True),  # one channel per group
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}L{}g{}".format(*c[:4]))
def test_c_backend_matches_reference(case):
    b, d, length, groups, use_d, use_bias, softplus, last = case
    flags = dict(use_d=use_d, use_z=False, use_bias=use_bias, softplus=softplus, last=last)
    check_against_reference("c", b, d, 1, length, groups, **flags)


@settings(
    max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
@given(
    b=st.integers(1, 3),
    groups=st.sampled_from([None, 1, 2, 3]),
    per_group=st.integers(1, 9),  # blocks of 4 channels and the rows left over
    length=st.one_of(st.integers(1, 40), st.integers(250, 530)),  # CHUNK = 256: borders
    use_d=st.booleans(),
    use_bias=st.booleans(),
    softplus=st.booleans(),
    last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_c_property_float32_within_1e5_of_float64_loop(
    b, groups, per_group, length, use_d, use_bias, softplus, last, seed
):
    """Random shapes and options: float32 C kernel vs the float64 loop, outputs and all
    gradients (tolerances as for the numba kernel, ``test_scan.check_property_float32``)."""
    d = (groups or 1) * per_group
    flags = dict(use_d=use_d, use_z=False, use_bias=use_bias, softplus=softplus, last=last)
    check_property_float32("c", b, d, 1, length, groups, seed, **flags)


@pytest.mark.parametrize(
    ("b", "d", "length", "groups"),
    [(1, 4, 11, 2), (2, 5, 5, None), (1, 2, 260, 1)],  # 260: two chunks
)
def test_c_gradcheck_float64(b, d, length, groups):
    """Finite differences through every input of the fused kernel (float64)."""
    t = make_inputs(b, d, 1, length, groups)
    names = ("u", "delta", "A", "B", "C", "D", "delta_bias")

    def f(*args):
        kw = dict(zip(names, args, strict=True))
        return selective_scan(**kw, delta_softplus=True, return_last_state=True, backend="c")

    assert torch.autograd.gradcheck(f, tuple(t[k] for k in names), atol=1e-7, fast_mode=True)


def test_c_matches_torch_backend_in_vmamba_and_attention_readout():
    """A whole VMamba forward/backward gives the same tokens, gradients and scan-attention
    read-out with the C kernel as with the torch backend; ``auto`` uses the C kernel there."""
    from usfm_core.models.attention import model_attention
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    torch.manual_seed(0)
    model = VMamba(VMambaConfig.preset("tiny")).eval()
    x = torch.randn(1, 3, 64, 64)
    calls = []
    real = _scan_c.c_cross_scan

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    out, grads, maps = {}, {}, {}
    try:
        for backend in ("torch", "auto"):
            set_default_backend(backend)
            model.zero_grad(set_to_none=True)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_scan_c, "c_cross_scan", spy)
                res = model(x, return_attention=True)
            res.tokens.square().mean().backward()
            out[backend] = (res.tokens.detach(), res.importance.detach())
            grads[backend] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            maps[backend] = model_attention(model, x)
    finally:
        set_default_backend(None)
    assert calls, "auto did not use the fused C kernel for VMamba's N = 1 scan"
    for a, b in zip(out["torch"], out["auto"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for a, b in zip(maps["torch"], maps["auto"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert len(grads["torch"]) == len(grads["auto"]) > 0
    for a, b in zip(grads["torch"], grads["auto"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def test_auto_picks_c_only_for_one_state_without_gate(monkeypatch):
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    assert resolve_backend("auto", "cpu") == "c"
    assert resolve_backend("auto", "cpu", n_state=16) == "numba"
    assert resolve_backend("auto", "cpu", n_state=1, gated=True) == "numba"
    # asked for by name on a call it does not handle: the next fused kernel
    assert resolve_backend("c", "cpu", n_state=4) == "numba"
    with pytest.raises(ValueError, match="needs CPU tensors"):
        resolve_backend("c", "cuda")
    # a gated N = 1 call through auto still gives the right answer (via numba)
    t = make_inputs(1, 4, 1, 30, dtype=torch.float32)
    flags = dict(use_d=True, use_z=True, use_bias=True, softplus=True, last=True)
    ref = run(_as_float64(t), "reference", **flags)
    assert_rel(ref, run(t, "auto", **flags), rtol=1e-5, floor=1.0, reduced_rtol=3e-5)
    # without a compiler: numba, with the reason reported
    monkeypatch.setattr(scan, "_c_status", lambda: (False, "no C compiler found"))
    assert resolve_backend("auto", "cpu") == "numba"
    with pytest.raises(ValueError, match="no C compiler"):
        resolve_backend("c", "cpu")
    report = scan.backend_report()
    assert report["auto_cpu"] == "numba" and "no C compiler" in report["cpu_reason"]


def test_build_is_cached_atomic_and_fails_cleanly(monkeypatch, tmp_path):
    """A fresh cache dir gets exactly one library (no temporaries left); a missing or broken
    compiler makes the backend unavailable with the reason, not an exception."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _scan_c._load.cache_clear()
    try:
        ok, why = _scan_c.status()
        assert ok, why
        files = sorted(p.name for p in (tmp_path / "usfm-core" / "cscan").iterdir())
        assert len(files) == 1 and files[0].startswith("scan-") and files[0].endswith(".so")
        _scan_c._load.cache_clear()
        assert _scan_c.status()[0]  # loaded from the cache
        assert len(list((tmp_path / "usfm-core" / "cscan").iterdir())) == 1

        # a cached file that does not load (e.g. a broken copy) is rebuilt once; a fresh
        # folder, because a library this process has loaded must never be written over
        broken = tmp_path / "broken" / "usfm-core" / "cscan" / files[0]
        broken.parent.mkdir(parents=True)
        broken.write_bytes(b"not a shared library")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "broken"))
        _scan_c._load.cache_clear()
        assert _scan_c.status()[0]
        assert broken.stat().st_size > 1000
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

        _scan_c._load.cache_clear()
        monkeypatch.setattr(_scan_c, "_compiler", lambda: None)
        ok, why = _scan_c.status()
        assert not ok and "no C compiler" in why

        _scan_c._load.cache_clear()
        monkeypatch.setattr(_scan_c, "_compiler", lambda: "/bin/false")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
        ok, why = _scan_c.status()
        assert not ok and "false failed" in why
        leftovers = list((tmp_path / "other" / "usfm-core" / "cscan").iterdir())
        assert leftovers == []  # the failed build's temporary folder is gone

        _scan_c._load.cache_clear()
        monkeypatch.setenv("USFM_SCAN_C", "0")
        assert _scan_c.status() == (False, "disabled by USFM_SCAN_C=0")
    finally:
        _scan_c._load.cache_clear()


def test_threads_split_rows_and_tasks_without_changing_results():
    """Two threads (rows / channel blocks split between them) give the one-thread result;
    the backward's ∂B, ∂C partial sums differ only by rounding."""
    t = make_inputs(2, 24, 1, 300, groups=4, dtype=torch.float32)
    flags = dict(use_d=True, use_z=False, use_bias=True, softplus=True, last=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(t, "c", **flags)
        torch.set_num_threads(2)
        two = run(t, "c", **flags)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert_rel(one, two, rtol=1e-6)


def _child_scan(queue) -> None:
    t = make_inputs(1, 4, 1, 20, groups=2, dtype=torch.float32)
    args = [t[k].detach() for k in ("u", "delta", "A", "B", "C")]
    torch.set_num_threads(1)  # as torch sets in DataLoader workers
    y = selective_scan(*args, delta_softplus=True)
    ref = selective_scan(*args, delta_softplus=True, backend="reference")
    queue.put((resolve_backend("auto", "cpu"), float((y - ref).abs().max())))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_keeps_the_c_kernel():
    """A child forked after the parent ran the kernel on two OpenMP threads runs it too with
    one thread (no OpenMP region is entered), as fork-based DataLoader workers do."""
    import multiprocessing

    t = make_inputs(2, 8, 1, 40, groups=4, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        selective_scan(*[t[k].detach() for k in ("u", "delta", "A", "B", "C")], backend="c")
    finally:
        torch.set_num_threads(before)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_scan, args=(queue,), daemon=True)
    proc.start()
    proc.join(120)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    assert proc.exitcode == 0
    backend, err = queue.get(timeout=5)
    assert backend == "c" and err < 1e-5


# ------------------------------------------------------------------ fused SS2D (cross scan)
# (b, d, h, w, D, bias, softplus): L = h·w across the 256-step chunk border, non-square maps
CROSS_CASES = [
    (1, 3, 4, 5, True, True, True),
    (2, 5, 7, 3, True, True, True),  # H > W
    (1, 2, 1, 9, False, False, True),  # one row: the column-major order is the row-major one
    (2, 3, 17, 19, True, False, True),  # L = 323: two chunks
    (1, 4, 16, 16, True, True, False),  # no softplus, exactly one chunk
    (1, 2, 23, 25, False, True, True),  # L = 575: three chunks
]


def _cross_inputs(b, d, h, w, dtype, seed=0, softplus=True):
    gen = torch.Generator().manual_seed(seed)
    length = h * w

    def rnd(*shape, scale=1.0):  # drawn in float64: the same values for every dtype
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(dtype).requires_grad_()

    x = rnd(b, d, h, w)
    delta = rnd(b, 4, d, length)
    if not softplus:  # raw Δ must be positive, or the state grows without bound
        delta = (delta.detach().abs() * 0.2).requires_grad_()
    a = -(torch.rand(4 * d, 1, generator=gen, dtype=torch.float64) * 2 + 0.1)
    A = a.to(dtype).requires_grad_()
    B, C = rnd(b, 4, 1, length), rnd(b, 4, 1, length)
    D, bias = rnd(4 * d), rnd(4 * d, scale=0.5)
    if not softplus:
        bias = (bias.detach().abs() * 0.2).requires_grad_()
    return x, delta, A, B, C, D, bias


def _cross_run(inputs, backend, use_d, use_bias, softplus, grad_seed=1):
    x, delta, A, B, C, D, bias = inputs
    for t in inputs:
        t.grad = None
    y = scan.cross_selective_scan(
        x, delta, A, B, C, D=D if use_d else None, delta_bias=bias if use_bias else None,
        delta_softplus=softplus, backend=backend,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    y.backward(g)
    used = [t for t, on in zip(inputs, (1, 1, 1, 1, 1, use_d, use_bias), strict=True) if on]
    return [y.detach().clone()] + [t.grad.clone() for t in used]


@pytest.mark.parametrize("case", CROSS_CASES, ids=lambda c: "b{}d{}h{}w{}".format(*c[:4]))
def test_fused_cross_scan_matches_cross_scan_scan_merge(case):
    """The fused kernel equals cross_scan → selective_scan → cross_merge (float64 loop
    reference): output and the gradients of x, delta, A, B, C, D, bias; float64 to 1e-12,
    float32 to 1e-5 of the largest value."""
    b, d, h, w, use_d, use_bias, softplus = case
    def inputs(dtype):
        return _cross_inputs(b, d, h, w, dtype, softplus=softplus)

    ref = _cross_run(inputs(torch.float64), "reference", use_d, use_bias, softplus)
    got64 = _cross_run(inputs(torch.float64), "c", use_d, use_bias, softplus)
    got32 = _cross_run(inputs(torch.float32), "c", use_d, use_bias, softplus)
    names = ["y", "x", "delta", "A", "B", "C"] + ["D"] * use_d + ["bias"] * use_bias
    for name, r, g64, g32 in zip(names, ref, got64, got32, strict=True):
        assert g64.shape == r.shape, name
        scale = r.abs().max().clamp_min(1e-30)
        assert float((g64 - r).abs().max() / scale) < 1e-12, name
        assert float((g32.double() - r).abs().max() / scale) < 1e-5, name


@pytest.mark.parametrize("softplus", [True, False])
def test_inference_forward_equals_training_forward(softplus):
    """Without autograd the kernels keep nothing for a backward (Δ goes through a chunk
    buffer instead of the kept array): the 1-D and the fused 2-D outputs must be the same as
    with autograd, bit for bit, and match the float64 loop (float32, 3 chunks)."""
    t = make_inputs(2, 6, 1, 600, 2, dtype=torch.float32, seed=4)
    if not softplus:  # a raw Δ must be positive (else exp(Δ A) grows without bound)
        for k in ("delta", "delta_bias"):
            t[k] = (t[k].detach().abs() * 0.2).requires_grad_()
    kw = dict(D=t["D"], delta_bias=t["delta_bias"], delta_softplus=softplus)
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"])
    y_train = selective_scan(*args, **kw, backend="c")
    with torch.no_grad():
        y_infer = selective_scan(*args, **kw, backend="c")
        ref = selective_scan(*(a.double() for a in args),
                             **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()},
                             backend="reference")  # fmt: skip
    assert torch.equal(y_train.detach(), y_infer)
    assert float((y_infer.double() - ref).abs().max() / ref.abs().max()) < 1e-5

    x, delta, A, B, C, D, bias = _cross_inputs(1, 3, 23, 27, torch.float32, softplus=softplus)
    y2_train = scan.cross_selective_scan(x, delta, A, B, C, D=D, delta_bias=bias,
                                         delta_softplus=softplus, backend="c")  # fmt: skip
    with torch.no_grad():
        y2_infer = scan.cross_selective_scan(x, delta, A, B, C, D=D, delta_bias=bias,
                                             delta_softplus=softplus, backend="c")  # fmt: skip
    assert torch.equal(y2_train.detach(), y2_infer)


def test_fused_cross_scan_gradcheck():
    """``torch.autograd.gradcheck`` of the fused kernel in float64 (two chunks, B = 2)."""
    x, delta, A, B, C, D, bias = _cross_inputs(2, 2, 13, 21, torch.float64, seed=3)

    def f(x, delta, A, B, C, D, bias):
        return scan.cross_selective_scan(
            x, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True, backend="c"
        )

    assert torch.autograd.gradcheck(f, (x, delta, A, B, C, D, bias), eps=1e-6, atol=1e-6)


def test_direction_order_commutes_with_projection():
    """Projecting the map then permuting (what SS2D does) equals projecting cross_scan's
    permuted copies (what it did before): the identity the fused path rests on."""
    gen = torch.Generator().manual_seed(0)
    b, d, h, w, c = 2, 6, 5, 7, 3
    x = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, c, d, generator=gen, dtype=torch.float64)
    before = torch.einsum("bkdl,kcd->bkcl", scan.cross_scan(x), weight)
    after = scan.to_direction_order(
        torch.matmul(weight.reshape(4 * c, d), x.flatten(2)).view(b, 4, c, h * w), h, w
    )
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


def test_fused_cross_scan_threads_and_bad_shapes():
    """Two threads give the one-thread result bit for bit apart from float sums; wrong shapes
    are refused with the argument named."""
    inputs = _cross_inputs(2, 8, 9, 11, torch.float32, seed=5)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cross_run(inputs, "c", True, True, True)
        torch.set_num_threads(2)
        two = _cross_run(inputs, "c", True, True, True)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    x, delta, A, B, C, _, bias = (t.detach() for t in inputs)
    with pytest.raises(ValueError, match="delta must be"):
        scan.cross_selective_scan(x, delta[:, :3], A, B, C)
    with pytest.raises(ValueError, match="B must be"):
        scan.cross_selective_scan(x, delta, A, B[..., :-1], C)
    with pytest.raises(ValueError, match="A must be"):
        scan.cross_selective_scan(x, delta, A[:-1], B, C)
    with pytest.raises(ValueError, match="delta_bias must be"):
        scan.cross_selective_scan(x, delta, A, B, C, delta_bias=bias[:-1])
