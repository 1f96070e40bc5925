"""Selective scan: every backend against the sequential reference (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usfm_core.models import _scan_chunked, scan
from usfm_core.models.scan import (
    available_backends,
    backend_report,
    resolve_backend,
    selective_scan,
    set_default_backend,
)

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(
    b: int,
    d: int,
    n: int,
    length: int,
    groups: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    delta_scale: float = 1.0,
    a_scale: float = 3.0,
) -> dict[str, torch.Tensor]:
    """Random scan inputs (leaf tensors requiring grad); ``groups=None`` gives 3-D B and C."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    bc_shape = (b, n, length) if groups is None else (b, groups, n, length)
    t = {
        "u": rnd(b, d, length),
        "delta": rnd(b, d, length) * delta_scale,
        "A": -(torch.rand(d, n, generator=gen, dtype=torch.float64) * a_scale + 0.05),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(d),
        "z": rnd(b, d, length),
        "delta_bias": rnd(d) * 0.5,
    }
    return {k: v.to(dtype).requires_grad_() for k, v in t.items()}


def run(inputs, backend, use_d=True, use_z=True, use_bias=True, softplus=True, last=True):
    """Forward + backward of a fixed non-linear loss; returns outputs and input gradients."""
    for t in inputs.values():
        t.grad = None
    out = selective_scan(
        inputs["u"],
        inputs["delta"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        D=inputs["D"] if use_d else None,
        z=inputs["z"] if use_z else None,
        delta_bias=inputs["delta_bias"] if use_bias else None,
        delta_softplus=softplus,
        return_last_state=last,
        backend=backend,
    )
    y, state = out if last else (out, None)
    loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sin().sum()
    if state is not None:
        loss = loss + state.cos().sum()
    loss.backward()
    grads = {k: (v.grad.clone() if v.grad is not None else None) for k, v in inputs.items()}
    return y.detach(), (state.detach() if state is not None else None), grads


def assert_same(ref, got, atol):
    """Max abs error ≤ atol, scaled by the tensor's magnitude when that exceeds 1 (fp32 has
    only ~7 digits, so a value of 300 cannot be matched to 1e-4 absolutely)."""
    for name, mine, theirs in _result_pairs(ref, got):
        err = (mine.double() - theirs.double()).abs().max().item()
        assert err <= atol * max(1.0, theirs.abs().max().item()), f"{name}: {err:.2e}"


def _result_pairs(ref, got):
    """``(name, got tensor, reference tensor)`` for the output, the last state and every
    gradient of two ``run`` results; a tensor absent from the reference must be absent."""
    y_r, s_r, g_r = ref
    y_g, s_g, g_g = got
    pairs = [("y", y_g, y_r), ("last_state", s_g, s_r)]
    pairs += [(f"grad {k}", g_g[k], g_r[k]) for k in GRAD_NAMES]
    for name, mine, theirs in pairs:
        if theirs is None:
            assert mine is None, name
            continue
        yield name, mine, theirs


CASES = [
    # (b, d, n, L, groups, D, z, bias, softplus, last)
    (2, 4, 1, 1, None, True, True, True, True, True),  # L = 1
    (2, 4, 1, 17, None, True, False, True, True, True),  # odd L
    (1, 6, 16, 50, 3, True, True, True, True, True),  # L not a multiple of the chunk, G > 1
    (2, 8, 1, 49, 4, False, False, False, True, False),  # VMamba-like: 4 groups, N = 1
    (1, 4, 16, 64, 2, False, True, True, False, True),  # no softplus
    (3, 2, 2, 100, None, True, False, False, False, False),
    (1, 4, 3, 7, 4, True, True, False, True, True),  # one channel per group
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}n{}L{}g{}".format(*c[:5]))
def test_torch_backend_matches_reference(case):
    b, d, n, length, groups, use_d, use_z, use_bias, softplus, last = case
    flags = dict(use_d=use_d, use_z=use_z, use_bias=use_bias, softplus=softplus, last=last)

    def inputs(dtype=torch.float64):
        t = make_inputs(b, d, n, length, groups, dtype=dtype)
        if not softplus:  # raw Δ must then be positive (a decaying, not exploding, state)
            with torch.no_grad():
                t["delta"].abs_()
                t["delta_bias"].abs_()
        return t

    ref = run(inputs(), "reference", **flags)
    # float64 on both sides: the two algorithms agree to rounding.
    assert_same(ref, run(inputs(), "torch", **flags), atol=1e-10)
    # float32 chunked scan against the float64 reference: the required 1e-4.
    got32 = run(inputs(torch.float32), "torch", **flags)
    assert got32[0].dtype == torch.float32
    assert_same(ref, got32, atol=1e-4)


@pytest.mark.parametrize("budget", [40, 300, 800], ids=["channel", "group", "image"])
def test_blocking_over_channels_groups_and_images(monkeypatch, budget):
    """Tiny block budgets force each split mode of the blocked scan; results must not change."""
    inputs = make_inputs(3, 8, 2, 23, groups=2)
    ref = run(inputs, "torch")
    blocks = _scan_chunked._plan_blocks(3, 2, 4, 2 * 25, budget)
    assert len(blocks) > 1
    monkeypatch.setattr(_scan_chunked, "BLOCK_ELEMENTS", budget)
    assert_same(ref, run(inputs, "torch"), atol=1e-12)


def test_gradcheck_hand_written_backward():
    """Finite differences on the custom autograd.Function (float64, incl. last-state grad)."""
    t = make_inputs(1, 4, 2, 11, groups=2)
    args = (t["u"], t["delta"].detach().abs().requires_grad_(), t["A"], t["B"], t["C"])

    def f(u, delta, A, B, C):
        y, h = _scan_chunked.chunked_scan_core(u, delta, A, B, C, return_last_state=True)
        return y, h

    assert torch.autograd.gradcheck(f, args, atol=1e-7, fast_mode=True)


def test_chunk_size_balances_loops():
    assert _scan_chunked.chunk_size(1) == 1
    assert _scan_chunked.chunk_size(49) == 7
    assert _scan_chunked.chunk_size(50) == 8
    assert _scan_chunked.chunk_size(3136) == 56


def test_long_sequence_with_strong_decay_is_stable():
    """L = 3136 with Δ·|A| up to ~300 per step: no NaN/inf, equal to the float64 loop."""
    t64 = make_inputs(1, 4, 16, 3136, groups=2, delta_scale=8.0, a_scale=16.0, seed=3)
    with torch.no_grad():
        t64["delta"].add_(10.0)  # softplus(delta) ≈ 10–30 on most steps
    t32 = {k: v.detach().float().requires_grad_() for k, v in t64.items()}
    # The oracle sees the float32 inputs exactly: Δ·|A| ~ 500 turns the inputs' rounding
    # (6e-8) into 3e-5 relative differences, which is not the kernel's error.
    t64 = {k: v.detach().double().requires_grad_() for k, v in t32.items()}
    ref = run(t64, "reference", use_z=False)
    for backend in ("torch", "numba"):
        got = run(t32, backend, use_z=False)
        for tensor in (got[0], got[1], *got[2].values()):
            if tensor is not None:
                assert torch.isfinite(tensor).all()
        # Relative to each tensor's magnitude.  Both float32 backends land at ~3e-5 here
        # (exp of Δ·A ~ -500 computed in float32 amplifies rounding); at Mamba-like scales the
        # numba kernel holds 1e-5 (property test above).
        assert_rel(ref, got, rtol=1e-4)


def test_mamba_ssm_reference_as_second_oracle():
    iface = pytest.importorskip(
        "mamba_ssm.ops.selective_scan_interface", reason="mamba_ssm is not installed"
    )
    t = make_inputs(2, 6, 4, 33, groups=3)
    args = [t[k].detach() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    ref = iface.selective_scan_ref(*args, delta_softplus=True)
    ours = selective_scan(*args, delta_softplus=True, backend="torch")
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


def test_autocast_bf16_on_cpu_keeps_fp32():
    t = make_inputs(2, 4, 1, 30, groups=2, dtype=torch.float32)
    args = [t[k].detach() for k in ("u", "delta", "A", "B", "C")]
    expected = selective_scan(*args, delta_softplus=True, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan(*args, delta_softplus=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    # bf16 inputs: computed in fp32, returned in the caller's dtype.
    y16 = selective_scan(*(a.bfloat16() for a in args), delta_softplus=True)
    assert y16.dtype == torch.bfloat16
    up = [a.bfloat16().float() for a in args]
    expected16 = selective_scan(*up, delta_softplus=True, backend="reference")
    torch.testing.assert_close(y16.float(), expected16.bfloat16().float(), atol=0.05, rtol=0.02)


def test_auto_never_picks_cuda_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    monkeypatch.setattr(scan, "_mamba_ssm_status", lambda: (True, "pretend"))
    monkeypatch.setattr(scan, "_c_status", lambda: (False, "no compiler"))
    assert resolve_backend("auto", "cpu") == "numba"
    monkeypatch.setattr(scan, "_numba_status", lambda: (False, "no numba"))
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="pip install numba"):
        resolve_backend("numba", "cpu")
    assert resolve_backend("auto", "cuda") == "cuda"
    monkeypatch.setattr(scan, "_mamba_ssm_status", lambda: (False, "no mamba_ssm"))
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="CUDA tensors"):
        resolve_backend("cuda", "cpu")
    monkeypatch.setattr(scan, "_numba_status", lambda: (True, "pretend"))
    with pytest.raises(ValueError, match="needs CPU tensors"):
        resolve_backend("numba", "cuda")


def test_env_var_and_default_override(monkeypatch):
    calls = []
    real = scan.selective_scan_reference

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scan, "selective_scan_reference", spy)
    t = make_inputs(1, 2, 1, 5)
    args = [t[k].detach() for k in ("u", "delta", "A", "B", "C")]
    monkeypatch.setenv(scan.ENV_VAR, "reference")
    selective_scan(*args)
    assert calls == [1]
    try:
        set_default_backend("torch")  # the process-wide setting wins over the variable
        selective_scan(*args)
        assert calls == [1]
    finally:
        set_default_backend(None)
    monkeypatch.setenv(scan.ENV_VAR, "warp-drive")
    with pytest.raises(ValueError, match=scan.ENV_VAR):
        selective_scan(*args)
    with pytest.raises(ValueError, match="unknown scan backend"):
        set_default_backend("fast")


def test_backend_report_and_available():
    names = available_backends()
    assert names[:4] == ["reference", "torch", "numba", "c"]
    report = backend_report()
    assert report["auto_cpu"] == "c" and "numba" in report["cpu_reason"]
    assert report["auto_cuda"] in ("torch", "cuda")
    if not report["mamba_ssm"]:
        assert report["auto_cuda"] == "torch" and report["reason"]


def _bad(**overrides):
    t = {k: v.detach() for k, v in make_inputs(2, 4, 3, 10, groups=2).items()}
    t.update(overrides)
    return t


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"u": torch.zeros(2, 4)}, "u must be"),
        ({"delta": torch.zeros(2, 4, 9)}, "delta must"),
        ({"A": torch.zeros(5, 3)}, "A must be"),
        ({"B": torch.zeros(2, 3, 3, 10)}, "groups, which must divide"),
        ({"C": torch.zeros(2, 2, 3, 11)}, "C must be"),
        ({"D": torch.zeros(3)}, "D must be"),
        ({"z": torch.zeros(2, 4, 11)}, "z must"),
        ({"delta_bias": torch.zeros(4, 1)}, "delta_bias must"),
    ],
)
def test_bad_shapes_raise_clear_errors(overrides, match):
    t = _bad(**overrides)
    with pytest.raises(ValueError, match=match):
        selective_scan(**t)
    with pytest.raises(ValueError, match="unknown scan backend"):
        selective_scan(**_bad(), backend="magic")


def test_no_grad_inference_and_allocator_tuning():
    """Under no_grad the torch backend builds no graph; allocator tuning leaves results alone."""
    t = make_inputs(2, 8, 4, 40, groups=4, dtype=torch.float32)
    args = [v.detach() for k, v in t.items() if k in ("u", "delta", "A", "B", "C")]
    expected = selective_scan(*args, delta_softplus=True, backend="reference")
    tuned = scan.tune_cpu_allocator()
    assert isinstance(tuned, bool)
    with torch.no_grad():
        y = selective_scan(*[a.requires_grad_() for a in args], delta_softplus=True)
    assert y.grad_fn is None
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)


def test_gradient_through_last_state_only():
    """The backward must also work when only the last state (not y) feeds the loss."""
    grads = {}
    for backend in ("reference", "torch", "numba"):
        t = make_inputs(2, 4, 3, 19, groups=2)
        _, last = selective_scan(
            t["u"], t["delta"], t["A"], t["B"], t["C"], delta_softplus=True,
            return_last_state=True, backend=backend,
        )  # fmt: skip
        last.pow(2).sum().backward()
        grads[backend] = [
            t[k].grad if t[k].grad is not None else torch.zeros_like(t[k])
            for k in ("u", "delta", "A", "B", "C")
        ]
        assert grads[backend][4].abs().sum() == 0  # C does not touch the state
        assert grads[backend][0].abs().sum() > 0
    for name in ("torch", "numba"):
        for ref, got in zip(grads["reference"], grads[name], strict=True):
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- numba backend
def assert_rel(ref, got, rtol, floor=0.0, reduced_rtol=None):
    """Every output and gradient within ``rtol`` of the reference, relative to that tensor's
    largest magnitude (the worst error of a float32 kernel against the float64 loop); with
    ``floor`` the magnitude counts as at least ``floor`` (small sums of cancelling float32
    terms cannot be relatively exact). ``reduced_rtol`` (default ``rtol``) holds the gradients
    of the per-channel parameters ``A``, ``D`` and ``delta_bias``: float32 sums over B·L terms."""
    for name, mine, theirs in _result_pairs(ref, got):
        assert mine.shape == theirs.shape, name
        err = (mine.double() - theirs.double()).abs().max().item()
        scale = theirs.abs().max().item()
        tol = rtol
        if reduced_rtol is not None and name in ("grad A", "grad D", "grad delta_bias"):
            tol = reduced_rtol
        assert err <= tol * max(scale, floor) + 1e-30, (
            f"{name}: {err:.2e} vs magnitude {scale:.2e}"
        )


def _as_float64(t):
    """The same values in float64 (the oracle's inputs for a float32 run)."""
    return {k: v.detach().double().requires_grad_() for k, v in t.items()}


def _positive_if_no_softplus(t, softplus):
    """Without softplus the raw Δ must be positive (a decaying, not exploding, state)."""
    if not softplus:
        with torch.no_grad():
            t["delta"].abs_()
            t["delta_bias"].abs_()
    return t


def check_against_reference(backend, b, d, n, length, groups, **flags):
    """float64: ``backend`` equals the loop to rounding; float32: within 1e-5 of the float64
    loop on the same values (outputs and every gradient)."""

    def inputs(dtype=torch.float64):
        t = make_inputs(b, d, n, length, groups, dtype=dtype)
        return _positive_if_no_softplus(t, flags["softplus"])

    ref = run(inputs(), "reference", **flags)
    assert_rel(ref, run(inputs(), backend, **flags), rtol=1e-12)  # float64: to rounding
    t32 = inputs(torch.float32)
    ref = run(_as_float64(t32), "reference", **flags)
    got32 = run(t32, backend, **flags)
    assert got32[0].dtype == torch.float32
    assert_rel(ref, got32, rtol=1e-5)


def check_property_float32(backend, b, d, n, length, groups, seed, **flags):
    """Random shapes and options: float32 ``backend`` vs the float64 loop.

    Without softplus the raw |Δ| reaches ~4 and Δ·|A| ~12 per step: float32 rounding of the
    exponent alone then gives isolated errors up to ~1.5e-5 of the largest gradient (the
    torch backend shows the same kind of outliers at other elements).  Gradients that are
    small sums of cancelling terms (e.g. ∂delta_bias ≈ 0.3 at L = 2) are held to 1e-5 absolute.
    The per-channel parameter gradients (A, D, delta_bias) are float32 sums over B·L terms:
    a random search found 1.05e-5 of the largest ∂delta_bias at B 2, L 120, N 16, so they are
    held to 3e-5; every output and per-element gradient stays at 1e-5 (with softplus).
    """
    t32 = _positive_if_no_softplus(
        make_inputs(b, d, n, length, groups, dtype=torch.float32, seed=seed), flags["softplus"]
    )
    ref = run(_as_float64(t32), "reference", **flags)
    rtol = 1e-5 if flags["softplus"] else 3e-5
    assert_rel(ref, run(t32, backend, **flags), rtol=rtol, floor=1.0, reduced_rtol=3e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}n{}L{}g{}".format(*c[:5]))
def test_numba_backend_matches_reference(case):
    b, d, n, length, groups, use_d, use_z, use_bias, softplus, last = case
    flags = dict(use_d=use_d, use_z=use_z, use_bias=use_bias, softplus=softplus, last=last)
    check_against_reference("numba", b, d, n, length, groups, **flags)


# derandomize: CI runs the same 40 examples every time (a failure is reproducible, not luck).
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    b=st.integers(1, 3),
    groups=st.sampled_from([None, 1, 2, 3]),
    per_group=st.integers(1, 3),
    n=st.sampled_from([1, 2, 16]),
    length=st.one_of(st.integers(1, 40), st.integers(120, 300)),  # CHUNK = 128: borders
    use_d=st.booleans(),
    use_z=st.booleans(),
    use_bias=st.booleans(),
    softplus=st.booleans(),
    last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_numba_property_float32_within_1e5_of_float64_loop(
    b, groups, per_group, n, length, use_d, use_z, use_bias, softplus, last, seed
):
    """Random shapes and options: float32 kernel vs float64 loop, outputs and all gradients."""
    d = (groups or 1) * per_group
    flags = dict(use_d=use_d, use_z=use_z, use_bias=use_bias, softplus=softplus, last=last)
    check_property_float32("numba", b, d, n, length, groups, seed, **flags)


@pytest.mark.parametrize(
    ("b", "d", "n", "length", "groups"),
    [(1, 4, 2, 11, 2), (2, 2, 1, 5, None), (1, 2, 3, 131, 1)],  # 131: two chunks
)
def test_numba_gradcheck_float64(b, d, n, length, groups):
    """Finite differences through every input of the fused kernel (float64)."""
    t = make_inputs(b, d, n, length, groups)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def f(*args):
        kw = dict(zip(names, args, strict=True))
        return selective_scan(**kw, delta_softplus=True, return_last_state=True, backend="numba")

    assert torch.autograd.gradcheck(f, tuple(t[k] for k in names), atol=1e-7, fast_mode=True)


def test_numba_matches_torch_backend_in_vmamba_and_attention_readout():
    """A whole VMamba forward/backward gives the same tokens, gradients and scan-attention
    read-out with either CPU backend (the read-out uses the recorded Δ, A, B, C)."""
    from usfm_core.models.attention import model_attention
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    torch.manual_seed(0)
    model = VMamba(VMambaConfig.preset("tiny")).eval()
    x = torch.randn(1, 3, 64, 64)
    out, grads, maps = {}, {}, {}
    try:
        for backend in ("torch", "numba"):
            set_default_backend(backend)
            model.zero_grad(set_to_none=True)
            res = model(x, return_attention=True)
            res.tokens.square().mean().backward()
            out[backend] = (res.tokens.detach(), res.importance.detach())
            grads[backend] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            maps[backend] = model_attention(model, x)
    finally:
        set_default_backend(None)
    for a, b in zip(out["torch"], out["numba"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for a, b in zip(maps["torch"], maps["numba"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert len(grads["torch"]) == len(grads["numba"]) > 0
    for a, b in zip(grads["torch"], grads["numba"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def test_numba_no_grad_threads_and_dtypes():
    """Under no_grad no graph is built; the kernel follows torch's thread count; bf16 in,
    bf16 out (computed in float32); float64 stays float64."""
    from usfm_core.models import _scan_numba

    t = make_inputs(2, 8, 4, 40, groups=4, dtype=torch.float32)
    args = [t[k].detach() for k in ("u", "delta", "A", "B", "C")]
    expected = selective_scan(*args, delta_softplus=True, backend="reference")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            y = selective_scan(*[a.requires_grad_() for a in args], delta_softplus=True)
        assert _scan_numba.numba.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # numba's OpenMP pool must not raise torch's
    finally:
        torch.set_num_threads(before)
    assert y.grad_fn is None
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    y16 = selective_scan(*(a.detach().bfloat16() for a in args), backend="numba")
    assert y16.dtype == torch.bfloat16
    y64 = selective_scan(*(a.detach().double() for a in args), backend="numba")
    assert y64.dtype == torch.float64


def test_numba_cache_dir_falls_back_when_install_is_read_only(monkeypatch, tmp_path):
    from usfm_core.models import _scan_numba

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(_scan_numba.os, "access", lambda *_a, **_k: False)
    _scan_numba._ensure_cache_dir()
    target = tmp_path / "usfm-core" / "numba"
    assert target.is_dir()
    assert _scan_numba.os.environ["NUMBA_CACHE_DIR"] == str(target)
    # An explicit setting always wins.
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere/else")
    _scan_numba._ensure_cache_dir()
    assert _scan_numba.os.environ["NUMBA_CACHE_DIR"] == "/somewhere/else"


def _forked_child_scan(queue) -> None:
    """In a forked child: which backend auto picks, and whether it gives the right result."""
    t = make_inputs(1, 4, 2, 20, groups=2, dtype=torch.float32)
    args = [t[k].detach() for k in ("u", "delta", "A", "B", "C")]
    y = selective_scan(*args, delta_softplus=True)
    ref = selective_scan(*args, delta_softplus=True, backend="reference")
    queue.put((resolve_backend("auto", "cpu", n_state=2), float((y - ref).abs().max())))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_forked_child_falls_back_to_torch_backend():
    """GNU OpenMP aborts a forked child that starts a parallel region its parent used; a child
    forked after the parent ran the numba kernel must use the torch backend instead.  (With
    more than one torch thread in the parent, torch's own OpenMP already hangs forked children
    on this machine, numba or not; fork-based workers should run one thread.)"""
    import multiprocessing

    torch.set_num_threads(1)  # the autouse fixture restores it for the next test
    t = make_inputs(1, 4, 2, 20, groups=2, dtype=torch.float32)
    selective_scan(*[t[k].detach() for k in ("u", "delta", "A", "B", "C")], backend="numba")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_forked_child_scan, args=(queue,), daemon=True)
    proc.start()
    proc.join(120)
    if proc.exitcode is None:  # never leave a hung child behind
        proc.kill()
        proc.join()
    assert proc.exitcode == 0
    backend, err = queue.get(timeout=5)
    assert backend == "torch" and err < 1e-5
    assert resolve_backend("auto", "cpu", n_state=2) == "numba"  # the parent keeps the kernel
