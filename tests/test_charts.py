"""charts.py: the figures carry the right points, traces and labels (no rendering)."""

import numpy as np
import pytest
from test_budget import make_run

from vptdash.views import budget, charts, style


@pytest.fixture()
def agg():
    rows = [
        make_run(1, 0, tuning="linear", accuracy=0.80, gmacs=1.0, latency=2.0, params=770),
        make_run(2, 10, seed=0, accuracy=0.84, gmacs=1.47, latency=3.0),
        make_run(3, 10, seed=1, accuracy=0.86, gmacs=1.47, latency=3.2),
        make_run(4, 50, "deep", accuracy=0.87, gmacs=4.71, latency=7.8, source="live"),
        make_run(5, 50, "0,5,11", accuracy=0.85, gmacs=4.71, latency=7.9),
        make_run(6, 5, "bilinear-ish", accuracy=0.82, gmacs=1.2, latency=2.5),  # a future family label
    ]
    table = budget.aggregate_over_seeds(budget.runs_table(rows))
    table.loc[table["placement"] == "bilinear-ish", "family"] = "bilinear"
    return table


def by_trace(fig):
    points = {}
    for point in charts.figure_points(fig):
        points.setdefault(point["trace"], []).append((point["x"], point["y"]))
    return points


def test_cost_accuracy_one_trace_per_family_with_expected_points(agg):
    fig = charts.cost_accuracy_figure(agg)
    points = by_trace(fig)
    families = ["linear probe", "shallow", "deep", "custom blocks", "bilinear"]
    assert [t.name for t in fig.data if t.name in families] == families  # FAMILY_ORDER, unknown last
    assert points["linear probe"] == [(1.0, pytest.approx(80.0))]
    assert points["shallow"] == [(1.47, pytest.approx(85.0))]  # mean of two seeds, in %
    assert points["deep"] == [(4.71, pytest.approx(87.0))]
    assert points["Pareto front"] == [
        (1.0, pytest.approx(80.0)),
        (1.2, pytest.approx(82.0)),
        (1.47, pytest.approx(85.0)),
        (4.71, pytest.approx(87.0)),
    ]
    front = next(t for t in fig.data if t.name == "Pareto front")
    assert front.line.shape == "hv"
    shallow = next(t for t in fig.data if t.name == "shallow")
    # 95% t interval of two seeds: t(1 df) = 12.706 times s / sqrt(2), s = 0.01414 -> 12.706 points each way
    assert shallow.error_y.array[0] == pytest.approx(12.706, abs=1e-6)
    assert shallow.error_y.arrayminus[0] == pytest.approx(12.706, abs=1e-6)
    assert np.std([0.84, 0.86], ddof=1) / np.sqrt(2) == pytest.approx(0.01)
    assert shallow.marker.color == style.FAMILY_COLORS["shallow"]
    assert "2, 3" in shallow.hovertext[0] and "accuracy: 85.0% (95% CI 72.3 to 97.7)" in shallow.hovertext[0]
    linear = next(t for t in fig.data if t.name == "linear probe")
    assert linear.error_y.array is None  # one seed: no spread, no bar
    assert "accuracy: 80.0% (one seed: no spread)" in linear.hovertext[0]
    deep = next(t for t in fig.data if t.name == "deep")
    assert list(deep.marker.symbol) == ["diamond"] and list(shallow.marker.symbol) == ["circle"]
    names = {t.name for t in fig.data}
    assert charts.SOURCE_NAMES["circle"] in names and charts.SOURCE_NAMES["diamond"] in names
    assert "Chance: majority class (70.0%)" in names
    assert fig.layout.xaxis.title.text == "GMACs per image (executed graph)"  # the convention named
    assert fig.layout.yaxis.title.text == "Test accuracy (%)"
    assert fig.layout.title.text and fig.layout.font.size == style.BASE_FONT_SIZE


def test_points_made_here_stand_out_from_precomputed_ones():
    """A configuration with a seed run here (even next to precomputed seeds) is a diamond, larger and
    opaque with a dark outline; only-precomputed configurations are small faded circles."""
    rows = [
        make_run(1, 0, tuning="linear", accuracy=0.80, gmacs=1.0),
        make_run(2, 10, seed=0, accuracy=0.84, gmacs=1.47),
        make_run(3, 10, seed=1, accuracy=0.86, gmacs=1.47, source="live"),  # joins a precomputed seed
        make_run(4, 50, "deep", accuracy=0.87, gmacs=4.71, source="cli"),
    ]
    agg = budget.aggregate_over_seeds(budget.runs_table(rows))
    fig = charts.cost_accuracy_figure(agg)
    marks = {}
    for trace in fig.data:
        if trace.mode == "markers" and trace.x and trace.x[0] is not None:
            for i, x in enumerate(trace.x):
                marks[x] = (
                    trace.marker.symbol[i],
                    trace.marker.size[i],
                    trace.marker.opacity[i],
                    trace.marker.line.color[i],
                )
    assert marks[1.0] == ("circle", charts.MARKER_SIZE, charts.PRECOMPUTED_OPACITY, "white")
    for x in (1.47, 4.71):  # mixed and CLI-only
        assert marks[x] == ("diamond", charts.HERE_SIZE, 1.0, "#111")
    assert charts.HERE_SIZE > charts.MARKER_SIZE and charts.PRECOMPUTED_OPACITY < 1
    names = [t.name for t in fig.data]
    assert charts.SOURCE_NAMES["diamond"] in names and not any("■" in (n or "") for n in names)
    assert charts.made_here("mixed") and charts.made_here("cli") and not charts.made_here("precomputed")


def test_recommendation_and_highlight(agg):
    rec = budget.recommend(agg, 2.5)
    fig = charts.cost_accuracy_figure(agg, recommendation=rec, highlight_ids=[4])
    points = by_trace(fig)
    assert points["Recommended"] == [(1.47, pytest.approx(85.0))]
    assert any("Recommended" in (a.text or "") for a in fig.layout.annotations)
    deep = next(t for t in fig.data if t.name == "deep")
    shallow = next(t for t in fig.data if t.name == "shallow")
    assert list(deep.marker.size) == [charts.HIGHLIGHT_SIZE] and list(shallow.marker.size) == [charts.MARKER_SIZE]


def test_params_axis_goes_log_when_spanning_decades(agg):
    agg = agg.copy()
    agg.loc[agg["family"] == "deep", "params_trainable"] = 5_000_000
    fig = charts.cost_accuracy_figure(agg, cost="params_trainable")
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.title.text == "Trainable parameters"
    assert charts.cost_accuracy_figure(agg, cost="gmacs").layout.xaxis.type != "log"


def test_cost_accuracy_empty_and_missing_costs(agg):
    assert charts.figure_points(charts.cost_accuracy_figure(budget.aggregate_over_seeds(budget.runs_table([])))) == []
    no_latency = agg.assign(latency_ms_b1=float("nan"))
    fig = charts.cost_accuracy_figure(no_latency, cost="latency_ms_b1")
    assert charts.figure_points(fig) == [] and fig.layout.annotations


def test_training_curve_figure():
    empty = charts.training_curve_figure([])
    assert charts.figure_points(empty) == [] and empty.layout.xaxis.title.text == "Training step"
    events = [
        {"phase": "setup", "message": "loading"},
        {"phase": "train", "step": 1, "loss": 0.9},
        {"phase": "train", "step": 2, "loss": 0.7},
        {"phase": "val", "epoch": 1, "step": 2, "val_accuracy": 0.75, "val_balanced_accuracy": 0.7, "loss": 0.7},
    ]
    points = by_trace(charts.training_curve_figure(events))
    assert points["Training loss"] == [(1, 0.9), (2, 0.7)]
    assert points["Validation accuracy"] == [(2, pytest.approx(75.0))]


def test_confusion_figure():
    fig = charts.confusion_figure([[5, 1], [2, 7]], ["functional", "defective"])
    heatmap = fig.data[0]
    assert [list(r) for r in heatmap.z] == [[5, 1], [2, 7]] and list(heatmap.y) == ["functional", "defective"]
    assert fig.layout.yaxis.title.text == "True class"
    charts.confusion_figure([], [])  # placeholder, no crash


def test_collapsed_runs_are_hollow_points_outside_the_means():
    rows = [
        make_run(1, 10, "deep", seed=0, accuracy=0.84, gmacs=1.5),
        make_run(2, 10, "deep", seed=1, accuracy=0.31, gmacs=1.5),
        make_run(3, 50, "deep", seed=0, accuracy=0.69, gmacs=4.0),
    ]
    rows[1]["metrics"].update(collapsed=True, collapse_reason="loss diverged")
    rows[2]["metrics"]["confusion_matrix"] = [[69, 0], [31, 0]]  # an older run: one class on test
    rows[0]["metrics"].update(lr=1e-3, lr_source="validation")
    agg = budget.aggregate_over_seeds(budget.runs_table(rows))
    fig = charts.cost_accuracy_figure(agg)
    points = by_trace(fig)
    assert points["deep"] == [(1.5, pytest.approx(84.0))]  # the mean of the one run that did not collapse
    assert sorted(points[charts.COLLAPSED_NAME]) == [(1.5, pytest.approx(31.0)), (4.0, pytest.approx(69.0))]
    hollow = next(t for t in fig.data if t.name == charts.COLLAPSED_NAME)
    assert hollow.marker.symbol == "circle-open"
    assert "loss diverged" in hollow.hovertext[0] and "run 2, seed 1" in hollow.hovertext[0]
    deep = next(t for t in fig.data if t.name == "deep")
    assert "learning rate: 1e-03 (validation)" in deep.hovertext[0]
    assert "collapsed runs left out of the mean: 1" in deep.hovertext[0]
    # every run of a configuration collapsed: nothing but hollow points, still drawn
    only = budget.aggregate_over_seeds(budget.runs_table(rows[2:]))
    assert by_trace(charts.cost_accuracy_figure(only)) == {charts.COLLAPSED_NAME: [(4.0, pytest.approx(69.0))]}


def test_chance_line_per_metric():
    rows = [make_run(1, 10, accuracy=0.8, majority=0.688), make_run(2, 0, tuning="linear", majority=0.688)]
    for run in rows:
        run["metrics"]["confusion_matrix"] = [[3, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    agg = budget.aggregate_over_seeds(budget.runs_table(rows))
    assert charts.chance_level(agg, "accuracy_mean") == (0.688, "Chance: majority class (68.8%)")
    assert charts.chance_level(agg, "balanced_accuracy_mean") == (0.25, "Chance: 1/4 classes (25.0%)")
    fig = charts.cost_accuracy_figure(agg, metric="balanced_accuracy_mean")
    assert [shape.y0 for shape in fig.layout.shapes] == [pytest.approx(25.0)]
    assert charts.chance_level(agg.drop(columns=["n_classes"]), "balanced_accuracy_mean") is None
