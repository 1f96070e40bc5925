"""The shipped OpenUS-pretrained backbone ``openus-small-fast`` (issue #18 item 1, #16 item 8):
found by name everywhere, sha256-checked, fine-tunes from the CLI, and its reconstruction head
reconstructs masked cells far better than an untrained head (a property of a trained model)."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

NAME = "openus-small-fast"


@pytest.fixture(scope="module")
def entry():
    from usfm_core.models.zoo import find_model

    return find_model(NAME)  # verifies the three sha256s


@pytest.fixture(scope="module")
def shipped():
    from usfm_core.pretrain.inspect import load_run

    return load_run(NAME)


def test_found_by_name_and_kind(entry, capsys):
    from usfm_core.cli import main
    from usfm_core.finetune.models import load_backbone
    from usfm_core.models.zoo import BUILTIN_DIR, list_models

    assert entry.source == "builtin" and entry.kind == "backbone" and entry.has_inspect
    backbones = [e.name for e in list_models(kind="backbone")]
    assert NAME in backbones
    assert NAME not in [e.name for e in list_models(kind="segmentation")]
    assert all(e.kind == "backbone" for e in list_models(kind="backbone"))
    backbone = load_backbone(NAME)
    assert list(backbone.out_dims) == [16, 48, 128, 256]
    assert all(p.dtype == torch.float32 for p in backbone.parameters())
    size = sum(f.stat().st_size for f in (BUILTIN_DIR / NAME).iterdir())
    assert size <= 25_000_000
    info = json.loads((BUILTIN_DIR / "index.json").read_text())[NAME]
    assert info["kind"] == "backbone" and info["pretrain_step"] <= info["pretrain_total_steps"]
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert any(m["name"] == NAME and m["kind"] == "backbone" for m in listed)


@pytest.mark.parametrize("fname", ["model.safetensors", "inspect.safetensors", "config.json"])
def test_a_flipped_byte_is_refused(tmp_path, monkeypatch, fname):
    import usfm_core.models.zoo as zoo
    from usfm_core.errors import CheckpointError
    from usfm_core.pretrain.inspect import load_run

    fake = tmp_path / "models"
    fake.mkdir()
    shutil.copytree(zoo.BUILTIN_DIR / NAME, fake / NAME)
    index = json.loads((zoo.BUILTIN_DIR / "index.json").read_text())
    (fake / "index.json").write_text(json.dumps({NAME: index[NAME]}))
    target = fake / NAME / fname
    data = bytearray(target.read_bytes())
    # config.json: a letter of the description ('O' -> 'N'), so the JSON stays valid
    at = data.find(b"OpenUS") if fname == "config.json" else len(data) // 2
    data[at] ^= 0x01
    target.write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "BUILTIN_DIR", fake)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        zoo.find_model(NAME)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_run(NAME)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_run(fake / NAME)  # by path inside the shipped folder: checked too


def test_an_imported_copy_keeps_its_reconstruction_head(entry, tmp_path, monkeypatch):
    """``usfm-core models import`` copies inspect.safetensors too: the copy is inspectable
    by its new name and is offered as a backbone."""
    from usfm_core.models.zoo import import_model, list_models
    from usfm_core.pretrain.inspect import load_run

    monkeypatch.setenv("USFM_MODEL_DIR", str(tmp_path / "models"))
    dest = import_model(entry.path, "my-backbone")
    assert (dest / "inspect.safetensors").is_file()
    mine = [e for e in list_models(kind="backbone") if e.name == "my-backbone"]
    assert mine and mine[0].source == "user" and mine[0].has_inspect
    model = load_run("my-backbone")
    assert model.student.recon is not None


def test_a_finetuned_models_encoder_stays_a_backbone():
    from usfm_core.finetune.models import load_backbone

    backbone = load_backbone("sim-lesion")  # a shipped fine-tuned segmenter
    assert len(backbone.out_dims) == 4


@pytest.mark.slow
def test_finetune_cli_from_the_shipped_backbone(tmp_path, capsys):
    """``usfm-core finetune --backbone openus-small-fast`` starts from the shipped weights."""
    from usfm_core.cli import main
    from usfm_core.finetune.models import load_backbone, load_finetuned
    from usfm_core.sim.structures import write_structures_folder

    data = write_structures_folder(tmp_path / "phantoms", n=16, size=64, seed=0)
    out = tmp_path / "run"
    args = ["finetune", "--task", "seg", "--data", str(data), "--out", str(out)]
    args += ["--backbone", NAME, "--input-size", "64", "--batch-size", "4", "--max-steps", "2"]
    assert main(["--threads", "1", *args]) == 0
    model, meta = load_finetuned(out)
    assert NAME in meta["extra"]["backbone_source"]
    tuned, start = model.backbone.state_dict(), load_backbone(NAME).state_dict()
    assert tuned.keys() == start.keys()
    # Two small steps move the weights a little: they stay far closer to the shipped ones
    # than to a fresh random init of the same architecture.
    fresh = copy.deepcopy(load_backbone(NAME))
    for m in fresh.modules():
        if hasattr(m, "reset_parameters") and m is not fresh:
            m.reset_parameters()
    key = next(k for k, v in start.items() if v.ndim == 4)  # the stem's first conv
    to_start = (tuned[key] - start[key]).norm()
    to_fresh = (tuned[key] - fresh.state_dict()[key]).norm()
    assert to_start < 0.1 * to_fresh


def _masked_error(model, frame: np.ndarray) -> tuple[float, float]:
    """Mean squared error of the reconstruction in the masked cells, and of filling them
    with the mean of the visible pixels (frame in [0, 255])."""
    from usfm_core.pretrain.inspect import inspect_frame

    res = inspect_frame(model, frame, size=128, seed=0)
    ref = frame.astype(np.float32) / 255.0
    masked = res.mask_image
    err = float(((res.reconstruction - ref)[masked] ** 2).mean())
    fill = float(((ref[~masked].mean() - ref)[masked] ** 2).mean())
    return err, fill


@pytest.mark.slow
def test_reconstruction_beats_an_untrained_head(shipped):
    """On simulated frames the shipped student + reconstruction head fill the masked cells
    far closer to the frame than the same student with a randomly initialised head, and
    closer than filling them with the visible mean (measured at steps 1100 and 1800: about
    0.03 vs 0.18 untrained-head and 0.07-0.12 mean-fill MSE)."""
    from usfm_core.pretrain.heads import ReconstructionHead
    from usfm_core.sim import simulate_frame

    untrained = copy.deepcopy(shipped)
    torch.manual_seed(0)
    recon = shipped.student.recon
    untrained.student.recon = ReconstructionHead(
        recon.proj.in_channels, shipped.in_chans, recon.stride
    ).eval()
    errs, randoms, fills = [], [], []
    for seed, geometry in ((100, "linear"), (103, "sector")):
        frame = simulate_frame(seed=seed, geometry=geometry).image
        frame = frame if frame.ndim == 2 else frame.mean(-1)
        err, fill = _masked_error(shipped, frame)
        errs.append(err)
        fills.append(fill)
        randoms.append(_masked_error(untrained, frame)[0])
    print(f"masked-cell MSE: shipped {errs}, untrained head {randoms}, mean fill {fills}")
    assert np.mean(errs) < 0.5 * np.mean(randoms)
    assert np.mean(errs) < np.mean(fills)


def test_inspect_maps_of_the_shipped_backbone(shipped):
    from usfm_core.pretrain.inspect import inspect_frame
    from usfm_core.sim import simulate_frame

    frame = simulate_frame(seed=5, height=160, width=200).image
    res = inspect_frame(shipped, frame, size=128, seed=1)
    cell = int(shipped.cfg.masking.cell)
    assert res.cell == cell and res.mask.shape == (128 // cell, 128 // cell)
    assert res.ratio == pytest.approx(shipped.cfg.masking.ratio)
    for m in (res.attention, res.loss_map, res.alp, res.reconstruction):
        assert m.shape == frame.shape[:2] and np.isfinite(m).all()


def test_a_backbone_without_a_reconstruction_head_is_a_clear_error():
    from usfm_core.errors import CheckpointError
    from usfm_core.pretrain.inspect import load_run

    with pytest.raises(CheckpointError, match="reconstruction head"):
        load_run("sim-lesion")


# ----------------------------------------------------------------------------- napari
needs_napari = pytest.mark.skipif(
    importlib.util.find_spec("napari") is None, reason="napari is not installed"
)


@pytest.fixture()
def model_dir(tmp_path, monkeypatch):
    d = tmp_path / "usfm-models"
    monkeypatch.setenv("USFM_MODEL_DIR", str(d))
    monkeypatch.setenv("USFM_DEVICE", "cpu")
    return d


@needs_napari
def test_finetune_widget_preselects_the_shipped_backbone(make_napari_viewer, model_dir):
    from napari_usfm._widgets import FROM_SCRATCH, FinetuneWidget

    widget = FinetuneWidget(make_napari_viewer())
    assert widget._backbone.current_choice == NAME
    assert FROM_SCRATCH in widget._backbone.choices
    assert "OpenUS" in widget._backbone_info.value


@needs_napari
@pytest.mark.gui
@pytest.mark.slow
def test_inspect_widget_shows_the_shipped_backbone_by_default(make_napari_viewer, qtbot, model_dir):
    from napari_usfm._widgets import RUN_FOLDER, InspectWidget
    from usfm_core.sim import simulate_frame

    viewer = make_napari_viewer()
    frame = simulate_frame(seed=7, height=128, width=160).image
    viewer.add_image(frame, name="frame")
    widget = InspectWidget(viewer)
    assert widget._model.current_choice == NAME and RUN_FOLDER in widget._model.choices
    widget._size.value = 128
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is not None and not widget.busy, timeout=120_000)
    assert widget.error is None, widget.error
    rec = viewer.layers["reconstruction"].data
    assert rec.shape == frame.shape[:2] and np.isfinite(rec).all()
    assert widget.result.mask.shape == (8, 8)  # 128-px input, 16-px cells of the backbone
