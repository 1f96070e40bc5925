"""Per-step schedules (learning rate, weight decay, EMA momentum, temperatures, masking).

Every schedule is a plain NumPy array with one value per optimisation step, so the trainer
indexes it with the global step and a resumed run sees exactly the same values.
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    start: float,
    end: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warm-up ``warmup_start → start`` then half-cosine ``start → end``.

    Returns an array of shape ``(total_steps,)``; ``out[0]`` is the first step's value and
    the cosine part reaches ``end`` on the last step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    n = total_steps - warmup_steps
    # t runs 0..1 over the cosine part (a single step stays at ``start``).
    t = np.arange(n) / max(n - 1, 1)
    cosine = end + 0.5 * (start - end) * (1.0 + np.cos(np.pi * t))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def linear_schedule(start: float, end: float, total_steps: int) -> np.ndarray:
    """Values from ``start`` (first step) to ``end`` (last step), linearly: ``(total_steps,)``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return np.linspace(start, end, total_steps, dtype=np.float64)


def warmup_then_constant(
    start: float, end: float, warmup_steps: int, total_steps: int
) -> np.ndarray:
    """Linear ``start → end`` over ``warmup_steps`` then constant ``end``: ``(total_steps,)``.

    Used for the teacher temperature (0.04 → 0.07 over the first epochs, as in DINO/iBOT).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    ramp = np.linspace(start, end, warmup_steps, endpoint=False)
    return np.concatenate([ramp, np.full(total_steps - warmup_steps, end)]).astype(np.float64)
