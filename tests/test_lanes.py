"""The worker's second lane: two queued runs side by side with the cores split, a run alone with all of
them, and a helper that dies failing only its own run."""

import os
import signal
import time

import pytest
import torch

from vptdash.engine.train import RunConfig
from vptdash.runs import lanes, worker
from vptdash.runs.jobs import submit_run
from vptdash.runs.store import RunStore


def tiny(image_folder, **overrides):
    values = dict(
        backbone="tiny-random", dataset=str(image_folder), resolution=32, epochs=1, batch_size=8, measure_latency=False
    )
    return RunConfig(**{**values, **overrides})


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_two_queued_runs_go_side_by_side_with_one_thread_each(image_folder, two_threads):
    store = RunStore()
    first, second = (submit_run(store, tiny(image_folder, num_prompts=n)) for n in (1, 2))
    assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05, lanes=2) == 0
    rows = {run_id: store.get_run(run_id) for run_id in (first, second)}
    assert [rows[i]["status"] for i in (first, second)] == ["done", "done"], [r["error"] for r in rows.values()]
    assert rows[first]["worker_pid"] == os.getpid() and rows[second]["worker_pid"] not in (None, os.getpid())
    assert rows[second]["started_at"] < rows[first]["finished_at"]  # handed out before the first ran
    assert [rows[i]["timings"]["threads"] for i in (first, second)] == [1, 1]
    assert torch.get_num_threads() == 2  # the worker's own threads are back for the next run


def test_a_run_alone_gets_every_core_and_one_lane_keeps_the_queue_in_order(image_folder, two_threads, monkeypatch):
    starts = []
    start = lanes.HelperLane.start
    monkeypatch.setattr(lanes.HelperLane, "start", lambda self, **kw: (starts.append(kw), start(self, **kw))[1])
    store = RunStore()
    alone = submit_run(store, tiny(image_folder))
    assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05, lanes=2) == 0
    row = store.get_run(alone)
    assert row["status"] == "done" and row["worker_pid"] == os.getpid() and row["timings"]["threads"] == 2
    assert starts == []  # no helper was started for a run alone
    ids = [submit_run(store, tiny(image_folder, num_prompts=n)) for n in (1, 2)]
    assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05, lanes=1) == 0
    first, second = (store.get_run(i) for i in ids)
    assert first["finished_at"] <= second["started_at"] and second["timings"]["threads"] == 2


def test_a_helper_that_is_killed_fails_only_its_run_and_a_fresh_one_takes_the_next(image_folder):
    store = RunStore()
    long_run = submit_run(store, tiny(image_folder, epochs=400))
    helper = lanes.HelperLane(store)
    try:
        claimed = store.claim_next_queued(worker_pid=helper.pid)
        helper.give(claimed["id"], 1)
        deadline = time.time() + 60
        while time.time() < deadline and not store.progress(long_run):
            time.sleep(0.1)  # training has started in the helper
        os.kill(helper.process.pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and helper.busy:
            time.sleep(0.05)
        row = store.get_run(long_run)
        assert row["status"] == "failed" and "killed by SIGKILL" in row["error"]
        assert helper.process is None
        short = submit_run(store, tiny(image_folder))
        helper.give(store.claim_next_queued(worker_pid=helper.pid)["id"], 1)
        deadline = time.time() + 120
        while time.time() < deadline and helper.busy:
            time.sleep(0.05)
        assert store.get_run(short)["status"] == "done"
    finally:
        helper.close()


def test_the_default_is_two_lanes_from_two_cores_and_a_bad_count_is_named():
    assert worker.default_lanes(1) == 1 and worker.default_lanes(2) == 2 and worker.default_lanes(16) == 2
    with pytest.raises(ValueError, match="lanes must be 1 or 2, got 3"):
        worker.serve(RunStore(), lanes=3)


def test_a_lane_with_fewer_threads_reads_the_latency_the_machine_measured_with_all_of_them(image_folder, two_threads):
    from vptdash.engine import train
    from vptdash.engine.cost import latency_threads

    config = tiny(image_folder, num_prompts=2, measure_latency=True)
    alone = train.count_ahead(config)  # the warm-up, with the worker's 2 threads
    assert alone["latency_cached"] is False and alone["latency_threads"] == 2
    torch.set_num_threads(1)  # a lane trains with half the cores
    with latency_threads(2):
        in_lane = train.count_ahead(config)
    assert torch.get_num_threads() == 1  # only the timing borrowed the threads
    assert in_lane["latency_cached"] is True and in_lane["latency_ms_b1"] == alone["latency_ms_b1"]
    own = train.count_ahead(config)  # without it: a 1-thread figure, measured and cached apart
    assert own["latency_cached"] is False and own["latency_threads"] == 1


def test_a_warmed_helper_says_so_before_its_first_run(image_folder):
    store = RunStore()
    helper = lanes.HelperLane(store)
    try:
        helper.start(warm=True)  # the demo's backbone and images, as a dashboard's worker does
        assert helper.wait_warm(180) is True
        run_id = submit_run(store, tiny(image_folder))
        helper.give(store.claim_next_queued(worker_pid=helper.pid)["id"], 1)
        deadline = time.time() + 120
        while time.time() < deadline and helper.busy:
            time.sleep(0.05)
        assert store.get_run(run_id)["status"] == "done" and store.get_run(run_id)["worker_pid"] == helper.pid
    finally:
        helper.close()
    assert helper.process is None or not helper.process.is_alive()


def test_latency_is_timed_on_the_quiet_machine_before_two_runs_share_it(image_folder, two_threads):
    # no cost_spies: the helper is another process, which reads the cost cache of this test's VPTDASH_HOME
    store = RunStore()
    ids = [submit_run(store, tiny(image_folder, num_prompts=n, measure_latency=True)) for n in (1, 2)]
    assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05, lanes=2) == 0
    rows = [store.get_run(i) for i in ids]
    assert [r["status"] for r in rows] == ["done", "done"]
    assert [r["timings"]["threads"] for r in rows] == [1, 1]  # they did share the machine
    # both read latency timed before either trained, with the worker's 2 threads
    assert [(r["costs"]["latency_cached"], r["costs"]["latency_threads"]) for r in rows] == [(True, 2), (True, 2)]


def test_a_run_with_latency_to_time_waits_for_the_busy_helper_and_then_runs_alone(image_folder, two_threads):
    store = RunStore()
    busy = submit_run(store, tiny(image_folder, epochs=60))
    helper = lanes.HelperLane(store)
    try:
        helper.give(store.claim_next_queued(worker_pid=helper.pid)["id"], 1)
        timed = submit_run(store, tiny(image_folder, num_prompts=3, measure_latency=True))
        assert worker.run_next(store, None, 0.05, helper=helper) is True
        first, second = store.get_run(busy), store.get_run(timed)
        assert first["status"] == "done" and second["status"] == "done"
        assert second["timings"]["threads"] == 2  # alone, after the helper's run
        assert second["costs"]["latency_cached"] is False and second["costs"]["latency_threads"] == 2
    finally:
        helper.close()


def test_a_helper_that_died_before_it_was_handed_a_run_fails_that_run_with_its_reason(image_folder):
    store = RunStore()
    run_id = submit_run(store, tiny(image_folder))
    helper = lanes.HelperLane(store)
    try:
        claimed = store.claim_next_queued(worker_pid=helper.pid)
        os.kill(helper.process.pid, signal.SIGKILL)
        helper.process.join(10)
        helper.give(claimed["id"], 1)  # no exception reaches the worker's loop
        assert not helper.busy
        row = store.get_run(run_id)
        assert row["status"] == "failed" and "killed by SIGKILL" in row["error"]
    finally:
        helper.close()
