"""Shared pytest fixtures: where the real data lives, small deterministic settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or ``$USFM_SHARED_DATA``), if present."""
    env = os.environ.get("USFM_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    for cand in candidates:
        if (cand / "busi" / "manifest.csv").exists():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real BUSI / HC18 data; skips the test with a reason when it is absent."""
    root = shared_data_dir()
    if root is None:
        pytest.skip("real data ../shared/data not found (set USFM_SHARED_DATA to its path)")
    return root


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep torch to the 2 cores CI has, and deterministic where cheap."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def tiny_pretrain_run(tmp_path_factory) -> Path:
    """A `tiny` OpenUS pretraining run (3 steps on 8 simulated frames), shared by tests that
    need a real checkpoint (inspection, the napari Inspect widget, fine-tuning from it)."""
    import cv2

    from usfm_core.pretrain.config import load_config
    from usfm_core.pretrain.trainer import pretrain
    from usfm_core.sim import simulate_frame

    root = tmp_path_factory.mktemp("tiny-pretrain")
    data = root / "data" / "phantom"
    data.mkdir(parents=True)
    for i in range(8):
        frame = simulate_frame(seed=i, height=128, width=128)
        cv2.imwrite(str(data / f"frame_{i}.png"), frame.image)
    cfg = load_config("tiny", ["device=cpu"])
    return Path(pretrain(cfg, root / "data", root / "run", max_steps=3))
