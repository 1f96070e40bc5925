"""End-to-end CLI: finetune (ratios) → evaluate (+ corruptions) → label efficiency."""

from __future__ import annotations

import csv
import json
import re

import cv2
import numpy as np
import pytest

from usfm_core.cli import main


@pytest.fixture(scope="module")
def disc_folder(tmp_path_factory):
    """20 labelled 64×64 images: a bright disc (lesion) on speckle-like noise, 0/255 masks."""
    root = tmp_path_factory.mktemp("discs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    lines = ["image,mask,label,group,pixel_size_mm"]
    for i in range(20):
        label = "big" if i % 2 else "small"
        r = 14 if label == "big" else 7
        cy, cx = rng.integers(18, 46, 2)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.uint8) * 255
        img = np.clip(rng.gamma(2.0, 30, (64, 64)) + (mask > 0) * 100, 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / f"images/{i}.png"), img)
        cv2.imwrite(str(root / f"masks/{i}.png"), mask)
        lines.append(f"images/{i}.png,masks/{i}.png,{label},p{i // 2},0.1")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_finetune_evaluate_label_efficiency_cli(tmp_path, disc_folder):
    run = tmp_path / "run"
    rc = main(
        [
            "finetune",
            "--task",
            "seg",
            "--data",
            str(disc_folder),
            "--out",
            str(run),
            "--label-ratio",
            "0.5",
            "1.0",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--input-size",
            "64",
            "--batch-size",
            "4",
            "--max-steps",
            "1",
            "--device",
            "cpu",
            "--decoder",
            "conv",
        ]
    )
    assert rc == 0
    runs = sorted(p for p in run.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["r0.5_s0", "r1_s0"]
    res = json.loads((runs[0] / "result.json").read_text())
    full = json.loads((runs[1] / "result.json").read_text())
    assert res["n_train"] < full["n_train"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["1"]["val"]["dice"]["n"] == 1

    report = tmp_path / "report"
    rc = main(
        [
            "evaluate",
            str(runs[1] / "model"),
            "--data",
            str(disc_folder),
            "--out",
            str(report),
            "--corruptions",
            "--device",
            "cpu",
            "--max-items",
            "2",
        ]
    )
    assert rc == 0
    metrics = json.loads((report / "metrics.json").read_text())
    splits = json.loads((runs[1] / "splits.json").read_text())["splits"]
    assert metrics["n"] == min(2, len(splits["test"])) and metrics["split"] == "test"
    assert set(metrics["corrupted"]) == {"blur", "contrast", "speckle"}
    assert set(metrics["corrupted"]["blur"]) == {"1", "2", "3"}
    assert 0.0 <= metrics["clean"]["dice"] <= 1.0
    assert "| clean |" in (report / "summary.md").read_text()
    assert (report / "robustness.png").stat().st_size > 1000
    assert (report / "overlays.png").stat().st_size > 1000

    # A fake second seed at ratio 1 checks the mean ± std over seeds.
    seed1 = tmp_path / "r1_s1"
    seed1.mkdir()
    fake = dict(full, seed=1, test_metrics={"dice": full["test_metrics"]["dice"] + 0.2})
    (seed1 / "result.json").write_text(json.dumps(fake))
    le = tmp_path / "le"
    assert (
        main(["evaluate", "--label-efficiency", *map(str, runs), str(seed1), "--out", str(le)]) == 0
    )
    doc = json.loads((le / "label_efficiency.json").read_text())
    assert set(doc["ratios"]) == {"0.5", "1"} and doc["ratios"]["1"]["n"] == 2
    d1 = full["test_metrics"]["dice"]
    assert doc["ratios"]["1"]["mean"] == pytest.approx(d1 + 0.1)
    assert doc["ratios"]["1"]["std"] == pytest.approx(0.2 / np.sqrt(2))
    assert (le / "label_efficiency.png").is_file()


def test_evaluate_cli_errors(tmp_path, capsys):
    assert (
        main(["evaluate", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "r")])
        == 1
    )
    assert "config.json" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp_path / "r")]) == 1
    assert main(["evaluate", "--label-efficiency", str(tmp_path), "--out", str(tmp_path)]) == 1
    assert "result.json" in capsys.readouterr().err


@pytest.mark.slow
def test_classifier_report_with_corruptions(tmp_path, disc_folder):
    """A saved VMamba classifier scored on a labelled folder without splits.json: refused for
    "test" (it cannot tell which items those are), every item with split="all"."""
    import torch

    from usfm_core.errors import ConfigError
    from usfm_core.evaluate.report import evaluate_model_dir
    from usfm_core.finetune.models import Classifier, load_backbone, save_finetuned
    from usfm_core.models.serialization import save_model
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    torch.manual_seed(0)
    save_model(
        VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8)), tmp_path / "pre" / "backbone"
    )
    backbone = load_backbone(tmp_path / "pre")  # a pretrain run folder
    clf = Classifier(backbone, 2)
    clf.classes, clf.input_size = ["big", "small"], 64
    save_finetuned(clf, tmp_path / "clf")
    with pytest.raises(ConfigError, match="cannot tell which items"):
        evaluate_model_dir(tmp_path / "clf", disc_folder, tmp_path / "rep")
    res = evaluate_model_dir(
        tmp_path / "clf", disc_folder, tmp_path / "rep", split="all", corruptions=True, max_items=4
    )
    assert res["task"] == "classification" and res["n"] == 4 and res["splits_file"] is None
    for m in [res["clean"], *res["corrupted"]["speckle"].values()]:
        assert 0.0 <= m["accuracy"] <= 1.0 and "macro_f1" in m
    assert "macro_f1" in (tmp_path / "rep" / "summary.md").read_text()
    assert (tmp_path / "rep" / "robustness.png").is_file()


def test_circumference_error_of_an_ellipse_and_of_a_miss():
    """HC18's measure: the ellipse fit of the predicted head vs the reference, in mm."""
    from usfm_core.evaluate.report import circumference_error_mm

    a, b, px = 60, 35, 0.15  # semi-axes in pixels, mm per pixel
    pred = np.zeros((200, 240), np.uint8)
    cv2.ellipse(pred, (120, 100), (a, b), 20, 0, 360, 1, -1)
    ramanujan = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b))) * px
    err = circumference_error_mm(pred, px, ramanujan)
    assert abs(err) < 0.015 * ramanujan
    # Twice the pixel size doubles the measured circumference: error = +reference.
    assert circumference_error_mm(pred, 2 * px, ramanujan) == pytest.approx(ramanujan, rel=0.02)
    # An empty prediction misses the whole head instead of being skipped.
    assert circumference_error_mm(np.zeros_like(pred), px, 150.0) == -150.0


def test_evaluate_with_a_baseline_and_head_circumference(
    tmp_path, disc_folder, capsys, monkeypatch
):
    """Two segmenters scored on the same items; HC error appears when the manifest has it."""
    import shutil

    import torch

    from usfm_core.errors import ConfigError
    from usfm_core.evaluate.report import evaluate_model_dir
    from usfm_core.finetune.models import Classifier, Segmenter, load_finetuned, save_finetuned
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    data = tmp_path / "data"
    shutil.copytree(disc_folder, data)
    rows = (data / "manifest.csv").read_text().splitlines()
    rows = [rows[0] + ",head_circumference_mm"] + [r + f",{10 + i}" for i, r in enumerate(rows[1:])]
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")

    def seg(seed: int, out: str) -> None:
        torch.manual_seed(seed)
        model = Segmenter(VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8)), 1, "conv")
        model.input_size = 64
        save_finetuned(model, tmp_path / out)

    seg(0, "a")
    seg(1, "b")
    monkeypatch.setenv("USFM_PROGRESS", "plain")  # as in a log file
    monkeypatch.setenv("USFM_PROGRESS_INTERVAL", "0")
    res = evaluate_model_dir(
        tmp_path / "a", data, tmp_path / "rep", baseline=tmp_path / "b", max_items=6, split="all"
    )
    # Progress counts every image read: 6 items × (model + baseline), with rate and ETA.
    err = capsys.readouterr().err
    assert "evaluate: 1/12 image" in err and "ETA" in err
    assert re.search(r"evaluate: 12 image in [\d.]+ s", err)
    monkeypatch.setenv("USFM_PROGRESS", "off")
    alone = evaluate_model_dir(tmp_path / "b", data, tmp_path / "rep_b", max_items=6, split="all")
    assert res["baseline"]["clean"] == alone["clean"]
    assert res["clean"] != alone["clean"]
    assert {"hc_error_mm", "hc_error_mm_median", "hc_bias_mm"} <= set(res["clean"])
    assert res["clean"]["hc_error_mm"] >= 0
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "| a | clean |" in summary and "| b | clean |" in summary and "hc_error_mm" in summary
    # Failure counts and tails of both arms, and one per-image CSV row per scored item each.
    assert "Dice<0.5" in summary and "HC err>10 mm" in summary
    assert "Worst 6 images of a (lowest Dice):" in summary
    assert "Worst 6 images of b (lowest Dice):" in summary
    for arm, name in (
        (res["clean"], "per_image.csv"),
        (res["baseline"]["clean"], "per_image_baseline.csv"),
    ):
        rows = list(csv.DictReader(open(tmp_path / "rep" / name)))
        assert len(rows) == 6 and arm["n_scored"] == 6
        low = sum(r["dice"] != "" and float(r["dice"]) < 0.5 for r in rows)
        assert arm["n_dice_below_0.5"] == low
        assert arm["worst"][0]["image"] == min(rows, key=lambda r: float(r["dice"]))["image"]

    # No splits.json, but test items recorded in the model's config.json: exactly those.
    model_a, _ = load_finetuned(tmp_path / "a")
    two_items = {"test_items": ["images/5.png", "images/7.png"]}
    save_finetuned(model_a, tmp_path / "rec", extra=two_items)
    recorded = evaluate_model_dir(tmp_path / "rec", data, tmp_path / "r_rec")
    assert recorded["n"] == 2
    save_finetuned(model_a, tmp_path / "gone", extra={"test_items": ["images/99.png"]})
    with pytest.raises(ConfigError, match="not in this data folder"):
        evaluate_model_dir(tmp_path / "gone", data, tmp_path / "r_gone")
    with pytest.raises(ConfigError, match="cannot tell which items are the 'val' split"):
        evaluate_model_dir(tmp_path / "rec", data, tmp_path / "r_val", split="val")

    # An explicit split file (e.g. a shipped model's, whose folder has no splits.json).
    (tmp_path / "splits.json").write_text(
        json.dumps({"splits": {"test": ["images/3.png", "images/4.png"]}})
    )
    two = evaluate_model_dir(
        tmp_path / "a", data, tmp_path / "r2", splits_file=tmp_path / "splits.json"
    )
    assert two["n"] == 2
    with pytest.raises(ConfigError, match="splits file not found"):
        evaluate_model_dir(
            tmp_path / "a", data, tmp_path / "r2", splits_file=tmp_path / "nope.json"
        )

    torch.manual_seed(0)
    clf = Classifier(VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8)), 2)
    save_finetuned(clf, tmp_path / "clf")
    with pytest.raises(ConfigError, match="classification"):
        evaluate_model_dir(
            tmp_path / "a", data, tmp_path / "r3", baseline=tmp_path / "clf", split="all"
        )
