"""The toolkit's AdamW (usfm_core.optim): fused where torch allows, same updates, same state."""

from __future__ import annotations

import torch
from torch import nn

from usfm_core.optim import adamw, can_fuse
from usfm_core.pretrain.ema import ema_update


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 1, 8, 8, generator=gen)
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _groups(net: nn.Module) -> list[dict]:
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]


def test_adamw_is_fused_on_cpu_and_matches_the_per_tensor_update():
    a, b = _net(0), _net(0)
    fused = adamw(_groups(a), lr=1e-2, betas=(0.9, 0.95))
    plain = torch.optim.AdamW(_groups(b), lr=1e-2, betas=(0.9, 0.95))
    assert fused.defaults["fused"] is True and can_fuse(a.parameters())
    _train(a, fused, 20)
    _train(b, plain, 20)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    pairs = zip(a.parameters(), _net(0).parameters())
    moved = sum(float((p - q).detach().abs().sum()) for p, q in pairs)
    assert moved > 0.1  # the steps did change the weights


def test_a_per_tensor_checkpoint_resumes_under_the_fused_optimiser():
    # Checkpoints written before the optimiser was fused must resume unchanged.
    a, b = _net(2), _net(2)
    plain_a = torch.optim.AdamW(a.parameters(), lr=5e-3)
    plain_b = torch.optim.AdamW(b.parameters(), lr=5e-3)
    _train(a, plain_a, 5)
    _train(b, plain_b, 5)
    resumed = adamw(b.parameters(), lr=5e-3)
    resumed.load_state_dict(plain_b.state_dict())
    _train(a, plain_a, 5, seed=3)
    _train(b, resumed, 5, seed=3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_adamw_keeps_an_explicit_choice_and_falls_back_off_cpu_dtypes():
    net = _net(0)
    assert adamw(net.parameters(), lr=1e-3, foreach=False).defaults["fused"] in (None, False)
    ints = [torch.zeros(3, dtype=torch.int64)]
    assert not can_fuse(ints) and not can_fuse([])


def test_ema_update_groups_dtypes_and_matches_the_formula():
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    teacher.double()  # a teacher kept in another dtype than its student
    old = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for p_t, o, p_s in zip(teacher.parameters(), old, student.parameters()):
        assert p_t.dtype == torch.float64
        torch.testing.assert_close(p_t, 0.9 * o + 0.1 * p_s.detach().double())
