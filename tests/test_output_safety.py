"""Output-safety rules (usfm_core.outputs) and the writers that use them: segment, preprocess,
simulate, models import. Every destroy / overwrite scenario of issue #15 is refused or made
harmless here, on real computations (simulator frames, a tiny saved segmenter)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

from usfm_core.cli import main
from usfm_core.errors import USFMError
from usfm_core.io import write_image, write_video
from usfm_core.outputs import (
    TMP_PREFIX,
    atomic_path,
    atomic_write_bytes,
    check_name,
    check_outputs,
    clean_stale_temporaries,
    output_stems,
)
from usfm_core.preprocess.pipeline import PreprocessOptions, run_preprocessing

FAST = PreprocessOptions(size=32, use_ocr=False, remove_text=False)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale_tmp(folder: Path, name: str = "x.png") -> Path:
    """A temporary as a killed toolkit run leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TMP_PREFIX}{_dead_pid()}-deadbeef-{name}"
    path.write_bytes(b"half-written")
    return path


def _image(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A distinct grey speckle image (H, W) uint8 per seed."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 200, (h, w), np.uint8)
    cv2.putText(img, str(seed), (5, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
    return img


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --- the rules themselves ----------------------------------------------------------------------


def test_output_stems_unique_ignoring_case_and_deterministic():
    rels = [
        Path(p) for p in ("a.png", "a_png.jpg", "a.jpg", "b.png", "b.PNG", "x/s.png", "y/s.png")
    ]
    stems = output_stems(rels)
    assert len({s.casefold() for s in stems.values()}) == len(rels)
    assert stems[Path("x/s.png")] == "x/s" and stems[Path("y/s.png")] == "y/s"
    assert output_stems(list(reversed(rels))) == stems  # order of discovery does not matter
    with pytest.raises(USFMError):
        output_stems([Path("../up.png")])


@pytest.mark.parametrize(
    "bad", ["", " ", ".", "..", "../x", "/x", "a/b", "a\\b", ".hidden", "a\nb"]
)
def test_check_name_refuses_paths(bad):
    with pytest.raises(USFMError):
        check_name(bad)


def test_check_name_accepts_plain_names():
    assert check_name("fetal-head_v2.1") == "fetal-head_v2.1"


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        write_image(tmp_path / "b.png", _image(0))
        with atomic_path(tmp_path / "private.csv", mode=0o600) as tmp:
            tmp.write_text("name,pseudonym")
    finally:
        os.umask(old)
    for name in ("a.bin", "b.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "private.csv").stat().st_mode & 0o777 == 0o600
    # no temporaries left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.png", "private.csv"]


def test_cleanup_removes_only_dead_toolkit_temporaries(tmp_path):
    user_tmp = tmp_path / ".notes.tmp"
    user_tmp.write_text("mine")
    lookalike = tmp_path / f"{TMP_PREFIX}notapid-x"
    lookalike.write_text("mine too")
    live = tmp_path / f"{TMP_PREFIX}{os.getpid()}-abcd-x.png"
    live.write_text("being written by this process")
    stale = _stale_tmp(tmp_path)
    assert clean_stale_temporaries(tmp_path) == [stale]
    assert user_tmp.exists() and lookalike.exists() and live.exists() and not stale.exists()


def test_any_atomic_write_sweeps_its_folder_once(tmp_path):
    stale = _stale_tmp(tmp_path / "reports", "report.json")
    user_tmp = tmp_path / "reports" / ".report.json.tmp"
    user_tmp.write_text("mine")
    atomic_write_bytes(tmp_path / "reports" / "report.json", b"{}")
    assert not stale.exists() and user_tmp.exists()


def test_check_outputs_sees_links(tmp_path):
    src = tmp_path / "in.png"
    write_image(src, _image(1))
    os.link(src, tmp_path / "hard.png")
    (tmp_path / "soft.png").symlink_to(src)
    for alias in ("hard.png", "soft.png", "sub/../in.png"):
        with pytest.raises(USFMError, match="overwrite the input"):
            check_outputs([tmp_path / alias], [src])
    folder = tmp_path / "frames"
    folder.mkdir()
    with pytest.raises(USFMError, match="input folder"):
        check_outputs([folder / "new.png"], [folder])
    check_outputs([tmp_path / "other.png"], [src, folder])  # fine


# --- preprocess --------------------------------------------------------------------------------


def test_preprocess_colliding_names_get_distinct_frames(tmp_path):
    src = tmp_path / "in"
    names = ["a.png", "a.jpg", "a_png.jpg", "b.png", "b.PNG"]
    for seed, name in enumerate(names):  # lossless enough: distinct digits survive JPEG
        write_image(src / name, _image(seed))
    summary = run_preprocessing(src, tmp_path / "out", FAST, progress=False)
    assert not summary.failures
    rows = _read_csv(summary.manifest)
    assert sorted(r["source"] for r in rows) == sorted(names)
    pngs = [r["png"] for r in rows]
    assert len({p.casefold() for p in pngs}) == 5
    masks = {r["region_mask"].casefold() for r in rows}
    assert len(masks) == 5
    # Each frame file holds its own source: five different images.
    frames = [cv2.imread(str(tmp_path / "out" / p), cv2.IMREAD_UNCHANGED) for p in pngs]
    assert len({f.tobytes() for f in frames}) == 5


def test_preprocess_deletes_only_its_own_stale_temporaries(tmp_path):
    src = tmp_path / "in"
    write_image(src / "a.png", _image(0))
    out = tmp_path / "out"
    user_files = [out / ".draft.tmp", out / "frames" / ".mine.png.tmp", out / "keep" / ".x.tmp"]
    for f in user_files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("user data")
    stale = [_stale_tmp(out), _stale_tmp(out / "frames" / "sub")]
    run_preprocessing(src, out, FAST, progress=False)
    assert all(f.read_text() == "user data" for f in user_files)
    assert not any(s.exists() for s in stale)


def test_preprocess_input_inside_output_frames_refused(tmp_path):
    out = tmp_path / "out"
    write_image(out / "frames" / "a.png", _image(0))
    with pytest.raises(USFMError, match="inside the output"):
        run_preprocessing(out / "frames", out, FAST, progress=False)


def test_simulate_ground_truth_is_per_output_and_not_a_scan(tmp_path, capsys):
    mixed = tmp_path / "mixed"
    common = ["--kind", "cine", "--frames", "2", "--size", "64", "64"]
    assert main(["simulate", str(mixed / "cine.dcm"), *common, "--seed", "1"]) == 0
    assert main(["simulate", str(mixed / "cine.mp4"), *common, "--seed", "2"]) == 0
    assert main(["simulate", str(mixed / "one.png"), "--size", "64", "64", "--seed", "3"]) == 0
    capsys.readouterr()
    # One ground-truth set per output: the video did not replace the DICOM's.
    for name, seed in (("cine.dcm", 1), ("cine.mp4", 2), ("one.png", 3)):
        meta = json.loads((mixed / "ground_truth" / name / "meta.json").read_text())
        assert meta["seed"] == seed
    # An older simulator's side files beside a scan are recognised too.
    legacy = mixed / "old"
    write_image(legacy / "x.png", _image(4))
    write_image(legacy / "x_lesions.tif", np.zeros((48, 64), np.uint8))
    write_image(legacy / "x_clean.tif", _image(5))
    (legacy / "x_meta.json").write_text("{}")
    summary = run_preprocessing(mixed, tmp_path / "out", FAST, progress=False)
    sources = sorted({r["source"] for r in _read_csv(summary.manifest)})
    assert sources == ["cine.dcm", "cine.mp4", "old/x.png", "one.png"]
    assert summary.n_sources == 4 and not summary.failures


def _children(pid: int) -> list[int]:
    """Pids of processes whose parent is ``pid`` and that run multiprocessing workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and b"spawn_main" in cmd:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_preprocess_workers_die_with_the_parent(tmp_path):
    src = tmp_path / "in"
    rng = np.random.default_rng(0)
    for i in range(24):
        write_video(src / f"clip{i:02d}.avi", rng.integers(0, 255, (40, 96, 128), np.uint8), 40.0)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "usfm_core.cli", "preprocess", str(src), str(out)]
    cmd += ["--workers", "2", "--no-ocr", "--fps", "40", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            if len(workers) == 2 and any((out / "frames").glob("*.png")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be killed"
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived the parent"
        written = sorted(out.rglob("*"))
        time.sleep(1.0)
        assert sorted(out.rglob("*")) == written  # nobody is still writing
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:  # never leave a process behind, even when the test fails
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    # The next run cleans what the killed one left half-written and completes.
    summary = run_preprocessing(src, out, FAST, progress=False)
    assert not summary.failures and summary.n_sources == 24
    assert not list(out.rglob(f"{TMP_PREFIX}*"))


# --- segment -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny binary segmenter saved as a model folder."""
    from usfm_core.finetune.models import Segmenter, save_finetuned
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    torch.manual_seed(0)
    backbone = VMamba(VMambaConfig(in_chans=1, depths=(1, 1, 1, 1), dims=8))
    model = Segmenter(backbone, 1, "conv").eval()
    model.input_size = 64
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_finetuned(model, path)
    return path


def _segment(model: Path | str, *inputs: Path, out: Path) -> int:
    args = ["segment", str(model), *map(str, inputs), "--out", str(out)]
    return main([*args, "--no-progress", "--device", "cpu"])


def test_segment_never_overwrites_an_input(tmp_path, tiny_model, capsys):
    folder = tmp_path / "scans"
    write_image(folder / "x.png", _image(0))
    write_image(folder / "x_mask.png", _image(1))
    before = (folder / "x_mask.png").read_bytes()
    assert _segment(tiny_model, folder / "x.png", folder / "x_mask.png", out=folder) == 1
    err = capsys.readouterr().err
    assert "would overwrite the input" in err and "x_mask.png" in err
    assert (folder / "x_mask.png").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["x.png", "x_mask.png"]


def test_segment_never_replaces_a_users_measurements_csv(tmp_path, tiny_model, capsys):
    """A ``measurements.csv`` already in ``--out`` that segment did not write (a user's own
    table) is refused before anything is written; a re-run replaces segment's own table."""
    write_image(tmp_path / "x.png", _image(0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "measurements.csv").write_text("patient,notes\n1,keep me\n")
    assert _segment(tiny_model, tmp_path / "x.png", out=out) == 1
    err = capsys.readouterr().err
    assert "not a measurements table written by usfm-core segment" in err
    assert (out / "measurements.csv").read_text() == "patient,notes\n1,keep me\n"
    assert sorted(p.name for p in out.iterdir()) == ["measurements.csv"]
    (out / "measurements.csv").unlink()
    assert _segment(tiny_model, tmp_path / "x.png", out=out) == 0
    first = _read_csv(out / "measurements.csv")
    assert first and {r["file"] for r in first} == {"x"}
    assert _segment(tiny_model, tmp_path / "x.png", out=out) == 0  # its own table: replaced
    assert _read_csv(out / "measurements.csv") == first


def test_segment_never_replaces_a_users_file_named_like_a_mask(tmp_path, tiny_model, capsys):
    """``OUT/<stem>_mask.png|tif`` that segment did not write (a user's own image of that name)
    is refused before anything is written; segment's own masks (marked in the file, or listed
    in its measurements table, as masks of older versions are) are replaced by a re-run."""
    from PIL import Image

    write_image(tmp_path / "x.png", _image(0))
    out = tmp_path / "out"
    out.mkdir()
    user = _image(3)
    write_image(out / "x_mask.png", user)  # a user's picture that happens to have this name
    before = (out / "x_mask.png").read_bytes()
    assert _segment(tiny_model, tmp_path / "x.png", out=out) == 1
    err = capsys.readouterr().err
    assert "x_mask.png exists and is not a mask written by usfm-core segment" in err
    assert (out / "x_mask.png").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["x_mask.png"]
    tifffile.imwrite(out / "x_mask.tif", user)  # the stack name is protected too
    (out / "x_mask.png").unlink()
    assert _segment(tiny_model, tmp_path / "x.png", out=out) == 1
    assert "x_mask.tif exists" in capsys.readouterr().err
    (out / "x_mask.tif").unlink()

    assert _segment(tiny_model, tmp_path / "x.png", out=out) == 0
    with Image.open(out / "x_mask.png") as im:
        assert im.info.get("Software") == "usfm-core segment"
        first = np.asarray(im).copy()
    assert _segment(tiny_model, tmp_path / "x.png", out=out) == 0  # its own mask: replaced
    with Image.open(out / "x_mask.png") as im:
        assert np.array_equal(np.asarray(im), first)
    # A mask of an older version (no mark) listed in segment's own table is replaced too.
    cv2.imwrite(str(out / "x_mask.png"), first)
    assert _segment(tiny_model, tmp_path / "x.png", out=out) == 0


def test_segment_checks_inputs_before_loading_the_model(tmp_path, capsys):
    write_image(tmp_path / "ok.png", _image(0))
    # The model does not exist either: the input error must come first (no model load).
    rc = _segment(tmp_path / "no-model", tmp_path / "ok.png", tmp_path / "typo.png", out=tmp_path)
    err = capsys.readouterr().err
    assert rc == 1 and "typo.png: no such file" in err and "no-model" not in err
    rc = _segment(tmp_path / "no-model", tmp_path / "ok.png", out=tmp_path / "ok.png")
    assert rc == 1 and "not a folder" in capsys.readouterr().err


def test_segment_same_names_distinct_outputs_and_batch_policy(tmp_path, tiny_model, capsys):
    write_image(tmp_path / "a" / "scan.png", _image(0))
    write_image(tmp_path / "b" / "scan.png", _image(1))
    broken = tmp_path / "b" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n-truncated")
    out = tmp_path / "out"
    stale = _stale_tmp(out / "a", "scan_mask.png")
    inputs = (tmp_path / "a" / "scan.png", broken, tmp_path / "b" / "scan.png")
    assert _segment(tiny_model, *inputs, out=out) == 1  # one input failed
    captured = capsys.readouterr()
    assert "1 of 3 input(s) failed" in captured.err and "broken.png" in captured.err
    masks = {p.relative_to(out).as_posix() for p in out.rglob("*_mask.png")}
    assert masks == {"a/scan_mask.png", "b/scan_mask.png"}
    for name in masks:
        mask = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255}
    rows = _read_csv(out / "measurements.csv")
    assert {r["file"] for r in rows} == {"a/scan", "b/scan"}
    assert not stale.exists()


# --- models import -----------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path, monkeypatch) -> Path:
    """An isolated user model directory, with a sentinel file beside it."""
    root = tmp_path / "home" / "models"
    root.mkdir(parents=True)
    (tmp_path / "home" / "precious.txt").write_text("do not delete")
    monkeypatch.setenv("USFM_MODEL_DIR", str(root))
    return root


@pytest.mark.parametrize("name", ["..", ".", "../x", "/x", "a/b", ""])
def test_models_import_refuses_path_names(tiny_model, model_dir, capsys, name):
    (model_dir / "kept").mkdir()
    rc = main(["models", "import", str(tiny_model), "--name", name, "--overwrite"])
    assert rc == 1 and "model name" in capsys.readouterr().err
    assert (model_dir.parent / "precious.txt").read_text() == "do not delete"
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["models", "precious.txt"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["kept"]


def test_models_import_overwrite_replaces_only_model_folders(
    tiny_model, model_dir, tmp_path, capsys
):
    from usfm_core.finetune.models import load_finetuned, save_finetuned
    from usfm_core.models.zoo import list_models

    # A killed import left a half-copied folder: not listed as a model, removed by the next one.
    leftover = model_dir / f"{TMP_PREFIX}{_dead_pid()}-cafe-m"
    leftover.mkdir()
    for fname in ("config.json", "model.safetensors"):
        (leftover / fname).write_bytes((tiny_model / fname).read_bytes())
    assert not [e for e in list_models() if e.name.startswith(".")]
    assert main(["models", "import", str(tiny_model), "--name", "m"]) == 0
    assert not leftover.exists()
    model, _ = load_finetuned(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    other = tmp_path / "other"
    save_finetuned(model, other)
    weights = other / "model.safetensors"
    assert weights.read_bytes() != (model_dir / "m" / "model.safetensors").read_bytes()
    assert main(["models", "import", str(other), "--name", "m"]) == 1  # exists, no --overwrite
    assert main(["models", "import", str(other), "--name", "m", "--overwrite"]) == 0
    assert (model_dir / "m" / "model.safetensors").read_bytes() == weights.read_bytes()
    notmodel = model_dir / "notes"
    notmodel.mkdir()
    (notmodel / "thesis.txt").write_text("years of work")
    capsys.readouterr()
    assert main(["models", "import", str(other), "--name", "notes", "--overwrite"]) == 1
    assert "not a model folder" in capsys.readouterr().err
    assert (notmodel / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in model_dir.iterdir()) == ["m", "notes"]  # no temporaries


def test_models_import_refuses_a_shipped_name(tiny_model, model_dir, capsys):
    """A user copy named like a shipped model could never be reached by name: refused."""
    rc = main(["models", "import", str(tiny_model), "--name", "sim-lesion"])
    err = capsys.readouterr().err
    assert rc == 1 and "shipped model" in err and "--name my-sim-lesion" in err
    assert list(model_dir.iterdir()) == []


def test_evaluate_refuses_a_report_folder_that_would_write_over_the_data(shared_data, tmp_path):
    """``evaluate --out`` equal to the data folder would replace a user's summary.md there (it
    did, before): refused before anything is written, the user's file intact; a report folder
    beside the data works. The label-efficiency report refuses a run folder as --out."""
    root = tmp_path / "hc18"
    root.mkdir()
    for sub in ("images", "masks"):
        (root / sub).symlink_to(shared_data / "hc18" / sub)
    lines = (shared_data / "hc18" / "manifest.csv").read_text().splitlines()
    (root / "manifest.csv").write_text("\n".join(lines[:3]) + "\n")
    (root / "summary.md").write_text("my notes\n")
    args = ["evaluate", "fetal-head", "--data", str(root), "--split", "all"]
    assert main([*args, "--out", str(root)]) == 1
    assert (root / "summary.md").read_text() == "my notes\n"
    assert not (root / "metrics.json").exists()
    assert main([*args, "--out", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["n"] == 2
    run = tmp_path / "run"
    run.mkdir()
    result = {"task": "segmentation", "label_ratio": 1.0, "val_metrics": {"dice": 0.5}}
    (run / "result.json").write_text(json.dumps(result))
    assert main(["evaluate", "--label-efficiency", str(run), "--out", str(run)]) == 1
    assert sorted(p.name for p in run.iterdir()) == ["result.json"]
