"""The optimiser every trainer of the toolkit uses: AdamW, fused where torch has a fused kernel,
and the fine-tuning learning-rate schedule (:func:`lr_factor`).

PyTorch's default AdamW on CPU updates one parameter at a time (about a dozen small ops per
tensor); the fused kernel does the whole update in one call. For ``small-fast`` pretraining
(187 parameter tensors, 3.7 M values) that is 12-14 ms → 4 ms per step on one core
(``docs/benchmarks/backbone.md``). The update is the same algorithm (decoupled weight decay,
bias correction); results agree with the per-tensor loop to float32 rounding, and optimiser
state dicts load in either form, so checkpoints written before resume unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

# Devices whose parameters torch's fused AdamW accepts (CPU since torch 2.4).
_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _params_of(params: Iterable[Any]) -> list[torch.Tensor]:
    """Every tensor in ``params`` (a list of tensors or of param-group dicts)."""
    out: list[torch.Tensor] = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"])
        else:
            out.append(item)
    return out


def can_fuse(params: Iterable[torch.Tensor]) -> bool:
    """True when every parameter is a floating tensor on a device with a fused AdamW."""
    tensors = list(params)
    return bool(tensors) and all(
        p.device.type in _FUSED_DEVICES and p.dtype in _FUSED_DTYPES for p in tensors
    )


def adamw(params: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, fused when :func:`can_fuse` allows.

    ``params``: tensors or param-group dicts, as for any torch optimiser. Falls back to the
    per-tensor implementation (and says nothing) where the fused one is not available.
    """
    groups = list(params)
    fused = "fused" not in kwargs and "foreach" not in kwargs and can_fuse(_params_of(groups))
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # an older torch or an exotic tensor
            pass
    return torch.optim.AdamW(groups, **kwargs)


def lr_factor(step: int, steps: int, warmup: float = 0.0) -> float:
    """The learning-rate multiplier of optimiser step ``step`` (0-based) of ``steps``: a linear
    ramp over the first ``round(warmup·steps)`` steps (``(step + 1) / n``), times a cosine decay
    from 1 to 0 over ``steps`` (``LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))``)."""
    n_warm = round(warmup * steps)
    ramp = min(1.0, (step + 1) / n_warm) if n_warm > 0 else 1.0
    return ramp * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
