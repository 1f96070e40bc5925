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
