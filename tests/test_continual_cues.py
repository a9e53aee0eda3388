"""The cue-conflict benchmark's sentences and per-family table, from their definitions, on fixed runs."""

import pytest

from benchmarks import continual_cues


def _run(method, seed, *, drop, learned=0.9, untrained=0.5, final=None, forgetting=0.4, accuracy=0.5):
    tasks = [[f"frequency-{k}" for k in range(1, 7)], [f"angle-{k}" for k in range(1, 7)]]
    final = learned - drop if final is None else final
    return {
        "config": {"method": method, "seed": seed},
        "metrics": {
            "tasks": tasks,
            "ncm_forgetting_task_il": drop,
            "ncm_learning_task_il": learned,
            "avg_ncm_task_il_untrained": untrained,
            "avg_ncm_task_il": final,
            "ncm_task_il_untrained": [untrained, untrained],
            "ncm_task_il_matrix": [[learned, None], [learned - drop, learned]],
            "forgetting": forgetting,
            "avg_accuracy": accuracy,
        },
    }


def test_features_forgetting_is_claimed_only_when_every_seed_lost_over_two_points():
    shown = continual_cues.observations(
        {"sequential": [_run("sequential", s, drop=d) for s, d in enumerate((0.1, 0.2, 0.15))]}
    )
    assert "+40.0 points over the untrained prompts" in shown[0] and "Every seed lost more than 2 points" in shown[0]
    weak = continual_cues.observations(
        {"sequential": [_run("sequential", s, drop=d) for s, d in enumerate((0.1, 0.01, 0.2))]}
    )
    assert "not shown beyond noise" in weak[0]


def test_paired_differences_say_within_noise_when_the_interval_crosses_zero():
    seq = [_run("sequential", s, drop=0.15, forgetting=f) for s, f in enumerate((0.40, 0.50, 0.45))]
    clear = [_run("nsp2", s, drop=0.0, forgetting=f) for s, f in enumerate((0.10, 0.11, 0.12))]
    lines = continual_cues.observations({"sequential": seq, "nsp2": clear})
    (features,) = [line for line in lines if "the features' forgetting:" in line]
    assert "-15.0 points" in features and "within noise" not in features  # the same drop on every seed
    (forgetting,) = [line for line in lines if "class-incremental forgetting:" in line]
    assert "-34.0 points" in forgetting and "within noise" not in forgetting
    noisy = [_run("nsp2", s, drop=d, forgetting=0.45) for s, d in enumerate((0.30, 0.0, 0.15))]
    (features,) = [
        line
        for line in continual_cues.observations({"sequential": seq, "nsp2": noisy})
        if "the features' forgetting:" in line
    ]
    assert "+0.0 points" in features and "within noise" in features
    paper = [line for line in lines if "Against the paper" in line][0]
    assert "45.0 → 11.0 points (-76 %)" in paper


def test_the_family_table_follows_each_family_whatever_its_position():
    first = _run("sequential", 0, drop=0.3, learned=0.8, untrained=0.4)
    second = _run("sequential", 1, drop=0.1, learned=0.9, untrained=0.6)
    second["metrics"]["tasks"].reverse()  # seed 1 learned angle first: its first task is angle
    found = continual_cues.by_family([first, second])
    assert found["frequency"]["learned"] == pytest.approx([0.8, 0.9])  # frequency: task 1 of seed 0, task 2 of seed 1
    assert found["frequency"]["final"] == pytest.approx([0.5, 0.9])
    assert found["angle"]["final"] == pytest.approx([0.8, 0.8])
    assert continual_cues.family_of(["angle-1", "plaid-2"]) == "mixed"
