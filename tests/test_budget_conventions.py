"""Both compute conventions (executed graph, full graph) and data size as an axis of the answer: the
library side. The Budget explorer's AppTests are in test_budget_page.py."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import recount_full_graph
from vptdash import cli
from vptdash.engine.cost import full_graph_gmacs
from vptdash.engine.train import RunConfig, build_model
from vptdash.runs import recount, reference
from vptdash.runs.store import RunStore
from vptdash.views import budget, charts, report


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTDASH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


TINY = {"dataset": "elpv-binary", "cell_type": None, "backbone": "tiny-random", "resolution": 32}


def run_row(run_id, config, accuracy=0.8, costs=None, *, classes=2, shots=16, seed=0):
    """A finished run as the store lists it; `classes` names its classes (None: not recorded)."""
    metrics = {"accuracy": accuracy, "balanced_accuracy": accuracy, "majority_accuracy": 0.5}
    if classes:
        metrics["class_names"] = [f"c{i}" for i in range(classes)]
        metrics["confusion_matrix"] = [[1] * classes for _ in range(classes)]
    return {
        "id": run_id,
        "status": "done",
        "kind": "train",
        "source": "cli",
        "config": {**TINY, "shots": shots, "seed": seed, **config},
        "metrics": metrics,
        "costs": dict(costs or {}),
        "timings": {},
    }


PROBE = {"tuning": "linear", "num_prompts": 0, "placement": "none"}


def deep(n):
    return {"tuning": "prompt", "num_prompts": n, "placement": "deep"}


def fresh_full_graph(config: dict, classes: int) -> float:
    """The definition: full_graph_gmacs of a model freshly built for the run's configuration."""
    run_config = RunConfig.from_dict({**TINY, **config})
    return full_graph_gmacs(build_model(run_config, classes), run_config.resolution)


# ------------------------------------------------------------------------------------ recount
@pytest.mark.parametrize(
    "config, classes",
    [
        (PROBE, 2),
        (deep(10), 2),
        ({"tuning": "prompt", "num_prompts": 5, "placement": "shallow"}, 3),
        ({"tuning": "prompt", "num_prompts": 4, "placement": "1,3", "skip_blocks": [2]}, 2),
        ({"tuning": "prompt", "num_prompts": 6, "placement": "deep", "prompt_type": "bilinear", "prompt_rank": 2}, 2),
        ({"tuning": "prompt", "num_prompts": 0, "prompt_counts": [3, 0, 2, 1], "placement": "0,2,3"}, 2),
    ],
)
def test_recount_gives_what_a_freshly_built_model_counts(home, config, classes):
    store = RunStore()
    run_id = store.create_run({**TINY, "shots": 16, "seed": 0, **config}, status="running", source="cli")
    metrics = {"accuracy": 0.8, "class_names": [f"c{i}" for i in range(classes)]}
    store.finish_run(run_id, "done", metrics=metrics, costs={"gmacs": 0.001})
    result = recount.fill_full_graph(store)
    assert result.counted == 1 and not result.unknown
    costs = store.get_run(run_id)["costs"]
    assert costs["gmacs_full_graph"] == pytest.approx(fresh_full_graph(config, classes), rel=1e-12)
    assert costs["gmacs"] == 0.001  # nothing else changes
    assert recount.fill_full_graph(store).counted == 0  # counted once


def test_recount_leaves_what_it_cannot_count_unknown_with_one_line(home):
    rows = [
        run_row(1, {**deep(1), "backbone": "no-such-vit"}),  # not a backbone this machine can build
        run_row(2, deep(1), classes=None),  # its number of classes was never stored
        run_row(3, deep(1), costs={"gmacs_full_graph": 9.0}),  # already counted: kept as it is
        run_row(4, {**deep(1), "backbone": "tiny-clip"}),  # CLIP counts its own towers
    ]
    result = recount.fill_full_graph_rows(rows)
    assert result.counted == 0 and set(result.unknown) == {1, 2}
    assert "no-such-vit" in result.unknown[1] and "\n" not in result.unknown[1]
    assert result.unknown[2] == "its number of classes is not stored"
    assert "gmacs_full_graph" not in rows[0]["costs"] and rows[2]["costs"]["gmacs_full_graph"] == 9.0
    assert "gmacs_full_graph" not in rows[3]["costs"]
    assert result.line().startswith("counted the full-graph GMACs of 0 runs; 2 left unknown (#1: ")


def test_runs_recount_then_export_carry_both_conventions(home, tmp_path, capsys):
    store = RunStore()
    run_id = store.create_run({**TINY, "shots": 16, "seed": 0, **deep(3)}, status="running", source="cli")
    store.finish_run(run_id, "done", metrics={"accuracy": 0.8, "class_names": ["a", "b"]}, costs={"gmacs": 0.002})
    assert cli.main(["runs", "recount"]) == 0
    assert capsys.readouterr().out.strip() == "counted the full-graph GMACs of 1 run"
    assert cli.main(["runs", "export", "--csv", str(tmp_path / "runs.csv")]) == 0
    exported = pd.read_csv(tmp_path / "runs.csv")
    assert exported.loc[0, "gmacs"] == pytest.approx(0.002)
    assert exported.loc[0, "gmacs_full_graph"] == pytest.approx(fresh_full_graph(deep(3), 2))


def test_the_recount_script_fills_a_reference_file_once(home, tmp_path):
    path = tmp_path / "ref.json"
    rows = [run_row(1, PROBE, costs={"gmacs": 0.001}), run_row(2, deep(2), costs={"gmacs": 0.002})]
    path.write_text(json.dumps({"meta": {"command": "x"}, "runs": rows}))
    assert recount_full_graph.main([str(path)]) == 0
    content = json.loads(path.read_text())
    assert [r["costs"]["gmacs_full_graph"] for r in content["runs"]] == pytest.approx(
        [fresh_full_graph(PROBE, 2), fresh_full_graph(deep(2), 2)]
    )
    assert "recount_full_graph.py" in content["meta"]["costs_full_graph"]
    before = path.read_text()
    assert recount_full_graph.main([str(path)]) == 0 and path.read_text() == before  # nothing left to count


def test_every_shipped_reference_run_has_both_conventions():
    files = sorted(Path(reference.REFERENCE_DIR).glob("*.json"))
    assert files
    for path in files:
        content = json.loads(path.read_text())
        for row in content["runs"] if isinstance(content, dict) else content:
            costs = row["costs"]
            # deep prompts and the last block's CLS row are computed whole only in the full graph
            assert costs["gmacs_full_graph"] > costs["gmacs"] > 0, (path.name, row["config"])


# ------------------------------------------------------------------------------------ conventions
def test_axis_titles_and_hover_name_the_convention():
    assert charts.COST_AXES["gmacs"] == "GMACs per image (executed graph)"
    assert charts.COST_AXES["gmacs_full_graph"] == "GMACs per image (full graph, as in published tables)"
    rows = [run_row(1, PROBE, 0.7, {"gmacs": 1.0, "gmacs_full_graph": 1.2})]
    agg = budget.aggregate_over_seeds(budget.runs_table(rows))
    for cost, x in (("gmacs", 1.0), ("gmacs_full_graph", 1.2)):
        fig = charts.cost_accuracy_figure(agg, cost=cost)
        assert fig.layout.xaxis.title.text == charts.COST_AXES[cost]
        [trace] = [t for t in fig.data if t.name == "linear probe"]
        assert list(trace.x) == [x]
        assert "GMACs per image, executed graph: 1.000" in trace.hovertext[0]
        assert "GMACs per image, full graph (published tables): 1.200" in trace.hovertext[0]


def test_a_run_without_either_cost_is_cost_unknown_and_never_recommended():
    rows = [
        run_row(1, PROBE, 0.70, {"gmacs": 1.0, "gmacs_full_graph": 1.1}),
        run_row(2, deep(1), 0.72, {"gmacs": 1.01, "gmacs_full_graph": 1.2}),
        run_row(3, deep(50), 0.99, {}),  # the best by far, but what it costs is unknown
    ]
    agg = budget.aggregate_over_seeds(budget.runs_table(rows))
    for cost in ("gmacs", "gmacs_full_graph"):
        known, lines = budget.split_known_cost(agg, cost)
        assert set(known["run_ids"].map(tuple)) == {(1,), (2,)}
        assert len(lines) == 1 and lines[0].startswith("50 deep prompts (#3): cost unknown, no GMACs per image")
        rec = budget.recommend(known, 1.0, cost=cost)
        assert rec.chosen["run_ids"] != [3] and rec.best["run_ids"] != [3]
        [answer] = budget.answers_by_size({"16": rows}, 1.0, cost=cost)
        assert answer.recommendation.chosen["run_ids"] != [3] and answer.cost_unknown == lines
        assert "50 deep" not in answer.recommendation.sentence


def test_the_full_graph_recommendation_trades_against_full_graph_compute():
    # executed: 1 deep prompt costs +1% over the probe; full graph (every prompt through every block): +20%
    rows = [
        run_row(1, PROBE, 0.70, {"gmacs": 1.0, "gmacs_full_graph": 1.0}),
        run_row(2, deep(1), 0.90, {"gmacs": 1.01, "gmacs_full_graph": 1.2}),
    ]
    agg = budget.aggregate_over_seeds(budget.runs_table(rows))
    executed = budget.recommend(agg, 1.0, cost="gmacs")
    full = budget.recommend(agg, 1.0, cost="gmacs_full_graph")
    assert "1.01 GMACs per image" in executed.sentence  # the best is also the cheapest within 1 point
    assert "1.20 full-graph GMACs per image" in full.sentence


def test_the_report_states_both_conventions_whichever_the_page_used():
    rows = [
        run_row(1, PROBE, 0.70, {"gmacs": 1.0, "gmacs_full_graph": 1.1}),
        run_row(2, deep(1), 0.80, {"gmacs": 1.5, "gmacs_full_graph": 2.5}),
        run_row(3, deep(10), 0.795, {"gmacs": 1.2, "gmacs_full_graph": 3.0}),
    ]
    for cost in ("gmacs", "gmacs_full_graph"):
        text = report.build_html_report(rows, tolerance_points=1.0, cost=cost)
        # executed: 10 deep prompts (1.2) is the cheapest within 1 point of 1 deep prompt (1.5);
        # full graph: 1 deep prompt (2.5) is cheaper than 10 deep prompts (3.0), so it is chosen and best
        assert (
            "Recommended, 10 deep prompts: 1.200 GMACs per image on the executed graph (what runs here); "
            "3.000 GMACs per image on the full graph" in text
        ) == (cost == "gmacs")
        assert ("Best, 1 deep prompts: 1.500 GMACs per image on the executed graph" in text) == (cost == "gmacs")
        if cost == "gmacs_full_graph":
            assert "Recommended, 1 deep prompts: 1.500 GMACs per image on the executed graph (what runs here); " in text
            assert "2.500 GMACs per image on the full graph (every token through every block" in text
        assert "GMACs / image (executed graph)" in text and "GMACs / image (full graph)" in text
        assert charts.COST_AXES[cost] in text  # the chart of the chosen convention


# ------------------------------------------------------------------------------------ data sizes
def test_size_labels():
    assert budget.size_label("16") == "16 images per class"
    assert budget.size_label("1") == "1 image per class"
    assert budget.size_label(budget.FULL_SPLIT) == "full training split"
    assert budget.size_label(budget.SIDE_BY_SIDE) == "side by side"
    assert [budget.size_key(s) for s in (16, 64.0, None, float("nan"))] == ["16", "64", "full", "full"]


def test_runs_are_grouped_by_data_size_and_never_mixed():
    rows = [
        run_row(1, PROBE, shots=64),
        run_row(2, PROBE, shots=None),
        run_row(3, PROBE, shots=16),
        run_row(4, deep(1), shots=16),
        run_row(5, deep(1), shots=None),
        run_row(6, deep(1), shots=16, seed=1) | {"config": {**TINY, "backbone": "vit_tiny", "shots": 16}},
        run_row(7, deep(1)) | {"config": {**TINY, "dataset": "elpv", "shots": 16}},  # another data set
    ]
    setup = {**TINY, "shots": 16}
    groups, left_out = budget.runs_by_size(rows, setup)
    assert list(groups) == ["16", "64", "full"]  # fewest images first, the full split last
    assert {k: [r["id"] for r in v] for k, v in groups.items()} == {"16": [3, 4], "64": [1], "full": [2, 5]}
    assert left_out == 1  # the other backbone; another data set is not counted
    groups, left_out = budget.runs_by_size(rows, setup, same_setup=False)
    assert [r["id"] for r in groups["16"]] == [3, 4, 6] and left_out == 0
    assert budget.size_options(groups) == ["16", "64", "full", "side by side"]
    assert budget.size_options({"16": []}) == ["16"]
    assert budget.default_size(budget.size_options(groups), 16) == "16"
    assert budget.default_size(budget.size_options(groups), 8) == "full"  # absent: the most images
    assert budget.default_size(budget.size_options(groups), None) == "full"
    assert list(budget.chosen_sizes(groups, "64")) == ["64"]
    assert list(budget.chosen_sizes(groups, "side by side")) == ["16", "64", "full"]
    assert budget.chosen_sizes(groups, "8") == {}


def test_each_size_gets_its_own_answer():
    # at 16 images the probe is the answer; on the full split 10 deep prompts are far better. Pooled, the
    # 16-image probe would be compared with the full split's prompts: it never is.
    groups = {
        "16": [run_row(1, PROBE, 0.70, {"gmacs": 1.0}), run_row(2, deep(1), 0.701, {"gmacs": 1.01})],
        "full": [
            run_row(3, PROBE, 0.80, {"gmacs": 1.0}, shots=None),
            run_row(4, deep(10), 0.90, {"gmacs": 1.1}, shots=None),
        ],
    }
    answers = budget.answers_by_size(groups, 1.0)
    assert [a.label for a in answers] == ["16 images per class", "full training split"]
    small, full = answers
    assert set(small.table["id"]) == {1, 2} and set(full.table["id"]) == {3, 4}
    assert small.recommendation.chosen["run_ids"] == [1]  # within 1 point and cheaper
    assert full.recommendation.chosen["run_ids"] == [4] and "10 deep prompts" in full.recommendation.sentence
    assert "10 deep" not in small.recommendation.sentence
