import multiprocessing
import os
import signal
import threading
import time

import pytest

from vptdash import cli
from vptdash.engine.train import RunConfig
from vptdash.runs.store import RunStore

TINY = [
    "--backbone",
    "tiny-random",
    "--resolution",
    "32",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--no-latency",
    "--prompts",
    "0,1,2",
    "--placement",
    "shallow,deep",
    "--quiet",
]
COMPARED = ("backbone", "dataset", "num_prompts", "placement", "tuning", "seed", "epochs", "resolution", "lr")


def sweep(image_folder, store_path, executor):
    code = cli.main(
        ["sweep", "--dataset", str(image_folder), *TINY, "--store", str(store_path), "--executor", executor]
    )
    assert code == 0
    rows = RunStore(store_path).list_runs()
    return sorted(rows, key=lambda r: (r["config"]["num_prompts"], r["config"]["placement"]))


@pytest.mark.slow
def test_ray_sweep_stores_the_same_runs_as_the_local_executor(image_folder, tmp_path):
    pytest.importorskip("ray")
    local = sweep(image_folder, tmp_path / "local.sqlite", "local")
    remote = sweep(image_folder, tmp_path / "ray.sqlite", "ray")
    assert len(local) == len(remote) == 5  # linear probe + {1, 2} prompts x {shallow, deep}
    for a, b in zip(local, remote):
        assert RunConfig.from_dict(a["config"]) == RunConfig.from_dict(b["config"])
        assert b["status"] == "done" and b["metrics"]["accuracy"] is not None
        assert b["artifact_path"] is not None
        assert RunStore(tmp_path / "ray.sqlite").progress(b["id"])  # the curve came back from the cluster
    # same seed, same CPU arithmetic: the same answer wherever it ran
    assert [r["metrics"]["accuracy"] for r in local] == [r["metrics"]["accuracy"] for r in remote]


def test_unknown_executor_is_refused():
    from vptdash.runs.executors import get_executor

    with pytest.raises(ValueError, match="local or ray"):
        get_executor("spark")


def test_two_local_processes_store_the_same_runs_with_latency_measured_once_per_architecture(image_folder, tmp_path):
    store_path = tmp_path / "parallel.sqlite"
    args = [a for a in TINY if a != "--no-latency"]
    assert (
        cli.main(
            [
                "sweep",
                "--dataset",
                str(image_folder),
                *args,
                "--seeds",
                "0,1",
                "--store",
                str(store_path),
                "--processes",
                "2",
            ]
        )
        == 0
    )
    rows = RunStore(store_path).list_runs()
    assert len(rows) == 10 and all(r["status"] == "done" for r in rows)  # (probe + 4 prompt budgets) x 2 seeds
    assert all(r["artifact_path"] and r["metrics"]["accuracy"] is not None for r in rows)
    # two processes split the cores this test may use, each at least one thread
    assert {r["timings"]["threads"] for r in rows} == {max(1, len(os.sched_getaffinity(0)) // 2)}
    by_budget = {}
    for row in rows:
        costs = row["costs"]
        assert costs["latency_ms_b1"] > 0 and costs["gmacs"] > 0
        config = row["config"]
        by_budget.setdefault((config["num_prompts"], config["placement"]), []).append(costs["latency_ms_b1"])
    # measured once per architecture, before the workers started, then written into both seeds' runs
    assert all(len(v) == 2 and v[0] == v[1] for v in by_budget.values())
    assert len({v[0] for v in by_budget.values()}) == len(by_budget)
    # a later parallel sweep on this machine reuses those timings from the cost cache instead of timing again
    again_path = tmp_path / "again.sqlite"
    again_args = ["sweep", "--dataset", str(image_folder), *args, "--store", str(again_path), "--processes", "2"]
    assert cli.main(again_args) == 0
    again = RunStore(again_path).list_runs()
    assert len(again) == 5 and all(r["costs"]["latency_cached"] is True for r in again)
    for row in again:
        config = row["config"]
        assert row["costs"]["latency_ms_b1"] == by_budget[(config["num_prompts"], config["placement"])][0]


def test_a_failing_run_fails_alone_in_a_parallel_sweep(image_folder, tmp_path):
    from vptdash.runs.executors import LocalExecutor

    store = RunStore(tmp_path / "s.sqlite")
    good = RunConfig(
        backbone="tiny-random",
        dataset=str(image_folder),
        resolution=32,
        epochs=1,
        batch_size=8,
        shots=None,
        num_prompts=1,
    )
    bad = RunConfig.from_dict({**good.to_dict(), "dataset": str(tmp_path / "vanished")})
    rows = LocalExecutor(processes=2).run(store, [good, bad], sweep_id="s")
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert rows[0]["costs"]["latency_ms_b1"] > 0  # the bad config did not cost the good one its latency
    assert "vanished" in rows[1]["error"] and "Traceback" not in rows[1]["error"]  # a user error, said plainly


def test_architecture_key_ignores_what_only_changes_training():
    from vptdash.runs.executors import architecture_key

    base = RunConfig(num_prompts=10, placement="deep")
    assert architecture_key(base) == architecture_key(
        RunConfig(num_prompts=10, placement="deep", seed=3, lr=0.1, shots=4, precision="bf16")
    )
    assert architecture_key(base) != architecture_key(RunConfig(num_prompts=5, placement="deep"))
    assert architecture_key(base) != architecture_key(RunConfig(num_prompts=10, placement="shallow"))


def test_zero_processes_are_refused(image_folder, capsys):
    assert cli.main(["sweep", "--dataset", str(image_folder), *TINY, "--processes", "0"]) == 2
    assert "--processes" in capsys.readouterr().err


def test_a_worker_process_killed_in_a_parallel_sweep_fails_its_run_alone(image_folder, tmp_path):
    """SIGKILL one of the two worker processes while it trains: its run fails saying so, the other runs
    (the one on the surviving process and those not started yet) finish, and nothing is left 'running'."""
    from vptdash.runs.executors import LocalExecutor

    store = RunStore(tmp_path / "s.sqlite")
    base = dict(backbone="tiny-random", dataset=str(image_folder), resolution=32, batch_size=2, measure_latency=False)
    configs = [RunConfig(**base, epochs=20, num_prompts=1)] + [
        RunConfig(**base, epochs=2, num_prompts=n) for n in (2, 3, 4)
    ]
    killed = {}

    def kill_one_worker_mid_run() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            children = multiprocessing.active_children()
            training = [r for r in store.list_runs(status="running") if store.progress(r["id"])]
            if len(children) == 2 and training:
                victim = children[0]
                killed["pid"] = victim.pid
                os.kill(victim.pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_one_worker_mid_run, daemon=True)
    watcher.start()
    rows = LocalExecutor(processes=2).run(store, configs, sweep_id="s")
    watcher.join()
    assert killed, "no worker was killed"
    statuses = sorted(r["status"] for r in rows)
    assert statuses == ["done", "done", "done", "failed"], [(r["status"], r["error"]) for r in rows]
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert (
        "worker process died" in failed["error"]
        and "killed by SIGKILL" in failed["error"]
        and "Traceback" not in failed["error"]
    )
    assert store.list_runs(status="running") == []
