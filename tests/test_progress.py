"""Progress display of long commands (issue 16 item 2): a bar with rate and ETA on a terminal,
plain lines and a summary in logs, nothing with --no-progress; segment and preprocess use it."""

from __future__ import annotations

import io
import re
import sys

import cv2
import numpy as np
import pytest

from usfm_core.progress import PlainProgress, format_seconds, progress_bar, progress_mode


class FakeTTY(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("USFM_PROGRESS", raising=False)
    monkeypatch.delenv("USFM_PROGRESS_INTERVAL", raising=False)


def test_mode_follows_the_stream_and_the_environment(monkeypatch):
    assert progress_mode(FakeTTY()) == "bar"
    assert progress_mode(io.StringIO()) == "plain"
    assert progress_mode(FakeTTY(), mode="off") == "off"
    monkeypatch.setenv("USFM_PROGRESS", "plain")
    assert progress_mode(FakeTTY()) == "plain"
    monkeypatch.setenv("USFM_PROGRESS", "nonsense")  # ignored: automatic choice
    assert progress_mode(FakeTTY()) == "bar"
    with pytest.raises(ValueError, match="progress mode"):
        progress_mode(io.StringIO(), mode="fast")


def test_terminal_gets_a_bar_with_rate_and_eta():
    stream = FakeTTY()
    with progress_bar(4, desc="segment", unit="frame", stream=stream) as bar:
        for _ in range(4):
            bar.update(1)
            bar.refresh()
    text = stream.getvalue()
    assert "\r" in text and "segment" in text and "4/4" in text
    assert re.search(r"\d+:\d\d<\d+:\d\d", text)  # elapsed<remaining (ETA)
    assert re.search(r"frame/s", text)  # rate


def test_log_gets_plain_lines_with_eta_then_a_summary():
    stream = io.StringIO()
    bar = progress_bar(4, desc="evaluate", unit="image", stream=stream, interval_s=0)
    for _ in range(3):
        bar.update(1)
    bar.set_postfix(loss=0.123456)
    bar.update(1)
    bar.close()
    bar.close()  # idempotent
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 5
    assert lines[0].startswith("evaluate: 1/4 image (25%), ") and "image/s" in lines[0]
    assert "ETA" in lines[0] and "loss=0.1235" in lines[3]
    assert re.fullmatch(
        r"evaluate: 4 image in [\d.]+ s \([\d.e+]+ image/s\), loss=0.1235", lines[4]
    )


def test_log_is_quiet_between_intervals_and_off_is_silent(monkeypatch):
    stream = io.StringIO()
    with progress_bar(1000, desc="x", stream=stream) as bar:  # 30 s between lines
        for _ in range(1000):
            bar.update()
    assert len(stream.getvalue().splitlines()) == 1  # only the summary
    monkeypatch.setenv("USFM_PROGRESS_INTERVAL", "0")
    stream = io.StringIO()
    with progress_bar(3, stream=stream) as bar:
        bar.update(3)
    assert len(stream.getvalue().splitlines()) == 2
    stream = io.StringIO()
    with progress_bar(3, stream=FakeTTY(), enabled=False) as bar:
        bar.update(3)
    assert isinstance(bar, PlainProgress) and stream.getvalue() == ""


def test_unknown_total_and_durations():
    bar = PlainProgress(None, desc="pretrain", unit="step", silent=True)
    bar.update(5)
    line = bar.status_line()
    assert line.startswith("pretrain: 5 step, ") and "ETA" not in line
    assert format_seconds(4.25) == "4.2 s" and format_seconds(42) == "42 s"
    assert format_seconds(185) == "3 min 05 s" and format_seconds(7620) == "2 h 07 min"


# --- the commands -------------------------------------------------------------------------------


@pytest.fixture
def tiny_model(tmp_path):
    import torch

    from usfm_core.finetune.models import Segmenter, save_finetuned
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    torch.manual_seed(0)
    backbone = VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8))
    model = Segmenter(backbone, 1, "conv").eval()
    model.input_size = 64
    save_finetuned(model, tmp_path / "model")
    return tmp_path / "model"


def _inputs(tmp_path):
    """A 3-frame DICOM cine, two images and a broken file."""
    from usfm_core.io import write_dicom

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    write_dicom(tmp_path / "in" / "cine.dcm", rng.integers(0, 255, (3, 48, 64), np.uint8))
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / "in" / name), rng.integers(0, 255, (40, 56), np.uint8))
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return sorted((tmp_path / "in").iterdir())


def test_segment_progress_in_a_log_counts_frames(tmp_path, tiny_model, capsys, monkeypatch):
    from usfm_core.cli import main

    monkeypatch.setenv("USFM_PROGRESS_INTERVAL", "0")  # a line per update, to check the totals
    inputs = _inputs(tmp_path)
    rc = main(["segment", str(tiny_model), *map(str, inputs), "--out", str(tmp_path / "o")])
    assert rc == 1  # the broken file
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("segment: ")]
    # 4 inputs counted as 1 frame each until opened (a, b, broken, cine): the broken one
    # leaves the total, the 3-frame cine adds 2.
    assert re.search(r"segment: 5 frame in [\d.]+ s", lines[-1])
    assert lines[0].startswith("segment: 1/4 frame (25%)") and "ETA" in lines[0]
    assert any(line.startswith("segment: 5/5 frame (100%)") for line in lines)
    assert "1 of 4 input(s) failed" in err


def test_segment_progress_on_a_terminal_and_off(tmp_path, tiny_model, capsys, monkeypatch):
    from usfm_core.cli import main

    inputs = [p for p in _inputs(tmp_path) if p.name != "broken.png"]
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    rc = main(["segment", str(tiny_model), *map(str, inputs), "--out", str(tmp_path / "o")])
    assert rc == 0
    text = tty.getvalue()
    assert "5/5" in text and "frame/s" in text and re.search(r"<\d+:\d\d", text)
    tty.seek(0)
    tty.truncate()
    args = ["segment", str(tiny_model), *map(str, inputs), "--out", str(tmp_path / "o2")]
    assert main([*args, "--no-progress"]) == 0
    shown = [ln for ln in tty.getvalue().splitlines() if not ln.startswith("warning:")]
    assert not any("frame" in ln for ln in shown)  # no bar (warnings may name frames)


def test_preprocess_progress_in_a_log(tmp_path, capsys):
    from usfm_core.cli import main

    rng = np.random.default_rng(1)
    (tmp_path / "raw").mkdir()
    for i in range(2):
        cv2.imwrite(str(tmp_path / "raw" / f"s{i}.png"), rng.integers(0, 255, (48, 64), np.uint8))
    args = ["preprocess", str(tmp_path / "raw"), str(tmp_path / "prep"), "--no-text-removal"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert re.search(r"preprocess: 2 scan in [\d.]+ s", err) and "\r" not in err
    assert main([*args, "--no-progress"]) == 0
    assert "preprocess:" not in capsys.readouterr().err
