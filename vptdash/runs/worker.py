"""The dashboard's background worker: one process, a queue behind it.

Training inside the Streamlit script would die with every rerun, so the app only queues runs in the
store and makes sure this worker is alive. The worker survives reruns, page switches and closed tabs,
and every tab sees the same queue because the queue *is* the run store. One worker per data dir,
held by an exclusive file lock: a second `ensure_worker` from another tab finds it and does nothing.

The worker lives in its own session (Ctrl-C on the dashboard does not reach it), so it follows an
owner instead: `ensure_worker` writes the calling process's pid (the Streamlit server) to an owner
file next to the lock, and a worker it started exits within seconds of that process ending; the run
it was executing is stored as cancelled, queued runs stay queued. A server that finds a worker still
alive writes its own pid there and so adopts it (`adopt`).

With `lanes=2` (the dashboard's worker on a machine with two cores or more) it runs two queued runs side
by side, one in this process and one in a helper process, with the cores split between them
(`runs.lanes`: why, and what was measured); a run alone gets every core.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vptdash.engine import train
from vptdash.engine.cost import latency_threads
from vptdash.engine.train import RunConfig
from vptdash.runs import cluster
from vptdash.runs.jobs import execute_run
from vptdash.runs.lanes import HELPER_KINDS, HelperLane
from vptdash.runs.store import RunStore

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `vptdash/`, for `python -m vptdash`

POLL_SECONDS = 0.5
HELPER_WARM_TIMEOUT_S = 120.0
OWNER_POLL_SECONDS = 1.0
STOPPED_WITH_OWNER = "stopped: the dashboard that started this worker ended"
# How much lower than the process that started it a worker runs: the dashboard's server (and whoever
# else shares the machine) gets the cores first, so a page stays responsive while a job trains, and the
# worker still has every core the moment nobody else wants them.
WORKER_NICENESS = 5


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
    """True if `pid` runs and is not a zombie (a stopped server its parent has not reaped yet)."""
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
    if stat.rsplit(")", 1)[-1].split()[0] != "Z":
        return True
    # A zombie main thread whose other threads (torch's pool) are still exiting: the process still holds
    # its files, the worker's lock among them, until the last one is gone.
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def owner_alive(store: RunStore) -> bool:
    return process_alive(read_owner(store))


def follow_owner(store: RunStore) -> threading.Thread:
    """A daemon thread that ends this process once the owner in the owner file has ended: the run this
    process is executing is stored as cancelled first (queued runs stay queued for the next start)."""

    def watch() -> None:
        while owner_alive(store):
            time.sleep(OWNER_POLL_SECONDS)
        try:
            for run in store.list_runs(status="running"):
                if run["worker_pid"] == os.getpid():
                    store.finish_run(run["id"], "cancelled", error=STOPPED_WITH_OWNER)
        finally:
            os._exit(0)  # now, not after the job: the server is gone and nobody watches this run

    thread = threading.Thread(target=watch, name="follow-owner", daemon=True)
    thread.start()
    return thread


def adopt(store: RunStore) -> bool:
    """A dashboard starting up: if a worker from an earlier server still serves this store, make
    this process its owner (it would otherwise exit with the old server). True if one was adopted."""
    if not worker_alive(store):
        return False
    set_owner(store)
    return True


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


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container or `taskset` can give it fewer
    than the machine has)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int = 1, cores: int | None = None) -> int:
    """torch threads for each of `workers` processes sharing `cores`: all of them for one worker, an
    even split (at least one each) for several, so they do not oversubscribe the cores."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, workers))


def yield_to_ui(workers: int = 1, *, threads: int | None = None, niceness: int = WORKER_NICENESS) -> dict:
    """Make this process a background worker: `niceness` lower priority than it started with, and
    torch's threads set to `threads`, by default its share of the available cores among `workers`.
    Call it once, in the worker process itself. Returns {"nice", "threads"} as they now are."""
    try:
        os.nice(niceness)
    except OSError:  # not permitted here: run at the priority we have
        pass
    torch.set_num_threads(threads or threads_per_worker(workers))
    return {"nice": os.nice(0), "threads": torch.get_num_threads()}


def default_lanes(cores: int | None = None) -> int:
    """Runs side by side for the dashboard's worker: two from two cores on, else one."""
    return 2 if (available_cores() if cores is None else cores) >= 2 else 1


def serve(
    store: RunStore,
    *,
    idle_exit_s: float | None = None,
    poll_s: float = POLL_SECONDS,
    owner: bool = False,
    warm: Callable[[], bool | None] | None = None,
    lanes: int = 1,
) -> int:
    """Run queued jobs until idle for `idle_exit_s` (forever when None), and with `owner` until the
    process in the owner file ends (`follow_owner`). `warm` runs once before the first job (loading what
    the likely first job needs; it returns False when it stopped early for a waiting job); if it fails,
    one line says so and the worker serves as usual. `lanes=2`: two runs side by side when two are
    queued (`runs.lanes`). Returns an exit code."""
    if lanes not in (1, 2):
        raise ValueError(f"lanes must be 1 or 2, got {lanes}")
    handle = try_lock(lock_path(store))
    if handle is None:
        print("another worker already serves this run store", file=sys.stderr)
        return 0
    if owner:
        follow_owner(store)
    try:
        # A run left 'running' by a worker that was killed can never finish: mark it failed now.
        store.fail_orphaned_runs()
        helper = HelperLane(store, follow=follow_owner if owner else None) if lanes == 2 else None
        if warm is not None:
            started = time.monotonic()
            try:
                if warm() is False:
                    print(
                        f"warm-up stopped after {time.monotonic() - started:.1f} s: a job is waiting",
                        file=sys.stderr,
                        flush=True,
                    )
                else:
                    if helper is not None:
                        # The second lane loads after the warm-up's latency timing (which needs an idle
                        # machine), and before the worker says it is ready: the demo's second run then
                        # starts the moment it is pressed.
                        helper.start(warm=True)
                        helper.wait_warm(HELPER_WARM_TIMEOUT_S)
                    print(f"warmed up in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
            except Exception as exc:  # noqa: BLE001 - only a head start: the job reports real errors
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                print(f"warm-up skipped: {first}", file=sys.stderr, flush=True)
        idle_since = time.monotonic()
        dispatcher = None
        try:
            while True:
                dispatcher = cluster.dispatcher_for(store, dispatcher)
                if run_next(store, dispatcher, poll_s, helper=helper):
                    idle_since = time.monotonic()
                    continue
                if helper is not None and helper.busy:
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    return 0
                time.sleep(poll_s)
        finally:
            if dispatcher is not None:
                dispatcher.close()
            if helper is not None:
                helper.close()
    finally:
        handle.close()


def other_job_waiting(store: RunStore, wanted: Callable[[dict], bool]) -> bool:
    """Whether a queued job exists whose configuration `wanted` does not accept (a warm-up for the demo
    stops for anything but the demo)."""
    return any(not wanted(row["config"]) for row in store.list_runs(status="queued"))


def _config_of(row: dict) -> RunConfig | None:
    if row["kind"] not in HELPER_KINDS:
        return None
    try:
        return RunConfig.from_dict(row["config"])
    except Exception:  # noqa: BLE001 - an invalid configuration fails as its own run, with its own message
        return None


def time_latency_ahead(rows: list[dict]) -> None:
    """Put the latency of these stored training runs' architectures into the cost cache (`train.count_ahead`,
    with this process's threads), those not there yet; a run that cannot be built fails later on its own."""
    for row in rows:
        config = _config_of(row)
        if config is None or not config.measure_latency:
            continue
        try:
            train.count_ahead(config)
        except Exception:  # noqa: BLE001 - only a head start: the run reports real errors
            continue


def latency_ready(row: dict) -> bool:
    """Whether a stored run has no latency left to time (`train.latency_ready`); a run that cannot be
    built counts as ready: it fails at once, timing nothing."""
    config = _config_of(row)
    if config is None:
        return True
    try:
        return train.latency_ready(config)
    except Exception:  # noqa: BLE001 - see above
        return True


def run_next(
    store: RunStore, dispatcher: cluster.Dispatcher | None, poll_s: float, *, helper: HelperLane | None = None
) -> bool:
    """Where queued jobs run. With a Ray cluster configured (the dashboard's setting or
    VPTDASH_RAY_ADDRESS) the dispatcher keeps several training runs on it at once and stores each as it
    comes back; without one, the next job runs here, in this process, and with a `helper` lane that is
    free, the job after it (a training run) runs there at the same time, the threads split between them.
    False when nothing was queued."""
    if dispatcher is not None:
        return dispatcher.step(poll_s)
    job = store.claim_next_queued(worker_pid=os.getpid())
    if job is None:
        return False
    threads = torch.get_num_threads()  # this worker's share of the cores, set once at its start
    own = threads
    if helper is not None and threads >= 2:
        waiting = [row for row in store.list_runs(status="queued") if row["kind"] in HELPER_KINDS]
        if not helper.busy and waiting:
            # Two runs are about to share the machine: time the latency they and the runs queued behind
            # them still need now, while it is quiet (a timing beside a training run would be inflated).
            time_latency_ahead([job, *waiting])
            other = store.claim_next_queued(worker_pid=helper.pid, kinds=HELPER_KINDS)
            if other is not None:
                helper.give(other["id"], threads // 2, latency_threads=threads)
        elif helper.busy and not latency_ready(job):
            helper.wait_idle(poll_s)  # this run times its latency alone, with every core
        if helper.busy:
            own = threads - helper.threads
    torch.set_num_threads(own)
    try:
        with latency_threads(threads):  # latency is the machine's figure, timed with all of the worker's threads
            execute_run(store, job["id"])
    finally:
        torch.set_num_threads(threads)
    return True


def ensure_worker(
    store: RunStore, *, idle_exit_s: float | None = 600.0, warm: bool = False, lanes: int | None = None
) -> bool:
    """Start a detached worker process unless one is already serving this store. With `warm`, the worker
    loads what the meeting demo needs (`worker --warm`) before it waits for jobs; `lanes` (default: the
    worker's own choice, `default_lanes`) is how many runs it may run side by side.

    Returns True when a new worker was started. The worker exits after `idle_exit_s` without work,
    or within seconds of this process ending, so nothing lingers after a meeting; the app starts it
    again on the next queued run."""
    store.fail_orphaned_runs()
    set_owner(store)  # a worker already running follows this process now
    if worker_alive(store):
        return False
    command = [sys.executable, "-m", "vptdash", "worker", "--store", str(store.path), "--follow-owner"]
    if idle_exit_s is not None:
        command += ["--idle-exit", str(idle_exit_s)]
    if warm:
        command.append("--warm")
    if lanes is not None:
        command += ["--lanes", str(lanes)]
    log = open(log_path(store), "ab")
    package_root = str(PACKAGE_ROOT)
    env = {**os.environ, "PYTHONPATH": package_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.Popen(
        command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=package_root
    )
    log.close()
    return True
