"""The dashboard's background worker: one process, one job at a time, a queue behind it.

Training inside the Streamlit script would die with every rerun, so the app only queues runs in the
store and makes sure this worker is alive. The worker survives reruns, page switches and closed tabs,
and every tab sees the same queue because the queue *is* the run store. One worker per data dir,
held by an exclusive file lock: a second `ensure_worker` from another tab finds it and does nothing.

The worker lives in its own session (Ctrl-C on the dashboard does not reach it), so it follows an
owner instead: `ensure_worker` writes the calling process's pid (the Streamlit server) to an owner
file next to the lock, and a worker started by it exits within seconds of that process ending,
cancelling the job it was running. A new server that finds a worker still alive writes its own pid
there and so adopts it (`adopt`).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from vptdash.runs.jobs import execute_run
from vptdash.runs.store import RunStore

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `vptdash/`, for `python -m vptdash`

POLL_SECONDS = 0.5
OWNER_POLL_SECONDS = 1.0
CANCEL_GRACE_SECONDS = 10.0  # after its owner ended: how long a cancelled job may take to stop


def lock_path(store: RunStore) -> Path:
    return Path(store.path).with_suffix(".worker.lock")


def log_path(store: RunStore) -> Path:
    return Path(store.path).with_suffix(".worker.log")


def owner_path(store: RunStore) -> Path:
    return Path(store.path).with_suffix(".worker.owner")


def set_owner(store: RunStore, pid: int | None = None) -> None:
    """Record `pid` (default: this process) as the process a dashboard-started worker follows."""
    path = owner_path(store)
    scratch = path.with_suffix(f".tmp{os.getpid()}")
    scratch.write_text(str(pid or os.getpid()))
    scratch.replace(path)  # atomic: a worker never reads half a pid


def read_owner(store: RunStore) -> int | None:
    try:
        return int(owner_path(store).read_text().strip())
    except (OSError, ValueError):
        return None


def process_alive(pid: int | None) -> bool:
    """True if `pid` runs and is not a zombie (a stopped server not yet reaped by its parent)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we know
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def owner_alive(store: RunStore) -> bool:
    return process_alive(read_owner(store))


def try_lock(path: Path):
    """The open lock file if we now hold the worker lock, else None."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def worker_alive(store: RunStore) -> bool:
    handle = try_lock(lock_path(store))
    if handle is None:
        return True
    handle.close()  # closing releases the lock we just took for the check
    return False


def _watch_owner(store: RunStore, current: dict, gone: threading.Event) -> None:
    """Thread: once the owner has ended, cancel the running job; if it has not stopped after
    CANCEL_GRACE_SECONDS, end the process (its run is then failed as orphaned by the next worker)."""
    while owner_alive(store):
        time.sleep(OWNER_POLL_SECONDS)
    gone.set()
    run_id = current.get("run_id")
    if run_id is not None:
        try:
            store.request_cancel(run_id)
        except (KeyError, OSError):
            pass
    time.sleep(CANCEL_GRACE_SECONDS)
    os._exit(0)


def serve(
    store: RunStore,
    *,
    idle_exit_s: float | None = None,
    poll_s: float = POLL_SECONDS,
    follow_owner: bool = False,
) -> int:
    """Run queued jobs until idle for `idle_exit_s` (forever when None) or, with `follow_owner`,
    until the process in the owner file has ended. Returns an exit code."""
    handle = try_lock(lock_path(store))
    if handle is None:
        print("another worker already serves this run store", file=sys.stderr)
        return 0
    current: dict = {}
    gone = threading.Event()
    if follow_owner:
        threading.Thread(target=_watch_owner, args=(store, current, gone), daemon=True).start()
    try:
        # A run left 'running' by a worker that was killed can never finish: mark it failed now.
        store.fail_orphaned_runs()
        idle_since = time.monotonic()
        while not gone.is_set():
            job = store.claim_next_queued(worker_pid=os.getpid())
            if job is None:
                if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    return 0
                time.sleep(poll_s)
                continue
            current["run_id"] = job["id"]
            if gone.is_set():  # the owner ended between the claim and here
                store.request_cancel(job["id"])
            execute_run(store, job["id"])
            current.pop("run_id", None)
            idle_since = time.monotonic()
        return 0
    finally:
        handle.close()


def adopt(store: RunStore) -> bool:
    """A dashboard starting up: if a worker from an earlier server still serves this store, make
    this process its owner (it would otherwise exit with the old server). True if one was adopted."""
    if not worker_alive(store):
        return False
    set_owner(store)
    return True


def ensure_worker(store: RunStore, *, idle_exit_s: float | None = 600.0, owner_pid: int | None = None) -> bool:
    """Start a detached worker process unless one is already serving this store.

    Returns True when a new worker was started. The worker exits after `idle_exit_s` without work,
    or within seconds of this process ending, so nothing lingers after a meeting; the app starts it
    again on the next queued run. A worker already running is adopted: it follows this process now."""
    store.fail_orphaned_runs()
    set_owner(store, owner_pid)
    if worker_alive(store):
        return False
    command = [sys.executable, "-m", "vptdash", "worker", "--store", str(store.path), "--follow-owner"]
    if idle_exit_s is not None:
        command += ["--idle-exit", str(idle_exit_s)]
    log = open(log_path(store), "ab")
    package_root = str(PACKAGE_ROOT)
    env = {**os.environ, "PYTHONPATH": package_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.Popen(
        command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=package_root
    )
    log.close()
    return True
