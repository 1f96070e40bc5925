"""The ``unet-hr`` segmentation decoder (issue #14 item 2): the ``unet`` decoder plus a
full-resolution path from the input image, so structures a few pixels wide are not lost at the
backbone's stride-4 stem; and ``unet-hrc`` (the same plus a conv branch at stride 4, trained
over a frozen pretrained backbone), which ``auto`` picks for small structures. Shapes, that it
sees the image at full resolution, save / load, the parameter estimate, the CLI / config
names, frame scoring (``suggest``), training over the frozen backbone, and that the shipped
``unet`` models still load and compute as before. Also the small-structure phantoms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from usfm_core.finetune.models import (
    DECODERS,
    Segmenter,
    UNetDecoder,
    UNetHRCDecoder,
    UNetHRDecoder,
    load_finetuned,
    save_finetuned,
)
from usfm_core.models.vmamba import VMamba, VMambaConfig


def _tiny_vmamba() -> VMamba:
    torch.manual_seed(0)
    return VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8)).eval()


def _segmenter(n_classes: int, decoder: str = "unet-hr") -> Segmenter:
    torch.manual_seed(1)
    model = Segmenter(_tiny_vmamba(), n_classes, decoder).eval()
    model.input_size = 64
    return model


@pytest.mark.parametrize("decoder", ["unet-hr", "unet-hrc"])
@pytest.mark.parametrize("n_classes", [1, 3])
def test_output_shape_binary_and_multiclass(n_classes, decoder):
    model = _segmenter(n_classes, decoder)
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, n_classes, 64, 96)
    assert torch.isfinite(out).all()
    assert model.predict(x).shape == (2, 64, 96)
    assert model.config.estimate_params() == sum(p.numel() for p in model.parameters())
    # A fresh head starts at the foreground prior: 1 % per class, background elsewhere.
    bias = model.decoder.head.bias.detach()
    prior = torch.sigmoid(bias) if n_classes == 1 else bias.softmax(0)[1:]
    assert torch.allclose(prior, torch.full_like(prior, UNetHRDecoder.PRIOR))
    assert model.predict(x).sum() == 0


@pytest.mark.parametrize("decoder", ["unet-hr", "unet-hrc"])
def test_decoder_sees_a_one_pixel_structure_at_full_resolution(decoder):
    """With the backbone's features held fixed, one brighter pixel changes the logits most at
    that pixel (the full-resolution path); the ``unet`` decoder never sees the image."""
    model = _segmenter(1, decoder)
    torch.manual_seed(2)
    x = torch.randn(1, 1, 64, 64) * 0.1
    bright = x.clone()
    bright[0, 0, 30, 41] += 5.0
    with torch.no_grad():
        feats = model._features(x).features
        diff = (model.decode(feats, bright) - model.decode(feats, x)).abs()[0, 0]
    near = diff[29:32, 40:43].max()
    far = diff.clone()
    far[22:39, 33:50] = 0  # beyond 8 px of the pixel
    assert near > 0
    assert near > 20 * far.mean(), (float(near), float(far.mean()))
    assert int(diff.argmax()) in {r * 64 + c for r in range(28, 33) for c in range(39, 44)}

    plain = _segmenter(1, "unet")
    with torch.no_grad():
        feats = plain._features(x).features
        assert torch.equal(plain.decode(feats, bright), plain.decode(feats, x))


def test_channel_mean_is_the_image_of_a_three_channel_backbone():
    torch.manual_seed(0)
    backbone = VMamba(VMambaConfig(in_chans=3, depths=(1, 1, 1, 1), dims=8))
    model = Segmenter(backbone, 2, "unet-hr").eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        one = model(x)
        three = model(x.expand(-1, 3, -1, -1))
    assert torch.allclose(one, three, atol=1e-5)


@pytest.mark.parametrize(
    ("decoder", "cls"), [("unet-hr", UNetHRDecoder), ("unet-hrc", UNetHRCDecoder)]
)
def test_save_load_round_trip(tmp_path, decoder, cls):
    model = _segmenter(3, decoder)
    model.classes = ["background", "cyst", "echogenic"]
    folder = save_finetuned(model, tmp_path / "m")
    loaded, meta = load_finetuned(folder)
    assert meta["task"] == "segmentation"
    assert loaded.config.head == decoder and type(loaded.decoder) is cls
    assert loaded.classes == model.classes
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_names_are_accepted_by_config_and_cli():
    from usfm_core.cli import build_parser
    from usfm_core.models.limits import TASK_FIELDS

    assert set(DECODERS) <= set(TASK_FIELDS["head"].choices)
    argv = ["finetune", "--task", "seg", "--data", "d", "--out", "o", "--decoder"]
    assert build_parser().parse_args([*argv, "unet-hr"]).decoder == "unet-hr"
    assert build_parser().parse_args([*argv, "unet-hrc"]).decoder == "unet-hrc"
    base = argv[:-1]
    assert build_parser().parse_args(base).freeze_backbone is None  # the default rule
    assert build_parser().parse_args([*base, "--no-freeze-backbone"]).freeze_backbone is False
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "unet-hr-x"])


def test_cli_refuses_contradicting_freeze_flags(tmp_path, capsys):
    """``--linear-probe`` (freeze) with ``--no-freeze-backbone`` is an error naming both flags,
    before any data is read or any folder is made."""
    from usfm_core.cli import main

    out = tmp_path / "run"
    argv = ["finetune", "--task", "seg", "--data", str(tmp_path / "missing"), "--out", str(out)]
    code = main([*argv, "--linear-probe", "--no-freeze-backbone"])
    err = capsys.readouterr().err
    assert code != 0 and "--linear-probe and --no-freeze-backbone" in err
    assert not out.exists()


def test_frame_scoring_passes_the_image_to_the_decoder():
    """``suggest`` scores frames through the decoder directly (features computed once)."""
    from usfm_core.finetune.suggest import score_frames
    from usfm_core.sim.structures import simulate_small_structures

    frames = np.stack([simulate_small_structures(s, 64)[0] for s in range(3)])
    scores = score_frames(_segmenter(3), frames, input_size=64, batch_size=2)
    assert scores.uncertainty is not None and scores.uncertainty.shape == (3,)
    assert np.isfinite(scores.uncertainty).all()


def test_shipped_fetal_head_is_unchanged():
    """The shipped models use ``unet``: same head name, plain :class:`UNetDecoder`, and the
    forward pass is still stride-4 decoding, ×4 bilinear upsampling and the 1×1 head."""
    model, meta = load_finetuned("fetal-head")
    assert meta["config"]["head"] == "unet" and model.config.head == "unet"
    assert type(model.decoder) is UNetDecoder and not getattr(model.decoder, "wants_image", 0)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        feats = list(model._features(x).features)
        dec = model.decoder
        y = dec.bottom(feats[3])
        for up, block, skip in zip(dec.ups, dec.blocks, (feats[2], feats[1], feats[0])):
            y = up(F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            y = block(y + skip)
        y = dec.head(F.interpolate(y, scale_factor=4, mode="bilinear", align_corners=False))
        assert torch.equal(model(x), y)


def test_small_structure_phantoms_are_small_and_two_classes():
    import cv2

    from usfm_core.sim.structures import simulate_small_structures

    pairs = [simulate_small_structures(s, 160) for s in range(4)]
    image, mask = pairs[0]
    assert image.shape == mask.shape == (160, 160) and image.dtype == np.uint8
    again = simulate_small_structures(0, 160)
    assert np.array_equal(again[0], image) and np.array_equal(again[1], mask)
    masks = np.stack([m for _, m in pairs])
    assert set(np.unique(masks)) == {0, 1, 2}
    widths = []
    for m in masks:
        n, _, stats, _ = cv2.connectedComponentsWithStats((m > 0).astype(np.uint8))
        widths += [2 * np.sqrt(a / np.pi) for a in stats[1:, cv2.CC_STAT_AREA]]
        assert n - 1 >= 2  # several structures per frame
    # Mean radius 0.8–2 mm at 4 px/mm: a few pixels to ~20 px across, ~1 % of the frame.
    assert 3 < np.median(widths) < 16 and max(widths) < 30
    assert (masks > 0).mean() < 0.02


def test_small_structures_pretrained_arms_start_from_the_shipped_backbone():
    """``benchmarks/small_structures.py``'s ``-pre`` arms: the shipped backbone's weights, a
    fresh decoder of the named kind (the ``unet-hr`` head at its foreground prior)."""
    import importlib.util
    import math
    from pathlib import Path

    from usfm_core.finetune.models import load_backbone
    from usfm_core.models.zoo import find_model

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "small_structures.py"
    spec = importlib.util.spec_from_file_location("small_structures_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shipped = load_backbone(find_model(bench.PRETRAINED).path).state_dict()
    for arm, decoder in (("unet-pre", UNetDecoder), ("unet-hr-pre", UNetHRDecoder)):
        net, what = bench.build_arm(arm, 3, 160, seed=0)
        assert type(net.net.decoder) is decoder and bench.PRETRAINED in what
        mine = net.net.backbone.state_dict()
        assert mine.keys() == shipped.keys()
        assert all(torch.equal(mine[k], shipped[k]) for k in shipped)
    bias = net.net.decoder.head.bias.detach()
    assert math.isclose(float(torch.softmax(bias, 0)[1]), UNetHRDecoder.PRIOR, rel_tol=1e-5)
    scratch, _ = bench.build_arm("unet-hr", 3, 160, seed=0)
    assert not torch.equal(
        scratch.net.backbone.state_dict()[next(iter(shipped))], shipped[next(iter(shipped))]
    )


def test_auto_decoder_picks_unet_hrc_for_small_structures_only(shared_data):
    """``choose_decoder``: the small-structure phantoms (median ≈ 9 px at 160²) get ``unet-hrc``;
    the BUSI lesions and HC18 heads of the shipped recipes' training splits (128²) keep
    ``unet``, so ``auto`` does not change how the shipped models would be trained."""
    from usfm_core.finetune.data import LabelledSet, read_mask, resolve_splits
    from usfm_core.finetune.models import SMALL_STRUCTURE_PX, choose_decoder, structure_widths
    from usfm_core.sim.structures import simulate_small_structures

    masks = [simulate_small_structures(s, 160)[1] for s in range(12)]
    name, why = choose_decoder(masks, 160)
    assert name == "unet-hrc" and why["median_width_px"] < SMALL_STRUCTURE_PX
    assert why["n_structures"] >= 24  # two or more structures per frame, both classes counted
    # The same masks viewed at 4x the side are wide enough for the plain decoder.
    assert choose_decoder(masks, 640)[0] == "unet"
    for name_, side in (("busi", 128), ("hc18", 128)):
        ds = LabelledSet.from_folder(shared_data / name_, "segmentation")
        ds.resolve_mask_classes()
        train = resolve_splits(ds, None, None, 0)[0]["train"]
        picked, why = choose_decoder((read_mask(ds.items[i]) for i in train[::4]), side)
        assert picked == "unet" and why["median_width_px"] > 1.5 * SMALL_STRUCTURE_PX, why
    # One 10x10 square: equivalent diameter 2·sqrt(100/π); empty masks count nothing.
    square = np.zeros((40, 40), np.uint8)
    square[5:15, 5:15] = 1
    assert structure_widths([square, np.zeros_like(square)], 40) == pytest.approx([11.28], 1e-3)
    assert choose_decoder([np.zeros_like(square)], 40) == (
        "unet",
        {
            "decoder": "unet",
            "median_width_px": None,
            "n_structures": 0,
            "threshold_px": SMALL_STRUCTURE_PX,
            "input_size": 40,
        },
    )


def test_cli_finetune_auto_decoder_chooses_and_records(tmp_path, capsys):
    """``usfm-core finetune`` defaults to ``--decoder auto``: on small phantoms it builds the
    ``unet-hrc`` decoder, prints why and saves the evidence (a random preset backbone is not
    frozen); ``--decoder unet`` still forces."""
    from usfm_core.cli import main
    from usfm_core.sim.structures import write_structures_folder

    data = write_structures_folder(tmp_path / "phantoms", 10, 128, small=True)
    common = ["finetune", "--task", "seg", "--data", str(data), "--input-size", "128"]
    common += ["--batch-size", "4", "--max-steps", "1"]
    assert main([*common, "--out", str(tmp_path / "auto")]) == 0
    out = capsys.readouterr().out
    assert "decoder auto -> unet-hrc" in out and "backbone frozen" not in out
    model, meta = load_finetuned(tmp_path / "auto")
    assert type(model.decoder) is UNetHRCDecoder and model.config.head == "unet-hrc"
    assert meta["extra"]["decoder_choice"]["median_width_px"] < 16
    assert meta["extra"]["freeze_backbone"] is False  # a random backbone must learn
    assert main([*common, "--decoder", "unet", "--out", str(tmp_path / "forced")]) == 0
    assert "decoder auto" not in capsys.readouterr().out
    forced, meta = load_finetuned(tmp_path / "forced")
    assert type(forced.decoder) is UNetDecoder and "decoder_choice" not in meta["extra"]


@pytest.mark.parametrize("freeze", [None, False, True])
def test_unet_hrc_trains_over_a_frozen_pretrained_backbone(tmp_path, freeze):
    """``finetune(freeze_backbone=None)`` (the default) keeps a given (pretrained) backbone
    fixed under the ``unet-hrc`` decoder while the decoder learns, and records it; ``False``
    trains it; ``True`` freezes it under any decoder."""
    from usfm_core.finetune.train import finetune
    from usfm_core.sim.structures import simulate_small_structures

    pairs = [simulate_small_structures(s, 64) for s in range(8)]
    images = np.stack([p[0] for p in pairs])
    masks = np.stack([p[1] for p in pairs])
    backbone = _tiny_vmamba()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    decoder = "unet" if freeze else "auto"
    res = finetune(
        "seg", (images, masks), tmp_path / "run", backbone=backbone, decoder=decoder,
        freeze_backbone=freeze, input_size=64, batch_size=4, max_steps=2, epochs=1,
        lr=1e-2, splits={"train": list(range(6)), "val": [6], "test": [7]},
    )  # fmt: skip
    model, meta = load_finetuned(res.model_dir)
    frozen = freeze is not False
    assert res.backbone_frozen is frozen and meta["extra"]["freeze_backbone"] is frozen
    assert model.config.head == ("unet" if freeze else "unet-hrc")
    same = all(torch.equal(before[k], model.backbone.state_dict()[k].float()) for k in before)
    assert same is frozen


def test_small_structures_frozen_prototype_is_the_product_unet_hrc():
    """The benchmark's ``unet-hrc-pre-sqrtfb-frozen`` arm (whose numbers the docs report for
    ``unet-hrc``) has the product decoder's architecture: the same parameter names and shapes
    as :class:`UNetHRCDecoder` on the shipped backbone, only decoder parameters trainable, the
    shipped backbone's weights, and the product's default CE weighting."""
    import importlib.util
    from pathlib import Path

    from usfm_core.finetune.models import load_backbone
    from usfm_core.models.zoo import find_model

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "small_structures.py"
    spec = importlib.util.spec_from_file_location("small_structures_bench2", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    arm, _ = bench.build_arm("unet-hrc-pre-sqrtfb-frozen", 3, 160, seed=0)
    product = Segmenter(load_backbone(find_model(bench.PRETRAINED).path), 3, "unet-hrc")
    mine, theirs = arm.net.state_dict(), product.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(mine[k].shape == theirs[k].shape for k in theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs if k.startswith("backbone."))
    trainable = {n for n, p in arm.net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in product.decoder.named_parameters(prefix="decoder")}
    assert arm.balanced_ce == 0.5
    x = torch.randn(1, 1, 64, 64)
    product.load_state_dict(mine)
    with torch.no_grad():
        assert torch.allclose(product.eval()(x), arm.net.eval()(x), atol=1e-5)
