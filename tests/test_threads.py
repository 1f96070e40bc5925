"""Thread policy: free cores from the affinity mask and the load average; explicit wins."""

from __future__ import annotations

import torch

from usfm_core import threads
from usfm_core.cli import main


def test_pick_threads_uses_free_cores():
    assert threads.pick_threads(cores=2, load=0.0) == 2
    assert threads.pick_threads(cores=2, load=0.4) == 2
    assert threads.pick_threads(cores=2, load=1.0) == 1  # a busy neighbour takes one core
    assert threads.pick_threads(cores=2, load=9.0) == 1  # never below one
    assert threads.pick_threads(cores=8, load=2.6) == 5
    assert threads.pick_threads(cores=4, load=-3) == 4
    assert 1 <= threads.pick_threads() <= threads.available_cores()


def test_apply_threads_explicit_env_and_auto(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(threads.ENV_VAR, raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert threads.apply_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "pick_threads", lambda: 2)
        assert threads.apply_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.apply_threads() == 1
        monkeypatch.setenv(threads.ENV_VAR, "2")  # ours wins over OMP_NUM_THREADS
        assert threads.apply_threads() == 2
        monkeypatch.setenv(threads.ENV_VAR, "many")  # ignored with a warning
        assert threads.apply_threads() == 1
        assert threads.apply_threads(3) == 3  # explicit beats the environment
    finally:
        torch.set_num_threads(before)


def test_cli_threads_option_overrides_policy(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "pick_threads", lambda: 1)
    try:
        assert main(["info"]) == 0
        assert torch.get_num_threads() == 1  # the policy ran
        assert main(["--threads", "2", "info"]) == 0
        assert torch.get_num_threads() == 2  # --threads overrides it
    finally:
        torch.set_num_threads(before)
