"""Models shipped inside the package: found by name, checksummed, and reproducing their
recorded metric (issue 8's contract, so far for the demo segmenter ``sim-lesion``)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_tool(name: str):
    """Import ``tools/<name>.py`` (recipes that train and check the shipped models)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool():
    return _load_tool("train_sim_lesion")


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


# ------------------------------------------------------------- the real (BUSI / HC18) models
REAL_MODELS = ("breast-lesion", "fetal-head", "breast-class")
MAIN_METRIC = {"segmentation": "dice", "classification": "macro_f1"}


def _shipped_tool():
    return _load_tool("shipped_models")


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_model_loads_by_name_with_both_checksums(index, name, capsys):
    import torch

    from usfm_core.cli import main
    from usfm_core.finetune.models import load_finetuned
    from usfm_core.models.serialization import load_model
    from usfm_core.models.zoo import BUILTIN_DIR, file_sha256

    info = index[name]
    folder = BUILTIN_DIR / name
    assert file_sha256(folder / "model.safetensors") == info["sha256"]
    assert file_sha256(folder / "config.json") == info["config_sha256"]
    model, meta = load_model(name)  # by name, checksummed
    assert meta["model_type"] in ("segmenter", "classifier")
    model, spec = load_finetuned(name)
    assert spec["task"] == info["task"]
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n_params < 8_000_000, "a few million parameters, for CPU use"
    x = torch.rand(1, 1, model.input_size, model.input_size)
    out = model(x)
    assert torch.isfinite(out).all()
    main(["models", "--json"])
    assert any(m["name"] == name for m in json.loads(capsys.readouterr().out))


def test_shipped_weights_fit_the_size_budget(index):
    """Each shipped model's folder fits the ≤ 25 MB of issues #14 / #18 (the four task
    models together took ~24 MiB before the 10 MiB pretrained backbone shipped)."""
    from usfm_core.models.zoo import BUILTIN_DIR

    for name in index:
        size = sum(f.stat().st_size for f in (BUILTIN_DIR / name).rglob("*") if f.is_file())
        assert size <= 25_000_000, f"{name} takes {size / 2**20:.1f} MiB (budget 25 MB each)"


def test_config_checksum_catches_an_edited_architecture(index, tmp_path, monkeypatch):
    import usfm_core.models.zoo as zoo
    from usfm_core.errors import CheckpointError

    fake = tmp_path / "models"
    shutil.copytree(zoo.BUILTIN_DIR, fake)
    cfg = fake / "breast-lesion" / "config.json"
    cfg.write_text(cfg.read_text().replace('"input_size": ', '"input_size": 1'))
    monkeypatch.setattr(zoo, "BUILTIN_DIR", fake)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        zoo.find_model("breast-lesion")


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_model_reproduces_its_metrics_on_the_check_subset(index, name, shared_data):
    """Re-score the fixed test items recorded at install; same numbers within tolerance."""
    info = index[name]
    check = info["check"]
    measured = _shipped_tool().check_subset(name, shared_data, check["keys"])["metrics"]
    key = MAIN_METRIC[info["task"]]
    assert measured[key] == pytest.approx(check["metrics"][key], abs=0.02)
    if "hc_error_mm" in check["metrics"]:
        assert measured["hc_error_mm"] == pytest.approx(check["metrics"]["hc_error_mm"], abs=0.5)
    # Useful models, not stubs: well above an all-background mask (≈ 0.15 Dice on this BUSI
    # subset, the share of normal images); the weak classifier above chance AUROC (0.5).
    metric, floor = {
        "breast-lesion": ("dice", 0.4),
        "fetal-head": ("dice", 0.8),
        "breast-class": ("auroc", 0.55),
    }[name]
    assert measured[metric] > floor


def test_sample_images_are_test_images_of_the_shipped_models(shared_data, tmp_path):
    """The plugin's real samples were never seen in pre-training or fine-tuning."""
    tool = _shipped_tool()
    hc18 = tool.prepare_hc18(shared_data / "hc18", tmp_path / "hc18")
    seen = {p.name for p in tool.train_val_images(hc18)}
    seen |= {p.name for p in tool.train_val_images(shared_data / "busi")}
    assert len(seen) == 663 + 848
    assert "301_HC.png" not in seen and "malignant_170.png" not in seen
    assert "000_HC.png" in seen  # the split does keep images out: the old sample was seen


def test_loaders_take_model_names(index, tmp_path, monkeypatch):
    from usfm_core.errors import CheckpointError
    from usfm_core.finetune.models import load_finetuned
    from usfm_core.models.serialization import load_model

    monkeypatch.chdir(tmp_path)  # a name, not a folder here
    model, meta = load_model("sim-lesion")
    assert meta["model_type"] == "segmenter"
    seg, spec = load_finetuned("sim-lesion")
    assert spec["task"] == "segmentation" and type(seg) is type(model)
    with pytest.raises(CheckpointError, match="no model named 'no-such-model'") as err:
        load_model("no-such-model")
    assert "sim-lesion" in err.value.hint


def test_infer_size_choice_on_validation_writes_only_the_run_folder(shared_data, tmp_path):
    """``tools/shipped_models.py infer-size`` scores the recipe's validation split at each size
    (by HC error on HC18 items), writes ``extra.infer_size`` into a run folder's copy (and drops
    it when the training size wins), and refuses the packaged model."""
    import shutil

    from usfm_core.finetune.models import load_finetuned
    from usfm_core.models.zoo import find_model

    tool = _shipped_tool()
    rows = (shared_data / "hc18" / "manifest.csv").read_text().splitlines()
    folder = tmp_path / "hc18"
    folder.mkdir()
    for sub in ("images", "masks"):
        (folder / sub).symlink_to(shared_data / "hc18" / sub)
    (folder / "manifest.csv").write_text("\n".join(rows[:41]) + "\n")  # 40 items
    run_model = tmp_path / "model"
    shutil.copytree(find_model("fetal-head").path, run_model)
    res = tool.choose_infer_size(run_model, folder, [224, 256], apply=True)
    by_size = {r["size"]: r for r in res["rows"]}
    assert set(by_size) == {224, 256} and res["n_val"] >= 4
    best = min(by_size, key=lambda s: (by_size[s]["hc_error_mm"], s))
    assert res["chosen"] == best
    loaded, meta = load_finetuned(run_model)
    assert loaded.infer_size == (None if best == 224 else best)
    assert (meta["extra"].get("infer_size") is None) == (best == 224)
    with pytest.raises(SystemExit, match="packaged"):
        tool.choose_infer_size(find_model("fetal-head").path, folder, [224], apply=True)
