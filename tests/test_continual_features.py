"""The features-forgetting benchmark's class order and its conclusion, from their definitions."""

from benchmarks import continual_features


def test_the_scale_conflict_order_puts_one_scale_first_and_scales_apart_later():
    patterns = ["checks", "dots", "rings", "grid", "blobs", "speckle"]
    names = sorted(
        [f"{p}-{s}" for p in patterns for s in ("coarse", "medium", "fine")]
        + [f"stripes-{a}-{s}" for a in (0, 45, 90, 135) for s in ("coarse", "medium", "fine")]
    )
    order = continual_features.scale_conflict_order(names)
    assert sorted(order) == list(range(30))
    tasks = [[names[i] for i in order[t * 6 : (t + 1) * 6]] for t in range(5)]
    assert sorted(tasks[0]) == sorted(f"{p}-medium" for p in patterns)  # patterns apart, one scale
    for task in tasks[1:]:  # every later task tells scales of the same pattern apart
        stems = [name.rsplit("-", 1)[0] for name in task]
        assert all(stems.count(stem) >= 2 for stem in stems)
        assert not any(name.endswith("-medium") and not name.startswith("stripes") for name in task)


def _run(method, drop, *, resolution=56, shots=30, order=None):
    return {
        "config": {"method": method, "resolution": resolution, "shots": shots, "class_order": order},
        "metrics": {"ncm_forgetting_task_il": drop},
    }


def test_the_conclusion_names_a_setting_only_where_sequential_lost_more_than_the_threshold():
    rows = [_run("sequential", 0.004), _run("nsp2", 0.0), _run("sequential", 0.0, shots=8)]
    (line,) = continual_features.conclusion(rows, [0.004, 0.0], [0.1, 0.05])
    assert line.startswith("- So none of these settings shows") and "better for all 30 classes" in line
    (line,) = continual_features.conclusion(rows, [0.004, 0.0], [0.1, -0.01])
    assert "better for all" not in line  # one run's features got worse overall: not claimed
    rows += [_run("sequential", 0.05, order=[1, 0]), _run("sequential", 0.01, order=[1, 0]), _run("nsp2", 0.2)]
    (line,) = continual_features.conclusion(rows, [], [0.1])
    # the conflict order's sequential runs average 3 points (> 2); NSP2's drop is not sequential tuning's
    assert "56 px, 30 images per class, scale-conflict order" in line and "8 images" not in line
