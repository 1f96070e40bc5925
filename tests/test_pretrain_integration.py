"""End-to-end pre-training on a few real BUSI / HC18 images with the `tiny` preset (CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from usfm_core.cli import main
from usfm_core.pretrain.config import load_config
from usfm_core.pretrain.openus import build_openus
from usfm_core.pretrain.trainer import pretrain


@pytest.fixture(scope="module")
def tiny_data(shared_data, tmp_path_factory) -> Path:
    """8 BUSI + 8 HC18 PNGs in a fresh data folder (one sub-folder per data set)."""
    root = tmp_path_factory.mktemp("pretrain_data")
    for name in ("busi", "hc18"):
        images = sorted((shared_data / name / "images").glob("*.png"))[:8]
        (root / name).mkdir()
        for path in images:
            shutil.copy(path, root / name / path.name)
    return root


def _cfg(*extra: str):
    # Batch 2 keeps each CPU step around a second; schedules span 2 epochs of 8 steps.
    return load_config(
        "tiny", ["batch_size=2", "save_every=2", "log_every=1", "device=cpu", *extra]
    )


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate or unordered log rows: {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_tiny_losses_are_finite_and_fall_on_a_fixed_batch(tiny_data):
    from usfm_core.data import DatasetCatalog, make_pretrain_loader

    torch.manual_seed(0)
    cfg = _cfg("optim.lr=0.004", "optim.clip_grad=0")
    catalog = DatasetCatalog.from_folder(tiny_data)
    batch = next(iter(make_pretrain_loader(catalog, cfg.views, 2, 0, 0)))
    model = build_openus(cfg, total_steps=100, steps_per_epoch=50, n_items=len(catalog))
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=cfg.optim.lr)
    model.train()
    parts = []
    for step in range(6):
        loss, logs = model.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(step)
        parts.append(logs)
    totals = [p["loss"] for p in parts]
    assert all(torch.isfinite(torch.tensor(totals)))
    first, last = sum(totals[:3]) / 3, sum(totals[-3:]) / 3
    assert last < first, totals
    rec = [p["rec_global"] for p in parts]
    assert rec[-1] < rec[0], rec  # the reconstruction loss falls on a fixed batch
    # Distillation, not only the total: the teacher's targets are sharper than uniform and
    # differ between the images, and the student moves towards them.
    for p in parts:
        assert 0.0 < p["teacher_entropy_ratio_patch"] <= 1.0 + 1e-6
        assert 0.0 < p["teacher_entropy_ratio_cls"] <= 1.0 + 1e-6
    assert parts[-1]["teacher_entropy_ratio"] < 0.95, parts[-1]
    assert parts[-1]["teacher_mi"] > 0.1, parts[-1]
    cls = [p["cls"] for p in parts]
    assert sum(cls[-3:]) < sum(cls[:3]), cls


@pytest.mark.slow
def test_resume_continues_exactly_and_exports_backbone(tiny_data, tmp_path):
    full = pretrain(_cfg(), tiny_data, tmp_path / "full", max_steps=3)
    # "Killed" run: stops after the checkpoint at step 2 (mid-epoch), then resumes to step 3.
    part = pretrain(_cfg(), tiny_data, tmp_path / "part", max_steps=2)
    assert (part / "checkpoints" / "last" / "model.safetensors").exists()
    pretrain(_cfg(), tiny_data, part, resume=True, max_steps=3)
    a, b = _losses(full), _losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert b[3] == pytest.approx(a[3], abs=1e-5, rel=1e-5)
    assert len(set(a.values())) > 1  # the run really changes between steps
    state = torch.load(part / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["progress"]["step"] == 3
    # Everything fine-tuning needs: the teacher backbone, loadable by type.
    from usfm_core.models.serialization import load_model

    backbone, meta = load_model(part / "backbone", expected_type="vmamba")
    assert meta["extra"]["method"] == "openus" and meta["extra"]["steps"] == 3
    out = backbone(torch.zeros(1, 1, 64, 64))
    assert out.global_token.shape == (1, backbone.embed_dim)
    header = (part / "log.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "cls", "patch", "rec_global", "alpha", "r", "img_per_s"} <= set(header)
    assert {"teacher_entropy_ratio", "teacher_mi", "teacher_entropy_ratio_patch"} <= set(header)


def test_resume_without_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    from usfm_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nothing to resume"):
        pretrain(_cfg(), tiny_data, tmp_path / "none", resume=True, max_steps=1)


@pytest.mark.slow
def test_two_process_gloo_run_only_rank0_writes(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "usfm_core.cli",
        "pretrain",
        "--config",
        "tiny",
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--max-steps",
        "2",
        "--set",
        "batch_size=2",
        "--set",
        "log_every=1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(_losses(out)) == [1, 2]  # one row per step: only rank 0 logged
    names = sorted(p.name for p in out.iterdir())
    assert names == ["backbone", "checkpoints", "config.json", "log.csv", "log.jsonl"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last"]
    assert proc.stdout.count("pretraining done") == 2  # both ranks finished


def test_dry_run_cli_prints_plan_and_writes_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / "dry"
    rc = main(
        [
            "pretrain",
            "--config",
            "tiny",
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--dry-run",
            "--device",
            "cpu",
            "--set",
            "epochs=3",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "busi (8)" in text and "hc18 (8)" in text
    assert "total steps (schedules)" in text and "  12" in text  # 16 items / 4 per step × 3
    assert not out.exists()


def test_cli_reports_bad_input(tmp_path, capsys):
    rc = main(
        [
            "pretrain",
            "--config",
            "tiny",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
            "--dry-run",
        ]
    )
    assert rc == 1 and "data folder not found" in capsys.readouterr().err
    rc = main(
        [
            "pretrain",
            "--config",
            "tiny",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "masking.ratio=2",
        ]
    )
    assert rc == 1 and "masking.ratio" in capsys.readouterr().err
