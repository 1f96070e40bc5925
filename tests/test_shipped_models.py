"""Models shipped inside the package: found by name, checksummed, and reproducing their
recorded metric (issue 8's contract, so far for the demo segmenter ``sim-lesion``)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "train_sim_lesion", REPO / "tools" / "train_sim_lesion.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def index() -> dict:
    from usfm_core.models.zoo import BUILTIN_DIR

    path = BUILTIN_DIR / "index.json"
    assert path.is_file(), "the package ships no models index"
    return json.loads(path.read_text())


def test_sim_lesion_is_listed_and_loads_by_name(index, capsys):
    from usfm_core.cli import main
    from usfm_core.finetune.models import load_finetuned
    from usfm_core.models.zoo import find_model

    assert "sim-lesion" in index
    entry = find_model("sim-lesion")  # verifies the sha256
    assert entry.source == "builtin" and entry.kind == "segmentation"
    model, spec = load_finetuned(entry.path)
    assert spec["task"] == "segmentation"
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert any(m["name"] == "sim-lesion" and m["source"] == "builtin" for m in listed)


def test_checksum_catches_a_damaged_weights_file(index, tmp_path, monkeypatch):
    import usfm_core.models.zoo as zoo
    from usfm_core.errors import CheckpointError

    fake = tmp_path / "models"
    shutil.copytree(zoo.BUILTIN_DIR, fake)
    weights = fake / "sim-lesion" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "BUILTIN_DIR", fake)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        zoo.find_model("sim-lesion")


@pytest.mark.slow
def test_sim_lesion_reproduces_its_recorded_dice(index):
    from usfm_core.models.zoo import find_model

    recorded = index["sim-lesion"]["check_dice"]
    measured = _tool().check_dice(find_model("sim-lesion").path)
    assert measured == pytest.approx(recorded, abs=0.02)
    # A weak demo model (tiny, from scratch, 30 epochs on 128 simulated frames), but far from
    # the all-background (0) and clearly above chance on lesions covering a few % of a frame.
    assert measured > 0.3, "the shipped demo segmenter should find simulated lesions"
