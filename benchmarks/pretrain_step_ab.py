"""One OpenUS pretraining step of ``small-fast``: this checkout against an earlier revision.

Issue #13's target compares the pretraining step with "today's" (the torch scan backend of the
code when the work started). This script measures that side by side: every arm runs in its own
fresh Python process (no shared caches or threads), the arms alternate round after round so a
neighbour's load hits them alike, and ``uptime`` is recorded beside every number.

An arm is ``LABEL=CHECKOUT:BACKEND:AMP``: ``CHECKOUT`` is ``head`` (this working tree) or
``base`` (``--base REV`` checked out once as a detached git worktree under ``--worktrees``),
``BACKEND`` a scan backend name of that checkout (``torch``, ``c``, ``numba``, ``auto``) and
``AMP`` ``off`` or ``bf16`` (bf16 autocast around the forward, as ``amp: bf16`` in the
pretraining config does).

    python benchmarks/pretrain_step_ab.py --threads 2 --rounds 3 --steps 10
    python benchmarks/pretrain_step_ab.py --arms old-torch=base:torch:off new-c=head:c:off

Prints one line per measurement and a summary (median per arm and its ratio to the first arm),
and writes ``benchmarks/results/pretrain_step_ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from usfm_core.outputs import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pretrain_step_ab.json"
DEFAULT_ARMS = [
    "old-torch=base:torch:off",
    "new-c=head:c:off",
    "new-c-bf16=head:c:bf16",
]
# The child: time `steps` full OpenUS steps (forward, backward, AdamW, EMA) after one warm-up,
# on random views of the preset's sizes; prints seconds per step. Uses only API that exists in
# every revision since the C kernel landed (and before: backend "torch"); the optimiser is
# the checkout's own (usfm_core.optim.adamw, fused, where it exists; plain AdamW before).
CHILD = r"""
import contextlib, sys, time
import torch
from usfm_core.pretrain.config import preset
from usfm_core.pretrain.methods import get_method
import usfm_core.models.scan as scan
name, backend, amp, steps, bs, threads = sys.argv[1:7]
steps, bs = int(steps), int(bs)
torch.set_num_threads(int(threads))
scan.set_default_backend(backend)
torch.manual_seed(0)
cfg = preset(name)
cfg.method = "openus"
model = get_method("openus")(cfg, total_steps=100, steps_per_epoch=10, n_items=bs)
try:  # the product's optimiser (fused AdamW) where the checkout has one
    from usfm_core.optim import adamw
except ImportError:
    adamw = torch.optim.AdamW
opt = adamw(model.param_groups(cfg.optim.weight_decay), lr=1e-4)
v = cfg.views
batch = {
    "global_views": torch.randn(bs, v.n_global, v.in_chans, v.global_size, v.global_size),
    "local_views": torch.randn(bs, v.n_local, v.in_chans, v.local_size, v.local_size),
    "index": torch.arange(bs),
    "global_regions": torch.ones(bs, v.n_global, v.global_size, v.global_size, dtype=torch.bool),
}
model.train()
def step(s):
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16"
           else contextlib.nullcontext())
    with ctx:
        loss, _ = model.training_step(batch, s)
    opt.zero_grad()
    loss.backward()
    model.before_optimizer_step(s)
    opt.step()
    model.after_step(s)
step(0)
t0 = time.perf_counter()
for s in range(1, steps + 1):
    step(s)
print((time.perf_counter() - t0) / steps)
"""


def uptime() -> str:
    """The 1-, 5- and 15-minute load averages as ``uptime`` prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def base_worktree(rev: str, root: Path) -> Path:
    """A detached worktree of ``rev`` (created once, reused); returns its path."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    path = root / f"usfm-base-{sha}"
    if not (path / "src" / "usfm_core").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), sha],
            check=True, capture_output=True,
        )  # fmt: skip
    return path


def parse_arm(text: str) -> tuple[str, str, str, str]:
    """``LABEL=CHECKOUT:BACKEND:AMP`` → its four parts (errors name the bad arm)."""
    try:
        label, spec = text.split("=", 1)
        checkout, backend, amp = spec.split(":")
    except ValueError:
        raise SystemExit(f"arm {text!r}: expected LABEL=CHECKOUT:BACKEND:AMP") from None
    if checkout not in ("head", "base") or amp not in ("off", "bf16"):
        raise SystemExit(f"arm {text!r}: CHECKOUT is head|base, AMP is off|bf16")
    return label, checkout, backend, amp


def run_arm(src: Path, preset: str, backend: str, amp: str, args) -> float:
    """Seconds per step of one arm in a fresh process with ``src`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, preset, backend, amp, str(args.steps), str(args.batch),
         str(args.threads)],
        check=True, capture_output=True, text=True, env=env, cwd=src.parent,
    ).stdout  # fmt: skip
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS)
    parser.add_argument("--base", default="e2a21c1", help="revision of the 'base' checkout")
    parser.add_argument("--worktrees", type=Path, default=Path("/tmp"))
    parser.add_argument("--preset", default="small-fast")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    arms = [parse_arm(a) for a in args.arms]
    srcs = {"head": REPO / "src"}
    if any(c == "base" for _, c, _, _ in arms):
        srcs["base"] = base_worktree(args.base, args.worktrees) / "src"
    rows = []
    for rnd in range(args.rounds):
        for label, checkout, backend, amp in arms:
            before = uptime()
            step_s = run_arm(srcs[checkout], args.preset, backend, amp, args)
            row = {"round": rnd, "arm": label, "checkout": checkout, "backend": backend,
                   "amp": amp, "step_s": round(step_s, 4), "uptime_before": before,
                   "uptime_after": uptime()}  # fmt: skip
            rows.append(row)
            print(f"round {rnd} {label:>12} {step_s:.3f} s/step  load {before}", flush=True)
    first = arms[0][0]
    medians = {
        label: statistics.median(r["step_s"] for r in rows if r["arm"] == label)
        for label, *_ in arms
    }
    summary = {
        label: {
            "median_step_s": round(m, 4),
            f"speedup_vs_{first}": round(medians[first] / m, 2),
            "per_round_speedup": [
                round(a["step_s"] / b["step_s"], 2)
                for a, b in zip(
                    [r for r in rows if r["arm"] == first], [r for r in rows if r["arm"] == label]
                )
            ],
        }
        for label, m in medians.items()
    }
    print(f"\n{'arm':>12} {'median s':>9} {'× ' + first:>14}  per round")
    for label, s in summary.items():
        print(f"{label:>12} {s['median_step_s']:9.3f} {s[f'speedup_vs_{first}']:14.2f}  "
              f"{s['per_round_speedup']}")  # fmt: skip
    payload = {
        "preset": args.preset, "batch": args.batch, "steps": args.steps,
        "threads": args.threads, "base": args.base, "arms": args.arms,
        "cpu": _cpu_name(), "rows": rows, "summary": summary,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
