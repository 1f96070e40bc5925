"""VMamba backbone: shapes, input adaptation, presets, masking, init, gradients."""

from __future__ import annotations

import json

import pytest
import torch

import usfm_core.models.vmamba as vm
from usfm_core.errors import ConfigError
from usfm_core.models.attention import direction_orders
from usfm_core.models.vmamba import VMamba, VMambaConfig, cross_merge, cross_scan


@pytest.fixture(scope="module")
def tiny() -> VMamba:
    torch.manual_seed(0)
    return VMamba(VMambaConfig.preset("tiny")).eval()


def n_params(name: str) -> int:
    with torch.device("meta"):
        model = VMamba(VMambaConfig.preset(name))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("h", "w"), [(64, 64), (96, 96), (224, 224), (64, 128)])
def test_output_shapes(tiny: VMamba, h: int, w: int) -> None:
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        out = tiny(x)
    dims = tiny.out_dims
    assert [tuple(f.shape) for f in out.features] == [
        (2, dims[i], h // 4 // 2**i, w // 4 // 2**i) for i in range(4)
    ]
    gh, gw = h // 32, w // 32
    assert out.grid == (gh, gw)
    assert out.patch_tokens.shape == (2, gh * gw, tiny.embed_dim)
    assert out.tokens.shape == (2, 1 + gh * gw, tiny.embed_dim)
    # Patch tokens are the last map in row-major order; global = their average.
    torch.testing.assert_close(out.patch_tokens, out.features[-1].flatten(2).transpose(1, 2))
    torch.testing.assert_close(out.global_token, out.patch_tokens.mean(1))
    torch.testing.assert_close(out.tokens[:, 0], out.global_token)
    assert out.importance is None
    assert torch.isfinite(out.tokens).all()


def test_channel_adaptation(tiny: VMamba) -> None:
    gray = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a = tiny(gray).tokens
        b = tiny(gray.repeat(1, 3, 1, 1)).tokens
    torch.testing.assert_close(a, b)

    torch.manual_seed(1)
    mono = VMamba(VMambaConfig.preset("tiny", in_chans=1)).eval()
    rgb = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(mono(rgb).tokens, mono(rgb.mean(1, keepdim=True)).tokens)


@pytest.mark.parametrize("shape", [(1, 3, 65, 64), (1, 3, 64, 100), (1, 2, 64, 64), (3, 64, 64)])
def test_bad_inputs_raise(tiny: VMamba, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"multiple of 32|channel|expected images"):
        tiny(torch.randn(*shape))


def test_preset_parameter_counts() -> None:
    assert abs(n_params("vmamba-t") / 30e6 - 1) < 0.10
    assert abs(n_params("vmamba-s") / 50e6 - 1) < 0.10
    assert abs(n_params("vmamba-b") / 89e6 - 1) < 0.10
    assert 0.3e6 <= n_params("tiny") <= 1e6
    assert 3e6 <= n_params("small-cpu") <= 5e6
    assert 2e6 <= n_params("small-fast") <= 4e6


def test_small_fast_spends_its_blocks_where_the_scan_is_short() -> None:
    """The shipped backbone: one block at strides 4 and 8, ssm_ratio 1, and fewer FLOPs per
    256² image than small-cpu for about the same parameter count."""
    from torch.utils.flop_counter import FlopCounterMode

    fast, cpu = VMambaConfig.preset("small-fast"), VMambaConfig.preset("small-cpu")
    assert fast.depths[:2] == (1, 1) and fast.ssm_ratio == 1.0
    flops = {}
    for name, cfg in (("fast", fast), ("cpu", cpu)):
        model = VMamba(cfg).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, 256, 256))
        flops[name] = counter.get_total_flops()
    assert flops["fast"] < 0.8 * flops["cpu"]


def test_config_round_trip_and_errors() -> None:
    cfg = VMambaConfig.preset("vmamba-s", in_chans=1)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert VMambaConfig.from_dict(data) == cfg
    assert cfg.stage_dims == [96, 192, 384, 768]
    assert VMambaConfig(dims=[8, 16, 24, 32]).stage_dims == [8, 16, 24, 32]
    with pytest.raises(ConfigError, match="unknown VMamba preset"):
        VMambaConfig.preset("huge")
    with pytest.raises(ConfigError, match="unknown VMamba config keys"):
        VMambaConfig.from_dict({**data, "colour": 1})
    with pytest.raises(ConfigError, match="in_chans"):
        VMambaConfig(in_chans=2)
    with pytest.raises(ConfigError, match="depths"):
        VMambaConfig(depths=(1, 1, 1))


def test_cross_scan_orders_and_merge() -> None:
    x = torch.randn(2, 3, 4, 5)
    xs = cross_scan(x)
    flat = x.flatten(2)
    for k, order in enumerate(direction_orders(4, 5)):
        torch.testing.assert_close(xs[:, k], flat[:, :, order])
    # Each direction re-aligned to row-major: merging the unchanged scan gives 4·x.
    torch.testing.assert_close(cross_merge(xs, 4, 5), 4 * flat)


def test_mamba_init(tiny: VMamba) -> None:
    ss2d = tiny.get_ss2d(0, 0)
    n = ss2d.d_state
    torch.testing.assert_close(
        ss2d.A_log, torch.log(torch.arange(1, n + 1.0)).expand_as(ss2d.A_log)
    )
    assert torch.all(ss2d.Ds == 1)
    dt = torch.nn.functional.softplus(ss2d.dt_proj_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert ss2d.dt_rank == 1  # ceil(16 / 16)


def test_mask_replaces_patch_embeddings(tiny: VMamba) -> None:
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)  # last-stage grid (64 / 32)
    mask[0, 0, 1] = True
    emb = tiny.stem(x)  # (B, 16, 16, C0)
    masked = tiny.apply_mask(emb, mask)
    replaced = (masked != emb).any(-1)
    expected = torch.zeros(2, 16, 16, dtype=torch.bool)
    expected[0, :8, 8:] = True  # one 32-px cell = 8×8 patch-embedding cells
    assert torch.equal(replaced, expected)
    torch.testing.assert_close(masked[0, 3, 12], tiny.mask_token)
    # The same mask on the patch-embedding grid itself.
    assert torch.equal(tiny.apply_mask(emb, expected), masked)
    with pytest.raises(ValueError, match="does not tile"):
        tiny.apply_mask(emb, torch.zeros(2, 3, 3, dtype=torch.bool))


def test_masked_forward(tiny: VMamba) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = tiny(x).tokens
        none_masked = tiny(x, mask=torch.zeros(2, 2, 2, dtype=torch.bool)).tokens
        mask = torch.zeros(2, 2, 2, dtype=torch.bool)
        mask[1, 1, 1] = True
        masked = tiny(x, mask=mask).tokens
    torch.testing.assert_close(none_masked, plain)
    torch.testing.assert_close(masked[0], plain[0])  # image 0 has no masked cell
    assert not torch.allclose(masked[1], plain[1])

    tiny.zero_grad()
    tiny(x, mask=mask).tokens.square().mean().backward()
    assert tiny.mask_token.grad is not None and tiny.mask_token.grad.abs().sum() > 0
    tiny.zero_grad()


def test_training_step_gradients() -> None:
    torch.manual_seed(0)
    model = VMamba(VMambaConfig.preset("tiny", drop_path_rate=0.5)).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out.global_token.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n != "mask_token"}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert model.get_ss2d(-1, -1).A_log.grad.abs().sum() > 0
    # Drop-path makes training forwards stochastic; eval is deterministic.
    with torch.no_grad():
        outs = [model(x).global_token for _ in range(3)]
        assert any(not torch.allclose(outs[0], o) for o in outs[1:])
        model.eval()
        torch.testing.assert_close(model(x).global_token, model(x).global_token)


def test_importance_output(tiny: VMamba) -> None:
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = tiny(x, return_attention=True)
        plain = tiny(x)
    assert out.importance.shape == (2, 2, 3)
    flat = out.importance.flatten(1)
    torch.testing.assert_close(flat.amin(1), torch.zeros(2))
    torch.testing.assert_close(flat.amax(1), torch.ones(2))
    torch.testing.assert_close(out.tokens, plain.tokens)  # recording changes nothing
    assert tiny.get_ss2d()._record is None  # nothing kept after forward

    torch.manual_seed(0)
    early = VMamba(VMambaConfig.preset("tiny", attention_stage=1, attention_block=0)).eval()
    with torch.no_grad():
        assert early(x, return_attention=True).importance.shape == (2, 8, 12)
    with pytest.raises(ValueError, match="no block"):
        tiny.get_ss2d(0, 5)


def _native_channel_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """torch's own LayerNorm over the channels of (B, C, H, W) → (B, H, W, C)."""
    return torch.nn.functional.layer_norm(
        x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps
    )


@pytest.mark.parametrize("channels", [3, 8, 16])
def test_channel_norm_matches_layer_norm(channels: int) -> None:
    """Below SMALL_NORM_CHANNELS the norm runs channels-first (its own backward); both paths
    give torch's LayerNorm values and gradients (float64, so rounding cannot hide a bug)."""
    torch.manual_seed(channels)
    m = vm.ChannelsLastNorm(channels, 1e-5).double()
    with torch.no_grad():
        m.norm.weight.normal_()
        m.norm.bias.normal_()
    x = (3 * torch.randn(2, channels, 5, 6, dtype=torch.float64) + 1).requires_grad_()
    g = torch.randn(2, 5, 6, channels, dtype=torch.float64)
    got = m(x)
    assert got.shape == (2, 5, 6, channels)
    got_grads = torch.autograd.grad(got, (x, m.norm.weight, m.norm.bias), g)
    want = _native_channel_norm(m.norm, x)
    want_grads = torch.autograd.grad(want, (x, m.norm.weight, m.norm.bias), g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_channels_first_norm_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: vm._ChannelsFirstNorm.apply(x, w, b, 1e-5), (x, w, b)
    )


def test_channel_norm_float32_and_autocast_paths() -> None:
    """float32 (the channels-first path) agrees with torch's LayerNorm to float32 rounding, and
    under bf16 autocast the module falls back to torch's LayerNorm."""
    torch.manual_seed(1)
    m = vm.ChannelsLastNorm(8, 1e-5)
    x = torch.randn(4, 8, 16, 16)
    torch.testing.assert_close(m(x), _native_channel_norm(m.norm, x), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
        want = m.norm(x.bfloat16().permute(0, 2, 3, 1))
    assert y.dtype == want.dtype
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize(("size", "dim", "out_dim"), [(8, 128, 256), (16, 16, 48)])
def test_downsample_input_layout_does_not_change_results(size: int, dim: int, out_dim: int) -> None:
    """Downsample copies the map channels-first when its weight is the larger tensor (first
    case) and keeps channels-last strides otherwise (second); either way it computes the
    convolution of the map, checked against conv2d on a plain NCHW copy in float64."""
    torch.manual_seed(size)
    ds = vm.Downsample(dim, out_dim, 1e-5).double()
    x = torch.randn(2, size, size, dim, dtype=torch.float64, requires_grad=True)
    got = ds(x)
    conv = torch.nn.functional.conv2d(
        x.permute(0, 3, 1, 2).contiguous(), ds.conv.weight, ds.conv.bias, stride=2, padding=1
    )
    want = _native_channel_norm(ds.norm.norm, conv)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad(got, x, g)
    (wx,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-10)
