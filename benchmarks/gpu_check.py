"""GPU check: scan correctness on CUDA, VMamba-S training speed, one OpenUS pretraining step.

One prepared script (≤ 5 minutes on one modern GPU) for whenever a CUDA machine is at hand::

    python benchmarks/gpu_check.py                   # writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --batch 16 --pretrain-batch 8   # smaller GPUs

Sections (each one's failure is recorded in the JSON, the others still run):

1. ``scan``: the ``torch`` scan backend on CUDA tensors, and mamba-ssm's kernel (``cuda``
   backend) when it imports, against the CPU reference (the chunked scan in float64 on the same
   float32 inputs): outputs and all eight gradients, worst error relative to each tensor's
   magnitude, must be ≤ 1e-3 (``ok``).  Shapes: VMamba-S stage 1 (L = 3136, N = 1) and an
   N = 16 case, with delta bias, softplus, D and z.
2. ``vmamba_s``: forward + backward of VMamba-S at 224², batch ``--batch`` (32), bf16 autocast
   (the scan stays float32 inside), per available CUDA scan backend: s/step, images/s, peak
   memory.
3. ``openus_step``: full OpenUS pretraining steps (preset ``openus-s``: VMamba-S, 2×224² +
   8×96² views; ``--pretrain-batch`` images, 32 per GPU in the paper) under bf16 autocast,
   built with the package's own config and method factory: s/step, images/s, peak memory.

Without CUDA it checks the CPU parts it can (the ``numba`` and ``c`` backends against the
reference on small shapes; ``c`` hands N > 1 to ``numba``) and writes ``{"cuda": false,
...}``, exiting 0 within seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from usfm_core.models.scan import available_backends, backend_report, selective_scan
from usfm_core.optim import adamw

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
SCAN_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOLERANCE = 1e-3


# --------------------------------------------------------------------------- scan check
def scan_inputs(b: int, d: int, n: int, length: int, groups: int, seed: int = 0) -> dict:
    """Mamba-like float32 CPU inputs ``(B, D, L)`` etc.; delta before bias and softplus."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return {
        "u": rnd(b, d, length),
        "delta": rnd(b, d, length) - 3.0,
        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
        "B": rnd(b, groups, n, length),
        "C": rnd(b, groups, n, length),
        "D": torch.ones(d),
        "z": rnd(b, d, length),
        "delta_bias": rnd(d) * 0.5,
    }


def scan_fwd_bwd(inputs: dict, backend: str, device: str, dtype: torch.dtype) -> list:
    """``[y, last, grad u, …, grad delta_bias]`` (CPU float64) of a fixed non-linear loss."""
    leaves = {
        k: v.detach().to(device=device, dtype=dtype, copy=True).requires_grad_()
        for k, v in inputs.items()
    }
    y, last = selective_scan(
        *(leaves[k] for k in SCAN_NAMES), delta_softplus=True, return_last_state=True,
        backend=backend,
    )  # fmt: skip
    weight = torch.linspace(-1, 1, y.shape[-1], device=device, dtype=y.dtype)
    ((y * weight).sin().sum() + last.cos().sum()).backward()
    outs = [y.detach(), last.detach()] + [leaves[k].grad for k in SCAN_NAMES]
    return [t.double().cpu() for t in outs]


def worst_relative(got: list, ref: list) -> dict[str, float]:
    """Max |got − ref| / max |ref| per tensor."""
    names = ("y", "last_state", *(f"grad_{k}" for k in SCAN_NAMES))
    return {
        name: float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
        for name, g, r in zip(names, got, ref, strict=True)
    }


def check_scan(device: str, cases: list[tuple[int, ...]]) -> list[dict]:
    """Each case on each backend usable for ``device`` against the float64 CPU reference."""
    backends = ["torch"] + (["cuda"] if "cuda" in available_backends() else [])
    if device == "cpu":
        backends = [b for b in available_backends() if b in ("torch", "numba", "c")]
    rows = []
    for b, d, n, length, groups in cases:
        inputs = scan_inputs(b, d, n, length, groups)
        ref = scan_fwd_bwd(inputs, "torch", "cpu", torch.float64)
        for backend in backends:
            t0 = time.perf_counter()
            got = scan_fwd_bwd(inputs, backend, device, torch.float32)
            errs = worst_relative(got, ref)
            rows.append(
                {
                    "shape": {"B": b, "D": d, "N": n, "L": length, "G": groups},
                    "backend": backend,
                    "device": device,
                    "worst_relative_error": max(errs.values()),
                    "errors": errs,
                    "ok": max(errs.values()) <= TOLERANCE,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
            print(f"scan {backend:6s} {device} {rows[-1]['shape']}: worst rel err "
                  f"{rows[-1]['worst_relative_error']:.2e}", flush=True)  # fmt: skip
    return rows


# --------------------------------------------------------------------------- timing helpers
def cuda_time(fn: Callable[[], object], warmup: int, steps: int) -> float:
    """Seconds per call of ``fn`` on CUDA (synchronised), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def time_vmamba_s(batch: int, backend: str, steps: int) -> dict:
    """VMamba-S forward + backward at 224², bf16 autocast, scan backend ``backend``."""
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    torch.manual_seed(0)
    model = VMamba(VMambaConfig.preset("vmamba-s")).cuda().train()
    for module in model.modules():
        if hasattr(module, "scan_backend"):
            module.scan_backend = backend
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.tokens.float().square().mean().backward()

    per_step = cuda_time(step, warmup=2, steps=steps)
    return {
        "backend": backend,
        "batch": batch,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "s_per_step": round(per_step, 4),
        "images_per_s": round(batch / per_step, 1),
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def openus_step(batch_size: int, steps: int) -> dict:
    """Full OpenUS pretraining steps (preset ``openus-s``) on random views, bf16 autocast."""
    from usfm_core.pretrain.config import preset
    from usfm_core.pretrain.methods import get_method

    cfg = preset("openus-s")
    cfg.method = "openus"
    torch.manual_seed(0)
    model = get_method("openus")(cfg, total_steps=100, steps_per_epoch=10, n_items=batch_size)
    model = model.cuda().train()
    opt = adamw(model.param_groups(cfg.optim.weight_decay), lr=1e-4)
    v = cfg.views
    batch = {
        "global_views": torch.randn(
            batch_size, v.n_global, v.in_chans, v.global_size, v.global_size
        ),
        "local_views": torch.randn(batch_size, v.n_local, v.in_chans, v.local_size, v.local_size),
        "index": torch.arange(batch_size),
        "global_regions": torch.ones(
            batch_size, v.n_global, v.global_size, v.global_size, dtype=torch.bool
        ),
    }
    counter = [0]
    losses: list[float] = []
    torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        s = counter[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.training_step(batch, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        model.before_optimizer_step(s)
        opt.step()
        model.after_step(s)
        losses.append(float(loss))
        counter[0] += 1

    per_step = cuda_time(step, warmup=1, steps=steps)
    return {
        "preset": "openus-s",
        "batch": batch_size,
        "views": f"{v.n_global}x{v.global_size}² + {v.n_local}x{v.local_size}²",
        "s_per_step": round(per_step, 4),
        "images_per_s": round(batch_size / per_step, 2),
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "losses_finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
    }


def guarded(name: str, fn: Callable[[], Any], report: dict) -> None:
    """Run one section; record its result or its error (the other sections still run)."""
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # a GPU check must report, not die half-way
        report[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
    report.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="VMamba-S batch (224²)")
    parser.add_argument("--pretrain-batch", type=int, default=32, help="OpenUS images per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "scan_backends": backend_report(),
        "tolerance": TOLERANCE,
    }
    if not torch.cuda.is_available():
        report["reason"] = "no CUDA device visible to torch: only the CPU reference part ran"
        guarded("scan_cpu", lambda: check_scan("cpu", [(1, 8, 4, 200, 2)]), report)
    else:
        report["device"] = torch.cuda.get_device_name(0)
        report["cuda_version"] = torch.version.cuda
        cases = [(2, 4 * 192, 1, 3136, 4), (2, 256, 16, 784, 4)]
        guarded("scan", lambda: check_scan("cuda", cases), report)
        backends = ["torch"] + (["cuda"] if "cuda" in available_backends() else [])
        guarded(
            "vmamba_s",
            lambda: [time_vmamba_s(args.batch, b, args.steps) for b in backends],
            report,
        )
        torch.cuda.empty_cache()
        guarded("openus_step", lambda: openus_step(args.pretrain_batch, args.steps), report)
    checks = report.get("scan") or report.get("scan_cpu") or []
    report["scan_ok"] = isinstance(checks, list) and all(r["ok"] for r in checks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "scan_backends"}, default=str)[:2000])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
