"""``usfm-core info``: scan description and compute report through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from usfm_core.cli import main
from usfm_core.io import write_dicom, write_nifti


def _cine(tmp_path: Path) -> Path:
    frames = np.random.default_rng(1).integers(0, 255, (4, 24, 32), dtype=np.uint8)
    return write_dicom(tmp_path / "cine.dcm", frames, spacing_mm=(0.125, 0.25), fps=40.0)


def test_info_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(_cine(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "kind:        cine" in out and "format:      dicom" in out
    assert "shape:       (4, 24, 32)  (gray)" in out
    assert "dy=0.125 mm, dx=0.25 mm" in out and "fps:         40" in out
    assert "transfer_syntax: Explicit VR Little Endian" in out
    assert "compute:" in out and "torch:" in out and "selective scan:" in out


def test_info_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vol = write_nifti(tmp_path / "v.nii.gz", np.zeros((3, 8, 9), np.uint8), (1.5, 0.5, 0.25))
    assert main(["info", str(vol), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    scan = report["scan"]
    assert scan["kind"] == "volume" and scan["shape"] == [3, 8, 9]
    assert scan["spacing_mm"] == pytest.approx([0.5, 0.25])
    assert scan["slice_spacing_mm"] == pytest.approx(1.5)
    assert isinstance(report["compute"]["cuda_available"], bool)
    assert report["compute"]["torch"]


def test_info_without_file_reports_compute_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scan"] is None and "selective_scan" in report["compute"]


def test_info_bad_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.mp4"
    assert main(["info", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "missing.mp4: no such file" in err and "Traceback" not in err


def test_global_threads_option_sets_torch_threads(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "info"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["--threads", "0", "info"])
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_info_prints_no_patient_identifiers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pydicom

    path = _cine(tmp_path)
    ds = pydicom.dcmread(path)
    phi = {
        "PatientName": "DOE^JANE",
        "PatientID": "MRN55501234",
        "PatientBirthDate": "19650412",
        "StudyDate": "20240102",
        "SeriesDate": "20240103",
        "AccessionNumber": "ACC4242",
        "InstitutionName": "Example General Hospital",
        "ReferringPhysicianName": "HOUSE^GREGORY",
        "SeriesDescription": "breast DOE JANE left",
        "StudyDescription": "follow-up MRN55501234",
        "OperatorsName": "SONO^SAM",
    }
    for name, value in phi.items():
        setattr(ds, name, value)
    ds.save_as(path)
    for argv in (["info", str(path)], ["info", str(path), "--json"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "Manufacturer" in out and "transfer_syntax" in out  # technical fields stay
        for value in phi.values():
            for token in value.replace("^", " ").split():
                if len(token) > 3 and token not in ("breast", "left", "follow-up"):
                    assert token not in out, (token, argv)
    assert "StudyDate" not in out and "SeriesDescription" not in out


def test_info_malformed_and_huge_inputs_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pydicom
    from pydicom.dataelem import RawDataElement

    path = _cine(tmp_path)
    ds = pydicom.dcmread(path)
    tag = pydicom.tag.Tag("NumberOfFrames")
    ds._dict[tag] = RawDataElement(tag, "IS", 4, b"abc ", 0, False, True)
    ds.save_as(path)
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert "cine.dcm: DICOM field NumberOfFrames is malformed" in err
    assert "Traceback" not in err
    huge = tmp_path / "huge.png"
    # PNG header declaring 30000 x 30000 RGB (2.5 GB decoded) on a 60-byte file.
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    huge.write_bytes(
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    )
    assert main(["info", str(huge)]) == 1
    err = capsys.readouterr().err
    assert "huge.png: one frame (30000x30000x3" in err and "USFM_MAX_FRAME_MB" in err


def test_info_reports_reader_warnings_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pydicom
    from pydicom.dataelem import RawDataElement

    path = _cine(tmp_path)
    ds = pydicom.dcmread(path)
    del ds.CineRate, ds.RecommendedDisplayFrameRate
    tag = pydicom.tag.Tag("FrameTime")
    ds._dict[tag] = RawDataElement(tag, "DS", 4, b"fast", 0, False, True)
    ds.save_as(path)
    assert main(["info", str(path)]) == 0
    captured = capsys.readouterr()
    assert "fps:         -" in captured.out
    [line] = [x for x in captured.err.splitlines() if "FrameTime" in x]
    assert line.startswith("usfm-core info: warning: ") and "cine.dcm: ignoring malformed" in line
