"""Post-processing saved with a segmenter: presence gate, largest object, hole filling, and the
choice on validation (usfm_core.finetune.postprocess)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from usfm_core.errors import CheckpointError, ConfigError
from usfm_core.finetune.postprocess import (
    PostProcess,
    apply_postprocess,
    candidate_grid,
    choose_postprocess,
    labels_from_logits,
)


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def _disc(shape, center, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= r * r


def _logits_with(objects: list[tuple[np.ndarray, float]], shape=(64, 64)) -> torch.Tensor:
    """One-sigmoid logits ``(1, H, W)``: background at p = 0.02, each object at its p."""
    z = np.full(shape, _logit(0.02), np.float32)
    for mask, p in objects:
        z[mask] = _logit(p)
    return torch.from_numpy(z)[None]


def test_identity_is_the_plain_threshold_and_argmax():
    rng = np.random.default_rng(0)
    one = torch.from_numpy(rng.normal(size=(1, 20, 30)).astype(np.float32))
    np.testing.assert_array_equal(labels_from_logits(one), (one[0] > 0).numpy())
    three = torch.from_numpy(rng.normal(size=(3, 20, 30)).astype(np.float32))
    np.testing.assert_array_equal(labels_from_logits(three), three.argmax(0).numpy())
    assert PostProcess().is_identity and PostProcess(min_confidence=0.5).is_identity


def test_largest_object_and_hole_filling_per_class():
    lab = np.zeros((40, 60), np.uint8)
    lab[5:25, 5:25] = 1
    lab[12:16, 12:16] = 0  # a hole in the big class-1 object
    lab[30:33, 30:33] = 1  # a small class-1 speck: dropped by keep_largest
    lab[2:8, 40:50] = 2  # class 2's only object: kept
    prob = np.full(lab.shape, 0.9)
    out = apply_postprocess(lab, prob, PostProcess(keep_largest=True))
    assert not out[30:33, 30:33].any() and (out[2:8, 40:50] == 2).all()
    assert not out[12:16, 12:16].any()  # holes stay unless asked
    out = apply_postprocess(lab, prob, PostProcess(keep_largest=True, fill_holes=True))
    assert (out[5:25, 5:25] == 1).all() and (out[2:8, 40:50] == 2).all()
    assert int((out == 1).sum()) == 400


def test_presence_gate_uses_the_mean_probability_inside_the_mask():
    shape = (64, 64)
    confident = _logits_with([(_disc(shape, (30, 30), 8), 0.95)])
    # A false mark: mostly just above 0.5 with a single confident pixel (its peak is 0.99).
    faint_mask = _disc(shape, (30, 30), 8)
    faint = _logits_with([(faint_mask, 0.55)])
    faint[0, 30, 30] = _logit(0.99)
    gate = PostProcess(min_confidence=0.7)
    assert labels_from_logits(confident, gate).sum() == faint_mask.sum()
    assert labels_from_logits(faint, gate).sum() == 0
    assert labels_from_logits(faint, PostProcess()).sum() == faint_mask.sum()


def test_choice_on_validation_removes_false_marks_but_never_a_found_structure():
    shape = (64, 64)
    lesion, mark = _disc(shape, (32, 32), 10), _disc(shape, (20, 20), 6)
    # Lesion images found with confidence 0.9; normal images with false marks at 0.62.
    logits = [_logits_with([(lesion, 0.9)]) for _ in range(4)]
    logits += [_logits_with([(mark, 0.62)]) for _ in range(3)]
    targets = [lesion.astype(np.uint8)] * 4 + [np.zeros(shape, np.uint8)] * 3
    best, table = choose_postprocess(logits, targets)
    assert 0.62 < best.min_confidence <= 0.9 and not best.keep_largest
    row = next(r for r in table if r == {**r, **best.to_dict()})
    assert row["fp_on_empty"] == 0 and row["lost"] == 0 and row["score"] == 1.0
    assert len(table) == len(candidate_grid())

    # One lesion found only faintly (0.72) and the false marks more confident (0.75): every
    # gate that would remove the marks loses that lesion, so none is eligible.
    logits[0] = _logits_with([(lesion, 0.72)])
    logits[4:] = [_logits_with([(mark, 0.75)]) for _ in range(3)]
    best, table = choose_postprocess(logits, targets)
    assert best.min_confidence < 0.75 and best.is_identity
    assert all(not r["eligible"] for r in table if r["min_confidence"] >= 0.75)
    # Without the rule the higher score wins (3 false marks gone, 1 lesion lost).
    best_free, _ = choose_postprocess(logits, targets, max_lost=None)
    assert best_free.min_confidence >= 0.8


def test_config_round_trip_and_bad_configs_name_the_field(tmp_path):
    from test_segment import _tiny_segmenter
    from usfm_core.finetune.infer import segment_frames
    from usfm_core.finetune.models import load_finetuned, save_finetuned

    post = PostProcess(min_confidence=0.75, keep_largest=True, fill_holes=True)
    assert PostProcess.from_dict(post.to_dict()) == post
    assert PostProcess.from_dict(None) == PostProcess()
    for bad, word in (
        ({"min_confidence": 1.5}, "min_confidence"),
        ({"min_confidence": "high"}, "min_confidence"),
        ({"keep_largest": 1}, "keep_largest"),
        ({"largest": True}, "unknown"),
        ([0.7], "dict"),
    ):
        with pytest.raises(ConfigError, match=word):
            PostProcess.from_dict(bad)

    model = _tiny_segmenter(1)
    save_finetuned(model, tmp_path / "m", {"task": "segmentation", "postprocess": post.to_dict()})
    loaded, _ = load_finetuned(tmp_path / "m")
    assert loaded.postprocess == post
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (96, 96), np.uint8)
    expected = next(segment_frames(model, [frame], postprocess=post))
    np.testing.assert_array_equal(next(segment_frames(loaded, [frame])), expected)

    cfg = tmp_path / "m" / "config.json"
    data = json.loads(cfg.read_text())
    data["extra"]["postprocess"] = {"min_confidence": 2}
    cfg.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="min_confidence") as err:
        load_finetuned(tmp_path / "m")
    assert str(tmp_path / "m") in str(err.value)


def test_segment_cli_gate_flags_on_real_images(shared_data, tmp_path, capsys):
    """The shipped breast-lesion model on real BUSI images (normal and lesion): ``--presence-gate
    0.7`` either keeps a frame's raw mask exactly or empties it; 0.99 empties every mask;
    ``--no-postprocess`` gives the raw masks; the run prints what it applied."""
    import shutil

    import cv2

    from usfm_core.cli import main

    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("normal_1", "normal_2", "normal_3", "benign_1", "malignant_1"):
        shutil.copy(shared_data / "busi" / "images" / f"{name}.png", scans / f"{name}.png")

    def masks(out, *extra):
        args = ["segment", "breast-lesion", str(scans), "--out", str(out), "--no-progress"]
        assert main([*args, *extra]) == 0
        return {p.name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in out.glob("*_mask.png")}

    raw = masks(tmp_path / "raw", "--no-postprocess")
    assert "post-processing: none; flip TTA" in capsys.readouterr().out
    gated = masks(tmp_path / "gated", "--presence-gate", "0.7", "--keep-largest")
    assert "presence gate 0.7, largest object" in capsys.readouterr().out
    assert raw.keys() == gated.keys() and len(raw) == 5
    for name, m in gated.items():
        assert not m.any() or not (m & ~raw[name]).any(), name  # a subset of the raw mask
    assert any(m.any() for m in raw.values())
    strict = masks(tmp_path / "strict", "--presence-gate", "0.99", "--no-tta")
    out = capsys.readouterr().out
    assert "presence gate 0.99" in out and "flip TTA" not in out
    assert not any(m.any() for m in strict.values())
    with pytest.raises(SystemExit):
        masks(tmp_path / "bad", "--presence-gate", "1.5")
    assert "--presence-gate: must be a probability" in capsys.readouterr().err


def test_saved_inference_size_is_used_and_checked(tmp_path):
    """``extra.infer_size``: frames go through the network at that side (seen by a forward
    hook on the real model), the mask still comes back at the frame's size and equals
    ``frame_logits(..., input_size=...)``; a bad value is refused at load, naming the field and
    the folder."""
    from test_segment import _tiny_segmenter
    from usfm_core.finetune.infer import frame_logits, segment_frames
    from usfm_core.finetune.models import load_finetuned, save_finetuned

    model = _tiny_segmenter(1)
    save_finetuned(model, tmp_path / "m", {"task": "segmentation", "infer_size": 128})
    loaded, _ = load_finetuned(tmp_path / "m")
    assert loaded.infer_size == 128 and loaded.input_size != 128
    seen: list[tuple[int, ...]] = []
    loaded.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    frame = np.random.default_rng(2).integers(0, 255, (90, 110), np.uint8)
    mask = next(segment_frames(loaded, [frame]))
    assert seen == [(1, 1, 128, 128)] and mask.shape == (90, 110)
    at_128 = next(frame_logits(model, [frame], input_size=128))
    np.testing.assert_array_equal(mask, (at_128[0] > 0).numpy().astype(np.uint8))
    default = next(frame_logits(model, [frame]))  # the training size: a different result
    assert not torch.equal(default, at_128)

    cfg = tmp_path / "m" / "config.json"
    for bad in (250, "256", True, 0):
        data = json.loads(cfg.read_text())
        data["extra"]["infer_size"] = bad
        cfg.write_text(json.dumps(data))
        with pytest.raises(CheckpointError, match="infer_size") as err:
            load_finetuned(tmp_path / "m")
        assert str(tmp_path / "m") in str(err.value)
