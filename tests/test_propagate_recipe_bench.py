"""benchmarks/propagate_recipe.py: recipes parse (bad ones named), runs on real HC18 train /
validation data are cached per recipe and resumed, and the summary pairs recipes per seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_loader import load_script
from usfm_core.errors import USFMError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "propagate_recipe.py"


@pytest.fixture(scope="module")
def pr():
    """The benchmark script imported as a module."""
    return load_script(SCRIPT, "propagate_recipe_bench")


def test_parse_recipe(pr):
    assert pr.parse_recipe("warm=0.1:0.5") == ("warm", 0.1, 0.5)
    with pytest.raises(SystemExit, match="'oops'"):
        pr.parse_recipe("oops")


def test_runs_resume_and_pair_per_seed(pr, shared_data, tmp_path, monkeypatch):
    results, out = tmp_path / "runs", tmp_path / "summary.json"
    argv = ["--datasets", "hc18", "--seeds", "0", "1", "--labels", "2", "--steps", "2"]
    argv += ["--recipes", "a=0:1", "b=0.5:0.1", "--backbone", "tiny", "--threads", "1"]
    argv += ["--results-dir", str(results), "--out", str(out)]
    assert pr.main(argv) == 0
    files = sorted(p.name for p in (results / "hc18").glob("*.json"))
    assert files == ["a-n2-s0-t2.json", "a-n2-s1-t2.json", "b-n2-s0-t2.json", "b-n2-s1-t2.json"]
    runs = {f: json.loads((results / "hc18" / f).read_text()) for f in files}
    assert runs["a-n2-s0-t2.json"]["picked"] == runs["b-n2-s0-t2.json"]["picked"]  # paired
    assert runs["b-n2-s1-t2.json"]["key"]["recipe"] == ["b", 0.5, 0.1]
    assert all(0.0 <= r["dice"] <= 1.0 and r["n_val"] > 0 for r in runs.values())

    cells = {c["recipe"]: c for c in json.loads(out.read_text())["cells"]}
    assert cells["a"]["paired_diff"] == 0.0 and cells["a"]["seeds"] == [0, 1]
    d = [runs[f"b-n2-s{s}-t2.json"]["dice"] - runs[f"a-n2-s{s}-t2.json"]["dice"] for s in (0, 1)]
    assert cells["b"]["paired_diff"] == pytest.approx(sum(d) / 2)

    # the summary may not replace a run file (nor be written among them)
    with pytest.raises(USFMError, match="input folder"):
        pr.main([*argv[:-2], "--out", str(results / "hc18" / "a-n2-s0-t2.json"), "--summarise"])
    assert "key" in json.loads((results / "hc18" / "a-n2-s0-t2.json").read_text())

    calls: list = []
    monkeypatch.setattr(pr, "run_one", lambda *a: calls.append(a) or pytest.fail("reran"))
    assert pr.main(argv) == 0 and calls == []  # every key matches: nothing reruns
