"""Failure counts, tails and worst images of the evaluate report (issue #14 item 4), on real
segmentations of a small labelled folder whose failures are known by construction."""

from __future__ import annotations

import csv
import io
import math

import cv2
import numpy as np
import pytest
import torch

PX = 0.5  # mm per pixel
R = 12  # disc radius in pixels


class ThresholdSegmenter(torch.nn.Module):
    """A one-structure segmenter that marks pixels brighter than grey 128: logits ``(B, 1, S,
    S)`` from the normalised image ``(B, 1, S, S)`` (``gray / 127.5 - 1``)."""

    task = "segmentation"
    n_classes = 1
    input_size = 64
    classes: list[str] = []  # noqa: RUF012

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.004) * 20


class MeanClassifier(torch.nn.Module):
    """Two classes from the mean brightness: logits ``(B, 2)``; brighter than ``cut`` = 0."""

    task = "classification"
    n_classes = 2
    input_size = 64

    def __init__(self, cut: float, classes: list[str]):
        super().__init__()
        self.cut, self.classes = cut, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([(m - self.cut) * 40, (self.cut - m) * 40], 1)


@pytest.fixture(scope="module")
def known_failures(tmp_path_factory):
    """11 images 96×96 (dark background, 0/255 masks, pixel 0.5 mm, reference HC):

    * 0–5: a bright disc and its mask (found: Dice ≈ 1, HC ≈ reference);
    * 6, 7: a dim disc (grey 70, below the threshold): missed, empty prediction, Dice 0;
    * 8: a bright disc whose mask is shifted by 1.2 radii (Dice ≈ 0.25), HC still right;
    * 9: reference HC 15 mm too large (Dice ≈ 1, |HC error| ≈ 15 mm);
    * 10: no structure, a bright blob (false positive on an empty ground truth);
    * 11: no structure, nothing bright.
    """
    root = tmp_path_factory.mktemp("known")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    ref_hc = 2 * math.pi * R * PX
    lines = ["image,mask,pixel_size_mm,head_circumference_mm"]
    for i in range(12):
        img = np.full((96, 96), 30, np.uint8) + rng.integers(0, 10, (96, 96), dtype=np.uint8)
        mask = np.zeros((96, 96), np.uint8)
        centre = (48, 48)
        if i <= 9:
            cv2.circle(img, centre, R, 70 if i in (6, 7) else 220, -1)
            shift = int(1.2 * R) if i == 8 else 0
            cv2.circle(mask, (48 + shift, 48), R, 255, -1)
        if i == 10:
            cv2.circle(img, centre, 6, 220, -1)
        hc = f"{ref_hc + (15.0 if i == 9 else 0.0):.3f}" if i <= 9 else ""  # none: no head
        cv2.imwrite(str(root / f"images/{i:02d}.png"), img)
        cv2.imwrite(str(root / f"masks/{i:02d}.png"), mask)
        lines.append(f"images/{i:02d}.png,masks/{i:02d}.png,{PX},{hc}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def test_failure_counts_tails_and_worst_images(known_failures):
    from usfm_core.evaluate.report import _seg_scorer, _summary_md
    from usfm_core.finetune.data import LabelledSet

    data = LabelledSet.from_folder(known_failures, "segmentation")
    m, rows = _seg_scorer(ThresholdSegmenter(), data, list(range(12)), None, "cpu", 4)
    assert len(rows) == 12
    by_name = {r["image"]: r for r in rows}
    for i in range(6):
        assert by_name[f"images/{i:02d}.png"]["dice"] > 0.9
    assert by_name["images/08.png"]["dice"] == pytest.approx(0.25, abs=0.1)

    assert m["n_scored"] == 10 and m["n_empty_gt"] == 2
    assert m["n_empty_pred"] == 2  # the dim discs
    assert m["n_dice_below_0.1"] == 2
    assert m["n_dice_below_0.5"] == 3  # + the shifted mask
    assert m["n_fp_on_empty_gt"] == 1  # the blob on image 10, not the empty image 11
    # Tails over the 10 scored images: two zeros and one ~0.25 sit in the low tail.
    dice = np.array([by_name[f"images/{i:02d}.png"]["dice"] for i in range(10)])
    assert m["dice_p10"] == pytest.approx(np.percentile(dice, 10))
    assert m["dice_p10"] == pytest.approx(0.0, abs=1e-9)
    assert m["dice_median"] > 0.9 and m["dice_p90"] >= m["dice_median"]
    # HD95 is defined where both masks are non-empty: 8 images; the shifted one is the p90.
    assert m["hd95_p10"] < 1.5 and m["hd95_p90"] > 2.0
    worst = [w["image"] for w in m["worst"]]
    assert len(worst) == 10 and set(worst[:2]) == {"images/06.png", "images/07.png"}
    assert worst[2] == "images/08.png"
    assert [w["dice"] for w in m["worst"]] == sorted(w["dice"] for w in m["worst"])

    # |HC error| > 10 mm: the two misses (circumference 0 vs 37.7 mm) and image 9 (+15 mm).
    assert m["n_hc_error_over_10mm"] == 3
    hc_worst = [w["image"] for w in m["worst_hc"]]
    assert set(hc_worst[:2]) == {"images/06.png", "images/07.png"}
    assert hc_worst[2] == "images/09.png"
    assert abs(m["worst_hc"][2]["hc_error_mm"]) == pytest.approx(15.0, abs=2.0)
    abs_err = np.abs([r["hc_error_mm"] for r in rows if "hc_error_mm" in r])
    assert len(abs_err) == 10
    assert m["hc_error_mm_p90"] == pytest.approx(np.percentile(abs_err, 90))
    assert m["hc_error_mm_p10"] <= m["hc_error_mm_median"] <= m["hc_error_mm_p90"]

    summary = _summary_md(
        {
            "task": "segmentation",
            "split": "all",
            "n": 12,
            "model": "thr",
            "clean": m,
            "corrupted": {},
        }
    )
    assert "| thr | 10 | 3 | 2 | 2 | 2 | 1 |" in summary
    assert "Worst 10 images of thr (lowest Dice):" in summary
    assert "| images/08.png |" in summary
    assert "Worst 10 images of thr (largest |HC error|):" in summary


def test_per_image_csv_and_classification_failures(known_failures, tmp_path):
    """The per-image CSV keeps every row; the classifier's own pass matches fine-tuning's
    validation metrics and names its misclassified items."""
    from usfm_core.evaluate.report import _cls_scorer, _rows_csv
    from usfm_core.finetune.data import LabelledSet, SupervisedDataset
    from usfm_core.finetune.train import evaluate_split

    rows = [
        {"image": "a.png", "gt_empty": False, "dice": 0.5, "hd95": float("nan")},
        {"image": "b.png", "gt_empty": True, "dice": float("nan"), "hd95": 1.25},
    ]
    table = list(csv.DictReader(io.StringIO(_rows_csv(rows))))
    assert table == [
        {"image": "a.png", "gt_empty": "0", "dice": "0.5", "hd95": ""},
        {"image": "b.png", "gt_empty": "1", "dice": "", "hd95": "1.25"},
    ]

    # Images 0-5, 8 and 9 hold a bright disc (mean grey ≈ 43): class "bright"; the dim discs
    # and the empty images stay near 35: "dark". Image 9 is labelled dark: one mistake.
    root = tmp_path / "cls"
    root.mkdir()
    (root / "images").symlink_to(known_failures / "images")
    labels = ["dark" if i in (6, 7, 9, 10, 11) else "bright" for i in range(12)]
    (root / "manifest.csv").write_text(
        "image,label\n" + "".join(f"images/{i:02d}.png,{lab}\n" for i, lab in enumerate(labels))
    )
    data = LabelledSet.from_folder(root, "classification")
    model = MeanClassifier(-0.7, ["bright", "dark"])
    m, per_item = _cls_scorer(model, data, list(range(12)), None, "cpu", 4)
    ref = evaluate_split(
        model,
        SupervisedDataset(data, list(range(12)), "classification", 64),
        "classification",
        4,
        "cpu",
    )
    for key in ("accuracy", "macro_f1", "loss"):
        assert m[key] == pytest.approx(ref[key], abs=1e-6)
    assert m["n_wrong"] == 1 and m["accuracy"] == pytest.approx(11 / 12)
    assert m["worst"][0]["image"] == "images/09.png"
    assert m["worst"][0]["label"] == "dark" and m["worst"][0]["predicted"] == "bright"
    assert len(per_item) == 12 and all(0.0 <= r["p_true"] <= 1.0 for r in per_item)
