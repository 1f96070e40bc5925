"""Backbone speed on CPU: forward latency per image and a training step (forward + backward).

Usage::

    python benchmarks/backbone.py                       # tiny, small-cpu, vmamba-t; batch 1, 8
    python benchmarks/backbone.py --presets vmamba-t --batch-sizes 1 --repeats 5 \
        --backends numba torch --threads 1 2            # scan backends side by side
    python benchmarks/backbone.py --presets vmamba-t --batch-sizes 1 --repeats 7 \
        --threads 2 --precisions fp32 bf16              # float32 vs bf16 autocast

Prints a table and writes ``benchmarks/results/backbone.json``. Also reports where the forward
time of each preset goes (batch 1): selective scan vs convolutions vs linear layers vs layer
norms vs the rest (cross-scan/merge, einsum projections, activations), measured with wall-clock
hooks (CPU ops are synchronous).  With several ``--backends`` / ``--threads``, every
combination runs in the same process (same model weights), each row recording the load
average (``os.getloadavg``) at its start. ``--precisions fp32 bf16`` times every combination
also under bf16 autocast (:mod:`usfm_core.models.precision`; the scans stay float32), and
``--rounds R`` repeats the whole grid R times so that the arms alternate in time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import usfm_core.models.scan as scan_module
import usfm_core.models.vmamba as vmamba_module
from usfm_core.models.precision import autocast, cpu_bf16_flags
from usfm_core.models.vmamba import VMamba, VMambaConfig

RESULTS = Path(__file__).resolve().parent / "results" / "backbone.json"


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_breakdown(
    model: VMamba, x: torch.Tensor, repeats: int, precision: str = "fp32"
) -> dict[str, float]:
    """Seconds per forward spent in the scan, convs, linears, layer norms and the rest."""
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    kinds = {nn.Conv2d: "conv", nn.Linear: "linear", nn.LayerNorm: "layernorm"}
    handles = []
    for module in model.modules():
        kind = kinds.get(type(module))
        if kind is None:
            continue

        def pre(mod, _inp):
            starts[id(mod)] = time.perf_counter()

        def post(mod, _inp, _out, kind=kind):
            spent[kind] += time.perf_counter() - starts.pop(id(mod))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    # SS2D calls cross_selective_scan: the 4-direction scan with cross-scan and cross-merge
    # (fused in one kernel with the c backend, three steps otherwise), timed as "scan".
    original = vmamba_module.cross_selective_scan

    def timed_scan(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        spent["scan"] += time.perf_counter() - start
        return out

    vmamba_module.cross_selective_scan = timed_scan
    try:
        with torch.inference_mode(), autocast(precision):
            model(x)  # warm-up, not counted
            spent.clear()
            start = time.perf_counter()
            for _ in range(repeats):
                model(x)
            total = (time.perf_counter() - start) / repeats
    finally:
        vmamba_module.cross_selective_scan = original
        for h in handles:
            h.remove()
    out = {k: v / repeats for k, v in spent.items()}
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out


def bench_preset(
    name: str,
    batch_sizes: list[int],
    size: int,
    repeats: int,
    train: bool,
    backend: str = "auto",
    threads: int | None = None,
    breakdown: bool = True,
    precision: str = "fp32",
):
    """Rows of results (one per batch size) for one preset, scan backend, thread count and
    precision (``fp32`` | ``bf16``: forward and training step under bf16 autocast)."""
    torch.manual_seed(0)
    model = VMamba(VMambaConfig.preset(name))
    params = sum(p.numel() for p in model.parameters())
    # "c-unfused": the C scan kernel without the fused cross-scan / cross-merge
    scan_module.FUSE_CROSS_SCAN = backend != "c-unfused"
    scan_module.set_default_backend("c" if backend == "c-unfused" else backend)
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for bs in batch_sizes:
        x = torch.randn(bs, 3, size, size)
        model.eval()
        load = os.getloadavg()[0]
        with torch.inference_mode(), autocast(precision):
            fwd = median_time(lambda x=x: model(x), repeats)
        row = {
            "preset": name,
            "scan_backend": (
                backend if backend == "c-unfused" else scan_module.resolve_backend("auto", "cpu")
            ),
            "threads": torch.get_num_threads(),
            "precision": precision,
            "load_1min": round(load, 2),
            "params_m": round(params / 1e6, 2),
            "batch": bs,
            "size": size,
            "forward_s_per_image": fwd / bs,
        }
        if train:
            model.train()

            def step(x=x):
                model.zero_grad(set_to_none=True)
                with autocast(precision):
                    loss = model(x).tokens.float().square().mean()
                loss.backward()

            row["train_step_s_per_image"] = median_time(step, max(1, repeats // 2)) / bs
        rows.append(row)
        print_row(row)
    model.eval()
    x1 = torch.randn(1, 3, size, size)
    parts = forward_breakdown(model, x1, repeats, precision) if breakdown else {}
    return rows, parts


def print_row(row: dict) -> None:
    train = row.get("train_step_s_per_image")
    train_txt = f"{train:9.3f}" if train is not None else "        -"
    print(
        f"{row['preset']:>10} {row['scan_backend']:>7} {row['precision']:>5} {row['threads']:3d} "
        f"{row['params_m']:8.2f} "
        f"{row['batch']:5d} {row['forward_s_per_image']:9.3f} {train_txt} {row['load_1min']:5.1f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small-cpu", "vmamba-t"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[0], help="torch threads (0: as started)"
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["auto"],
        help="scan backends (auto, c, c-unfused, numba, torch)",
    )
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
        help="fp32 and/or bf16 autocast",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole grid")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the time breakdown")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scan_module.tune_cpu_allocator()

    print(f"torch {torch.__version__}, load average {os.getloadavg()}")
    print(
        f"{'preset':>10} {'backend':>7} {'prec':>5} thr {'params M':>8} {'batch':>5} "
        f"{'fwd s/img':>9} "
        f"{'train s/img':>9} load"
    )
    results, breakdowns = [], {}
    try:
        grid = [
            (name, threads, backend, precision)
            for name in args.presets
            for threads in args.threads
            for backend in args.backends
            for precision in args.precisions
        ]
        for rnd in range(args.rounds):
            for name, threads, backend, precision in grid:
                rows, breakdown = bench_preset(
                    name, args.batch_sizes, args.size, args.repeats, not args.no_train,
                    backend, threads or None, not args.no_breakdown, precision,
                )  # fmt: skip
                for row in rows:
                    row["round"] = rnd
                results += rows
                key = f"{name}/{rows[0]['scan_backend']}/{precision}/{rows[0]['threads']}t"
                breakdowns[key if args.rounds == 1 else f"{key}/r{rnd}"] = breakdown
    finally:
        scan_module.set_default_backend(None)
        scan_module.FUSE_CROSS_SCAN = True
    print("\nforward time per 224² image, batch 1 (s):")
    for name, parts in breakdowns.items():
        text = ", ".join(f"{k} {v:.3f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"  {name}: {text}")

    payload = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "scan_backends": args.backends,
        "precisions": args.precisions,
        "cpu_bf16_flags": list(cpu_bf16_flags()),
        "load_end": os.getloadavg(),
        "results": results,
        "forward_breakdown_batch1_s": breakdowns,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
