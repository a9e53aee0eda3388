"""The dashboard's worker follows the server that started it (runs/worker.py: owner file, adoption)."""

import os
import subprocess
import sys
import time

from vptdash.engine.train import RunConfig
from vptdash.runs import worker
from vptdash.runs.jobs import submit_run
from vptdash.runs.store import RunStore


def long_tiny_run(image_folder) -> RunConfig:
    return RunConfig(
        backbone="tiny-random",
        dataset=str(image_folder),
        resolution=32,
        epochs=500,
        batch_size=2,
        measure_latency=False,
    )


def _wait(condition, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_a_worker_ends_with_its_owner_and_a_new_owner_adopts_it(image_folder):
    """The dashboard's worker follows the server that started it: a second server adopts it, and once
    the last owner has ended the worker exits within seconds, its job stored as cancelled."""
    store = RunStore()
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    first, second = subprocess.Popen(sleeper), subprocess.Popen(sleeper)
    try:
        run_id = submit_run(store, long_tiny_run(image_folder))
        assert worker.ensure_worker(store, idle_exit_s=None) is True
        worker.set_owner(store, first.pid)  # as if the server `first` had started it
        assert _wait(lambda: store.get_run(run_id)["status"] == "running", 90)
        assert worker.adopt(store) is True  # this process (a new server) adopts it ...
        assert worker.ensure_worker(store, idle_exit_s=None) is False  # ... finding it alive
        worker.set_owner(store, second.pid)  # ... and so can another
        assert worker.read_owner(store) == second.pid
        first.kill()
        first.wait()
        time.sleep(3 * worker.OWNER_POLL_SECONDS)
        assert worker.worker_alive(store) and store.get_run(run_id)["status"] == "running"
        second.kill()
        second.wait()
        assert _wait(lambda: not worker.worker_alive(store), 5 * worker.OWNER_POLL_SECONDS)
        row = store.get_run(run_id)
        assert row["status"] == "cancelled" and row["error"] == worker.STOPPED_WITH_OWNER
    finally:
        for process in (first, second):
            process.kill()
            process.wait()


def test_a_zombie_owner_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert _wait(lambda: not worker.process_alive(child.pid), 10)  # exited, not yet reaped: a zombie
    child.wait()
    assert not worker.process_alive(child.pid)
    assert worker.process_alive(os.getpid())
