import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

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
