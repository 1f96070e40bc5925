"""Benchmark: selective scan on CPU: Python loops vs the ``torch``, ``numba`` and ``c`` backends.

Run from the repository root::

    python benchmarks/scan.py                         # target shapes, 1 and 2 threads, neighbour
    python benchmarks/scan.py --shapes stages         # VMamba-T's four stages, N in {1, 16}
    python benchmarks/scan.py --quick                 # target shapes, 1 repeat, no neighbour

Implementations, timed side by side in one process with interleaved repeats:

* ``loop-index``: the reference code's approach (VMamba's / mamba-ssm's CPU fallback): a
  Python loop that reads step ``i`` with ``x[:, :, i]``; autograd's backward is O(L²) there
  (only run where that stays cheap).
* ``loop-unbind``: the same loop over ``unbind`` slices (our ``"reference"`` backend): the
  fair O(L) baseline.
* ``torch``: the chunked, blocked scan with a hand-written backward (``"torch"`` backend).
* ``numba``: the fused compiled kernel (``"numba"`` backend).
* ``c``: the fused C kernel for one state (``"c"`` backend, the CPU default for ``N = 1``);
  not run on ``N > 1`` shapes, where ``auto`` uses ``numba``.

Every shape runs with 1 and 2 threads (``--threads``) and, with ``--neighbour``, again while a
busy neighbour process (a bounded ``while True: pass``, killed afterwards) holds a core.  Each
row records the load average (``os.getloadavg``) when it ran; the worst relative error of each
float32 backend against the float64 chunked scan is recorded per shape.  Writes
``benchmarks/results/scan.json``.  Timings are wall-clock medians over ``--repeat`` runs; the
process CPU time is recorded too (less sensitive to other jobs on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from usfm_core.models.scan import selective_scan, tune_cpu_allocator
from usfm_core.threads import pick_threads

# (stage, L, D = 4 directions × d_inner) for VMamba-T at 224².
STAGES = [(1, 3136, 4 * 192), (2, 784, 4 * 384), (3, 196, 4 * 768), (4, 49, 4 * 1536)]
# The target shapes: (B, D, N, L, G).
TARGETS = [(2, 192, 1, 3136, 4), (1, 768, 1, 3136, 4), (1, 64, 16, 784, 4)]
GROUPS = 4
# Rough useful FLOPs per (b, d, n, l): Δ·A, exp, Δ·u, ·B, a·h + x (2), C·h + sum (2).
FLOPS_FWD = 9
FLOPS_BWD = 18
# A single loop-index fwd+bwd run above this estimated cost (elements copied) is skipped.
INDEX_BWD_LIMIT = 1e10
NEIGHBOUR_CODE = "import time\nend = time.time() + {s}\nwhile time.time() < end:\n    pass\n"


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


def make_inputs(b: int, dim: int, n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """``u, delta, A, B, C, delta_bias`` (fp32, requiring grad) with Mamba-like scales
    (softplus(delta + bias) ≈ 0.02–0.1, ``A = −(1..N)``), B and C in 4 groups."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(b, dim, length, generator=gen)
    delta = torch.randn(b, dim, length, generator=gen) - 4
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1)
    B = torch.randn(b, GROUPS, n, length, generator=gen)
    C = torch.randn(b, GROUPS, n, length, generator=gen)
    bias = torch.rand(dim, generator=gen) * 0.5
    return [t.requires_grad_() for t in (u, delta, A, B, C, bias)]


def _summary(walls: list[float], cpus: list[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "cpu_median_s": statistics.median(cpus),
    }


def _call(name: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    """One forward of implementation ``name`` (softplus(delta + bias) included everywhere)."""
    u, delta, A, B, C, bias = inputs
    if name == "loop-index":
        dt = torch.nn.functional.softplus(delta + bias.unsqueeze(-1))
        return loop_index(u, dt, A, B, C)
    backend = "reference" if name == "loop-unbind" else name
    return selective_scan(u, delta, A, B, C, delta_bias=bias, delta_softplus=True, backend=backend)


def upstream_gradient(inputs: list[torch.Tensor], kind: str) -> torch.Tensor | None:
    """The gradient fed into the scan's output in fwd+bwd timings: ``"dense"`` a fixed random
    ``(B, D, L)`` tensor (what a model's backward delivers: contiguous and dense), ``"sum"``
    ``None``, i.e. ``y.sum().backward()`` (a broadcast scalar that the fused kernels must first
    materialise; the convention of this benchmark before 2026-12-01)."""
    if kind == "sum":
        return None
    u = inputs[0]
    gen = torch.Generator().manual_seed(1)
    return torch.randn(u.shape, generator=gen, dtype=u.dtype)


def _runner(
    name: str, inputs: list[torch.Tensor], backward: bool, grad: torch.Tensor | None = None
) -> Callable[[], None]:
    """A closure running one implementation forward (no grad) or forward+backward (upstream
    gradient ``grad``, or ``y.sum()`` when ``None``)."""

    def run() -> None:
        if backward:
            for t in inputs:
                t.grad = None
            y = _call(name, inputs)
            if grad is None:
                y.sum().backward()
            else:
                y.backward(grad)
        else:
            with torch.no_grad():
                _call(name, inputs)

    return run


def bench_case(
    impls: list[str], inputs: list[torch.Tensor], repeat: int, grad: str = "dense"
) -> dict[str, dict]:
    """Timings of each implementation; repeats are interleaved (round-robin) so that load from
    other jobs on the machine hits every implementation alike. ``grad``: see
    :func:`upstream_gradient` (the same for every implementation)."""
    out: dict[str, dict] = {name: {} for name in impls}
    upstream = upstream_gradient(inputs, grad)
    for mode, backward in (("fwd", False), ("fwd_bwd", True)):
        runs = {name: _runner(name, inputs, backward, upstream) for name in impls}
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


def worst_errors(inputs: list[torch.Tensor], impls: list[str]) -> dict[str, float]:
    """Worst |error| / max |reference| over y and all gradients, float32 backend vs the float64
    chunked scan on the same inputs."""

    def outputs(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in inputs]
        y = _call(name, leaves)
        (y * torch.linspace(-1, 1, y.shape[-1], dtype=dtype)).sin().sum().backward()
        return [y.detach().double()] + [t.grad.double() for t in leaves]

    ref = outputs("torch", torch.float64)
    errs = {}
    for name in impls:
        if name in ("torch", "numba", "c") and (name != "c" or inputs[2].shape[1] == 1):
            got = outputs(name, torch.float32)
            errs[name] = max(
                float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
                for g, r in zip(got, ref, strict=True)
            )
    return errs


@contextlib.contextmanager
def busy_neighbour(seconds: float) -> Iterator[subprocess.Popen | None]:
    """A second process spinning on one core for at most ``seconds``; always killed."""
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR_CODE.format(s=seconds)])
    try:
        time.sleep(0.5)  # let it start spinning
        yield proc
    finally:
        proc.kill()
        proc.wait()


def uptime() -> str:
    """``uptime`` output (load averages), or the load averages alone."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _ratios(row: dict) -> None:
    """Speed-ups of ``torch``, ``numba`` and ``c`` over the loops (wall and CPU time)."""
    elems = row["B"] * row["D"] * row["N"] * row["L"]
    for ours in ("torch", "numba", "c"):
        if row.get(ours) is None:
            continue
        for mode, flops in (("fwd", FLOPS_FWD), ("fwd_bwd", FLOPS_FWD + FLOPS_BWD)):
            row[f"{ours}_gflops_{mode}"] = flops * elems / row[ours][mode]["median_s"] / 1e9
            for base in ("loop-index", "loop-unbind", "torch", "numba"):
                if base == ours or row.get(base) is None:
                    continue
                for key, stat in (("", "median_s"), ("cpu_", "cpu_median_s")):
                    ratio = row[base][mode][stat] / row[ours][mode][stat]
                    row[f"{key}{ours}_speedup_{mode}_vs_{base}"] = ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, no neighbour runs")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument(
        "--shapes", choices=["targets", "stages", "all"], default="targets",
        help="the issue's target shapes, VMamba-T's stages (N 1 and 16), or both",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--neighbour", action="store_true", help="also run beside a busy process")
    parser.add_argument(
        "--impls", nargs="+", default=["loop-index", "loop-unbind", "torch", "numba", "c"]
    )
    parser.add_argument(
        "--grad",
        choices=["dense", "sum"],
        default="dense",
        help="upstream gradient of fwd+bwd: a dense random tensor (as in a model) or y.sum()",
    )
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="keep glibc's default allocator settings (see scan.tune_cpu_allocator)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scan.json"))
    args = parser.parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    tuned = False if args.no_malloc_tuning else tune_cpu_allocator()
    shapes = []
    if args.shapes in ("targets", "all"):
        shapes += [("target", *t) for t in TARGETS]
    if args.shapes in ("stages", "all"):
        shapes += [(f"stage{st}", 1, d, n, length, GROUPS) for n in (1, 16)
                   for st, length, d in sorted(STAGES, key=lambda s: s[1])]  # fmt: skip
    neighbours = [False, True] if args.neighbour and not args.quick else [False]
    print(f"malloc tuning: {'on' if tuned else 'off'}; upstream gradient: {args.grad}; {uptime()}")
    if "numba" in args.impls:  # compile (or load the cache) before timing
        t0 = time.perf_counter()
        _call("numba", make_inputs(1, 4, 1, 8))
        print(f"numba first call (compile or cache load): {time.perf_counter() - t0:.1f} s")
    if "c" in args.impls:
        t0 = time.perf_counter()
        _call("c", make_inputs(1, 4, 1, 8))
        print(f"c first call (compile or cache load): {time.perf_counter() - t0:.1f} s")

    rows = []
    for kind, b, dim, n, length, groups in shapes:
        inputs = make_inputs(b, dim, n, length)
        errors = worst_errors(inputs, args.impls)
        index_ok = b * dim * n * length * length <= INDEX_BWD_LIMIT
        impls = [i for i in args.impls
                 if (i != "loop-index" or index_ok) and (i != "c" or n == 1)]  # fmt: skip
        for neighbour in neighbours:
            for threads in args.threads:
                torch.set_num_threads(threads)
                ctx = busy_neighbour(600) if neighbour else contextlib.nullcontext()
                with ctx:
                    load = os.getloadavg()
                    row = {"kind": kind, "B": b, "L": length, "D": dim, "N": n, "G": groups,
                           "threads": threads, "neighbour": neighbour,
                           "loadavg_before": load, "policy_threads": pick_threads()}  # fmt: skip
                    row.update({"loop-index": None, "c": None,
                                **bench_case(impls, inputs, repeat, args.grad)})
                    row["uptime_after"] = uptime()
                row["worst_rel_error"] = errors
                _ratios(row)
                rows.append(row)
                print_row(row)
    torch.set_num_threads(max(args.threads))
    result = {
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "platform": platform.platform(),
            "cores": os.cpu_count(),
        },
        "repeat": repeat,
        "malloc_tuned": tuned,
        "upstream_gradient": args.grad,
        "uptime_end": uptime(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


def _ms(entry: dict | None, mode: str) -> str:
    return "—" if entry is None else f"{entry[mode]['median_s'] * 1e3:.1f}"


def print_row(row: dict) -> None:
    """One line per case: fwd+bwd times in ms (median), the fused kernels' speed-ups, load."""
    if not getattr(print_row, "header", False):
        print(
            f"{'B':>2} {'L':>5} {'N':>3} {'D':>5} thr nb | f+b ms: {'index':>8} {'unbind':>8} "
            f"{'torch':>8} {'numba':>8} {'c':>8} | x unbind: numba      c | c x numba | "
            "fwd ms numba     c | err numba  err c | load"
        )
        print_row.header = True  # type: ignore[attr-defined]

    def num(key: str, fmt: str) -> str:
        v = row.get(key)
        return format(v, fmt) if v else "—"

    err = row["worst_rel_error"]
    print(
        f"{row['B']:2d} {row['L']:5d} {row['N']:3d} {row['D']:5d} {row['threads']:3d} "
        f"{'y' if row['neighbour'] else 'n':>2} | {_ms(row.get('loop-index'), 'fwd_bwd'):>15} "
        f"{_ms(row.get('loop-unbind'), 'fwd_bwd'):>8} {_ms(row.get('torch'), 'fwd_bwd'):>8} "
        f"{_ms(row.get('numba'), 'fwd_bwd'):>8} {_ms(row.get('c'), 'fwd_bwd'):>8} | "
        f"{num('numba_speedup_fwd_bwd_vs_loop-unbind', '.1f'):>15} "
        f"{num('c_speedup_fwd_bwd_vs_loop-unbind', '.1f'):>6} | "
        f"{num('c_speedup_fwd_bwd_vs_numba', '.2f'):>9} | "
        f"{_ms(row.get('numba'), 'fwd'):>12} {_ms(row.get('c'), 'fwd'):>5} | "
        f"{(format(err['numba'], '.1e') if err.get('numba') else '—'):>9} "
        f"{(format(err['c'], '.1e') if err.get('c') else '—'):>6} | "
        f"{row['loadavg_before'][0]:.1f}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
