"""What the open dashboard costs the machine: CPU seconds per minute of the Streamlit server (and of
the headless browser showing it) with the Budget explorer open, (a) idle and (b) while a job writes
progress.

    python benchmarks/ui_idle_cost.py --json            # one JSON line on stdout (progress on stderr)
    python benchmarks/ui_idle_cost.py --window 60 --app-root /path/to/other/checkout --app-root .

With several --app-root (checkouts of the app, e.g. before and after a change) each is measured in
turn in the same invocation, so the figures compare side by side under the same load.

Starts `streamlit run app.py` on a free port with a fresh VPTDASH_HOME (the shipped reference sweep
gives the page its points), opens the Budget explorer in headless Chromium (Playwright, Debian's
/usr/bin/chromium) and reads the server's utime + stime from /proc/<pid>/stat around each window.
The "busy" window stands in for a worker without using the cores itself: this process creates a run
marked running under its own pid and appends a training event every 0.5 s (the rate at which
`jobs.ProgressWriter` thins steps), so the measured CPU is the page's, not training's. The page is
reloaded after the run appears, as the click that queues a job reruns the page. The load average is
recorded before and after each window: timings compare only side by side on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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
from vptdash.engine.train import RunConfig  # noqa: E402
from vptdash.runs.store import RunStore  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PERFORMANCE_MD = ROOT / "docs" / "performance.md"
HEADING = "## The open dashboard's own cost: Budget explorer idle and busy"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def descendants(root: int) -> set[int]:
    """Every live process below `root` (the browser Playwright started for this script)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def group_cpu(pids: set[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            pass
    return out


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def start_app(root: Path, home: Path, port: int) -> subprocess.Popen:
    """`streamlit run app.py` from the checkout `root` (its own code, its own VPTDASH_HOME)."""
    return start_server(home, port, home / "server.log", root=root)


def window(server_pid: int, window_s: float, page, frames: list[int]) -> dict:
    """CPU seconds per minute of the server and of this script's other children (the browser)."""
    others = descendants(os.getpid()) - {server_pid} - descendants(server_pid)
    load_before = loadavg()
    server0, others0, t0, frames0 = cpu_seconds(server_pid), group_cpu(others), time.monotonic(), list(frames)
    page.wait_for_timeout(window_s * 1000)  # keeps Playwright's event loop serving the page
    server1, others1, t1 = cpu_seconds(server_pid), group_cpu(others), time.monotonic()
    minutes = (t1 - t0) / 60
    browser = sum(others1[p] - others0[p] for p in others1 if p in others0)
    return {
        "server_cpu_s_per_min": round((server1 - server0) / minutes, 2),
        "browser_cpu_s_per_min": round(browser / minutes, 2),
        "window_s": round(t1 - t0, 1),
        # websocket messages: browser -> server (rerun requests), server -> browser (deltas drawn)
        "frames_sent_per_min": round((frames[0] - frames0[0]) / minutes, 1),
        "frames_received_per_min": round((frames[1] - frames0[1]) / minutes, 1),
        "load_before": load_before,
        "load_after": loadavg(),
    }


def fake_progress(store: RunStore, run_id: int, stop: threading.Event) -> int:
    """Append a training event every 0.5 s until `stop` is set; the number written."""
    step, started = 0, time.monotonic()
    while not stop.wait(0.5):
        step += 1
        store.append_progress(
            run_id,
            {
                "phase": "train",
                "step": step,
                "total_steps": 100_000,
                "epoch": 1 + step // 100,
                "loss": 1.0 / step,
                "lr": 0.01,
                "elapsed_s": time.monotonic() - started,
                "eta_s": 0.5 * (100_000 - step),
            },
        )
    return step


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        os.uname().machine,
    )
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "load_at_start": loadavg()}


def measure(root: Path, window_s: float, settle_s: float, sync_playwright) -> dict:
    """Idle and busy windows for the app at `root`, on a fresh data dir."""
    home = Path(tempfile.mkdtemp(prefix="vptdash-uicost-"))
    port = free_port()
    server = start_app(root, home, port)
    result: dict = {}
    try:
        wait_healthy(port, server, timeout=120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            frames = [0, 0]

            def on_socket(socket) -> None:
                socket.on("framesent", lambda _: frames.__setitem__(0, frames[0] + 1))
                socket.on("framereceived", lambda _: frames.__setitem__(1, frames[1] + 1))

            page.on("websocket", on_socket)
            page.goto(f"http://127.0.0.1:{port}/budget", timeout=180_000)
            wait_idle(page, timeout_ms=180_000)
            page.wait_for_selector("[data-testid='stPlotlyChart']", timeout=180_000)
            page.wait_for_timeout(settle_s * 1000)
            print("measuring idle", file=sys.stderr)
            result["idle"] = window(server.pid, window_s, page, frames)

            store = RunStore(home / "data" / "runs.sqlite")
            run_id = store.create_run(RunConfig(dataset="elpv-binary").to_dict(), status="running")
            stop = threading.Event()
            writer = threading.Thread(target=fake_progress, args=(store, run_id, stop), daemon=True)
            writer.start()
            page.reload()  # as the click that queued the job reruns the page
            wait_idle(page, timeout_ms=180_000)
            page.wait_for_timeout(settle_s * 1000)
            print("measuring busy", file=sys.stderr)
            result["busy"] = window(server.pid, window_s, page, frames)
            stop.set()
            writer.join()
            store.finish_run(run_id, "cancelled", error="cancelled: benchmark finished")
            result["busy"]["progress_events"] = len(store.progress(run_id))
            browser.close()
    finally:
        stop_all(server, home)
    return result


def version_of(root: Path) -> str:
    """The checkout's commit (and "+ changes" when its tree differs from it)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    return commit + (" + changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def section(result: dict) -> str:
    """The Markdown section: one row per app and window, the machine and load with them."""
    machine = result["machine"]
    lines = [
        f"`python benchmarks/ui_idle_cost.py --write` on {machine['cpu']}, {machine['cores']} cores, "
        f"load average {machine['load_at_start'][0]:.2f} at the start (others' jobs share the machine: compare "
        f"rows only within this table). {result['windows_s']:.0f} s windows with the Budget explorer open in "
        "headless Chromium; busy = a run marked running with a training event every 0.5 s (no training "
        "itself). CPU seconds per minute (60 = one core all the time); websocket messages per minute.",
        "",
        "| app | window | server CPU s/min | browser CPU s/min | browser -> server msgs/min "
        "| server -> browser msgs/min | load before -> after |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for figures in result["apps"].values():
        for name in ("idle", "busy"):
            w = figures[name]
            lines.append(
                f"| {figures['version']} | {name} | {w['server_cpu_s_per_min']:.2f} | {w['browser_cpu_s_per_min']:.2f} "
                f"| {w['frames_sent_per_min']:.1f} | {w['frames_received_per_min']:.1f} "
                f"| {w['load_before'][0]:.2f} -> {w['load_after'][0]:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=60.0, help="seconds per measured window")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds after loading before measuring")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    parser.add_argument("--app-root", action="append", help="a checkout of the app to measure (repeatable)")
    parser.add_argument("--write", action="store_true", help=f"write the table to docs/performance.md ({HEADING})")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only this script needs a browser

    roots = [Path(r).resolve() for r in (args.app_root or [str(ROOT)])]
    result: dict = {"machine": machine(), "windows_s": args.window, "apps": {}}
    for root in roots:
        print(f"app at {root}", file=sys.stderr)
        result["apps"][str(root)] = {
            "version": version_of(root),
            **measure(root, args.window, args.settle, sync_playwright),
        }
    if args.write:
        write_section(HEADING, section(result), PERFORMANCE_MD)
    if args.json:
        print(json.dumps(result))
    else:
        for root, figures in result["apps"].items():
            for name in ("idle", "busy"):
                print(root, name, figures[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
