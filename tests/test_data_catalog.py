"""DatasetCatalog: folder layouts, preprocess outputs, cines, skipped files, real data."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest

from usfm_core.data.catalog import DatasetCatalog, to_gray_uint8
from usfm_core.errors import USFMError


def fan_image(seed: int, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A (H, W) uint8 frame: speckle inside a sector fan, black outside."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.degrees(np.arctan2(xx - w / 2, yy + 5))
    radius = np.hypot(xx - w / 2, yy + 5)
    fan = (np.abs(angle) < 35) & (radius < h)
    img = (rng.gamma(2.0, 40.0, size=(h, w)).clip(1, 255) * fan).astype(np.uint8)
    return img


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{plain (nested + masks), prep (preprocess output), broken (one bad file)}."""
    root = tmp_path / "data"
    for i in range(3):
        write_png(root / "plain" / f"img{i}.png", fan_image(i))
    write_png(root / "plain" / "deeper" / "more" / "img9.png", fan_image(9))
    write_png(root / "plain" / "masks" / "img0.png", np.full((96, 128), 255, np.uint8))
    write_png(root / "plain" / "img0_mask.png", np.full((96, 128), 255, np.uint8))
    (root / "plain" / "notes.txt").write_text("not a scan")

    prep = root / "prep"
    rows = []
    for i in range(2):
        name = f"clip_{i:03d}.png"
        write_png(prep / "frames" / name, fan_image(10 + i))
        region = np.zeros((96, 128), np.uint8)
        region[10 + i : 60, 20:100] = 255  # deliberately not what scan_region_mask would find
        write_png(prep / "region_masks" / name, region)
        rows.append({"png_path": f"frames/{name}", "region_mask_path": f"region_masks/{name}"})
    with open(prep / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["png_path", "region_mask_path"])
        writer.writeheader()
        writer.writerows(rows)

    write_png(root / "broken" / "good.png", fan_image(20))
    (root / "broken" / "bad.png").write_bytes(b"this is not a png file at all")
    (root / "broken" / "empty.jpg").write_bytes(b"")
    return root


def test_tree_layout_datasets_nesting_and_label_folders(tree: Path) -> None:
    cat = DatasetCatalog.from_folder(tree)
    assert set(cat.datasets) == {"plain", "prep", "broken"}
    plain = {cat[i].path.relative_to(tree).as_posix() for i in cat.datasets["plain"]}
    assert plain == {
        "plain/img0.png",
        "plain/img1.png",
        "plain/img2.png",
        "plain/deeper/more/img9.png",
    }
    assert len(cat) == 4 + 2 + 1
    # datasets partitions the item indices
    all_idx = sorted(i for idx in cat.datasets.values() for i in idx)
    assert all_idx == list(range(len(cat)))
    text = cat.summary()
    assert "plain" in text and "prep" in text and "total" in text
    assert "2 unreadable" in text


def test_unreadable_files_are_skipped_and_listed(tree: Path) -> None:
    cat = DatasetCatalog.from_folder(tree)
    skipped = {p.name: reason for p, reason in cat.skipped}
    assert set(skipped) == {"bad.png", "empty.jpg"}
    assert "header" in skipped["bad.png"] and "empty" in skipped["empty.jpg"]
    assert [cat[i].path.name for i in cat.datasets["broken"]] == ["good.png"]


def test_preprocess_output_uses_saved_region_masks(tree: Path) -> None:
    cat = DatasetCatalog.from_folder(tree)
    for k, i in enumerate(cat.datasets["prep"]):
        item = cat[i]
        assert item.region_mask_path == tree / "prep" / "region_masks" / item.path.name
        image, region = cat.load(i)
        assert image.dtype == np.uint8 and image.shape == (96, 128)
        expected = np.zeros((96, 128), bool)
        expected[10 + k : 60, 20:100] = True
        np.testing.assert_array_equal(region, expected)


def test_preprocess_output_as_root_is_one_dataset(tree: Path) -> None:
    cat = DatasetCatalog.from_folder(tree / "prep")
    assert list(cat.datasets) == ["prep"] and len(cat) == 2


def test_folder_with_images_directly_is_one_dataset(tree: Path) -> None:
    cat = DatasetCatalog.from_folder(tree / "plain")
    assert list(cat.datasets) == ["plain"]
    assert len(cat) == 4


def test_labelled_manifest_is_not_a_preprocess_manifest(tmp_path: Path) -> None:
    root = tmp_path / "busi_like"
    write_png(root / "images" / "a.png", fan_image(1))
    write_png(root / "masks" / "a.png", np.zeros((96, 128), np.uint8))
    (root / "manifest.csv").write_text("image,mask,label\nimages/a.png,masks/a.png,benign\n")
    cat = DatasetCatalog.from_folder(tmp_path)
    assert list(cat.datasets) == ["busi_like"]
    assert [it.path for it in cat] == [root / "images" / "a.png"]
    assert cat[0].region_mask_path is None


def test_computed_region_is_cached_bitpacked_and_bounded(tree: Path) -> None:
    cat = DatasetCatalog.from_folder(tree / "plain")
    cat.region_cache_size = 2
    image, region = cat.load(0)
    assert region.dtype == bool and region.shape == image.shape
    # The fan (non-zero pixels) should be mostly inside the computed scan region.
    assert region[image > 0].mean() > 0.9
    assert not region.all()
    again = cat.load(0)[1]
    np.testing.assert_array_equal(again, region)
    cat.load(1)
    cat.load(2)
    assert len(cat._regions) == 2 and 0 not in cat._regions


def test_rgb_png_is_loaded_as_gray(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    write_png(tmp_path / "set" / "colour.png", bgr)
    cat = DatasetCatalog.from_folder(tmp_path)
    image, _ = cat.load(0)
    expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert image.shape == (40, 50)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


def test_to_gray_uint8_scales_other_dtypes() -> None:
    frame = np.linspace(0, 4000, 20 * 30).reshape(20, 30).astype(np.uint16)
    gray = to_gray_uint8(frame)
    assert gray.dtype == np.uint8 and gray.min() == 0 and gray.max() == 255
    rgb = np.stack([frame, frame, frame], -1).astype(np.float32)
    np.testing.assert_array_equal(to_gray_uint8(rgb), gray)


def test_empty_folder_raises_naming_folder_and_fix(tmp_path: Path) -> None:
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(USFMError) as info:
        DatasetCatalog.from_folder(empty)
    assert str(empty) in str(info.value) and "fix:" in str(info.value)


def test_only_unreadable_files_raises(tmp_path: Path) -> None:
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "x.png").write_bytes(b"garbage")
    with pytest.raises(USFMError, match="could be read"):
        DatasetCatalog.from_folder(tmp_path)


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(USFMError, match="not found"):
        DatasetCatalog.from_folder(tmp_path / "does_not_exist")


def test_tiff_stack_is_expanded_into_sampled_frames(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    n = 120  # enough frames to hit the cap with or without a frame rate
    stack = np.stack([np.full((24, 32), 2 * i, np.uint8) for i in range(n)])
    path = tmp_path / "cines" / "stack.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, stack)
    cat = DatasetCatalog.from_folder(tmp_path, max_frames_per_clip=5)
    frames = [it.frame for it in cat]
    assert len(frames) == 5 and frames[0] == 0
    assert frames == sorted(set(frames)) and frames[-1] < n
    for i, item in enumerate(cat):
        image, _ = cat.load(i)
        assert image.shape == (24, 32)
        assert int(image[0, 0]) == 2 * item.frame  # the right frame was decoded


class _FakeScan:
    """A cine header: 300 frames at 30 fps; frames are RGB with the index as red value."""

    n_frames = 300
    fps = 30.0
    kind = "video"
    spacing_mm = None
    decoded: ClassVar[list[int]] = []

    def __init__(self, path: Path) -> None:
        self.path = path

    def frame(self, i: int) -> np.ndarray:
        _FakeScan.decoded.append(i)
        out = np.zeros((20, 30, 3), np.uint8)
        out[..., 0] = i % 256
        return out


@pytest.fixture
def fake_io(monkeypatch: pytest.MonkeyPatch) -> type[_FakeScan]:
    import usfm_core.io

    _FakeScan.decoded = []
    monkeypatch.setattr(usfm_core.io, "load_scan", _FakeScan, raising=False)
    return _FakeScan


def test_cine_expanded_from_header_without_decoding(tmp_path: Path, fake_io) -> None:
    (tmp_path / "echo").mkdir()
    (tmp_path / "echo" / "clip.mp4").write_bytes(b"\x00" * 64)
    cat = DatasetCatalog.from_folder(tmp_path, target_fps=3.0, max_frames_per_clip=64)
    assert fake_io.decoded == []  # indexing read the header only
    frames = [it.frame for it in cat]
    # 30 fps -> 3 fps: every 10th frame of 300
    assert 28 <= len(frames) <= 31
    steps = np.diff(frames)
    assert steps.min() >= 9 and steps.max() <= 11
    image, _ = cat.load(3)
    assert fake_io.decoded == [frames[3]]
    expected = cv2.cvtColor(fake_io(tmp_path).frame(frames[3]), cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(image, expected)

    capped = DatasetCatalog.from_folder(tmp_path, target_fps=3.0, max_frames_per_clip=8)
    assert len(capped) == 8 and capped[0].frame == 0


def test_dicom_cine_written_by_io_is_expanded(tmp_path: Path) -> None:
    io = pytest.importorskip("usfm_core.io")
    if not hasattr(io, "write_dicom"):
        pytest.skip("usfm_core.io.write_dicom not available")
    n = 40
    frames = np.stack([np.full((32, 48), 5 * i, np.uint8) for i in range(n)])
    io.write_dicom(tmp_path / "echo" / "clip.dcm", frames, fps=20.0)
    (tmp_path / "echo" / "clip_no_ext").write_bytes((tmp_path / "echo" / "clip.dcm").read_bytes())
    cat = DatasetCatalog.from_folder(tmp_path, target_fps=5.0)
    for name in ("clip.dcm", "clip_no_ext"):
        items = [(i, it) for i, it in enumerate(cat) if it.path.name == name]
        frames_kept = [it.frame for _, it in items]
        assert frames_kept[0] == 0 and len(frames_kept) == 10  # 20 -> 5 fps: every 4th
        assert set(np.diff(frames_kept)) == {4}
        i, item = items[-1]
        image, region = cat.load(i)
        assert image.shape == (32, 48) and int(image[5, 5]) == 5 * item.frame
        assert region.shape == image.shape


def test_real_preprocess_output_is_recognised(tmp_path: Path) -> None:
    preprocess = pytest.importorskip("usfm_core.preprocess")
    if not hasattr(preprocess, "preprocess_folder"):
        pytest.skip("usfm_core.preprocess.preprocess_folder not available")
    for i in range(2):
        write_png(tmp_path / "raw" / f"scan{i}.png", fan_image(30 + i))
    out = tmp_path / "data" / "phantom"
    preprocess.preprocess_folder(tmp_path / "raw", out, remove_text=False, progress=False)
    cat = DatasetCatalog.from_folder(tmp_path / "data")
    assert list(cat.datasets) == ["phantom"] and len(cat) == 2
    for i, item in enumerate(cat):
        assert item.path.parent == out / "frames"
        assert item.region_mask_path is not None and item.region_mask_path.is_file()
        image, region = cat.load(i)
        saved = cv2.imread(str(item.region_mask_path), cv2.IMREAD_GRAYSCALE) > 0
        np.testing.assert_array_equal(region, saved)
        assert region.shape == image.shape


def test_catalog_pickles_without_caches(tree: Path) -> None:
    cat = DatasetCatalog.from_folder(tree / "plain")
    cat.load(0)
    clone = pickle.loads(pickle.dumps(cat))
    assert clone.items == cat.items and len(clone._regions) == 0
    np.testing.assert_array_equal(clone.load(0)[0], cat.load(0)[0])


def test_shared_data_is_indexed_without_decoding(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("indexing must not decode images")

    with monkeypatch.context() as m:
        m.setattr(cv2, "imread", no_decoding)
        cat = DatasetCatalog.from_folder(shared_data)
    sizes = {name: len(idx) for name, idx in cat.datasets.items()}
    assert sizes == {"busi": 780, "hc18": 999}
    assert all(it.path.parent.name == "images" for it in cat)
    assert cat.skipped == []
    for i in (0, cat.datasets["hc18"][0]):
        image, region = cat.load(i)
        assert image.ndim == 2 and image.dtype == np.uint8
        assert region.shape == image.shape and region.any()
