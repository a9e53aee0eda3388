"""Runs queued from the dashboard go to a real Ray cluster of two node processes on this machine.

One cluster (a head and a second node, one CPU each, separate temp dirs and data dirs) serves both
tests: a sweep on an upload only the driver has on disk, then the same with the second node killed
while it trains a run."""

import hashlib
import io
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import make_image_folder

from tests.raycluster import LocalCluster, session_members
from vptdash.engine.train import RunConfig
from vptdash.runs import cluster, jobs, uploads, worker
from vptdash.runs.store import RunStore

pytestmark = pytest.mark.cluster

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    local = LocalCluster(tmp_path_factory.mktemp("raycluster")).start(workers=1)
    try:
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


def test_a_node_killed_mid_sweep_loses_no_run(two_nodes, isolated_home):
    store = RunStore()
    cluster.save_cluster_settings(store, cluster.ClusterSettings(address=two_nodes.address, max_retries=2))
    sweep_id = queue_sweep(store, upload_zip(isolated_home), epochs=40)
    thread = serve_in_background(store)
    deadline = time.monotonic() + 120
    while not node_busy(two_nodes.nodes[1]):
        assert time.monotonic() < deadline, "the second node never started a run"
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
