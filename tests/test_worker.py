import os
import signal
import time

from vptdash.engine.train import RunConfig
from vptdash.runs import worker
from vptdash.runs.jobs import submit_run
from vptdash.runs.store import RunStore


def tiny(image_folder, **overrides):
    values = dict(
        backbone="tiny-random", dataset=str(image_folder), resolution=32, epochs=1, batch_size=8, measure_latency=False
    )
    return RunConfig(**{**values, **overrides})


def test_serve_runs_queue_in_order_and_exits_when_idle(image_folder):
    store = RunStore()
    ids = [submit_run(store, tiny(image_folder, num_prompts=n)) for n in (1, 2)]
    assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05) == 0
    rows = [store.get_run(i) for i in ids]
    assert [r["status"] for r in rows] == ["done", "done"]
    assert rows[0]["finished_at"] <= rows[1]["started_at"]  # one job at a time


def test_only_one_worker_per_store(image_folder):
    store = RunStore()
    held = worker.try_lock(worker.lock_path(store))
    try:
        assert worker.worker_alive(store)
        assert worker.serve(store, idle_exit_s=0.1) == 0  # returns at once: someone else serves
        assert worker.ensure_worker(store) is False
    finally:
        held.close()
    assert not worker.worker_alive(store)


def test_ensure_worker_starts_a_detached_process_that_runs_jobs(image_folder):
    store = RunStore()
    run_id = submit_run(store, tiny(image_folder))
    assert worker.ensure_worker(store, idle_exit_s=2) is True
    deadline = time.time() + 120
    while time.time() < deadline and store.get_run(run_id)["status"] in ("queued", "running"):
        time.sleep(0.2)
    row = store.get_run(run_id)
    assert row["status"] == "done", row["error"]
    assert row["worker_pid"] != os.getpid()
    deadline = time.time() + 30
    while worker.worker_alive(store) and time.time() < deadline:  # idle exit releases the lock
        time.sleep(0.2)
    assert not worker.worker_alive(store)


def test_a_killed_worker_leaves_its_run_failed_not_running(image_folder):
    store = RunStore()
    run_id = submit_run(store, tiny(image_folder, epochs=500, batch_size=2))
    worker.ensure_worker(store, idle_exit_s=30)
    deadline = time.time() + 60
    while time.time() < deadline and store.get_run(run_id)["status"] != "running":
        time.sleep(0.1)
    pid = store.get_run(run_id)["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    assert store.fail_orphaned_runs() == [run_id]
    row = store.get_run(run_id)
    assert row["status"] == "failed" and "died" in row["error"]
