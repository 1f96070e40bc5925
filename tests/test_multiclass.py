"""A user's own labelled data: masks read as stored, fixed splits, multi-class end to end.

Data: two-structure phantoms from the simulator (:mod:`usfm_core.sim.structures`: cysts = 1,
echogenic masses = 2, palette PNG masks, a fixed test split in the manifest).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnn_backbone import CnnBackbone, CnnCfg
from usfm_core.errors import ConfigError, USFMError
from usfm_core.finetune.data import LabelledSet, read_mask, resolve_splits
from usfm_core.sim.structures import palette_png, simulate_structures, write_structures_folder


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


def test_masks_found_classes_and_gray_level_masks_refused():
    """In-memory masks (the napari path): values 3 and 7 become classes 1 and 2; a mask of
    gray levels (a resized or JPEG mask) is refused rather than read as 200 classes."""
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[:, :4], masks[1, 8:] = 3, 7
    ds = LabelledSet.from_arrays(np.zeros((2, 16, 16), np.uint8), masks=masks)
    assert ds.resolve_mask_classes() == ["background", "class3", "class7"]
    np.testing.assert_array_equal(read_mask(ds.items[1]), (masks[1] == 3) + 2 * (masks[1] == 7))
    gray = np.arange(2 * 16 * 16, dtype=np.int64).reshape(2, 16, 16) % 200
    ds = LabelledSet.from_arrays(np.zeros((2, 16, 16), np.uint8), masks=gray.astype(np.uint8))
    with pytest.raises(ConfigError, match="gray levels"):
        ds.resolve_mask_classes()


def test_simulated_structures_are_two_classes_of_lesions():
    image, mask = simulate_structures(3, size=64)
    assert image.shape == mask.shape == (64, 64) and image.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1, 2} and mask.any()
    # Cysts are anechoic: darker than the echogenic masses where both occur.
    image, mask = next(
        (im, m)
        for im, m in (simulate_structures(s, 64) for s in range(20))
        if {1, 2} <= set(m.flat)
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


# ------------------------------------------------------------------ multi-class end to end


def _manifest_test_keys(root: Path) -> set[str]:
    return {r["image"] for r in csv.DictReader(open(root / "manifest.csv")) if r["split"] == "test"}


def _train_phantoms(phantoms: Path, out: Path, n_classes: int | None, monkeypatch=None):
    """300 steps of a small CNN segmenter (conv decoder) at 64²: ~17 s of CPU on 1 thread."""
    from usfm_core.finetune import train

    seen: list[set[int]] = []
    if monkeypatch is not None:  # record every item the training data set hands out

        class Recording(train.SupervisedDataset):
            def __getitem__(self, i):
                if self.augment:
                    seen.append({self.indices[i]})
                return super().__getitem__(i)

        monkeypatch.setattr(train, "SupervisedDataset", Recording)
    torch.manual_seed(0)
    res = train.finetune(
        "seg",
        phantoms,
        out,
        backbone=CnnBackbone(CnnCfg(width=16, convs=2)),
        n_classes=n_classes,
        decoder="conv",
        epochs=1000,
        max_steps=300,
        val_every=60,
        patience=100,
        lr=2e-3,
        batch_size=8,
        input_size=64,
        device="cpu",
    )
    return res, set().union(*seen) if seen else set()


def _union_scores_per_class(model_dir: Path, phantoms: Path) -> np.ndarray:
    """Dice of the union model's foreground against each structure, over the test items
    holding it (the union model cannot say which structure it found)."""
    from usfm_core.evaluate.metrics import class_scores
    from usfm_core.finetune.data import read_image
    from usfm_core.finetune.infer import segment_frames
    from usfm_core.finetune.models import load_finetuned

    ds = LabelledSet.from_folder(phantoms)
    test = ds.fixed_splits()["test"]
    model, _ = load_finetuned(model_dir)
    preds = segment_frames(model, [read_image(ds.items[i]) for i in test])
    rows = []
    for pred, i in zip(preds, test):
        gt = read_mask(ds.items[i])
        rows.append(
            [class_scores(pred > 0, gt == c, 1, with_hd95=False)["dice"][0] for c in (1, 2)]
        )
    return np.nanmean(np.array(rows, float), axis=0)


@pytest.mark.slow
def test_multiclass_beats_union_per_class_and_test_items_never_train(
    phantoms, tmp_path, monkeypatch
):
    """Fixed test split from the manifest: never trained on, recorded with the model. The
    softmax segmenter (classes from classes.json) beats the union-trained one on each class
    of the test split, scored by ``evaluate`` (each class over the images holding it)."""
    from usfm_core.evaluate.report import evaluate_model_dir

    torch.set_num_threads(1)
    test_keys = _manifest_test_keys(phantoms)
    res, trained_on = _train_phantoms(phantoms, tmp_path / "multi", None, monkeypatch)
    ds = LabelledSet.from_folder(phantoms)
    assert trained_on and not {ds.items[i].key for i in trained_on} & test_keys
    run_splits = json.loads(res.splits_path.read_text())
    assert set(run_splits["splits"]["test"]) == test_keys
    assert not (set(run_splits["splits"]["train"]) | set(run_splits["splits"]["val"])) & test_keys
    extra = json.loads((res.model_dir / "config.json").read_text())["extra"]
    assert extra["split_rule"].startswith("manifest split column")
    assert set(extra["test_items"]) == test_keys
    assert extra["mask_classes"] == ["background", "cyst", "echogenic"]
    # two structures: the cross-entropy is class-weighted by default (sqrt median frequency)
    bg, cyst, echo = extra["ce_weights"]
    assert bg < 1 <= min(cyst, echo) and max(cyst, echo) > 1  # the median class gets 1
    assert res.classes == ["background", "cyst", "echogenic"]
    rows = list(csv.DictReader(open(res.history_path)))
    assert [int(r["step"]) for r in rows] == [60, 120, 180, 240, 300]  # --val-every 60
    assert {"val_dice_cyst", "val_dice_echogenic"} <= set(rows[0])

    # The saved model is the selected one (validated mid-epoch, every 60 steps).
    from usfm_core.finetune.data import SupervisedDataset
    from usfm_core.finetune.models import load_finetuned
    from usfm_core.finetune.train import evaluate_split

    assert res.best_step in (60, 120, 180, 240, 300)
    ds.resolve_mask_classes()
    index = {it.key: i for i, it in enumerate(ds.items)}
    val_idx = [index[k] for k in run_splits["splits"]["val"]]
    val_ds = SupervisedDataset(ds, val_idx, "segmentation", 64)
    saved, _ = load_finetuned(res.model_dir)
    again = evaluate_split(saved, val_ds, "segmentation", 8, "cpu")
    assert again["dice"] == pytest.approx(res.val_metrics["dice"], abs=1e-6)

    report = evaluate_model_dir(res.model_dir, phantoms, tmp_path / "report")  # test split
    assert report["n"] == 12 and report["splits_file"].endswith("splits.json")
    per_class = report["clean"]["per_class"]
    multi = np.array([per_class["cyst"]["dice"], per_class["echogenic"]["dice"]])
    assert report["clean"]["dice"] == pytest.approx(multi.mean())
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| cyst |" in summary and "| echogenic |" in summary and "dice_legacy" in summary

    union_res, _ = _train_phantoms(phantoms, tmp_path / "union", 1)
    union = _union_scores_per_class(union_res.model_dir, phantoms)
    print(f"test Dice per class (cyst, echogenic): multi {multi.round(3)}, union {union.round(3)}")
    assert (multi > union).all(), (multi, union)
    assert multi.min() > 0.3  # both structures found, not just the easy one


def test_cli_splits_val_every_from_scratch_like_and_evaluate(phantoms, tmp_path, capsys):
    """The CLI path on the tiny VMamba preset: 2 steps, then the same architecture from
    random weights (--from-scratch-like), then evaluate reports both structures."""
    from usfm_core.cli import main
    from usfm_core.finetune.models import load_finetuned

    ds = LabelledSet.from_folder(phantoms)
    keys = [it.key for it in ds.items]
    (tmp_path / "splits.json").write_text(
        json.dumps({"train": keys[:20], "val": keys[20:24], "test": keys[48:52]})
    )
    common = ["--task", "seg", "--data", str(phantoms), "--input-size", "64", "--batch-size", "4"]
    args = ["--max-steps", "2", "--val-every", "1", "--splits", str(tmp_path / "splits.json")]
    assert main(["finetune", *common, *args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "splits file" in out and "cyst" in out
    first, meta = load_finetuned(tmp_path / "a")
    assert first.n_classes == 3 and meta["extra"]["split_rule"].startswith("splits file")
    assert meta["extra"]["test_items"] == keys[48:52]
    history = list(csv.DictReader(open(tmp_path / "a" / "history.csv")))
    assert [r["step"] for r in history] == ["1", "2"]

    like = ["--from-scratch-like", str(tmp_path / "a"), "--max-steps", "1"]  # a run folder
    assert main(["finetune", *common, *like, "--out", str(tmp_path / "b")]) == 0
    second, meta_b = load_finetuned(tmp_path / "b")
    assert second.backbone.config.to_dict() == first.backbone.config.to_dict()
    assert meta_b["extra"]["backbone_source"].startswith("random init, architecture of")
    w1, w2 = first.backbone.state_dict(), second.backbone.state_dict()
    assert w1.keys() == w2.keys() and any(not torch.equal(w1[k], w2[k]) for k in w1)

    report = tmp_path / "report"
    assert (
        main(["evaluate", str(tmp_path / "a"), "--data", str(phantoms), "--out", str(report)]) == 0
    )
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == 4 and set(metrics["clean"]["per_class"]) == {"cyst", "echogenic"}

    # segment: class indices in the mask, each object's class named in measurements.csv (a
    # model whose head predicts class 2 everywhere: one object, "echogenic")
    from usfm_core.finetune.models import Segmenter, save_finetuned

    fixed = Segmenter(CnnBackbone(CnnCfg(width=4, convs=2)), 3, "conv")
    with torch.no_grad():
        fixed.decoder.fuse[-1].weight.zero_()
        fixed.decoder.fuse[-1].bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    fixed.classes, fixed.input_size = ["background", "cyst", "echogenic"], 64
    save_finetuned(fixed, tmp_path / "fixed")
    image = phantoms / keys[50]
    assert main(["segment", str(tmp_path / "fixed"), str(image), "--out", str(tmp_path / "s")]) == 0
    mask = np.asarray(Image.open(tmp_path / "s" / f"{image.stem}_mask.png"))
    assert set(np.unique(mask)) == {2}  # class indices, not 0/255
    rows = list(csv.DictReader(open(tmp_path / "s" / "measurements.csv")))
    assert [(r["label"], r["class"]) for r in rows] == [("2", "echogenic")]


def test_median_frequency_weights_on_phantom_masks(phantoms):
    """``(median f / f_c)^power`` over the pixel frequencies of the masks: computed by hand on
    the phantoms' masks; power 1 is full median-frequency balancing; an absent class gets 0
    and does not enter the median."""
    from usfm_core.finetune.train import median_frequency_weights

    ds = LabelledSet.from_folder(phantoms)
    ds.resolve_mask_classes()
    masks = [read_mask(it) for it in ds.items[:20]]
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=3)[:3]
    freq = counts / counts.sum()
    assert freq[0] > 0.9 and (freq[1:] > 0).all()  # small structures on a large background
    expected = np.median(freq) / freq
    torch.testing.assert_close(
        median_frequency_weights(masks, 3, power=1.0), torch.tensor(expected, dtype=torch.float32)
    )
    sqrt = median_frequency_weights(masks, 3)
    torch.testing.assert_close(sqrt, torch.tensor(np.sqrt(expected), dtype=torch.float32))
    with_absent = median_frequency_weights([np.where(m == 2, 0, m) for m in masks], 3, 1.0)
    f2 = np.array([counts[0] + counts[2], counts[1]]) / counts.sum()
    assert with_absent[2] == 0
    assert with_absent[:2].tolist() == pytest.approx((np.median(f2) / f2).tolist(), rel=1e-5)


def test_time_budget_stops_training(phantoms, tmp_path):
    """A 0.2 s budget and a first step that takes 0.3 s: exactly one step, then validation."""
    import time

    from usfm_core.finetune.train import finetune

    def slow(info):
        if "val" not in info:
            time.sleep(0.3)

    res = finetune(
        "seg",
        phantoms,
        tmp_path / "t",
        backbone=CnnBackbone(CnnCfg(width=4, convs=2)),
        epochs=100,
        time_budget_s=0.2,
        input_size=64,
        batch_size=4,
        progress=slow,
        balanced=False,
    )
    assert res.steps == 1 and res.best_epoch == 1
    assert "ce_weights" not in json.loads((res.model_dir / "config.json").read_text())["extra"]
    with pytest.raises(ConfigError, match="val_every"):
        backbone = CnnBackbone(CnnCfg(width=16, convs=2))
        finetune("seg", phantoms, tmp_path / "u", backbone=backbone, val_every=0)


def test_backbone_by_name_and_scratch_like_it(tmp_path, monkeypatch):
    """A model of kind ``backbone`` imported into the user model directory is listed beside
    the shipped one and found by name; ``build_like`` rebuilds its
    exact config (drop-path included) with fresh weights."""
    from usfm_core.finetune.models import build_like, load_backbone
    from usfm_core.models import zoo
    from usfm_core.models.serialization import save_model
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    monkeypatch.setenv("USFM_MODEL_DIR", str(tmp_path / "models"))
    cfg = VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8, drop_path_rate=0.0)
    torch.manual_seed(0)
    save_model(VMamba(cfg), tmp_path / "bb")
    zoo.import_model(tmp_path / "bb", name="my-backbone")
    backbones = [e.name for e in zoo.list_models(kind="backbone")]
    assert "my-backbone" in backbones and backbones.count("my-backbone") == 1
    # The shipped backbone is listed beside it, never shadowed by or mistaken for it.
    assert "openus-small-fast" in backbones
    loaded = load_backbone("my-backbone")
    assert loaded.config.to_dict() == cfg.to_dict()
    fresh = build_like(loaded, seed=1)
    assert fresh.config.to_dict() == cfg.to_dict()
    a, b = loaded.state_dict(), fresh.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_painted_frames_with_two_label_values_train_a_softmax_model(tmp_path):
    """The napari Fine-tune path: in-memory frames whose masks hold values 1 and 2."""
    from usfm_core.finetune.train import finetune

    frames = [simulate_structures(s, 64) for s in range(4)]
    images = np.stack([f[0] for f in frames])
    masks = np.stack([f[1] for f in frames])
    res = finetune(
        "seg",
        (images, masks),
        tmp_path / "painted",
        backbone=CnnBackbone(CnnCfg(width=4, convs=2)),
        epochs=1,
        batch_size=4,
        input_size=64,
    )
    assert res.classes == ["background", "class1", "class2"]
    assert {"dice_class1", "dice_class2"} <= set(res.val_metrics)
    assert json.loads((res.model_dir / "config.json").read_text())["config"]["n_classes"] == 3


def test_class_names_in_measurements_and_napari_labels(tmp_path):
    """label_names maps label values to class names (softmax and one-structure models, model
    or config.json); the napari Segment layer gets them as features (shown on hover)."""
    from usfm_core.finetune.infer import label_names, measurement_rows
    from usfm_core.finetune.models import Segmenter, save_finetuned

    model = Segmenter(CnnBackbone(CnnCfg(width=4, convs=2)), 3, "conv")
    model.classes = ["background", "cyst", "echogenic"]
    save_finetuned(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert label_names(model) == label_names(config) == {1: "cyst", 2: "echogenic"}
    binary = Segmenter(CnnBackbone(CnnCfg(width=4, convs=2)), 1, "conv")
    binary.classes = ["benign", "malignant", "normal"]  # older models: the image classes
    assert label_names(binary) == {1: "foreground", 255: "foreground"}
    mask = np.zeros((16, 16), np.uint8)
    mask[:6, :6], mask[10:, 10:] = 2, 1
    rows = measurement_rows(mask, class_names=label_names(model))
    assert {(r["label"], r["class"]) for r in rows} == {(1, "cyst"), (2, "echogenic")}

    napari = pytest.importorskip("napari")
    from napari_usfm._widgets import _name_classes

    layer = napari.layers.Labels(mask)
    _name_classes(layer, str(tmp_path / "m"))
    assert list(layer.features["class"]) == ["background", "cyst", "echogenic"]
    assert "class: echogenic" in layer.get_status((2, 2), world=True)["value"]
