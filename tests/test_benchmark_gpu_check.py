"""benchmarks/gpu_check.py: without CUDA it checks the CPU parts and says so in its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """The benchmark script imported as a module."""
    return load_script(SCRIPT, "gpu_check_bench")


def test_without_cuda_writes_a_json_saying_so(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["cuda"] is False and "no CUDA" in report["reason"]
    rows = report["scan_cpu"]
    assert {r["backend"] for r in rows} >= {"torch", "numba"}
    assert report["scan_ok"] is True
    for row in rows:  # float32 CPU backends against the float64 reference
        assert row["worst_relative_error"] <= 1e-5, row


def test_error_measure_catches_a_wrong_gradient(gpu_check):
    """The check must fail when a backend's gradient is off (here: doubled)."""
    inputs = gpu_check.scan_inputs(1, 4, 2, 30, 2)
    ref = gpu_check.scan_fwd_bwd(inputs, "torch", "cpu", torch.float64)
    bad = [t.clone() for t in ref]
    bad[2] = bad[2] * 2
    errs = gpu_check.worst_relative(bad, ref)
    assert errs["grad_u"] == pytest.approx(1.0) and errs["y"] == 0.0
