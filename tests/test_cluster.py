"""Runs queued from the dashboard go to a real Ray cluster of two node processes on this machine.

One cluster (a head and a second node, one CPU each, separate temp dirs and data dirs) serves both
tests: a sweep on an upload only the driver has on disk, then the same with the second node killed
while it trains a run."""

import hashlib
import io
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import make_image_folder

from tests.raycluster import LocalCluster, session_members
from vptdash.engine.train import RunConfig
from vptdash.methods import search
from vptdash.runs import cluster, jobs, uploads, worker
from vptdash.runs.store import RunStore

pytestmark = pytest.mark.cluster

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    local = LocalCluster(tmp_path_factory.mktemp("raycluster")).start(workers=1)
    try:
        # Connected once, as the dashboard's long-lived worker process is: the tests then share the nodes'
        # warm Ray workers instead of each importing torch again in new ones.
        settings = cluster.ClusterSettings(address=local.address)
        cluster.ClusterRunner(RunStore(tmp_path_factory.mktemp("driver") / "runs.sqlite"), settings).connect()
        local.wait_for_nodes(ray)
        yield local
    finally:
        if ray.is_initialized():
            ray.shutdown()
        local.stop()


def upload_zip(tmp_path: Path) -> str:
    """A tiny image set uploaded as a zip: it lands in the driver's data dir only."""
    folder = make_image_folder(tmp_path / "images", per_class=6, size=32)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in sorted(folder.rglob("*.png")):
            archive.write(file, file.relative_to(folder).as_posix())
    info = uploads.save_zip_upload("cells", buffer.getvalue())
    return uploads.upload_spec(info.slug)


def queue_sweep(store: RunStore, dataset: str, epochs: int) -> str:
    """What the Budget explorer's "Queue" button does (ui.jobqueue.queue_sweep), without Streamlit."""
    base = RunConfig(
        backbone="tiny-random",
        dataset=dataset,
        resolution=32,
        shots=None,
        epochs=epochs,
        batch_size=8,
        measure_latency=False,
    )
    sweep_id, _ = jobs.submit_sweep(store, jobs.sweep_configs(base, [0, 1, 2], ["shallow", "deep"], [0]))
    return sweep_id


def serve_in_background(store: RunStore) -> threading.Thread:
    thread = threading.Thread(target=worker.serve, args=(store,), kwargs={"idle_exit_s": 1.0, "poll_s": 0.2})
    thread.start()
    return thread


def node_busy(node) -> bool:
    """A Ray worker of this node (the session its `ray start` began) is executing a training run now."""
    for pid in session_members(node.pid):
        try:
            if b"train_on_node" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_a_sweep_queued_from_the_dashboard_runs_on_the_cluster_and_lands_in_the_store(two_nodes, isolated_home):
    store = RunStore()
    cluster.save_cluster_settings(store, cluster.ClusterSettings(address=two_nodes.address))  # the UI's setting
    dataset = upload_zip(isolated_home)
    sweep_id = queue_sweep(store, dataset, epochs=1)

    assert worker.serve(store, idle_exit_s=1.0, poll_s=0.2) == 0

    runs = store.list_runs(sweep_id=sweep_id)
    assert len(runs) == 5 and all(r["status"] == "done" for r in runs), [(r["status"], r["error"]) for r in runs]
    copies = set()
    for run in runs:
        assert run["config"]["dataset"] == dataset  # stored as the driver knows it
        assert run["metrics"]["accuracy"] is not None and run["artifact_path"] is not None
        events = store.progress(run["id"])
        assert any(e.get("phase") in ("train", "val") for e in events)  # the curve came back
        copies |= {e["dataset_copy"] for e in events if e.get("dataset_copy")}
    # each node trained on its own content-addressed copy, under its own data dir, not the driver's
    assert copies and all("home-" in c and str(isolated_home) not in c for c in copies)
    assert {Path(c).name for c in copies} == {f"{hashlib.sha256(cluster.pack_dataset(Path(dataset))).hexdigest()}.zip"}


def test_a_search_queued_from_the_dashboard_sends_its_runs_to_the_cluster(two_nodes, isolated_home):
    store = RunStore()
    cluster.save_cluster_settings(store, cluster.ClusterSettings(address=two_nodes.address))
    dataset = upload_zip(isolated_home)
    base = RunConfig(backbone="tiny-random", dataset=dataset, resolution=32, shots=None, epochs=1, batch_size=8)
    spec = search.SearchSpec(prompt_counts=[0, 2], placements=["deep"], seeds=[0], max_runs=2)
    search_id = search.submit_search(store, base, spec)  # what the Budget explorer's search button queues

    assert worker.serve(store, idle_exit_s=1.0, poll_s=0.2) == 0

    # the search ran in the worker (it reads the store) and sent its runs to the cluster
    searched = store.get_run(search_id)
    trials = [r for r in store.list_runs(sweep_id=searched["sweep_id"]) if r["id"] != search_id]
    assert searched["status"] == "done" and len(trials) == 2 and all(t["status"] == "done" for t in trials)
    assert all(any("dataset_copy" in e for e in store.progress(t["id"])) for t in trials)


def test_a_node_killed_mid_sweep_loses_no_run(two_nodes, isolated_home):
    store = RunStore()
    cluster.save_cluster_settings(store, cluster.ClusterSettings(address=two_nodes.address, max_retries=2))
    sweep_id = queue_sweep(store, upload_zip(isolated_home), epochs=40)
    thread = serve_in_background(store)
    deadline = time.monotonic() + 120
    while not node_busy(two_nodes.nodes[1]):
        alive = two_nodes.nodes[1].poll() is None
        assert time.monotonic() < deadline, (
            f"the second node never started a run (its process {'alive' if alive else 'exited'}; "
            f"runs: {[r['status'] for r in store.list_runs(sweep_id=sweep_id)]})"
        )
        time.sleep(0.1)
    two_nodes.kill(two_nodes.nodes[1])
    thread.join(timeout=180)
    assert not thread.is_alive()

    runs = store.list_runs(sweep_id=sweep_id)
    assert len(runs) == 5
    assert {r["status"] for r in runs} <= {"done", "failed"}  # nothing queued or running is left
    lost = [r for r in runs if any("lost on the cluster" in str(e.get("message")) for e in store.progress(r["id"]))]
    assert lost, "the killed node held no run"
    for run in runs:  # sent again to the surviving node, or failed with the reason
        assert run["status"] == "done" or "lost on the Ray cluster" in run["error"]
    assert sum(r["status"] == "done" for r in runs) >= 4


# ------------------------------------------------------------------ unit tests (no cluster): a fake Ray
class FakeRay:
    """Ray's surface the runner uses; every run is lost with its node, every time."""

    class exceptions:
        class TaskCancelledError(Exception):
            pass

        class RayTaskError(Exception):
            pass

        class NodeDiedError(Exception):
            pass

    def __init__(self, lose_every_run=True):
        self.submitted = []
        self.lose = lose_every_run

    def wait(self, refs, num_returns, timeout):
        return list(refs), []

    def get(self, ref):
        raise self.exceptions.NodeDiedError("node 3f2a died\n(details)")

    def cancel(self, ref, force=False):
        pass

    def cluster_resources(self):
        return {"CPU": 2.0}


def fake_runner(store, retries):
    runner = cluster.ClusterRunner(store, cluster.ClusterSettings(address="fake:1", max_retries=retries))
    runner.ray = FakeRay()
    runner.task = type("Task", (), {"remote": lambda self, *a: (runner.ray.submitted.append(a), object())[1]})()
    return runner


def test_a_run_lost_more_often_than_its_retries_fails_with_the_reason(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = store.create_run(RunConfig(backbone="tiny-random").to_dict(), status="running")
    runner = fake_runner(store, retries=2)
    runner.submit(run_id, store.get_run(run_id)["config"])
    rows = []
    while runner.in_flight:
        rows += runner.collect(0.1)
    assert len(runner.ray.submitted) == 3  # the first attempt and two retries, no more
    row = store.get_run(run_id)
    assert (
        row["status"] == "failed" and row["error"] == "lost on the Ray cluster 3 time(s): NodeDiedError: node 3f2a died"
    )
    assert [r["id"] for r in rows] == [run_id]
    assert sum("sent again" in str(e.get("message")) for e in store.progress(run_id)) == 2


def test_the_dashboard_setting_overrides_the_environment(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "runs.sqlite")
    monkeypatch.setenv(cluster.ADDRESS_ENV, "10.0.0.1:6379")
    monkeypatch.setenv(cluster.CPUS_ENV, "2")
    assert cluster.cluster_settings(store) == cluster.ClusterSettings(address="10.0.0.1:6379", cpus_per_run=2.0)
    cluster.save_cluster_settings(store, cluster.ClusterSettings(address=None, gpus_per_run=1.0))
    assert cluster.cluster_settings(store) == cluster.ClusterSettings(address=None, gpus_per_run=1.0)  # this machine
    cluster.settings_path(store).write_text('{"cpus_per_run": -4}')  # nonsense by hand: defaults, no crash
    assert cluster.cluster_settings(store).cpus_per_run == 1.0


def test_an_image_set_packs_to_the_same_bytes_whatever_its_timestamps(tmp_path):
    folder = make_image_folder(tmp_path / "a", per_class=2, size=8)
    first = cluster.pack_dataset(folder)
    for file in folder.rglob("*.png"):
        os.utime(file, (1, 1))
    (folder / ".upload.json").write_text("{}")  # the upload's own metadata does not travel
    assert cluster.pack_dataset(folder) == first
    assert zipfile.ZipFile(io.BytesIO(first)).namelist() == sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*.png")
    )


def test_an_unreachable_cluster_fails_the_queued_runs_with_one_line_each(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "runs.sqlite")
    ids = [jobs.submit_run(store, RunConfig(backbone="tiny-random", num_prompts=n)) for n in (1, 2, 3)]
    dispatcher = cluster.Dispatcher(store, cluster.ClusterSettings(address="10.255.255.1:6379"))
    attempts = []

    def unreachable():
        attempts.append(1)
        raise ConnectionError("Failed to connect to Ray cluster at 10.255.255.1:6379")

    monkeypatch.setattr(dispatcher.runner, "connect", unreachable)
    assert dispatcher.step(0.1) is True
    rows = [store.get_run(i) for i in ids]
    assert all(r["status"] == "failed" for r in rows)
    assert rows[0]["error"] == (
        "cannot reach the Ray cluster at 10.255.255.1:6379: ConnectionError: Failed to connect to Ray cluster at "
        "10.255.255.1:6379"
    )
    assert len(attempts) == 1  # the reason is reused, not Ray's connection timeout waited out per run
    assert dispatcher.step(0.1) is False  # nothing left to do


def test_a_cluster_that_fails_under_the_worker_fails_its_runs_with_the_reason_and_the_worker_goes_on(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    ids = [jobs.submit_run(store, RunConfig(backbone="tiny-random", num_prompts=n)) for n in (1, 2, 3)]
    dispatcher = cluster.Dispatcher(store, cluster.ClusterSettings(address="fake:1"))
    runner = fake_runner(store, retries=2)
    dispatcher.runner = runner

    def gone(refs, num_returns, timeout):
        raise ConnectionError("GCS at fake:1 is unreachable")

    runner.ray.wait = gone
    assert dispatcher.step(0.1) is True  # two runs were out (capacity 2); the head went away
    rows = {i: store.get_run(i) for i in ids}
    out = [r for r in rows.values() if r["status"] == "failed"]
    assert len(out) == 2
    assert all(
        r["error"] == "the Ray cluster at fake:1 failed: ConnectionError: GCS at fake:1 is unreachable" for r in out
    )
    assert [r["status"] for r in rows.values()].count("queued") == 1  # not claimed: still waits, not lost
    assert dispatcher.runner is not runner and not runner.in_flight
