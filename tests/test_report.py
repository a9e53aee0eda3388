"""report.py: one self-contained, escaped HTML file."""

import re

import pytest
from test_budget import make_run

from vptdash.views import budget, report, scope


def rows():
    return [
        make_run(1, 0, tuning="linear", accuracy=0.80, gmacs=1.0, latency=2.0, params=770),
        make_run(2, 10, seed=0, accuracy=0.84, gmacs=1.47, latency=3.0),
        make_run(3, 10, seed=1, accuracy=0.86, gmacs=1.47, latency=3.2),
        make_run(4, 50, "deep", accuracy=0.87, gmacs=4.71, latency=7.8, source="live"),
    ]


def seeds(first_id, accuracies, *args, **kwargs):
    # majority class 55%: accuracy stays the report's metric
    return [
        make_run(first_id + s, *args, seed=s, accuracy=a, majority=0.55, **kwargs) for s, a in enumerate(accuracies)
    ]


def test_report_says_the_answer_the_data_supports():
    # 10 deep prompts minus the probe, per seed: 0.14, 0.15, 0.13 -> +14.0 points, s = 1 point,
    # 95% CI 14.0 -/+ 4.303 / sqrt(3) = +11.5 to +16.5; 1.03 vs 1.0 GMACs: +3% compute
    clear = seeds(1, [0.70, 0.72, 0.74], 0, tuning="linear", gmacs=1.0) + seeds(
        10, [0.84, 0.87, 0.87], 10, "deep", gmacs=1.03
    )
    text = report.build_html_report(clear, tolerance_points=1.0)
    assert (
        '<p class="answer">10 deep prompts: +14.0 points over the linear probe (95% CI +11.5 to +16.5) '
        "at +3% compute.</p>"
    ) in text
    # differences +0.04, -0.05, +0.04: +1.0 point, 95% CI 1.0 -/+ 4.303 * 5.196 / sqrt(3) = -11.9 to +13.9
    noisy = seeds(1, [0.70, 0.78, 0.72], 0, tuning="linear", gmacs=1.0) + seeds(
        10, [0.74, 0.73, 0.76], 10, "deep", gmacs=1.03
    )
    text = report.build_html_report(noisy, tolerance_points=1.0)
    assert (
        '<p class="answer">No budget beats the linear probe beyond noise at 16 images per class; the differences in '
        "accuracy are within ±1.0 points (the best, 10 deep prompts: +1.0 points, 95% CI -11.9 to +13.9). "
        "More images or seeds would tell them apart.</p>"
    ) in text
    # a collapsed run is listed, and left out of the answer (with it the mean would be lower)
    noisy[4]["metrics"].update(collapsed=True, collapse_reason="loss diverged")
    text = report.build_html_report(noisy, tolerance_points=1.0)
    assert "<li>#11 10 deep prompts, seed 1: loss diverged</li>" in text and "Collapsed runs (1)" in text


def test_report_uses_balanced_accuracy_when_one_class_dominates():
    data = [make_run(1, 0, tuning="linear", accuracy=0.80, majority=0.7), make_run(2, 10, accuracy=0.9, majority=0.7)]
    text = report.build_html_report(data)
    assert "balanced accuracy is the mean over seeds" in text and "over 60% of the test set" in text
    assert "85.0% balanced accuracy" in text  # 0.9 - 0.05: the balanced figure make_run stores


def test_report_is_self_contained():
    text = report.build_html_report(rows(), tolerance_points=2.5, title="ELPV budget")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.IGNORECASE)  # nothing loaded from anywhere
    assert not re.search(r"<link[^>]*href\s*=\s*[\"']https?:", text, re.IGNORECASE)
    assert text.count("<script>") >= 1 and text.count("Plotly.newPlot") == 3  # three charts
    assert len(re.findall(r"plotly\.js v\d", text)) == 1  # the library is inlined exactly once
    assert report.ELPV_NOTICE in text and "precomputed" in text
    assert "GMACs per image" in text and "Trainable parameters" in text
    assert "84.0%" in text  # run table, formatted


def test_report_escapes_user_strings():
    evil = "<script>alert(1)"  # a dataset spec typed by someone: no slash, so shown whole
    data = [make_run(1, 0, tuning="linear", dataset=evil), make_run(2, 10, dataset=evil, accuracy=0.9)]
    text = report.build_html_report(data, title="<b>t</b>")
    assert evil not in text and "&lt;script&gt;alert(1)" in text
    assert "<b>t</b>" not in text
    assert report.ELPV_NOTICE not in text  # no ELPV, no ELPV licence line


def test_report_refuses_runs_from_two_data_sets():
    mixed = [*rows(), make_run(9, 10, dataset="/uploads/toy", accuracy=1.0)]
    with pytest.raises(scope.MixedSetupsError, match="one data set and one setup") as caught:
        report.build_html_report(mixed)
    assert "2:" in str(caught.value) and "ELPV" in str(caught.value)


def test_report_refuses_one_data_set_at_two_resolutions():
    other = make_run(9, 10, accuracy=0.9)
    other["config"]["resolution"] = 224
    with pytest.raises(scope.MixedSetupsError, match="224 px"):
        report.build_html_report([*rows(), other])


def test_report_rows_are_one_setup_chosen_from_many():
    toy = [make_run(10 + i, 10, seed=i, dataset="/uploads/toy", accuracy=1.0) for i in range(3)]
    listed = [*rows(), *toy]
    setups = scope.setups_in(listed)
    assert len(setups) == 2 and setups[0] == scope.setup_of(rows()[0])  # ELPV has more runs: first
    toy_setup = scope.setup_of(toy[0])
    active = scope.as_dict(toy_setup)
    assert scope.default_setup(setups, active) == toy_setup  # the active setup wins when listed
    assert scope.default_setup(setups, {"dataset": "elsewhere"}) == setups[0]
    chosen = scope.runs_of_setup(listed, toy_setup)
    assert [run["id"] for run in chosen] == [10, 11, 12]
    text = report.build_html_report(chosen)  # one setup: accepted
    assert "100.0%" in text and "ELPV" not in scope.describe(toy_setup)


def test_report_without_runs():
    text = report.build_html_report([])
    assert "No finished runs yet" in text and "</html>" in text


def test_reference_sweep_import_is_idempotent(tmp_path, monkeypatch):
    import json

    from vptdash.runs import reference
    from vptdash.runs.store import RunStore

    monkeypatch.setenv("VPTDASH_HOME", str(tmp_path))
    store = RunStore(tmp_path / "runs.sqlite")
    missing = tmp_path / "nope.json"
    assert reference.load_reference(store, missing) == 0 and reference.reference_info(missing) is None
    source = RunStore(tmp_path / "source.sqlite")
    for run in rows()[:2]:
        run_id = source.create_run(run["config"], status="running", source="cli")
        source.finish_run(run_id, "done", metrics=run["metrics"], costs=run["costs"], timings=run["timings"])
    meta = {"command": "python -m vptdash sweep ...", "machine": "test", "date": "2025-01-01", "note": "n"}
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"meta": meta, "runs": source.export_runs()}))
    assert reference.reference_info(path)["command"] == meta["command"]
    assert reference.load_reference(store, path) == 2
    assert reference.load_reference(store, path) == 0
    stored = store.list_runs()
    assert {r["source"] for r in stored} == {"precomputed"}
    # a re-counted file (make_reference.py --recount-costs) updates the costs of runs imported before
    content = json.loads(path.read_text())
    for run in content["runs"]:
        run["costs"] = {**run["costs"], "gmacs": 0.123}
    path.write_text(json.dumps(content))
    assert reference.load_reference(store, path) == 0
    assert [r["costs"]["gmacs"] for r in store.list_runs()] == [0.123, 0.123]
    assert len(store.list_runs()) == 2
    assert "precomputed" in set(budget.runs_table(stored)["source"])
