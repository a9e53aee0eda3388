"""The sidebar's progress line for a running run (views.wording.progress_of): fraction done and text,
from the run's latest progress event. Expected values are worked out from the definition: fraction =
step / total_steps (at most 1), the ETA the event carried less the time since it was written, never
below zero, and the setup / evaluation phases named rather than counted. Without a measurement of the
evaluation and cost phases the ETA is training's and says evaluation follows; the ETA over every
phase is in tests/test_eta.py."""

import pytest

from vptdash.views.wording import progress_of

STARTED = 1_000.0
RUN = {"started_at": STARTED, "config": {"epochs": 4}}


def train_event(step, total, *, epoch=2, elapsed=50.0, eta=100.0, phase="train"):
    return {"phase": phase, "step": step, "total_steps": total, "epoch": epoch, "elapsed_s": elapsed, "eta_s": eta}


def test_no_event_yet_reads_starting():
    assert progress_of(RUN, None, now=STARTED) == (0.0, "starting...")


def test_setup_and_evaluation_phases_say_what_happens():
    assert progress_of(RUN, {"phase": "setup", "message": "loading data and backbone"}, now=STARTED) == (
        0.0,
        "loading data and backbone",
    )
    assert progress_of(RUN, {"phase": "setup"}, now=STARTED) == (0.0, "setting up")
    assert progress_of(RUN, {"phase": "test"}, now=STARTED) == (1.0, "evaluating on held-out images")
    assert progress_of(RUN, {"phase": "cost", "message": "measuring latency"}, now=STARTED) == (
        1.0,
        "measuring latency",
    )


def test_eta_counts_down_from_when_the_event_was_written():
    event = train_event(5, 20, elapsed=50.0, eta=100.0)  # written at STARTED + 50 s
    assert progress_of(RUN, event, now=STARTED + 50.0) == (0.25, "epoch 2/4 · ETA 1 min 40 s + evaluation")
    assert progress_of(RUN, event, now=STARTED + 80.0) == (
        0.25,
        "epoch 2/4 · ETA 1 min 10 s + evaluation",
    )  # 30 s later
    assert progress_of(RUN, event, now=STARTED + 145.0) == (0.25, "epoch 2/4 · ETA 5 s + evaluation")  # 100 - 95
    # a clock behind the event (another machine's clock) does not add time
    assert progress_of(RUN, event, now=STARTED + 10.0) == (0.25, "epoch 2/4 · ETA 1 min 40 s + evaluation")


def test_an_overdue_eta_reads_zero_never_negative():
    event = train_event(19, 20, elapsed=50.0, eta=5.0)
    assert progress_of(RUN, event, now=STARTED + 500.0) == (0.95, "epoch 2/4 · ETA 0 s + evaluation")


def test_long_etas_read_in_hours():
    event = train_event(1, 1000, elapsed=10.0, eta=2 * 3600 + 5 * 60)
    assert progress_of(RUN, event, now=STARTED + 10.0) == (0.001, "epoch 2/4 · ETA 2 h 05 min + evaluation")


def test_the_last_validation_reads_finishing():
    event = train_event(20, 20, epoch=4, phase="val")
    assert progress_of(RUN, event, now=STARTED + 60.0) == (1.0, "finishing: test set, compute and latency")
    # an earlier epoch's validation at the same fraction is still training (epoch 3 of 4)
    assert progress_of(RUN, train_event(20, 20, epoch=3, phase="val"), now=STARTED + 50.0)[1].startswith("epoch 3/4")


@pytest.mark.parametrize(
    "event, expected_fraction",
    [
        ({"phase": "train", "step": 30, "total_steps": 20}, 1.0),  # never past the end
        ({"phase": "train", "step": "7", "total_steps": "28"}, 0.25),  # numbers stored as text
        ({"phase": "train", "step": None, "total_steps": 20}, 0.0),
        ({"phase": "train", "step": 5, "total_steps": 0}, 0.0),  # no division by zero
        ({"phase": "train", "step": float("nan"), "total_steps": 20}, 0.0),
        ({"phase": "train", "step": 5, "total_steps": float("inf")}, 0.0),
    ],
)
def test_odd_events_give_a_fraction_in_range_and_text_without_an_eta(event, expected_fraction):
    fraction, text = progress_of({"config": {}}, event, now=STARTED)
    assert fraction == expected_fraction
    assert text == "training"  # no epoch count known, no ETA to show


def test_an_eta_needs_the_runs_start_time_to_count_down():
    event = train_event(5, 20, elapsed=50.0, eta=100.0)
    # without started_at the ETA is shown as the event gave it, not corrected
    assert progress_of({"config": {"epochs": 4}}, event, now=STARTED + 500.0) == (
        0.25,
        "epoch 2/4 · ETA 1 min 40 s + evaluation",
    )
