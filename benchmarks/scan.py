"""Benchmark: selective scan, Python loop over L vs the chunked ``torch`` backend (CPU).

Run from the repository root::

    python benchmarks/scan.py            # full table, 3 repeats, median
    python benchmarks/scan.py --quick    # L in {49, 784}, 1 repeat

Shapes are those of VMamba-T's SS2D at 224² (ssm_ratio 2, 4 directions as 4 groups, B = 1):
stage 1: L = 3136, d_inner = 192 -> D = 4·192; stage 2: L = 784, D = 4·384; stage 3: L = 196,
D = 4·768; stage 4: L = 49, D = 4·1536.  Three implementations run side by side in one process:

* ``loop-index``: the reference code's approach (VMamba's / mamba-ssm's CPU fallback): a
  Python loop that reads step ``i`` with ``x[:, :, i]``; autograd's backward is O(L²) there.
* ``loop-unbind``: the same loop over ``unbind`` slices (our ``"reference"`` backend).
* ``torch``: the chunked, blocked scan with a hand-written backward (``"torch"`` backend).

Writes ``benchmarks/results/scan.json``.  Timings are wall-clock medians over ``--repeat``
runs; the process CPU time is recorded too (less sensitive to other jobs on the machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from usfm_core.models.scan import selective_scan, tune_cpu_allocator

# (stage, L, D = 4 directions × d_inner) for VMamba-T at 224².
STAGES = [(1, 3136, 4 * 192), (2, 784, 4 * 384), (3, 196, 4 * 768), (4, 49, 4 * 1536)]
GROUPS = 4
# Rough useful FLOPs per (b, d, n, l): Δ·A, exp, Δ·u, ·B, a·h + x (2), C·h + sum (2).
FLOPS_FWD = 9
FLOPS_BWD = 18
# A single loop-index fwd+bwd run above this estimated cost (elements copied) is skipped.
INDEX_BWD_LIMIT = 1e10


def loop_index(u, delta, A, B, C):
    """The reference code's approach: precompute (B, D, L, N) tensors, index step i in a loop."""
    dim = u.shape[1]
    Bx = B.repeat_interleave(dim // B.shape[1], dim=1)  # (B, D, N, L)
    Cx = C.repeat_interleave(dim // C.shape[1], dim=1)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    drive = torch.einsum("bdl,bdnl,bdl->bdln", delta, Bx, u)
    h = u.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        h = decay[:, :, i] * h + drive[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", h, Cx[:, :, :, i]))
    return torch.stack(ys, dim=2)


def make_inputs(dim: int, n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """``u, delta, A, B, C`` (fp32, requiring grad) with Mamba-like scales; delta post-softplus."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(1, dim, length, generator=gen)
    delta = torch.nn.functional.softplus(torch.randn(1, dim, length, generator=gen) - 4)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1)
    B = torch.randn(1, GROUPS, n, length, generator=gen)
    C = torch.randn(1, GROUPS, n, length, generator=gen)
    return [t.requires_grad_() for t in (u, delta, A, B, C)]


def _summary(walls: list[float], cpus: list[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "cpu_median_s": statistics.median(cpus),
    }


def _runner(name: str, inputs: list[torch.Tensor], backward: bool) -> Callable[[], None]:
    """A closure running one implementation forward (no grad) or forward+backward."""
    backend = "reference" if name == "loop-unbind" else "torch"

    def fwd() -> torch.Tensor:
        if name == "loop-index":
            return loop_index(*inputs)
        return selective_scan(*inputs, backend=backend)

    def run() -> None:
        if backward:
            for t in inputs:
                t.grad = None
            fwd().sum().backward()
        else:
            with torch.no_grad():
                fwd()

    return run


def bench_case(impls: list[str], inputs: list[torch.Tensor], repeat: int) -> dict[str, dict]:
    """Timings of each implementation; repeats are interleaved (round-robin) so that load from
    other jobs on the machine hits every implementation alike."""
    out: dict[str, dict] = {name: {} for name in impls}
    for mode, backward in (("fwd", False), ("fwd_bwd", True)):
        runs = {name: _runner(name, inputs, backward) for name in impls}
        walls: dict[str, list[float]] = {name: [] for name in impls}
        cpus: dict[str, list[float]] = {name: [] for name in impls}
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeat):
            for name, fn in runs.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                walls[name].append(time.perf_counter() - t0)
                cpus[name].append(time.process_time() - c0)
        for name in impls:
            out[name][mode] = _summary(walls[name], cpus[name])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="L in {49, 784}, 1 repeat")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--states", type=int, nargs="+", default=[1, 16], help="d_state N")
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="keep glibc's default allocator settings (see scan.tune_cpu_allocator)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); use 1 on an oversubscribed machine",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scan.json"))
    args = parser.parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tuning else tune_cpu_allocator()
    print(f"malloc tuning: {'on' if tuned else 'off'}; threads: {torch.get_num_threads()}")
    stages = [s for s in STAGES if not args.quick or s[1] in (49, 784)]

    rows = []
    for n in args.states:
        for stage, length, dim in sorted(stages, key=lambda s: s[1]):
            inputs = make_inputs(dim, n, length)
            elems = dim * n * length
            row = {"stage": stage, "L": length, "D": dim, "N": n, "B": 1, "G": GROUPS}
            impls = ["loop-unbind", "torch"]
            if elems * length <= INDEX_BWD_LIMIT:  # else its O(L²) backward takes minutes
                impls.insert(0, "loop-index")
            row.update({"loop-index": None, **bench_case(impls, inputs, repeat)})
            ours = row["torch"]
            for mode, flops in (("fwd", FLOPS_FWD), ("fwd_bwd", FLOPS_FWD + FLOPS_BWD)):
                row[f"gflops_{mode}"] = flops * elems / ours[mode]["median_s"] / 1e9
                for base in ("loop-index", "loop-unbind"):
                    if row[base] is not None:
                        for key, stat in (("", "median_s"), ("cpu_", "cpu_median_s")):
                            ratio = row[base][mode][stat] / ours[mode][stat]
                            row[f"{key}speedup_{mode}_vs_{base}"] = ratio
            # Compulsory traffic: read u, delta, B, C, write y (fp32).
            row["min_bytes"] = 4 * (3 * dim * length + 2 * GROUPS * n * length)
            rows.append(row)
            print_row(row)

    result = {
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "platform": platform.platform(),
        },
        "repeat": repeat,
        "malloc_tuned": tuned,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


def _ms(entry: dict | None, mode: str) -> str:
    return "—" if entry is None else f"{entry[mode]['median_s'] * 1e3:9.1f}"


def print_row(row: dict) -> None:
    """One line per case: times in ms (median) and speed-ups of ``torch`` over the loops."""
    if not getattr(print_row, "header", False):
        print(
            f"{'L':>5} {'N':>3} {'D':>5} | {'fwd ms: index':>14} {'unbind':>9} {'torch':>9} | "
            f"{'fwd+bwd: index':>14} {'unbind':>9} {'torch':>9} | "
            f"{'x idx':>6} {'x unb':>6} | GFLOP/s"
        )
        print_row.header = True  # type: ignore[attr-defined]
    sp = row.get("speedup_fwd_bwd_vs_loop-index")
    print(
        f"{row['L']:5d} {row['N']:3d} {row['D']:5d} | "
        f"{_ms(row['loop-index'], 'fwd'):>14} {_ms(row['loop-unbind'], 'fwd')} "
        f"{_ms(row['torch'], 'fwd')} | "
        f"{_ms(row['loop-index'], 'fwd_bwd'):>14} {_ms(row['loop-unbind'], 'fwd_bwd')} "
        f"{_ms(row['torch'], 'fwd_bwd')} | "
        f"{(f'{sp:6.1f}' if sp else '     —')} "
        f"{row['speedup_fwd_bwd_vs_loop-unbind']:6.1f} | {row['gflops_fwd_bwd']:6.2f}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
