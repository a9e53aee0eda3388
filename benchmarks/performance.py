"""The engine's speed figures, written into docs/performance.md.

1. `python -m vptdash bench --json --sweep` (the real command, in its own process): matmul peaks, engine
   vs naive reference at block 0 and in late blocks, achieved GFLOP/s, the meeting sweep end to end.
2. bf16 autocast vs fp32 on ELPV: the meeting-demo recipe (binary, 16 shots, 20 epochs), 10 deep prompts
   and the linear probe, 3 seeds each, test accuracy in both precisions.
3. The profile of one engine training step (bf16 and fp32): where the remaining time goes; `profile-b8`
   the same at batch 8, the few-shot recipe's step.

4. bf16 vs fp32 on the full training split (1,706 images), where seed-to-seed noise is far smaller than at
   16 shots: 10 deep prompts and the linear probe, 5 epochs, as many seeds as asked (docs/performance.md
   has 18: three could not resolve a 0.5-point band), with a paired 95% interval of the mean.

5. The full-split pairs summarised (no training: read from benchmarks/data/parity_full_runs.json): each
   precision's accuracy over seeds, the balanced-accuracy difference, run seconds, and the paired interval
   after the first 3, 6, 12, ... seeds (how far a few seeds can mislead).

6. One 2-thread process or two 1-thread processes: the meeting sweep end to end both ways (what
   `sweep --processes 2` buys on few-shot runs), alternating, as many rounds as asked; every timing is
   kept in benchmarks/data/sweep_processes.json and the section is written from the file.

    python benchmarks/performance.py                             # sections 1-3, about 20 minutes on 2 CPU cores
    python benchmarks/performance.py --sections bench            # section 1 only, about 7 minutes
    python benchmarks/performance.py --sections parity-full      # section 4 only, about 30 minutes
    python benchmarks/performance.py --sections parity-summary   # section 5, seconds (reads the stored pairs)
    python benchmarks/performance.py --sections processes --seeds 0-1   # section 6, 2 rounds, ~20 minutes
    python benchmarks/performance.py --sections parity-full --seeds 0-17 --processes 2 --resume
        # two 1-thread processes side by side (1.15x the throughput of one 2-thread process here: 315 vs
        # 362 s per pair); every pair is kept in benchmarks/data/parity_full_runs.json as it finishes
        # (a seed trained again replaces its row; delete the file to start afresh), --resume trains only
        # the missing seeds, and the section is written from every pair in the file
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, machine, today, write_section  # noqa: E402
from benchmarks.profile_step import profile_table  # noqa: E402
from vptdash.bench import time_meeting_sweep  # noqa: E402
from vptdash.engine.train import run_training  # noqa: E402
from vptdash.runs import presets  # noqa: E402
from vptdash.runs.executors import set_worker_threads  # noqa: E402
from vptdash.views.stats import t95  # noqa: E402

PERFORMANCE_MD = ROOT / "docs" / "performance.md"
PARITY_SETTINGS = {"10 deep prompts": dict(num_prompts=10, placement="deep"), "linear probe": dict(num_prompts=0)}
# The full training split: 1,706 images instead of 32, so one seed's accuracy moves by tenths of a point,
# not by ten points; 5 epochs at batch 32 (267 steps) keep a run to a few minutes.
FULL_SPLIT = dict(shots=None, epochs=5, batch_size=32, lr=1e-2, val_fraction=0.1)
SECTIONS = ("bench", "parity", "profile", "profile-b8", "parity-full", "parity-summary", "processes")
PROCESSES_RUNS = ROOT / "benchmarks" / "data" / "sweep_processes.json"
# Every full-split pair ever trained, so more seeds can be added later without training the first again.
PARITY_FULL_RUNS = ROOT / "benchmarks" / "data" / "parity_full_runs.json"


def run_bench_command() -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "vptdash", "bench", "--json", "--sweep"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def parity_pair(name: str, seed: int, recipe: dict | None = None) -> dict:
    """One setting and seed, trained once in fp32 and once in bf16 (same seed: same data order and init)."""
    import torch

    row = {"setting": name, "seed": seed, "threads": torch.get_num_threads()}
    for precision in ("fp32", "bf16"):
        config = dataclasses.replace(
            presets.demo_base(),
            seed=seed,
            precision=precision,
            measure_latency=False,
            **(recipe or {}),
            **PARITY_SETTINGS[name],
        )
        start = time.perf_counter()
        result = run_training(config, compute_costs=False)
        row[f"acc_{precision}"] = result.metrics["accuracy"]
        row[f"bal_{precision}"] = result.metrics["balanced_accuracy"]
        row[f"seconds_{precision}"] = time.perf_counter() - start
    return row


def precision_parity(seeds: list[int], recipe: dict | None = None, *, processes: int = 1, on_row=None) -> list[dict]:
    """fp32 vs bf16 for every setting and seed. processes > 1: that many spawned processes side by side,
    the threads split between them (each pair still runs both precisions under the same conditions)."""
    tasks = [(name, seed) for name in PARITY_SETTINGS for seed in seeds]
    rows = []

    def finished(row: dict) -> None:
        row["processes"] = processes
        print(json.dumps(row), flush=True)
        rows.append(row)
        if on_row:
            on_row(row)

    if processes == 1:
        for name, seed in tasks:
            finished(parity_pair(name, seed, recipe))
        return rows
    import torch

    threads = max(1, torch.get_num_threads() // processes)
    with ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("spawn"), initializer=set_worker_threads, initargs=(threads,)
    ) as pool:
        # The deep-prompt pairs first: they take minutes, the probes seconds.
        futures = [pool.submit(parity_pair, name, seed, recipe) for name, seed in tasks]
        for future in as_completed(futures):
            finished(future.result())
    return rows


def _git_commit() -> str:
    completed = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return completed.stdout.strip() or "unknown"


def load_parity_runs(path: Path = PARITY_FULL_RUNS) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save_parity_run(row: dict, path: Path = PARITY_FULL_RUNS) -> None:
    """Append (or replace the same setting and seed), at once: a long run stopped half way keeps its pairs."""
    runs = [r for r in load_parity_runs(path) if (r["setting"], r["seed"]) != (row["setting"], row["seed"])]
    runs.append({**row, "commit": _git_commit(), "date": today()})
    runs.sort(key=lambda r: (list(PARITY_SETTINGS).index(r["setting"]), r["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=1) + "\n")


def paired_difference(differences: list[float]) -> dict:
    """Mean of the per-seed differences and its 95% confidence interval (paired t; one seed: no interval)."""
    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "low": math.nan, "high": math.nan}
    sd = statistics.stdev(differences)
    half = t95(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


BENCH_RUNS = ROOT / "benchmarks" / "data" / "bench_runs.json"
BENCH_HEADING = "## `python -m vptdash bench --json --sweep`"


def bench_machine_key(run: dict) -> str:
    """One column per kind of machine: the CPU model, what its bf16 speed depends on (AMX, avx512_bf16, or
    neither) and the precision the machine was set to (VPTDASH_PRECISION=fp32 on an AMX Xeon stands in for a
    CPU without fast bf16, so it gets a column of its own)."""
    flags = set(run.get("cpu_flags") or [])
    bf16 = "amx" if any(f.startswith("amx") for f in flags) else "avx512_bf16" if "avx512_bf16" in flags else "no bf16"
    setting = run["result"].get("precision_setting") or "auto"
    return f"{run['machine'].split(',')[0]} {bf16} precision={setting}"


def keep_bench_run(result: dict, machine_text: str, load: str) -> list[dict]:
    """Add this run to benchmarks/data/bench_runs.json, replacing the earlier run of the same kind of machine."""
    runs = json.loads(BENCH_RUNS.read_text())["runs"] if BENCH_RUNS.is_file() else []
    flags = (result.get("cpu") or {}).get("flags") or []
    run = {"date": today(), "machine": machine_text, "cpu_flags": flags, "load": load, "note": "", "result": result}
    # A run marked "keep" stays: the Interpretation cites its figures (an earlier version of the code).
    runs = [r for r in runs if r.get("keep") or bench_machine_key(r) != bench_machine_key(run)] + [run]
    BENCH_RUNS.write_text(json.dumps({"runs": runs}, indent=1))
    return runs


def bench_runs_markdown(runs: list[dict]) -> str:
    """The section: one column per kind of machine (the latest run on each), then each run's raw JSON."""
    lines = [
        "One column per kind of machine, the latest run on each (`benchmarks/data/bench_runs.json`; "
        "`python benchmarks/performance.py --sections bench` adds or replaces its machine's column). "
        "Timings compare only within a column: each was measured in one process run on one machine.",
        "",
    ]
    for index, run in enumerate(runs, 1):
        note = f" Note: {run['note']}." if run.get("note") else ""
        # Runs since the bench named it say which OpenMP wait setting they ran under (earlier ones: their note).
        wait = (run["result"].get("cpu") or {}).get("openmp_wait")
        lines.append(
            f"- ({index}) {run['date']}; {run['machine']}; flags {' '.join(run.get('cpu_flags') or []) or 'none'}; "
            + (f"OpenMP wait {wait}; " if wait else "")
            + f"{run['load']}.{note}"
        )
    keys = []
    for run in reversed(runs):
        keys += [k for k in run["result"] if k not in keys and k != "cpu"]
    lines += ["", "| figure | " + " | ".join(f"({i})" for i in range(1, len(runs) + 1)) + " |"]
    lines.append("|---|" + "---|" * len(runs))
    for key in keys:
        cells = []
        for run in runs:
            value = run["result"].get(key)
            cells.append("" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    for index, run in enumerate(runs, 1):
        lines += ["", f"Raw JSON ({index}), the command's last line:", "", "```json", json.dumps(run["result"]), "```"]
    return "\n".join(lines)


def bench_markdown(result: dict) -> str:
    lines = ["| figure | value |", "|---|---|"]
    for key, value in result.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| `{key}` | {text} |")
    return "\n".join(lines)


def parity_markdown(rows: list[dict]) -> str:
    lines = [
        "| setting | seed | accuracy fp32 % | accuracy bf16 % | balanced fp32 % | balanced bf16 % | run s fp32 | run s bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['seed']} | {r['acc_fp32'] * 100:.1f} | {r['acc_bf16'] * 100:.1f} | "
            f"{r['bal_fp32'] * 100:.1f} | {r['bal_bf16'] * 100:.1f} | {r['seconds_fp32']:.0f} | "
            f"{r['seconds_bf16']:.0f} |"
        )
    for name in PARITY_SETTINGS:
        mine = [r for r in rows if r["setting"] == name]
        if not mine:
            continue
        stats = paired_difference([(r["acc_bf16"] - r["acc_fp32"]) * 100 for r in mine])
        worst = max(abs(r["acc_bf16"] - r["acc_fp32"]) for r in mine) * 100
        below = sum(r["acc_bf16"] < r["acc_fp32"] for r in mine)
        line = (
            f"\n{name}: mean accuracy difference bf16 - fp32 = {stats['mean']:+.2f} points over {stats['n']} seeds "
            f"(largest single-seed difference {worst:.1f} points; bf16 below fp32 on {below} of {stats['n']})"
        )
        if stats["n"] >= 2:
            line += (
                f"; per-seed differences sd {stats['sd']:.2f}, 95% confidence interval of the mean "
                f"[{stats['low']:+.2f}, {stats['high']:+.2f}]"
            )
        lines.append(line + ".")
    return "\n".join(lines)


def parity_summary_markdown(rows: list[dict], first: tuple[int, ...] = (3, 6, 12)) -> str:
    """What the full-split pairs say beyond the per-seed table, computed from them: accuracy over seeds in
    each precision, the balanced-accuracy difference, median run seconds, and the paired interval over the
    first n seeds (in seed order) next to the interval over all of them."""
    lines = [
        "| setting | seeds | accuracy fp32 % (mean ± sd) | accuracy bf16 % (mean ± sd) | "
        "balanced bf16 - fp32, points (mean, sd) | median run s fp32 | median run s bf16 | fp32 / bf16 run time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    running = []
    for name in PARITY_SETTINGS:
        mine = sorted((r for r in rows if r["setting"] == name), key=lambda r: r["seed"])
        if len(mine) < 2:
            continue
        acc = {p: [100 * r[f"acc_{p}"] for r in mine] for p in ("fp32", "bf16")}
        balanced = paired_difference([100 * (r["bal_bf16"] - r["bal_fp32"]) for r in mine])
        seconds = {p: statistics.median(r[f"seconds_{p}"] for r in mine) for p in ("fp32", "bf16")}
        lines.append(
            f"| {name} | {len(mine)} | {statistics.fmean(acc['fp32']):.1f} ± {statistics.stdev(acc['fp32']):.1f} | "
            f"{statistics.fmean(acc['bf16']):.1f} ± {statistics.stdev(acc['bf16']):.1f} | "
            f"{balanced['mean']:+.2f}, {balanced['sd']:.2f} | {seconds['fp32']:.1f} | {seconds['bf16']:.1f} | "
            f"{seconds['fp32'] / seconds['bf16']:.2f}x |"
        )
        differences = [100 * (r["acc_bf16"] - r["acc_fp32"]) for r in mine]
        for n in [n for n in first if n < len(mine)] + [len(mine)]:
            stats = paired_difference(differences[:n])
            fp32 = statistics.fmean(acc["fp32"][:n])
            running.append(
                f"| {name} | {'all' if n == len(mine) else 'first'} {n} (seeds {mine[0]['seed']}-{mine[n - 1]['seed']}) | "
                f"{stats['mean']:+.2f} | "
                f"[{stats['low']:+.2f}, {stats['high']:+.2f}] | {fp32:.1f} |"
            )
        rest = mine[max(n for n in first if n < len(mine)) :] if any(n < len(mine) for n in first) else []
        if rest:
            rest_differences = [100 * (r["acc_bf16"] - r["acc_fp32"]) for r in rest]
            running.append(
                f"| {name} | the rest (seeds {rest[0]['seed']}-{rest[-1]['seed']}) | "
                f"{statistics.fmean(rest_differences):+.2f} | per seed {min(rest_differences):+.1f} to "
                f"{max(rest_differences):+.1f} | {statistics.fmean(100 * r['acc_fp32'] for r in rest):.1f} |"
            )
    if not running:
        return "No pairs yet: run `python benchmarks/performance.py --sections parity-full`."
    return (
        "\n".join(lines)
        + "\n\nThe accuracy difference bf16 - fp32 over the first seeds only (paired 95% interval of the mean; "
        "seeds in the order they were trained):\n\n"
        + "| setting | seeds | mean bf16 - fp32, points | 95% interval | mean fp32 accuracy % |\n|---|---|---|---|---|\n"
        + "\n".join(running)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated, or a range like 3-11")
    parser.add_argument(
        "--processes", type=int, default=1, help="parity-full: pairs side by side in this many processes"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="parity-full: train only the seeds missing from benchmarks/data/parity_full_runs.json "
        "(without it, the asked seeds are trained again and replace their rows); either way "
        "the section is written from every pair in the file",
    )
    parser.add_argument(
        "--bench-from-stored", action="store_true", help="rewrite the bench section from bench_runs.json only"
    )
    parser.add_argument("--sections", default="bench,parity,profile", help=f"comma-separated, of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    seeds = parse_seeds(args.seeds)
    header = f"Produced by `python benchmarks/performance.py` on {today()}; machine: {machine()}."
    if args.bench_from_stored:
        write_section(BENCH_HEADING, bench_runs_markdown(json.loads(BENCH_RUNS.read_text())["runs"]), PERFORMANCE_MD)
        return
    if "bench" in sections:
        load = f"load average {os.getloadavg()[0]:.1f} at the start"
        result = run_bench_command()
        print(json.dumps(result), flush=True)
        runs = keep_bench_run(result, machine(), load)
        write_section(BENCH_HEADING, bench_runs_markdown(runs), PERFORMANCE_MD)
    if "parity" in sections:
        rows = precision_parity(seeds)
        write_section(
            "## bf16 autocast vs fp32 on ELPV",
            f"{header} Recipe: the meeting demo's (binary ELPV, 16 "
            "shots per class, 112 px, 20 epochs, batch 8, AdamW lr 1e-2); test = the stratified 25% "
            f"(656 images).\n\n{parity_markdown(rows)}",
            PERFORMANCE_MD,
        )
    if "profile" in sections:
        profiles = {p: profile_table(p) for p in ("bf16", "fp32")}
        write_section(
            "## Profile of one training step",
            f"{header} Standard configuration (dinov2_s14, 112 px, 10 "
            "deep prompts, batch 32), 3 steps after a warm-up, top operators by self CPU time.\n\n"
            + "\n\n".join(f"### {p}\n\n```\n{table}\n```" for p, table in profiles.items()),
            PERFORMANCE_MD,
        )
    if "profile-b8" in sections:
        profiles = {p: profile_table(p, batch=8, steps=10) for p in ("bf16", "fp32")}
        write_section(
            "## Profile of one training step at batch 8",
            f"{header} The few-shot recipe's step (dinov2_s14, 112 px, 10 deep prompts, batch 8, as the meeting "
            "demo trains), 10 steps after a warm-up, top operators by self CPU time; "
            f"load average {os.getloadavg()[0]:.1f} at the end.\n\n"
            + "\n\n".join(f"### {p}\n\n```\n{table}\n```" for p, table in profiles.items()),
            PERFORMANCE_MD,
        )
    if "parity-full" in sections:
        done = {(r["setting"], r["seed"]) for r in load_parity_runs()} if args.resume else set()
        missing = [seed for seed in seeds if any((name, seed) not in done for name in PARITY_SETTINGS)]
        precision_parity(missing, FULL_SPLIT, processes=args.processes, on_row=save_parity_run)
        rows = load_parity_runs()
        layouts = sorted(
            {
                f"{r.get('threads', '?')} thread(s) per run, {r.get('processes', '?')} process(es) side by side"
                for r in rows
            }
        )
        runs_note = (
            f" Runs: {'; '.join(layouts)}. The pairs may come from several invocations (threads, processes, "
            "commit and date of each in `benchmarks/data/parity_full_runs.json`); both precisions of a pair "
            "ran under the same conditions, so run seconds compare within a row."
        )
        write_section(
            "## bf16 autocast vs fp32 on ELPV, full training split",
            f"{header} Recipe: binary ELPV, "
            "the whole training split (1,706 images), 112 px, 5 epochs, batch 32, AdamW lr 1e-2; "
            f"test = the stratified 25% (656 images).{runs_note}\n\n{parity_markdown(rows)}",
            PERFORMANCE_MD,
        )
    if "parity-summary" in sections:  # no training: the pairs kept by parity-full
        rows = load_parity_runs()
        dates = sorted({r.get("date", "?") for r in rows})
        commits = sorted({r.get("commit", "?") for r in rows})
        write_section(
            "## bf16 vs fp32, full training split: the pairs summarised",
            f"Computed by `python benchmarks/performance.py --sections parity-summary` on {today()} from the "
            f"{len(rows)} pairs in `benchmarks/data/parity_full_runs.json` (no training here; the pairs were "
            f"trained on {', '.join(dates)} at commits {', '.join(commits)}, as the section above describes: "
            "run seconds are of runs side by side, so they compare the precisions, not machines).\n\n"
            f"{parity_summary_markdown(rows)}",
            PERFORMANCE_MD,
        )
    if "processes" in sections:  # --seeds numbers the rounds here
        runs = time_processes(seeds)
        write_section(
            "## Sweep throughput: one process or two",
            f"{header} The meeting sweep (`bench --sweep`'s workload: few-shot runs, latency measured first) "
            "end to end with one process using every thread, and with two processes splitting them "
            f"(`sweep --processes 2`), alternating. Timings: `benchmarks/data/sweep_processes.json`.\n\n"
            f"{processes_markdown(runs)}",
            PERFORMANCE_MD,
        )


def time_processes(rounds: list[int], path: Path = PROCESSES_RUNS) -> list[dict]:
    """The meeting sweep with 1 process (all threads) and with 2 (threads split), alternating so that any
    drift in the machine's load hits both alike; appended to `path` as each finishes."""
    runs = json.loads(path.read_text()) if path.exists() else []
    for round_ in rounds:
        for processes in (1, 2):
            seconds, _ = time_meeting_sweep(processes)
            row = {"round": round_, "processes": processes, "threads": torch.get_num_threads(), "seconds": seconds}
            print(json.dumps(row), flush=True)
            runs.append({**row, "commit": _git_commit(), "date": today(), "machine": machine()})
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(runs, indent=1) + "\n")
    return runs


def processes_markdown(runs: list[dict]) -> str:
    one = [r["seconds"] for r in runs if r["processes"] == 1]
    two = [r["seconds"] for r in runs if r["processes"] == 2]
    if not one or not two:
        return "No timings yet: run `python benchmarks/performance.py --sections processes`."
    ratios = [a / b for a, b in zip(one, two)]
    return (
        "| sweep | runs | median s | min s | max s |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {label} | {len(times)} | {statistics.median(times):.0f} | {min(times):.0f} | {max(times):.0f} |"
            for label, times in (("1 process, all threads", one), ("2 processes, threads split", two))
        )
        + f"\n\nThroughput of two processes over one: {statistics.median(one) / statistics.median(two):.2f}x "
        f"(ratio of medians; per alternating round {min(ratios):.2f}x to {max(ratios):.2f}x)."
    )


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            low, high = part.split("-", 1)
            seeds.extend(range(int(low), int(high) + 1))
        elif part:
            seeds.append(int(part))
    return seeds


if __name__ == "__main__":
    main()
