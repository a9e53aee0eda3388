"""The Budget explorer under AppTest: it compares only the active setup's runs, opens on balanced
accuracy when one class dominates the test set, and shows collapsed runs apart."""

from __future__ import annotations

import json

import test_app
from test_app import TIMEOUT, app, goto, texts, tiny_zip, use_tiny_setup, values

from vptdash.runs import uploads

home, store = test_app.home, test_app.store  # the same fixtures: a fresh home, no worker, no reference

# Each run gets a cost no other run has, so a point on the chart names the run it came from.
ACTIVE_PROBE, ACTIVE_PROMPTS = 0.111, 0.222
OTHER_DATA, OTHER_CELLS, OTHER_SHOTS, OTHER_BACKBONE = 0.333, 0.444, 0.555, 0.666
COLLAPSED = 0.777


def put_run(store, config: dict, accuracy: float, gmacs: float, *, majority=0.55, matrix=None) -> int:
    run_id = store.create_run(config, status="running", source="cli")
    metrics = {
        "accuracy": accuracy,
        "balanced_accuracy": accuracy - 0.05,
        "majority_accuracy": majority,
        "confusion_matrix": matrix or [[5, 1], [1, 5]],
    }
    store.finish_run(run_id, "done", metrics=metrics, costs={"gmacs": gmacs}, timings={"train_seconds": 1.0})
    return run_id


def fill(store, spec: str, *, majority=0.55) -> None:
    base = {"dataset": spec, "cell_type": None, "backbone": "tiny-random", "resolution": 32, "shots": 8, "seed": 0}
    probe = {"tuning": "linear", "num_prompts": 0, "placement": "none"}
    prompts = {"tuning": "prompt", "num_prompts": 10, "placement": "deep"}
    put_run(store, {**base, **probe}, 0.70, ACTIVE_PROBE, majority=majority)
    put_run(store, {**base, **prompts}, 0.80, ACTIVE_PROMPTS, majority=majority)
    put_run(store, {**base, **prompts, "dataset": "elpv-binary"}, 0.99, OTHER_DATA)
    put_run(store, {**base, **prompts, "cell_type": "mono"}, 0.98, OTHER_CELLS)
    put_run(store, {**base, **prompts, "shots": 64}, 0.97, OTHER_SHOTS)
    put_run(store, {**base, **prompts, "backbone": "vit_tiny"}, 0.96, OTHER_BACKBONE)
    # 50 shallow prompts that answered one class on every test image: a point apart, never the answer
    put_run(store, {**base, "num_prompts": 50, "placement": "shallow"}, 0.995, COLLAPSED, matrix=[[6, 0], [6, 0]])


def chart_points(at) -> dict[str, set[float]]:
    """The x values (GMACs) of every trace of the compute chart, by trace name."""
    [spec] = [
        json.loads(chart.proto.spec)
        for chart in at.get("plotly_chart")
        if "compute" in json.loads(chart.proto.spec)["layout"]["title"]["text"]
        and "Estimated" not in json.loads(chart.proto.spec)["layout"]["title"]["text"]
    ]
    points: dict[str, set[float]] = {}
    for trace in spec["data"]:
        xs = [round(x, 3) for x in values(trace.get("x")) if x is not None]
        if xs:
            points.setdefault(trace.get("name"), set()).update(xs)
    return points


def test_the_chart_and_the_answer_use_only_the_active_setup(home, store):
    info = uploads.save_zip_upload("tiny", tiny_zip())
    spec = uploads.upload_spec(info.slug)
    fill(store, spec)
    at = app()
    use_tiny_setup(at, spec)
    goto(at, "app_pages/budget.py")
    points = chart_points(at)
    drawn = set().union(*(xs for name, xs in points.items() if name not in ("Pareto front", "Recommended")))
    assert drawn == {ACTIVE_PROBE, ACTIVE_PROMPTS, COLLAPSED}, points
    assert points["Recommended"] <= {ACTIVE_PROBE, ACTIVE_PROMPTS}
    [collapsed_trace] = [name for name in points if "collapsed" in name]
    assert points[collapsed_trace] == {COLLAPSED}
    assert "**3 finished runs**" in texts(at.markdown)
    assert "collapsed run" in texts(at.markdown) and "predicts a single class on test" in texts(at.markdown)
    answer = texts(at.success)
    assert "50 shallow" not in answer  # the collapsed configuration is never the answer

    # another backbone, resolution or shots, one click away; another data set or cell type never
    at.toggle(key="budget_match").set_value(False).run(timeout=TIMEOUT)
    points = chart_points(at)
    drawn = set().union(*(xs for name, xs in points.items() if name not in ("Pareto front", "Recommended")))
    assert drawn == {ACTIVE_PROBE, ACTIVE_PROMPTS, OTHER_SHOTS, OTHER_BACKBONE, COLLAPSED}, points


def test_balanced_accuracy_is_the_default_when_one_class_dominates(home, store):
    info = uploads.save_zip_upload("tiny", tiny_zip())
    spec = uploads.upload_spec(info.slug)
    fill(store, spec, majority=0.7)
    at = app()
    use_tiny_setup(at, spec)
    goto(at, "app_pages/budget.py")
    assert at.session_state["budget_metric"] == "balanced_accuracy_mean"
    names = {t.get("name") for c in at.get("plotly_chart") for t in json.loads(c.proto.spec)["data"]}
    assert "Chance: 1/2 classes (50.0%)" in names
    at.segmented_control(key="budget_metric").set_value("accuracy_mean").run(timeout=TIMEOUT)  # one click away
    names = {t.get("name") for c in at.get("plotly_chart") for t in json.loads(c.proto.spec)["data"]}
    assert "Chance: majority class (70.0%)" in names


def test_the_charts_are_built_again_only_when_the_runs_changed(home, store, monkeypatch):
    """A page rerun with the store unchanged (a poll, a click elsewhere) reuses the figures; a finished
    run builds them again."""
    from vptdash.views import charts

    built = []
    real = charts.cost_accuracy_figure
    monkeypatch.setattr(charts, "cost_accuracy_figure", lambda *a, **kw: built.append(kw["cost"]) or real(*a, **kw))
    info = uploads.save_zip_upload("tiny", tiny_zip())
    spec = uploads.upload_spec(info.slug)
    fill(store, spec)
    at = app()
    use_tiny_setup(at, spec)
    goto(at, "app_pages/budget.py")
    first = len(built)
    assert first == 3  # one figure per cost tab
    at.run(timeout=TIMEOUT)
    at.run(timeout=TIMEOUT)
    assert len(built) == first  # nothing changed in the store: no figure was built again
    run_id = store.create_run({"dataset": spec}, status="running", source="cli")
    store.append_progress(run_id, {"phase": "train", "step": 1, "total_steps": 10})
    store.append_progress(run_id, {"phase": "train", "step": 2, "total_steps": 10})
    before_progress = len(built)
    at.run(timeout=TIMEOUT)
    assert len(built) == before_progress + 3  # the claim changed the runs: built once more
    store.append_progress(run_id, {"phase": "train", "step": 3, "total_steps": 10})
    at.run(timeout=TIMEOUT)
    assert len(built) == before_progress + 3  # a progress tick alone builds nothing
    put_run(
        store, {**store.get_run(1)["config"], "tuning": "prompt", "num_prompts": 5, "placement": "shallow"}, 0.9, 0.888
    )
    at.run(timeout=TIMEOUT)
    assert len(built) == before_progress + 6
    assert 0.888 in set().union(*chart_points(at).values())
    assert not at.exception
