"""budget.py from hand-made run dicts: tables, seeds, Pareto front, recommendation, estimates."""

import math

import numpy as np
import pandas as pd
import pytest

from vptdash.engine.cost import analytic_gmacs
from vptdash.engine.prompts import PromptedViT
from vptdash.views import budget, stats


@pytest.fixture(autouse=True)
def fresh_comparisons():
    """Every test computes its comparisons: a cached answer from another test would hide a bug."""
    stats.clear_cache()


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
    # one value per configuration and no per-image results: point estimates, and the sentence says so
    assert rec.verdict == budget.VERDICT_NO_INTERVAL
    assert rec.sentence == (
        "10 shallow prompts reach 97% of the best accuracy (84.1% vs 86.7% for 50 deep prompts) "
        "at 31% of its compute (1.47 vs 4.71 GMACs per image). "
        "One seed and no per-image results: no interval yet, so this is not evidence."
    )
    same = budget.recommend(df, 1.0)
    assert same.chosen_is_best and same.sentence.startswith("The best configuration, 50 deep prompts")
    assert "cheapest within 1 point" in same.sentence
    linear = budget.recommend(df, 7.0)
    assert linear.chosen["family"] == "linear probe"
    assert linear.sentence.startswith("A linear probe (no prompts) is within 6.7 points of the best accuracy")
    assert budget.recommend(df.iloc[0:0]) is None
    assert budget.recommend(df.assign(accuracy_mean=float("nan"))) is None
    assert budget.recommend(df, metric="no_such_metric") is None


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


# ------------------------------------------------------------------------------------ decision rules
def costed(points, **columns):
    """A frame of configurations (label, cost, mean), more columns as lists; no per-seed data, so every
    comparison is a point estimate and the rules are the plain ones."""
    df = frame(points)
    for name, values in columns.items():
        df[name] = values
    return df


def test_a_configuration_without_a_known_cost_is_never_chosen():
    # the best has no cost; a cheaper-looking one with no cost sits within the tolerance too
    df = costed(
        [("best, cost unknown", float("nan"), 0.90), ("costed", 2.0, 0.895), ("also unknown", float("nan"), 0.899)]
    )
    rec = budget.recommend(df, 1.0)
    assert rec.best["label"] == "best, cost unknown"
    assert rec.chosen["label"] == "costed"
    nothing_costed = costed([("a", float("nan"), 0.90), ("b", float("nan"), 0.95)])
    rec = budget.recommend(nothing_costed, 10.0)
    assert rec.chosen["label"] == "b" == rec.best["label"]  # no cost anywhere: the best, as it is


def test_ties_for_best_go_to_the_cheapest_then_to_the_most_seeds():
    df = costed([("dear", 2.0, 0.90), ("cheap", 1.0, 0.90), ("worse", 0.5, 0.80)])
    rec = budget.recommend(df, 0.0)
    assert rec.best["label"] == "cheap" and rec.chosen["label"] == "cheap"
    assert rec.chosen_is_best
    # same mean, same cost: the one with more seeds is the best, and equally cheap means the best itself
    df = costed([("one seed", 1.0, 0.90), ("three seeds", 1.0, 0.90)], n_seeds=[1, 3])
    rec = budget.recommend(df, 1.0)
    assert rec.best["label"] == "three seeds"
    assert rec.chosen["label"] == "three seeds" and rec.chosen_is_best
    assert "The best configuration" in rec.sentence


def test_among_equally_cheap_candidates_the_higher_mean_is_chosen():
    df = costed([("best", 3.0, 0.90), ("cheap, lower", 1.0, 0.86), ("cheap, higher", 1.0, 0.88)])
    assert budget.recommend(df, 5.0).chosen["label"] == "cheap, higher"


def test_tolerance_edges():
    df = costed([("best", 3.0, 0.90), ("one point below", 1.0, 0.89), ("far below", 0.5, 0.80)])
    assert budget.recommend(df, 1.0).chosen["label"] == "one point below"  # exactly at the edge: within
    assert budget.recommend(df, 0.99).chosen["label"] == "best"  # just short of it: not
    assert budget.recommend(df, 10.0).chosen["label"] == "far below"  # 10 points: the cheapest
    assert budget.recommend(df, 9.9).chosen["label"] == "one point below"
    negative = budget.recommend(df, -5.0)  # a negative tolerance counts as none
    assert negative.chosen["label"] == "best" and negative.tolerance_points == -5.0


def test_the_pareto_front_in_any_row_order():
    df = frame([("e", 4.0, 0.90), ("a", 1.0, 0.80), ("d", 3.0, 0.85), ("b", 2.0, 0.85), ("x", 0.5, float("nan"))])
    front = budget.pareto_front(df)
    assert list(front["label"]) == ["a", "b", "e"]  # d: same accuracy as b at a higher cost
    assert list(front.index) == [1, 3, 0]  # the original index is kept
    assert budget.pareto_front(df, metric="missing").empty and budget.pareto_front(df.iloc[0:0]).empty
    lonely = budget.pareto_front(frame([("only", 1.0, 0.5)]))
    assert list(lonely["label"]) == ["only"]
    better_and_cheaper = budget.pareto_front(frame([("dear", 2.0, 0.80), ("cheap", 1.0, 0.90)]))
    assert list(better_and_cheaper["label"]) == ["cheap"]


def seeded(run_id, accuracies, *, num_prompts=10, placement="deep", tuning="prompt", gmacs=1.03, **kw):
    """Stored runs of one configuration, one per seed."""
    return [
        make_run(run_id + seed, num_prompts, placement, seed=seed, accuracy=acc, gmacs=gmacs, tuning=tuning, **kw)
        for seed, acc in enumerate(accuracies)
    ]


def probe_runs(accuracies, run_id=100, gmacs=1.0):
    return seeded(run_id, accuracies, num_prompts=0, placement="shallow", tuning="linear", gmacs=gmacs)


def decide(rows, tolerance=1.0, metric="accuracy_mean", cost="gmacs"):
    return budget.recommend(budget.aggregate_over_seeds(budget.runs_table(rows)), tolerance, metric=metric, cost=cost)


def test_a_clear_winner_gets_its_gain_over_the_probe_with_the_interval():
    # per-seed differences 0.14, 0.15, 0.13: mean +14.0 points; s = 1 point, t(2) = 4.303:
    # 95% CI 14.0 -/+ 4.303 / sqrt(3) = 11.5 to 16.5; compute 1.03 vs 1.0 GMACs: +3%
    rows = probe_runs([0.70, 0.72, 0.74]) + seeded(1, [0.84, 0.87, 0.87])
    rec = decide(rows)
    assert rec.verdict == budget.VERDICT_BEATS_PROBE
    assert rec.sentence == "10 deep prompts: +14.0 points over the linear probe (95% CI +11.5 to +16.5) at +3% compute."
    assert rec.chosen["label"] == "10 deep prompts" and rec.probe["family"] == "linear probe"
    assert rec.chosen_vs_probe.method == stats.PAIRED_T
    assert rec.chosen_vs_probe.low == pytest.approx(0.14 - 4.303 * 0.01 / math.sqrt(3), abs=1e-9)


def test_within_noise_says_so_and_recommends_the_probe():
    # differences +0.04, -0.05, +0.04: mean +1.0 point, s = 5.196 points: 95% CI 1.0 -/+ 12.909
    rows = probe_runs([0.70, 0.78, 0.72]) + seeded(1, [0.74, 0.73, 0.76])
    rec = decide(rows)
    assert rec.verdict == budget.VERDICT_WITHIN_NOISE
    assert rec.sentence == (
        "No budget beats the linear probe beyond noise at 16 images per class; the differences in accuracy are "
        "within ±1.0 points (the best, 10 deep prompts: +1.0 points, 95% CI -11.9 to +13.9). "
        "More images or seeds would tell them apart."
    )
    assert rec.chosen["family"] == "linear probe" and rec.best["label"] == "10 deep prompts"
    # the probe on top: nothing beats it, the closest configuration is named
    rows = probe_runs([0.76, 0.78, 0.75]) + seeded(1, [0.74, 0.73, 0.76])
    rec = decide(rows)
    assert rec.verdict == budget.VERDICT_WITHIN_NOISE and rec.chosen["family"] == "linear probe"
    assert "(the closest, 10 deep prompts: -2.0 points, 95% CI" in rec.sentence
    full = [dict(r, config={**r["config"], "shots": None}) for r in rows]
    assert "beyond noise on the full training split;" in decide(full).sentence


def test_the_probe_within_the_tolerance_of_a_real_gain():
    # prompts beat the probe beyond noise by 0.5 points (differences 0.004, 0.005, 0.006): within 1 point
    rows = probe_runs([0.800, 0.810, 0.820]) + seeded(1, [0.804, 0.815, 0.826])
    rec = decide(rows, 1.0)
    assert rec.verdict == budget.VERDICT_PROBE_ENOUGH and rec.chosen["family"] == "linear probe"
    assert rec.sentence.startswith(
        "The linear probe (no prompts) is within 1 point of the best accuracy: 10 deep prompts is +0.5 points (95% CI"
    )
    assert rec.sentence.endswith("at +3% compute.")
    assert decide(rows, 0.5).verdict == budget.VERDICT_BEATS_PROBE  # 0.5 points: its lower bound is not within


def test_a_cheaper_configuration_is_within_the_tolerance_only_as_the_data_shows():
    # 50 deep (best, mean 0.88) vs 1 deep (mean 0.87): differences +0.01, -0.05, +0.01 -> mean -1.0,
    # s = 3.464 points, 95% CI -1.0 -/+ 8.61: the gap may be as large as 9.6 points
    best = seeded(1, [0.86, 0.90, 0.88], num_prompts=50, gmacs=4.0)
    cheap = seeded(10, [0.87, 0.85, 0.89], num_prompts=1, gmacs=1.0)
    rec = decide(best + cheap, 2.0)
    assert rec.chosen["label"] == "50 deep prompts"  # 1 point below on average, but not shown within 2
    assert rec.verdict == budget.VERDICT_NO_PROBE
    rec = decide(best + cheap, 10.0)
    assert rec.chosen["label"] == "1 deep prompts"
    assert rec.chosen_vs_best.low == pytest.approx(-0.01 - 4.303 * 0.034641 / math.sqrt(3), abs=1e-5)
    assert rec.sentence.endswith("The gap to the best: -1.0 points (95% CI -9.6 to +7.6).")


def test_a_cheaper_configuration_that_also_beats_the_probe_is_named():
    # 10 deep vs the probe: differences 0.12, 0.15, 0.09 -> +12.0 points, s = 3 points,
    # 95% CI 12.0 -/+ 4.303 * 3 / sqrt(3) = +4.5 to +19.5. Against 50 deep (the best, 2 points higher on
    # average) its gap is not shown within 1 point, so 50 deep is chosen; the cheaper winner is still named.
    probe = probe_runs([0.70, 0.72, 0.74])
    best = seeded(1, [0.84, 0.87, 0.87], num_prompts=50, gmacs=4.0)
    cheaper = seeded(10, [0.82, 0.87, 0.83], num_prompts=10, gmacs=1.03)
    rec = decide(probe + best + cheaper)
    assert rec.verdict == budget.VERDICT_BEATS_PROBE and rec.chosen["label"] == "50 deep prompts"
    assert rec.sentence.endswith(
        " 10 deep prompts also beats it (+12.0 points, 95% CI +4.5 to +19.5) at +3% compute, but is not shown to "
        "be within 1 point of the best."
    )
    # a cheaper configuration within noise of the probe is not named as beating it
    shaky = seeded(10, [0.70, 0.90, 0.70], num_prompts=10, gmacs=1.03)
    assert "also beats it" not in decide(probe + best + shaky).sentence


def test_a_cheaper_configuration_within_noise_of_the_probe_is_flagged():
    probe = probe_runs([0.70, 0.72, 0.74])
    best = seeded(1, [0.84, 0.87, 0.87], num_prompts=50, gmacs=4.0)  # +14 points, beyond noise
    shaky = seeded(10, [0.80, 0.86, 0.86], num_prompts=1, gmacs=1.01)  # differences 0.10, 0.14, 0.12
    close = seeded(20, [0.70, 0.90, 0.70], num_prompts=5, gmacs=1.005)  # +1.3 points, CI very wide
    rec = decide(probe + best + shaky + close, 10.0)
    # within 10 points of the best as the data shows: 1 deep (gap -2.0, CI -8.7 to +4.7); 5 deep is not
    assert rec.chosen["label"] == "1 deep prompts" and rec.verdict == budget.VERDICT_BEATS_PROBE
    # a tolerance wide enough for 5 deep prompts admits the probe too, unless its cost is unknown
    probe = probe_runs([0.70, 0.72, 0.74], gmacs=None)
    rec = decide(probe + best + close, 40.0)  # its gap to the best: -9.3 points, CI down to -36.1
    assert rec.chosen["label"] == "5 deep prompts" and rec.verdict == budget.VERDICT_UNCLEAR
    assert "over the linear probe, within noise (95% CI" in rec.sentence
    assert "50 deep prompts does beat it (+14.0 points, 95% CI +11.5 to +16.5)" in rec.sentence


def test_collapsed_runs_are_counted_apart_and_never_recommended():
    rows = seeded(1, [0.80, 0.83, 0.89]) + seeded(10, [0.95, 0.96], num_prompts=50, gmacs=2.0)
    rows[1]["metrics"].update(collapsed=True, collapse_reason="predicts one class on validation")
    for run in rows[3:]:  # 50 deep prompts: older runs whose test predictions are all one class
        run["metrics"]["confusion_matrix"] = [[0, 60], [0, 40]]
    table = budget.runs_table(rows)
    assert list(table["collapsed"]) == [False, True, False, True, True]
    agg = budget.aggregate_over_seeds(table).set_index("label")
    ten = agg.loc["10 deep prompts"]
    assert ten["n_seeds"] == 2 and ten["seeds"] == [0, 2] and ten["n_collapsed"] == 1
    assert ten["accuracy_mean"] == pytest.approx(0.845)  # (0.80 + 0.89) / 2: the collapsed 0.83 is out
    assert ten["run_ids"] == [1, 2, 3]  # every run, for highlighting
    assert ten["collapsed_runs"] == [
        {
            "id": 2,
            "seed": 1,
            "accuracy": 0.83,
            "balanced_accuracy": pytest.approx(0.78),
            "reason": "predicts one class on validation",
        }
    ]
    fifty = agg.loc["50 deep prompts"]
    assert math.isnan(fifty["accuracy_mean"]) and fifty["n_collapsed"] == 2 and fifty["gmacs"] == 2.0
    rec = budget.recommend(agg.reset_index(), 50.0)
    assert rec.best["label"] == "10 deep prompts" == rec.chosen["label"]
    lines = budget.collapsed_lines(agg.reset_index())
    assert lines == [
        "#2 10 deep prompts, seed 1: predicts one class on validation",
        "#10 50 deep prompts, seed 0: predicts a single class on test",
        "#11 50 deep prompts, seed 1: predicts a single class on test",
    ]
    only_collapsed = budget.aggregate_over_seeds(budget.runs_table(rows[3:]))
    assert budget.recommend(only_collapsed, 50.0) is None


def test_intervals_over_seeds_in_the_aggregate():
    agg = budget.aggregate_over_seeds(budget.runs_table(seeded(1, [0.80, 0.83, 0.89])))
    row = agg.iloc[0]
    # mean 0.84, s = 0.045826, 4.303 * s / sqrt(3) = 0.113847
    assert row["accuracy_low"] == pytest.approx(0.84 - 0.113847, abs=1e-6)
    assert row["accuracy_high"] == pytest.approx(0.84 + 0.113847, abs=1e-6)
    one = budget.aggregate_over_seeds(budget.runs_table(seeded(1, [0.80]))).iloc[0]
    assert math.isnan(one["accuracy_low"]) and one["accuracy_std"] == 0.0


def test_the_default_metric_follows_the_majority_share():
    assert budget.default_metric(pd.DataFrame({"majority_accuracy": [0.55, 0.6]})) == "accuracy_mean"
    assert budget.default_metric(pd.DataFrame({"majority_accuracy": [0.55, 0.61]})) == "balanced_accuracy_mean"
    assert budget.default_metric(pd.DataFrame({"x": [1]})) == "accuracy_mean"
    assert budget.default_metric(pd.DataFrame({"majority_accuracy": [None]})) == "accuracy_mean"


def test_learning_rates_and_lr_source_reach_the_aggregate():
    rows = seeded(1, [0.8, 0.82])
    rows[0]["metrics"].update(lr=1e-3, lr_source="validation")
    rows[1]["metrics"].update(lr=3e-3, lr_source="validation")
    agg = budget.aggregate_over_seeds(budget.runs_table(rows))
    assert agg.iloc[0]["lr_text"] == "1e-03 (validation), 3e-03 (validation)"
    assert budget.aggregate_over_seeds(budget.runs_table(seeded(1, [0.8]))).iloc[0]["lr_text"] == ""


def test_one_seed_with_per_image_results_says_its_interval_is_image_noise_only():
    probe = probe_runs([0.70])  # 200 test images: 140 right, the prompts 170
    prompts = seeded(1, [0.85])
    probe[0]["metrics"]["test_correct"] = "1" * 140 + "0" * 60
    prompts[0]["metrics"]["test_correct"] = "1" * 170 + "0" * 30
    rec = decide(probe + prompts)
    assert rec.chosen_vs_probe.method == stats.PAIRED_BOOTSTRAP
    # the difference is the share of images 140..169 drawn: binomial(200, 0.15) / 200, sd 2.5 points
    assert rec.chosen_vs_probe.difference == pytest.approx(0.15)
    assert rec.chosen_vs_probe.low == pytest.approx(0.15 - 1.96 * 0.02525, abs=0.01)
    assert rec.sentence.startswith("10 deep prompts: +15.0 points over the linear probe (95% CI +10.")
    assert rec.sentence.endswith("; one seed, so test-image noise only) at +3% compute.")


def test_every_aggregated_column_from_two_seeds_by_hand():
    def run(run_id, seed, accuracy, **extra):
        row = make_run(run_id, 5, "deep", seed=seed, accuracy=accuracy, gmacs=1.0 + seed, latency=2.0 + 2 * seed)
        row["config"].update(backbone="dinov2_s14", resolution=112, shots=16)
        row["metrics"].update(val_accuracy=0.6 + seed / 10, majority_accuracy=0.5 + seed / 10, **extra)
        row["metrics"]["confusion_matrix"] = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
        row["costs"].update(
            gmacs_analytic=3.0 + seed, gmacs_full_graph=5.0 + seed, latency_ms_b32=0.5 + seed, params_total=100 + seed
        )
        row["costs"]["params_trainable"] = 10 + seed
        row["timings"]["train_seconds"] = 20.0 + 10 * seed
        return row

    rows = [run(7, 1, 0.90, test_correct="10", test_labels=[1, 0]), run(5, 0, 0.80, lr=0.001, lr_source="fixed")]
    [row] = budget.aggregate_over_seeds(budget.runs_table(rows)).to_dict("records")
    assert row["family"] == "deep" and row["label"] == "5 deep prompts" and row["placement"] == "deep"
    assert (row["dataset"], row["backbone"], row["resolution"], row["shots"]) == ("elpv-binary", "dinov2_s14", 112, 16)
    assert row["tuning"] == "prompt" and row["num_prompts"] == 5 and row["dataset_name"] == "elpv-binary"
    assert row["n_seeds"] == 2 and row["seeds"] == [0, 1] and row["n_collapsed"] == 0 and row["collapsed_runs"] == []
    assert row["run_ids"] == [5, 7]  # sorted by seed
    assert row["accuracy_mean"] == pytest.approx(0.85) and row["accuracy_std"] == pytest.approx(0.1 / math.sqrt(2))
    # two seeds: 0.85 -/+ 12.706 * 0.0707 / sqrt(2) = 0.85 -/+ 0.6353
    assert row["accuracy_low"] == pytest.approx(0.85 - 0.6353, abs=1e-4)
    assert row["accuracy_high"] == 1.0  # 0.85 + 0.6353, cut at what an accuracy can reach
    assert row["balanced_accuracy_mean"] == pytest.approx(0.80)  # make_run stores accuracy - 0.05
    assert row["balanced_accuracy_std"] == pytest.approx(0.1 / math.sqrt(2))
    assert row["balanced_accuracy_low"] == pytest.approx(0.80 - 0.6353, abs=1e-4)
    assert row["balanced_accuracy_high"] == 1.0  # 0.80 + 0.6353, cut
    assert row["val_accuracy_mean"] == pytest.approx(0.65) and row["majority_accuracy"] == pytest.approx(0.55)
    assert row["gmacs"] == 1.5 and row["gmacs_analytic"] == 3.5 and row["latency_ms_b32"] == 1.0
    assert row["gmacs_full_graph"] == 5.5
    assert row["latency_ms_b1"] == 3.0 and row["latency_ms_b1_std"] == pytest.approx(2 / math.sqrt(2))
    assert row["params_trainable"] == 10.5 and row["params_total"] == 100.5 and row["train_seconds"] == 25.0
    assert row["sources"] == "precomputed" and row["n_classes"] == 3 and row["lr_text"] == "1e-03 (fixed)"
    assert row["seed_runs"] == [
        {
            "id": 5,
            "seed": 0,
            "accuracy": 0.80,
            "balanced_accuracy": pytest.approx(0.75),
            "test_correct": None,
            "test_labels": None,
        },
        {
            "id": 7,
            "seed": 1,
            "accuracy": 0.90,
            "balanced_accuracy": pytest.approx(0.85),
            "test_correct": "10",
            "test_labels": [1, 0],
        },
    ]
    assert list(budget.aggregate_over_seeds(budget.runs_table([])).columns) == budget.AGG_COLUMNS
    unknown = budget.aggregate_over_seeds(budget.runs_table([make_run(1, 5, source=None)])).iloc[0]
    assert unknown["sources"] == "unknown" and math.isnan(unknown["n_classes"])


# ------------------------------------------------------------------ configurations without an interval
NOT_JUDGED_ONE = " 1 configuration was not judged: one seed and no per-image results, so no interval against the probe."


def test_an_old_single_seed_run_beside_measured_ones_is_left_unjudged_not_the_whole_verdict():
    # the probe and 10 deep prompts over three seeds: paired t, +14.0 points (CI +11.5 to +16.5, as above);
    # an old one-seed run of 5 shallow prompts (0.80, dearer and 6 points below the best) has no interval
    old = seeded(50, [0.80], num_prompts=5, placement="shallow", gmacs=2.0)
    rows = probe_runs([0.70, 0.72, 0.74]) + seeded(1, [0.84, 0.87, 0.87]) + old
    rec = decide(rows)
    assert rec.verdict == budget.VERDICT_BEATS_PROBE
    assert rec.sentence == (
        "10 deep prompts: +14.0 points over the linear probe (95% CI +11.5 to +16.5) at +3% compute." + NOT_JUDGED_ONE
    )
    [unjudged] = rec.not_judged
    assert rec.vs_probe[unjudged].method == stats.NO_INTERVAL and math.isnan(rec.vs_probe[unjudged].low)
    assert len(rec.vs_probe) == 2  # every configuration is still compared, for the table


def test_a_configuration_without_an_interval_never_beats_the_probe():
    # 10 deep prompts: differences +0.04, -0.05, +0.04 vs the probe: +1.0 point, CI -11.9 to +13.9 (within noise).
    # Two one-seed runs: 5 shallow at 0.74 (+0.7 points over the probe's 0.7333, no interval) and 1 shallow at
    # 0.60 (-13.3 points): neither is a winner, and neither widens the spread the sentence quotes.
    rows = (
        probe_runs([0.70, 0.78, 0.72])
        + seeded(1, [0.74, 0.73, 0.76])
        + seeded(50, [0.74], num_prompts=5, placement="shallow", gmacs=2.0)
        + seeded(60, [0.60], num_prompts=1, placement="shallow", gmacs=0.5)
    )
    rec = decide(rows)
    assert rec.verdict == budget.VERDICT_WITHIN_NOISE and rec.chosen["family"] == "linear probe"
    assert rec.sentence == (
        "No budget beats the linear probe beyond noise at 16 images per class; the differences in accuracy are "
        "within ±1.0 points (the best, 10 deep prompts: +1.0 points, 95% CI -11.9 to +13.9). "
        "More images or seeds would tell them apart. "
        "2 configurations were not judged: one seed and no per-image results, so no interval against the probe."
    )
    assert len(rec.not_judged) == 2


def test_no_interval_when_a_quoted_comparison_has_none():
    measured = probe_runs([0.70, 0.72, 0.74]) + seeded(1, [0.84, 0.87, 0.87])
    # the best is a one-seed run: the best vs the probe is quoted and has no interval
    rec = decide(measured + seeded(50, [0.95], num_prompts=50, gmacs=4.0), 1.0)
    assert rec.best["label"] == "50 deep prompts" and rec.verdict == budget.VERDICT_NO_INTERVAL
    assert rec.sentence.endswith(" One seed and no per-image results: no interval yet, so this is not evidence.")
    # the chosen one (cheapest within 2 points, its gap to the best unmeasured) is a one-seed run
    rec = decide(measured + seeded(50, [0.85], num_prompts=1, gmacs=1.01), 2.0)
    assert rec.chosen["label"] == "1 deep prompts" and rec.verdict == budget.VERDICT_NO_INTERVAL
    # the probe is the best and nothing else has an interval: nothing was judged at all
    rec = decide(probe_runs([0.80, 0.82, 0.84]) + seeded(50, [0.70], num_prompts=1, gmacs=2.0), 1.0)
    assert rec.verdict == budget.VERDICT_NO_INTERVAL and rec.not_judged == list(rec.vs_probe)


# ------------------------------------------------------------------ edges of the deciding functions
def test_comparisons_without_per_seed_data_are_the_difference_of_the_means():
    df = costed(
        [("probe", 1.0, 0.80), ("weak probe", 0.9, 0.70), ("10 shallow", 1.5, 0.86), ("50 deep", 4.0, 0.875)],
        family=["linear probe", "linear probe", "shallow", "deep"],
    )
    rec = budget.recommend(df, 2.0)
    assert rec.probe["label"] == "probe"  # the best-scoring probe row, not the first or last
    assert set(rec.vs_probe) == {1, 2, 3}
    for i, expected in ((1, -0.10), (2, 0.06), (3, 0.075)):
        comparison = rec.vs_probe[i]
        assert comparison.difference == pytest.approx(expected) and comparison.method == stats.NO_INTERVAL
        assert math.isnan(comparison.low) and math.isnan(comparison.high) and (comparison.n_a, comparison.n_b) == (0, 0)
    assert rec.best_vs_probe is rec.vs_probe[3] and rec.chosen_vs_probe is rec.vs_probe[2]
    assert rec.chosen_vs_best.difference == pytest.approx(-0.015) and not rec.chosen_vs_best.has_interval
    # per-seed data on one side only: still the difference of the means, no interval
    agg = budget.aggregate_over_seeds(budget.runs_table(probe_runs([0.70, 0.72, 0.74]) + seeded(1, [0.84, 0.87, 0.87])))
    agg.at[1, "seed_runs"] = []
    one_sided = budget.recommend(agg, 1.0)
    assert one_sided.verdict == budget.VERDICT_NO_INTERVAL
    assert one_sided.chosen_vs_probe.difference == pytest.approx(0.86 - 0.72)
    assert one_sided.chosen_vs_probe.method == stats.NO_INTERVAL and one_sided.chosen_vs_probe.n_a == 0


def test_comparisons_use_the_per_run_value_of_the_chosen_metric():
    # balanced accuracy per seed: prompts 0.80, 0.81, 0.79; probe 0.60, 0.70, 0.65 -> differences 0.20, 0.11,
    # 0.14 (mean 0.15), while plain accuracy differs by a constant 0.14 (make_run's accuracies)
    probe, prompts = probe_runs([0.70, 0.72, 0.74]), seeded(1, [0.84, 0.86, 0.88])
    for run, value in zip(prompts + probe, [0.80, 0.81, 0.79, 0.60, 0.70, 0.65]):
        run["metrics"]["balanced_accuracy"] = value
    rec = decide(probe + prompts, metric="balanced_accuracy_mean")
    assert rec.chosen_vs_probe.difference == pytest.approx(0.15)
    diffs = [0.20, 0.11, 0.14]
    s = math.sqrt(sum((d - 0.15) ** 2 for d in diffs) / 2)
    assert rec.chosen_vs_probe.low == pytest.approx(0.15 - 4.303 * s / math.sqrt(3), abs=1e-9)
    # a frame that names the run metric itself ("accuracy", no "_mean") compares that metric per run
    agg = budget.aggregate_over_seeds(budget.runs_table(probe + prompts)).assign(accuracy=lambda f: f["accuracy_mean"])
    plain = budget.recommend(agg, 1.0, metric="accuracy")
    assert plain.chosen_vs_probe.difference == pytest.approx(0.14) and plain.chosen_vs_probe.method == stats.PAIRED_T
    assert plain.sentence.startswith("10 deep prompts: +14.0 points over the linear probe")


def test_aggregate_of_a_hand_made_table_without_the_optional_columns():
    assert list(budget.aggregate_over_seeds(None).columns) == budget.AGG_COLUMNS
    table = budget.runs_table(seeded(1, [0.80, 0.90]) + seeded(10, [0.70], num_prompts=50))
    bare = table.drop(
        columns=[
            "collapsed",
            "collapse_reason",
            "test_correct",
            "test_labels",
            "lr_source",
            "n_classes",
            "lr",
            "gmacs_full_graph",
        ]
    )
    agg = budget.aggregate_over_seeds(bare)
    assert list(agg.columns) == budget.AGG_COLUMNS and list(agg.index) == [0, 1]
    ten = agg.iloc[0]
    assert ten["label"] == "10 deep prompts" and ten["config_key"] == table["config_key"][0]
    assert ten["n_seeds"] == 2 and ten["n_collapsed"] == 0 and ten["accuracy_mean"] == pytest.approx(0.85)
    assert math.isnan(ten["n_classes"]) and ten["lr_text"] == "" and math.isnan(ten["gmacs_full_graph"])
    assert [(r["seed"], r["test_correct"], r["test_labels"]) for r in ten["seed_runs"]] == [
        (0, None, None),
        (1, None, None),
    ]
    # a collapsed flag that is missing counts as not collapsed; a collapse with no reason says "collapsed"
    flagged = table.assign(
        collapsed=[None, True, False],
        collapse_reason=None,
        n_classes=["?", "2", None],
        test_labels=float("nan"),
    )
    agg = budget.aggregate_over_seeds(flagged)
    ten = agg.iloc[0]
    assert ten["n_seeds"] == 1 and ten["seeds"] == [0] and ten["accuracy_mean"] == pytest.approx(0.80)
    assert [r["reason"] for r in ten["collapsed_runs"]] == ["collapsed"]
    assert ten["n_classes"] == 2.0  # "?" is no number, "2" is
    assert ten["seed_runs"][0]["test_labels"] is None  # NaN is no list of classes
    no_reasons = budget.aggregate_over_seeds(bare.assign(collapsed=[False, True, False]))
    assert no_reasons.iloc[0]["collapsed_runs"][0]["reason"] == "collapsed"
    # a column with no numbers at all (here typed as text) gives NaN, not an error
    untimed = budget.aggregate_over_seeds(bare.assign(train_seconds=pd.array([None] * 3, dtype="str")))
    assert math.isnan(untimed.iloc[0]["train_seconds"])


def test_runs_without_an_id_or_a_seed_are_kept_and_said_so():
    rows = seeded(1, [0.80, 0.90])
    rows[1]["id"] = None
    del rows[0]["config"]["seed"]
    collapsed = seeded(5, [0.5], num_prompts=50)[0]
    collapsed["id"] = None
    del collapsed["config"]["seed"]
    collapsed["metrics"]["collapsed"] = True
    agg = budget.aggregate_over_seeds(budget.runs_table(rows + [collapsed]))
    ten = agg.iloc[0]
    assert ten["run_ids"] == [1] and ten["seeds"] == [1, None]  # sorted by seed, the missing one last
    assert [(r["id"], r["seed"]) for r in ten["seed_runs"]] == [(None, 1), (1, None)]
    fifty = agg.iloc[1]
    assert fifty["run_ids"] == [] and (fifty["collapsed_runs"][0]["id"], fifty["collapsed_runs"][0]["seed"]) == (
        None,
        None,
    )
    no_seed = pd.DataFrame({"label": ["x"], "collapsed_runs": [[{"id": 3, "seed": None, "reason": "loss diverged"}]]})
    assert budget.collapsed_lines(no_seed) == ["#3 x: loss diverged"]
    assert budget.collapsed_lines(no_seed.assign(collapsed_runs=[float("nan")])) == []
    assert budget.collapsed_lines(None) == [] and budget.collapsed_lines(pd.DataFrame({"label": ["x"]})) == []


def test_configurations_tied_in_the_sort_keep_the_order_their_runs_came_in():
    # two configurations with the same family, prompt count, placement and label (another learning-rate
    # setting in their config): the first run's configuration comes first, whatever its key sorts as
    later, earlier = seeded(1, [0.80]), seeded(5, [0.70])
    later[0]["config"]["lr"] = 0.9
    earlier[0]["config"]["lr"] = 0.1
    agg = budget.aggregate_over_seeds(budget.runs_table(later + earlier))
    assert list(agg["accuracy_mean"]) == [0.80, 0.70]
    agg = budget.aggregate_over_seeds(budget.runs_table(earlier + later))
    assert list(agg["accuracy_mean"]) == [0.70, 0.80]


def test_edges_of_the_front_the_metric_and_the_filters():
    df = frame([("a", 1.0, 0.80), ("b", "n/a", 0.95), ("c", 2.0, "?")])
    assert list(budget.pareto_front(df)["label"]) == ["a"]  # what is no number is left out
    assert list(budget.pareto_front(df, cost="missing").columns) == list(df.columns)
    assert budget.pareto_front(df, cost="missing").empty
    assert isinstance(budget.pareto_front(None), pd.DataFrame) and budget.pareto_front(None).empty
    assert budget.default_metric(pd.DataFrame({"majority_accuracy": ["n/a", 0.7]})) == "balanced_accuracy_mean"
    assert budget.default_metric(None) == "accuracy_mean"
    # a stored run without a status is a finished one
    probe = _row(11, tuning="linear", num_prompts=0, placement="none")
    del probe["status"]
    assert budget.matching_probe([probe], _row(1)["config"])["id"] == 11
    assert budget.matching_probe([{**probe, "status": "failed"}], _row(1)["config"]) is None
    # the cell type of the active setup filters as the data set does
    mono = {"dataset": "elpv-binary", "cell_type": "mono", "backbone": "dinov2_s14", "resolution": 112, "shots": 16}
    kept, _ = budget.comparable_runs([_row(1), _row(2, cell_type="mono")], mono)
    assert [r["id"] for r in kept] == [2]


def test_recommend_keeps_the_frame_as_given():
    df = costed([("cheap", 1.0, 0.895), ("best", 3.0, 0.90)])
    df.index = [10, 20]
    rec = budget.recommend(df)  # the default tolerance is 1 point: the cheap one
    assert rec.chosen.name == 10 and rec.best.name == 20 and rec.chosen["label"] == "cheap"
    assert (rec.cost, rec.metric, rec.tolerance_points) == ("gmacs", "accuracy_mean", 1.0)
    assert budget.recommend(df.assign(accuracy_mean=[0.885, 0.90])).chosen["label"] == "best"  # 1.5 points: out
    twice = budget.recommend(pd.concat([df, df]), 1.0)  # a repeated index is renumbered, not an error
    assert twice.chosen["label"] == "cheap" and "index" not in twice.chosen and twice.chosen.name == 0
    single = budget.recommend(df.iloc[[1]])
    assert single.chosen_is_best and single.chosen["label"] == "best" and single.verdict == budget.VERDICT_NO_PROBE
    # costs that are missing or no number: never chosen, and no error
    assert budget.recommend(df, 1.0, cost="latency_ms_b1").chosen["label"] == "best"
    assert budget.recommend(df.assign(gmacs=["n/a", 3.0]), 1.0).chosen["label"] == "best"
    assert budget.recommend(df.assign(accuracy_mean=["?", 0.90])).best["label"] == "best"


def test_a_rejected_candidate_does_not_end_the_search():
    # 1 deep (cost 1): within 1 point on average, but its paired gap to the best (-1.0, -5.0 points) is not;
    # 5 deep (cost 2): exactly 1 point below on each seed: within, at the edge. 5 deep is chosen.
    best = seeded(1, [0.90, 0.90], num_prompts=50, gmacs=4.0)
    shaky = seeded(10, [0.89, 0.85], num_prompts=1, gmacs=1.0)
    steady = seeded(20, [0.89, 0.89], num_prompts=5, gmacs=2.0)
    rec = decide(shaky + steady + best, 3.5)
    assert rec.chosen["label"] == "5 deep prompts"
    assert rec.chosen_vs_best.low == pytest.approx(-0.01) and rec.chosen_vs_best.high == pytest.approx(-0.01)
    assert decide(steady + best, 1.0).chosen["label"] == "5 deep prompts"  # a gap of exactly 1 point is within 1
    assert rec.sentence == (
        "5 deep prompts reach 99% of the best accuracy (89.0% vs 90.0% for 50 deep prompts) "
        "at 50% of its compute (2.00 vs 4.00 GMACs per image). The gap to the best: -1.0 points (95% CI -1.0 to -1.0)."
    )


def test_the_probe_alone_and_a_configuration_that_only_ties_it():
    alone = decide(probe_runs([0.70, 0.72]))
    assert alone.verdict == budget.VERDICT_PROBE_ENOUGH and alone.vs_probe == {}
    assert alone.sentence == (
        "The best configuration, linear probe (71.0% accuracy, 1.00 GMACs per image), "
        "is also the cheapest within 1 point."
    )
    # identical to the probe seed by seed: a difference of exactly 0 with a zero-width interval is no win
    rec = decide(probe_runs([0.70, 0.72]) + seeded(1, [0.70, 0.72], gmacs=0.9))  # cheaper: the best of the tie
    assert rec.best["label"] == "10 deep prompts"
    assert rec.verdict == budget.VERDICT_WITHIN_NOISE and rec.chosen["family"] == "linear probe"
    gap = rec.best_vs_probe
    assert rec.chosen_vs_probe is None and (gap.difference, gap.low, gap.high) == (0.0, 0.0, 0.0)


def test_when_the_probe_is_best_the_closest_configuration_is_named_and_the_spread_is_the_widest_gap():
    # the probe leads both; 10 deep is 2 points behind, 50 deep 12 points (per seed: 0.02 / 0.12 each)
    rows = probe_runs([0.80, 0.82]) + seeded(1, [0.78, 0.80]) + seeded(10, [0.68, 0.70], num_prompts=50, gmacs=3.0)
    rec = decide(rows)
    assert rec.verdict == budget.VERDICT_WITHIN_NOISE and rec.best["family"] == "linear probe"
    assert rec.sentence == (
        "No budget beats the linear probe beyond noise at 16 images per class; the differences in accuracy are "
        "within ±12.0 points (the closest, 10 deep prompts: -2.0 points, 95% CI -2.0 to -2.0). "
        "More images or seeds would tell them apart."
    )


def test_full_fine_tuning_and_metrics_without_a_word_are_named_plainly():
    rows = probe_runs([0.70, 0.72, 0.74]) + seeded(1, [0.84, 0.87, 0.87], num_prompts=0, tuning="full", gmacs=1.03)
    rec = decide(rows)
    assert (
        rec.sentence == "Full fine-tuning: +14.0 points over the linear probe (95% CI +11.5 to +16.5) at +3% compute."
    )
    # a metric METRIC_WORDS does not know is written with spaces for underscores
    agg = budget.aggregate_over_seeds(budget.runs_table(probe_runs([0.70, 0.78, 0.72]) + seeded(1, [0.74, 0.73, 0.76])))
    agg["top_1_mean"] = agg["accuracy_mean"]
    agg["seed_runs"] = [[{**r, "top_1": r["accuracy"]} for r in runs] for runs in agg["seed_runs"]]
    rec = budget.recommend(agg, 1.0, metric="top_1_mean")
    assert rec.verdict == budget.VERDICT_WITHIN_NOISE
    assert "; the differences in top 1 mean are within ±1.0 points" in rec.sentence


def test_families_sort_in_family_order_not_alphabetically():
    rows = seeded(1, [0.8], num_prompts=5, placement="deep") + seeded(5, [0.7], num_prompts=50, placement="shallow")
    agg = budget.aggregate_over_seeds(budget.runs_table(rows))
    assert list(agg["family"]) == ["shallow", "deep"] and list(agg.index) == [0, 1]


def test_ties_for_best_without_a_known_cost_go_to_the_most_seeds():
    df = costed([("few", float("nan"), 0.90), ("more", float("nan"), 0.90)], n_seeds=[1, 3])
    assert budget.recommend(df, 0.0).best["label"] == "more"
    # a seed count that is missing or no number counts as none
    assert budget.recommend(df.assign(n_seeds=[float("nan"), 1]), 0.0).best["label"] == "more"
    assert budget.recommend(df.assign(n_seeds=["?", 1]), 0.0).best["label"] == "more"
    assert budget.recommend(None) is None


def test_a_chosen_configuration_level_with_the_probe_names_the_cheapest_that_beats_it():
    # the probe's cost is unknown, so it is never chosen. 10 deep (cost 1) equals the probe seed by seed
    # (difference 0, interval 0 to 0: no win); 5 deep (cost 4, the best), 20 deep (cost 2) and 30 deep (cost
    # unknown) all beat it by 4 to 6 points on every seed. The cheapest of those with a known cost is named.
    rows = (
        probe_runs([0.80, 0.82], gmacs=None)
        + seeded(1, [0.80, 0.82], num_prompts=10, gmacs=1.0)
        + seeded(10, [0.86, 0.88], num_prompts=5, gmacs=4.0)
        + seeded(20, [0.85, 0.87], num_prompts=20, gmacs=2.0)
        + seeded(30, [0.84, 0.86], num_prompts=30, gmacs=None)
    )
    rec = decide(rows, 10.0)
    assert rec.chosen["label"] == "10 deep prompts" and rec.best["label"] == "5 deep prompts"
    assert rec.verdict == budget.VERDICT_UNCLEAR
    assert rec.sentence == (
        "10 deep prompts: +0.0 points over the linear probe, within noise (95% CI +0.0 to +0.0); "
        "20 deep prompts does beat it (+5.0 points, 95% CI +5.0 to +5.0). "
        "It is within 10 points of the best, 5 deep prompts (-6.0 points, 95% CI -6.0 to -6.0)."
    )


def test_no_interval_when_only_the_gap_from_the_chosen_to_the_best_has_none():
    # the probe (seeds 0, 1) and the chosen 1 deep (seed 0) carry per-image results: a bootstrap interval
    # between them. The best, 50 deep (seeds 0, 1, no per-image results), has a paired t interval against
    # the probe. But 1 deep vs 50 deep is one seed against two values and no per-image results: no interval,
    # and the sentence would quote it
    probe = probe_runs([0.70, 0.72])
    for run, right in zip(probe, (70, 72)):
        run["metrics"]["test_correct"] = "1" * right + "0" * (100 - right)
    chosen = seeded(10, [0.85], num_prompts=1, gmacs=1.0)
    chosen[0]["metrics"]["test_correct"] = "1" * 85 + "0" * 15
    best = seeded(20, [0.86, 0.88], num_prompts=50, gmacs=4.0)
    rec = decide(probe + chosen + best, 3.0)
    assert rec.chosen["label"] == "1 deep prompts" and rec.best["label"] == "50 deep prompts"
    assert rec.chosen_vs_probe.has_interval and rec.best_vs_probe.has_interval
    assert not rec.chosen_vs_best.has_interval
    assert rec.verdict == budget.VERDICT_NO_INTERVAL


def test_within_noise_names_the_best_of_a_tie_as_the_best():
    # 5 deep and 20 deep score the same on every seed; 20 deep is cheaper, so it is the best and is named
    rows = (
        probe_runs([0.70, 0.78, 0.72])
        + seeded(1, [0.74, 0.73, 0.76], num_prompts=5, gmacs=2.0)
        + seeded(10, [0.74, 0.73, 0.76], num_prompts=20, gmacs=1.5)
    )
    rec = decide(rows)
    assert rec.verdict == budget.VERDICT_WITHIN_NOISE and rec.best["label"] == "20 deep prompts"
    assert "(the best, 20 deep prompts: +1.0 points, 95% CI -11.9 to +13.9)" in rec.sentence


def test_a_verdict_below_the_majority_class_says_so():
    # 4-class ELPV at 16 images per class: the probe (46%) and prompts (45%) under the 57.4% majority class
    rows = [
        dict(r, metrics={**r["metrics"], "majority_accuracy": 0.574})
        for r in probe_runs([0.46, 0.47, 0.45]) + seeded(1, [0.44, 0.47, 0.44])
    ]
    rec = decide(rows)
    assert rec.verdict == budget.VERDICT_WITHIN_NOISE
    assert rec.sentence.endswith(
        "More images or seeds would tell them apart. None of them beats always answering the most common class "
        "(57.4% of the test set); balanced accuracy shows what they learned."
    )
    above = [dict(r, metrics={**r["metrics"], "majority_accuracy": 0.45}) for r in rows]
    assert "most common class" not in decide(above).sentence  # the best (46%) is above 45%
    assert "most common class" not in decide(rows, metric="balanced_accuracy_mean").sentence  # chance is 1/K there
