"""budget.py from hand-made run dicts: tables, seeds, Pareto front, recommendation, estimates."""

import math

import numpy as np
import pandas as pd
import pytest

from vptdash.engine.cost import analytic_gmacs
from vptdash.engine.prompts import PromptedViT
from vptdash.views import budget


def make_run(
    run_id,
    num_prompts,
    placement="shallow",
    seed=0,
    accuracy=0.8,
    gmacs=1.0,
    *,
    tuning="prompt",
    latency=None,
    params=None,
    source="precomputed",
    status="done",
    dataset="elpv-binary",
    majority=0.7,
):
    return {
        "id": run_id,
        "status": status,
        "kind": "train",
        "source": source,
        "created_at": 1000.0 + run_id,
        "parent_id": None,
        "sweep_id": "s1",
        "error": None,
        "config": {
            "dataset": dataset,
            "backbone": "tiny-random",
            "num_prompts": num_prompts,
            "placement": placement,
            "seed": seed,
            "tuning": tuning,
            "measure_latency": seed == 0,
        },
        "metrics": {"accuracy": accuracy, "balanced_accuracy": accuracy - 0.05, "majority_accuracy": majority},
        "costs": {
            "gmacs": gmacs,
            "latency_ms_b1": latency,
            "params_trainable": params if params is not None else num_prompts * 384 + 770,
        },
        "timings": {"train_seconds": 10.0},
    }


def test_runs_table_keeps_done_runs_and_fills_nan():
    rows = [
        make_run(1, 10),
        make_run(2, 10, status="failed"),
        {"id": 3, "status": "done", "config": {}, "metrics": {}},  # no metrics: skipped
        {"id": 4, "status": "done", "config": {"num_prompts": 5}, "metrics": {"accuracy": 0.5}},  # sparse
    ]
    table = budget.runs_table(rows)
    assert list(table["id"]) == [1, 4]
    assert list(table.columns[:4]) == ["id", "family", "label", "config_key"]
    sparse = table.set_index("id").loc[4]
    assert sparse["label"] == "5 shallow prompts" and sparse["family"] == "shallow"
    assert math.isnan(sparse["gmacs"]) and math.isnan(sparse["latency_ms_b1"]) and math.isnan(sparse["seed"])
    assert budget.runs_table([]).empty and "accuracy" in budget.runs_table([]).columns
    upload = budget.runs_table([make_run(5, 10, dataset="/home/u/.local/share/vptdash/uploads/my-cells")])
    assert upload["dataset_name"].item() == "my-cells" and upload["dataset"].item().endswith("/my-cells")


def test_config_key_ignores_seed_only():
    a, b, c = make_run(1, 10, seed=0), make_run(2, 10, seed=1), make_run(3, 10, "deep", seed=0)
    table = budget.runs_table([a, b, c])
    assert table["config_key"][0] == table["config_key"][1] != table["config_key"][2]


def test_aggregate_mean_and_std_over_three_seeds():
    accuracies = [0.80, 0.83, 0.89]
    rows = [make_run(i + 1, 10, seed=i, accuracy=acc, latency=2.0 + i) for i, acc in enumerate(accuracies)]
    rows.append(make_run(9, 0, tuning="linear", accuracy=0.7, source="live"))
    agg = budget.aggregate_over_seeds(budget.runs_table(rows))
    assert list(agg["family"]) == ["linear probe", "shallow"]  # FAMILY_ORDER
    shallow = agg.iloc[1]
    assert shallow["n_seeds"] == 3 and sorted(shallow["run_ids"]) == [1, 2, 3]
    assert shallow["accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert shallow["accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert shallow["latency_ms_b1"] == pytest.approx(3.0)
    assert shallow["sources"] == "precomputed"
    assert agg.iloc[0]["accuracy_std"] == 0.0 and agg.iloc[0]["sources"] == "live"


def test_aggregate_mixed_sources():
    agg = budget.aggregate_over_seeds(
        budget.runs_table([make_run(1, 10, seed=0), make_run(2, 10, seed=1, source="live")])
    )
    assert agg.iloc[0]["sources"] == "mixed"


def frame(points):
    return pd.DataFrame([{"label": name, "gmacs": c, "accuracy_mean": m, "family": "shallow"} for name, c, m in points])


def test_pareto_front_excludes_dominated_and_keeps_exact_ties():
    df = frame(
        [
            ("a", 1.0, 0.80),
            ("b", 2.0, 0.85),
            ("c", 2.0, 0.83),  # same cost as b, worse: dominated
            ("d", 3.0, 0.85),  # same accuracy as b, dearer: dominated
            ("e", 4.0, 0.90),
            ("f", 4.0, 0.90),  # exact tie with e: neither dominates
            ("g", 5.0, 0.70),  # dominated by everything cheaper
            ("h", float("nan"), 0.99),  # no cost: excluded
        ]
    )
    front = budget.pareto_front(df)
    assert list(front["label"]) == ["a", "b", "e", "f"]
    assert list(front["gmacs"]) == sorted(front["gmacs"])


def test_recommend_cheapest_within_tolerance_and_sentence_numbers():
    df = frame(
        [
            ("linear probe", 1.0, 0.80),
            ("10 shallow prompts", 1.47, 0.841),
            ("50 deep prompts", 4.71, 0.867),
            ("100 deep prompts", 9.0, 0.86),
        ]
    )
    df["num_prompts"] = [0, 10, 50, 100]
    df["placement"] = ["shallow", "shallow", "deep", "deep"]
    df["family"] = ["linear probe", "shallow", "deep", "deep"]
    rec = budget.recommend(df, 3.0)
    assert rec.best["label"] == "50 deep prompts" and rec.chosen["label"] == "10 shallow prompts"
    assert rec.sentence == (
        "10 shallow prompts reach 97% of the best accuracy (84.1% vs 86.7% for 50 deep prompts) "
        "at 31% of its compute (1.47 vs 4.71 GMACs per image)."
    )
    same = budget.recommend(df, 1.0)
    assert same.chosen_is_best and same.sentence.startswith("The best configuration, 50 deep prompts")
    assert "cheapest within 1 point" in same.sentence
    linear = budget.recommend(df, 7.0)
    assert linear.chosen["family"] == "linear probe"
    assert linear.sentence.startswith("A linear probe (no prompts) is within 6.7 points of the best accuracy")
    assert budget.recommend(df.iloc[0:0]) is None


def test_recommend_latency_and_params_wording():
    df = frame([("10 shallow prompts", 1.47, 0.85), ("50 deep prompts", 4.71, 0.86)])
    df["latency_ms_b1"] = [3.1, 7.75]
    df["params_trainable"] = [4610, 38400]
    assert (
        "at 40% of its latency (3.1 vs 7.8 ms per image at batch 1)"
        in budget.recommend(df, 2.0, cost="latency_ms_b1").sentence
    )
    assert (
        "with 12% of its trainable parameters (4,610 vs 38,400)"
        in budget.recommend(df, 2.0, cost="params_trainable").sentence
    )


def test_estimate_grid_shapes_and_relations():
    grid = budget.estimate_grid(
        depth=12,
        embed_dim=384,
        mlp_dim=1536,
        num_patches=64,
        patch_size=14,
        num_classes=2,
        counts=[0, 1, 10, 50],
        placements=["shallow", "deep"],
    )
    assert (grid["num_prompts"] == 0).sum() == 1  # one linear-probe row
    head = 384 * 2 + 2
    shallow = grid[grid["placement"] == "shallow"].set_index("num_prompts")
    deep = grid[grid["placement"] == "deep"].set_index("num_prompts")
    assert shallow["gmacs_analytic"].is_monotonic_increasing and shallow["gmacs_analytic"].is_unique
    assert deep["gmacs_analytic"].is_monotonic_increasing and deep["gmacs_analytic"].is_unique
    # deep prompts are keys/values only (the next block overwrites them); shallow ones run through every block
    assert (deep["gmacs_analytic"] < shallow["gmacs_analytic"]).all()
    whole = budget.estimate_grid(
        depth=12,
        embed_dim=384,
        mlp_dim=1536,
        num_patches=64,
        patch_size=14,
        num_classes=2,
        counts=[10],
        placements=["shallow", "deep"],
        row_selection=False,
    )
    assert np.allclose(whole["gmacs_analytic"].iloc[0], whole["gmacs_analytic"].iloc[1])  # the textbook graph
    assert (whole["gmacs_analytic"] > grid[grid["num_prompts"] == 10]["gmacs_analytic"].to_numpy()).all()
    for n in (1, 10, 50):
        assert shallow.loc[n, "params_trainable"] == n * 384 + head
        assert deep.loc[n, "params_trainable"] - head == 12 * (shallow.loc[n, "params_trainable"] - head)
        assert shallow.loc[n, "tokens"] == 1 + 64 + n
    assert grid.loc[grid["num_prompts"] == 0, "relative_cost"].item() == 1.0
    assert set(grid["family"]) == {"linear probe", "shallow", "deep"}


def test_estimate_grid_matches_analytic_gmacs_of_a_real_model(tiny_backbone):
    shape = budget.backbone_shape(tiny_backbone)
    resolution = 32
    num_patches = (resolution // shape["patch_size"]) ** 2
    grid = budget.estimate_grid(**shape, num_patches=num_patches, num_classes=3, counts=[4], placements=["2,3"])
    model = PromptedViT(tiny_backbone, 3, num_prompts=4, placement="2,3")
    assert grid["gmacs_analytic"].item() == pytest.approx(analytic_gmacs(model, resolution))
    assert grid["params_trainable"].item() == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def tiny_backbone():
    from vptdash.engine.backbones import create_backbone

    return create_backbone("tiny-random", img_size=32)


def _row(run_id, **config):
    base = {
        "dataset": "elpv-binary",
        "cell_type": None,
        "backbone": "dinov2_s14",
        "resolution": 112,
        "shots": 16,
        "test_fraction": 0.25,
        "split_seed": 0,
        "seed": 0,
        "tuning": "prompt",
        "num_prompts": 10,
        "placement": "deep",
    }
    return {"id": run_id, "status": "done", "config": {**base, **config}}


def test_comparable_runs_keep_one_data_set_and_one_setup():
    setup = {"dataset": "elpv-binary", "cell_type": None, "backbone": "dinov2_s14", "resolution": 112, "shots": 16}
    rows = [
        _row(1),
        _row(2, dataset="toy.zip"),
        _row(3, cell_type="mono"),
        _row(4, shots=64),
        _row(5, backbone="tiny-random"),
        _row(6, resolution=224),
        _row(7, seed=1),
    ]
    kept, left_out = budget.comparable_runs(rows, setup)
    assert [r["id"] for r in kept] == [1, 7]
    assert left_out == 3  # 4, 5, 6: same data, another setup; 2 and 3 are other data, never counted
    kept, left_out = budget.comparable_runs(rows, setup, same_setup=False)
    assert [r["id"] for r in kept] == [1, 4, 5, 6, 7] and left_out == 0


def test_the_baseline_is_the_probe_on_the_same_images_and_seed_first():
    probe = {"tuning": "linear", "num_prompts": 0, "placement": "none"}
    run = _row(1, seed=2)["config"]
    rows = [
        _row(10, **probe, seed=0),
        _row(11, **probe, seed=2),
        _row(12, **probe, seed=2, shots=64),
        _row(13, seed=2),
        _row(14, **probe, seed=2, split_seed=1),
    ]
    assert budget.matching_probe(rows, run)["id"] == 11
    assert budget.matching_probe([r for r in rows if r["id"] != 11], run)["id"] == 10  # another seed, same images
    assert budget.matching_probe([rows[2], rows[3], rows[4]], run) is None  # other shots, not a probe, other split
