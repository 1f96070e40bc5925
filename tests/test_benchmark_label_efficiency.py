"""Tests of benchmarks/label_efficiency.py: cine writing, the inference worker, summaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "label_efficiency.py"


@pytest.fixture(scope="module")
def le():
    """The benchmark script imported as a module."""
    return load_script(SCRIPT, "label_efficiency_bench")


def test_write_cine_repeats_distinct_frames_and_reads_lazily(le, tmp_path):
    from usfm_core.io import load_scan

    path = le.write_cine(tmp_path / "cine.tif", n_frames=11, side=64, n_distinct=4)
    with load_scan(path) as scan:
        assert scan.n_frames == 11
        assert tuple(scan.frame_shape[:2]) == (64, 64)
        f0, f1, f4, f8 = (np.asarray(scan.frame(i)) for i in (0, 1, 4, 8))
    assert np.array_equal(f0, f4) and np.array_equal(f0, f8)  # period n_distinct
    assert not np.array_equal(f0, f1)  # but the distinct frames differ (motion)


def test_inference_worker_streams_every_frame(le, tmp_path):
    path = le.write_cine(tmp_path / "cine.tif", n_frames=10, side=96, n_distinct=3)
    spec = {
        "cine": str(path),
        "preset": "tiny",
        "input_size": 64,
        "max_seconds": 0,
        "batch_size": 4,
        "threads": 1,
    }
    import torch

    before = torch.get_num_threads()
    try:
        rec = le.inference_worker(spec)
    finally:
        torch.set_num_threads(before)  # the worker sets it process-wide
    assert rec["threads"] == 1
    assert rec["frames"] == rec["frames_total"] == 10 and rec["complete"]
    assert rec["frame_shape"][:2] == [96, 96]
    assert rec["fps"] > 0 and rec["seconds"] > 0
    assert rec["peak_rss_mb"] >= rec["rss_after_load_mb"] > 0
    assert 0.0 <= rec["mean_foreground"] <= 1.0
    assert 0.1 < rec["params_M"] < 3  # "tiny" is a sub-million-parameter backbone + decoder


def test_summarise_means_and_stds_over_seeds(le):
    rng = np.random.default_rng(0)
    runs = []
    for init in ("pretrained", "scratch"):
        for ratio in (0.2, 1.0):
            for seed in range(3):
                d = float(rng.uniform(0.2, 0.8))
                runs.append(
                    {
                        "init": init,
                        "label_ratio": ratio,
                        "seed": seed,
                        "n_train": int(100 * ratio),
                        "test_dice": d,
                        "test_iou": d / (2 - d),
                    }
                )
    rows = le.summarise(runs)
    assert [(r["init"], r["label_ratio"]) for r in rows] == [
        ("pretrained", 0.2),
        ("pretrained", 1.0),
        ("scratch", 0.2),
        ("scratch", 1.0),
    ]
    for row in rows:
        group = [
            r for r in runs if r["init"] == row["init"] and r["label_ratio"] == row["label_ratio"]
        ]
        dice = np.array([r["test_dice"] for r in group])
        assert row["seeds"] == 3
        assert row["dice_mean"] == pytest.approx(dice.mean())
        assert row["dice_std"] == pytest.approx(dice.std(ddof=1))
        assert row["iou_mean"] == pytest.approx(np.mean([r["test_iou"] for r in group]))
    table = le.format_tables({"table": rows})
    assert table.count("\n| pretrained |") == 2 and "| 20 % |" in table


def test_pretrain_folder_leaves_out_test_images(le, shared_data, tmp_path):
    from usfm_core.finetune.data import LabelledSet, make_splits

    busi = LabelledSet.from_folder(shared_data / "busi", "segmentation")
    splits = make_splits(busi.labels, busi.groups, seed=0)
    keep = splits["train"] + splits["val"]
    folder = le.pretrain_folder(busi, keep, shared_data / "hc18", tmp_path)
    linked = {p.name for p in (folder / "busi").iterdir()}
    assert len(linked) == len(keep)
    test_names = {Path(busi.items[i].image).name for i in splits["test"]}
    assert test_names and not linked & test_names
    assert (folder / "hc18" / "manifest.csv").is_file()


def test_cli_rejects_unknown_setting(le):
    with pytest.raises(SystemExit):
        le.main(["--setting", "nope"])


def test_baseline_arms_get_the_reference_drop_path(le):
    """MAE / JEPA backbones are fine-tuned with the OpenUS arm's stochastic depth (the rate is
    a fine-tuning regulariser stored in the config); weights untouched; a backbone that differs
    in anything else is left alone."""
    import torch

    from usfm_core.models.vmamba import VMamba, VMambaConfig

    torch.manual_seed(0)
    ref = VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8, drop_path_rate=0.0))
    mae = VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8, drop_path_rate=0.1))
    out = le.same_finetune_regularisation(mae, ref)
    assert out is not mae and out.config.drop_path_rate == 0.0
    assert le.architecture_id(out) == le.architecture_id(ref)
    for (name, a), b in zip(out.state_dict().items(), mae.state_dict().values()):
        assert torch.equal(a, b), name
    rates = [m.drop_path.p for m in out.modules() if hasattr(m, "drop_path")]
    assert rates and all(r == 0.0 for r in rates)
    wider = VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=16, drop_path_rate=0.1))
    assert le.same_finetune_regularisation(wider, ref) is wider
    assert le.same_finetune_regularisation(ref, ref) is ref
