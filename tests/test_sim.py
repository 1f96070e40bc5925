"""Tests of the B-mode phantom simulator (usfm_core.sim) and ``usfm-core simulate``."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest

from usfm_core.cli import main
from usfm_core.errors import ConfigError, USFMError
from usfm_core.sim import SimConfig, export_cine, export_frame, simulate_cine, simulate_frame

SMALL = {"height": 128, "width": 128}


def _ring(mask: np.ndarray, all_lesions: np.ndarray, region: np.ndarray, px: int) -> np.ndarray:
    """Pixels within ``px`` of ``mask`` that are in the region and in no lesion."""
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * px + 1,) * 2, np.uint8)) > 0
    near_lesions = cv2.dilate(all_lesions.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return grown & ~near_lesions & region


def _lesion_contrasts(frame) -> list[float]:
    """Mean clean intensity inside each lesion over the mean of a ring around it."""
    img = frame.clean_image.astype(np.float64)
    out = []
    for label in range(1, int(frame.lesion_mask.max()) + 1):
        inside = frame.lesion_mask == label
        ring = _ring(inside, frame.lesion_mask > 0, frame.region_mask, 5)
        out.append(img[inside].mean() / img[ring].mean())
    return out


# --- determinism, shapes ------------------------------------------------------------------


def test_same_seed_same_frame_and_different_seeds_differ():
    a = simulate_frame(seed=5, text=True, calipers=True, **SMALL)
    b = simulate_frame(SimConfig(seed=5, text=True, calipers=True, **SMALL))
    c = simulate_frame(seed=6, text=True, calipers=True, **SMALL)
    for name in ("image", "clean_image", "lesion_mask", "annotation_mask", "region_mask"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.meta["seed"] == 5
    region = a.region_mask
    assert np.mean(a.clean_image[region] != c.clean_image[region]) > 0.5


def test_unseeded_frames_record_their_seed():
    a = simulate_frame(**SMALL)
    again = simulate_frame(seed=a.meta["seed"], **SMALL)
    assert np.array_equal(a.image, again.image)


@pytest.mark.parametrize("geometry", ["sector", "linear"])
def test_shapes_and_dtypes(geometry):
    f = simulate_frame(seed=1, geometry=geometry, height=96, width=160)
    assert f.image.shape == (96, 160) and f.image.dtype == np.uint8
    assert f.clean_image.shape == f.image.shape and f.clean_image.dtype == np.uint8
    assert f.region_mask.dtype == bool and f.region_mask.shape == (96, 160)
    assert f.lesion_mask.dtype == np.uint8 and f.lesion_mask.shape == (96, 160)
    for name in ("annotation_mask", "text_mask", "caliper_mask", "overlay_mask"):
        mask = getattr(f, name)
        assert mask.dtype == bool and mask.shape == (96, 160)
        assert not mask.any(), "no annotations were asked for"
    assert np.array_equal(f.image, f.clean_image)
    dy, dx = f.spacing_mm
    assert dy == pytest.approx(dx) and dy > 0
    # The 60 mm field of view fits in the frame: depth / pixel size ≤ height.
    assert 60.0 / dy <= 96


def test_colour_overlay_makes_rgb():
    f = simulate_frame(seed=2, colour_overlay=True, **SMALL)
    assert f.image.shape == (128, 128, 3) and f.clean_image.shape == (128, 128, 3)
    clean = f.clean_image
    assert np.array_equal(clean[..., 0], clean[..., 1]) and np.array_equal(
        clean[..., 0], clean[..., 2]
    )
    # Overlay pixels that differ from the clean frame are coloured, except the gray ROI outline.
    changed = (f.image != clean).any(axis=2)
    coloured = (f.image[..., 0] != f.image[..., 2]) & changed
    assert coloured.sum() > 50
    assert (coloured & ~f.overlay_mask).sum() == 0


# --- ground-truth masks ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 3])
def test_annotation_masks_are_exact(seed):
    f = simulate_frame(
        seed=seed, text=True, calipers=True, colour_overlay=True, geometry="sector", **SMALL
    )
    differs = (f.image != f.clean_image).any(axis=2)
    assert not (differs & ~f.annotation_mask).any(), "pixels changed outside the masks"
    # Inside the masks almost every pixel changed (an ink can equal the pixel beneath).
    assert differs[f.annotation_mask].mean() > 0.97
    assert np.array_equal(f.annotation_mask, f.text_mask | f.caliper_mask | f.overlay_mask)
    assert f.text_mask.sum() > 100 and f.caliper_mask.sum() > 10 and f.overlay_mask.sum() > 50
    # Text sits mostly outside the fan, calipers inside it.
    assert (f.text_mask & ~f.region_mask).sum() / f.text_mask.sum() > 0.8
    assert (f.caliper_mask & f.region_mask).sum() / f.caliper_mask.sum() > 0.95


def test_calipers_measure_the_largest_lesion():
    f = simulate_frame(seed=4, calipers=True, text=True, n_lesions=1, height=256, width=256)
    (a, b), _ = f.meta["calipers_px"]
    for x, y in (a, b):
        assert f.lesion_mask[y, x] == 1
    length_cm = np.hypot(a[0] - b[0], a[1] - b[1]) * f.spacing_mm[0] / 10
    assert f.meta["caliper_lengths_cm"][0] == pytest.approx(length_cm)
    assert f"L {length_cm:.2f}cm" in f.meta["text"]


@pytest.mark.parametrize(
    ("kind", "check"),
    [("hypo", lambda r: r < 0.8), ("hyper", lambda r: r > 1.0)],
)
def test_lesions_darker_or_brighter_than_surroundings(kind, check):
    ratios = []
    for seed in range(4):
        f = simulate_frame(
            seed=seed, lesion_kind=kind, geometry=("sector", "linear")[seed % 2], **SMALL
        )
        assert f.lesion_mask.max() >= 1
        assert not (f.lesion_mask > 0)[~f.region_mask].any()
        ratios += _lesion_contrasts(f)
    assert all(check(r) for r in ratios), ratios
    if kind == "hyper":
        assert np.mean(ratios) > 1.15


def test_lesion_count_range_and_labels():
    f = simulate_frame(seed=7, n_lesions=(3, 3), lesion_radius_mm=(3.0, 4.0), **SMALL)
    assert set(np.unique(f.lesion_mask)) == {0, 1, 2, 3}
    assert f.meta["n_lesions"] == 3
    empty = simulate_frame(seed=7, n_lesions=0, **SMALL)
    assert not empty.lesion_mask.any() and empty.meta["n_lesions"] == 0


def test_sector_region_is_a_fan_and_black_outside():
    f = simulate_frame(seed=1, geometry="sector", **SMALL)
    region = f.region_mask
    assert not f.image[~region].any()
    rows = np.nonzero(region.any(axis=1))[0]
    widths = region[rows].sum(axis=1)
    # Fan: it widens with depth (through the top two thirds) and is centred.
    top = widths[: 2 * len(widths) // 3]
    assert np.all(np.diff(top) >= -1) and widths[len(widths) // 2] > 2 * widths[0]
    cols = np.nonzero(region[rows[len(rows) // 2]])[0]
    assert abs((cols[0] + cols[-1]) / 2 - 63.5) <= 1
    # Top corners are outside the fan (room for labels), the centre is inside.
    assert not region[:20, :20].any() and not region[:20, -20:].any()
    assert region[64, 64]


def test_linear_region_is_a_rectangle():
    f = simulate_frame(seed=1, geometry="linear", **SMALL)
    ys, xs = np.nonzero(f.region_mask)
    box = np.zeros_like(f.region_mask)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    assert np.array_equal(box, f.region_mask)
    assert not f.image[~f.region_mask].any()


def test_attenuation_and_tgc():
    """Without TGC the deep half is much darker; full TGC evens the brightness out."""

    def depth_ratio(comp: float) -> float:
        f = simulate_frame(seed=3, tgc_compensation=comp, tgc_jitter_db=0, n_lesions=0, **SMALL)
        rows = np.nonzero(f.region_mask.any(axis=1))[0]
        mid = rows[len(rows) // 2]
        img, reg = f.clean_image.astype(float), f.region_mask.copy()
        reg[: rows[0] + 8] = False  # skip the bright skin line
        upper, lower = reg.copy(), reg.copy()
        upper[mid:], lower[:mid] = False, False
        return img[lower].mean() / img[upper].mean()

    assert depth_ratio(0.0) < 0.6
    assert 0.8 < depth_ratio(1.0) < 1.25


def _below(mask: np.ndarray, region: np.ndarray, lesions: np.ndarray) -> np.ndarray:
    """Region pixels under ``mask`` (same columns, below its lowest row), outside lesions."""
    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask)
    out[ys.max() + 3 :, xs.min() + 2 : xs.max() - 1] = True
    return out & region & (lesions == 0)


@pytest.mark.parametrize(("kind", "sign"), [("cyst", 1), ("hyper", -1)])
def test_posterior_enhancement_and_shadowing(kind, sign):
    """Cysts brighten what lies behind them, echogenic lesions shadow it."""
    settings = dict(n_lesions=1, geometry="linear", depth_mm=40, **SMALL)
    lesion_kind = "hypo" if kind == "cyst" else "hyper"
    seed = next(
        s
        for s in range(20)
        if simulate_frame(seed=s, lesion_kind=lesion_kind, **settings).meta["lesion_kinds"]
        == [kind]
    )
    on = simulate_frame(seed=seed, lesion_kind=lesion_kind, **settings)
    off = simulate_frame(seed=seed, lesion_kind=lesion_kind, posterior_effects=False, **settings)
    assert np.array_equal(on.lesion_mask, off.lesion_mask)
    below = _below(on.lesion_mask == 1, on.region_mask, on.lesion_mask)
    diff = on.clean_image[below].mean() - off.clean_image[below].mean()
    assert sign * diff > 3, diff


def test_sparse_scatterers_give_grainier_speckle():
    def contrast(density: float) -> float:
        f = simulate_frame(seed=2, scatterer_density=density, n_lesions=0, n_layers=0, **SMALL)
        vals = f.clean_image[f.region_mask].astype(float)
        return vals.std() / vals.mean()

    assert contrast(0.2) > 1.1 * contrast(20.0)


def test_frame_speed_sanity():
    simulate_frame(seed=0)  # warm-up (imports, caches)
    t0 = time.perf_counter()
    simulate_frame(seed=1, text=True, calipers=True)
    assert time.perf_counter() - t0 < 1.0  # loose bound; typical is ~0.1 s


# --- cines --------------------------------------------------------------------------------


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean(), xs.mean()])


def test_cine_shapes_and_first_frame_matches_simulate_frame():
    cine = simulate_cine(4, seed=11, motion="breathing", text=True, **SMALL)
    assert cine.frames.shape == (4, 128, 128) and cine.frames.dtype == np.uint8
    assert cine.clean_frames.shape == cine.frames.shape
    assert cine.lesion_masks.shape == (4, 128, 128) and cine.lesion_masks.dtype == np.uint8
    assert cine.annotation_masks.shape == (4, 128, 128) and cine.annotation_masks.dtype == bool
    assert cine.region_mask.shape == (128, 128) and cine.fps == 20.0
    frame = simulate_frame(seed=11, text=True, **SMALL)
    assert np.array_equal(cine.frames[0], frame.image)
    assert np.array_equal(cine.lesion_masks[0], frame.lesion_mask)
    # Burned-in annotations stay put on screen.
    assert all(np.array_equal(m, cine.annotation_masks[0]) for m in cine.annotation_masks)


@pytest.mark.parametrize("motion", ["breathing", "probe"])
def test_cine_lesions_move_smoothly_with_the_tissue(motion):
    cine = simulate_cine(
        8, seed=1, motion=motion, n_lesions=1, motion_amplitude_mm=4.0, fps=10.0, **SMALL
    )
    masks = cine.lesion_masks == 1
    areas = masks.sum(axis=(1, 2))
    assert areas.min() > 0.85 * areas[0] and areas.max() < 1.15 * areas[0]
    shift = _centroid(masks[-1]) - _centroid(masks[0])
    assert np.hypot(*shift) > 1.5  # the lesion moved ...
    steps = [np.hypot(*(_centroid(masks[i + 1]) - _centroid(masks[i]))) for i in range(7)]
    assert max(steps) < 0.6 * np.hypot(*shift) + 1  # ... smoothly, not in one jump

    # The echo moves with the mask: block-match the lesion neighbourhood between frames.
    y, x = np.round(_centroid(masks[0])).astype(int)
    h = 14
    y0, x0 = max(y - h, 0), max(x - h, 0)
    patch = cine.clean_frames[0, y0 : y + h, x0 : x + h].astype(np.float32)
    score = cv2.matchTemplate(cine.clean_frames[-1].astype(np.float32), patch, cv2.TM_CCOEFF_NORMED)
    _, best, _, (bx, by) = cv2.minMaxLoc(score)
    echo_shift = np.array([by - y0, bx - x0])
    assert best > 0.5
    assert np.hypot(*(echo_shift - shift)) < 1.5, (echo_shift, shift)

    # Consecutive frames are more alike than the first and the last.
    frames = cine.clean_frames.astype(np.float64)[:, cine.region_mask]
    consecutive = min(np.corrcoef(frames[i], frames[i + 1])[0, 1] for i in range(7))
    assert consecutive > np.corrcoef(frames[0], frames[-1])[0, 1]


def test_cine_without_motion_keeps_masks_and_tissue():
    cine = simulate_cine(3, seed=2, motion="none", **SMALL)
    assert all(np.array_equal(m, cine.lesion_masks[0]) for m in cine.lesion_masks)
    # Only electronic noise changes between frames.
    diff = np.abs(cine.clean_frames[1].astype(int) - cine.clean_frames[0].astype(int))
    assert diff[cine.region_mask].mean() < 3


# --- config errors --------------------------------------------------------------------------


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="geometry"):
        SimConfig(geometry="polar")
    with pytest.raises(ConfigError, match="n_lesions"):
        SimConfig(n_lesions=(3, 1))
    with pytest.raises(ConfigError, match="unknown simulator setting"):
        simulate_frame(seed=0, colour=True)
    with pytest.raises(ConfigError, match="motion"):
        simulate_cine(2, seed=0, motion="wiggle", **SMALL)
    with pytest.raises(ConfigError, match="n_frames"):
        simulate_cine(0, seed=0)
    assert SimConfig(n_lesions=2).n_lesions == (2, 2)


# --- export and CLI ---------------------------------------------------------------------------


def _load_scan():
    try:
        from usfm_core.io import load_scan
    except ImportError:
        try:
            from usfm_core.io.readers import load_scan
        except ImportError:
            pytest.skip("usfm_core.io.load_scan is not available yet")
    return load_scan


@pytest.mark.parametrize("fmt", ["dicom", "tiff", "video"])
def test_export_cine_round_trip(tmp_path, fmt):
    import tifffile

    load_scan = _load_scan()
    cine = simulate_cine(3, seed=4, text=True, calipers=True, fps=15.0, **SMALL)
    paths = export_cine(cine, tmp_path / "cine", format=fmt)
    with load_scan(paths["scan"]) as scan:
        assert scan.shape == (3, 128, 128)
        frames = np.stack(list(scan.iter_frames()))
        assert scan.fps == pytest.approx(15.0)
    if fmt == "video":  # lossy
        assert np.abs(frames.astype(int) - cine.frames).mean() < 12
    else:
        assert np.array_equal(frames, cine.frames)
        assert scan.spacing_mm == pytest.approx(cine.spacing_mm, rel=1e-4)
    assert paths["lesions"] == tmp_path / "ground_truth" / paths["scan"].name / "lesions.tif"
    assert np.array_equal(tifffile.imread(paths["lesions"]), cine.lesion_masks)
    assert np.array_equal(tifffile.imread(paths["annotations"]).astype(bool), cine.annotation_masks)
    assert np.array_equal(tifffile.imread(paths["clean"]), cine.clean_frames)
    meta = json.loads(paths["meta"].read_text())
    assert meta["seed"] == 4 and meta["fps"] == 15.0


def test_export_frame_png_rgb_and_bad_suffix(tmp_path):
    load_scan = _load_scan()
    f = simulate_frame(seed=9, colour_overlay=True, **SMALL)
    paths = export_frame(f, tmp_path / "one.png")
    with load_scan(paths["scan"]) as scan:
        assert np.array_equal(scan.frame(0), f.image)
    with pytest.raises(USFMError, match="does not match"):
        export_frame(f, tmp_path / "one.dcm", format="png")
    with pytest.raises(USFMError, match="cannot export"):
        export_cine(simulate_cine(1, seed=0, **SMALL), tmp_path / "c", format="png")


def test_cli_simulate(tmp_path, capsys):
    import tifffile

    out = tmp_path / "sample"
    rc = main(["simulate", str(out), "--seed", "3", "--annotations", "--size", "96", "96"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "seed: 3" in printed and str(tmp_path / "sample.png") in printed
    lesions = tifffile.imread(tmp_path / "ground_truth" / "sample.png" / "lesions.tif")
    expected = simulate_frame(seed=3, text=True, calipers=True, height=96, width=96)
    assert np.array_equal(lesions.reshape(96, 96), expected.lesion_mask)

    rc = main(
        [
            "simulate",
            str(tmp_path / "c.tif"),
            "--kind",
            "cine",
            "--frames",
            "2",
            "--size",
            "64",
            "64",
            "--seed",
            "1",
            "--geometry",
            "linear",
        ]
    )
    assert rc == 0 and tifffile.imread(tmp_path / "c.tif").shape == (2, 64, 64)

    assert main(["simulate", str(tmp_path / "x.png"), "--kind", "cine"]) == 1
    assert "cannot be written as png" in capsys.readouterr().err
