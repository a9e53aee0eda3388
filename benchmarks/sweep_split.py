"""Where the standard meeting sweep's time goes: its latency phase, then each run's training, test and cost
seconds as the run store keeps them, summed over the runs.

    VPTDASH_HOME=$(mktemp -d) python benchmarks/sweep_split.py [--processes 2] [--note "..."] [--write-docs]
    python benchmarks/sweep_split.py --from RESULT.json --write-docs   # a result printed before

It runs the sweep `python -m vptdash bench --sweep` times (`bench.run_meeting_sweep`) in the data dir
VPTDASH_HOME names, the latency phase its executor begins with timed apart just before. In a fresh data
dir that phase times each of the sweep's architectures, as on a machine that never ran it (elsewhere the
cost cache answers); the weights and decoded images are prepared there first, before any timing starts.
Prints one JSON line. The runs' seconds are process seconds: with N processes the runs' phase lasts
about their sum / N.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, machine, write_section  # noqa: E402
from vptdash.bench import run_meeting_sweep, sweep_processes  # noqa: E402
from vptdash.engine.cost import default_cost_cache_path  # noqa: E402
from vptdash.engine.precision import cpu_description  # noqa: E402
from vptdash.engine.train import RunConfig  # noqa: E402
from vptdash.runs.executors import latency_by_architecture  # noqa: E402
from vptdash.runs.presets import load_demo_setting, meeting_sweep_configs  # noqa: E402

PERFORMANCE_MD = ROOT / "docs" / "performance.md"
HEADING = "## Where the meeting sweep's time goes"
# The parts of a run's stored timings (`train.run_training`, `jobs`): training from the run's start (data,
# model, the frozen encoding and validation included), the held-out evaluation, the cost phase.
PARTS = ("train_seconds", "test_seconds", "cost_seconds")


def split(rows: list[dict]) -> dict:
    """Per run and summed over runs: each part of `PARTS` (0 where a run has none), the encoding of the
    frozen layers inside training ("cache_seconds"), and their total per run."""
    runs, sums = [], dict.fromkeys((*PARTS, "cache_seconds", "total_seconds"), 0.0)
    for row in rows:
        timings = row.get("timings") or {}
        entry = {part: float(timings.get(part) or 0.0) for part in (*PARTS, "cache_seconds")}
        entry["total_seconds"] = sum(entry[part] for part in PARTS)
        for key, value in entry.items():
            sums[key] += value
        runs.append({"label": RunConfig.from_dict(row.get("config") or {}).label(), **entry})
    return {"runs": runs, "sums": sums}


def measure(processes: int) -> dict:
    fresh = not default_cost_cache_path().exists()  # nothing counted or timed in this data dir before
    load_demo_setting()  # weights and decoded images: a fresh data dir prepares them here, not inside a timing
    load = os.getloadavg()
    started_at = time.gmtime()
    start = time.perf_counter()
    # What the sweep's executor does first, timed apart: the sweep then reads these from the cost cache.
    latency_by_architecture(meeting_sweep_configs())
    latency_s = time.perf_counter() - start
    _, rows, _ = run_meeting_sweep(processes)
    total_s = time.perf_counter() - start
    result = split(rows)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", started_at),
        "machine": machine(),
        "cpu": cpu_description(),
        "load_average_at_start": [round(value, 2) for value in load],
        "processes": processes,
        "fresh_cost_cache": fresh,
        "sweep_seconds": round(total_s, 1),
        "latency_phase_s": round(latency_s, 1),
        "runs_phase_s": round(total_s - latency_s, 1),
        "sums": {key: round(value, 1) for key, value in result["sums"].items()},
        "runs": [{key: round(v, 2) if isinstance(v, float) else v for key, v in run.items()} for run in result["runs"]],
    }


def section(result: dict) -> str:
    """docs/performance.md's section for one measurement."""
    cpu, sums = result["cpu"], result["sums"]
    load = ", ".join(f"{value:.2f}" for value in result["load_average_at_start"])
    processes = result["processes"]
    lines = [
        f"`python benchmarks/sweep_split.py --write-docs` ({result['date']}; {result['machine']}; flags "
        f"{' '.join(cpu['flags']) or 'none'}; "
        + (f"OpenMP wait {cpu['openmp_wait']}; " if cpu.get("openmp_wait") else "")
        + f"load average {load} at the start"
        + (f"; {result['note']}" if result.get("note") else "")
        + "). The standard meeting sweep (`bench --sweep`'s) "
        + (
            "in a fresh data dir, so the latency of each of its architectures is timed first, with every thread; "
            if result.get("fresh_cost_cache")
            else "with this data dir's cost cache (latency timed only for architectures it did not hold); "
        )
        + f"then its runs in {processes} worker processes. "
        f"A run's seconds are its own process's: the runs' phase lasts about their sum / {processes}.",
        "",
        "| phase | seconds | share |",
        "|---|---|---|",
        f"| latency, timed once per architecture before the runs | {result['latency_phase_s']} | "
        f"{result['latency_phase_s'] / result['sweep_seconds']:.0%} of the sweep |",
        f"| the runs, {processes} processes side by side | {result['runs_phase_s']} | "
        f"{result['runs_phase_s'] / result['sweep_seconds']:.0%} of the sweep |",
        f"| the whole sweep | {result['sweep_seconds']} | |",
        f"| summed over runs: training (setup, frozen encoding and validation included) | {sums['train_seconds']} | "
        f"{sums['train_seconds'] / sums['total_seconds']:.0%} of the runs' seconds |",
        f"| of which encoding the frozen layers | {sums['cache_seconds']} | "
        f"{sums['cache_seconds'] / sums['total_seconds']:.0%} |",
        f"| summed over runs: test evaluation | {sums['test_seconds']} | "
        f"{sums['test_seconds'] / sums['total_seconds']:.0%} |",
        f"| summed over runs: costs (GMAC count; latency came from the first phase) | {sums['cost_seconds']} | "
        f"{sums['cost_seconds'] / sums['total_seconds']:.0%} |",
        "",
        "| run | training, s | of which encoding, s | test, s | costs, s | total, s |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['label']} | {run['train_seconds']} | {run['cache_seconds']} | {run['test_seconds']} | "
            f"{run['cost_seconds']} | {run['total_seconds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, help="worker processes (default: as `bench --sweep` chooses)")
    parser.add_argument("--note", help="what else the machine was doing, stated with the result")
    parser.add_argument("--write-docs", action="store_true", help="write its section of docs/performance.md")
    parser.add_argument("--from", dest="from_file", type=Path, help="a result this script printed, not measuring")
    args = parser.parse_args(argv)
    if args.from_file:
        result = json.loads(args.from_file.read_text().strip().splitlines()[-1])
    else:
        result = measure(args.processes or sweep_processes())
    if args.note:
        result["note"] = args.note
    if args.write_docs:
        write_section(HEADING, section(result), PERFORMANCE_MD)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
