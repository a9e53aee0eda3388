"""Driving the real app in a real browser: shared by the end-to-end test (tests/test_browser.py) and
the README screenshots (benchmarks/screenshots.py).

Starts `streamlit run app.py` on a free port with its own VPTDASH_HOME, waits for the health
endpoint, and stops the server and the detached background workers it started. The browser is
Debian's Chromium (/usr/bin/chromium; browsers cannot be downloaded here) through Playwright.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def sigint_as_at_a_terminal() -> None:
    """In a child about to exec: SIGINT back to its default. A shell starting a command in the background
    (CI may) has it ignored, and Python then installs no Ctrl-C handler: the Ctrl-C a test sends would
    do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(home: Path, port: int, log_path: Path, *, root: Path = ROOT, **env_extra: str) -> subprocess.Popen:
    """`streamlit run app.py` of the checkout `root` in its own process group (so that stopping it stops its
    children)."""
    env = {**os.environ, "VPTDASH_HOME": str(home), "PYTHONPATH": str(root), **env_extra}
    with open(log_path, "wb") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                "app.py",
                "--server.headless",
                "true",
                "--server.port",
                str(port),
                "--browser.gatherUsageStats",
                "false",
                "--server.fileWatcherType",
                "none",
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=sigint_as_at_a_terminal,
        )


def wait_healthy(port: int, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply:
                if reply.read().decode().strip() == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError("the streamlit server did not become healthy")


def kill_group(pid: int) -> None:
    """SIGTERM the process group, wait up to 5 s, then SIGKILL."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    for _ in range(50):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def worker_pids(home: Path) -> set[int]:
    """Workers of the store under `home`: every pid recorded on a run (workers run in their own session)."""
    store_path = home / "data" / "runs.sqlite"
    if not store_path.exists():
        return set()
    sys.path.insert(0, str(ROOT))
    from vptdash.runs.store import RunStore

    return {run["worker_pid"] for run in RunStore(store_path).list_runs() if run["worker_pid"]}


def stop_all(server: subprocess.Popen, home: Path) -> None:
    """Stop the server and the detached workers it started for `home` (they follow the server and end
    on their own within seconds; this is for a test that failed half-way)."""
    kill_group(server.pid)
    for pid in worker_pids(home):
        kill_group(pid)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


LOCAL_PREFIXES = ("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:", "about:")


def guard_offline(context) -> list[str]:
    """Abort every request of a browser context that would leave 127.0.0.1, and record it: the app
    must work with no network, so a test asserts the returned list stays empty."""
    outside: list[str] = []

    def route(route_) -> None:
        url = route_.request.url
        if url.startswith(LOCAL_PREFIXES):
            route_.continue_()
        else:
            outside.append(url)
            route_.abort()

    context.route("**/*", route)
    context.on(
        "request", lambda request: None if request.url.startswith(LOCAL_PREFIXES) else outside.append(request.url)
    )
    return outside


def stop_server(server: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
    """Stop the server as a user does (Ctrl-C sends SIGINT to its process group) and reap it."""
    try:
        os.killpg(server.pid, sig)
    except ProcessLookupError:
        return
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(server.pid)
        server.wait(timeout=10)


def wait_idle(page, timeout_ms: int = 60_000, settle_ms: int = 0) -> None:
    page.wait_for_timeout(300)  # let a rerun that was just triggered start
    page.wait_for_selector(IDLE, timeout=timeout_ms)
    if settle_ms:
        page.wait_for_timeout(settle_ms)  # let charts finish drawing


def open_page(page, link: str, settle_ms: int = 0) -> None:
    """Click a page in the app's sidebar navigation and wait until it has rendered."""
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name=link, exact=True).click()
    wait_idle(page, settle_ms=settle_ms)


def train_on_tiny_backbone(page, settle_ms: int = 0) -> None:
    """On the Train page, like a user: the tiny random backbone at the smallest resolution (32 px)."""
    open_page(page, "Train", settle_ms)
    page.locator(".st-key-train_backbone [role='combobox']").click()
    page.get_by_role("option", name="tiny-random", exact=False).click()
    wait_idle(page, settle_ms=settle_ms)
    page.locator(".st-key-train_resolution input[type='range']").focus()
    page.keyboard.press("Home")
    wait_idle(page, settle_ms=settle_ms)
