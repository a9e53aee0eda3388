"""Seconds per engine training step, and forward latency, under each OpenMP wait policy, side by side: one
process per policy and round (the policy is read once, when the OpenMP runtime loads), rounds interleaved
so that load from other processes falls on every policy alike.

    python benchmarks/step_wait_policy.py [--batch 8] [--steps 10] [--rounds 3] [--threads 2] [--busy N]
                                          [--note "..."] [--write-docs]
    python benchmarks/step_wait_policy.py --docs-only   # the section from the kept results

`--busy N` starts N competing processes (each spins on a core until this script ends), as on a machine
that is running a browser, a video call or another job: what the policy costs under load. Every result
is kept in benchmarks/data/wait_policy_runs.json, one per machine, load and setting (a new one replaces
the old); `--write-docs` writes them all into docs/performance.md ("## OpenMP wait policy, one training
step side by side"). vptdash sets GOMP_SPINCOUNT unless the user set it or OMP_WAIT_POLICY
(vptdash/__init__.py): this measures the trade-off that setting makes.

Each child runs `benchmarks/profile_step.py`'s step (the engine's: dinov2_s14, 112 px, 10 deep prompts,
bf16 autocast) and prints the median wall time of `--steps` steps after one warm-up, then the latency
a run stores (`vptdash.engine.cost.measure_latency`, batch 1 and batch 32, ms per image) of the same
architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DATA, machine, write_section  # noqa: E402
from vptdash.engine import openmp  # noqa: E402
from vptdash.engine.precision import cpu_description  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = DATA / "wait_policy_runs.json"
DEFAULT = "default (unset)"
POLICIES = {
    DEFAULT: {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=3000": {"GOMP_SPINCOUNT": "3000"},
}
CHILD = """
import json, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from benchmarks.profile_step import make_step, wall_seconds
from vptdash.engine.backbones import load_backbone
from vptdash.engine.cost import measure_latency
from vptdash.engine.prompts import PromptedViT
step = make_step({precision!r}, {placement!r}, {batch})
step()
print("SECONDS", wall_seconds(step, {steps}))
model = PromptedViT(load_backbone("dinov2_s14", None, 112), 2, num_prompts=10, placement={placement!r}, seed=0)
b1 = measure_latency(model, 112, batch_size=1, repeats=20, precision={precision!r})
b32 = measure_latency(model, 112, batch_size=32, warmup=1, repeats=5, max_seconds=1.0, precision={precision!r})
print("LATENCY", json.dumps([b1["median_ms_per_image"], b32["median_ms_per_image"]]))
"""
# A competitor: spins until the process that started it is gone (checked every few million iterations),
# so none outlives this script even if it is killed.
SPINNER = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(3_000_000): pass\n"


def run_child(code: str, env: dict) -> tuple[float, list[float]]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines() if " " in line}
    return float(lines["SECONDS"]), json.loads(lines["LATENCY"])


def measure(args) -> dict:
    code = CHILD.format(
        root=str(ROOT),
        threads=args.threads,
        precision=args.precision,
        placement=args.placement,
        batch=args.batch,
        steps=args.steps,
    )
    clean = {k: v for k, v in os.environ.items() if k not in openmp.VARIABLES}
    steps: dict[str, list[float]] = {name: [] for name in POLICIES}
    latency: dict[str, list[list[float]]] = {name: [] for name in POLICIES}
    spinners = [subprocess.Popen([sys.executable, "-c", SPINNER]) for _ in range(args.busy)]
    try:
        if spinners:
            time.sleep(5)  # let the load average see them
        loads = [os.getloadavg()[0]]
        for round_index in range(args.rounds):
            for name, extra in POLICIES.items():
                seconds, lat = run_child(code, {**clean, **extra})
                steps[name].append(seconds)
                latency[name].append(lat)
                loads.append(os.getloadavg()[0])
                print(
                    f"round {round_index} {name}: {seconds:.3f} s/step, latency {lat[0]:.1f} / {lat[1]:.2f} ms "
                    f"(batch 1 / 32), load {loads[-1]:.1f}",
                    flush=True,
                )
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    cpu = cpu_description()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "cpu_flags": cpu["flags"],
        "busy": args.busy,
        "load_range": [round(min(loads), 1), round(max(loads), 1)],
        "settings": {k: getattr(args, k) for k in ("batch", "steps", "rounds", "threads", "precision", "placement")},
        "seconds_per_step": steps,
        "latency_ms_b1_b32": latency,
        **({"note": args.note} if args.note else {}),
    }


def same_kind(a: dict, b: dict) -> bool:
    """One kept result per machine, flags, load and setting: a new measurement replaces the old."""
    return (a["machine"], a["cpu_flags"], a["busy"], a["settings"]) == (
        b["machine"],
        b["cpu_flags"],
        b["busy"],
        b["settings"],
    )


def keep(result: dict, path: Path = RUNS) -> list[dict]:
    runs = json.loads(path.read_text()) if path.exists() else []
    runs = [run for run in runs if not same_kind(run, result)] + [result]
    path.write_text(json.dumps(runs, indent=1) + "\n")
    return runs


def table(run: dict) -> list[str]:
    """One kept result: a row per policy, its step times per round, the median against the default's."""
    steps, latency = run["seconds_per_step"], run.get("latency_ms_b1_b32") or {}
    base = statistics.median(steps[DEFAULT])
    settings = run["settings"]
    flags = " ".join(f"--{k} {v}" for k, v in settings.items())
    load = (
        f"{run['busy']} competing processes spinning, load average {run['load_range'][0]}-{run['load_range'][1]}"
        if run["busy"]
        else f"no competing processes started, load average {run['load_range'][0]}-{run['load_range'][1]}"
    )
    lines = [
        f"**{run['machine']}; flags {' '.join(run['cpu_flags']) or 'none'}; {run['date']}; {load}"
        + (f"; {run['note']}" if run.get("note") else "")
        + f".** `python benchmarks/step_wait_policy.py {flags}"
        + (f" --busy {run['busy']}" if run["busy"] else "")
        + "`: each child times "
        f"{settings['steps']} training steps (10 {settings['placement']} prompts, batch {settings['batch']}, "
        f"{settings['precision']}, {settings['threads']} threads) after one warm-up and reports the median"
        + (", then the latency a run stores (median ms per image)." if latency else "."),
        "",
        "| policy | seconds per step, per round | median | vs default |"
        + (" latency batch 1, ms | latency batch 32, ms |" if latency else ""),
        "|---|---|---|---|" + ("---|---|" if latency else ""),
    ]
    for name, values in steps.items():
        median = statistics.median(values)
        row = f"| {name} | {', '.join(f'{v:.3f}' for v in values)} | {median:.3f} | {median / base:.3f}x |"
        if latency:
            pairs = latency[name]
            row += f" {statistics.median(p[0] for p in pairs):.1f} | {statistics.median(p[1] for p in pairs):.2f} |"
        lines.append(row)
    return lines


def section(runs: list[dict]) -> str:
    lines = [
        "Every kept result (`benchmarks/data/wait_policy_runs.json`): one process per policy and round, rounds "
        "interleaved; a result compares only within its own table.",
    ]
    for run in runs:
        lines += ["", *table(run)]
    return "\n".join(lines) + "\n"


HEADING = "## OpenMP wait policy, one training step side by side"
PERFORMANCE_MD = ROOT / "docs" / "performance.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--placement", default="deep")
    parser.add_argument("--busy", type=int, default=0, help="competing processes spinning while it runs")
    parser.add_argument("--note", help="what else the machine was doing, stated with the result")
    parser.add_argument("--write-docs", action="store_true", help="write the section into docs/performance.md")
    parser.add_argument(
        "--docs-only", action="store_true", help="write the section from the kept results, measuring nothing"
    )
    args = parser.parse_args()
    if args.docs_only:
        runs = json.loads(RUNS.read_text())
    else:
        result = measure(args)
        runs = keep(result)
        print(json.dumps({name: statistics.median(v) for name, v in result["seconds_per_step"].items()}))
    if args.write_docs or args.docs_only:
        write_section(HEADING, section(runs), PERFORMANCE_MD)


if __name__ == "__main__":
    main()
