"""Pre-training throughput on CPU: images/s and where a step's time goes.

For each preset (``tiny``, ``small-cpu``, optionally ``openus-s`` at batch 2) one OpenUS
step on random views is split into: teacher forward, scan-attention map (teacher forward
with the attention read-out minus without), mask generation, student forward (+ losses),
backward, and the selective scan's share of the forward passes. Prints a table and writes
``benchmarks/results/pretrain.json``. ``--backends`` runs each preset once per selective-scan
backend in the same process (rows keyed by preset and backend; the load average is recorded
per row). ``--methods`` adds a side-by-side table of full training
steps (images/s) of each pretraining method (openus, ibot, mae, jepa) on one preset.

    python benchmarks/pretrain.py [--presets tiny small-cpu openus-s] [--steps 3]
    python benchmarks/pretrain.py --presets small-fast --backends numba torch --threads 1
    python benchmarks/pretrain.py --presets --methods openus ibot mae jepa --method-preset tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from usfm_core.optim import adamw
from usfm_core.pretrain.config import preset
from usfm_core.pretrain.openus import step_generator

RESULTS = Path(__file__).resolve().parent / "results" / "pretrain.json"


@contextlib.contextmanager
def _scan_timer(acc: list[float]):
    """Accumulate the wall time spent inside SS2D's ``cross_selective_scan`` (forward calls:
    the 4-direction scan with its cross-scan and cross-merge)."""
    import usfm_core.models.vmamba as vmamba

    original = vmamba.cross_selective_scan

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        acc[0] += time.perf_counter() - t0
        return out

    vmamba.cross_selective_scan = timed
    try:
        yield
    finally:
        vmamba.cross_selective_scan = original


def _batch(cfg, batch_size: int) -> dict[str, torch.Tensor]:
    v = cfg.views
    return {
        "global_views": torch.randn(
            batch_size, v.n_global, v.in_chans, v.global_size, v.global_size
        ),
        "local_views": torch.randn(batch_size, v.n_local, v.in_chans, v.local_size, v.local_size),
        "index": torch.arange(batch_size),
        "global_regions": torch.ones(
            batch_size, v.n_global, v.global_size, v.global_size, dtype=torch.bool
        ),
    }


def profile_step(model, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    """Seconds per part of one step (re-doing the parts of ``training_step`` with timers)."""
    from usfm_core.pretrain.openus import _stack_views

    t: dict[str, float] = {}
    scan_acc = [0.0]
    globals_ = _stack_views(batch["global_views"])
    locals_ = _stack_views(batch["local_views"])
    gen = step_generator(0, step, 0)
    with torch.no_grad(), _scan_timer(scan_acc):
        # Best of two runs each: the attention read-out is a small difference of two timings.
        plain, with_attn = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            model.teacher.backbone(globals_)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.teacher.backbone(globals_, return_attention=True)
            with_attn.append(time.perf_counter() - t0)
        t["teacher_fwd"] = min(plain)
        t["attention_map"] = max(min(with_attn) - min(plain), 0.0)
        scan_acc[0] /= 2  # two rounds of teacher forwards were timed
    t0 = time.perf_counter()
    gmask = model.global_masker(
        len(globals_),
        tuple(out.grid),
        scores=out.importance,
        loss_map=torch.rand_like(out.importance),
        step=step,
        generator=gen,
    )
    lmask = model.local_masker(len(locals_), model.local_grid, generator=gen)
    t["mask_gen"] = time.perf_counter() - t0
    with _scan_timer(scan_acc):
        t0 = time.perf_counter()
        s_out = model.student(globals_, gmask, locals_, lmask)
        loss = sum(v.float().pow(2).mean() for v in s_out.values())
        t["student_fwd"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss.backward()
    t["backward"] = time.perf_counter() - t0
    # All timed forwards: teacher twice (without and with attention read-out) + student.
    forwards = 2 * t["teacher_fwd"] + t["attention_map"] + t["student_fwd"]
    t["scan_share_fwd"] = scan_acc[0] / max(forwards, 1e-9)
    return t


def time_steps(method: str, cfg, batch_size: int, steps: int):
    """Build ``method`` and time ``steps`` full training steps (forward, backward, optimiser,
    hooks) after one warm-up; returns ``(model, batch, seconds per step)``."""
    from usfm_core.pretrain.methods import get_method

    cfg.method = method
    model = get_method(method)(cfg, total_steps=100, steps_per_epoch=10, n_items=batch_size)
    opt = adamw(model.param_groups(cfg.optim.weight_decay), lr=1e-4)
    batch = _batch(cfg, batch_size)
    model.train()

    def full_step(step: int) -> None:
        loss, _ = model.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        model.before_optimizer_step(step)
        opt.step()
        model.after_step(step)

    full_step(0)  # warm-up
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        full_step(s)
    return model, batch, (time.perf_counter() - t0) / steps


def bench(
    name: str, batch_size: int | None, steps: int, backend: str = "auto"
) -> dict[str, float | str | int]:
    """Time ``steps`` full OpenUS training steps (after one warm-up) and one profiled step,
    with selective-scan backend ``backend``."""
    import usfm_core.models.scan as scan

    # "c-unfused": the C kernel without the fused cross-scan / cross-merge (as before
    # 2026-12-01)
    scan.FUSE_CROSS_SCAN = backend != "c-unfused"
    scan.set_default_backend("c" if backend == "c-unfused" else backend)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    cfg = preset(name)
    bs = batch_size or cfg.batch_size
    model, batch, per_step = time_steps("openus", cfg, bs, steps)
    parts = profile_step(model, batch, steps + 1)
    v = cfg.views
    return {
        "preset": name,
        "scan_backend": backend if backend == "c-unfused" else scan.resolve_backend("auto", "cpu"),
        "load_1min": round(load, 2),
        "batch": bs,
        "views": f"{v.n_global}x{v.global_size}² + {v.n_local}x{v.local_size}²",
        "params_student_M": round(sum(p.numel() for p in model.student.parameters()) / 1e6, 2),
        "step_s": round(per_step, 3),
        "images_per_s": round(bs / per_step, 2),
        **{k: round(x, 3) for k, x in parts.items()},
    }


def bench_method(method: str, preset_name: str, batch_size: int, steps: int) -> dict:
    """Full training steps of one method on one preset (for the side-by-side table)."""
    model, _, per_step = time_steps(method, preset(preset_name), batch_size, steps)
    return {
        "method": method,
        "preset": preset_name,
        "batch": batch_size,
        "params_trained_M": round(
            sum(p.numel() for p in model.student.parameters() if p.requires_grad) / 1e6, 2
        ),
        "step_s": round(per_step, 3),
        "images_per_s": round(batch_size / per_step, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=["tiny", "small-cpu", "openus-s"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--methods",
        nargs="*",
        default=[],
        help="also time full steps of these methods side by side",
    )
    parser.add_argument("--method-preset", default="tiny")
    parser.add_argument("--method-batch", type=int, default=8)
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["auto"],
        help="scan backends to time (auto, c, c-unfused, numba, torch)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = {
        "device": "cpu",
        "backends": args.backends,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "note": "seconds per step part; shared 2-core box (load average per row)",
    }
    # Keep earlier results of presets not re-run now (openus-s takes minutes on CPU).
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    old = saved.get("results", [])
    methods = [
        bench_method(m, args.method_preset, args.method_batch, args.steps) for m in args.methods
    ] or saved.get("methods", [])
    if args.methods:
        print(" | ".join(methods[0]))
        for r in methods:
            print(" | ".join(str(v) for v in r.values()), flush=True)
    rows = [r for r in old if r["preset"] not in args.presets]
    for name in args.presets:
        for backend in args.backends:
            # openus-s (VMamba-S at 224²) only with batch 2: its per-process batch 32 is
            # GPU-sized.
            rows.append(bench(name, 2 if name == "openus-s" else 4, args.steps, backend))
        import usfm_core.models.scan as scan

        scan.FUSE_CROSS_SCAN = True
        _speedups(rows, name)
        _print_table(rows)
        # Written after every preset so a long openus-s run does not lose the others.
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            json.dumps({"meta": meta, "results": rows, "methods": methods}, indent=2) + "\n"
        )
    if not args.presets:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            json.dumps({"meta": meta, "results": rows, "methods": methods}, indent=2) + "\n"
        )
    print(f"wrote {RESULTS}")


def _speedups(rows: list[dict], name: str) -> None:
    """Add ``step_speedup_vs_torch`` to this preset's non-torch rows of the same run."""
    base = [r for r in rows if r["preset"] == name and r.get("scan_backend") == "torch"]
    if base:
        for r in rows:
            if r["preset"] == name and r.get("scan_backend") != "torch":
                r["step_speedup_vs_torch"] = round(base[-1]["step_s"] / r["step_s"], 2)


def _print_table(rows: list[dict]) -> None:
    cols = [
        "preset", "scan_backend", "load_1min", "batch", "views", "params_student_M", "step_s",
        "images_per_s", "step_speedup_vs_torch",
        "teacher_fwd", "attention_map", "mask_gen", "student_fwd", "backward", "scan_share_fwd",
    ]  # fmt: skip
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "-")) for c in cols), flush=True)


if __name__ == "__main__":
    main()
