"""``usfm-core demo``: the newcomer's headless walkthrough runs the steps it announces."""

from __future__ import annotations

import csv

import pytest

from usfm_core.cli import main


@pytest.mark.slow
def test_demo_runs_exactly_the_announced_steps(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--threads", "1", "demo", "--out", str(out), "--tiny-pretrain", "--steps", "7"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "for 7 steps" in printed and "note:" not in printed
    with open(out / "run" / "log.csv", encoding="utf-8", newline="") as fh:
        steps = [int(float(row["step"])) for row in csv.DictReader(fh)]
    assert max(steps) == 7  # it used to stop at the data-derived 2 epochs (24 of 30)
    assert (out / "inspect.png").stat().st_size > 10_000


@pytest.mark.slow
def test_demo_shows_the_shipped_pretrained_backbone_by_default(tmp_path, capsys):
    """Without --tiny-pretrain nothing is pretrained: the maps are the shipped backbone's."""
    out = tmp_path / "demo"
    assert main(["--threads", "1", "demo", "--out", str(out), "--frames", "8"]) == 0
    printed = capsys.readouterr().out
    assert "openus-small-fast, pretrained" in printed and "pretraining a tiny" not in printed
    assert not (out / "run").exists()
    assert (out / "inspect.png").stat().st_size > 10_000
