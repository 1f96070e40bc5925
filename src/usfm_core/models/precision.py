"""Inference precision: float32, or bfloat16 autocast where the CPU computes it natively.

On CPUs with AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake / Sapphire Rapids and later)
or AMX-BF16, oneDNN runs bf16 matrix products at 2-3× the float32 rate (measured here: a
VMamba-T stage-1 linear layer 137 → 389 GFLOP/s on 2 threads), and linear layers are half of
VMamba's forward time. Elsewhere bf16 is emulated and *slower* than float32.

Under :func:`autocast`, the linear layers and convolutions run in bfloat16 while the selective
scans stay float32 (``usfm_core.models.scan`` switches autocast off inside) and layer norms /
softmax stay float32 (autocast's own policy). Logits are cast back to float32 by the callers.

Precisions (``--precision`` of ``usfm-core segment`` / ``evaluate``, the plugin's setting):

- ``"fp32"``: float32 everywhere (bit-reproducible across runs on one machine).
- ``"bf16"``: bf16 autocast on any device (slow where the CPU has no native bf16).
- ``"auto"``: bf16 on a CPU with native bf16 and on CUDA devices that support it, else fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

__all__ = ["PRECISIONS", "autocast", "cpu_bf16_flags", "native_bf16", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16")
# CPU feature flags (Linux /proc/cpuinfo names) with native bf16 dot products.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bf16 feature flags this CPU reports (empty when none or unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(f for f in BF16_FLAGS if f in flags)
    except OSError:  # not Linux: stay with float32 on "auto"
        pass
    return ()


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bf16 matrix products natively (faster than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return bool(cpu_bf16_flags())


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``"auto"`` | ``"fp32"`` | ``"bf16"`` → the precision used on ``device`` (``fp32``/``bf16``).

    Raises ``ValueError`` for an unknown name. ``USFM_PRECISION`` in the environment replaces
    ``"auto"`` (e.g. ``USFM_PRECISION=fp32`` for bit-reproducible runs).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        env = os.environ.get("USFM_PRECISION", "").strip().lower()
        if env in ("fp32", "bf16"):
            return env
        return "bf16" if native_bf16(device) else "fp32"
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: str | torch.device = "cpu") -> Iterator[str]:
    """Run the block in ``precision`` (resolved by :func:`resolve_precision`); yields it.

    ``bf16``: ``torch.autocast(device.type, dtype=torch.bfloat16)``; ``fp32``: nothing changes.
    """
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if resolved == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield resolved
    else:
        yield resolved
