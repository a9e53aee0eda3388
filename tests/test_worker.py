import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from streamlit.testing.v1 import AppTest

from vptdash.engine import cost, paths, train
from vptdash.engine.train import RunConfig
from vptdash.runs import presets, reference, worker
from vptdash.runs.jobs import submit_run
from vptdash.runs.store import RunStore
from vptdash.ui import jobqueue

APP = str(Path(__file__).resolve().parent.parent / "app.py")


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


def test_warm_up_runs_once_before_the_first_job_and_a_failing_one_only_costs_a_line(image_folder, capsys):
    store = RunStore()
    run_id = submit_run(store, tiny(image_folder))
    seen = []

    def warm():
        seen.append(store.get_run(run_id)["status"])  # before any job is claimed

    assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05, warm=warm) == 0
    assert seen == ["queued"] and store.get_run(run_id)["status"] == "done"
    assert "warmed up in" in capsys.readouterr().err

    def broken():
        raise OSError("disk gone\nsecond line")

    run_id = submit_run(store, tiny(image_folder, num_prompts=1))
    assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05, warm=broken) == 0
    assert store.get_run(run_id)["status"] == "done"  # the worker served anyway
    err = capsys.readouterr().err
    assert "warm-up skipped: disk gone" in err and "second line" not in err and "Traceback" not in err


def test_a_warm_up_that_counts_ahead_leaves_the_run_no_cost_phase_to_pay(image_folder, cost_spies):
    """What the warm-up counts and times is what the run's cost phase then reads: the run stores the same
    figures, marked as taken from the cache, and neither fvcore nor the timer runs again."""
    store = RunStore()
    config = tiny(image_folder, num_prompts=2, placement="deep", measure_latency=True)
    run_id = submit_run(store, config)
    ahead = {}
    assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05, warm=lambda: ahead.update(train.count_ahead(config))) == 0
    assert cost_spies == {"fvcore": 1, "latency": 1}  # once, in the warm-up
    assert not ahead["gmacs_cached"] and not ahead["latency_cached"]  # the warm-up measured them itself
    row = store.get_run(run_id)
    assert row["status"] == "done", row["error"]
    stored = row["costs"]
    assert stored["gmacs_cached"] is True and stored["latency_cached"] is True
    assert stored["gmacs"] == ahead["gmacs"] and stored["latency_ms_b1"] == ahead["latency_ms_b1"]
    # another architecture (more prompts) was not counted ahead: its run counts and times for itself
    other = submit_run(store, tiny(image_folder, num_prompts=4, placement="deep", measure_latency=True))
    assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05) == 0
    assert cost_spies == {"fvcore": 2, "latency": 2}
    assert store.get_run(other)["costs"]["gmacs_cached"] is False


def stub_warm_up_steps(monkeypatch, steps: list, count_ahead=None) -> None:
    """warm_demo's steps recorded in `steps` instead of run (no real backbone or ELPV): only presets' own
    names are replaced, so a job the worker runs afterwards uses the real engine."""
    monkeypatch.setattr(presets, "backbones", SimpleNamespace(load_backbone=lambda *a: steps.append("backbone")))
    monkeypatch.setattr(presets, "data", SimpleNamespace(load_and_split=lambda config: steps.append("data")))
    monkeypatch.setattr(presets, "cost", SimpleNamespace(load_counter=lambda: steps.append("counter")))
    monkeypatch.setattr(
        presets,
        "train",
        SimpleNamespace(
            encode_ahead=lambda config: steps.append(("encode", config.label())),
            count_ahead=count_ahead or (lambda config: steps.append(("count", config))),
        ),
    )


def test_the_demo_warm_up_encodes_the_probe_first_then_counts_every_demo_run(monkeypatch):
    steps = []
    stub_warm_up_steps(monkeypatch, steps)
    presets.warm_demo()
    assert steps[:4] == ["backbone", "data", "counter", ("encode", "linear probe")]
    counted = [step[1] for step in steps[4:]]
    assert counted == presets.demo_configs()  # every run the press queues, the probe first, nothing else


def test_the_warm_up_stops_between_steps_when_told_and_says_so(image_folder, monkeypatch, capsys):
    steps = []
    stub_warm_up_steps(monkeypatch, steps)
    assert presets.warm_demo(should_stop=lambda: len(steps) >= 3) is False
    assert steps == ["backbone", "data", "counter"]  # nothing after the step that saw the job
    steps.clear()
    assert presets.warm_demo(should_stop=lambda: False) is True and len(steps) == 4 + len(presets.demo_configs())
    # the worker says it stopped early (not "warmed up"), then serves the waiting job
    store = RunStore()
    run_id = submit_run(store, tiny(image_folder))
    assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05, warm=lambda: False) == 0
    err = capsys.readouterr().err
    assert "warm-up stopped after" in err and "a job is waiting" in err and "warmed up in" not in err
    assert store.get_run(run_id)["status"] == "done"


def test_only_a_job_other_than_the_demo_stops_the_demo_warm_up(image_folder):
    store = RunStore()
    assert worker.other_job_waiting(store, presets.is_demo_config) is False  # nothing queued
    for config in presets.demo_configs():
        assert presets.is_demo_config(config.to_dict())
        submit_run(store, config)
    assert worker.other_job_waiting(store, presets.is_demo_config) is False  # the demo's own press: go on
    assert not presets.is_demo_config({"shots": "many"})  # unreadable: not the demo's
    other = dataclasses.replace(presets.demo_configs()[1], seed=1)
    assert not presets.is_demo_config(other.to_dict())
    submit_run(store, tiny(image_folder))
    assert worker.other_job_waiting(store, presets.is_demo_config) is True


def test_a_failing_cost_count_in_the_warm_up_costs_one_line_and_keeps_the_probe_encoding(
    image_folder, monkeypatch, capsys
):
    def no_counter(config):
        raise ModuleNotFoundError("No module named 'fvcore'\nmore detail")

    steps = []
    stub_warm_up_steps(monkeypatch, steps, count_ahead=no_counter)
    store = RunStore()
    run_id = submit_run(store, tiny(image_folder))
    assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05, warm=presets.warm_demo) == 0
    assert ("encode", "linear probe") in steps  # done before the count failed: the first point still gains
    row = store.get_run(run_id)
    assert row["status"] == "done", row["error"]  # the worker served anyway
    err = capsys.readouterr().err
    assert "warm-up skipped: No module named 'fvcore'" in err
    assert "more detail" not in err and "Traceback" not in err


@pytest.mark.slow
def test_a_warm_worker_loads_the_demo_setting_then_waits(tmp_path):
    """The app's first start: a real `worker --warm` process loads the demo's backbone and images,
    encodes the probe's features and counts and times every demo run, then waits for jobs (and exits when idle)."""
    store = RunStore()
    assert worker.ensure_worker(store, idle_exit_s=1, warm=True) is True
    deadline = time.time() + 180
    log = worker.log_path(store)
    while time.time() < deadline and "warmed up in" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.5)
    text = log.read_text()
    assert "warmed up in" in text and "warm-up skipped" not in text, text[-2000:]
    # the demo's linear probe will find its frozen features encoded (kept on disk by the worker)
    assert list((paths.cache_dir() / "features").glob("*.pt"))
    # and every run of the demo will find its GMAC count and its latency in this machine's cost cache (the
    # cache dir is shared by the session's tests: other tests' architectures may be there too)
    entries = json.loads(cost.default_cost_cache_path().read_text())
    for section in ("gmacs", "latency"):
        counted = {json.loads(key)["architecture"] for key in entries[section]}
        assert counted >= {train.architecture_key(config) for config in presets.demo_configs()}, section
    deadline = time.time() + 60
    while worker.worker_alive(store) and time.time() < deadline:
        time.sleep(0.2)
    assert not worker.worker_alive(store)


def test_the_app_starts_a_warm_worker_once_unless_told_not_to(monkeypatch):
    started = []
    monkeypatch.setattr(worker, "ensure_worker", lambda store, **kw: started.append(kw) or True)
    monkeypatch.setattr(worker, "adopt", lambda store: False)
    store = RunStore()
    jobqueue._adopt_once.clear()
    assert jobqueue.adopt_worker(store) is False and started == []  # VPTDASH_NO_WARMUP=1 in every test
    jobqueue._adopt_once.clear()
    monkeypatch.delenv("VPTDASH_NO_WARMUP")
    assert jobqueue.adopt_worker(store) is True and jobqueue.adopt_worker(store) is True
    assert started == [{"warm": True}]  # once per server process
    jobqueue._adopt_once.clear()


def test_threads_per_worker_splits_the_cores():
    assert worker.threads_per_worker(1, cores=2) == 2  # alone: every core
    assert worker.threads_per_worker(2, cores=8) == 4
    assert worker.threads_per_worker(3, cores=2) == 1  # never zero


def test_a_started_worker_runs_below_its_parent_with_every_core(image_folder):
    store = RunStore()
    run_id = submit_run(store, tiny(image_folder))
    assert worker.ensure_worker(store, idle_exit_s=15) is True
    deadline = time.time() + 120
    while time.time() < deadline and store.get_run(run_id)["status"] in ("queued", "running"):
        time.sleep(0.2)
    row = store.get_run(run_id)
    assert row["status"] == "done", row["error"]
    pid = row["worker_pid"]
    assert pid != os.getpid()
    # still alive (idle until its idle exit): its priority is read from the kernel, not from its own report
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + worker.WORKER_NICENESS)
    cores = len(os.sched_getaffinity(0))
    assert row["timings"]["threads"] == cores  # the run trained with every core this machine lets it use
    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + worker.WORKER_NICENESS)
    assert f"worker {pid}: nice {nice}, {cores} torch threads" in worker.log_path(store).read_text()
    os.kill(pid, signal.SIGTERM)


# ----------------------------------------------------------------------------- a worker killed mid-run
# The worker is a real process started by the product (`ensure_worker`) and killed with SIGKILL while it
# trains. It is deliberately not reaped: in the dashboard its parent is the Streamlit server, which never
# waits for it, so the dead worker lingers as a zombie whose pid `os.kill(pid, 0)` still finds.


def kill_worker_mid_run(store, run_id) -> int:
    """Start a real worker on `store` (one lane: the runs queued behind `run_id` wait for it), wait until it
    has written progress for `run_id`, SIGKILL it."""
    assert worker.ensure_worker(store, idle_exit_s=30, lanes=1) is True
    deadline = time.time() + 90
    while time.time() < deadline and not store.progress(run_id):  # mid-run: training has begun
        time.sleep(0.1)
    row = store.get_run(run_id)
    assert row["status"] == "running" and store.progress(run_id), row
    pid = row["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while worker.worker_alive(store) and time.time() < deadline:  # the kernel drops its lock as it dies
        time.sleep(0.05)
    assert not worker.worker_alive(store)
    return pid


def long_run(image_folder):
    return tiny(image_folder, epochs=500, batch_size=2)


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_worker_of(store, run_id) -> None:
    """A worker the dashboard started lingers for 10 idle minutes: end it when the test is done."""
    pid = store.get_run(run_id)["worker_pid"]
    if pid and pid != os.getpid():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + 10
        while worker.worker_alive(store) and time.time() < deadline:
            time.sleep(0.05)
        reap(pid)


def wait_for_idle_exit(store) -> None:
    """Wait for a worker just started by ensure_worker to take its lock, then to exit when idle."""
    deadline = time.time() + 60
    while not worker.worker_alive(store) and time.time() < deadline:
        time.sleep(0.05)
    while worker.worker_alive(store) and time.time() < deadline:
        time.sleep(0.1)
    assert not worker.worker_alive(store)


def test_a_new_worker_fails_the_run_a_killed_worker_left_running_then_serves_the_queue(image_folder):
    store = RunStore()
    stuck = submit_run(store, long_run(image_folder))
    waiting = submit_run(store, tiny(image_folder))
    dead = kill_worker_mid_run(store, stuck)
    try:
        assert store.get_run(stuck)["status"] == "running"  # nothing has looked yet
        assert worker.serve(store, idle_exit_s=0.2, poll_s=0.05) == 0  # the next worker's start
        row = store.get_run(stuck)
        assert row["status"] == "failed" and row["error"] == "worker process died"
        assert row["finished_at"] is not None
        assert store.get_run(waiting)["status"] == "done"  # the queue went on
        assert store.queue_summary()["running"] == []
    finally:
        reap(dead)


def test_ensure_worker_fails_the_killed_workers_run_before_starting_a_new_one(image_folder):
    store = RunStore()
    stuck = submit_run(store, long_run(image_folder))
    dead = kill_worker_mid_run(store, stuck)
    try:
        assert worker.ensure_worker(store, idle_exit_s=0.5) is True
        # failed by ensure_worker itself, at once: not left for the new process to find
        row = store.get_run(stuck)
        assert row["status"] == "failed" and row["error"] == "worker process died"
        wait_for_idle_exit(store)
        assert store.get_run(stuck)["status"] == "failed"  # nobody resurrected or re-ran it
        assert store.progress(stuck)  # its progress so far is kept, not lost
    finally:
        reap(dead)


def test_a_live_worker_is_not_mistaken_for_a_dead_one(image_folder):
    store = RunStore()
    run_id = submit_run(store, tiny(image_folder))
    store.claim_next_queued(worker_pid=os.getpid())  # "running" in a process that is alive: this one
    assert store.fail_orphaned_runs() == []
    assert worker.ensure_worker(store, idle_exit_s=0.2) is True
    assert store.get_run(run_id)["status"] == "running"
    wait_for_idle_exit(store)
    assert store.get_run(run_id)["status"] == "running"  # the new worker's start left it alone too


# ----------------------------------------------------------------------------- the dashboard's queue panel
@pytest.fixture
def app_home(tmp_path, monkeypatch):
    """The app on this test's own VPTDASH_HOME (conftest), without warm-up or the shipped reference sweep."""
    monkeypatch.setenv("VPTDASH_NO_WARMUP", "1")
    monkeypatch.setattr(reference, "REFERENCE_FILE", tmp_path / "no-reference-sweep.json")


def sidebar_text(at) -> str:
    return "\n".join(str(c.value) for c in at.sidebar.caption)


def test_the_queue_panel_shows_a_killed_workers_run_failed_and_offers_a_working_start_button(
    app_home, image_folder, monkeypatch
):
    store = RunStore()
    stuck = submit_run(store, long_run(image_folder))
    waiting = submit_run(store, tiny(image_folder))
    # the warning waits WORKER_START_GRACE_S after the oldest queued run, for a worker just starting
    monkeypatch.setattr(jobqueue, "WORKER_START_GRACE_S", 0.0)
    dead = kill_worker_mid_run(store, stuck)
    try:
        at = AppTest.from_file(APP, default_timeout=60)
        at.run(timeout=60)
        assert not at.exception, at.exception
        row = store.get_run(stuck)
        assert row["status"] == "failed" and row["error"] == "worker process died"
        assert "1 queued · 0 done · 1 failed" in sidebar_text(at)
        assert not at.sidebar.get("progress")  # nothing shown as running
        assert [w.value for w in at.sidebar.warning] == ["Runs are queued but no worker is running."]
        at.sidebar.button(key="sidebar_start_worker").click().run(timeout=60)
        assert not at.exception, at.exception
        deadline = time.time() + 120
        while time.time() < deadline and store.get_run(waiting)["status"] in ("queued", "running"):
            time.sleep(0.2)
        row = store.get_run(waiting)
        assert row["status"] == "done", row["error"]
        assert row["worker_pid"] not in (os.getpid(), dead)  # run by the worker the button started
        at.run(timeout=60)
        assert not at.sidebar.warning
        assert "0 queued · 1 done · 1 failed" in sidebar_text(at)
    finally:
        stop_worker_of(store, waiting)
        reap(dead)


def test_the_queue_panel_warns_only_after_the_grace_period(app_home, image_folder, monkeypatch):
    store = RunStore()
    submit_run(store, tiny(image_folder))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run(timeout=60)
    assert not at.sidebar.warning  # just queued: a worker may still be starting
    monkeypatch.setattr(jobqueue, "WORKER_START_GRACE_S", 0.0)
    at.run(timeout=60)
    assert [w.value for w in at.sidebar.warning] == ["Runs are queued but no worker is running."]
