"""Seconds per engine training step under each OpenMP wait policy, side by side: one process per policy
and round (the policy is read once, when the OpenMP runtime loads), rounds interleaved so that load from
other processes falls on every policy alike.

    python benchmarks/step_wait_policy.py [--batch 8] [--steps 10] [--rounds 3] [--threads 2]

Each child runs `benchmarks/profile_step.py`'s step (the engine's: dinov2_s14, 112 px, 10 deep
prompts, bf16 autocast) and prints the median wall time of `--steps` steps after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICIES = {
    "default (unset)": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
}
CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from benchmarks.profile_step import make_step, wall_seconds
step = make_step({precision!r}, {placement!r}, {batch})
step()
print("SECONDS", wall_seconds(step, {steps}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--placement", default="deep")
    args = parser.parse_args()
    code = CHILD.format(
        root=str(ROOT),
        threads=args.threads,
        precision=args.precision,
        placement=args.placement,
        batch=args.batch,
        steps=args.steps,
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    times: dict[str, list[float]] = {name: [] for name in POLICIES}
    for round_index in range(args.rounds):
        for name, extra in POLICIES.items():
            out = subprocess.run(
                [sys.executable, "-c", code], env={**clean, **extra}, capture_output=True, text=True, check=True
            ).stdout
            seconds = float(next(line for line in out.splitlines() if line.startswith("SECONDS")).split()[1])
            times[name].append(seconds)
            print(f"round {round_index} {name}: {seconds:.3f} s/step, load {os.getloadavg()[0]:.1f}", flush=True)
    print(json.dumps({"median_s_per_step": {n: statistics.median(t) for n, t in times.items()}, **vars(args)}))


if __name__ == "__main__":
    main()
