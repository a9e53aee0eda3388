import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from vptdash import cli
from vptdash.engine.train import RunConfig
from vptdash.runs.jobs import execute_run, submit_run, submit_sweep, sweep_configs
from vptdash.runs.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--backbone", "tiny-random", "--resolution", "32", "--epochs", "2", "--batch-size", "8", "--no-latency"]


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_train_json_has_every_key(image_folder, capsys):
    code = cli.main(["train", "--dataset", str(image_folder), "--prompts", "3", "--placement", "0,2", *TINY, "--json"])
    result = last_json_line(capsys.readouterr().out)
    assert code == 0
    assert set(cli.JSON_KEYS) <= set(result)
    assert result["status"] == "done" and isinstance(result["run_id"], int)
    # both compute conventions: every token through every block costs more than the rows actually computed
    assert result["gmacs_full_graph"] > result["gmacs"] > 0
    assert result["precision"] in ("fp32", "bf16")  # "auto" resolved by measurement
    assert result["compiled"] is False and result["compile_reason"].startswith("not compiled")  # a short run
    row = RunStore().get_run(result["run_id"])
    assert row["config"]["placement"] == "0,2" and row["config"]["shots"] is None  # whole training split
    assert row["artifact_path"] and Path(row["artifact_path"]).exists()


def test_train_in_a_fresh_process_prints_json_last(image_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "vptdash", "train", "--dataset", str(image_folder), *TINY, "--shots", "4", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert last_json_line(out.stdout)["status"] == "done"


def test_bad_dataset_fails_clearly_and_is_stored(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli.main(["train", "--dataset", str(empty), *TINY, "--json"])
    result = last_json_line(capsys.readouterr().out)
    assert code == 1 and result["status"] == "failed"
    assert "no image files" in result["error"].lower()
    assert "Traceback" not in RunStore().get_run(result["run_id"])["error"]


def test_absurd_budget_is_refused_before_anything_is_stored(image_folder, capsys):
    assert cli.main(["train", "--dataset", str(image_folder), *TINY, "--prompts", "5000"]) == 2
    assert "prompt count must be between 0 and 1000" in capsys.readouterr().err
    assert RunStore().list_runs() == []


def test_sweep_stores_every_run_and_exports(image_folder, tmp_path, capsys):
    code = cli.main(
        [
            "sweep",
            "--dataset",
            str(image_folder),
            *TINY,
            "--prompts",
            "0,2",
            "--placement",
            "shallow,deep",
            "--seeds",
            "0,1",
            "--json",
        ]
    )
    assert code == 0
    rows = RunStore().list_runs()
    assert len(rows) == 2 + 2 * 2  # linear probe per seed + 2 placements x 2 seeds
    assert len({row["sweep_id"] for row in rows}) == 1
    assert all(row["status"] == "done" for row in rows)
    cli.main(["runs", "list"])
    assert "linear" in capsys.readouterr().out
    csv = tmp_path / "runs.csv"
    cli.main(["runs", "export", "--csv", str(csv)])
    frame = pd.read_csv(csv)
    assert len(frame) == 6 and {"accuracy", "gmacs", "num_prompts", "placement"} <= set(frame.columns)


def test_sweep_grid_expansion():
    configs = sweep_configs(RunConfig(), [0, 1, 5], ["shallow", "deep"], [0, 1])
    labels = sorted((c.label(), c.seed) for c in configs)
    assert len(configs) == 2 + 2 * 2 * 2
    assert ("linear probe", 0) in labels and ("5 deep prompts", 1) in labels
    assert len(sweep_configs(RunConfig(), [5], ["deep"], [0])) == 2  # the baseline always comes along
    assert len(sweep_configs(RunConfig(), [5], ["deep"], [0], include_linear_probe=False)) == 1


def test_placement_argument_parsing():
    assert cli.parse_placements("shallow,deep") == ["shallow", "deep"]
    assert cli.parse_placements("0,5,11") == ["0,5,11"]
    assert cli.parse_placements("shallow;0,5,11") == ["shallow", "0,5,11"]


def test_queued_run_cancelled_by_request(image_folder):
    store = RunStore()
    run_id = submit_run(
        store,
        RunConfig(
            backbone="tiny-random",
            dataset=str(image_folder),
            resolution=32,
            epochs=50,
            batch_size=4,
            measure_latency=False,
        ),
    )
    store.mark_running(run_id)
    store.request_cancel(run_id)
    row = execute_run(store, run_id)
    assert row["status"] == "cancelled"
    assert row["metrics"].get("accuracy") is None


def test_queued_sweep_runs_through_execute_run(image_folder):
    store = RunStore()
    configs = sweep_configs(
        RunConfig(backbone="tiny-random", dataset=str(image_folder), resolution=32, epochs=1, measure_latency=False),
        [2],
        ["shallow"],
        [0],
    )
    sweep_id, ids = submit_sweep(store, configs)
    assert [store.get_run(i)["status"] for i in ids] == ["queued", "queued"]
    for run_id in ids:
        assert execute_run(store, run_id)["status"] == "done"
    assert store.progress(ids[1])[-1]["phase"] in ("cost", "test")


# ----------------------------------------------------------------------------- sweep --resume
RESUME_GRID = ["--prompts", "0,2,4", "--placement", "shallow,deep", "--seeds", "0"]


def config_key(row: dict) -> str:
    return json.dumps(RunConfig.from_dict(row["config"]).to_dict(), sort_keys=True)


@pytest.fixture
def ctrl_c_as_at_a_terminal():
    """Python's Ctrl-C handler for SIGINT while the test runs. A non-interactive shell that starts pytest in
    the background (CI's does) leaves SIGINT ignored, and then the Ctrl-C the test sends does nothing."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_an_interrupted_sweep_resumes_with_only_the_missing_configurations(
    image_folder, tmp_path, ctrl_c_as_at_a_terminal
):
    """Ctrl-C (a real SIGINT to the main thread) while the sweep's third run trains; `--resume` then runs
    the configurations without a finished run, each once."""
    store_path = tmp_path / "runs.sqlite"
    common = ["sweep", "--dataset", str(image_folder), *TINY, *RESUME_GRID, "--store", str(store_path), "--quiet"]
    store = RunStore(store_path)
    fired = threading.Event()

    def interrupt_mid_run() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            running = store.list_runs(status="running")
            if len(store.list_runs(status="done")) >= 2 and running and store.progress(running[0]["id"]):
                fired.set()
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=interrupt_mid_run, daemon=True)
    watcher.start()
    sigint_before = signal.getsignal(signal.SIGINT)
    assert cli.main(common) == 130  # Ctrl-C: the run in progress is stored as cancelled, one line, exit 130
    assert fired.is_set()
    # the bookkeeping ignored a second Ctrl-C; afterwards this process's Ctrl-C works again (it did not,
    # and a later interrupted command in the same process then ran to its end)
    assert signal.getsignal(signal.SIGINT) is sigint_before
    first = store.list_runs()
    assert not [r for r in first if r["status"] == "running"]  # nothing left looking alive
    first_done = {config_key(r): r["id"] for r in first if r["status"] == "done"}
    assert 2 <= len(first_done) < 5, [r["status"] for r in first]  # interrupted part-way
    # the grid: linear probe + {2, 4} prompts x {shallow, deep}, seed 0
    grid = {
        config_key({"config": c.to_dict()})
        for c in sweep_configs(
            cli.config_from_args(cli.build_parser().parse_args(common)), [0, 2, 4], ["shallow", "deep"], [0]
        )
    }
    assert len(grid) == 5 and set(first_done) <= grid

    assert cli.main([*common, "--resume"]) == 0
    after = RunStore(store_path).list_runs()
    new = [r for r in after if r["id"] not in {r["id"] for r in first}]
    # exactly the configurations that had no finished run, each once, all in one new sweep
    assert sorted(config_key(r) for r in new) == sorted(grid - set(first_done))
    assert all(r["status"] == "done" for r in new) and len({r["sweep_id"] for r in new}) == 1
    done = [config_key(r) for r in after if r["status"] == "done"]
    assert sorted(done) == sorted(grid)  # every configuration done, none twice
    # the first pass's finished runs are kept as they were, not run again
    assert {config_key(r): r["id"] for r in after if r["id"] in first_done.values()} == first_done

    # resuming a complete sweep runs nothing
    assert cli.main([*common, "--resume"]) == 0
    assert len(RunStore(store_path).list_runs()) == len(after)


def test_resume_runs_a_failed_configuration_again_and_a_grown_grid_only_its_new_part(image_folder, tmp_path):
    store_path = tmp_path / "runs.sqlite"
    base = ["sweep", "--dataset", str(image_folder), *TINY, "--store", str(store_path), "--quiet"]
    grid = ["--prompts", "0,2", "--placement", "deep"]
    assert cli.main([*base, *grid, "--seeds", "0"]) == 0
    store = RunStore(store_path)
    probe, prompted = sorted(store.list_runs(), key=lambda r: r["config"]["num_prompts"])
    store.finish_run(prompted["id"], "failed", error="interrupted")  # a run that did not finish
    assert cli.main([*base, *grid, "--seeds", "0,1", "--resume"]) == 0
    new = [r for r in store.list_runs() if r["id"] not in (probe["id"], prompted["id"])]
    ran = sorted((r["config"]["seed"], r["config"]["num_prompts"]) for r in new)
    assert ran == [(0, 2), (1, 0), (1, 2)]  # the failed one again, and seed 1's two; seed 0's probe not again
    assert all(r["status"] == "done" for r in new)
