"""Issue 7's figures, written into docs/performance.md.

1. `python -m vptdash bench --json --sweep` (the real command, in its own process): matmul peaks, engine
   vs naive reference at block 0 and in late blocks, achieved GFLOP/s, the meeting sweep end to end.
2. bf16 autocast vs fp32 on ELPV: the meeting-demo recipe (binary, 16 shots, 20 epochs), 10 deep prompts
   and the linear probe, 3 seeds each, test accuracy in both precisions.
3. The profile of one engine training step (bf16 and fp32): where the remaining time goes.

    python benchmarks/performance.py               # about 20 minutes on 2 CPU cores
    python benchmarks/performance.py --only-bench  # section 1 only, about 8 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, machine, today, write_section  # noqa: E402
from benchmarks.profile_step import profile_table  # noqa: E402
from vptdash import presets  # noqa: E402
from vptdash.train import run_training  # noqa: E402

PERFORMANCE_MD = ROOT / "docs" / "performance.md"
PARITY_SETTINGS = {"10 deep prompts": dict(num_prompts=10, placement="deep"), "linear probe": dict(num_prompts=0)}


def run_bench_command() -> dict:
    completed = subprocess.run([sys.executable, "-m", "vptdash", "bench", "--json", "--sweep"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def precision_parity(seeds: list[int]) -> list[dict]:
    rows = []
    for name, overrides in PARITY_SETTINGS.items():
        for seed in seeds:
            row = {"setting": name, "seed": seed}
            for precision in ("fp32", "bf16"):
                config = dataclasses.replace(presets.demo_base(), seed=seed, precision=precision,
                                             measure_latency=False, **overrides)
                start = time.perf_counter()
                result = run_training(config, compute_costs=False)
                row[f"acc_{precision}"] = result.metrics["accuracy"]
                row[f"bal_{precision}"] = result.metrics["balanced_accuracy"]
                row[f"seconds_{precision}"] = time.perf_counter() - start
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def bench_markdown(result: dict) -> str:
    lines = ["| figure | value |", "|---|---|"]
    for key, value in result.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| `{key}` | {text} |")
    return "\n".join(lines)


def parity_markdown(rows: list[dict]) -> str:
    lines = ["| setting | seed | accuracy fp32 % | accuracy bf16 % | balanced fp32 % | balanced bf16 % | run s fp32 | run s bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['seed']} | {r['acc_fp32'] * 100:.1f} | {r['acc_bf16'] * 100:.1f} | "
                     f"{r['bal_fp32'] * 100:.1f} | {r['bal_bf16'] * 100:.1f} | {r['seconds_fp32']:.0f} | "
                     f"{r['seconds_bf16']:.0f} |")
    for name in PARITY_SETTINGS:
        mine = [r for r in rows if r["setting"] == name]
        if not mine:
            continue
        diff = sum(r["acc_bf16"] - r["acc_fp32"] for r in mine) / len(mine) * 100
        worst = max(abs(r["acc_bf16"] - r["acc_fp32"]) for r in mine) * 100
        lines.append(f"\n{name}: mean accuracy difference bf16 - fp32 = {diff:+.2f} points over {len(mine)} seeds "
                     f"(largest single-seed difference {worst:.1f} points).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--only-bench", action="store_true", help="rerun the bench command only (its section)")
    args = parser.parse_args()
    header = f"Produced by `python benchmarks/performance.py` on {today()}; machine: {machine()}."
    if not args.skip_bench:
        result = run_bench_command()
        print(json.dumps(result), flush=True)
        write_section("## `python -m vptdash bench --json --sweep`", f"{header}\n\n{bench_markdown(result)}\n\n"
                      f"Raw JSON (the command's last line):\n\n```json\n{json.dumps(result)}\n```", PERFORMANCE_MD)
    if args.only_bench:
        return
    rows = precision_parity([int(s) for s in args.seeds.split(",")])
    write_section("## bf16 autocast vs fp32 on ELPV", f"{header} Recipe: the meeting demo's (binary ELPV, 16 shots "
                  "per class, 112 px, 20 epochs, batch 8, AdamW lr 1e-2); test = the stratified 25% (656 images)."
                  f"\n\n{parity_markdown(rows)}", PERFORMANCE_MD)
    profiles = {p: profile_table(p) for p in ("bf16", "fp32")}
    write_section("## Profile of one training step", f"{header} Standard configuration (dinov2_s14, 112 px, 10 deep "
                  "prompts, batch 32), 3 steps after a warm-up, top operators by self CPU time.\n\n"
                  + "\n\n".join(f"### {p}\n\n```\n{table}\n```" for p, table in profiles.items()), PERFORMANCE_MD)


if __name__ == "__main__":
    main()
