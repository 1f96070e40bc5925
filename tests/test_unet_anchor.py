"""benchmarks/unet_anchor.py: the plain U-Net anchor (MONAI's BasicUNet or its copy here)
trained with the shipped recipe on the shipped models' split, in its --smoke mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "unet_anchor.py"
BASIC_UNET_PARAMS = 1_978_433  # MONAI 1.6.1 BasicUNet(spatial_dims=2, 1 → 1), default features


@pytest.fixture(scope="module")
def anchor():
    """The benchmark script imported as a module."""
    return load_script(SCRIPT, "unet_anchor_bench")


def test_plain_unet_is_basic_unets_architecture(anchor):
    """Without MONAI the anchor is the same network: same parameter count, same shapes."""
    net = anchor.PlainUNet()
    assert sum(p.numel() for p in net.parameters()) == BASIC_UNET_PARAMS
    x = torch.rand(2, 1, 64, 96)
    assert net(x).shape == (2, 1, 64, 96)
    if importlib.util.find_spec("monai") is not None:
        from monai.networks.nets import BasicUNet

        ref = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1)
        shapes = sorted(tuple(p.shape) for p in ref.parameters())
        assert shapes == sorted(tuple(p.shape) for p in net.parameters())


def test_smoke_run_trains_and_scores_both_models(anchor, shared_data, tmp_path, capsys):
    out = tmp_path / "anchor.json"
    argv = ["--smoke", "--arch", "plain", "--shared", str(shared_data)]
    assert anchor.main([*argv, "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "smoke" and res["params"] == BASIC_UNET_PARAMS
    assert res["machine"]["load_avg_1min"] >= 0 and "uptime" in res["machine"]
    assert set(res["models"]) == {"breast-lesion", "fetal-head"}
    for m in res["models"].values():
        assert m["n_test"] == 4 and m["recipe"]["lr"] == 5e-4
        assert set(m["anchor"]) == {"0"}
        train, test = m["anchor"]["0"]["train"], m["anchor"]["0"]["test"]
        assert train["steps"] == 2 and train["best_epoch"] == 1
        assert train["steps_planned"] == 2  # 8 training images / batch 4, one epoch
        for arm in (test, m["shipped"]):
            assert 0.0 <= arm["dice"] <= 1.0
            assert arm["n_scored"] + arm["n_empty_gt"] == 4
            assert len(arm["worst"]) == arm["n_scored"]
    # HC18 items carry the reference circumference: HC error in mm for both arms.
    fh = res["models"]["fetal-head"]
    assert fh["shipped"]["hc_error_mm"] >= 0 and fh["anchor"]["0"]["test"]["hc_error_mm"] >= 0
    # The shipped fetal-head finds heads on its own test images; 2 steps of U-Net do not.
    assert fh["shipped"]["dice"] > fh["anchor"]["0"]["test"]["dice"]
    printed = capsys.readouterr().out
    assert "| fetal-head | shipped |" in printed and "| fetal-head | U-Net | 1 |" in printed


def test_split_is_the_shipped_models(anchor, shared_data, tmp_path):
    """The anchor trains on the shipped model's split: its test items are the recorded ones."""
    from usfm_core.models.zoo import find_model

    data, splits = anchor.load_task("breast-lesion", shared_data, tmp_path)
    recorded = find_model("breast-lesion").config["extra"]["test_items"]
    assert sorted(data.items[i].key for i in splits["test"]) == sorted(recorded)
    assert len(splits["train"]) == 546 and len(splits["val"]) == 117
    assert not set(splits["train"]) & set(splits["test"])


def test_cpu_budget_plans_the_steps_that_fit(anchor, shared_data, tmp_path, monkeypatch):
    """``--budget cpu``: the step budget comes from timing the first steps. With a CPU clock that
    advances 1 s per training forward (deterministic, whatever the machine's load), a budget
    below one step trains exactly the calibration steps and a 12-s budget plans 12 steps, run over
    several epochs of 4 batches."""
    clock = {"t": 0.0}
    monkeypatch.setattr(anchor.time, "process_time", lambda: clock["t"])

    def net():
        model = anchor.build_unet("plain", 32)[0]

        def tick(module, _inputs):
            if module.training:
                clock["t"] += 1.0

        model.register_forward_pre_hook(tick)
        return model

    data, splits = anchor.load_task("breast-lesion", shared_data, tmp_path)
    small = {k: splits[k][:8] for k in ("train", "val")}
    kw = dict(seed=0, epochs=1, batch_size=2)  # 4 batches an epoch
    tiny = anchor.train_anchor(net(), data, small, cpu_budget_s=1e-6, **kw)
    assert tiny["steps"] == tiny["steps_planned"] == anchor.CALIBRATION_STEPS
    assert tiny["cpu_budget_s"] == 1e-6 and tiny["cpu_s_per_step"] == 1.0
    more = anchor.train_anchor(net(), data, small, cpu_budget_s=12.0, **kw)
    assert more["steps"] == more["steps_planned"] == 12
    assert more["best_epoch"] >= 1
