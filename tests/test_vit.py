"""Plain ViT: shapes, positional embeddings, masking, forward_visible, patchify."""

from __future__ import annotations

import pytest
import torch

from usfm_core.errors import ConfigError
from usfm_core.models.vit import ViT, ViTConfig, patchify, sincos_pos_embed_2d, unpatchify


@pytest.fixture(scope="module")
def vit() -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig.preset("vit-tiny-test")).eval()


@pytest.mark.parametrize(("h", "w"), [(64, 64), (48, 96), (128, 128)])
def test_output_shapes(vit: ViT, h: int, w: int) -> None:
    with torch.no_grad():
        out = vit(torch.randn(2, 3, h, w))
    gh, gw = h // 16, w // 16
    assert out.grid == (gh, gw)
    assert out.features[0].shape == (2, 64, gh, gw)
    assert out.patch_tokens.shape == (2, gh * gw, 64)
    assert out.tokens.shape == (2, 1 + gh * gw, 64)
    torch.testing.assert_close(out.global_token, out.patch_tokens.mean(1))
    torch.testing.assert_close(out.patch_tokens, out.features[0].flatten(2).transpose(1, 2))
    assert vit.stride == 16 and vit.embed_dim == 64 and vit.out_dims == [64]


def test_cls_token_variant() -> None:
    torch.manual_seed(0)
    model = ViT(ViTConfig.preset("vit-tiny-test", cls_token=True)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64))  # 1-channel input repeated
    assert out.tokens.shape == (1, 17, 64)
    assert not torch.allclose(out.global_token, out.patch_tokens.mean(1))
    assert model.forward_visible(torch.randn(1, 3, 64, 64), torch.tensor([[0, 5]])).shape == (
        1,
        2,
        64,
    )


def test_bad_inputs(vit: ViT) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        vit(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="channel"):
        vit(torch.randn(1, 2, 64, 64))
    with pytest.raises(ConfigError):
        ViTConfig(dim=66, heads=4)
    with pytest.raises(ConfigError, match="unknown ViT preset"):
        ViTConfig.preset("vit-h")


def test_preset_sizes() -> None:
    for name, want in [("vit-s", 22e6), ("vit-b", 86e6)]:
        with torch.device("meta"):
            model = ViT(ViTConfig.preset(name))
        assert abs(sum(p.numel() for p in model.parameters()) / want - 1) < 0.05


def test_config_round_trip() -> None:
    cfg = ViTConfig.preset("vit-s", in_chans=1)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown ViT config keys"):
        ViTConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_patchify_round_trip_and_layout() -> None:
    imgs = torch.randn(2, 3, 32, 48)
    p = patchify(imgs, 16)
    assert p.shape == (2, 6, 16 * 16 * 3)
    # Patch 4 is row 1, column 1; pixel order (py, px, c).
    torch.testing.assert_close(
        p[:, 4].view(2, 16, 16, 3), imgs[:, :, 16:32, 16:32].permute(0, 2, 3, 1)
    )
    torch.testing.assert_close(unpatchify(p, 16, (2, 3), 3), imgs)
    with pytest.raises(ValueError):
        unpatchify(p, 16, (3, 3), 3)


def test_positional_embedding_interpolation() -> None:
    pe = sincos_pos_embed_2d(64, (4, 4))
    assert pe.shape == (16, 64)
    assert torch.unique(pe, dim=0).shape[0] == 16  # every position distinct
    # On a grid twice as fine, every other position coincides with the reference grid.
    fine = sincos_pos_embed_2d(64, (8, 8), ref_grid=(4, 4)).view(8, 8, 64)
    torch.testing.assert_close(fine[::2, ::2].reshape(16, 64), pe)


def test_mask_token(vit: ViT) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = vit(x).tokens
        torch.testing.assert_close(
            vit(x, mask=torch.zeros(2, 4, 4, dtype=torch.bool)).tokens, plain
        )
        mask = torch.zeros(2, 4, 4, dtype=torch.bool)
        mask[1, 2, 3] = True
        masked = vit(x, mask=mask).tokens
        torch.testing.assert_close(vit(x, mask=mask.view(2, 16)).tokens, masked)
    torch.testing.assert_close(masked[0], plain[0])
    assert not torch.allclose(masked[1], plain[1])
    # The masked patch no longer depends on its pixels.
    x2 = x.clone()
    x2[1, :, 32:48, 48:64] = 5.0
    with torch.no_grad():
        torch.testing.assert_close(vit(x2, mask=mask).tokens, masked)
    vit.zero_grad()
    vit(x, mask=mask).tokens.sum().backward()
    assert vit.mask_token.grad.abs().sum() > 0
    vit.zero_grad()
    with pytest.raises(ValueError, match="mask must be"):
        vit(x, mask=torch.zeros(2, 3, 3, dtype=torch.bool))


def test_forward_visible(vit: ViT) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = vit(x).patch_tokens
        every = vit.forward_visible(x, torch.arange(16).expand(2, 16))
        torch.testing.assert_close(every, full)
        perm = torch.stack([torch.randperm(16), torch.randperm(16)])
        shuffled = vit.forward_visible(x, perm)
        torch.testing.assert_close(
            shuffled, torch.gather(full, 1, perm[..., None].expand(-1, -1, 64))
        )
        keep = perm[:, :4]
        part = vit.forward_visible(x, keep)
    assert part.shape == (2, 4, 64)
    assert not torch.allclose(part, shuffled[:, :4])  # less context → different tokens
    with pytest.raises(ValueError, match="out of range"):
        vit.forward_visible(x, torch.full((2, 3), 16))
