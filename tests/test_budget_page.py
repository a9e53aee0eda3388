"""The Budget explorer under AppTest: it compares only the active setup's runs, opens on balanced
accuracy when one class dominates the test set, shows collapsed runs apart, names and switches its
compute convention, and answers per data size (never comparing runs of different sizes)."""

from __future__ import annotations

import json

import test_app
from test_app import TIMEOUT, app, goto, texts, tiny_zip, use_tiny_setup, values

from vptdash.engine.cost import full_graph_gmacs
from vptdash.engine.train import RunConfig, build_model
from vptdash.runs import uploads

home, store = test_app.home, test_app.store  # the same fixtures: a fresh home, no worker, no reference

# Each run gets a cost no other run has, so a point on the chart names the run it came from.
ACTIVE_PROBE, ACTIVE_PROMPTS = 0.111, 0.222
OTHER_DATA, OTHER_CELLS, OTHER_SHOTS, OTHER_BACKBONE = 0.333, 0.444, 0.555, 0.666
COLLAPSED = 0.777


def put_run(store, config: dict, accuracy: float, gmacs, *, majority=0.55, matrix=None, costs=None) -> int:
    run_id = store.create_run(config, status="running", source="cli")
    metrics = {
        "accuracy": accuracy,
        "balanced_accuracy": accuracy - 0.05,
        "majority_accuracy": majority,
    }
    if matrix != "unknown":  # "unknown": a run that never recorded its classes
        metrics["confusion_matrix"] = matrix or [[5, 1], [1, 5]]
    costs = {"gmacs": gmacs} if costs is None else costs
    store.finish_run(run_id, "done", metrics=metrics, costs=costs, timings={"train_seconds": 1.0})
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


def compute_charts(at) -> list[dict]:
    """The specs of the results charts in the compute tab (one, or one per data size side by side)."""
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    return [s for s in specs if "GMACs per image (" in s["layout"]["xaxis"]["title"]["text"]]


def chart_points(at, spec: dict | None = None) -> dict[str, set[float]]:
    """The x values (GMACs) of every trace of the compute chart, by trace name."""
    if spec is None:
        [spec] = compute_charts(at)
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

    # another backbone or resolution, one click away; another data set or cell type never
    at.toggle(key="budget_match").set_value(False).run(timeout=TIMEOUT)
    points = chart_points(at)
    drawn = set().union(*(xs for name, xs in points.items() if name not in ("Pareto front", "Recommended")))
    assert drawn == {ACTIVE_PROBE, ACTIVE_PROMPTS, OTHER_BACKBONE, COLLAPSED}, points
    # another number of training images: its own chart, picked as a data size, never pooled with these
    at.button_group(key="budget_size").set_value("64").run(timeout=TIMEOUT)
    assert drawn_x(at) == {OTHER_SHOTS}


def drawn_x(at, spec: dict | None = None) -> set[float]:
    points = chart_points(at, spec)
    return set().union(set(), *(xs for name, xs in points.items() if name not in ("Pareto front", "Recommended")))


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


# ------------------------------------------------------------------------------------ compute conventions
def tiny_base(spec: str, shots=8) -> dict:
    return {"dataset": spec, "cell_type": None, "backbone": "tiny-random", "resolution": 32, "shots": shots, "seed": 0}


PROBE = {"tuning": "linear", "num_prompts": 0, "placement": "none"}
DEEP = {"tuning": "prompt", "num_prompts": 10, "placement": "deep"}


def test_the_convention_switch_moves_the_points_and_names_the_axis(home, store):
    info = uploads.save_zip_upload("tiny", tiny_zip())
    spec = uploads.upload_spec(info.slug)
    base = tiny_base(spec)
    put_run(store, {**base, **PROBE}, 0.70, None, costs={"gmacs": 0.101, "gmacs_full_graph": 0.111})
    put_run(store, {**base, **DEEP}, 0.80, None, costs={"gmacs": 0.202, "gmacs_full_graph": 0.353})
    # stored before the full graph was counted: the dashboard counts it from the configuration on load
    recounted = {**base, "tuning": "prompt", "num_prompts": 5, "placement": "shallow"}
    put_run(store, recounted, 0.75, None, costs={"gmacs": 0.150})
    # neither count stored, and its classes unknown, so nothing can be recounted: the best, by far, but
    # its cost is unknown
    put_run(store, {**base, "tuning": "prompt", "num_prompts": 50, "placement": "deep"}, 0.99, None, costs={},
            matrix="unknown")  # fmt: skip
    at = app()
    use_tiny_setup(at, spec)
    goto(at, "app_pages/budget.py")
    assert at.session_state["budget_convention"] == "gmacs"  # executed graph: what a deployment here pays
    [chart] = compute_charts(at)
    assert chart["layout"]["xaxis"]["title"]["text"] == "GMACs per image (executed graph)"
    assert drawn_x(at) == {0.101, 0.202, 0.150}
    hover = json.dumps(chart["data"])
    assert "GMACs per image, executed graph: 0.202" in hover and "full graph (published tables): 0.353" in hover
    unknown = texts(at.markdown).replace("\\", "")  # markdown escapes
    assert "Cost unknown" in unknown and "50 deep prompts" in unknown and "cost unknown, no GMACs per image" in unknown
    assert "50 deep" not in texts(at.success)  # never recommended

    at.button_group(key="budget_convention").set_value("gmacs_full_graph").run(timeout=TIMEOUT)
    assert not at.exception, [e.message for e in at.exception]
    [chart] = compute_charts(at)
    assert chart["layout"]["xaxis"]["title"]["text"] == "GMACs per image (full graph, as in published tables)"
    config = RunConfig.from_dict(recounted)
    fresh = round(full_graph_gmacs(build_model(config, 2), config.resolution), 3)
    assert drawn_x(at) == {0.111, 0.353, fresh}
    assert "50 deep prompts" in texts(at.markdown) and "50 deep" not in texts(at.success)
    assert "full-graph GMACs per image" in texts(at.success).replace("\\", "")  # the answer counts it so too


# ------------------------------------------------------------------------------------ data sizes
SMALL_PROBE, SMALL_PROMPTS, FULL_PROBE, FULL_PROMPTS = 0.111, 0.112, 0.121, 0.132


def fill_two_sizes(store, spec: str) -> None:
    # 8 images per class: 10 deep prompts no better than the probe; the full split: far better
    for shots, probe, prompts, probe_acc, prompts_acc in (
        (8, SMALL_PROBE, SMALL_PROMPTS, 0.70, 0.70),
        (None, FULL_PROBE, FULL_PROMPTS, 0.80, 0.95),
    ):
        base = tiny_base(spec, shots)
        put_run(store, {**base, **PROBE}, probe_acc, probe)
        put_run(store, {**base, **DEEP}, prompts_acc, prompts)


def test_the_data_size_picks_the_runs(home, store):
    info = uploads.save_zip_upload("tiny", tiny_zip())
    spec = uploads.upload_spec(info.slug)
    fill_two_sizes(store, spec)
    at = app()
    use_tiny_setup(at, spec)  # 8 shots: the size the page opens on
    goto(at, "app_pages/budget.py")
    size = at.button_group(key="budget_size")
    assert size.options == ["8 images per class", "full training split", "side by side"]
    assert size.value == "8" and drawn_x(at) == {SMALL_PROBE, SMALL_PROMPTS}
    size.set_value("full").run(timeout=TIMEOUT)
    assert drawn_x(at) == {FULL_PROBE, FULL_PROMPTS}
    assert "**2 finished runs**" in texts(at.markdown)
    assert "10 deep prompts" in texts(at.success)


def test_side_by_side_gives_one_answer_per_size(home, store):
    info = uploads.save_zip_upload("tiny", tiny_zip())
    spec = uploads.upload_spec(info.slug)
    fill_two_sizes(store, spec)
    at = app()
    use_tiny_setup(at, spec)
    goto(at, "app_pages/budget.py")
    at.button_group(key="budget_size").set_value("side by side").run(timeout=TIMEOUT)
    assert not at.exception, [e.message for e in at.exception]
    small, full = compute_charts(at)
    assert small["layout"]["title"]["text"] == "8 images per class"
    assert full["layout"]["title"]["text"] == "Full training split"
    # each panel draws its own size only: the runs of one size are never compared with the other's
    assert drawn_x(at, small) == {SMALL_PROBE, SMALL_PROMPTS}
    assert drawn_x(at, full) == {FULL_PROBE, FULL_PROMPTS}
    # one sentence per size (the other cost tabs have none: these runs recorded no latency or parameters)
    sentences = [str(s.value) for s in at.success]
    assert len(sentences) == 2, sentences
    small_answer, full_answer = sentences[:2]
    assert "linear probe" in small_answer.lower() and "10 deep prompts" in full_answer
    assert "**4 finished runs**" in texts(at.markdown)
