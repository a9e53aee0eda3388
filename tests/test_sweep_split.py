"""benchmarks/sweep_split.py: the split of a sweep's runs into training, test and cost seconds, and its section."""

import pytest

from benchmarks.sweep_split import section, split
from vptdash.engine.train import RunConfig


def test_each_run_adds_its_own_parts_and_the_sums_add_the_runs():
    deep = RunConfig(num_prompts=10, placement="deep")
    probe = RunConfig(num_prompts=0, placement="none")
    rows = [
        {
            "config": deep.to_dict(),
            "timings": {"train_seconds": 15.0, "test_seconds": 4.5, "cost_seconds": 0.5, "cache_seconds": 0.25},
        },
        # A run without a test or cost phase (cancelled, failed) counts zero there, not a missing key.
        {"config": probe.to_dict(), "timings": {"train_seconds": 6.0, "cache_seconds": 5.5}},
    ]
    result = split(rows)
    first, second = result["runs"]
    assert first["label"] == deep.label() and second["label"] == probe.label()
    assert first["total_seconds"] == pytest.approx(15.0 + 4.5 + 0.5)  # the encoding is inside training
    assert second["total_seconds"] == pytest.approx(6.0) and second["test_seconds"] == 0.0
    assert result["sums"] == pytest.approx(
        {"train_seconds": 21.0, "test_seconds": 4.5, "cost_seconds": 0.5, "cache_seconds": 5.75, "total_seconds": 26.0}
    )


def test_a_run_with_no_timings_counts_nothing():
    result = split([{"config": RunConfig().to_dict(), "timings": None}])
    assert result["sums"]["total_seconds"] == 0.0


def test_the_section_states_each_phase_as_a_share_of_its_whole():
    result = {
        "date": "2026-12-07",
        "machine": "a CPU",
        "cpu": {"flags": ["avx2"]},
        "load_average_at_start": [0.5, 0.5, 0.5],
        "processes": 2,
        "fresh_cost_cache": True,
        "sweep_seconds": 200.0,
        "latency_phase_s": 50.0,
        "runs_phase_s": 150.0,
        "sums": {
            "train_seconds": 240.0,
            "cache_seconds": 12.0,
            "test_seconds": 57.0,
            "cost_seconds": 3.0,
            "total_seconds": 300.0,
        },
        "runs": [],
    }
    text = section(result)
    assert "| 50.0 | 25% of the sweep |" in text and "| 150.0 | 75% of the sweep |" in text
    assert "| 240.0 | 80% of the runs' seconds |" in text and "| 57.0 | 19% |" in text and "| 3.0 | 1% |" in text
    assert "fresh data dir" in text
    assert "fresh data dir" not in section({**result, "fresh_cost_cache": False})
