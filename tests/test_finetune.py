"""Fine-tuning: data splits, label subsets, models, save/load and small real training runs."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cnn_backbone import CnnBackbone, CnnCfg
from usfm_core.errors import CheckpointError, ConfigError
from usfm_core.finetune.data import LabelledSet, label_subset, make_splits
from usfm_core.finetune.models import (
    Classifier,
    Segmenter,
    load_finetuned,
    save_finetuned,
)
from usfm_core.finetune.train import finetune, soft_dice_loss


def _labels_groups():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    groups = [f"g{i // 2}" for i in range(100)]  # pairs of duplicates
    return labels, groups


def test_splits_grouped_stratified_reproducible():
    labels, groups = _labels_groups()
    s = make_splits(labels, groups, seed=3)
    assert s == make_splits(labels, groups, seed=3)
    assert s != make_splits(labels, groups, seed=4)
    all_idx = sorted(s["train"] + s["val"] + s["test"])
    assert all_idx == list(range(100))
    sets = {k: {groups[i] for i in v} for k, v in s.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
    assert not (sets["val"] & sets["test"])
    for split in ("train", "val", "test"):  # every class present in every split
        assert set(labels[s[split]]) == {0, 1, 2}
    assert 60 <= len(s["train"]) <= 80


def test_label_subsets_stratified_grouped_nested():
    labels, groups = _labels_groups()
    train = make_splits(labels, groups, seed=0)["train"]
    n_cls = np.bincount(labels[train])
    prev: set[int] = set()
    for ratio in (0.05, 0.1, 0.2, 0.4, 0.6, 1.0):
        sub = label_subset(train, labels, groups, ratio, seed=1)
        assert sub == label_subset(train, labels, groups, ratio, seed=1)
        assert set(sub) <= set(train) and prev <= set(sub)
        prev = set(sub)
        counts = np.bincount(labels[sub], minlength=3)
        assert (counts >= 1).all()  # every class kept even at 5 %
        assert (counts <= np.ceil(ratio * n_cls) + 1).all()  # +1: whole pairs
        chosen = {groups[i] for i in sub}
        assert all(i in sub for i in train if groups[i] in chosen)  # whole groups
    assert label_subset(train, labels, groups, 0.2, seed=1) != label_subset(
        train, labels, groups, 0.2, seed=2
    )
    with pytest.raises(ConfigError, match="label ratio"):
        label_subset(train, labels, groups, 0.0)


def test_busi_manifest_and_dup_groups(shared_data):
    ds = LabelledSet.from_folder(shared_data / "busi", "segmentation")
    assert ds.classes == ["benign", "malignant", "normal"] and len(ds) == 780
    s = make_splits(ds.labels, ds.groups, seed=0)
    g = ds.groups
    assert not ({g[i] for i in s["train"]} & {g[i] for i in s["test"]})
    with pytest.raises(ConfigError, match="manifest"):
        LabelledSet.from_folder(shared_data, "segmentation")


@pytest.mark.parametrize("decoder", ["unet", "conv", "vss"])
@pytest.mark.parametrize("n_classes", [1, 3])
def test_segmenter_shapes_any_size(decoder, n_classes):
    model = Segmenter(CnnBackbone(), n_classes, decoder)
    out = model(torch.zeros(2, 1, 64, 96))
    assert out.shape == (2, n_classes, 64, 96)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.zeros(1, 1, 50, 64))


def test_three_channel_backbone_and_classifier():
    model = Classifier(CnnBackbone(CnnCfg(in_chans=3)), 4)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 4)


def test_save_load_roundtrip(tmp_path):
    model = Segmenter(CnnBackbone(), 1, "unet").eval()
    model.classes, model.input_size = ["lesion"], 64
    save_finetuned(model, tmp_path / "m")
    loaded, spec = load_finetuned(tmp_path / "m")
    assert spec["task"] == "segmentation" and loaded.input_size == 64
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "segmenter" and cfg["format"].startswith("usfm-finetuned")
    x = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_finetuned(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_finetuned(tmp_path)


def test_soft_dice_perfect_and_wrong():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    good = (target.float() * 40 - 20)[:, None]
    assert float(soft_dice_loss(good, target)) < 1e-3
    assert float(soft_dice_loss(-good, target)) > 0.99


def _easy_classification(n=48, size=64, seed=0):
    """Bright disc (class 1) vs dark background only (class 0), with noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    yy, xx = np.mgrid[:size, :size]
    imgs = rng.normal(60, 15, size=(n, size, size))
    for i in np.flatnonzero(labels):
        cy, cx = rng.integers(20, 44, 2)
        imgs[i][(yy - cy) ** 2 + (xx - cx) ** 2 < 12**2] += 120
    return np.clip(imgs, 0, 255).astype(np.uint8), labels


@pytest.mark.slow
def test_linear_probe_beats_chance(tmp_path):
    torch.manual_seed(0)
    images, labels = _easy_classification()
    backbone = CnnBackbone()
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    res = finetune(
        "cls",
        (images, labels),
        tmp_path / "run",
        backbone=backbone,
        freeze_backbone=True,
        epochs=15,
        lr=5e-2,
        batch_size=16,
        input_size=64,
        patience=15,
        augment=False,
    )
    assert res.val_metrics["macro_f1"] > 0.8  # chance = 0.5
    for k, v in backbone.state_dict().items():  # linear probe: encoder untouched
        torch.testing.assert_close(v, frozen[k])
    rows = list(csv.DictReader(open(res.history_path)))
    assert len(rows) == res.epochs_run and "val_macro_f1" in rows[0]
    splits = json.loads(Path(res.splits_path).read_text())["splits"]
    assert set(splits) == {"train", "val", "test"}
    loaded, spec = load_finetuned(res.model_dir)
    assert spec["task"] == "classification" and loaded.n_classes == 2


def test_cancel_and_progress(tmp_path):
    images, labels = _easy_classification(n=16)
    seen, stop = [], threading.Event()

    def progress(info):
        seen.append(info)
        if info["step"] >= 2:
            stop.set()

    res = finetune(
        "cls",
        (images, labels),
        tmp_path / "r",
        backbone=CnnBackbone(),
        epochs=50,
        batch_size=4,
        input_size=64,
        progress=progress,
        cancel=stop,
    )
    assert res.cancelled and res.epochs_run == 1 and seen[0]["epoch"] == 1
    assert (res.model_dir / "model.safetensors").is_file()


def test_bad_inputs(tmp_path):
    images, labels = _easy_classification(n=8)
    with pytest.raises(ConfigError, match="task"):
        finetune("detect", (images, labels), tmp_path, backbone=CnnBackbone())
    with pytest.raises(ConfigError, match="divisible by 32"):
        finetune("cls", (images, labels), tmp_path, backbone=CnnBackbone(), input_size=50)


@pytest.mark.slow
def test_busi_segmentation_beats_trivial(tmp_path, shared_data):
    """~24 BUSI lesions at 64²: a few epochs must beat the all-background prediction."""
    full = LabelledSet.from_folder(shared_data / "busi", "segmentation")
    items = [it for it in full.items if "normal" not in it.key][:32]
    ds = LabelledSet(items=items, classes=full.classes, root=full.root)
    splits = {"train": list(range(24)), "val": list(range(24, 32)), "test": []}
    torch.manual_seed(0)
    res = finetune(
        "seg",
        ds,
        tmp_path / "seg",
        backbone=CnnBackbone(CnnCfg(width=8)),
        splits=splits,
        epochs=8,
        lr=3e-3,
        batch_size=8,
        input_size=64,
        patience=8,
        augment=False,
    )
    # Trivial baselines: all-background scores Dice 0 on lesion images; all-foreground scores
    # 2|T| / (|T| + H·W) per image.
    from usfm_core.finetune.data import read_mask

    fg = [read_mask(it) > 0 for it in items[24:32]]
    all_fg = float(np.mean([2 * m.sum() / (m.sum() + m.size) for m in fg]))
    print(f"val dice {res.val_metrics['dice']:.3f} vs all-foreground {all_fg:.3f}")
    assert res.val_metrics["dice"] > max(all_fg, 0.0) + 0.05
    assert res.n_train == 24 and res.best_epoch >= 1


def test_segmentation_from_a_few_in_memory_frames(tmp_path):
    """The napari path: 4 annotated frames as arrays (too few to split: all used everywhere)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 80, (4, 70, 90)).astype(np.uint8)
    masks = np.zeros((4, 70, 90), np.uint8)
    masks[:, 20:50, 30:60] = 1
    images[masks > 0] += 150
    res = finetune(
        "seg",
        (images, masks),
        tmp_path / "few",
        backbone=CnnBackbone(),
        epochs=2,
        batch_size=2,
        input_size=64,
    )
    splits = json.loads(Path(res.splits_path).read_text())["splits"]
    assert splits["train"] == splits["val"] == [f"frame{i:05d}" for i in range(4)]
    model, meta = load_finetuned(tmp_path / "few")
    assert meta["task"] == "segmentation" and model.input_size == 64
    with pytest.raises(Exception, match="shape"):
        finetune("seg", (images, masks[:, :10]), tmp_path / "bad", backbone=CnnBackbone())


def test_real_vmamba_segmenter_roundtrip_via_serialization(tmp_path):
    """``load_model`` alone rebuilds a VMamba backbone + decoder saved by the fine-tuner."""
    from usfm_core.models.serialization import load_model
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    model = Segmenter(VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8)), 2, "unet")
    model.classes, model.input_size = ["bg", "lesion"], 64
    save_finetuned(model.eval(), tmp_path / "m")
    loaded, _meta = load_model(tmp_path / "m")
    assert isinstance(loaded, Segmenter) and loaded.classes == ["bg", "lesion"]
    x = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))
    from usfm_core.models import zoo

    assert zoo.model_kind(json.loads((tmp_path / "m" / "config.json").read_text())) == (
        "segmentation"
    )


def test_splits_few_groups_never_empty_or_straddling():
    labels = np.zeros(8, int)
    groups = ["a", "a", "a", "b", "b", "c", "c", "c"]
    s = make_splits(labels, groups, seed=0)
    assert all(s[k] for k in ("train", "val", "test"))
    owner = {groups[i]: k for k, v in s.items() for i in v}
    assert all(owner[groups[i]] == k for k, v in s.items() for i in v)


def test_balanced_class_weights_and_weighted_loss():
    """Inverse-frequency weights n / (K n_k): 3:1 over 2 classes gives 2/3 and 2; absent 0;
    the weighted loss upweights the minority class's errors."""
    import torch.nn.functional as F

    from usfm_core.finetune.train import _loss, balanced_class_weights

    w = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    torch.testing.assert_close(w, torch.tensor([4 / 9, 4 / 3, 0.0]))
    w2 = balanced_class_weights(np.array([0, 0, 0, 1]), 2)
    torch.testing.assert_close(w2, torch.tensor([2 / 3, 2.0]))
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])  # predicts class 0 twice
    target = torch.tensor([0, 1])
    plain = _loss("classification", logits, target)
    weighted = _loss("classification", logits, target, w2)
    per_item = F.cross_entropy(logits, target, reduction="none")
    assert plain == pytest.approx(per_item.mean().item())
    expected = (2 / 3 * per_item[0] + 2 * per_item[1]) / (2 / 3 + 2)
    assert weighted == pytest.approx(expected.item())
    assert weighted > plain  # the missed minority item counts more


def test_load_backbone_from_a_pretrain_run_folder_with_its_config(tmp_path):
    """`usfm-core pretrain --out RUN` writes RUN/config.json (the run's config) and
    RUN/backbone/: `--backbone RUN` must pick the exported backbone, not the run config."""
    from usfm_core.finetune.models import load_backbone
    from usfm_core.models.serialization import save_model
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    run = tmp_path / "run"
    torch.manual_seed(0)
    bb = VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8))
    save_model(bb, run / "backbone")
    (run / "config.json").write_text(json.dumps({"method": "openus", "epochs": 20}))
    loaded = load_backbone(run)
    for (k, v), (k2, v2) in zip(bb.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert isinstance(load_backbone(run / "backbone"), VMamba)


def _one_step_changes(tmp_path: Path, scale: float) -> tuple[float, float, dict]:
    """Mean |Δw| of the backbone and mean |w| of the decoder after one optimiser step (same
    initial weights and batch in every call), and the saved model's metadata."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 80, (4, 64, 64)).astype(np.uint8)
    masks = np.zeros((4, 64, 64), np.uint8)
    masks[:, 16:40, 20:44] = 1
    images[masks > 0] += 150
    torch.manual_seed(0)
    backbone = CnnBackbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    res = finetune(
        "seg", (images, masks), tmp_path / f"s{scale}", backbone=backbone, epochs=1,
        max_steps=1, batch_size=4, input_size=64, lr=1e-2, augment=False,
        backbone_lr_scale=scale,
    )  # fmt: skip
    model, meta = load_finetuned(res.model_dir)
    after = model.state_dict()
    bb = np.mean([(after[f"backbone.{k}"] - v).abs().mean().item() for k, v in before.items()
                  if v.is_floating_point()])  # fmt: skip
    dec = [k for k in after if not k.startswith("backbone.")]  # same init in both runs
    return float(bb), float(np.mean([after[k].abs().mean().item() for k in dec])), meta


def test_backbone_lr_scale_slows_only_the_backbone(tmp_path):
    """At AdamW's first step every parameter moves by ≈ lr (|m/√v| = 1), so a backbone lr of
    0.1 × lr moves the backbone 10 × less while the decoder gets the same update."""
    bb1, dec1, meta1 = _one_step_changes(tmp_path, 1.0)
    bb01, dec01, meta01 = _one_step_changes(tmp_path, 0.1)
    assert bb1 > 0 and 0.07 < bb01 / bb1 < 0.13
    assert dec01 == pytest.approx(dec1, rel=1e-5)
    assert meta01["extra"]["optimizer"]["backbone_lr_scale"] == 0.1
    assert meta1["extra"]["optimizer"]["lr"] == 1e-2
    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        _one_step_changes(tmp_path, 0.0)


def test_run_folder_never_replaces_the_data_or_the_splits_file(tmp_path, capsys):
    """``--out`` equal to the data folder, or a run folder whose ``splits.json`` is the splits
    file given as input, is refused before anything is written: the user's files stay."""
    from usfm_core.cli import main
    from usfm_core.sim.structures import write_structures_folder

    def refused(argv: list[str], message: str) -> None:
        assert main(argv) != 0
        assert message in capsys.readouterr().err

    data = write_structures_folder(tmp_path / "data", 6, 64, small=True)
    (data / "splits.json").write_text('{"mine": 1}')
    (data / "result.json").write_text("user notes")
    before = sorted(p.name for p in data.iterdir())
    common = ["finetune", "--task", "seg", "--data", str(data), "--input-size", "64"]
    common += ["--max-steps", "1", "--batch-size", "2"]
    refused([*common, "--out", str(data)], "the output folder is one of the inputs")
    refused([*common, "--out", str(data), "--seeds", "0", "1"], "one of the inputs")
    run = tmp_path / "run"
    run.mkdir()
    splits = run / "splits.json"
    keys = [it.key for it in LabelledSet.from_folder(data).items]
    splits.write_text(json.dumps({"train": keys[:3], "val": keys[3:4], "test": keys[4:]}))
    refused([*common, "--splits", str(splits), "--out", str(run)], "would overwrite the input")
    assert sorted(p.name for p in data.iterdir()) == before
    assert (data / "splits.json").read_text() == '{"mine": 1}'
    assert (data / "result.json").read_text() == "user notes"
    assert json.loads(splits.read_text())["train"] == keys[:3]


def test_batch_soft_dice_pools_the_batch():
    """``soft_dice_loss(batch=True)`` (and ``segmentation_loss(batch_dice=True)``): one Dice per
    class over the whole batch; with one image it equals the per-image loss, and an image
    without the class no longer scores ~0 on its own."""
    from usfm_core.finetune.train import segmentation_loss, soft_dice_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.zeros(2, 8, 8, dtype=torch.int64)
    target[0, 2:5, 2:5] = 1  # class 1 only in image 0; class 2 in image 1
    target[1, 4:7, 1:3] = 2
    one = soft_dice_loss(logits[:1], target[:1], batch=True)
    assert one == pytest.approx(soft_dice_loss(logits[:1], target[:1]).item())
    pooled = soft_dice_loss(logits, target, batch=True)
    per_image = soft_dice_loss(logits, target)
    assert pooled < per_image  # the absent-class images no longer count as Dice ≈ 0
    diff = segmentation_loss(logits, target, batch_dice=True) - segmentation_loss(logits, target)
    assert diff.item() == pytest.approx((pooled - per_image).item(), abs=1e-6)
