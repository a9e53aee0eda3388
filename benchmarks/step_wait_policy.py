"""Seconds per engine training step under each OpenMP wait policy, side by side: one process per policy
and round (the policy is read once, when the OpenMP runtime loads), rounds interleaved so that load from
other processes falls on every policy alike.

    python benchmarks/step_wait_policy.py [--batch 8] [--steps 10] [--rounds 3] [--threads 2] [--write-docs]

With --write-docs the per-round times, the medians and the load go into docs/performance.md (section
"## OpenMP wait policy, one training step side by side"). The engine sets OMP_WAIT_POLICY=PASSIVE unless
the user set it (vptdash/__init__.py): spinning threads steal the cores a dashboard or a second run needs;
this measures what passive waiting costs a step on this machine.

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, today, write_section  # noqa: E402

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
    parser.add_argument("--write-docs", action="store_true", help="write the section into docs/performance.md")
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
    loads = [os.getloadavg()[0]]
    for round_index in range(args.rounds):
        for name, extra in POLICIES.items():
            out = subprocess.run(
                [sys.executable, "-c", code], env={**clean, **extra}, capture_output=True, text=True, check=True
            ).stdout
            seconds = float(next(line for line in out.splitlines() if line.startswith("SECONDS")).split()[1])
            times[name].append(seconds)
            loads.append(os.getloadavg()[0])
            print(f"round {round_index} {name}: {seconds:.3f} s/step, load {loads[-1]:.1f}", flush=True)
    print(json.dumps({"median_s_per_step": {n: statistics.median(t) for n, t in times.items()}, **vars(args)}))
    if args.write_docs:
        write_section(HEADING, section(times, vars(args), loads), PERFORMANCE_MD)


HEADING = "## OpenMP wait policy, one training step side by side"
PERFORMANCE_MD = ROOT / "docs" / "performance.md"


def section(times: dict[str, list[float]], settings: dict, loads: list[float]) -> str:
    base = statistics.median(times["default (unset)"])
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if k != "write_docs")
    lines = [
        f"`python benchmarks/step_wait_policy.py {flags} --write-docs` ({today()}; {machine()}; load average "
        f"{min(loads):.1f}-{max(loads):.1f} while it ran). One process per policy and round, rounds interleaved; "
        f"each child times {settings['steps']} engine training steps (dinov2_s14, 112 px, 10 "
        f"{settings['placement']} prompts, batch {settings['batch']}, {settings['precision']}, "
        f"{settings['threads']} threads) after one warm-up and reports the median.",
        "",
        "| policy | seconds per step, per round | median | vs default |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {', '.join(f'{v:.3f}' for v in values)} | {median:.3f} | {median / base:.3f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
