"""MultiCropTransform / PretrainDataset / loader: shapes, determinism, region-aware crops."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from usfm_core.data.catalog import DatasetCatalog
from usfm_core.data.datasets import PretrainDataset, collate_multicrop, make_pretrain_loader
from usfm_core.data.views import MultiCropConfig, MultiCropTransform, sample_crop_box
from usfm_core.errors import ConfigError

# No photometric change at all: isolates geometry.
PLAIN = {
    "jitter_p": 0.0,
    "gamma_p": 0.0,
    "global_blur_p": (0.0,),
    "local_blur_p": 0.0,
    "speckle_p": 0.0,
    "hflip_p": 0.0,
}


def fan(size: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A sector-shaped scan region (apex at the top) with speckle inside, black outside."""
    yy, xx = np.mgrid[0:size, 0:size]
    angle = np.degrees(np.arctan2(xx - size / 2, yy + 4))
    region = (np.abs(angle) < 30) & (np.hypot(xx - size / 2, yy + 4) < size - 4)
    rng = np.random.default_rng(seed)
    image = (rng.gamma(2.0, 40.0, (size, size)).clip(1, 255) * region).astype(np.uint8)
    return image, region


def box_fraction(region: np.ndarray, box) -> float:
    x0, y0, w, h = (int(v) for v in box[:4])
    return float(region[y0 : y0 + h, x0 : x0 + w].mean())


def test_default_config_shapes_and_dtypes() -> None:
    image, region = fan(256)
    out = MultiCropTransform(MultiCropConfig())(image, region, np.random.default_rng(0))
    assert out["global_views"].shape == (2, 1, 224, 224)
    assert out["local_views"].shape == (8, 1, 96, 96)
    assert out["global_views"].dtype == torch.float32
    assert out["global_regions"].shape == (2, 224, 224)
    assert out["local_regions"].shape == (8, 96, 96)
    assert out["global_regions"].dtype == torch.bool
    assert out["global_boxes"].shape == (2, 5) and out["local_boxes"].shape == (8, 5)
    assert torch.isfinite(out["global_views"]).all()


def test_tiny_three_channel_views_are_replicated_gray() -> None:
    cfg = MultiCropConfig.tiny(in_chans=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))
    image, region = fan()
    out = MultiCropTransform(cfg)(image, region, np.random.default_rng(1))
    g = out["global_views"]
    assert g.shape == (2, 3, 64, 64) and out["local_views"].shape == (4, 3, 32, 32)
    # Undoing the per-channel normalisation gives the same gray image in every channel.
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    raw = g * std + mean
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-6)
    assert torch.allclose(raw[:, 0], raw[:, 2], atol=1e-6)


def test_same_rng_seed_gives_identical_views_and_other_seeds_differ() -> None:
    image, region = fan()
    t = MultiCropTransform(MultiCropConfig.tiny(speckle_p=0.5))
    a = t(image, region, np.random.default_rng(7))
    b = t(image, region, np.random.default_rng(7))
    c = t(image, region, np.random.default_rng(8))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["global_views"], c["global_views"])


@pytest.mark.parametrize("seed", range(6))
def test_crops_keep_at_least_the_region_fraction(seed: int) -> None:
    image, region = fan(200, seed)
    cfg = MultiCropConfig.tiny(n_local=8, min_region_fraction=0.6)
    out = MultiCropTransform(cfg)(image, region, np.random.default_rng(seed))
    for key in ("global_boxes", "local_boxes"):
        for box in out[key].numpy():
            assert box_fraction(region, box) >= 0.6
    # The returned region views are the crops of the region: mostly True as well.
    assert out["global_regions"].float().mean() > 0.55


def test_crops_on_simulated_sector_frames_stay_in_the_fan() -> None:
    sim = pytest.importorskip("usfm_core.sim")
    if not hasattr(sim, "simulate_frame"):
        pytest.skip("usfm_core.sim.simulate_frame not available")
    frame = sim.simulate_frame(seed=3, geometry="sector")
    image = np.asarray(frame.image)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    region = np.asarray(frame.region_mask, bool)
    cfg = MultiCropConfig.tiny(n_local=8)
    for seed in range(4):
        out = MultiCropTransform(cfg)(image, region, np.random.default_rng(seed))
        for key in ("global_boxes", "local_boxes"):
            for box in out[key].numpy():
                assert box_fraction(region, box) >= cfg.min_region_fraction


def test_without_the_constraint_crops_often_fall_outside() -> None:
    # Sanity check of the test above: the fan covers ~1/3 of the image, so unconstrained
    # local crops frequently hold mostly background.
    image, region = fan(200)
    cfg = MultiCropConfig.tiny(n_local=8, min_region_fraction=0.0)
    fractions = []
    for seed in range(6):
        out = MultiCropTransform(cfg)(image, region, np.random.default_rng(seed))
        fractions += [box_fraction(region, b) for b in out["local_boxes"].numpy()]
    assert min(fractions) < 0.6


def test_crop_falls_back_to_region_bbox_when_no_crop_qualifies() -> None:
    region = np.zeros((100, 120), bool)
    region[np.arange(20, 80), np.arange(30, 90)] = True  # a thin diagonal line
    box = sample_crop_box(region, (0.3, 0.5), (0.75, 1.33), 0.5, 5, np.random.default_rng(0))
    assert box == (30, 20, 60, 60)


def test_empty_region_puts_no_constraint() -> None:
    image, _ = fan()
    region = np.zeros_like(image, dtype=bool)
    out = MultiCropTransform(MultiCropConfig.tiny())(image, region, np.random.default_rng(0))
    assert not out["global_regions"].any()
    assert out["global_views"].shape == (2, 1, 64, 64)


def full_view_config(**overrides) -> MultiCropConfig:
    settings = {
        **PLAIN,
        "global_scale": (1.0, 1.0),
        "aspect_ratio": (1.0, 1.0),
        "n_local": 0,
        "min_region_fraction": 0.0,  # the fan is ~1/3 of the image: keep the full frame
        "mean": (0.0,),
        "std": (1.0,),
    }
    settings.update(overrides)
    return MultiCropConfig.tiny(**settings)


def test_full_crop_equals_resized_image_and_hflip_mirrors_it() -> None:
    image, region = fan(128)
    expected = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA) / 255.0
    plain = MultiCropTransform(full_view_config())(image, region, np.random.default_rng(0))
    view = plain["global_views"][0, 0].numpy()
    np.testing.assert_allclose(view, expected, atol=1e-6)
    assert plain["global_boxes"][0].tolist() == [0, 0, 128, 128, 0]

    flipped = MultiCropTransform(full_view_config(hflip_p=1.0))(
        image, region, np.random.default_rng(0)
    )
    np.testing.assert_allclose(flipped["global_views"][0, 0].numpy(), expected[:, ::-1], atol=1e-6)
    assert flipped["global_boxes"][0, 4] == 1
    reg = cv2.resize(region.astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(flipped["global_regions"][0].numpy(), reg[:, ::-1].astype(bool))


def test_photometric_jitter_blur_and_gamma_change_pixels() -> None:
    image, region = fan(128)
    rng = np.random.default_rng
    base = MultiCropTransform(full_view_config())(image, region, rng(0))["global_views"][0, 0]

    jit = MultiCropTransform(full_view_config(jitter_p=1.0))(image, region, rng(0))
    assert not torch.allclose(jit["global_views"][0, 0], base, atol=1e-3)

    gamma = MultiCropTransform(full_view_config(gamma_p=1.0, gamma=(2.0, 2.0)))
    g = gamma(image, region, rng(0))["global_views"][0, 0]
    assert torch.allclose(g, base**2, atol=1e-5)

    blur = MultiCropTransform(full_view_config(global_blur_p=(1.0,), blur_sigma=(2.0, 2.0)))
    b = blur(image, region, rng(0))["global_views"][0, 0]

    def roughness(x: torch.Tensor) -> float:
        return float((x[:, 1:] - x[:, :-1]).abs().mean())

    assert roughness(b) < 0.7 * roughness(base)
    assert abs(float(b.mean()) - float(base.mean())) < 0.02  # blur keeps brightness


def test_config_validation_and_list_coercion() -> None:
    MultiCropConfig.tiny()  # 64 / 32 allowed
    with pytest.raises(ConfigError, match="multiple of 32"):
        MultiCropConfig(global_size=100)
    with pytest.raises(ConfigError, match="in_chans"):
        MultiCropConfig(in_chans=2)
    with pytest.raises(ConfigError, match="min_region_fraction"):
        MultiCropConfig(min_region_fraction=1.5)
    cfg = MultiCropConfig(global_scale=[0.2, 0.9])
    assert cfg.global_scale == (0.2, 0.9)


def test_bad_inputs_raise_clear_errors() -> None:
    image, region = fan()
    t = MultiCropTransform(MultiCropConfig.tiny())
    with pytest.raises(ValueError, match="uint8"):
        t(np.stack([image] * 3, -1), region, np.random.default_rng(0))
    with pytest.raises(ValueError, match="region shape"):
        t(image, region[:10], np.random.default_rng(0))


# ---------------------------------------------------------------------- dataset and loader
@pytest.fixture
def small_catalog(tmp_path: Path) -> DatasetCatalog:
    for k, (name, n) in enumerate((("a", 7), ("b", 3))):
        for i in range(n):
            image, _ = fan(96, seed=10 * k + i)
            path = tmp_path / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), image)
    return DatasetCatalog.from_folder(tmp_path)


def test_dataset_items_are_reproducible_per_seed_epoch_index(small_catalog) -> None:
    cfg = MultiCropConfig.tiny()
    ds = PretrainDataset(small_catalog, MultiCropTransform(cfg), seed=5)
    item = ds[3]
    assert item["index"] == 3 and item["dataset"] == small_catalog[3].dataset
    again = PretrainDataset(small_catalog, MultiCropTransform(cfg), seed=5)[3]
    assert torch.equal(item["global_views"], again["global_views"])
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["global_views"], item["global_views"])


def test_collate_stacks_to_batch_shapes(small_catalog) -> None:
    ds = PretrainDataset(small_catalog, MultiCropTransform(MultiCropConfig.tiny()))
    batch = collate_multicrop([ds[0], ds[8], ds[2]])
    assert batch["global_views"].shape == (3, 2, 1, 64, 64)
    assert batch["local_views"].shape == (3, 4, 1, 32, 32)
    assert batch["global_regions"].shape == (3, 2, 64, 64)
    assert batch["local_regions"].shape == (3, 4, 32, 32)
    assert batch["index"].tolist() == [0, 8, 2] and batch["index"].dtype == torch.int64
    assert batch["dataset"] == [small_catalog[i].dataset for i in (0, 8, 2)]
    with pytest.raises(ValueError):
        collate_multicrop([])


def test_loader_resume_mid_epoch_gives_identical_remaining_batches(small_catalog) -> None:
    cfg = MultiCropConfig.tiny(n_local=2)
    args = {"batch_size": 2, "workers": 0, "seed": 3, "epoch": 2}
    full = list(make_pretrain_loader(small_catalog, cfg, **args, cap=5))
    # cap 5: 5 from "a" (7 images), 3 from "b" -> 8 samples, 4 batches
    assert len(full) == 4
    assert sum(len(b["index"]) for b in full) == 8
    resumed = list(make_pretrain_loader(small_catalog, cfg, **args, cap=5, start_index=4))
    assert len(resumed) == 2
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["global_views"], b["global_views"])
        assert torch.equal(a["local_views"], b["local_views"])


def test_loader_ranks_split_the_epoch(small_catalog) -> None:
    cfg = MultiCropConfig.tiny(n_local=0)
    seen = []
    for rank in range(2):
        loader = make_pretrain_loader(
            small_catalog, cfg, batch_size=4, seed=0, rank=rank, world_size=2
        )
        seen.append([i for b in loader for i in b["index"].tolist()])
    assert len(seen[0]) == len(seen[1]) == 5
    assert sorted(seen[0] + seen[1]) == list(range(10))


def test_loader_with_workers_matches_single_process(small_catalog) -> None:
    cfg = MultiCropConfig.tiny(n_local=1)
    one = list(make_pretrain_loader(small_catalog, cfg, batch_size=5, workers=0, seed=1))
    two = list(make_pretrain_loader(small_catalog, cfg, batch_size=5, workers=2, seed=1))
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["global_views"], b["global_views"])


def test_real_images_produce_finite_views(shared_data: Path) -> None:
    cat = DatasetCatalog.from_folder(shared_data)
    ds = PretrainDataset(cat, MultiCropTransform(MultiCropConfig.tiny()))
    for name, idx in cat.datasets.items():
        item = ds[idx[0]]
        assert item["dataset"] == name
        assert torch.isfinite(item["global_views"]).all()
        assert item["global_views"].std() > 0.05  # real texture, not a blank crop


def test_vertical_flip_and_rotation_move_view_and_region_together() -> None:
    image, region = fan(128)
    rng = np.random.default_rng
    base = MultiCropTransform(full_view_config())(image, region, rng(0))
    vflip = MultiCropTransform(full_view_config(vflip_p=1.0))(image, region, rng(0))
    np.testing.assert_allclose(
        vflip["global_views"][0, 0].numpy(), base["global_views"][0, 0].numpy()[::-1], atol=1e-6
    )
    np.testing.assert_array_equal(
        vflip["global_regions"][0].numpy(), base["global_regions"][0].numpy()[::-1]
    )
    # A quarter turn of a square view is np.rot90 (counter-clockwise), pixels and region alike.
    rot = MultiCropTransform(full_view_config(rotate_p=1.0, rotate_degrees=(90.0, 90.0)))
    out = rot(image, region, rng(0))
    np.testing.assert_allclose(
        out["global_views"][0, 0].numpy(), np.rot90(base["global_views"][0, 0].numpy()), atol=1e-5
    )
    np.testing.assert_array_equal(
        out["global_regions"][0].numpy(), np.rot90(base["global_regions"][0].numpy())
    )
    with pytest.raises(ConfigError, match="rotate_p"):
        MultiCropConfig(rotate_p=1.5)
