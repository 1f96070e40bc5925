"""A user's own labelled data: masks read as stored, fixed splits, multi-class end to end.

Data: two-structure phantoms from the simulator (:mod:`usfm_core.sim.structures`: cysts = 1,
echogenic masses = 2, palette PNG masks, a fixed test split in the manifest).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from usfm_core.errors import ConfigError, USFMError
from usfm_core.finetune.data import LabelledSet, read_mask, resolve_splits
from usfm_core.models.serialization import register_model
from usfm_core.sim.structures import palette_png, simulate_structures, write_structures_folder


@dataclass
class ConvCfg:
    width: int = 16
    in_chans: int = 1

    def to_dict(self) -> dict:
        return {"width": self.width, "in_chans": self.in_chans}

    @classmethod
    def from_dict(cls, d: dict) -> ConvCfg:
        return cls(**d)


@dataclass
class _Out:
    features: list
    global_token: torch.Tensor


class ConvBackbone(nn.Module):
    """Small CNN backbone (4 stages, strides 4–32, two convs each): fast on one CPU thread."""

    def __init__(self, cfg: ConvCfg | None = None):
        super().__init__()
        self.config = cfg or ConvCfg()
        w = self.config.width
        self.out_dims = [w, 2 * w, 4 * w, 8 * w]
        chans = [self.config.in_chans, *self.out_dims]
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=4 if i == 0 else 2, padding=1),
                nn.GELU(),
                nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1),
                nn.GELU(),
            )
            for i in range(4)
        )

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return _Out(feats, x.mean((2, 3)))


register_model("multiclass-test-conv", ConvBackbone, ConvCfg)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """60 two-structure phantoms at 64², last 12 = the manifest's fixed test split."""
    return write_structures_folder(tmp_path_factory.mktemp("phantoms"), n=60, size=64, seed=0)


# ------------------------------------------------------------------ masks read as stored


def _item_set(tmp_path: Path, mask_file: str, classes: dict | None = None) -> LabelledSet:
    img = np.zeros((8, 8), np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    (tmp_path / "manifest.csv").write_text(f"image,mask\nimg.png,{mask_file}\n")
    if classes is not None:
        (tmp_path / "classes.json").write_text(json.dumps(classes))
    return LabelledSet.from_folder(tmp_path)


def test_palette_mask_gives_indices_not_gray_levels(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[:4], mask[4:, :4] = 1, 2
    (tmp_path / "m.png").write_bytes(palette_png(mask))
    assert Image.open(tmp_path / "m.png").mode == "P"
    ds = _item_set(tmp_path, "m.png")
    np.testing.assert_array_equal(read_mask(ds.items[0]), mask)
    assert ds.resolve_mask_classes() == ["background", "class1", "class2"]


def test_16bit_values_mapped_by_classes_json_and_mismatch_named(tmp_path):
    mask = np.zeros((8, 8), np.uint16)
    mask[:2], mask[2:4] = 1000, 2000
    Image.fromarray(mask).save(tmp_path / "m16.png")
    ds = _item_set(tmp_path, "m16.png", {"1000": "liver", "2000": "kidney"})
    assert ds.mask_classes == ["background", "liver", "kidney"]
    labels = read_mask(ds.items[0])
    assert labels.dtype == np.int64 and set(np.unique(labels)) == {0, 1, 2}
    assert (labels[:2] == 1).all() and (labels[2:4] == 2).all()
    # A declaration that does not match the stored values: the error names file and values.
    (tmp_path / "classes.json").write_text(json.dumps(["background", "liver"]))
    ds = LabelledSet.from_folder(tmp_path)
    with pytest.raises(USFMError) as err:
        read_mask(ds.items[0])
    msg = str(err.value)
    assert "m16.png" in msg and "1000" in msg and "2000" in msg and "[0, 1]" in msg


def test_binary_0_255_and_manifest_classes_column(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    Image.fromarray(mask).save(tmp_path / "b.png")
    ds = _item_set(tmp_path, "b.png")
    assert ds.resolve_mask_classes() == ["background", "foreground"]
    assert set(np.unique(read_mask(ds.items[0]))) == {0, 1}
    (tmp_path / "manifest.csv").write_text("image,mask,classes\nimg.png,b.png,255=lesion\n")
    ds = LabelledSet.from_folder(tmp_path)
    assert ds.mask_classes == ["background", "lesion"] and ds.mask_values == [0, 255]
    assert read_mask(ds.items[0]).max() == 1


def test_simulated_structures_are_two_classes_of_lesions():
    image, mask = simulate_structures(3, size=64)
    assert image.shape == mask.shape == (64, 64) and image.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1, 2} and mask.any()
    # Cysts are anechoic: darker than the echogenic masses where both occur.
    image, mask = next(
        (im, m) for im, m in (simulate_structures(s, 64) for s in range(20)) if {1, 2} <= set(m.flat)
    )
    assert image[mask == 1].mean() < image[mask == 2].mean()


# ------------------------------------------------------------------ fixed splits


def test_split_column_honoured_val_drawn_from_train(phantoms):
    ds = LabelledSet.from_folder(phantoms)
    ds.resolve_mask_classes()
    rows = list(csv.DictReader(open(phantoms / "manifest.csv")))
    manifest_test = {r["image"] for r in rows if r["split"] == "test"}
    splits, rule = resolve_splits(ds)
    assert rule.startswith("manifest split column") and "val drawn from train" in rule
    keys = {k: {ds.items[i].key for i in v} for k, v in splits.items()}
    assert keys["test"] == manifest_test and len(manifest_test) == 12
    assert keys["val"] and not keys["val"] & keys["train"]
    assert not (keys["train"] | keys["val"]) & manifest_test


def test_splits_file_and_bad_split_values(phantoms, tmp_path):
    ds = LabelledSet.from_folder(phantoms)
    keys = [it.key for it in ds.items]
    doc = {"train": keys[:30], "val": keys[30:40], "test": keys[40:]}
    (tmp_path / "splits.json").write_text(json.dumps(doc))
    splits, rule = resolve_splits(ds, splits_file=tmp_path / "splits.json")
    assert rule.startswith("splits file") and splits["test"] == list(range(40, 60))
    (tmp_path / "bad.json").write_text(json.dumps({"train": keys[:45], "test": keys[40:]}))
    with pytest.raises(ConfigError, match="test split"):
        resolve_splits(ds, splits_file=tmp_path / "bad.json")
    bad = tmp_path / "bad_data"
    bad.mkdir()
    rows = (phantoms / "manifest.csv").read_text().replace(",test\n", ",holdout\n")
    (bad / "manifest.csv").write_text(rows)
    for sub in ("images", "masks"):
        (bad / sub).symlink_to(phantoms / sub)
    with pytest.raises(ConfigError, match="holdout"):
        LabelledSet.from_folder(bad)
