"""The dashboard's pages under Streamlit's AppTest: every page renders, the controls build the
configuration that gets queued, bad input gives messages (not tracebacks), and one tiny run goes
end to end: upload -> Train -> executed -> result card -> its point on the Budget explorer chart.

No worker process is started here: `worker.ensure_worker` is replaced by a recorder and queued
runs are executed in the test process with `jobs.execute_queued` (the browser test covers the real
worker). Every test gets a fresh VPTDASH_HOME, so the run store and the uploads start empty.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from vptdash.runs import jobs, reference, uploads, worker
from vptdash.runs.store import RunStore

APP = str(Path(__file__).resolve().parent.parent / "app.py")
REAL_REFERENCE = reference.REFERENCE_FILE
PAGES = [
    "app_pages/home.py",
    "app_pages/data.py",
    "app_pages/train.py",
    "app_pages/budget.py",
    "app_pages/levers.py",
    "app_pages/attention.py",
    "app_pages/continual.py",
    "app_pages/runs.py",
]
TIMEOUT = 30


def tiny_zip(n_per_class: int = 12, size: int = 40) -> bytes:
    """Two visually different classes: dark noise vs bright noise, plus one file that is skipped."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, level in (("dark", 40), ("bright", 210)):
            for index in range(n_per_class):
                pixels = np.clip(level + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(pixels).save(png, "PNG")
                archive.writestr(f"{name}/{index:02d}.png", png.getvalue())
        archive.writestr("dark/notes.txt", "not an image")
    return buffer.getvalue()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTDASH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VPTDASH_NO_WARMUP", "1")  # no background ELPV / DINOv2 loading in tests
    # a store without the shipped reference sweep, so that tests count only their own runs
    # (test_a_fresh_store_gets_the_shipped_reference_sweep checks the real file)
    monkeypatch.setattr(reference, "REFERENCE_FILE", tmp_path / "no-reference-sweep.json")
    started = []
    monkeypatch.setattr(worker, "ensure_worker", lambda store, **kw: started.append(store.path) or True)
    return started


@pytest.fixture
def store(home):
    return RunStore()


def app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run(timeout=TIMEOUT)
    assert not at.exception, [e.message for e in at.exception]
    return at


def use_tiny_setup(at: AppTest, spec: str) -> None:
    at.session_state["active_dataset"] = spec
    at.session_state["active_backbone"] = "tiny-random"
    at.session_state["active_resolution"] = 32
    at.session_state["active_shots"] = 8


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def values(array) -> list:
    """Plotly JSON arrays: plain lists, or typed arrays {"dtype", "bdata"} (plotly >= 6)."""
    if isinstance(array, dict) and "bdata" in array:
        import base64

        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    if isinstance(array, (int, float)):
        return [array]
    return list(array or [])


# ------------------------------------------------------------------------------------ every page
@pytest.mark.parametrize("page", PAGES)
def test_page_renders_on_an_empty_store(home, page):
    at = app()
    goto(at, page)
    assert at.title, "every page has a title"
    assert "Job queue" in texts(at.sidebar.markdown)


def test_pages_render_with_runs_and_an_upload(home, store):
    info = uploads.save_zip_upload("tiny", tiny_zip())
    spec = uploads.upload_spec(info.slug)
    at = app()
    use_tiny_setup(at, spec)
    from vptdash.engine.train import RunConfig

    ids = [
        jobs.submit_run(
            store,
            RunConfig(
                backbone="tiny-random",
                dataset=spec,
                resolution=32,
                shots=8,
                epochs=2,
                tuning=t,
                num_prompts=n,
                placement=p,
                measure_latency=False,
            ),
        )
        for t, n, p in (("linear", 0, "none"), ("prompt", 3, "shallow"))
    ]
    failed = store.create_run({"dataset": spec, "backbone": "tiny-random"}, status="running")
    store.finish_run(failed, "failed", error="something went wrong in the worker")
    jobs.execute_queued(store, ids)
    for page in PAGES:
        goto(at, page)
    goto(at, "app_pages/data.py")
    assert "notes.txt" in json.dumps([df.value.to_dict() for df in at.dataframe])  # every skipped file listed
    goto(at, "app_pages/runs.py")
    assert {b.label for b in at.get("download_button")} >= {"Export CSV", "HTML report"}


# ------------------------------------------------------------------------------------ home
def test_a_fresh_store_gets_the_shipped_reference_sweep(home, store, monkeypatch):
    """First start: the precomputed ELPV sweep is in the history, labelled, with how it was made."""
    monkeypatch.setattr(reference, "REFERENCE_FILE", REAL_REFERENCE)
    meta = reference.reference_info()
    assert meta and meta["command"].startswith("python benchmarks/reference_sweep.py") and meta["date"]
    at = app()
    assert not at.exception
    runs = store.list_runs(status="done")
    assert len(runs) == meta["n_runs"] >= 8
    assert {r["source"] for r in runs} == {"precomputed"}
    counts = {(r["config"]["num_prompts"], r["config"]["placement"]) for r in runs}
    assert {(0, "none"), (10, "shallow"), (10, "deep")} <= counts
    assert {16, None} <= {r["config"]["shots"] for r in runs}  # 16 images per class and the full split
    # the recipe chosen on validation: prompt runs searched their rate, the probe its L2 strength
    assert all(r["metrics"]["lr_source"] == "validation" for r in runs)
    assert all(r["costs"].get("gmacs_full_graph") for r in runs)  # both compute conventions
    goto(at, "app_pages/budget.py")
    assert not at.exception
    assert "precomputed" in texts(at.caption)


def test_demo_button_queues_the_preset_and_opens_the_budget_explorer(home, store):
    from vptdash.runs import presets

    at = app()
    at.button(key="demo_button").click().run(timeout=TIMEOUT)
    assert not at.exception
    queued = store.list_runs(status="queued")
    assert len(queued) == len(presets.demo_configs()) >= 2
    assert {r["config"]["dataset"] for r in queued} == {"elpv-binary"}
    assert {r["config"]["shots"] for r in queued} == {16}
    assert home, "the worker was started"
    assert at.title[0].value == "Budget explorer"
    assert "queued" in texts(at.sidebar.caption)
    goto(at, "app_pages/home.py")  # a second click must not queue the demo twice
    assert "demo is under way" in texts(at.info)
    assert not [b for b in at.button if b.key == "demo_button"]
    at.button(key="demo_watch").click().run(timeout=TIMEOUT)
    assert at.title[0].value == "Budget explorer"
    assert len(store.list_runs()) == len(presets.demo_configs())


# ------------------------------------------------------------------------------------ data
def test_zip_upload_becomes_the_active_dataset(home):
    at = goto(app(), "app_pages/data.py")
    at.radio(key="data_source").set_value("My own images").run(timeout=TIMEOUT)
    at.file_uploader(key="data_zip").upload("tiny.zip", tiny_zip(), "application/zip").run(timeout=TIMEOUT)
    at.text_input(key="data_zip_name").input("dark vs bright").run(timeout=TIMEOUT)
    at.button(key="data_zip_save").click().run(timeout=TIMEOUT)
    assert not at.exception
    [info] = uploads.list_uploads()
    assert at.session_state["active_dataset"] == uploads.upload_spec(info.slug)
    assert "Saved **dark vs bright**" in texts(at.success)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "24" and metrics["Classes"] == "2" and metrics["Skipped files"] == "1"
    assert len(at.image) >= 2  # a thumbnail strip per class


def test_second_upload_while_one_is_saved_becomes_the_pick(home):
    first = uploads.save_zip_upload("first set", tiny_zip())
    at = goto(app(), "app_pages/data.py")
    at.radio(key="data_source").set_value("My own images").run(timeout=TIMEOUT)
    assert at.selectbox(key="data_saved_pick").value == first.slug  # the saved-uploads box exists now
    at.file_uploader(key="data_zip").upload("second.zip", tiny_zip(), "application/zip").run(timeout=TIMEOUT)
    at.text_input(key="data_zip_name").input("second set").run(timeout=TIMEOUT)
    at.button(key="data_zip_save").click().run(timeout=TIMEOUT)
    assert not at.exception, [e.message for e in at.exception]
    [second] = [info for info in uploads.list_uploads() if info.slug != first.slug]
    assert at.session_state["active_dataset"] == uploads.upload_spec(second.slug)
    assert at.selectbox(key="data_saved_pick").value == second.slug
    assert "Saved **second set**" in texts(at.success)


def test_elpv_licence_is_shown_once_on_the_data_page(home):
    def licences(at: AppTest) -> int:
        shown = [*at.info, *at.caption, *at.markdown]  # page and sidebar
        # as displayed: Markdown escapes (names are escaped before they reach Markdown) are not shown
        return sum("BY-NC-SA" in str(element.value).replace("\\", "") for element in shown)

    at = goto(app(), "app_pages/data.py")
    assert licences(at) == 1
    goto(at, "app_pages/budget.py")
    assert licences(at) == 1  # other pages keep the sidebar's credit line


def test_bad_upload_shows_the_message_not_a_traceback(home):
    at = goto(app(), "app_pages/data.py")
    at.radio(key="data_source").set_value("My own images").run(timeout=TIMEOUT)
    at.file_uploader(key="data_zip").upload("broken.zip", b"this is not a zip", "application/zip")
    at.run(timeout=TIMEOUT)
    at.button(key="data_zip_save").click().run(timeout=TIMEOUT)
    assert not at.exception
    assert "not a zip file" in texts(at.error)
    assert uploads.list_uploads() == []


def test_one_class_upload_is_refused_clearly(home):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        png = io.BytesIO()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, "PNG")
        for i in range(4):
            archive.writestr(f"only/{i}.png", png.getvalue())
    at = goto(app(), "app_pages/data.py")
    at.radio(key="data_source").set_value("My own images").run(timeout=TIMEOUT)
    at.file_uploader(key="data_zip").upload("one.zip", buffer.getvalue()).run(timeout=TIMEOUT)
    at.button(key="data_zip_save").click().run(timeout=TIMEOUT)
    assert not at.exception
    assert "cannot be used" in texts(at.error)


def test_deleted_active_upload_falls_back_without_crashing(home):
    info = uploads.save_zip_upload("gone soon", tiny_zip())
    at = app()
    use_tiny_setup(at, uploads.upload_spec(info.slug))
    uploads.delete_upload(info.slug)  # e.g. from another tab
    goto(at, "app_pages/data.py")
    assert "cannot be loaded" in texts(at.error)
    for page in PAGES:
        goto(at, page)


# ------------------------------------------------------------------------------------ train
def test_train_controls_build_the_submitted_config(home):
    at = app()
    at.session_state["active_backbone"] = "tiny-random"
    at.session_state["active_resolution"] = 32
    goto(at, "app_pages/train.py")
    at.select_slider(key="train_prompts").set_value(50).run(timeout=TIMEOUT)
    at.button_group(key="train_placement").set_value("deep").run(timeout=TIMEOUT)
    at.number_input(key="train_epochs").set_value(3).run(timeout=TIMEOUT)
    at.slider(key="train_dropout").set_value(0.1).run(timeout=TIMEOUT)
    config = at.session_state["train_pending_config"]
    assert (config["num_prompts"], config["placement"], config["epochs"]) == (50, "deep", 3)
    assert config["prompt_dropout"] == pytest.approx(0.1)
    assert config["backbone"] == "tiny-random" and config["dataset"] == "elpv-binary"

    at.button_group(key="train_placement").set_value("pick blocks").run(timeout=TIMEOUT)
    strip = at.button_group(key="train_blocks_4")  # tiny-random has 4 blocks: the strip follows the depth
    assert len(strip.proto.options) == 4
    strip.set_value([1, 3]).run(timeout=TIMEOUT)
    assert at.session_state["train_pending_config"]["placement"] == "1,3"

    at.select_slider(key="train_shots").set_value(4).run(timeout=TIMEOUT)
    assert at.session_state["active_shots"] == 4  # shared with every page
    assert "4 shots per class" in texts(at.sidebar.markdown)


def test_train_submits_the_config_and_starts_the_worker(home, store):
    at = app()
    at.session_state["active_backbone"] = "tiny-random"
    at.session_state["active_resolution"] = 32
    goto(at, "app_pages/train.py")
    at.select_slider(key="train_prompts").set_value(5).run(timeout=TIMEOUT)
    at.button(key="train_submit").click().run(timeout=TIMEOUT)
    [run] = store.list_runs()
    assert run["status"] == "queued" and home
    assert run["config"] == at.session_state["train_pending_config"]
    assert at.session_state["train_run_id"] == run["id"]

    at.button(key="train_probe").click().run(timeout=TIMEOUT)
    probe = store.list_runs()[0]
    assert probe["config"]["tuning"] == "linear" and probe["config"]["num_prompts"] == 0


def test_invalid_config_is_an_error_and_queues_nothing(home, store):
    at = app()
    at.session_state["active_backbone"] = "tiny-random"
    at.session_state["active_resolution"] = 16  # below the 32 px minimum
    goto(at, "app_pages/train.py")
    at.button(key="train_submit").click().run(timeout=TIMEOUT)
    assert not at.exception
    assert "resolution must be between 32 and 1024" in texts(at.error)
    assert store.list_runs() == []


def test_cancel_button_cancels_a_queued_run(home, store):
    at = app()
    at.session_state["active_backbone"] = "tiny-random"
    at.session_state["active_resolution"] = 32
    goto(at, "app_pages/train.py")
    at.button(key="train_submit").click().run(timeout=TIMEOUT)
    at.button(key="train_cancel").click().run(timeout=TIMEOUT)
    assert store.list_runs()[0]["status"] == "cancelled"


def test_failed_run_shows_its_error(home, store):
    from vptdash.engine.train import RunConfig

    at = app()
    run_id = jobs.submit_run(store, RunConfig(backbone="tiny-random", dataset="/nowhere/at/all", resolution=32))
    jobs.execute_queued(store, [run_id])
    at.session_state["train_run_id"] = run_id
    goto(at, "app_pages/train.py")
    assert "dataset not found" in texts(at.error)


# ------------------------------------------------------------------------------------ end to end
def test_tiny_run_end_to_end_reaches_the_budget_chart(home, store):
    info = uploads.save_zip_upload("tiny", tiny_zip())
    spec = uploads.upload_spec(info.slug)
    at = app()
    use_tiny_setup(at, spec)
    goto(at, "app_pages/train.py")
    at.select_slider(key="train_prompts").set_value(5).run(timeout=TIMEOUT)
    at.number_input(key="train_epochs").set_value(3).run(timeout=TIMEOUT)
    at.toggle(key="train_latency").set_value(False).run(timeout=TIMEOUT)
    at.button(key="train_submit").click().run(timeout=TIMEOUT)
    run_id = at.session_state["train_run_id"]
    assert "Queued" in texts(at.info)

    [row] = jobs.execute_queued(store, [run_id])
    assert row["status"] == "done", row["error"]
    at.run(timeout=TIMEOUT)
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Test accuracy"] == f"{100 * row['metrics']['accuracy']:.1f}%"
    assert "Balanced accuracy" in metrics and "GMACs per image (executed graph)" in metrics
    titles = [spec_["layout"]["title"]["text"] for spec_ in plotly_specs(at)]
    assert any("Training" in t for t in titles) and any("Confusion" in t for t in titles)
    assert "No linear probe on the same data yet" in texts(at.caption)
    at.button(key=f"train_queue_probe_{run_id}").click().run(timeout=TIMEOUT)
    probe = store.list_runs(status="queued")[0]
    assert probe["config"]["tuning"] == "linear" and probe["config"]["dataset"] == spec
    jobs.execute_queued(store, [probe["id"]])
    at.run(timeout=TIMEOUT)
    assert any(m.proto.delta for m in at.metric), "deltas against the linear probe"

    goto(at, "app_pages/budget.py")
    [chart] = [
        s
        for s in plotly_specs(at)
        if "compute" in s["layout"]["title"]["text"] and "Estimated" not in s["layout"]["title"]["text"]
    ]
    points = [
        (x, y)
        for trace in chart["data"]
        if trace.get("mode") == "markers"
        for x, y in zip(values(trace.get("x")), values(trace.get("y")))
        if x is not None
    ]
    expected = (row["costs"]["gmacs"], 100 * row["metrics"]["accuracy"])
    assert any(x == pytest.approx(expected[0]) and y == pytest.approx(expected[1]) for x, y in points), points
    assert any(t.get("name") == "Pareto front" for t in chart["data"])
    assert "**2 finished runs**" in texts(at.markdown)
    assert at.success, "the recommendation sentence is shown"

    # selecting a row of the run table highlights its point (bigger marker)
    at.session_state["budget_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run(timeout=TIMEOUT)
    chart = next(
        s
        for s in plotly_specs(at)
        if "compute" in s["layout"]["title"]["text"] and "Estimated" not in s["layout"]["title"]["text"]
    )
    sizes = [
        size
        for trace in chart["data"]
        if trace.get("mode") == "markers"
        for size in values((trace.get("marker") or {}).get("size"))
    ]
    assert max(sizes) > min(sizes), sizes

    goto(at, "app_pages/runs.py")
    assert "**2 of 2 runs**" in texts(at.markdown)
    at.session_state["runs_table"] = {"selection": {"rows": [0, 1], "columns": [], "cells": []}}
    at.run(timeout=TIMEOUT)
    assert "only what differs" in texts(at.subheader)
    compared = at.dataframe[-1].value
    assert {"tuning", "num_prompts", "gmacs"} <= set(compared.index) and "dataset" not in compared.index


def test_budget_estimate_before_anything_runs(home, store):
    at = app()
    at.session_state["active_backbone"] = "tiny-random"
    at.session_state["active_resolution"] = 32
    goto(at, "app_pages/budget.py")
    at.multiselect(key="budget_counts").set_value([0, 10, 50]).run(timeout=TIMEOUT)
    at.multiselect(key="budget_placements").set_value(["shallow"]).run(timeout=TIMEOUT)
    estimate = next(s for s in plotly_specs(at) if "Estimated" in s["layout"]["title"]["text"])
    bars = {label: value for trace in estimate["data"] for label, value in zip(values(trace["x"]), values(trace["y"]))}
    assert list(bars) == ["linear probe", "10 shallow prompts", "50 shallow prompts"]
    assert bars["linear probe"] < bars["10 shallow prompts"] < bars["50 shallow prompts"]

    at.number_input(key="budget_seeds").set_value(2).run(timeout=TIMEOUT)
    at.button(key="budget_queue").click().run(timeout=TIMEOUT)
    queued = store.list_runs(status="queued")
    assert len(queued) == 6 and {r["config"]["seed"] for r in queued} == {0, 1} and home

    at.text_input(key="budget_custom").input("2,9").run(timeout=TIMEOUT)  # block 9 of a 4-block model
    assert not at.exception
    assert "outside" in texts(at.warning)


def test_runs_page_delete_with_confirmation(home, store):
    from vptdash.engine.train import RunConfig

    ids = [jobs.submit_run(store, RunConfig(backbone="tiny-random", num_prompts=n)) for n in (1, 2)]
    store.request_cancel(ids[0])
    at = goto(app(), "app_pages/runs.py")
    at.session_state["runs_confirm_delete"] = [ids[0]]
    at.run(timeout=TIMEOUT)
    assert "cannot be undone" in texts(at.warning)
    at.button(key="runs_delete_yes").click().run(timeout=TIMEOUT)
    assert [r["id"] for r in store.list_runs()] == [ids[1]]


def test_runs_report_covers_one_setup_of_the_listed_runs(home, store):
    from test_budget import make_run

    toy = "/somewhere/toy-set"
    store.import_runs(
        [make_run(i, 10, seed=i) for i in (1, 2, 3)] + [make_run(i, 5, seed=i, dataset=toy) for i in (4, 5)]
    )
    at = goto(app(), "app_pages/runs.py")
    box = at.selectbox(key="runs_report_setup")
    assert len(box.options) == 2 and not box.disabled
    assert box.value[0] == "elpv-binary"  # not the active setup's backbone: the setup with the most runs
    assert "ELPV" in box.options[box.index]  # shown in words
    toy_label = next(label for label in at.multiselect(key="runs_f_dataset").options if "ELPV" not in label)
    at.multiselect(key="runs_f_dataset").set_value([toy_label]).run(timeout=TIMEOUT)
    assert not at.exception, [e.message for e in at.exception]
    box = at.selectbox(key="runs_report_setup")
    assert len(box.options) == 1 and box.disabled and box.value[0] == toy


def test_the_active_setup_is_kept_with_the_run_store(home):
    info = uploads.save_zip_upload("kept set", tiny_zip())
    first = goto(app(), "app_pages/data.py")
    first.radio(key="data_source").set_value("My own images").run(timeout=TIMEOUT)
    first.button(key="data_use_saved").click().run(timeout=TIMEOUT)
    assert first.session_state["active_dataset"] == uploads.upload_spec(info.slug)
    second = app()  # a second tab, or a reload
    assert second.session_state["active_dataset"] == uploads.upload_spec(info.slug)
    assert "kept set" in texts(second.sidebar.markdown)


def test_a_run_made_here_is_announced_when_it_lands(home, store):
    from test_budget import make_run

    from vptdash.engine.train import RunConfig

    store.import_runs([make_run(1, 10, placement="<b>x</b>")])  # precomputed: never announced
    spec = uploads.upload_spec(uploads.save_zip_upload("tiny", tiny_zip()).slug)
    at = app()
    assert not at.toast  # the first look only takes note
    config = RunConfig(backbone="tiny-random", dataset=spec, resolution=32, epochs=1, measure_latency=False)
    run_id = jobs.submit_run(store, config)
    jobs.execute_queued(store, [run_id])
    at.run(timeout=TIMEOUT)
    toasts = [toast.value for toast in at.toast]
    assert len(toasts) == 1 and f"New result \\#{run_id}" in toasts[0] and "test accuracy" in toasts[0], toasts
    at.run(timeout=TIMEOUT)
    assert not at.toast  # announced once


def test_train_page_starts_from_the_demo_and_reference_recipe(home):
    from vptdash.runs import presets

    at = goto(app(), "app_pages/train.py")
    config = at.session_state["train_pending_config"]
    recipe = presets.demo_base()
    assert (config["epochs"], config["precision"], config["batch_size"]) == (
        recipe.epochs,
        recipe.precision,
        recipe.batch_size,
    )
    assert f"{recipe.epochs} epochs" in at.number_input(key="train_epochs").help


def test_cost_levers_page_says_what_to_take_from_it(home):
    at = goto(app(), "app_pages/levers.py")
    assert "In short:" in texts(at.info)


def test_cancel_really_stops_a_run_in_the_real_worker(monkeypatch, tmp_path):
    """The one AppTest with the real background worker: a long tiny run is cancelled from the page."""
    import os
    import signal
    import time

    monkeypatch.setenv("VPTDASH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VPTDASH_NO_WARMUP", "1")
    store = RunStore()
    spec = uploads.upload_spec(uploads.save_zip_upload("tiny", tiny_zip()).slug)
    at = app()
    use_tiny_setup(at, spec)
    goto(at, "app_pages/train.py")
    at.number_input(key="train_epochs").set_value(500).run(timeout=TIMEOUT)
    at.toggle(key="train_latency").set_value(False).run(timeout=TIMEOUT)
    at.button(key="train_submit").click().run(timeout=TIMEOUT)
    run_id = at.session_state["train_run_id"]
    try:
        deadline = time.monotonic() + 90
        while store.get_run(run_id)["status"] != "running" or not store.progress(run_id):
            assert time.monotonic() < deadline, "the worker never started the run"
            time.sleep(0.5)
        at.run(timeout=TIMEOUT)
        assert at.get("progress"), "a progress bar while it runs"
        at.button(key="train_cancel").click().run(timeout=TIMEOUT)
        deadline = time.monotonic() + 60
        while store.get_run(run_id)["status"] == "running":
            assert time.monotonic() < deadline, "cancel did not stop the run"
            time.sleep(0.5)
        row = store.get_run(run_id)
        assert row["status"] == "cancelled"
        assert row["timings"]["epochs_completed"] < 500
        at.run(timeout=TIMEOUT)
        assert "Cancelled" in texts(at.warning)
    finally:
        pids = {r["worker_pid"] for r in store.list_runs() if r["worker_pid"]}
        for pid in pids:  # the worker runs in its own session: end its process group
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass


def test_odd_history_never_crashes_a_page(home, store):
    """Imported or half-written rows: empty configs, missing metrics or costs, NaN-ish values,
    unknown keys and families, a non-string dataset, and precomputed rows without reference meta."""
    rows = [
        {"config": {}, "metrics": {}, "costs": {}},
        {
            "config": {
                "dataset": "elpv-binary",
                "backbone": "dinov2_s14",
                "resolution": 112,
                "shots": 16,
                "tuning": "prompt",
                "num_prompts": 7,
                "placement": "0,5,11",
            },
            "metrics": {"accuracy": None, "balanced_accuracy": "n/a"},
            "costs": {"gmacs": None},
        },
        {
            "config": {
                "dataset": "elpv-binary",
                "backbone": "dinov2_s14",
                "resolution": 112,
                "shots": 16,
                "tuning": "prompt",
                "num_prompts": 3,
                "placement": "deep",
                "mystery": [1, {"a": 2}],
            },
            "metrics": {"accuracy": 0.7, "balanced_accuracy": 0.6, "confusion_matrix": [[1, 2], [3, 4]]},
            "costs": {"gmacs": 1.5, "params_trainable": 5000},
            "kind": "condense",
        },
        {"config": {"dataset": {"weird": True}, "num_prompts": "ten"}, "status": "failed", "error": None},
        {
            "config": {
                "dataset": "elpv-binary",
                "backbone": "dinov2_s14",
                "resolution": 112,
                "shots": 16,
                "tuning": "linear",
                "num_prompts": 0,
            },
            "status": "cancelled",
        },
        {"config": {"dataset": "elpv-binary"}, "status": "failed", "error": "", "sweep_id": "odd-sweep"},
    ]
    store.import_runs(rows, source="precomputed")
    at = app()
    at.session_state["last_sweep_id"] = "odd-sweep"  # a sweep whose failed run has an empty error
    for page in PAGES:
        goto(at, page)
    goto(at, "app_pages/budget.py")
    at.button_group(key="budget_metric").set_value("balanced_accuracy_mean").run(timeout=TIMEOUT)
    at.slider(key="budget_tolerance").set_value(10.0).run(timeout=TIMEOUT)
    at.toggle(key="budget_match").set_value(False).run(timeout=TIMEOUT)
    assert not at.exception, [e.message for e in at.exception]
    goto(at, "app_pages/runs.py")
    at.multiselect(key="runs_f_status").set_value(["done"]).run(timeout=TIMEOUT)
    assert not at.exception, [e.message for e in at.exception]


def test_files_with_class_names_upload(home):
    def png(level: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((24, 24), level, np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    at = goto(app(), "app_pages/data.py")
    at.radio(key="data_source").set_value("My own images").run(timeout=TIMEOUT)
    at.text_input(key="data_class_0").input("cracked").run(timeout=TIMEOUT)
    at.text_input(key="data_class_1").input("fine").run(timeout=TIMEOUT)
    at.file_uploader(key="data_files_0").set_value([(f"a{i}.png", png(20 + i), "image/png") for i in range(5)])
    at.file_uploader(key="data_files_1").set_value([(f"b{i}.png", png(220 - i), "image/png") for i in range(5)])
    at.text_input(key="data_files_name").input("my cells").run(timeout=TIMEOUT)
    at.button(key="data_files_save").click().run(timeout=TIMEOUT)
    assert not at.exception, [e.message for e in at.exception]
    [info] = uploads.list_uploads()
    assert info.name == "my cells" and info.classes == {"cracked": 5, "fine": 5}
    assert at.session_state["active_dataset"] == uploads.upload_spec(info.slug)

    # picked again later and deleted with a confirmation; the active set falls back to ELPV
    at.button(key="data_delete_saved").click().run(timeout=TIMEOUT)
    at.button(key="data_delete_yes").click().run(timeout=TIMEOUT)
    assert uploads.list_uploads() == []
    assert at.session_state["active_dataset"] == "elpv-binary"


def test_unavailable_backbone_is_a_message(home, store):
    at = app()
    at.session_state["active_backbone"] = "vit_tiny_patch16_224.augreg_in21k"  # needs the HF Hub: offline here
    for page in ("app_pages/train.py", "app_pages/budget.py"):
        goto(at, page)
        if at.error:
            assert "cannot be built here" in texts(at.error)
        else:  # the machine reached the hub (or had the weights cached): then it simply works
            assert not at.exception
    goto(at, "app_pages/train.py")
    if at.error:
        assert at.button(key="train_submit").disabled
