"""Tests of the multi-seed proof part of benchmarks/label_efficiency.py (issue 12 item 5):
the grid plan, the fixed splits, the linear probe, caching / resume, and the summary math."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "label_efficiency.py"


def _import(path: Path, name: str):
    return load_script(path, name)


@pytest.fixture(scope="module")
def le():
    """The benchmark script imported as a module."""
    return _import(SCRIPT, "label_efficiency_bench")


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    """A saved ``tiny`` VMamba standing in for a pretrained backbone (weights differ from any
    seed's scratch init, which is all the pipeline needs)."""
    import torch

    from usfm_core.finetune.models import build_backbone
    from usfm_core.models.serialization import save_model

    torch.manual_seed(1234)
    return save_model(build_backbone("tiny"), tmp_path_factory.mktemp("bb") / "tiny")


def test_plan_counts_arms_ratios_and_only_filter(le):
    proof = le.SETTINGS["full"].proof
    tasks = list(proof.tasks)
    runs = le.plan_runs(proof, tasks, ["openus", "scratch", "mae"], [0, 1, 2])
    # 2 required arms x 3 ratios + mae at 20 % only, x 3 seeds, x 3 tasks
    assert len(runs) == 3 * (2 * 3 + 1) * 3
    assert {r.ratio for r in runs if r.arm == "mae"} == {0.2}
    assert {r.ratio for r in runs if r.arm == "scratch"} == {0.1, 0.2, 1.0}
    assert len(set(runs)) == len(runs)
    keep = le.only_filter(["busi-seg/openus", "hc18-seg/*/0.1"])
    kept = [r for r in runs if keep(r)]
    assert {(r.task, r.arm) for r in kept} == {
        ("busi-seg", "openus"),
        ("hc18-seg", "openus"),
        ("hc18-seg", "scratch"),
    }
    assert all(r.ratio == 0.1 for r in kept if r.task == "hc18-seg")
    assert len(kept) == 3 * 3 + 2 * 3
    from usfm_core.errors import ConfigError

    for typo in ("busi_seg", "busi-seg/dino", "*/openus/20", "*/*/ten"):
        with pytest.raises(ConfigError, match="matches no run"):
            le.only_filter([typo])
    spec = le.RunSpec("busi-seg", "openus", 0.2, 1)
    assert spec.path(Path("R"), "full") == Path("R/full/busi-seg/openus-r0.2-s1.json")


def test_epochs_cover_the_step_budget_with_finetunes_batches(le):
    """finetune drops the last partial batch (when there is more than one batch): the epochs
    the benchmark asks for must still hold the whole step budget, at every label ratio."""
    import torch

    for n_train in (1, 5, 16, 17, 55, 111, 546):
        for batch in (4, 16):
            loader = torch.utils.data.DataLoader(
                range(n_train), batch_size=batch, drop_last=n_train > batch
            )
            epochs = le.epochs_for(n_train, batch, 300)
            assert epochs * len(loader) >= 300
            assert (epochs - 2) * len(loader) < 300  # not wastefully many


def test_backbone_arguments(le):
    from usfm_core.errors import ConfigError

    assert le.parse_backbones(["openus=runs/a", "jepa=x=y"]) == {"openus": "runs/a", "jepa": "x=y"}
    for bad in ("scratch=runs/a", "dino=runs/a", "openus"):
        with pytest.raises(ConfigError, match="--backbone"):
            le.parse_backbones([bad])


def test_splits_match_the_shipped_recipe_and_subsets_stay_in_train(
    le, shared_data, tmp_path, monkeypatch
):
    """HC18 is split by subject as tools/shipped_models.py splits it, so the images that recipe
    gives pre-training are exactly the train + val images here; label subsets only draw from
    the training split."""
    from usfm_core.finetune.data import label_subset

    monkeypatch.setattr(le, "DATA", shared_data)
    shipped = _import(REPO / "tools" / "shipped_models.py", "shipped_models_tool")
    data, splits = le.task_data("hc18-seg")
    pretrain = {p.name for p in shipped.train_val_images(shipped.prepare_hc18(
        shared_data / "hc18", tmp_path / "hc18"))}  # fmt: skip
    names = {k: {Path(data.items[i].image).name for i in v} for k, v in splits.items()}
    assert names["train"] | names["val"] == pretrain and not names["test"] & pretrain
    subject = {k: {data.groups[i] for i in v} for k, v in splits.items()}
    assert not subject["test"] & (subject["train"] | subject["val"])
    busi, bsplits = le.task_data("busi-cls")
    _, ssplits = le.task_data("busi-seg")
    assert bsplits == ssplits and len(bsplits["test"]) > 100  # one split for both BUSI tasks
    for seed in (0, 1):
        sub = label_subset(bsplits["train"], busi.labels, busi.groups, 0.1, seed)
        assert set(sub) <= set(bsplits["train"])
        assert set(busi.labels[sub]) == {0, 1, 2}  # stratified: every class
    small, small_splits = le.task_data("busi-cls", {"train": 12, "val": 4, "test": 4})
    assert [len(small_splits[k]) for k in ("train", "val", "test")] == [12, 4, 4]
    assert set(small.labels[small_splits["train"]]) == {0, 1, 2}  # spread over the classes
    test_keys = {busi.items[i].key for i in bsplits["test"]}
    assert {small.items[i].key for i in small_splits["test"]} <= test_keys


def test_probe_separates_separable_features_and_picks_c_on_val(le):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4

    def draw(n):
        y = np.arange(n) % 3
        return centres[y] + rng.normal(size=(n, 8)), y

    feats, labels = {}, {}
    for split, n in (("train", 60), ("val", 30), ("test", 30)):
        feats[split], labels[split] = draw(n)
    res = le.fit_probe(feats, labels, list(range(12)), 3)  # a 12-item label subset
    assert res["test"]["macro_f1"] > 0.9 and res["test"]["accuracy"] > 0.9
    assert res["probe_C"] in le.PROBE_C
    noise = {k: rng.normal(size=v.shape) for k, v in feats.items()}
    res = le.fit_probe(noise, labels, list(range(12)), 3)
    assert res["test"]["macro_f1"] < 0.7  # no signal, no score


def _fake(task, arm, ratio, seed, value):
    m1, m2 = ("macro_f1", "accuracy") if task.endswith("cls") else ("dice", "iou")
    return {
        "task": task,
        "arm": arm,
        "ratio": ratio,
        "seed": seed,
        "n_train": 10,
        "test": {m1: value, m2: value / 2},
    }


def test_summary_means_paired_differences_and_targets(le, tmp_path):
    rng = np.random.default_rng(3)
    recs, values = [], {}
    base = {"openus": 0.60, "scratch": 0.52, "mae": 0.58, "jepa": 0.50}
    for arm, mean in base.items():
        for ratio in (0.1, 0.2, 1.0) if arm in ("openus", "scratch") else (0.2,):
            for seed in (0, 1, 2):
                v = mean + (0.1 if ratio == 1.0 and arm == "scratch" else 0) + rng.normal(0, 0.01)
                values[(arm, ratio, seed)] = v
                recs.append(_fake("busi-seg", arm, ratio, seed, v))
    recs.append(_fake("hc18-seg", "openus", 0.1, 0, 0.80))
    recs.append(_fake("hc18-seg", "scratch", 0.1, 0, 0.85))
    recs.append(_fake("hc18-seg", "scratch", 0.1, 1, 0.10))  # no openus seed 1: not paired
    for r in recs:  # through the files, as a sitting leaves them
        path = le.RunSpec(r["task"], r["arm"], r["ratio"], r["seed"]).path(tmp_path, "full")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    summary = le.write_summary(tmp_path, "full", tmp_path / "sum.json")
    assert json.loads((tmp_path / "sum.json").read_text())["n_runs"] == len(recs)
    assert "| busi-seg | 20 % | openus | 3 |" in (tmp_path / "sum.md").read_text()
    rows = {(r["task"], r["arm"], r["ratio"]): r for r in summary["table"]}
    row = rows[("busi-seg", "openus", 0.2)]
    v = np.array([values[("openus", 0.2, s)] for s in (0, 1, 2)])
    s = np.array([values[("scratch", 0.2, s)] for s in (0, 1, 2)])
    assert row["dice"]["mean"] == pytest.approx(v.mean())
    assert row["dice"]["std"] == pytest.approx(v.std(ddof=1))
    assert row["iou"]["mean"] == pytest.approx(v.mean() / 2)
    delta = row["delta_dice"]
    assert [delta["per_seed"][k] for k in (0, 1, 2)] == pytest.approx(list(v - s))
    assert delta["std"] == pytest.approx((v - s).std(ddof=1))
    assert "delta_dice" not in rows[("busi-seg", "scratch", 0.2)]
    hc = rows[("hc18-seg", "openus", 0.1)]["delta_dice"]
    assert hc["per_seed"] == {0: pytest.approx(-0.05)} and hc["std"] is None
    status = {t["target"]: t for t in summary["targets"]}
    assert status["BUSI lesions: openus@20% − scratch@20% ≥ 0.05 Dice"]["status"] == "met"
    ratio = status["BUSI lesions: openus@20% / scratch@100% ≥ 0.95 (Dice)"]
    s100 = np.mean([values[("scratch", 1.0, k)] for k in (0, 1, 2)])
    assert ratio["value"] == pytest.approx(v.mean() / s100) and ratio["status"] == "met"
    assert status["HC18 heads: openus@10% − scratch@10% ≥ 0 Dice"]["status"] == "missed"
    assert status["busi-seg @20%: openus ≥ mae (dice)"]["status"] == "met"
    assert status["busi-seg @20%: jepa ≥ scratch (dice)"]["status"] == "missed"
    assert status["busi-cls @20%: openus ≥ mae (macro_f1)"]["status"] == "not run"


def test_smoke_proof_runs_caches_resumes_and_summarises(
    le, tiny_backbone, shared_data, tmp_path, monkeypatch
):
    """The whole pipeline on a handful of real images: 2 runs per task, cached as JSON; a second
    invocation trains nothing; the summary's differences are the cached per-seed numbers'."""
    monkeypatch.setattr(le, "DATA", shared_data)
    monkeypatch.setenv("USFM_PROGRESS", "off")
    results, summary = tmp_path / "res", tmp_path / "summary.json"
    argv = ["--setting", "smoke", "--parts", "proof", "--threads", "1"]
    argv += ["--backbone", f"openus={tiny_backbone}", "--results-dir", str(results)]
    argv += ["--summary-out", str(summary)]
    assert le.main(argv) == 0
    files = sorted(results.glob("smoke/*/*.json"))
    assert [f"{p.parent.name}/{p.stem}" for p in files] == [
        f"{t}/{a}-r0.2-s0"
        for t in ("busi-cls", "busi-seg", "hc18-seg")
        for a in ("openus", "scratch")
    ]
    recs = {(r["task"], r["arm"]): r for r in map(json.loads, (p.read_text() for p in files))}
    for (task, arm), r in recs.items():
        assert r["n_split"] == {"train": 12, "val": 4, "test": 4}
        assert 0 < r["n_train"] < 12  # a 20 % label subset of the training split
        assert r["steps"] == (0 if task == "busi-cls" else 2) and r["threads"] == 1
        assert r["cpu_s"] > 0 and r["seconds"] > 0
        assert r["key"]["backbone_id"].startswith("scratch-") == (arm == "scratch")
    assert recs[("busi-seg", "openus")]["test"] != recs[("busi-seg", "scratch")]["test"]
    doc = json.loads(summary.read_text())
    rows = {(r["task"], r["arm"]): r for r in doc["table"]}
    for task, metric in (("busi-seg", "dice"), ("hc18-seg", "dice"), ("busi-cls", "macro_f1")):
        want = recs[(task, "openus")]["test"][metric] - recs[(task, "scratch")]["test"][metric]
        assert rows[(task, "openus")][f"delta_{metric}"]["per_seed"]["0"] == pytest.approx(want)

    # Resume: nothing left to train, the cached files stay as they were.
    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(le, "seg_run", no_training)
    monkeypatch.setattr(le, "probe_run", no_training)
    before = {p: p.read_bytes() for p in files}
    assert le.main(argv) == 0
    assert {p: p.read_bytes() for p in files} == before

    # A cached run made with another backbone stops the sitting instead of being mixed in.
    stale = results / "smoke" / "busi-seg" / "openus-r0.2-s0.json"
    doc = json.loads(stale.read_text())
    doc["key"]["backbone_id"] = "0" * 16
    stale.write_text(json.dumps(doc))
    assert le.main(argv) == 2


def test_arms_of_one_seed_share_the_decoder_init(
    le, tiny_backbone, shared_data, tmp_path, monkeypatch
):
    """Pairing: for one seed, openus and scratch runs start from the same decoder weights (and
    label subset); only the backbone differs. Another seed starts elsewhere."""
    import torch

    from usfm_core.finetune import models
    from usfm_core.finetune.models import build_like, load_backbone

    monkeypatch.setattr(le, "DATA", shared_data)
    inits = {}
    unet = models.DECODERS["unet"]

    def recording(*args, **kwargs):
        decoder = unet(*args, **kwargs)
        inits[len(inits)] = {k: v.clone() for k, v in decoder.state_dict().items()}
        return decoder

    monkeypatch.setitem(models.DECODERS, "unet", recording)
    data, splits = le.task_data("busi-seg", {"train": 12, "val": 4, "test": 4})
    recipe = le.TaskRecipe(size=64, steps=1, batch=4, n_val=1)
    openus = load_backbone(tiny_backbone)
    runs = []
    for arm, seed in (("openus", 0), ("scratch", 0), ("openus", 1)):
        spec = le.RunSpec("busi-seg", arm, 0.2, seed)
        module = build_like(openus, seed) if arm == "scratch" else load_backbone(tiny_backbone)
        runs.append(le.seg_run(spec, recipe, data, splits, module, tmp_path / spec.name))
    same = all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])
    other = all(torch.equal(inits[0][k], inits[2][k]) for k in inits[0])
    assert same and not other
    assert runs[0]["n_train"] == runs[1]["n_train"]
