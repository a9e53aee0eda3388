"""The shipped reference: runs imported with their trained prompts, and the resumable script that makes it."""

import json

import pandas as pd
import pytest
from safetensors.torch import save_file

from benchmarks import reference_sweep
from vptdash.engine.train import RunConfig, run_training
from vptdash.methods.attention import load_trained_model
from vptdash.runs import reference
from vptdash.runs.store import RunStore


def _reference_file(tmp_path, image_folder, *, with_file: bool = True):
    config = RunConfig(
        backbone="tiny-random",
        dataset=str(image_folder),
        resolution=32,
        shots=None,
        epochs=1,
        batch_size=8,
        lr=1e-2,
        num_prompts=2,
        placement="deep",
        measure_latency=False,
    )
    result = run_training(config, compute_costs=False)
    folder = tmp_path / "ref"
    (folder / "artifacts").mkdir(parents=True)
    if with_file:
        save_file(result.trainable_state, str(folder / "artifacts" / "a.safetensors"))
    row = {
        "config": config.to_dict(),
        "kind": "train",
        "metrics": result.metrics,
        "costs": {},
        "dedupe_key": "k1",
        "artifact": "a.safetensors",
    }
    path = folder / "reference.json"
    path.write_text(json.dumps({"meta": {"command": "test"}, "runs": [row]}))
    return path, result


def test_reference_runs_arrive_with_their_trained_prompts(tmp_path, image_folder):
    path, result = _reference_file(tmp_path, image_folder)
    store = RunStore(tmp_path / "runs.sqlite")
    assert reference.load_reference(store, path) == 1
    (run,) = store.list_runs(source="precomputed")
    trained = load_trained_model(store, run["id"])
    for name, value in result.trainable_state.items():
        assert trained.model.trainable_state()[name].equal(value)
    assert reference.load_reference(store, path) == 0  # idempotent: nothing new, the artifact kept
    assert store.get_run(run["id"])["artifact_path"] is not None


def test_a_missing_shipped_artifact_leaves_the_run_without_one(tmp_path, image_folder):
    path, _ = _reference_file(tmp_path, image_folder, with_file=False)
    store = RunStore(tmp_path / "runs.sqlite")
    assert reference.load_reference(store, path) == 1
    (run,) = store.list_runs(source="precomputed")
    assert run["artifact_path"] is None


@pytest.mark.skipif(
    not (reference.EXAMPLES_FILE.is_file() or reference.REFERENCE_V2_FILE.is_file()),
    reason="no trained reference runs shipped yet (benchmarks/reference_sweep.py --write-reference)",
)
def test_fresh_install_has_a_trained_reference_run_the_attention_page_can_load(tmp_path):
    store = RunStore(tmp_path / "fresh.sqlite")
    assert reference.load_reference(store) > 0
    with_state = [run for run in store.list_runs(source="precomputed") if run["artifact_path"]]
    assert with_state
    trained = load_trained_model(store, with_state[0]["id"])
    assert trained.config.num_prompts > 0 and trained.class_names


# ------------------------------------------------------------------------------------ the script
def _finished_row(config):
    """What `reference_sweep.run_one` returns for a finished run, with made-up figures."""
    metrics = {"accuracy": 0.5, "balanced_accuracy": 0.5, "lr": 1e-3, "lr_source": "validation", "collapsed": False}
    key = reference_sweep.run_key(config)
    return {
        "config": config.to_dict(),
        "status": "done",
        "metrics": metrics,
        "timings": {"machine": {}},
        "dedupe_key": key,
    }


def test_reference_sweep_appends_each_run_and_resumes(tmp_path, monkeypatch):
    ran = []

    def fake_run(config):
        ran.append(config)
        return _finished_row(config)

    monkeypatch.setattr(reference_sweep, "run_one", fake_run)
    checkpoint = tmp_path / "checkpoint.json"
    configs = reference_sweep.grid(["elpv-binary"], ["16"], [0, 10], ["deep"], [0])
    assert [c.is_linear_probe for c in configs] == [True, False]
    assert all(c.lr == "auto" and c.shots == 16 for c in configs)
    reference_sweep.sweep(configs[:1], checkpoint, resume=False)  # "stopped" after the first run
    assert len(json.loads(checkpoint.read_text())["runs"]) == 1
    with pytest.raises(SystemExit, match="--resume"):  # never overwrites finished runs by accident
        reference_sweep.sweep(configs, checkpoint, resume=False)
    reference_sweep.sweep(configs, checkpoint, resume=True)
    assert len(ran) == 2 and not ran[1].is_linear_probe  # only the missing run was trained
    assert len(json.loads(checkpoint.read_text())["runs"]) == 2


def test_a_run_another_sweep_finished_meanwhile_is_not_trained_again(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint.json"
    configs = reference_sweep.grid(["elpv-binary"], ["16"], [0, 10], ["deep"], [0])
    ran = []

    def fake_run(config):  # while this sweep trains its first run, a parallel sweep finishes the second
        ran.append(config)
        content = reference_sweep.read_checkpoint(checkpoint)
        content["runs"].append(_finished_row(configs[1]))
        reference_sweep.write_json(checkpoint, content)
        return _finished_row(config)

    monkeypatch.setattr(reference_sweep, "run_one", fake_run)
    reference_sweep.sweep(configs, checkpoint, resume=True)
    assert ran == [configs[0]]
    assert len(json.loads(checkpoint.read_text())["runs"]) == 2


def test_reference_grid_spans_data_sizes():
    configs = reference_sweep.grid(
        ["elpv-binary", "elpv"], ["16", "64", "full"], [0, 1, 5, 10, 50], ["shallow", "deep"], [0, 1, 2]
    )
    assert len(configs) == 2 * 3 * 3 * (1 + 4 * 2)  # the probe once per seed, not once per placement
    assert {c.shots for c in configs} == {16, 64, None}
    assert len({reference_sweep.run_key(c) for c in configs}) == len(configs)


def test_the_seed_spread_line_sorts_configurations_by_the_target_and_names_what_the_probe_explains():
    frame = pd.DataFrame(
        [
            {"label": "linear probe", "n_seeds": 3, "num_prompts": 0, "balanced_accuracy_std": 0.005},
            {"label": "10 deep prompts", "n_seeds": 3, "num_prompts": 10, "balanced_accuracy_std": 0.029},
            {"label": "1 deep prompts", "n_seeds": 3, "num_prompts": 1, "balanced_accuracy_std": 0.015},
            {"label": "5 deep prompts", "n_seeds": 1, "num_prompts": 5, "balanced_accuracy_std": float("nan")},
        ]
    )
    (line,) = [t for t in reference_sweep._spread_lines(frame, "balanced_accuracy_mean", "64") if t]
    assert "within it linear probe (0.5), 1 deep prompts (1.5); above it 10 deep prompts (2.9)." in line
    assert "5 deep prompts" not in line  # one seed: no spread to judge
    assert "its 0.5 points are the seeds' different draws of training images" in line
    (line,) = [t for t in reference_sweep._spread_lines(frame, "balanced_accuracy_mean", "full") if t]
    assert "Every seed trains on the same images here" in line
    assert reference_sweep._spread_lines(frame[frame["n_seeds"] < 2], "balanced_accuracy_mean", "64") == []
