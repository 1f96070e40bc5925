"""Model folders (model.safetensors + config.json): round trips and every CheckpointError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from usfm_core.errors import CheckpointError, ConfigError
from usfm_core.models.serialization import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    build_model,
    load_model,
    model_types,
    register_model,
    save_model,
)
from usfm_core.models.vit import ViT, ViTConfig
from usfm_core.models.vmamba import VMamba, VMambaConfig


@pytest.fixture(scope="module")
def tiny() -> VMamba:
    torch.manual_seed(0)
    model = VMamba(VMambaConfig.preset("tiny")).eval()
    with torch.no_grad():  # move off the init values so a fresh model would differ
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture
def saved(tiny: VMamba, tmp_path: Path) -> Path:
    return save_model(tiny, tmp_path / "ckpt", extra={"epoch": 7, "note": "test"})


def test_vmamba_round_trip(tiny: VMamba, saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temps
    model, meta = load_model(saved, expected_type="vmamba")
    assert meta["model_type"] == "vmamba" and meta["extra"] == {"epoch": 7, "note": "test"}
    assert meta["config"] == tiny.config.to_dict() and "usfm_version" in meta
    assert not model.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).tokens, tiny(x).tokens, rtol=0, atol=0)
    for key, value in tiny.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # The weights file (or the config) may be given instead of the folder.
    assert load_model(saved / WEIGHTS_FILE)[1] == meta


def test_vit_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = ViT(ViTConfig.preset("vit-tiny-test", cls_token=True)).eval()
    save_model(vit, tmp_path)
    loaded, meta = load_model(tmp_path, expected_type="vit")
    assert isinstance(loaded, ViT) and meta["config"]["cls_token"] is True
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).tokens, vit(x).tokens, rtol=0, atol=0)


class Tied(nn.Module):
    """A model with tied (shared) and non-contiguous weights."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.register_buffer("t", torch.randn(4, 3).t())


def test_shared_and_non_contiguous_tensors(tmp_path: Path) -> None:
    register_model("test-tied", Tied, ViTConfig)
    assert "test-tied" in model_types()
    model = Tied(ViTConfig.preset("vit-tiny-test"))
    save_model(model, tmp_path)
    loaded, _ = load_model(tmp_path, expected_type="test-tied")
    assert torch.equal(loaded.a.weight, model.a.weight)
    assert torch.equal(loaded.b.weight, model.a.weight) and torch.equal(loaded.t, model.t)


def test_missing_folder_and_files(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="folder not found"):
        load_model(tmp_path / "nope")
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors") as err:
        load_model(saved)
    assert str(saved / WEIGHTS_FILE) in str(err.value) and "fix:" in str(err.value)
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"missing config\.json"):
        load_model(saved)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "pickle"])
def test_corrupt_weights(saved: Path, damage: str) -> None:
    path = saved / WEIGHTS_FILE
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file at all")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    else:  # a pickle must never be unpickled
        torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="cannot read the weights") as err:
        load_model(saved)
    assert str(path) in str(err.value)


def test_bad_config(saved: Path) -> None:
    cfg_path = saved / CONFIG_FILE
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(saved)
    cfg_path.write_text(json.dumps({**good, "model_type": "resnet"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'resnet'"):
        load_model(saved)
    cfg_path.write_text(json.dumps(good))
    with pytest.raises(CheckpointError, match="holds a 'vmamba' model, expected 'vit'"):
        load_model(saved, expected_type="vit")
    cfg_path.write_text(json.dumps({**good, "config": {**good["config"], "in_chans": 7}}))
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_model(saved)


def test_weights_do_not_match_config(saved: Path) -> None:
    cfg_path = saved / CONFIG_FILE
    good = json.loads(cfg_path.read_text())
    deeper = {**good["config"], "depths": [1, 1, 3, 1]}
    cfg_path.write_text(json.dumps({**good, "config": deeper}))
    with pytest.raises(CheckpointError, match=r"missing: stages\.2\.2\.") as err:
        load_model(saved)
    assert "fix:" in str(err.value)
    wider = {**good["config"], "dims": 24}
    cfg_path.write_text(json.dumps({**good, "config": wider}))
    with pytest.raises(CheckpointError, match=r"shape: .*file \(16,\) vs model \(24,\)"):
        load_model(saved)


def test_build_and_save_errors(tmp_path: Path) -> None:
    model = build_model("vmamba", VMambaConfig.preset("tiny").to_dict())
    assert isinstance(model, VMamba) and model.config.depths == (1, 1, 2, 1)
    with pytest.raises(ConfigError, match="unknown model_type"):
        build_model("resnet", {})
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        save_model(model, tmp_path, extra={"bad": object()})
    assert not (tmp_path / CONFIG_FILE).exists()
    with pytest.raises(ValueError, match="not registered"):
        save_model(nn.Linear(2, 2), tmp_path)


def test_weights_stored_as_float16_load_back_as_float32(tmp_path):
    """Shipped models are stored in float16: half the bytes, float32 model after loading."""
    from usfm_core.finetune.models import Segmenter, load_finetuned, save_finetuned
    from usfm_core.models.serialization import store_weights_as
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    torch.manual_seed(0)
    model = Segmenter(VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8)), 1, "conv")
    model.eval()
    save_finetuned(model, tmp_path / "m")
    size32 = (tmp_path / "m" / "model.safetensors").stat().st_size
    store_weights_as(tmp_path / "m", "float16")
    size16 = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    back, meta = load_finetuned(tmp_path / "m")
    assert meta["storage_dtype"] == "float16" and meta["task"] == "segmentation"
    assert all(p.dtype == torch.float32 for p in back.parameters())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ref, out = model(x), back(x)
    assert not torch.equal(ref, out)  # really rounded
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    with pytest.raises(ConfigError, match="storage dtype"):
        store_weights_as(tmp_path / "m", "int8")
