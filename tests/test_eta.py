"""The ETA over every phase of a training run (runs.eta, shown by views.wording.progress_of). Expected
values are sums worked out by hand from the definition: training = the event's eta_s less the time
since it was written; test = this run's validation pass x test_fraction / val_fraction, else the
history's seconds per test image x test images; cost = the latest same-architecture run's cost phase;
each less the time already spent in it, never below zero."""

from __future__ import annotations

import pytest

from vptdash.engine.train import RunConfig
from vptdash.runs import eta, jobs
from vptdash.runs.store import RunStore
from vptdash.views.wording import progress_of

STARTED = 1_000.0
CONFIG = {"epochs": 10, "test_fraction": 0.25, "val_fraction": 0.1}
RUN = {"kind": "train", "started_at": STARTED, "config": CONFIG}
HISTORY = eta.PhaseHistory(test_s_per_image=0.03, test_images=600, cost_s=12.0)


def step(*, elapsed, eta_s, val_pass=None, epoch=5):
    event = {"phase": "train", "step": 40, "total_steps": 80, "epoch": epoch, "elapsed_s": elapsed, "eta_s": eta_s}
    if val_pass is not None:
        event["val_pass_s"] = val_pass
    return event


def test_training_eta_adds_evaluation_from_this_runs_validation_and_cost_from_history():
    event = step(elapsed=50.0, eta_s=50.0, val_pass=2.0)  # written at 1050
    left = eta.remaining(RUN, event, HISTORY, now=1060.0)
    # training 50 - 10 = 40; test 2.0 x 0.25 / 0.1 = 5; cost 12
    assert left == pytest.approx({"train": 40.0, "test": 5.0, "cost": 12.0, "total": 57.0})
    assert progress_of(RUN, event, now=1060.0, history=HISTORY) == (0.5, "epoch 5/10 · ETA 57 s")


def test_before_any_validation_pass_the_test_phase_comes_from_the_history():
    event = step(elapsed=50.0, eta_s=50.0)
    left = eta.remaining(RUN, event, HISTORY, now=1050.0)
    # 50 + 0.03 x 600 + 12 = 80
    assert left == pytest.approx({"train": 50.0, "test": 18.0, "cost": 12.0, "total": 80.0})
    assert progress_of(RUN, event, now=1050.0, history=HISTORY)[1] == "epoch 5/10 · ETA 1 min 20 s"


def test_after_the_last_validation_the_eta_is_evaluation_and_costs_not_zero():
    last_val = {"phase": "val", "epoch": 10, "step": 80, "elapsed_s": 100.0, "eta_s": 0.0, "val_pass_s": 2.0}
    # written at 1100; 3 s into the test evaluation: 5 - 3 = 2 left, then the cost phase's 12
    assert eta.remaining(RUN, last_val, HISTORY, now=1103.0)["total"] == pytest.approx(14.0)
    assert progress_of(RUN, last_val, now=1103.0, history=HISTORY) == (
        1.0,
        "finishing: test set, compute and latency · ETA 14 s",
    )


def test_the_cost_phase_counts_down_from_the_history_and_stops_at_zero():
    cost = {"phase": "cost", "message": "counting GMACs and measuring latency", "elapsed_s": 110.0}
    assert progress_of(RUN, cost, now=1115.0, history=HISTORY) == (
        1.0,
        "counting GMACs and measuring latency · ETA 7 s",  # 12 - (1115 - 1110)
    )
    assert eta.remaining(RUN, cost, HISTORY, now=1500.0)["total"] == 0.0
    test = {"phase": "test", "accuracy": 0.8, "elapsed_s": 109.0}  # evaluation done, the cost phase next
    assert eta.remaining(RUN, test, HISTORY, now=1109.0)["total"] == pytest.approx(12.0)


def test_an_unknown_phase_makes_the_total_unknown_and_the_line_says_evaluation_follows():
    event = step(elapsed=50.0, eta_s=50.0, val_pass=2.0)
    no_cost = eta.PhaseHistory(test_s_per_image=0.03, test_images=600, cost_s=None)
    assert eta.remaining(RUN, event, no_cost, now=1050.0)["total"] is None
    assert progress_of(RUN, event, now=1050.0, history=no_cost)[1] == "epoch 5/10 · ETA 50 s + evaluation"
    cost = {"phase": "cost", "message": "counting GMACs", "elapsed_s": 110.0}
    assert progress_of(RUN, cost, now=1115.0, history=no_cost)[1] == "counting GMACs"  # no "ETA 0 s"


def test_other_job_kinds_keep_their_own_eta():
    run = {"kind": "continual", "started_at": STARTED, "config": {"epochs": 10}}
    assert progress_of(run, step(elapsed=50.0, eta_s=50.0), now=1060.0, history=HISTORY)[1] == "epoch 5/10 · ETA 40 s"


# ------------------------------------------------------------------------------------ the history


def finished(store, config: RunConfig, timings: dict) -> int:
    run_id = store.create_run(config.to_dict(), status="running")
    store.finish_run(run_id, "done", metrics={"accuracy": 0.5}, timings=timings)
    return run_id


def test_history_takes_the_latest_same_architecture_run_and_the_test_images_of_the_same_split(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    arch = {"dataset": "a", "num_prompts": 10, "placement": "shallow"}
    finished(store, RunConfig(**arch, seed=0), {"test_seconds": 6.0, "test_images": 200, "cost_seconds": 20.0})
    # later, same architecture (seed and shots only change training): costs were cached by then
    finished(store, RunConfig(**arch, seed=1, shots=4), {"test_seconds": 5.0, "test_images": 200, "cost_seconds": 0.5})
    finished(store, RunConfig(**{**arch, "num_prompts": 50}), {"test_seconds": 30.0, "cost_seconds": 40.0})
    finished(store, RunConfig(**arch, measure_latency=False), {"cost_seconds": 0.1})  # no latency measured
    # newest: another test split of the same images (same architecture): 8 s for 400 test images
    finished(store, RunConfig(**arch, test_fraction=0.5), {"test_seconds": 8.0, "test_images": 400})
    running = RunConfig(**arch, seed=3, epochs=50).to_dict()
    # per image 8 / 400 (the latest same-architecture run that evaluated); images 200 (the latest run with this
    # data and split); cost 0.5 (the latest same-architecture run with latency measured, as this one will)
    assert eta.phase_history(store, running) == eta.PhaseHistory(0.02, 200, 0.5)
    assert eta.phase_history(store, running).test_s == pytest.approx(4.0)
    assert eta.phase_history(store, {"backbone": 3}) == eta.PhaseHistory()  # not a configuration: nothing


def test_the_progress_writer_times_validation_evaluation_and_costs(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = store.create_run({"dataset": "a"}, status="running")
    clock = iter([0.0, 2.0, 3.0, 10.0, 11.0])
    monkeypatch.setattr(jobs.time, "monotonic", lambda: next(clock))
    writer = jobs.ProgressWriter(store, run_id, None)
    writer({"phase": "train", "step": 8, "total_steps": 8, "epoch": 1, "elapsed_s": 10.0})
    writer({"phase": "val", "epoch": 1, "step": 8, "elapsed_s": 12.5})  # a validation pass of 2.5 s
    writer({"phase": "train", "step": 9, "total_steps": 16, "epoch": 2, "elapsed_s": 13.0})
    writer({"phase": "test", "accuracy": 0.5, "elapsed_s": 20.0})
    writer({"phase": "cost", "message": "counting", "elapsed_s": 21.0})
    events = store.progress(run_id)
    assert "val_pass_s" not in events[0] and [e["val_pass_s"] for e in events[1:]] == [2.5] * 4
    # evaluation: from the last training event (t=3) to "test" (t=10); costs: from "cost" (t=11) to the end
    assert writer.phase_timings(end=15.0) == {"test_seconds": 7.0, "cost_seconds": 4.0}


def test_a_real_run_stores_its_phase_timings(image_folder):
    store = RunStore()
    config = RunConfig(backbone="tiny-random", dataset=str(image_folder), resolution=32, epochs=1, batch_size=8)
    row = jobs.run_now(store, config)
    assert row["status"] == "done", row["error"]
    timings = row["timings"]
    assert timings["test_images"] == row["metrics"]["split_sizes"]["test"] > 0
    assert timings["test_seconds"] >= 0 and timings["cost_seconds"] > 0
    history = eta.phase_history(store, {**config.to_dict(), "seed": 1})
    assert history.cost_s == timings["cost_seconds"]
    assert history.test_images == timings["test_images"]
