"""Issue #15 part C: hostile model configs, NaN weights, checkpoint checksums, temp cleanup,
and shipped model names that a local folder must not shadow."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from usfm_core.errors import CheckpointError, ConfigError
from usfm_core.finetune.models import (
    Classifier,
    Segmenter,
    TaskModelConfig,
    load_backbone,
    load_finetuned,
    save_finetuned,
)
from usfm_core.models import zoo
from usfm_core.models.limits import check_json_tree, read_json_file
from usfm_core.models.serialization import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    build_model,
    load_model,
    save_model,
    store_weights_as,
)
from usfm_core.models.vit import ViT, ViTConfig
from usfm_core.models.vmamba import VMamba, VMambaConfig


def _tiny_vmamba(**overrides) -> VMamba:
    torch.manual_seed(0)
    return VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8, **overrides)).eval()


def _tiny_segmenter() -> Segmenter:
    model = Segmenter(_tiny_vmamba(), 1, "conv").eval()
    model.input_size = 64
    return model


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_model(_tiny_vmamba(), tmp_path / "ckpt")


def _rewrite(folder: Path, **changes) -> Path:
    """Change top-level keys of the saved config.json (``config`` merged key by key)."""
    path = folder / CONFIG_FILE
    meta = json.loads(path.read_text())
    cfg = changes.pop("config", None)
    if cfg is not None:
        meta["config"] = {**meta["config"], **cfg}
    meta.update(changes)
    path.write_text(json.dumps(meta))
    return path


def _flip_bytes(path: Path, n: int = 64, from_end: int = 200) -> None:
    """Corrupt ``n`` bytes inside the tensor data of a file (XOR 0xFF), keeping its size."""
    data = bytearray(path.read_bytes())
    start = len(data) - from_end
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------- hostile config.json
HOSTILE = {
    "huge dims": ({"dims": 10**6}, "dims"),
    "huge stage dims": ({"dims": [8, 16, 32, 10**6]}, "dims"),
    "huge depth": ({"depths": [1, 1, 10**5, 1]}, "depths[2]"),
    "negative depth": ({"depths": [1, -1, 1, 1]}, "depths[1]"),
    "depth as float": ({"depths": [1, 1, 1.5, 1]}, "depths[2]"),
    "dims as string": ({"dims": "96"}, "dims"),
    "dims as object": ({"dims": {"a": 1}}, "dims"),
    "bool as int": ({"d_state": True}, "d_state"),
    "ratio not finite": ({"ssm_ratio": float("nan")}, "ssm_ratio"),
    "zero ratio": ({"ssm_ratio": 0}, "ssm_ratio"),
    "negative eps": ({"norm_eps": -1.0}, "norm_eps"),
    "4300-digit int": ({}, "config.json"),
    "wrong type gate": ({"use_z_gate": "yes"}, "use_z_gate"),
    "unknown key": ({"depthz": [1, 1, 1, 1]}, "depthz"),
    "nested lists": ({"depths": [[[[1]]], 1, 1, 1]}, "depths[0]"),
    "long string": ({"scan_backend": "x" * 10_000}, "scan_backend"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_vmamba_config_is_refused_naming_file_and_field(saved: Path, case: str) -> None:
    change, field = HOSTILE[case]
    cfg_path = saved / CONFIG_FILE
    meta = json.loads(cfg_path.read_text())
    meta["config"] = {**meta["config"], **change}
    if case == "4300-digit int":  # json.dumps cannot write it: splice the digits in
        meta["config"]["d_state"] = "BIG"
        cfg_path.write_text(json.dumps(meta).replace('"BIG"', "1" + "0" * 5000))
    else:
        cfg_path.write_text(json.dumps(meta))  # NaN is written as NaN, as json reads it
    with pytest.raises(CheckpointError) as err:
        load_model(saved)
    msg = str(err.value)
    assert str(cfg_path) in msg, msg
    assert field.split("[")[0] in msg, msg
    assert "Traceback" not in msg and "\n" in msg  # one message + a fix line


def test_deeply_nested_or_huge_config_json_never_recurses(saved: Path) -> None:
    cfg_path = saved / CONFIG_FILE
    cfg_path.write_text('{"model_type": "vmamba", "config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="nested too deeply") as err:
        load_model(saved)
    assert str(cfg_path) in str(err.value)
    # Nested within Python's recursion limit but beyond the config depth bound.
    cfg_path.write_text('{"model_type": "vmamba", "config": ' + "[" * 200 + "]" * 200 + "}")
    with pytest.raises(CheckpointError, match="nested more than"):
        load_model(saved)
    cfg_path.write_text(json.dumps({"model_type": "vmamba", "config": {}, "pad": "x" * 2**21}))
    with pytest.raises(CheckpointError, match="more than the"):
        load_model(saved)
    # zoo's listing reads config.json with the same bounds
    cfg_path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        zoo.read_entry(saved)


def test_check_json_tree_bounds_without_recursion() -> None:
    deep: list = []
    node = deep
    for _ in range(50_000):  # deeper than Python's recursion limit: must not matter
        node.append([])
        node = node[0]
    with pytest.raises(ConfigError, match="nested more than"):
        check_json_tree(deep)
    with pytest.raises(ConfigError, match="more than 20000 values"):
        check_json_tree(list(range(30_000)))
    check_json_tree({"a": [1, 2.5, "x", None, True, {"b": []}]})  # plain JSON passes


def test_parameter_budget_refuses_before_allocating(saved: Path, monkeypatch) -> None:
    # Every field in range, but 8192-wide stages doubling to 65536: ≈ 10¹¹ parameters
    # (hundreds of GB). Refused from the config alone, so this test allocates nothing.
    _rewrite(saved, config={"dims": 8192, "depths": [2, 2, 15, 2]})
    with pytest.raises(CheckpointError, match=r"parameters .* more than the cap") as err:
        load_model(saved)
    assert "USFM_MAX_MODEL_PARAMS" in str(err.value)
    # The cap is configurable: a tiny cap refuses even the tiny model.
    tiny = _tiny_vmamba()
    monkeypatch.setenv("USFM_MAX_MODEL_PARAMS", "1000")
    with pytest.raises(ConfigError, match="parameters"):
        build_model("vmamba", tiny.config.to_dict())
    monkeypatch.setenv("USFM_MAX_MODEL_PARAMS", "lots")
    with pytest.raises(ConfigError, match="USFM_MAX_MODEL_PARAMS"):
        build_model("vmamba", tiny.config.to_dict())


def test_budget_applies_to_configs_built_in_code_too() -> None:
    """Pretraining builds backbones with ``dataclasses.replace(preset, **overrides)`` from
    the user's config file: those are bounded the same way."""
    import dataclasses

    with pytest.raises(ConfigError, match="parameters"):
        dataclasses.replace(VMambaConfig.preset("tiny"), dims=8192, depths=(2, 2, 15, 2))
    with pytest.raises(ConfigError, match="dims"):
        dataclasses.replace(VMambaConfig.preset("tiny"), dims=10**6)
    with pytest.raises(ConfigError, match="parameters"):
        ViTConfig(dim=16384, depth=256, heads=128)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"backbone_type": "segmenter"}, "backbone_type must be one of"),  # no nesting
        ({"backbone_config": {"dims": -4}}, "backbone_config: VMamba config.dims"),
        ({"n_classes": 10**9}, "n_classes"),
        ({"head": "resnet"}, "head"),
        ({"classes": "lesion"}, "classes"),
        ({"input_size": 2.5}, "input_size"),
        ({"extra_key": 1}, "extra_key"),
    ],
)
def test_hostile_task_config_is_refused(tmp_path: Path, change: dict, match: str) -> None:
    folder = save_finetuned(_tiny_segmenter(), tmp_path / "m")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if "backbone_config" in change:
        change = {
            "backbone_config": {**meta["config"]["backbone_config"], **change["backbone_config"]}
        }
    cfg_path = _rewrite(folder, config=change)
    with pytest.raises(CheckpointError, match=match) as err:
        load_finetuned(folder)
    assert str(cfg_path) in str(err.value)


def test_vit_backbone_cannot_feed_a_decoder(tmp_path: Path) -> None:
    vit = ViTConfig.preset("vit-tiny-test").to_dict()
    with pytest.raises(ConfigError, match="needs a backbone with 4 stages"):
        build_model("segmenter", TaskModelConfig("vit", vit).to_dict())


@pytest.mark.parametrize(
    "build",
    [
        lambda: VMamba(VMambaConfig.preset("tiny")),
        lambda: VMamba(VMambaConfig.preset("small-fast")),
        lambda: VMamba(
            VMambaConfig(
                depths=(1, 2, 1, 1),
                dims=(8, 16, 24, 40),
                use_z_gate=True,
                dt_rank=3,
                mlp_ratio=0,
                conv_kernel=5,
                d_state=3,
                ssm_ratio=1.5,
            )
        ),
        lambda: ViT(ViTConfig.preset("vit-tiny-test", cls_token=True, qkv_bias=False)),
        lambda: Segmenter(_tiny_vmamba(), 3, "unet"),
        lambda: Segmenter(_tiny_vmamba(), 2, "conv"),
        lambda: Segmenter(_tiny_vmamba(), 1, "vss"),
        lambda: Classifier(_tiny_vmamba(), 4, "linear"),
        lambda: Classifier(_tiny_vmamba(), 4, "mlp"),
    ],
)
def test_parameter_estimate_matches_the_built_model(build) -> None:
    """The budget is computed from the config; it must equal what building would allocate."""
    model = build()
    actual = sum(p.numel() for p in model.parameters())
    assert model.config.estimate_params() == actual


def test_valid_configs_still_build(tmp_path: Path) -> None:
    for name in VMambaConfig.preset_names():
        VMambaConfig.from_dict(VMambaConfig.preset(name).to_dict())
    for name in ViTConfig.preset_names():
        ViTConfig.from_dict(ViTConfig.preset(name).to_dict())
    folder = save_finetuned(_tiny_segmenter(), tmp_path / "m")
    model, meta = load_finetuned(folder)
    assert meta["task"] == "segmentation" and isinstance(model, Segmenter)


# --------------------------------------------------------------------- weights on load
def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    model = _tiny_vmamba()
    with torch.no_grad():
        model.stages[1][0].ss2d.out_proj.weight[0, 0] = float("nan")
    save_model(model, tmp_path / "nan")
    with pytest.raises(CheckpointError, match=r"stages\.1\.0\.ss2d\.out_proj\.weight") as err:
        load_model(tmp_path / "nan")
    assert str(tmp_path / "nan" / WEIGHTS_FILE) in str(err.value) and "NaN/inf" in str(err.value)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("inf"))
    save_model(model, tmp_path / "inf")
    with pytest.raises(CheckpointError, match="NaN/inf"):
        load_model(tmp_path / "inf")


def test_all_nan_segmenter_fails_segment_instead_of_empty_masks(tmp_path: Path, capsys) -> None:
    from usfm_core.cli import main

    model = _tiny_segmenter()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_finetuned(model, tmp_path / "m")
    cv2.imwrite(str(tmp_path / "a.png"), np.full((64, 64), 128, np.uint8))
    rc = main(
        [
            *("segment", str(tmp_path / "m"), str(tmp_path / "a.png")),
            *("--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "NaN/inf" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "a_mask.png").exists()


def test_float16_overflow_is_refused_by_store_weights_as(tmp_path: Path) -> None:
    model = _tiny_vmamba()
    with torch.no_grad():
        model.norm.weight[0] = 1e6  # beyond float16's 65504
    save_model(model, tmp_path / "m")
    before = (tmp_path / "m" / WEIGHTS_FILE).read_bytes()
    with pytest.raises(CheckpointError, match=r"'norm\.weight'.*after conversion to float16"):
        store_weights_as(tmp_path / "m", "float16")
    assert (tmp_path / "m" / WEIGHTS_FILE).read_bytes() == before  # untouched


def test_weights_checksum_catches_64_corrupted_bytes(saved: Path) -> None:
    meta = json.loads((saved / CONFIG_FILE).read_text())
    assert meta["weights_sha256"] == zoo.file_sha256(saved / WEIGHTS_FILE)
    _flip_bytes(saved / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="checksum mismatch") as err:
        load_model(saved)
    assert str(saved / WEIGHTS_FILE) in str(err.value)
    # A folder written before checksums existed (no weights_sha256) still loads.
    fresh = save_model(_tiny_vmamba(), saved.parent / "legacy")
    meta = json.loads((fresh / CONFIG_FILE).read_text())
    del meta["weights_sha256"]
    (fresh / CONFIG_FILE).write_text(json.dumps(meta))
    load_model(fresh)


def test_store_weights_as_keeps_the_checksum_valid(tmp_path: Path) -> None:
    folder = save_finetuned(_tiny_segmenter(), tmp_path / "m")
    store_weights_as(folder, "float16")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["weights_sha256"] == zoo.file_sha256(folder / WEIGHTS_FILE)
    load_finetuned(folder)


# --------------------------------------------------------------------- pretraining checkpoints
def _ckpt_parts():
    from usfm_core.pretrain.config import load_config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return model, opt, load_config("tiny", ["device=cpu"])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.pt"])
def test_corrupted_pretrain_checkpoint_is_refused(tmp_path: Path, damaged: str) -> None:
    from usfm_core.pretrain.trainer import find_checkpoint, load_checkpoint, save_checkpoint

    model, opt, cfg = _ckpt_parts()
    root = tmp_path / "checkpoints"
    last = save_checkpoint(root, model, opt, {"step": 3}, cfg)
    sums = json.loads((last / "checkpoint.json").read_text())["sha256"]
    assert set(sums) == {"model.safetensors", "state.pt", "config.json"}
    assert find_checkpoint(root) == last
    _flip_bytes(last / damaged, from_end=min(200, (last / damaged).stat().st_size - 64))
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint: {damaged} fails") as err:
        find_checkpoint(root)
    assert str(last / damaged) in str(err.value)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(last, model, opt)


def test_pretrain_resume_refuses_a_corrupted_checkpoint(tmp_path: Path, capsys) -> None:
    from usfm_core.cli import main
    from usfm_core.pretrain.trainer import save_checkpoint

    data = tmp_path / "data" / "sim"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(data / f"f{i}.png"), rng.integers(0, 255, (96, 96), np.uint8))
    model, opt, cfg = _ckpt_parts()
    last = save_checkpoint(tmp_path / "run" / "checkpoints", model, opt, {"step": 1}, cfg)
    _flip_bytes(last / "model.safetensors")
    rc = main(
        [
            *("pretrain", "--config", "tiny", "--data", str(tmp_path / "data")),
            *("--out", str(tmp_path / "run"), "--resume", "--device", "cpu", "--max-steps", "1"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "model.safetensors fails its checksum" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "backbone").exists()  # nothing trained from corrupt state


def test_malicious_pickle_in_state_is_never_executed(tmp_path: Path) -> None:
    """Even with valid checksums, state.pt is read with weights_only=True: no code runs."""
    from usfm_core.pretrain.trainer import load_checkpoint, save_checkpoint

    model, opt, cfg = _ckpt_parts()
    last = save_checkpoint(tmp_path / "ck", model, opt, {"step": 1}, cfg)
    marker = tmp_path / "pwned"
    torch.save({"x": _Exploit(str(marker))}, last / "state.pt")
    meta = json.loads((last / "checkpoint.json").read_text())
    meta["sha256"]["state.pt"] = zoo.file_sha256(last / "state.pt")
    (last / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(last, model, opt)
    assert not marker.exists()


class _Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_half_written_checkpoint_folders_are_cleaned(tmp_path: Path) -> None:
    from usfm_core.pretrain.trainer import clean_checkpoint_temps, find_checkpoint, save_checkpoint

    model, opt, cfg = _ckpt_parts()
    root = tmp_path / "checkpoints"
    save_checkpoint(root, model, opt, {"step": 1}, cfg)
    dead, alive = _dead_pid(), os.getppid()
    # What a run killed mid-save leaves, and things that are not the toolkit's.
    for name in (f".last.tmp-{dead}", f".last.old-{dead}", f".last.tmp-{alive}"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"half")
    (root / ".last.tmp-notes").mkdir()
    (root / "notes.txt").write_text("mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / f".last.old-{dead + 1}").symlink_to(elsewhere)
    save_checkpoint(root, model, opt, {"step": 2}, cfg)  # the next run's first save
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted(
        ["last", f".last.tmp-{alive}", ".last.tmp-notes", "notes.txt", f".last.old-{dead + 1}"]
    )
    assert elsewhere.is_dir() and (root / "notes.txt").read_text() == "mine"
    # Without last/, an .old copy is the checkpoint to resume from: kept, and found.
    shutil.rmtree(root / "last")
    old = root / f".last.old-{dead}"
    shutil.copytree(save_checkpoint(tmp_path / "other", model, opt, {"step": 5}, cfg), old)
    assert clean_checkpoint_temps(root) == []
    assert find_checkpoint(root) == old


# --------------------------------------------------------------------- shipped names
@pytest.fixture
def impostor(tmp_path: Path, monkeypatch) -> Path:
    """A working directory holding a folder named like the shipped ``sim-lesion``: a
    different, valid segmenter."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USFM_MODEL_DIR", str(tmp_path / "user-models"))
    save_finetuned(_tiny_segmenter(), tmp_path / "sim-lesion")
    return tmp_path / "sim-lesion"


def test_local_folder_never_shadows_a_shipped_model(impostor: Path, caplog) -> None:
    shipped = zoo.BUILTIN_DIR / "sim-lesion"
    with caplog.at_level(logging.WARNING, logger="usfm_core.models.zoo"):
        assert zoo.resolve_model_dir("sim-lesion") == shipped
    assert "./sim-lesion" in caplog.text and "ignored" in caplog.text
    assert zoo.resolve_model_dir(Path("sim-lesion")) == shipped
    assert zoo.find_model("sim-lesion").source == "builtin"
    # Explicit paths mean the folder.
    assert zoo.resolve_model_dir("./sim-lesion").resolve() == impostor.resolve()
    assert zoo.resolve_model_dir(str(impostor)) == impostor
    assert zoo.find_model("./sim-lesion").source == "path"
    # Every loader follows the same rule.
    ref = json.loads((shipped / CONFIG_FILE).read_text())["config"]
    local = json.loads((impostor / CONFIG_FILE).read_text())["config"]
    assert ref != local
    assert load_finetuned("sim-lesion")[1]["config"] == ref
    assert load_model("sim-lesion")[1]["config"] == ref
    assert load_finetuned("./sim-lesion")[1]["config"] == local
    assert load_backbone("sim-lesion").config.to_dict() == ref["backbone_config"]
    assert load_backbone("./sim-lesion").config.to_dict() == local["backbone_config"]


def test_segment_cli_uses_the_shipped_model_unless_given_a_path(impostor: Path, capsys) -> None:
    from usfm_core.cli import main

    # Make the impostor unloadable: if segment used it, it would fail.
    (impostor / CONFIG_FILE).write_text("{broken")
    cv2.imwrite("a.png", np.full((64, 64), 100, np.uint8))
    args = ["a.png", "--device", "cpu", "--no-progress"]
    assert main(["segment", "sim-lesion", *args, "--out", "o1"]) == 0
    assert main(["segment", "./sim-lesion", *args, "--out", "o2"]) == 1
    assert "not valid JSON" in capsys.readouterr().err


def test_shipped_model_is_checksummed_even_by_path(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "models"
    shutil.copytree(zoo.BUILTIN_DIR, fake)
    _flip_bytes(fake / "sim-lesion" / WEIGHTS_FILE)
    monkeypatch.setattr(zoo, "BUILTIN_DIR", fake)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        zoo.resolve_model_dir(fake / "sim-lesion")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_finetuned(fake / "sim-lesion")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        zoo.resolve_model_dir("sim-lesion")


def test_unknown_bare_name_is_a_local_folder_or_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USFM_MODEL_DIR", str(tmp_path / "user-models"))
    save_finetuned(_tiny_segmenter(), tmp_path / "myrun")
    assert zoo.resolve_model_dir("myrun").resolve() == (tmp_path / "myrun").resolve()
    load_finetuned("myrun")
    with pytest.raises(CheckpointError, match=r"(?s)no model named 'nothing'.*known models"):
        zoo.resolve_model_dir("nothing")


def test_read_json_file_bounds(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"a": 1e999}')
    with pytest.raises(CheckpointError, match="must be finite"):
        read_json_file(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_json_file(path)
    path.write_text('{"a": [1, 2]}')
    assert read_json_file(path) == {"a": [1, 2]}
