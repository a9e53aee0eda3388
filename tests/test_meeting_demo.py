"""benchmarks/meeting_demo.py: the per-phase split it reads from the run store."""

from benchmarks.meeting_demo import phase_split


def test_phases_run_from_their_first_event_to_the_next_phase_and_the_last_to_the_finish():
    run = {"started_at": 100.0, "finished_at": 130.0}
    events = [
        {"phase": "setup", "elapsed_s": 0.0},
        {"phase": "setup", "elapsed_s": 1.0},
        {"phase": "train", "elapsed_s": 4.0},
        {"phase": "val", "elapsed_s": 9.0},  # validation inside the epochs: still training
        {"phase": "train", "elapsed_s": 12.0},
        {"phase": "test", "elapsed_s": 20.0},
        {"phase": "cost", "elapsed_s": 23.5},
    ]
    assert phase_split(run, events) == {"setup_s": 4.0, "train_s": 16.0, "test_s": 3.5, "cost_s": 6.5}


def test_a_run_that_has_not_finished_has_no_length_for_its_last_phase():
    events = [{"phase": "setup", "elapsed_s": 0.0}, {"phase": "train", "elapsed_s": 2.0}]
    assert phase_split({"started_at": 5.0, "finished_at": None}, events) == {"setup_s": 2.0, "train_s": None}
