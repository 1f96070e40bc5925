"""Inference precision (``usfm_core.models.precision``): float32 vs bf16 autocast.

The bf16 path runs on any CPU (emulated where the CPU has no native bf16, only slower), so
these tests check it everywhere; what ``auto`` picks is tested with the CPU flags faked.
"""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch

from usfm_core.models import precision as prec


def test_resolve_precision_names_and_environment(monkeypatch):
    monkeypatch.delenv("USFM_PRECISION", raising=False)
    assert prec.resolve_precision("fp32") == "fp32"
    assert prec.resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        prec.resolve_precision("fp16")
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    assert prec.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: ())
    assert prec.resolve_precision("auto", "cpu") == "fp32"
    # The environment sets what "auto" means (e.g. bit-reproducible runs), never an explicit one.
    monkeypatch.setenv("USFM_PRECISION", "bf16")
    assert prec.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setenv("USFM_PRECISION", "fp32")
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: ("amx_bf16",))
    assert prec.resolve_precision("auto", "cpu") == "fp32"
    assert prec.resolve_precision("bf16", "cpu") == "bf16"


def test_cpu_flags_are_known_names():
    assert set(prec.cpu_bf16_flags()) <= set(prec.BF16_FLAGS)


def test_bf16_autocast_runs_the_linear_layers_in_bf16_and_the_scan_in_float32():
    """Under bf16 the matrix products are bf16 (where the speed comes from) while the
    selective scan still receives and returns float32 (its recurrence would lose the state
    in bf16)."""
    import usfm_core.models.vmamba as vmamba
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    torch.manual_seed(0)
    model = VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=16)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = model(x).tokens
    seen: dict[str, set] = {"linear": set(), "scan_in": set(), "scan_out": set()}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: seen["linear"].add(out.dtype))
    original = vmamba.cross_selective_scan

    def spy(u, *args, **kwargs):
        out = original(u, *args, **kwargs)
        seen["scan_in"].add(u.dtype)
        seen["scan_out"].add(out.dtype)
        return out

    vmamba.cross_selective_scan = spy
    try:
        with torch.no_grad(), prec.autocast("bf16") as used:
            out = model(x).tokens
    finally:
        vmamba.cross_selective_scan = original
    assert used == "bf16"
    assert seen["linear"] == {torch.bfloat16}
    assert seen["scan_in"] == seen["scan_out"] == {torch.float32}
    rel = float((out.float() - ref).norm() / ref.norm())
    assert 0 < rel < 0.05  # bf16 changes the numbers a little, not the features


def test_shipped_fetal_head_masks_agree_in_bf16(shared_data):
    """The shipped fetal-head segmenter on real HC18 images: bf16 masks overlap the float32
    masks (Dice >= 0.98 per image) and the head circumference moves by < 1 mm."""
    from usfm_core.evaluate.metrics import dice
    from usfm_core.evaluate.report import circumference_error_mm
    from usfm_core.finetune.infer import frame_logits, segment_frames
    from usfm_core.finetune.models import load_finetuned

    rows = list(csv.DictReader(open(shared_data / "hc18" / "manifest.csv")))[:4]
    hc18 = shared_data / "hc18"
    frames = [cv2.imread(str(hc18 / r["image"]), cv2.IMREAD_GRAYSCALE) for r in rows]
    model, _ = load_finetuned("fetal-head")
    m32 = list(segment_frames(model, frames, precision="fp32"))
    m16 = list(segment_frames(model, frames, precision="bf16"))
    logits = next(frame_logits(model, frames[:1], precision="bf16"))
    assert logits.dtype == torch.float32 and logits.shape[-2:] == frames[0].shape
    for r, a, b in zip(rows, m32, m16):
        assert a.any() and dice(a > 0, b > 0) >= 0.98
        px, ref = float(r["pixel_size_mm"]), float(r["head_circumference_mm"])
        e32 = circumference_error_mm(a, px, ref)
        e16 = circumference_error_mm(b, px, ref)
        assert abs(e32 - e16) < 1.0


def test_segment_cli_precision_flag(tmp_path, capsys):
    from usfm_core.cli import main
    from usfm_core.finetune.infer import segment_frames
    from usfm_core.finetune.models import Segmenter, load_finetuned, save_finetuned
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    torch.manual_seed(0)
    model = Segmenter(VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8)), 1, "conv")
    model.input_size = 64
    save_finetuned(model.eval(), tmp_path / "model")
    img = np.random.default_rng(0).integers(0, 255, (70, 90), np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    base = ["segment", str(tmp_path / "model"), str(tmp_path / "a.png"), "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "o32"), "--precision", "fp32"]) == 0
    assert "precision fp32" in capsys.readouterr().out
    written = cv2.imread(str(tmp_path / "o32" / "a_mask.png"), cv2.IMREAD_UNCHANGED)
    loaded, _ = load_finetuned(tmp_path / "model")
    expect = next(segment_frames(loaded, [img], precision="fp32"))
    np.testing.assert_array_equal(written > 0, expect > 0)
    assert main([*base, "--out", str(tmp_path / "o16"), "--precision", "bf16"]) == 0
    assert "precision bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "ox"), "--precision", "fp16"])
    assert "invalid choice" in capsys.readouterr().err


def test_evaluate_records_its_precision(shared_data, tmp_path):
    from usfm_core.evaluate.report import evaluate_model_dir

    root = tmp_path / "hc18"
    root.mkdir()
    for sub in ("images", "masks"):
        (root / sub).symlink_to(shared_data / "hc18" / sub)
    lines = (shared_data / "hc18" / "manifest.csv").read_text().splitlines()
    (root / "manifest.csv").write_text("\n".join(lines[:4]) + "\n")
    res = {}
    for p in ("fp32", "bf16"):
        res[p] = evaluate_model_dir("fetal-head", root, tmp_path / p, split="all", precision=p)
        saved = json.loads((tmp_path / p / "metrics.json").read_text())
        assert saved["precision"] == p
    assert res["bf16"]["clean"]["dice"] == pytest.approx(res["fp32"]["clean"]["dice"], abs=0.01)
