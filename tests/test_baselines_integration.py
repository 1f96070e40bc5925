"""MAE and JEPA/SALT pre-training on a few real BUSI images through the trainer (CPU, tiny)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from usfm_core.cli import main
from usfm_core.models.serialization import load_model
from usfm_core.pretrain.config import load_config
from usfm_core.pretrain.jepa import build_jepa
from usfm_core.pretrain.mae import build_mae
from usfm_core.pretrain.trainer import pretrain

VIT = "backbone.preset=vit-tiny-test"


@pytest.fixture(scope="module")
def busi8(shared_data, tmp_path_factory) -> Path:
    """8 real BUSI PNGs in a fresh data folder."""
    root = tmp_path_factory.mktemp("baseline_data")
    (root / "busi").mkdir()
    for path in sorted((shared_data / "busi" / "images").glob("*.png"))[:8]:
        shutil.copy(path, root / "busi" / path.name)
    return root


def _cfg(method: str, *extra: str):
    return load_config(
        "tiny",
        [f"method={method}", "batch_size=4", "save_every=2", "device=cpu", *extra],
    )


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mae_run(busi8, tmp_path_factory) -> Path:
    """A 3-step MAE (ViT) run through the trainer; its backbone is a JEPA teacher below."""
    out = tmp_path_factory.mktemp("mae_run")
    torch.manual_seed(0)
    return pretrain(_cfg("mae", VIT), busi8, out, max_steps=3)


@pytest.mark.parametrize("method", ["mae", "jepa"])
def test_loss_is_finite_and_falls_on_a_fixed_batch(busi8, method):
    from usfm_core.data import DatasetCatalog, make_pretrain_loader

    torch.manual_seed(0)
    cfg = _cfg(method, VIT, "views.n_local=0")
    catalog = DatasetCatalog.from_folder(busi8)
    batch = next(iter(make_pretrain_loader(catalog, cfg.views, 4, 0, 0)))
    factory = build_mae if method == "mae" else build_jepa
    model = factory(cfg, total_steps=100, steps_per_epoch=2, n_items=len(catalog))
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=2e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss, logs = model.training_step(batch, 0)  # step 0 every time: the same masks too
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(0)
        losses.append(logs["loss"])
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_mae_pretrain_exports_a_vit_recording_the_method(mae_run):
    assert len(_losses(mae_run)) == 3
    encoder, meta = load_model(mae_run / "backbone", expected_type="vit")
    assert meta["extra"]["method"] == "mae" and meta["extra"]["steps"] == 3
    assert meta["extra"]["pretrain"]["mae"]["ratio"] == 0.25
    saved = json.loads((mae_run / "checkpoints" / "last" / "config.json").read_text())
    assert saved["method"] == "mae"
    out = encoder(torch.zeros(1, 1, 64, 64))
    assert out.patch_tokens.shape == (1, 16, encoder.embed_dim)


def test_jepa_learns_from_a_frozen_mae_teacher(busi8, mae_run, tmp_path):
    """Cross-method: SALT stage 2 with the stage-1 MAE export as the frozen teacher."""
    teacher_dir = mae_run / "backbone"
    cfg = _cfg("jepa", VIT, f"jepa.teacher_ckpt={teacher_dir}")
    out = pretrain(cfg, busi8, tmp_path / "jepa", max_steps=2)
    assert all(torch.isfinite(torch.tensor(_losses(out))))
    _, meta = load_model(out / "backbone", expected_type="vit")
    assert meta["extra"]["method"] == "jepa"
    assert meta["extra"]["pretrain"]["jepa"]["teacher_ckpt"] == str(teacher_dir)
    # The teacher in the final checkpoint is bitwise the MAE export: never updated.
    mae_weights = load_file(str(teacher_dir / "model.safetensors"))
    ckpt = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    for key, value in mae_weights.items():
        assert torch.equal(ckpt[f"teacher.{key}"], value), key


@pytest.mark.parametrize("method", ["mae", "jepa"])
def test_dry_run_plans_each_method(busi8, tmp_path, capsys, method):
    args = ["pretrain", "--config", "tiny", "--data", str(busi8), "--out", str(tmp_path / "o")]
    assert main([*args, "--dry-run", "--device", "cpu", "--set", f"method={method}"]) == 0
    text = capsys.readouterr().out
    assert f"method                       {method}" in text and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_tiny_preset_runs_both_methods_and_an_openus_teacher(busi8, tmp_path, capsys):
    """``--config tiny --set method=mae|jepa`` (VMamba tiny backbone), then a JEPA ViT student
    whose frozen teacher is an OpenUS export (VMamba, coarser grid)."""
    base = ["pretrain", "--config", "tiny", "--data", str(busi8), "--device", "cpu"]
    base += ["--max-steps", "1", "--set", "batch_size=2"]
    for method in ("mae", "jepa"):
        out = tmp_path / method
        assert main([*base, "--out", str(out), "--set", f"method={method}"]) == 0
        _, meta = load_model(out / "backbone", expected_type="vmamba")
        assert meta["extra"]["method"] == method
    openus = tmp_path / "openus"
    assert main([*base, "--out", str(openus)]) == 0
    out = tmp_path / "jepa_from_openus"
    teacher = f"jepa.teacher_ckpt={openus / 'backbone'}"
    args = [*base, "--out", str(out), "--set", "method=jepa", "--set", VIT, "--set", teacher]
    assert main(args) == 0, capsys.readouterr().err
    assert len(_losses(out)) == 1 and torch.isfinite(torch.tensor(_losses(out))).all()
