"""Readers and writers of usfm_core.io on files the tests write themselves (and real PNGs)."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import tifffile

from usfm_core.errors import ScanReadError
from usfm_core.io import (
    SUPPORTED_EXTENSIONS,
    SUPPORTED_TRANSFER_SYNTAXES,
    LazyFrames,
    Scan,
    load_scan,
    write_dicom,
    write_image,
    write_nifti,
    write_tiff,
    write_video,
)


def smooth_gray(n: int = 6, h: int = 48, w: int = 64) -> np.ndarray:
    """(n, h, w) uint8 frames: a moving blob + gradient, distinct per frame, codec friendly."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for t in range(n):
        cx, cy = 10 + t * (w - 20) / max(n - 1, 1), h / 2
        blob = 180 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 6.0**2))
        frames.append(np.clip(30 + 0.8 * xx + blob, 0, 255))
    return np.stack(frames).astype(np.uint8)


def smooth_rgb(n: int = 4, h: int = 48, w: int = 64) -> np.ndarray:
    """(n, h, w, 3) uint8: gray anatomy with a red and a blue flat patch (colour overlays)."""
    gray = smooth_gray(n, h, w)
    rgb = np.repeat(gray[..., None], 3, axis=3).copy()
    rgb[:, 8:24, 8:24] = (220, 30, 30)
    rgb[:, 28:44, 40:56] = (20, 40, 200)
    return rgb


# --------------------------------------------------------------------------- DICOM
@pytest.mark.parametrize(
    ("photometric", "syntax"),
    [
        ("MONOCHROME2", "explicit_le"),
        ("MONOCHROME2", "implicit_le"),
        ("MONOCHROME1", "explicit_le"),
    ],
)
def test_dicom_gray_round_trip(tmp_path: Path, photometric: str, syntax: str) -> None:
    frames = smooth_gray()
    path = write_dicom(
        tmp_path / "cine.dcm",
        frames,
        spacing_mm=(0.12, 0.15),
        fps=25.0,
        photometric=photometric,
        transfer_syntax=syntax,
    )
    scan = load_scan(path)
    assert isinstance(scan, Scan)
    assert (scan.kind, scan.format, scan.shape, scan.n_frames) == ("cine", "dicom", frames.shape, 6)
    assert scan.dtype == np.uint8 and not scan.is_rgb
    assert scan.spacing_mm == pytest.approx((0.12, 0.15))
    assert scan.fps == pytest.approx(25.0)
    np.testing.assert_array_equal(scan.frames[:], frames)
    np.testing.assert_array_equal(scan.frame(4), frames[4])
    if photometric == "MONOCHROME1":
        # The file really stores inverted values; the reader flips them back.
        stored = pydicom.dcmread(path).pixel_array
        np.testing.assert_array_equal(stored[2], 255 - frames[2])


@pytest.mark.parametrize(
    ("photometric", "syntax", "tol"),
    [("RGB", "explicit_le", 0), ("YBR_FULL", "explicit_le", 2), ("RGB", "rle_lossless", 0)],
)
def test_dicom_colour_round_trip(tmp_path: Path, photometric: str, syntax: str, tol: int) -> None:
    frames = smooth_rgb()
    path = write_dicom(tmp_path / "c.dcm", frames, photometric=photometric, transfer_syntax=syntax)
    scan = load_scan(path)
    assert scan.is_rgb and scan.shape == frames.shape
    assert scan.metadata["PhotometricInterpretation"] == photometric
    got = scan.frames[:].astype(int)
    assert np.abs(got - frames).max() <= tol


def test_dicom_jpeg_baseline(tmp_path: Path) -> None:
    gray, rgb = smooth_gray(), smooth_rgb()
    g = load_scan(write_dicom(tmp_path / "g.dcm", gray, transfer_syntax="jpeg_baseline"))
    c = load_scan(
        write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB", transfer_syntax="jpeg_baseline")
    )
    assert g.metadata["transfer_syntax_uid"] == "1.2.840.10008.1.2.4.50"
    assert not g.is_rgb and c.is_rgb
    assert c.metadata["PhotometricInterpretation"] == "YBR_FULL_422"
    assert np.abs(g.frames[:].astype(int) - gray).mean() < 2.0
    got = c.frames[:].astype(int)
    assert np.abs(got - rgb).mean() < 4.0
    # YBR -> RGB conversion happened: the red patch is red, the blue one blue.
    red, blue = got[0, 12:20, 12:20].mean((0, 1)), got[0, 32:40, 44:52].mean((0, 1))
    assert red[0] > 180 and red[2] < 70 and blue[2] > 160 and blue[0] < 70


def test_dicom_without_or_with_wrong_extension(tmp_path: Path) -> None:
    frames = smooth_gray(3)
    write_dicom(tmp_path / "a.dcm", frames)
    for name in ("IM_0001", "scan.png"):
        (tmp_path / name).write_bytes((tmp_path / "a.dcm").read_bytes())
        scan = load_scan(tmp_path / name)
        assert scan.format == "dicom"
        np.testing.assert_array_equal(scan.frame(2), frames[2])


def test_dicom_single_frame_and_pixel_spacing(tmp_path: Path) -> None:
    img = smooth_gray(1)[0]
    path = write_dicom(
        tmp_path / "one.dcm", img, spacing_mm=(0.3, 0.25), spacing_in="pixel_spacing"
    )
    scan = load_scan(path)
    assert scan.kind == "image" and scan.shape == (1, *img.shape)
    assert scan.spacing_mm == pytest.approx((0.3, 0.25))
    assert scan.fps is None
    uncalibrated = load_scan(write_dicom(tmp_path / "u.dcm", smooth_gray(2)))
    assert uncalibrated.spacing_mm is None and uncalibrated.fps is None


def _edit(path: Path, **tags: object) -> Path:
    """Rewrite DICOM ``path`` with header attributes changed (None deletes)."""
    ds = pydicom.dcmread(path)
    for name, value in tags.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    ds.save_as(path)
    return path


def test_dicom_fps_sources(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "v.dcm", smooth_gray(4), fps=30)
    _edit(path, FrameTime=None, FrameTimeVector=["0", "40", "40", "40"])
    assert load_scan(path).fps == pytest.approx(25.0)
    _edit(path, FrameTimeVector=None, CineRate=None, RecommendedDisplayFrameRate=12)
    assert load_scan(path).fps == pytest.approx(12.0)
    _edit(path, RecommendedDisplayFrameRate=None, CineRate=17)
    assert load_scan(path).fps == pytest.approx(17.0)


def test_dicom_enhanced_us_volume(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    path = write_dicom(tmp_path / "vol.dcm", smooth_gray(5), fps=20)
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.2"
    measures = Dataset()
    measures.PixelSpacing = ["0.3", "0.4"]
    measures.SpacingBetweenSlices = "1.5"
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.save_as(path)
    scan = load_scan(path)
    assert scan.kind == "volume" and scan.fps is None
    assert scan.spacing_mm == pytest.approx((0.3, 0.4))
    assert scan.slice_spacing_mm == pytest.approx(1.5)


def test_dicom_several_regions_warn_and_pick_largest(tmp_path: Path) -> None:
    frames = smooth_gray(2)
    regions = [
        {"spacing_mm": (0.2, 0.2), "bbox": (0, 0, 15, 15)},  # small inset
        {"spacing_mm": (0.1, 0.1), "bbox": (0, 0, 63, 47)},  # the main B-mode image
        {"spacing_mm": (0.5, 0.5), "bbox": (0, 0, 63, 47), "data_type": 3},  # spectral, ignored
    ]
    path = write_dicom(tmp_path / "r.dcm", frames, regions=regions)
    with pytest.warns(UserWarning, match="different pixel sizes"):
        scan = load_scan(path)
    assert scan.spacing_mm == pytest.approx((0.1, 0.1))
    assert len(scan.metadata["ultrasound_regions"]) == 3
    # Same spacing in every tissue region: no warning.
    same = [{"spacing_mm": (0.1, 0.1)}, {"spacing_mm": (0.1, 0.1), "bbox": (0, 0, 9, 9)}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_scan(write_dicom(tmp_path / "s.dcm", frames, regions=same)).spacing_mm == (
            pytest.approx((0.1, 0.1))
        )


def test_dicom_reads_only_requested_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels

    frames = smooth_gray(40)
    path = write_dicom(tmp_path / "long.dcm", frames, fps=30)
    calls: list[int | None] = []
    real = pydicom.pixels.pixel_array

    def counting(src, **kwargs):
        calls.append(kwargs.get("index"))
        return real(src, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "pixel_array", counting)
    scan = load_scan(path)
    assert calls == []  # opening decodes nothing
    np.testing.assert_array_equal(scan.frames[17], frames[17])
    assert calls == [17]


def test_dicom_unsupported_transfer_syntax(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "m.dcm", smooth_gray(2), transfer_syntax="jpeg_baseline")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video in DICOM
    ds.save_as(path)
    with pytest.raises(ScanReadError, match=r"(?s)m\.dcm.*MPEG2.*gdcmconv"):
        load_scan(path)


def test_dicom_missing_jpeg_decoder_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pydicom.pixels

    path = write_dicom(tmp_path / "j.dcm", smooth_gray(2), transfer_syntax="jpeg_baseline")

    class NoDecoder:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoDecoder())
    with pytest.raises(ScanReadError, match=r"(?s)j\.dcm.*JPEG Baseline.*pip install pylibjpeg"):
        load_scan(path)
    assert "1.2.840.10008.1.2.4.50" in SUPPORTED_TRANSFER_SYNTAXES


@pytest.mark.parametrize("syntax", ["explicit_le", "jpeg_baseline"])
def test_dicom_truncated(tmp_path: Path, syntax: str) -> None:
    path = write_dicom(tmp_path / "t.dcm", smooth_gray(4), transfer_syntax=syntax)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1500])
    with pytest.raises(ScanReadError, match=r"t\.dcm.*truncated"):
        load_scan(path)


def test_dicom_zero_frames_and_not_dicom(tmp_path: Path) -> None:
    path = _edit(write_dicom(tmp_path / "z.dcm", smooth_gray(2)), NumberOfFrames=0)
    with pytest.raises(ScanReadError, match=r"z\.dcm.*zero frames"):
        load_scan(path)
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x00" * 300)
    with pytest.raises(ScanReadError, match=r"fake\.dcm.*DICM"):
        load_scan(fake)


# --------------------------------------------------------------------------- video
def _nearest(frame: np.ndarray, originals: np.ndarray) -> int:
    """Index of the original frame closest to a decoded one."""
    return int(np.argmin([np.abs(frame.astype(int) - o).mean() for o in originals]))


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_video_gray_random_access(tmp_path: Path, suffix: str) -> None:
    frames = smooth_gray(12)
    scan = load_scan(write_video(tmp_path / f"cine{suffix}", frames, fps=15))
    assert (scan.kind, scan.format, scan.shape) == ("cine", "video", frames.shape)
    assert not scan.is_rgb and scan.fps == pytest.approx(15.0)
    for i in (7, 2, 3, 11, 0):  # out of order: exercises seeking
        got = scan.frame(i)
        assert _nearest(got, frames) == i
        assert np.abs(got.astype(int) - frames[i]).mean() < 6
    scan.close()


def test_video_rgb(tmp_path: Path) -> None:
    frames = smooth_rgb(5)
    scan = load_scan(write_video(tmp_path / "c.avi", frames, fps=10))
    assert scan.is_rgb and scan.shape == frames.shape
    red = scan.frame(1)[12:20, 12:20].mean((0, 1))
    assert red[0] > 180 and red[2] < 70  # RGB order, not OpenCV's BGR
    assert scan.to_gray(1).shape == frames.shape[1:3]


def test_video_is_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_video(tmp_path / "long.avi", smooth_gray(150, 32, 32), fps=30)
    reads = []
    real = cv2.VideoCapture

    class Counting:
        def __init__(self, *args):
            self._cap = real(*args)

        def read(self, *args):
            reads.append(1)
            return self._cap.read(*args)

        def grab(self):
            reads.append(1)
            return self._cap.grab()

        def __getattr__(self, name):
            return getattr(self._cap, name)

    monkeypatch.setattr(cv2, "VideoCapture", Counting)
    scan = load_scan(path)
    frame0 = scan.frames[0]
    assert scan.n_frames == 150 and frame0.shape == (32, 32)
    assert len(reads) <= 3  # first frame, last-frame check, frame 0 again: not 150


def test_video_corrupt_and_empty(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(ScanReadError, match=r"bad\.mp4"):
        load_scan(bad)
    empty = tmp_path / "none.avi"
    writer = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 32))
    writer.release()
    with pytest.raises(ScanReadError, match=r"none\.avi"):
        load_scan(empty)


def test_video_truncated_gives_readable_frames_or_error(tmp_path: Path) -> None:
    path = write_video(tmp_path / "cut.avi", smooth_gray(20), fps=10)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    try:
        scan = load_scan(path)
    except ScanReadError as exc:
        assert "cut.avi" in str(exc)
        return
    assert 0 < scan.n_frames < 20
    assert scan.frames[scan.n_frames - 1].shape == (48, 64)


# --------------------------------------------------------------------------- TIFF
def test_tiff_imagej_cine_and_volume(tmp_path: Path) -> None:
    frames = smooth_gray(5)
    cine = load_scan(write_tiff(tmp_path / "c.tif", frames, spacing_mm=(0.1, 0.2), fps=20))
    assert (cine.kind, cine.format, cine.shape) == ("cine", "tiff", frames.shape)
    assert cine.spacing_mm == pytest.approx((0.1, 0.2)) and cine.fps == pytest.approx(20.0)
    np.testing.assert_array_equal(cine.frames[1:4], frames[1:4])
    vol = load_scan(
        write_tiff(tmp_path / "v.tif", frames, spacing_mm=(0.3, 0.3), slice_spacing_mm=0.7)
    )
    assert vol.kind == "volume" and vol.slice_spacing_mm == pytest.approx(0.7) and vol.fps is None


def test_tiff_rgb_plain_and_uncalibrated(tmp_path: Path) -> None:
    rgb = smooth_rgb(3)
    scan = load_scan(write_tiff(tmp_path / "rgb.tif", rgb, spacing_mm=(0.5, 0.25)))
    assert scan.is_rgb and scan.shape == rgb.shape
    np.testing.assert_array_equal(scan.frame(2), rgb[2])
    plain = load_scan(
        write_tiff(tmp_path / "p.tif", smooth_gray(3), spacing_mm=(0.05, 0.08), imagej=False)
    )
    assert plain.spacing_mm == pytest.approx((0.05, 0.08))
    tifffile.imwrite(tmp_path / "raw.tif", smooth_gray(2))
    assert load_scan(tmp_path / "raw.tif").spacing_mm is None


def test_tiff_float_frames_become_float32(tmp_path: Path) -> None:
    frames = np.random.default_rng(2).random((3, 8, 9))
    scan = load_scan(write_tiff(tmp_path / "f.tif", frames, fps=5))
    assert scan.dtype == np.float32 and scan.fps == pytest.approx(5.0)
    np.testing.assert_allclose(scan.frame(2), frames[2], rtol=1e-6)


def test_ome_tiff(tmp_path: Path) -> None:
    frames = smooth_gray(4)
    meta = {
        "axes": "TYX",
        "PhysicalSizeX": 150.0,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": 0.1,
        "PhysicalSizeYUnit": "mm",
        "TimeIncrement": 0.05,
    }
    tifffile.imwrite(tmp_path / "s.ome.tif", frames, ome=True, metadata=meta)
    scan = load_scan(tmp_path / "s.ome.tif")
    assert scan.kind == "cine" and scan.shape == frames.shape
    assert scan.spacing_mm == pytest.approx((0.1, 0.15)) and scan.fps == pytest.approx(20.0)


def test_tiff_is_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = smooth_gray(60, 16, 16)
    path = write_tiff(tmp_path / "long.tif", frames)
    decoded = []
    real = tifffile.TiffPage.asarray

    def counting(self, *args, **kwargs):
        decoded.append(self.index)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPage, "asarray", counting)
    scan = load_scan(path)
    np.testing.assert_array_equal(scan.frame(37), frames[37])
    assert decoded == [37]


def test_tiff_truncated(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "t.tif", smooth_gray(4))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ScanReadError, match=r"t\.tif"):
        load_scan(path).frame(3)


# --------------------------------------------------------------------------- NIfTI
@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_round_trip(tmp_path: Path, name: str) -> None:
    vol = smooth_gray(7, 20, 30)
    scan = load_scan(write_nifti(tmp_path / name, vol, (2.0, 0.4, 0.5)))
    assert (scan.kind, scan.format, scan.shape) == ("volume", "nifti", vol.shape)
    assert scan.spacing_mm == pytest.approx((0.4, 0.5))
    assert scan.slice_spacing_mm == pytest.approx(2.0)
    np.testing.assert_array_equal(scan.frame(3), vol[3])
    np.testing.assert_array_equal(np.asarray(scan.frames), vol)


def test_nifti_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "x.nii"
    path.write_bytes(b"not a nifti header" * 40)
    with pytest.raises(ScanReadError, match=r"x\.nii"):
        load_scan(path)


# --------------------------------------------------------------------------- images
def test_png_gray_rgb_and_16bit(tmp_path: Path) -> None:
    gray, rgb = smooth_gray(1)[0], smooth_rgb(1)[0]
    g = load_scan(write_image(tmp_path / "g.png", gray))
    assert (g.kind, g.format, g.shape, g.is_rgb) == ("image", "image", (1, 48, 64), False)
    np.testing.assert_array_equal(g.frame(0), gray)
    c = load_scan(write_image(tmp_path / "c.png", rgb))
    assert c.is_rgb
    np.testing.assert_array_equal(c.frame(0), rgb)
    np.testing.assert_array_equal(c.to_gray(0), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    # Gray saved as three equal channels counts as gray.
    as_rgb = load_scan(write_image(tmp_path / "e.png", np.repeat(gray[..., None], 3, 2)))
    assert not as_rgb.is_rgb and as_rgb.frame(0).shape == gray.shape
    deep = gray.astype(np.uint16) * 257
    d = load_scan(write_image(tmp_path / "d.png", deep))
    assert d.dtype == np.uint16
    np.testing.assert_array_equal(d.frame(0), deep)


def test_folder_natural_order(tmp_path: Path) -> None:
    frames = smooth_gray(11)
    for i, f in enumerate(frames):
        write_image(tmp_path / "seq" / f"frame{i + 1}.png", f)
    (tmp_path / "seq" / "notes.txt").write_text("ignored")
    scan = load_scan(tmp_path / "seq")
    assert (scan.kind, scan.format, scan.shape) == ("cine", "folder", frames.shape)
    assert scan.metadata["files"][:3] == ["frame1.png", "frame2.png", "frame3.png"]
    np.testing.assert_array_equal(scan.frames[9], frames[9])  # frame10 after frame9
    assert len(list(scan.iter_frames())) == 11


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanReadError, match=r"empty.*no images"):
        load_scan(tmp_path / "empty")
    write_image(tmp_path / "mixed" / "a1.png", smooth_gray(1)[0])
    write_image(tmp_path / "mixed" / "a2.png", smooth_gray(1, 40, 64)[0])
    with pytest.raises(ScanReadError, match=r"(?s)a2\.png.*same size"):
        load_scan(tmp_path / "mixed")


def test_real_busi_pngs(shared_data: Path) -> None:
    from PIL import Image

    files = sorted((shared_data / "busi" / "images").glob("*.png"))[:3]
    assert len(files) == 3
    for f in files:
        scan = load_scan(f)
        ref = np.asarray(Image.open(f))
        assert scan.kind == "image" and scan.dtype == np.uint8
        assert scan.frame_shape[:2] == ref.shape[:2]
        gray_ref = ref if ref.ndim == 2 else cv2.cvtColor(ref[..., :3], cv2.COLOR_RGB2GRAY)
        np.testing.assert_array_equal(scan.to_gray(0), gray_ref)


# --------------------------------------------------------------------------- generic errors
def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ScanReadError, match=r"nowhere\.dcm: no such file"):
        load_scan(tmp_path / "nowhere.dcm")
    empty = tmp_path / "zero.mp4"
    empty.touch()
    with pytest.raises(ScanReadError, match=r"zero\.mp4: file is empty"):
        load_scan(empty)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a scan\n" * 30)
    with pytest.raises(ScanReadError, match=r"(?s)notes\.txt: unknown scan format.*\.dcm"):
        load_scan(text)
    broken = tmp_path / "broken.png"
    broken.write_bytes(write_image(tmp_path / "ok.png", smooth_gray(1)[0]).read_bytes()[:200])
    with pytest.raises(ScanReadError, match=r"broken\.png: cannot decode"):
        load_scan(broken)
    assert SUPPORTED_EXTENSIONS[".dcm"] == "dicom" and SUPPORTED_EXTENSIONS[".nii.gz"] == "nifti"


# --------------------------------------------------------------------------- lazy frames
class _Source:
    """In-memory frame source recording which frames were decoded."""

    def __init__(self, frames: np.ndarray):
        self.frames, self.reads = frames, []

    def read(self, index: int) -> np.ndarray:
        self.reads.append(index)
        return self.frames[index]

    def close(self) -> None:
        pass


def test_lazy_frames_indexing() -> None:
    data = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    src = _Source(data)
    lazy = LazyFrames(src, data.shape, data.dtype)
    assert (lazy.shape, lazy.ndim, len(lazy), lazy.dtype) == ((5, 4, 3), 3, 5, np.uint8)
    np.testing.assert_array_equal(lazy[-1], data[-1])
    np.testing.assert_array_equal(lazy[np.int64(2), 1:3], data[2, 1:3])
    np.testing.assert_array_equal(lazy[::2, :, 0], data[::2, :, 0])
    np.testing.assert_array_equal(lazy[[3, 1]], data[[3, 1]])
    np.testing.assert_array_equal(lazy[..., 1], data[..., 1])
    np.testing.assert_array_equal(lazy[np.array([True, False, True, False, False])], data[[0, 2]])
    assert lazy[3:3].shape == (0, 4, 3)
    src.reads.clear()
    _ = lazy[4, 0, 0]
    assert src.reads == [4]
    np.testing.assert_array_equal(np.asarray(lazy), data)
    with pytest.raises(IndexError):
        lazy[5]


def test_lazy_frames_with_dask() -> None:
    da = pytest.importorskip("dask.array")
    data = np.arange(6 * 5 * 4, dtype=np.uint16).reshape(6, 5, 4)
    src = _Source(data)
    arr = da.from_array(LazyFrames(src, data.shape, data.dtype), chunks=(1, 5, 4))
    np.testing.assert_array_equal(arr[4].compute(), data[4])
    assert set(src.reads) == {4}


# --------------------------------------------------------------------------- hardening (#15)
def _raw_element(path: Path, keyword: str, vr: str, text: str) -> Path:
    """Store ``text`` verbatim (unvalidated) as DICOM element ``keyword`` of ``path``."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(path)
    tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
    data = text.encode("latin1")
    data += b" " * (len(data) % 2)
    ds._dict[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)
    ds.save_as(path)
    return path


def test_nan_and_inf_frames_are_repaired_with_a_warning(tmp_path: Path) -> None:
    from usfm_core.errors import ScanWarning
    from usfm_core.preprocess.intensity import percentile_rescale

    frames = np.random.default_rng(0).uniform(10, 20, (3, 8, 9)).astype(np.float32)
    frames[1, :2] = np.nan
    frames[1, 5, 5] = np.inf
    frames[2] = np.nan
    tif = write_tiff(tmp_path / "nan.tif", frames)
    with pytest.warns(ScanWarning, match=r"nan\.tif: frame 1: 19 of 72 pixels are NaN/inf"):
        frame1 = load_scan(tif).frame(1)
    finite = frames[1][np.isfinite(frames[1])]
    assert np.isfinite(frame1).all()
    np.testing.assert_array_equal(frame1[:2], np.full((2, 9), finite.min(), np.float32))
    assert frame1[5, 5] == finite.max()
    np.testing.assert_array_equal(frame1[2:5], frames[1][2:5])  # untouched pixels unchanged
    # Not a black frame downstream: the rescaled frame spans [0, 1].
    rescaled = percentile_rescale(frame1)
    assert np.isfinite(rescaled).all() and rescaled.max() == 1.0
    with pytest.warns(ScanWarning, match="frame 2 holds no finite value"):
        assert not load_scan(tif).frame(2).any()
    vol = write_nifti(tmp_path / "nan.nii.gz", frames, (1.0, 0.5, 0.5))
    with pytest.warns(ScanWarning, match=r"nan\.nii\.gz: frame 1: 19 of 72"):
        assert np.isfinite(load_scan(vol).frames[:]).all()


def test_implausible_calibration_is_dropped_with_a_warning(tmp_path: Path) -> None:
    from usfm_core.errors import ScanWarning

    dcm = write_dicom(tmp_path / "s.dcm", smooth_gray(3), spacing_mm=(0.1, 0.1), fps=20.0)
    _edit(dcm, SequenceOfUltrasoundRegions=None, CineRate=None, RecommendedDisplayFrameRate=None)
    _raw_element(dcm, "PixelSpacing", "DS", "inf\\inf")
    _raw_element(dcm, "FrameTime", "DS", "-5")
    with pytest.warns(ScanWarning, match=r"s\.dcm: ignoring implausible DICOM PixelSpacing"):
        scan = load_scan(dcm)
    assert scan.spacing_mm is None and scan.fps is None
    tif = write_tiff(tmp_path / "t.tif", smooth_gray(3), spacing_mm=(1e-7, 1e-7), fps=1e6)
    with pytest.warns(ScanWarning, match=r"t\.tif: ignoring implausible pixel spacing"):
        scan = load_scan(tif)
    assert scan.spacing_mm is None and scan.fps is None
    nii = write_nifti(tmp_path / "v.nii", smooth_gray(3), (2.0, 0.5, 0.5))
    data = bytearray(nii.read_bytes())
    data[80:92] = np.array([0.0, -1.0, 1e9], "<f4").tobytes()  # pixdim[1:4] = dx, dy, dz
    nii.write_bytes(bytes(data))
    with pytest.warns(ScanWarning, match=r"v\.nii: ignoring implausible"):
        scan = load_scan(nii)
    assert scan.spacing_mm is None and scan.slice_spacing_mm is None


@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_one_frame_video(tmp_path: Path, suffix: str) -> None:
    frame = smooth_gray(1)[0]
    path = tmp_path / f"one{suffix}"
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if suffix == ".avi" else "mp4v"))
    writer = cv2.VideoWriter(str(path), fourcc, 10.0, (frame.shape[1], frame.shape[0]))
    writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    scan = load_scan(path)
    assert (scan.kind, scan.shape) == ("image", (1, *frame.shape))
    for _ in range(2):  # re-reading frame 0 needs a seek, which FFmpeg refuses here
        assert np.abs(scan.frame(0).astype(int) - frame).max() < 12


@pytest.mark.parametrize(
    ("keyword", "vr", "text", "message"),
    [
        ("NumberOfFrames", "IS", "abc", "DICOM field NumberOfFrames is malformed"),
        ("NumberOfFrames", "IS", "3.5", "DICOM field NumberOfFrames is malformed"),
        ("BitsAllocated", "US", "\x0c\x00", "unsupported BitsAllocated 12"),
        ("PhotometricInterpretation", "CS", "PALETTE COLOR", "unsupported photometric"),
    ],
)
def test_malformed_dicom_required_field_is_a_clear_error(
    tmp_path: Path, keyword: str, vr: str, text: str, message: str
) -> None:
    path = _raw_element(write_dicom(tmp_path / "m.dcm", smooth_gray(3)), keyword, vr, text)
    with pytest.raises(ScanReadError, match=rf"m\.dcm: {message}"):
        load_scan(path)


def test_malformed_dicom_optional_fields_are_ignored_with_a_warning(tmp_path: Path) -> None:
    from usfm_core.errors import ScanWarning

    path = write_dicom(tmp_path / "o.dcm", smooth_gray(3), spacing_mm=(0.2, 0.2), fps=25.0)
    _edit(path, SequenceOfUltrasoundRegions=None, CineRate=None, RecommendedDisplayFrameRate=None)
    _raw_element(path, "PixelSpacing", "DS", "0.1")
    _raw_element(path, "FrameTime", "DS", "fast")
    with pytest.warns(ScanWarning) as caught:
        scan = load_scan(path)
    messages = " ".join(str(w.message) for w in caught)
    assert "malformed DICOM field FrameTime ('fast')" in messages
    assert "malformed DICOM field PixelSpacing" in messages and "o.dcm" in messages
    assert scan.spacing_mm is None and scan.fps is None
    np.testing.assert_array_equal(scan.frames[:], smooth_gray(3))


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares ``width x height`` gray pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1 << 16)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b""))
    return path


def test_decoded_size_limit_is_checked_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tracemalloc

    from usfm_core.errors import DecodedSizeError, USFMError
    from usfm_core.io import decoded_limits, set_decoded_limits

    png = _png_declaring(tmp_path / "bomb.png", 20000, 20000)
    assert png.stat().st_size < 2000
    tracemalloc.start()
    try:
        with pytest.raises(DecodedSizeError) as info:
            load_scan(png)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # refused from the header: nothing near 381 MB allocated
    text = str(info.value)
    assert "bomb.png" in text and "381 MB" in text and "limit of 256 MB per frame" in text
    assert "USFM_MAX_FRAME_MB" in text  # says how to raise it
    monkeypatch.setenv("USFM_MAX_FRAME_MB", "50")
    with pytest.raises(DecodedSizeError, match=r"over the limit of 50 MB per frame"):
        load_scan(_png_declaring(tmp_path / "b2.png", 8000, 8000))  # 61 MB, default would pass
    monkeypatch.setenv("USFM_MAX_FRAME_MB", "abc")
    with pytest.raises(USFMError, match="USFM_MAX_FRAME_MB='abc' is not a positive number"):
        load_scan(png)
    monkeypatch.delenv("USFM_MAX_FRAME_MB")
    old = set_decoded_limits(total_mb=0.005)
    try:
        assert decoded_limits()[0] == 0.005
        with pytest.raises(
            DecodedSizeError, match=r"3 frames of 48x64 .* limit of 0.005 MB per scan"
        ):
            load_scan(write_dicom(tmp_path / "c.dcm", smooth_gray(3)))
    finally:
        set_decoded_limits(*old)
    assert decoded_limits() == (2048.0, 256.0)


def test_compressed_dicom_claiming_2e9_frames_is_refused_before_allocation(
    tmp_path: Path,
) -> None:
    import tracemalloc

    from usfm_core.errors import DecodedSizeError

    path = write_dicom(tmp_path / "many.dcm", smooth_gray(2), transfer_syntax="jpeg_baseline")
    _raw_element(path, "NumberOfFrames", "IS", "2000000000")
    tracemalloc.start()
    try:
        with pytest.raises(DecodedSizeError, match=r"many\.dcm: 2000000000 frames of 48x64"):
            load_scan(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20


def test_folder_stays_lazy_with_header_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from usfm_core.io import images

    frames = smooth_gray(12, 16, 16)
    for i, frame in enumerate(frames):
        write_image(tmp_path / f"f{i}.png", frame)
    decoded: list[str] = []
    real = images.decode_image

    def counting(path: Path) -> np.ndarray:
        decoded.append(path.name)
        return real(path)

    monkeypatch.setattr(images, "decode_image", counting)
    scan = load_scan(tmp_path)
    np.testing.assert_array_equal(scan.frame(7), frames[7])
    assert decoded == ["f0.png", "f7.png"]  # the first (dtype, colour) and the one asked for
