"""The budget search: its rule agrees with the dashboard's recommendation, it spends fewer runs than the
grid when the answer is clear, it stays within its budget, and as a job its runs land in the store."""

import json
import random
from pathlib import Path

import pytest

from benchmarks import search_replay
from vptdash import cli
from vptdash.engine.train import RunConfig
from vptdash.methods import search
from vptdash.runs.store import RunStore

pytest.importorskip("optuna")


def fake_run(candidate: dict, seed: int, accuracy: float) -> dict:
    cost = 1.0 + 0.01 * candidate["num_prompts"] + (0.5 if candidate["placement"] == "shallow" else 0.0)
    return {
        "status": "done",
        "config": {**candidate, "seed": seed},
        "metrics": {"accuracy": accuracy},
        "costs": {"gmacs": cost},
    }


def test_the_search_rule_is_the_cheapest_mean_within_the_tolerance_of_the_best_mean():
    stats = {
        "probe": {"mean": 0.700, "cost": 1.0},
        "1 deep": {"mean": 0.745, "cost": 1.1},
        "10 deep": {"mean": 0.760, "cost": 1.4},
        "50 deep": {"mean": 0.760, "cost": 2.0},  # ties the best mean, dearer: not the best
        "10 shallow": {"mean": float("nan"), "cost": 1.2},  # no finished seed: never chosen
    }
    assert search.cheapest_within(stats, 0.5) == ("10 deep", "10 deep")
    assert search.cheapest_within(stats, 1.5) == ("10 deep", "1 deep")  # 76.0 - 74.5 = 1.5 points: inside
    assert search.cheapest_within(stats, 1.4) == ("10 deep", "10 deep")
    assert search.cheapest_within(stats, 6.0) == ("10 deep", "probe")
    assert search.cheapest_within({"a": {"mean": float("nan"), "cost": 1.0}}, 1.0) is None


def run_search(spec: search.SearchSpec, accuracy_of) -> tuple[search.BudgetSearch, int]:
    engine = search.BudgetSearch(spec)
    runs = 0
    while batch := engine.ask(1):
        for candidate, seed in batch:
            engine.tell(candidate, seed, fake_run(candidate, seed, accuracy_of(candidate, seed)))
            runs += 1
    return engine, runs


def test_a_clear_answer_takes_fewer_runs_than_the_grid():
    spec = search.SearchSpec(prompt_counts=[0, 1, 5, 10, 50], placements=["shallow", "deep"], seeds=[0, 1, 2, 3])
    spec.max_runs = 36  # the grid: 9 configurations x 4 seeds

    def accuracy(candidate, seed):  # 10 deep prompts are clearly best; seeds move results by 0.2 points
        top = candidate["num_prompts"] == 10 and candidate["placement"] == "deep"
        return (0.9 if top else 0.6 + 0.001 * candidate["num_prompts"]) + 0.002 * (seed % 2)

    engine, runs = run_search(spec, accuracy)
    best, chosen = engine.answer()
    assert engine.summary()["chosen"]["label"] == "10 deep prompts"
    assert runs < 36 / 2


def test_the_search_never_spends_more_than_its_budget_and_says_what_is_open():
    spec = search.SearchSpec(seeds=[0, 1, 2], max_runs=7)
    rng = random.Random(0)
    engine, runs = run_search(spec, lambda c, s: rng.uniform(0.5, 0.8))
    assert runs == 7
    summary = engine.summary()
    assert summary["runs"] == 7 and summary["budget"] == 7 and summary["grid_runs"] == 33
    assert summary["explored"] <= 7 and "chosen" in summary


def test_a_failed_run_counts_no_result_and_the_configuration_is_tried_with_its_next_seed():
    spec = search.SearchSpec(prompt_counts=[0, 1], placements=["deep"], seeds=[0, 1], max_runs=4)
    engine = search.BudgetSearch(spec)
    asked = []
    while batch := engine.ask(1):
        candidate, seed = batch[0]
        asked.append((candidate["num_prompts"], seed))
        failed = candidate["num_prompts"] == 1 and seed == 0
        engine.tell(candidate, seed, {"status": "failed"} if failed else fake_run(candidate, seed, 0.7))
    assert len(asked) == len(set(asked))
    assert (1, 1) in asked  # the configuration gets its next seed instead
    assert engine.stats()[search.candidate_key(engine.candidates[1])]["n"] == 1


def test_a_search_from_the_cli_stores_its_runs_and_its_answer(image_folder, tmp_path, capsys):
    store_path = tmp_path / "runs.sqlite"
    code = cli.main(
        ["search", "--dataset", str(image_folder), "--backbone", "tiny-random", "--resolution", "32", "--epochs", "1"]
        + ["--batch-size", "8", "--no-latency", "--prompts", "0,1", "--placement", "deep", "--seeds", "0,1"]
        + ["--max-runs", "3", "--store", str(store_path), "--json", "--quiet"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    store = RunStore(store_path)
    row = store.get_run(out["run_id"])
    assert row["kind"] == "search" and row["status"] == "done", row["error"]
    children = [r for r in store.list_runs(sweep_id=row["sweep_id"]) if r["id"] != row["id"]]
    assert 1 <= len(children) <= 3 and out["runs"] == len(children)
    assert all(c["parent_id"] == row["id"] and c["status"] == "done" for c in children)
    state = search.search_state(store, row["id"])
    assert state["phase"] == "result" and state["chosen"]["label"] == out["chosen"]
    assert not row["metrics"]  # a search is no point on the accuracy-vs-cost chart


def test_a_search_with_an_impossible_configuration_is_refused_before_anything_runs(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    with pytest.raises(Exception, match="prompt count"):
        search.submit_search(store, RunConfig(backbone="tiny-random"), search.SearchSpec(prompt_counts=[5000]))
    assert store.list_runs() == []


def test_the_replay_benchmark_runs_on_the_shipped_reference():
    rows, info = search_replay.measure(2, [1.0], z=search.DEFAULT_Z)
    assert info["grid"] == 33 and rows[0]["truth_label"]
    assert 0 <= rows[0]["hit_rate"] <= 1 and rows[0]["runs_max"] <= 33
    assert "Target" in search_replay.section(rows, info)


def test_the_budget_explorer_starts_a_search_and_the_sidebar_saves_the_cluster(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from vptdash.runs import cluster, reference, worker

    monkeypatch.setenv("VPTDASH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VPTDASH_NO_WARMUP", "1")
    monkeypatch.setattr(reference, "REFERENCE_FILE", tmp_path / "none.json")
    monkeypatch.setattr(worker, "ensure_worker", lambda store, **kw: True)
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60)
    at.run()
    at.session_state["active_backbone"] = "tiny-random"
    at.session_state["active_resolution"] = 32
    at.switch_page("app_pages/budget.py").run()
    assert not at.exception, [e.message for e in at.exception]
    at.button(key="search_start").click().run()
    assert not at.exception, [e.message for e in at.exception]
    store = RunStore()
    (row,) = store.list_runs(kind="search")
    assert row["status"] == "queued" and row["config"]["search"]["tolerance"] == 1.0

    at.text_input(key="cluster_address").input("10.1.2.3:6379")  # inside a form: sent with its button
    at.button(key="cluster_save").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert cluster.cluster_settings(store).address == "10.1.2.3:6379"
