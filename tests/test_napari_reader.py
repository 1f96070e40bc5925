"""napari reader: get_reader on files written by the tests, layer tuples, napari accepts them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_usfm._reader import get_reader
from usfm_core.errors import ScanReadError
from usfm_core.io import LazyFrames, write_dicom, write_image, write_nifti, write_video


def _frames(n: int = 5, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (n, h, w), dtype=np.uint8)


def test_dicom_cine_layer(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "heart.dcm", _frames(), spacing_mm=(0.2, 0.3), fps=50)
    reader = get_reader(str(path))
    assert callable(reader)
    [(data, kwargs, layer_type)] = reader(str(path))
    assert layer_type == "image" and isinstance(data, LazyFrames) and data.shape == (5, 24, 32)
    assert kwargs["scale"] == pytest.approx((1.0, 0.2, 0.3))
    assert kwargs["units"] == ("pixel", "mm", "mm")
    assert kwargs["axis_labels"] == ("t", "y", "x")
    assert kwargs["rgb"] is False and kwargs["name"] == "heart"
    meta = kwargs["metadata"]
    assert meta["fps"] == pytest.approx(50) and meta["source_path"] == str(path)
    assert meta["kind"] == "cine" and meta["spacing_mm"] == pytest.approx((0.2, 0.3))


def test_volume_and_single_image_layers(tmp_path: Path) -> None:
    vol = write_nifti(tmp_path / "v.nii.gz", _frames(4), (2.0, 0.5, 0.25))
    [(vol_data, kwargs, _)] = get_reader([str(vol)])([str(vol)])
    assert vol_data.shape == (4, 24, 32)
    assert kwargs["scale"] == pytest.approx((2.0, 0.5, 0.25))
    assert kwargs["axis_labels"] == ("z", "y", "x") and kwargs["units"] == ("mm", "mm", "mm")
    assert kwargs["name"] == "v"
    rgb = np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    png = write_image(tmp_path / "one.png", rgb)
    [(img, kwargs, _)] = get_reader(png)(png)
    assert isinstance(img, np.ndarray) and img.shape == (24, 32, 3)
    np.testing.assert_array_equal(img, rgb)
    assert kwargs["rgb"] is True and kwargs["axis_labels"] == ("y", "x")
    assert kwargs["units"] == ("pixel", "pixel")  # uncalibrated PNG


def test_get_reader_declines_without_raising(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a scan")
    (tmp_path / "empty_dir").mkdir()
    for path in (str(text), str(tmp_path / "nope.dcm"), [], str(tmp_path / "empty_dir"), 42, None):
        assert get_reader(path) is None
    # Reading a file that only looks right raises the project's readable error.
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"garbage" * 100)
    reader = get_reader(str(fake))
    with pytest.raises(ScanReadError, match=r"fake\.mp4"):
        reader(str(fake))


def test_napari_layer_accepts_kwargs_and_stays_lazy(tmp_path: Path) -> None:
    layers = pytest.importorskip("napari.layers")
    path = write_video(tmp_path / "cine.avi", _frames(30), fps=25)
    [(data, kwargs, _)] = get_reader(path)(path)
    decoded: list[int] = []
    real_read = data._source.read

    def counting(index: int) -> np.ndarray:
        decoded.append(index)
        return real_read(index)

    data._source.read = counting
    layer = layers.Image(data, **kwargs)
    assert layer.ndim == 3 and layer.data is data
    assert tuple(layer.axis_labels) == ("t", "y", "x")
    assert [str(u) for u in layer.units] == ["pixel", "pixel", "pixel"]
    assert layer.metadata["fps"] == pytest.approx(25)
    assert len(set(decoded)) <= 1  # napari shows frame 0 only; the other 29 stay on disk
    dicom = write_dicom(tmp_path / "c.dcm", _frames(3), spacing_mm=(0.1, 0.2), fps=10)
    [(data, kwargs, _)] = get_reader(dicom)(dicom)
    layer = layers.Image(data, **kwargs)
    assert list(layer.scale) == pytest.approx([1.0, 0.1, 0.2])
    assert [str(u) for u in layer.units][1:] == ["millimeter", "millimeter"]


def test_manifest_points_to_reader() -> None:
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(
        Path(__file__).resolve().parents[1] / "src" / "napari_usfm" / "napari.yaml"
    )
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    [reader] = manifest.contributions.readers
    assert commands[reader.command] == "napari_usfm._reader:get_reader"
    assert reader.accepts_directories


def _raw(path: Path, keyword: str, vr: str, value: bytes) -> Path:
    """Store ``value`` verbatim as DICOM element ``keyword`` (no validation)."""
    import pydicom
    from pydicom.dataelem import RawDataElement

    ds = pydicom.dcmread(path)
    tag = pydicom.tag.Tag(keyword)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    ds.save_as(path)
    return path


def test_bad_calibration_gives_a_finite_pixel_scale(tmp_path: Path) -> None:
    from usfm_core.errors import ScanWarning

    path = write_dicom(
        tmp_path / "c.dcm", _frames(3), fps=20, spacing_in="pixel_spacing", spacing_mm=(0.2, 0.2)
    )
    _raw(path, "PixelSpacing", "DS", b"inf\\inf ")
    with pytest.warns(ScanWarning, match=r"c\.dcm: ignoring implausible DICOM PixelSpacing"):
        [(data, kwargs, _)] = get_reader(path)(path)
    assert kwargs["scale"] == (1.0, 1.0, 1.0) and kwargs["units"] == ("pixel", "pixel", "pixel")
    assert kwargs["metadata"]["spacing_mm"] is None and data.shape == (3, 24, 32)


def test_malformed_dicom_is_a_readable_error(tmp_path: Path) -> None:
    path = _raw(write_dicom(tmp_path / "bad.dcm", _frames(3)), "NumberOfFrames", "IS", b"abc ")
    reader = get_reader(path)
    with pytest.raises(ScanReadError, match=r"bad\.dcm: DICOM field NumberOfFrames is malformed"):
        reader(path)
