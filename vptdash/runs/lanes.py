"""A second lane for the dashboard's worker: two queued runs side by side, one thread each.

Why: a few-shot training step multiplies small matrices, and two threads share them badly; worse, with a
dashboard open on the same two cores, every moment the browser or the server takes a core stalls the
other training thread at its next barrier, so the UI's few percent of CPU cost a 2-thread run far more
than a few percent. Two 1-thread runs side by side do not wait for each other. Measured on a 2-core AMX
Xeon set to fp32, without a dashboard: one demo prompt run took about 23 s alone with 2 threads, the two
side by side with 1 thread each about 44 s; in the meeting demo, with the dashboard open in a browser,
each 2-thread run took about 30 s (so 61.7 s for the demo) and the two side by side finished after 54.0 s
(`benchmarks/meeting_demo.py`, docs/performance.md).

The worker process stays the first lane and keeps what it has warmed in memory (the probe's cached
features); the helper is one spawned process fed run ids over a pipe. A run goes to the helper only
when another run is queued at the moment the worker takes one, so a run alone still gets every core,
and the two lanes never hold more threads than there are cores. A helper that dies fails only its run
(the next one spawns a fresh helper). A helper whose worker was killed finishes the run in hand, then
exits; one whose worker follows the dashboard follows it too (`worker.follow_owner`): when the dashboard
ends, its run is stored as cancelled and it exits.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import time
import types
from collections.abc import Callable
from contextlib import contextmanager
from multiprocessing.connection import Connection

import torch

from vptdash.engine.cost import latency_threads
from vptdash.runs import presets
from vptdash.runs.jobs import execute_run
from vptdash.runs.store import RunStore

# The kinds a helper takes: single training runs. Jobs that start runs of their own (a search) stay in
# the worker, which keeps the order of the queue for them.
HELPER_KINDS = ("train", "probe")


def death_reason(exitcode: int | None) -> str:
    """What a run whose worker process died stores as its error."""
    if exitcode is None:
        return "worker process died: the process running it stopped answering (out of memory, or stopped by hand?)"
    if exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"worker process died: the process running it {how} (out of memory, or stopped by hand?)"


@contextmanager
def spawning_without_main_module():
    """Spawned workers need only vptdash. By default spawn re-runs the parent's `__main__` in each child,
    which breaks when that is a script without a main guard (a Streamlit page under AppTest, a notebook
    export). Processes started inside this block see a blank `__main__` instead."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def serve_lane(store_path: str, connection: Connection, follow: Callable[[RunStore], object] | None = None) -> None:
    """The helper process. On "warm": load the demo's backbone and images. On ("run", id, threads,
    machine_threads): run that claimed run with `threads` torch threads (its latency timed or looked up with
    `machine_threads`), then answer ("done", id). On None or a closed pipe: exit. `follow(store)` is called
    first (the worker's `follow_owner`, passed in by reference: this module does not import the worker).
    It inherits the worker's lower priority."""
    store = RunStore(store_path)
    if follow is not None:
        follow(store)
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        if message[0] == "warm":
            try:
                presets.load_demo_setting()
            except Exception:  # noqa: BLE001 - only a head start: the run reports real errors
                pass
            connection.send(("warmed",))
            continue
        _, run_id, threads, machine_threads = message
        torch.set_num_threads(threads)
        with latency_threads(machine_threads):
            execute_run(store, run_id)
        try:
            connection.send(("done", run_id))
        except OSError:  # the worker is gone: its run is stored, nothing more to do
            return


class HelperLane:
    """The worker's side of the helper: start it, give it a claimed run, notice when it finished or died."""

    def __init__(self, store: RunStore, *, follow: Callable[[RunStore], object] | None = None):
        self.store = store
        self.follow = follow
        self.process = None
        self.connection: Connection | None = None
        self.run_id: int | None = None
        self.threads = 0

    @property
    def busy(self) -> bool:
        self.poll()
        return self.run_id is not None

    @property
    def pid(self) -> int:
        self.start()
        return self.process.pid

    def start(self, *, warm: bool = False) -> None:
        """Spawn the helper unless it runs; with `warm`, let it load the demo's setting while it waits."""
        if self.process is not None and self.process.is_alive():
            return
        # spawn, not fork: a forked child would inherit this process's OpenMP thread pool in a broken state
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(
            target=serve_lane, args=(str(self.store.path), child_end, self.follow), daemon=True
        )
        with spawning_without_main_module():
            self.process.start()
        child_end.close()
        if warm:
            self.connection.send(("warm",))

    def wait_warm(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) for the helper to answer the "warm" it was started with. True once it
        has; False on timeout or if it died (the next run then starts a fresh one)."""
        deadline = time.monotonic() + timeout_s
        while self.process is not None:
            try:
                if self.connection.poll(min(0.5, max(0.0, deadline - time.monotonic()))):
                    if self.connection.recv() == ("warmed",):
                        return True
                    continue
            except (EOFError, OSError):
                pass
            if not self.process.is_alive():
                self._died()
                return False
            if time.monotonic() >= deadline:
                return False
        return False

    def wait_idle(self, poll_s: float) -> None:
        """Wait until the helper has finished (or lost) the run in hand."""
        while self.busy:
            time.sleep(poll_s)

    def give(self, run_id: int, threads: int, *, latency_threads: int | None = None) -> None:
        """Hand the helper a run already claimed in its name (`pid`, which starts it), to train with
        `threads`; its latency is timed (or read from the cost cache) with `latency_threads`, by default
        `threads`. A helper that has died since fails the run with the reason."""
        self.run_id, self.threads = run_id, threads
        try:
            if self.process is None or not self.process.is_alive():
                raise BrokenPipeError  # not restarted here: the run was claimed in the dead helper's name
            self.connection.send(("run", run_id, threads, latency_threads or threads))
        except OSError:  # it died since it was started: the run fails with the reason, as any death does
            if self.process is not None:
                self.process.join(5)
                self._died()
            else:
                self.store.finish_run(run_id, "failed", error=death_reason(None))
                self.run_id = None

    def poll(self) -> None:
        """Take in what the helper has answered; a helper that died fails the run it had."""
        if self.process is None:
            return
        try:
            while self.connection.poll():
                message = self.connection.recv()
                if message[0] == "done" and message[1] == self.run_id:
                    self.run_id = None
        except (EOFError, OSError):
            pass
        if not self.process.is_alive():
            self._died()

    def _died(self) -> None:
        self.process.join(1)
        if self.run_id is not None:
            run = self.store.get_run(self.run_id)
            if run and run["status"] == "running":
                self.store.finish_run(self.run_id, "failed", error=death_reason(self.process.exitcode))
        self.connection.close()
        self.process, self.connection, self.run_id = None, None, None

    def close(self) -> None:
        """Let the helper finish the run in hand, then end it (a worker going idle, or exiting)."""
        if self.process is None:
            return
        try:
            self.connection.send(None)
        except OSError:
            pass
        self.process.join(None if self.run_id is not None else 5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.poll()
