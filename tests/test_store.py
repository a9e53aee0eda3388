"""RunStore: history round trips, progress polling, artifacts, and the multi-process job queue.

Multi-process tests use the "spawn" start method (what macOS/Windows do, and no inherited
state); worker functions live at module level so children can import them. torch is imported
only inside the artifact test so spawned children start quickly.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import sqlite3
import subprocess
import sys

import pandas as pd
import pytest

from vptdash.runs.store import FRAME_BASE_COLUMNS, ORPHAN_ERROR, RUN_STATUSES, RunStore, StoreError

CTX = mp.get_context("spawn")
JOIN_TIMEOUT_S = 60


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs.sqlite")


def _config(**overrides):
    config = {
        "dataset": "elpv",
        "backbone": "tiny-random",
        "num_prompts": 10,
        "placement": "input",
        "lr": 1e-3,
        "seed": 0,
    }
    config.update(overrides)
    return config


# ------------------------------------------------------------------- basics


def test_default_path_follows_vptdash_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTDASH_HOME", str(tmp_path))
    assert RunStore().path == tmp_path / "data" / "runs.sqlite"


def test_wal_mode_and_schema_version(store):
    assert store.journal_mode() == "wal"
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert version == ("1",)
    RunStore(store.path)  # reopening an existing store is fine


def test_newer_schema_is_refused(store):
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        RunStore(store.path)


def test_create_get_round_trip_with_nested_config(store):
    config = _config(placement={"layers": [0, 3, 7], "mode": "deep"}, tags=["a", "b"])
    run_id = store.create_run(config, kind="probe", source="cli", sweep_id="s1")
    run = store.get_run(run_id)
    assert run["config"] == config
    assert (run["status"], run["kind"], run["source"], run["sweep_id"]) == ("queued", "probe", "cli", "s1")
    assert run["metrics"] == run["costs"] == run["timings"] == {}
    assert run["started_at"] is None and run["finished_at"] is None
    assert run["cancel_requested"] is False and run["artifact_path"] is None
    assert "progress" not in run
    assert store.get_run(run_id + 1000) is None


def test_nan_and_numpy_values_are_stored_as_json(store):
    np = pytest.importorskip("numpy")
    run_id = store.create_run(_config(lr=np.float32(0.5)))
    store.append_progress(run_id, {"loss": float("nan"), "step": np.int64(3)})
    store.finish_run(run_id, "done", metrics={"acc": math.inf, "per_class": np.array([1.0, 2.0])})
    run = store.get_run(run_id)
    assert run["config"]["lr"] == 0.5
    assert run["metrics"] == {"acc": None, "per_class": [1.0, 2.0]}
    assert store.progress(run_id) == [{"loss": None, "step": 3}]


def test_create_run_rejects_unknown_status(store):
    with pytest.raises(ValueError):
        store.create_run(_config(), status="paused")


def test_list_filters_and_order(store):
    a = store.create_run(_config(dataset="elpv"), sweep_id="s1")
    b = store.create_run(_config(dataset="pets"), kind="probe", sweep_id="s1")
    c = store.create_run(_config(dataset="elpv"), source="cli")
    store.finish_run(b, "done")
    ids = lambda runs: [r["id"] for r in runs]  # noqa: E731
    assert ids(store.list_runs()) == [c, b, a]  # newest first
    assert ids(store.list_runs(status="queued")) == [c, a]
    assert ids(store.list_runs(status=["done", "failed"])) == [b]
    assert ids(store.list_runs(status=[])) == []
    assert ids(store.list_runs(kind="probe")) == [b]
    assert ids(store.list_runs(source="cli")) == [c]
    assert ids(store.list_runs(sweep_id="s1")) == [b, a]
    assert ids(store.list_runs(dataset="elpv")) == [c, a]
    assert ids(store.list_runs(dataset="elpv", sweep_id="s1")) == [a]
    assert ids(store.list_runs(limit=2)) == [c, b]
    with pytest.raises(ValueError):
        store.list_runs(status="bogus")


def test_progress_order_since_and_latest(store):
    run_id = store.create_run(_config())
    other = store.create_run(_config())
    assert store.progress(run_id) == [] and store.latest_progress(run_id) is None
    store.append_progress(run_id, {"step": 0, "loss": 2.0, "phase": "train"})
    store.append_progress_many(run_id, [{"step": s, "loss": 2.0 / (s + 1)} for s in range(1, 5)])
    store.append_progress(other, {"step": 99})
    store.append_progress_many(run_id, [])
    assert [e["step"] for e in store.progress(run_id)] == [0, 1, 2, 3, 4]
    assert [e["step"] for e in store.progress(run_id, since=3)] == [3, 4]
    assert store.progress(run_id, since=5) == []
    assert store.latest_progress(run_id) == {"step": 4, "loss": 0.4}
    with pytest.raises(KeyError):
        store.append_progress(12345, {"step": 0})


def test_lifecycle_finish_and_update_results(store):
    run_id = store.create_run(_config())
    store.mark_running(run_id, pid=4242)
    run = store.get_run(run_id)
    assert run["status"] == "running" and run["worker_pid"] == 4242 and run["started_at"]
    store.update_results(run_id, metrics={"val_accuracy": 0.5}, timings={"train_s": 3.0})
    store.finish_run(run_id, "done", metrics={"test_accuracy": 0.8}, costs={"gmacs": 1.25, "trainable_params": 7680})
    run = store.get_run(run_id)
    assert run["status"] == "done" and run["error"] is None
    assert run["metrics"] == {"val_accuracy": 0.5, "test_accuracy": 0.8}  # merged, not replaced
    assert run["costs"] == {"gmacs": 1.25, "trainable_params": 7680}
    assert run["timings"] == {"train_s": 3.0}
    assert run["finished_at"] >= run["started_at"] >= run["created_at"]
    store.update_results(run_id, metrics={"val_accuracy": 0.6})
    assert store.get_run(run_id)["metrics"]["val_accuracy"] == 0.6

    failed = store.create_run(_config(), status="running")
    assert store.get_run(failed)["started_at"] is not None
    store.finish_run(failed, "failed", error="CUDA out of memory")
    assert store.get_run(failed)["error"] == "CUDA out of memory"
    with pytest.raises(ValueError):
        store.finish_run(failed, "running")
    with pytest.raises(KeyError):
        store.finish_run(9999, "done")


# ------------------------------------------------------------------- artifacts


def test_artifact_round_trip_bit_identical_and_deleted_with_run(store):
    torch = pytest.importorskip("torch")
    run_id = store.create_run(_config())
    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(4, 10, 384, generator=g)
    tensors = {
        "prompts": prompts,
        "head.weight": torch.randn(2, 384, generator=g, dtype=torch.float64),
        "head_view": prompts[0, :, :2].T,  # non-contiguous view of another tensor
        "mask": torch.tensor([True, False]),
        "half": torch.randn(3, generator=g).to(torch.bfloat16),
    }
    path = store.save_artifact(run_id, tensors, metadata={"backbone": "tiny-random", "n": 4})
    assert path.name == f"run_{run_id}.safetensors" and path.parent.name == f"{store.path.stem}.artifacts"
    assert store.get_run(run_id)["artifact_path"] == str(path)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = store.load_artifact(run_id)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name].view(torch.uint8), tensor.contiguous().view(torch.uint8))
    assert store.load_artifact_metadata(run_id) == {"backbone": "tiny-random", "n": "4"}

    store.append_progress(run_id, {"step": 1})
    store.delete_run(run_id)
    assert not path.exists()
    assert store.get_run(run_id) is None and store.progress(run_id) == []
    store.delete_run(run_id)  # idempotent
    with pytest.raises(KeyError):
        store.load_artifact(run_id)


def test_artifact_errors(store):
    torch = pytest.importorskip("torch")
    run_id = store.create_run(_config())
    with pytest.raises(KeyError, match="no saved artifact"):
        store.load_artifact(run_id)
    with pytest.raises(KeyError):
        store.save_artifact(run_id + 1, {"x": torch.zeros(1)})


# ------------------------------------------------------------------- queue, single process


def test_claim_is_oldest_first(store):
    ids = [store.create_run(_config(seed=i)) for i in range(3)]
    store.create_run(_config(), status="running")  # not claimable
    claimed = [store.claim_next_queued(worker_pid=77) for _ in range(3)]
    assert [c["id"] for c in claimed] == ids
    assert all(c["status"] == "running" and c["worker_pid"] == 77 for c in claimed)
    assert store.claim_next_queued() is None


def test_cancel_queued_vs_running(store):
    queued = store.create_run(_config())
    running = store.create_run(_config())
    store.mark_running(running)
    assert not store.is_cancel_requested(running)

    store.request_cancel(queued)
    run = store.get_run(queued)
    assert run["status"] == "cancelled" and run["finished_at"] is not None
    assert store.claim_next_queued() is None  # a cancelled run is never picked up

    store.request_cancel(running)
    assert store.get_run(running)["status"] == "running"  # the worker stops it
    assert store.is_cancel_requested(running)
    store.finish_run(running, "cancelled")
    store.request_cancel(running)  # already finished: no-op
    assert store.get_run(running)["status"] == "cancelled"

    assert store.is_cancel_requested(99999)  # deleted run: worker should stop
    with pytest.raises(KeyError):
        store.request_cancel(99999)


def test_fail_orphaned_runs(store):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # exited and reaped: its pid is dead
    dead = store.create_run(_config())
    store.mark_running(dead, pid=proc.pid)
    alive = store.create_run(_config())
    store.mark_running(alive)  # this test process
    queued = store.create_run(_config())

    assert store.fail_orphaned_runs() == [dead]
    run = store.get_run(dead)
    assert run["status"] == "failed" and run["error"] == ORPHAN_ERROR and run["finished_at"]
    assert store.get_run(alive)["status"] == "running"
    assert store.get_run(queued)["status"] == "queued"
    assert store.fail_orphaned_runs() == []
    # explicit set of live pids: ours is not in it any more
    assert store.fail_orphaned_runs(alive_pids={1}) == [alive]


def test_queue_summary(store):
    a = store.create_run(_config())
    b = store.create_run(_config())
    store.create_run(_config())
    store.claim_next_queued(worker_pid=5)
    store.append_progress_many(a, [{"step": 1}, {"step": 2, "eta_s": 10.0}])
    store.request_cancel(b)
    done = store.create_run(_config())
    store.finish_run(done, "done")
    summary = store.queue_summary()
    assert [r["id"] for r in summary["running"]] == [a]
    assert summary["running"][0]["latest_progress"] == {"step": 2, "eta_s": 10.0}
    assert {k: summary[k] for k in ("queued", "done", "failed", "cancelled")} == {
        "queued": 1,
        "done": 1,
        "failed": 0,
        "cancelled": 1,
    }


# ------------------------------------------------------------------- import / export


def _reference_rows():
    return [
        {
            "config": _config(num_prompts=n),
            "metrics": {"test_accuracy": 0.7 + n / 100},
            "costs": {"gmacs": 1.0 + n},
            "timings": {"train_s": 2.0},
            "sweep_id": "ref",
            "progress": [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}],
        }
        for n in (1, 5, 10)
    ]


def test_import_runs_is_idempotent(store):
    assert store.import_runs(_reference_rows()) == 3
    assert store.import_runs(_reference_rows()) == 0
    assert RunStore(store.path).import_runs(_reference_rows()) == 0
    runs = store.list_runs(source="precomputed")
    assert len(runs) == 3 and all(r["status"] == "done" for r in runs)
    assert store.progress(runs[0]["id"]) == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]
    # same configs from another source are different runs
    assert store.import_runs(_reference_rows(), source="cli") == 3
    with pytest.raises(ValueError):
        store.import_runs([{"config": _config(), "status": "queued"}])


def test_export_import_round_trip_keeps_lineage(store, tmp_path):
    parent = store.create_run(_config(), status="running")
    store.append_progress(parent, {"step": 0})
    store.finish_run(parent, "done", metrics={"acc": 0.9})
    child = store.create_run(_config(condense_to=4), kind="condense", parent_id=parent)
    store.finish_run(child, "done", metrics={"acc": 0.85})
    rows = store.export_runs()
    json.dumps(rows)  # the reference sweep data file is JSON
    assert [r["kind"] for r in rows] == ["train", "condense"]  # oldest (parents) first

    other = RunStore(tmp_path / "other.sqlite")
    assert other.import_runs(list(reversed(rows))) == 2  # order must not matter
    assert other.import_runs(other.export_runs()) == 0  # keys survive a second round trip
    imported = {r["kind"]: r for r in other.list_runs()}
    assert imported["condense"]["parent_id"] == imported["train"]["id"]
    assert imported["train"]["metrics"] == {"acc": 0.9}
    assert other.progress(imported["train"]["id"]) == [{"step": 0}]


def test_csv_timestamps_are_iso_8601_with_time_zone(store, tmp_path):
    import datetime as dt

    from vptdash.runs.store import iso_timestamp

    run_id = store.create_run(_config())
    store.mark_running(run_id)
    store.finish_run(run_id, "done", metrics={"accuracy": 0.5})
    queued = store.create_run(_config(seed=1))
    read = pd.read_csv(store.export_csv(tmp_path / "runs.csv"), keep_default_na=False).set_index("id")
    run = store.get_run(run_id)
    for column in ("created_at", "started_at", "finished_at"):
        text = read.at[run_id, column]
        parsed = dt.datetime.fromisoformat(text)
        assert parsed.utcoffset() == dt.timedelta(0) and text.endswith("+00:00"), text
        assert abs(parsed.timestamp() - run[column]) < 1  # the same instant, to the second
    assert read.at[queued, "finished_at"] == ""  # not finished: empty, not "NaN"
    assert iso_timestamp(0) == "1970-01-01T00:00:00+00:00"
    assert iso_timestamp(float("nan")) is None and iso_timestamp(None) is None


def test_settings_are_shared_by_every_store_on_the_file(store):
    assert store.get_setting("active_setup") is None
    assert store.get_setting("active_setup", {"a": 1}) == {"a": 1}
    store.set_setting("active_setup", {"dataset": "elpv", "shots": None})
    store.set_setting("active_setup", {"dataset": "elpv", "shots": 8})  # replaced, not duplicated
    assert RunStore(store.path).get_setting("active_setup") == {"dataset": "elpv", "shots": 8}


def test_runs_frame_columns_and_csv(store, tmp_path):
    a = store.create_run(_config(placement={"layers": [0, 1]}), sweep_id="s")
    store.mark_running(a)
    store.finish_run(
        a,
        "done",
        metrics={"test_accuracy": 0.9, "lr": 0.5, "status": "x"},
        costs={"gmacs": 2.5},
        timings={"train_s": 4.0},
    )
    store.create_run(_config(extra=1))
    frame = store.runs_frame()
    expected = [
        *FRAME_BASE_COLUMNS,
        "dataset",
        "backbone",
        "num_prompts",
        "placement",
        "lr",
        "seed",
        "extra",
        "test_accuracy",
        "metric.lr",
        "metric.status",
        "gmacs",
        "train_s",
    ]
    assert list(frame.columns) == expected
    row = frame.set_index("id").loc[a]
    assert row["duration_s"] >= 0 and row["metric.lr"] == 0.5 and row["lr"] == 1e-3
    assert json.loads(row["placement"]) == {"layers": [0, 1]}

    csv = store.export_csv(tmp_path / "runs.csv", status="done")
    read = pd.read_csv(csv)
    assert list(read.columns) == [c for c in expected if c != "extra"]
    assert read["id"].tolist() == [a] and read["gmacs"].tolist() == [2.5]
    assert list(RunStore(tmp_path / "empty.sqlite").runs_frame().columns) == list(FRAME_BASE_COLUMNS)
    assert set(RUN_STATUSES) >= set(frame["status"])


# ------------------------------------------------------------------- several processes


def _claim_worker(path, barrier, results):
    store = RunStore(path)
    barrier.wait()
    claimed = []
    while (run := store.claim_next_queued()) is not None:
        claimed.append((run["id"], run["worker_pid"]))
    results.put(claimed)


def _progress_worker(path, run_id, worker, n_events, barrier):
    store = RunStore(path)
    barrier.wait()
    for i in range(n_events):
        if i % 10 == 0:  # mix single appends, batches and reads, like a worker + dashboard
            store.append_progress_many(run_id, [{"worker": worker, "i": i}, {"worker": worker, "i": i + 1}])
            store.progress(run_id, since=i)
        elif i % 10 != 1:
            store.append_progress(run_id, {"worker": worker, "i": i})
    store.update_results(run_id, metrics={f"w{worker}": n_events})


def _start(procs):
    for p in procs:
        p.start()


def _join(procs):
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_claim_is_atomic_across_processes(store):
    ids = [store.create_run(_config(seed=i)) for i in range(20)]
    barrier, results = CTX.Barrier(4), CTX.Queue()
    procs = [CTX.Process(target=_claim_worker, args=(str(store.path), barrier, results)) for _ in range(4)]
    _start(procs)
    per_worker = [results.get(timeout=JOIN_TIMEOUT_S) for _ in procs]  # drain before join
    _join(procs)
    claimed = [run_id for claims in per_worker for run_id, _ in claims]
    assert sorted(claimed) == ids  # every run exactly once
    for claims in per_worker:
        own = [run_id for run_id, _ in claims]
        assert own == sorted(own)  # each worker took the oldest available each time
        assert len({pid for _, pid in claims}) <= 1
    assert {store.get_run(i)["worker_pid"] for i in ids} <= {p.pid for p in procs}
    assert all(r["status"] == "running" for r in store.list_runs())


def test_concurrent_progress_writers(store):
    run_id = store.create_run(_config())
    n_events, n_workers = 60, 4
    barrier = CTX.Barrier(n_workers)
    procs = [
        CTX.Process(target=_progress_worker, args=(str(store.path), run_id, w, n_events, barrier))
        for w in range(n_workers)
    ]
    _start(procs)
    _join(procs)
    events = store.progress(run_id)
    assert len(events) == n_events * n_workers
    for w in range(n_workers):  # each writer's events are all there, in its order
        assert [e["i"] for e in events if e["worker"] == w] == list(range(n_events))
    assert store.get_run(run_id)["metrics"] == {f"w{w}": n_events for w in range(n_workers)}


def test_a_store_reimporting_its_own_export_adds_nothing(store):
    """Live runs have no stored dedupe_key; their export derives one. Importing that file back into the
    same store (a benchmark restoring its checkpoint) must recognise them, not duplicate them."""
    run = store.create_run(_config(), status="running")
    store.finish_run(run, "done", metrics={"acc": 0.9})
    assert store.import_runs(store.export_runs(), source="cli") == 0
    assert len(store.list_runs()) == 1


def test_versions_grow_with_every_change_and_only_then(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    start = store.versions()
    run_id = store.create_run({"dataset": "x"}, status="queued")
    after_create = store.versions()
    assert after_create[0] > start[0] and after_create[1] == start[1]
    store.list_runs()
    store.get_run(run_id)
    assert store.versions() == after_create  # reading changes nothing
    store.append_progress(run_id, {"phase": "train", "step": 1})
    after_progress = store.versions()
    assert after_progress[1] == after_create[1] + 1 and after_progress[0] == after_create[0]
    store.mark_running(run_id)
    store.finish_run(run_id, "done", metrics={"accuracy": 0.5})
    after_finish = store.versions()
    assert after_finish[0] >= after_progress[0] + 2
    store.delete_run(run_id)
    assert store.versions()[0] > after_finish[0]
    assert RunStore(tmp_path / "runs.sqlite").versions() == store.versions()  # another connection, same counters
