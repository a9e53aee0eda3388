"""The meeting demo as a presenter sees it: one press, with the Budget explorer open, timed.

    python benchmarks/meeting_demo.py --json          # one JSON line on stdout (progress on stderr)

Starts `streamlit run app.py` on a free port with a fresh VPTDASH_HOME (nothing cached: the first
press of a fresh install), waits until the worker the app starts has warmed up (as when the dashboard
is opened before a meeting), opens Home in headless Chromium (Debian's /usr/bin/chromium through
Playwright), presses "Run the meeting demo" (the app switches to the Budget explorer and stays there)
and waits until every run of the demo has finished. Prints:

  first_point_s      click -> the first demo run stored as done (a new point on the open chart)
  demo_complete_s    click -> the last demo run done
  runs               per run: its label, status, queue wait, and its phases from the run store:
                     setup (data, backbone, frozen encoding), train (training, validation and the
                     held-out evaluation, whose event marks its end), test (from that event to the cost
                     phase), cost (GMAC counts, latency) and the precision it trained in
  verdict            the Budget explorer's recommendation sentence as the browser shows it once the
                     demo is complete (quoted in docs/results.md by --write-docs)
  floor_s            the seconds the demo's arithmetic needs at this machine's best measured matmul peak
                     (FLOOR_CONVENTION below; the peak is vptdash.bench's, measured before the server
                     starts), with its split in `floor` and per run as each run's `floor_s`
  efficiency_vs_floor floor_s / demo_complete_s: how far the demo is from what this CPU can do at all
  warm_up_s          how long the worker's warm-up took before the press (its log's "warmed up in")
  machine            CPU model, the flags that decide bf16 speed, threads, load average at the start

Targets (2 cores): first point within 15 s, demo complete within 60 s. Timings are only comparable
side by side on one machine in one run: this script records the machine and the load with them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_section  # noqa: E402
from tests.browser_support import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    free_port,
    start_server,
    stop_all,
    wait_healthy,
    wait_idle,
)
from vptdash.bench import matmul_peak_gflops  # noqa: E402
from vptdash.engine.precision import cpu_description, machine_override  # noqa: E402
from vptdash.engine.train import RunConfig  # noqa: E402
from vptdash.runs import worker  # noqa: E402
from vptdash.runs.floor import CONVENTION, run_work, runs_floor  # noqa: E402
from vptdash.runs.store import RunStore  # noqa: E402

PHASES = ("setup", "train", "test", "cost")
ROOT = Path(__file__).resolve().parent.parent
PERFORMANCE_MD = ROOT / "docs" / "performance.md"
RESULTS_MD = ROOT / "docs" / "results.md"
DATA = ROOT / "benchmarks" / "data" / "meeting_demo.json"


def phase_split(run: dict, events: list[dict]) -> dict:
    """Seconds per phase of one stored run, from its progress events' elapsed times and its finish time.

    A phase lasts from its first event to the next phase's first event; the last phase ends when the
    run was stored as finished. "val" events count as training (validation runs inside the epochs)."""
    starts: dict[str, float] = {}
    for event in events:
        phase = "train" if event.get("phase") == "val" else event.get("phase")
        if phase in PHASES and phase not in starts and event.get("elapsed_s") is not None:
            starts[phase] = float(event["elapsed_s"])
    total = None
    if run.get("finished_at") and run.get("started_at"):
        total = float(run["finished_at"]) - float(run["started_at"])
    ordered = sorted(starts.items(), key=lambda item: item[1])
    split = {}
    for index, (phase, start) in enumerate(ordered):
        end = ordered[index + 1][1] if index + 1 < len(ordered) else total
        split[f"{phase}_s"] = None if end is None else round(max(0.0, end - start), 2)
    return split


# The floor's convention, and what it means for the demo: the warm worker encodes the probe's features
# before the press.
FLOOR_CONVENTION = (
    CONVENTION + "; the warm worker encodes the probe's features before the press, so the press itself needs "
    "floor_s - floor.encode_s"
)


def warm_up_seconds(log: str) -> float | None:
    """The warm worker's own "warmed up in X s" line; None when it has not finished (or was skipped)."""
    found = re.search(r"warmed up in ([0-9.]+) s", log)
    return float(found.group(1)) if found else None


def read_verdict(page, timeout_s: float = 30.0) -> str | None:
    """The recommendation sentence the open Budget explorer shows once the last run is in: its page
    redraws when the store changes, so wait for the sentence to appear and settle."""
    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        alerts = page.locator('[data-testid="stAlertContentSuccess"]')
        text = alerts.first.inner_text().strip() if alerts.count() else None
        if text:  # the alert's icon is a line of its own
            text = " ".join(line.strip() for line in text.splitlines() if line.strip() and line.strip()[0].isalnum())
        if text and text == last:
            return text
        last = text
        page.wait_for_timeout(2000)
    return last


def demo_runs(store: RunStore, after: float) -> list[dict]:
    return [run for run in store.list_runs() if run["created_at"] >= after and run["source"] == "live"]


def measure(timeout_s: float, width: int = 1600, height: int = 1000, *, keep_home: bool = False) -> dict:
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only this script needs a browser

    home = Path(tempfile.mkdtemp(prefix="vptdash-demo-"))
    port = free_port()
    machine = {
        **cpu_description(),
        "load_average": os.getloadavg(),
        "cores": os.cpu_count(),
        "precision_setting": machine_override() or "auto",  # VPTDASH_PRECISION, which the server inherits
        "worker_lanes": worker.default_lanes(),  # runs side by side in the dashboard's worker (runs.lanes)
    }
    # The engine's own peak measurement (`python -m vptdash bench`), before the server starts: the floor
    # is the demo's arithmetic at the better of the two.
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    print(f"matmul peaks: fp32 {peaks['fp32']:.1f}, bf16 {peaks['bf16']:.1f} GFLOP/s", file=sys.stderr, flush=True)
    server = start_server(home, port, home / "streamlit.log")
    try:
        wait_healthy(port, server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"http://127.0.0.1:{port}/")
            wait_idle(page, timeout_ms=120_000)
            store = RunStore(home / "data" / "runs.sqlite")
            # As in a meeting, the dashboard is open before the press: its worker has had time to warm up
            # (ui.jobqueue starts one that loads the demo's backbone and images, then waits).
            # It now also counts and times the demo's runs: give it longer than the minute it used to take.
            warm_log = worker.log_path(store)
            deadline = time.time() + 300
            while time.time() < deadline and "warmed up in" not in (
                warm_log.read_text(errors="replace") if warm_log.exists() else ""
            ):
                page.wait_for_timeout(500)
            warm_up_s = warm_up_seconds(warm_log.read_text(errors="replace") if warm_log.exists() else "")
            print(f"worker warm-up: {warm_up_s} s", file=sys.stderr, flush=True)
            before = time.time()
            page.get_by_role("button", name="Run the meeting demo").click()
            clicked = time.time()
            first_done = complete = None
            while time.time() - clicked < timeout_s:
                runs = demo_runs(store, before)
                finished = [r for r in runs if r["status"] in ("done", "failed", "cancelled")]
                done = [r for r in runs if r["status"] == "done"]
                if done and first_done is None:
                    first_done = min(float(r["finished_at"]) for r in done) - clicked
                    print(f"first point after {first_done:.1f} s", file=sys.stderr, flush=True)
                if runs and len(finished) == len(runs):
                    complete = max(float(r["finished_at"]) for r in finished) - clicked
                    break
                page.wait_for_timeout(200)  # the page keeps polling the store, as in a meeting
            verdict = read_verdict(page) if complete is not None else None
            browser.close()
        rows, works = [], []
        for run in sorted(demo_runs(store, before), key=lambda r: r["id"]):
            events = store.progress(run["id"])
            costs = run.get("costs") or {}
            work = run_work(run, events) if run["status"] == "done" else None
            works.append(work)
            rows.append(
                {
                    "id": run["id"],
                    "label": RunConfig.from_dict(run["config"] or {}).label(),
                    "status": run["status"],
                    "queue_wait_s": round(float(run["started_at"]) - float(run["created_at"]), 2)
                    if run.get("started_at")
                    else None,
                    "precision": (run.get("metrics") or {}).get("precision") or (run["config"] or {}).get("precision"),
                    **phase_split(run, events),
                    "gmacs_cached": costs.get("gmacs_cached"),
                    "latency_cached": costs.get("latency_cached"),
                    **({} if work is None else work),
                }
            )
    finally:
        stop_all(server, home)
        if keep_home:
            print(f"data dir kept: {home}", file=sys.stderr, flush=True)
        else:  # a fresh home holds its own copy of the weights and decoded images (about 180 MB)
            shutil.rmtree(home, ignore_errors=True)
    floor = None
    if complete is not None and works and all(work is not None for work in works):
        floor = runs_floor(works, peaks["fp32"], peaks["bf16"], precision=machine_override())
        for row, seconds in zip(rows, floor.pop("per_run_s")):
            row["floor_s"] = round(seconds, 2)
        floor = {key: round(value, 2) if isinstance(value, float) else value for key, value in floor.items()}
    return {
        "first_point_s": None if first_done is None else round(first_done, 1),
        "demo_complete_s": None if complete is None else round(complete, 1),
        "floor_s": None if floor is None else floor["floor_s"],
        "efficiency_vs_floor": None if floor is None else round(floor["floor_s"] / complete, 3),
        "floor": floor,
        "floor_convention": FLOOR_CONVENTION,
        "warm_up_s": warm_up_s,
        "runs": rows,
        "verdict": verdict,
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


HEADING = "## The meeting demo, one press in a real browser"


def section(result: dict) -> str:
    """docs/performance.md's section for one measurement (targets: first point 15 s, complete 60 s)."""
    m = result["machine"]
    load = ", ".join(f"{x:.1f}" for x in m["load_average"])
    lines = [
        f"`python benchmarks/meeting_demo.py --json --write-docs` ({result['date']}; {m['cpu']}, {m['cores']} cores, "
        f"{m['threads']} threads, flags {' '.join(m['flags']) or 'none'}, torch {m['torch']}, load average {load} "
        "at the start"
        + (f"; {result['note']}" if result.get("note") else "")
        + "). Fresh data dir, the dashboard open until its worker had warmed up (as before a meeting"
        + (f"; its warm-up took {result['warm_up_s']} s" if result.get("warm_up_s") is not None else "")
        + "), then one press, the Budget explorer open in headless Chromium.",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        f"| click -> first new point | {result['first_point_s']} s | 15 s |",
        f"| click -> demo complete | {result['demo_complete_s']} s | 60 s |",
    ]
    floor = result.get("floor")  # absent from results measured before the floor was added
    if floor:
        lines += [
            f"| compute floor: the demo's arithmetic at this CPU's best matmul peak | {result['floor_s']} s "
            f"(training {floor['train_s']}, evaluation {floor['eval_s']}, probe encoding {floor['encode_s']}, which the "
            "warm worker does before the press) | |",
            f"| efficiency vs the floor (floor / complete) | {result['efficiency_vs_floor']} | |",
        ]
    lines += [
        "",
        "| run | precision | queue wait, s | setup, s | train (incl. validation and test), s | cost, s | floor, s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['label']} | {run['precision']} | {run['queue_wait_s']} | {run.get('setup_s')} | "
            f"{run.get('train_s')} | {run.get('cost_s')} | {run.get('floor_s')} |"
        )
    if floor:
        lines += [
            "",
            f"The floor's peak: {floor['peak_gflops']} GFLOP/s ({floor['peak_precision']}; fp32 "
            f"{floor['peak_gflops_fp32']}, bf16 {floor['peak_gflops_bf16']}: `vptdash.bench.matmul_peak_gflops`, "
            f"square 2048 matmuls, measured just before the server started); {floor['gmacs_total']} GMACs in all. "
            f"Convention: {result['floor_convention']}.",
        ]
    return "\n".join(lines)


def machine_kind(result: dict) -> str:
    """Which kind of machine a result stands for: the CPU model, what its bf16 speed depends on, and the
    precision the machine was set to (an AMX Xeon set to fp32 stands in for a CPU without fast bf16)."""
    m = result["machine"]
    flags = set(m.get("flags") or [])
    bf16 = "AMX" if any(f.startswith("amx") for f in flags) else "avx512_bf16" if "avx512_bf16" in flags else "no bf16"
    setting = m.get("precision_setting") or "auto"
    return f"{m['cpu']}, {bf16}" + ("" if setting == "auto" else f", VPTDASH_PRECISION={setting}")


def stored_results(path: Path = DATA) -> list[dict]:
    """The latest result on each kind of machine (files written before there were several: one result)."""
    if not path.is_file():
        return []
    value = json.loads(path.read_text())
    return value["results"] if "results" in value else [value]


def keep_result(result: dict, path: Path = DATA) -> list[dict]:
    """Add `result` to the stored ones, replacing the earlier result of the same kind of machine."""
    results = [r for r in stored_results(path) if machine_kind(r) != machine_kind(result)] + [result]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}, indent=1))
    return results


def sections(results: list[dict]) -> str:
    """One summary row per figure with a column per kind of machine, then each measurement in full."""
    head = " | ".join(f"({i}) {machine_kind(r)}" for i, r in enumerate(results, 1))

    def row(name: str, key: str, unit: str = "", target: str = "") -> str:
        cells = " | ".join("" if r.get(key) is None else f"{r[key]}{unit}" for r in results)
        return f"| {name} | {cells} | {target} |"

    lines = [
        "The latest measurement on each kind of machine (`benchmarks/data/meeting_demo.json`); timings compare "
        "only within a column.",
        "",
        f"| figure | {head} | target |",
        "|---|" + "---|" * len(results) + "---|",
        row("click -> first new point", "first_point_s", " s", "15 s"),
        row("click -> demo complete", "demo_complete_s", " s", "60 s"),
        row("compute floor", "floor_s", " s"),
        row("efficiency vs the floor", "efficiency_vs_floor"),
        row("worker warm-up before the press", "warm_up_s", " s"),
        "| runs side by side in the worker | "
        + " | ".join(str(r["machine"].get("worker_lanes") or "1 (before the second lane existed)") for r in results)
        + " | |",
    ]
    for index, result in enumerate(results, 1):
        lines += ["", f"### ({index}) {machine_kind(result)}", "", section(result)]
    return "\n".join(lines)


VERDICT_HEADING = "## The meeting demo's verdict, one press in a real browser"


def verdict_section(result: dict) -> str:
    """docs/results.md's quote of what the Budget explorer said after the demo (one seed: the intervals are
    the paired bootstrap over the 656 test images)."""
    m = result["machine"]
    runs = ", ".join(f"{run['label']} ({run['status']})" for run in result["runs"])
    verdict = result.get("verdict")
    quote = f"> {verdict}" if verdict else "> (no sentence: the demo did not complete within the timeout)"
    return "\n".join(
        [
            f"`python benchmarks/meeting_demo.py --json --write-docs` ({result['date']}; {m['cpu']}, "
            f'{m["cores"]} cores): a fresh data dir, one press of "Run the meeting demo" in headless Chromium '
            f"({runs}); the Budget explorer's sentence once the last run was in, as the browser showed it:",
            "",
            quote,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line (the default prints it too)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the demo to finish")
    parser.add_argument("--write-docs", action="store_true", help="write its section of docs/performance.md")
    parser.add_argument("--note", help="what else the machine was doing, stated with the result")
    parser.add_argument(
        "--keep-home", action="store_true", help="keep the fresh data dir (its run store and worker log) afterwards"
    )
    parser.add_argument(
        "--from", dest="from_file", type=Path, help="a JSON result (the script's output) instead of measuring"
    )
    args = parser.parse_args(argv)
    if args.from_file:  # a result as stored, or the script's printed output (its last line)
        text = args.from_file.read_text().strip()
        try:
            result = json.loads(text)
        except ValueError:
            result = json.loads(text.splitlines()[-1])
    else:
        result = measure(args.timeout, keep_home=args.keep_home)
    if args.note:
        result["note"] = args.note
    if args.write_docs:
        write_section(HEADING, sections(keep_result(result)), PERFORMANCE_MD)
        write_section(VERDICT_HEADING, verdict_section(result), RESULTS_MD)
    print(json.dumps(result))
    return 0 if result["demo_complete_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
