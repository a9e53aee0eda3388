"""stats.py: intervals, paired comparisons and collapse, against values worked out by hand."""

import math

import numpy as np
import pytest

from vptdash.views import stats


@pytest.fixture(autouse=True)
def fresh_comparisons():
    """Every test computes its comparisons: a cached answer from another test would hide a bug."""
    stats.clear_cache()


def bits(pattern) -> str:
    return "".join("1" if b else "0" for b in pattern)


def test_t_quantiles_and_mean_interval_by_hand():
    assert stats.t95(1) == 12.706 and stats.t95(2) == 4.303 and stats.t95(30) == 2.042
    assert stats.t95(200) == 2.042  # past 30 df: the 30-df value, wider than 1.96
    assert stats.t95(2.9) == 4.303  # fractional (Welch) df round down: wider
    with pytest.raises(ValueError):
        stats.t95(0.5)
    # mean 0.84; deviations -0.04, -0.01, +0.05 -> s = sqrt(0.0042 / 2) = 0.045826;
    # half width = 4.303 * 0.045826 / sqrt(3) = 0.113847
    interval = stats.mean_interval([0.80, 0.83, 0.89])
    assert interval.mean == pytest.approx(0.84, abs=1e-12)
    assert interval.low == pytest.approx(0.84 - 0.113847, abs=1e-6)
    assert interval.high == pytest.approx(0.84 + 0.113847, abs=1e-6)
    assert interval.n == 3 and interval.has_interval and interval.half_width == pytest.approx(0.113847, abs=1e-6)
    one = stats.mean_interval([0.7, None, float("nan"), "x"])  # only one finite value: no spread
    assert one.mean == 0.7 and one.n == 1 and not one.has_interval and math.isnan(one.high)
    none = stats.mean_interval([])
    assert none.n == 0 and math.isnan(none.mean)
    same = stats.mean_interval([0.5, 0.5])
    assert (same.low, same.high) == (0.5, 0.5)


def test_paired_t_and_welch_by_hand():
    a = [{"seed": 0, "accuracy": 0.80}, {"seed": 1, "accuracy": 0.90}]
    b = [{"seed": 1, "accuracy": 0.75}, {"seed": 0, "accuracy": 0.70}]  # order does not matter: by seed
    # per-seed differences 0.10, 0.15: mean 0.125, s = 0.035355, half = 12.706 * 0.035355 / sqrt(2) = 0.31765
    paired = stats.compare(a, b)
    assert paired.method == stats.PAIRED_T
    assert paired.difference == pytest.approx(0.125, abs=1e-12)
    assert (paired.low, paired.high) == (
        pytest.approx(0.125 - 0.31765, abs=1e-5),
        pytest.approx(0.125 + 0.31765, abs=1e-5),
    )
    assert not paired.beyond_noise
    # other seeds: Welch. var a = 0.005, var b = 0.00125 -> se^2 = 0.0025 + 0.000625 = 0.003125;
    # df = se^4 / (0.0025^2 + 0.000625^2) = 1.47 -> t(1) = 12.706; half = 12.706 * sqrt(0.003125) = 0.71028
    other = [{"seed": 2, "accuracy": 0.70}, {"seed": 3, "accuracy": 0.75}]
    welch = stats.compare(a, other)
    assert welch.method == stats.WELCH_T and welch.difference == pytest.approx(0.125, abs=1e-12)
    assert welch.low == pytest.approx(0.125 - 0.71028, abs=1e-4) and welch.high == pytest.approx(
        0.125 + 0.71028, abs=1e-4
    )
    lonely = stats.compare([{"seed": 0, "accuracy": 0.8}], [{"seed": 0, "accuracy": 0.7}])
    assert lonely.method == stats.NO_INTERVAL and lonely.difference == pytest.approx(0.1) and not lonely.has_interval
    # a clear paired win: differences 0.14, 0.15, 0.13 -> mean 0.14, s 0.01, half 4.303 * 0.01 / sqrt(3) = 0.024843
    win = stats.compare(
        [{"seed": s, "accuracy": v} for s, v in enumerate([0.84, 0.87, 0.87])],
        [{"seed": s, "accuracy": v} for s, v in enumerate([0.70, 0.72, 0.74])],
    )
    assert win.low == pytest.approx(0.14 - 0.024843, abs=1e-6) and win.beyond_noise
    loss = stats.compare(
        [{"seed": s, "accuracy": v} for s, v in enumerate([0.70, 0.72, 0.74])],
        [{"seed": s, "accuracy": v} for s, v in enumerate([0.84, 0.87, 0.87])],
    )
    assert loss.high == pytest.approx(-0.14 + 0.024843, abs=1e-6) and loss.beyond_noise  # worse, beyond noise


def test_welch_edges():
    assert stats.welch_interval([], [0.5]).n == 0
    flat = stats.welch_interval([0.6, 0.6], [0.5, 0.5])  # no spread on either side: the difference itself
    assert (flat.low, flat.high) == (pytest.approx(0.1), pytest.approx(0.1))


def test_bootstrap_by_hand():
    n = 200
    everything, half = [np.ones(n, bool)], [np.arange(n) < 100]
    # A right on every image, B on the first half: the difference is the share of second-half images
    # drawn, a binomial(200, 0.5) / 200: sd 0.0354, 95% between about 0.431 and 0.569. 2000 resamples put
    # the percentiles within about 0.01 of those: the test allows 0.02.
    interval = stats.bootstrap_difference(everything, half, paired_seeds=True)
    assert interval.mean == pytest.approx(0.5, abs=1e-12)
    assert interval.low == pytest.approx(0.431, abs=0.02) and interval.high == pytest.approx(0.569, abs=0.02)
    again = stats.bootstrap_difference(everything, half, paired_seeds=True)
    assert (again.low, again.high) == (interval.low, interval.high)  # fixed seed: the same answer each time
    identical = stats.bootstrap_difference(half, half, paired_seeds=True)
    assert (identical.mean, identical.low, identical.high) == (0.0, 0.0, 0.0)
    # balanced accuracy: B is right on class 0 only (recall 1 and 0 -> 0.5), A on everything (1.0):
    # every resample that draws both classes gives exactly 0.5 (a resample missing a class is
    # vanishingly unlikely with 100 images each), while plain accuracy would vary with the draw
    labels = (np.arange(n) >= 100).astype(int)
    balanced = stats.bootstrap_difference(everything, half, paired_seeds=True, labels=labels)
    assert (balanced.mean, balanced.low, balanced.high) == (0.5, 0.5, 0.5)
    skewed = np.array([0] * 150 + [1] * 50)
    b_skewed = [skewed == 0]  # right on all of class 0 (150 images), wrong on class 1: accuracy 0.75, balanced 0.5
    plain = stats.bootstrap_difference(everything, b_skewed, paired_seeds=True)
    assert plain.mean == pytest.approx(0.25)
    assert stats.bootstrap_difference(everything, b_skewed, paired_seeds=True, labels=skewed).mean == pytest.approx(0.5)
    with pytest.raises(ValueError):
        stats.bootstrap_difference([np.ones(3, bool)], [np.ones(4, bool)], paired_seeds=True)
    with pytest.raises(ValueError):
        stats.bootstrap_difference([np.ones(3, bool)] * 2, [np.ones(3, bool)], paired_seeds=True)


def test_pairing_by_seed_removes_the_seed_noise_both_share():
    n = 50
    right, wrong = bits([1] * n), bits([0] * n)
    # seed 0 is an easy draw for both configurations, seed 1 a hard one: per seed they are identical
    a = [{"seed": 0, "accuracy": 1.0, "test_correct": right}, {"seed": 1, "accuracy": 0.0, "test_correct": wrong}]
    b = [{"seed": 0, "accuracy": 1.0, "test_correct": right}, {"seed": 1, "accuracy": 0.0, "test_correct": wrong}]
    paired = stats.compare(a, b)
    assert paired.method == stats.PAIRED_BOOTSTRAP and (paired.low, paired.high) == (0.0, 0.0)
    # the same runs under other seed names cannot be paired: the seeds are drawn independently and
    # the interval spans the seed noise (a draw of [easy, easy] against [hard, hard] is a difference of 1)
    b_other = [{**run, "seed": run["seed"] + 10} for run in b]
    unpaired = stats.compare(a, b_other)
    assert unpaired.method == stats.IMAGE_BOOTSTRAP
    assert unpaired.difference == 0.0 and unpaired.low <= -0.5 and unpaired.high >= 0.5


def test_compare_falls_back_when_per_image_results_do_not_line_up():
    runs = lambda values, texts: [  # noqa: E731
        {"seed": s, "accuracy": v, "balanced_accuracy": v, "test_correct": t}
        for s, (v, t) in enumerate(zip(values, texts))
    ]
    a = runs([0.8, 0.9], ["1101", "1111"])
    b = runs([0.7, 0.75], ["1001", "10011"])  # another number of test images: not the same images
    assert stats.compare(a, b).method == stats.PAIRED_T
    b_missing = runs([0.7, 0.75], ["1001", None])
    assert stats.compare(a, b_missing).method == stats.PAIRED_T
    b_same = runs([0.7, 0.75], ["1001", "1011"])
    assert stats.compare(a, b_same).method == stats.PAIRED_BOOTSTRAP
    # balanced accuracy needs each image's class: without it, the paired t on the seed values
    assert stats.compare(a, b_same, "balanced_accuracy").method == stats.PAIRED_T
    with_labels = [{**r, "test_labels": [0, 0, 1, 1]} for r in a], [{**r, "test_labels": [0, 0, 1, 1]} for r in b_same]
    assert stats.compare(*with_labels, "balanced_accuracy").method == stats.PAIRED_BOOTSTRAP
    clash = [{**r, "test_labels": [0, 1, 0, 1]} for r in b_same]
    assert stats.compare(with_labels[0], clash, "balanced_accuracy").method == stats.PAIRED_T
    assert stats.correct_vector("10a1") is None and stats.correct_vector("") is None
    assert stats.correct_vector("101").tolist() == [True, False, True]
    assert stats.labels_vector("0121", 4).tolist() == [0, 1, 2, 1] and stats.labels_vector([0, 1], 3) is None
    assert stats.labels_vector(["a", 1], 2) is None and stats.labels_vector([0, -1], 2) is None


def test_collapse_reason():
    assert stats.collapse_reason({"collapsed": True, "collapse_reason": "loss diverged"}) == "loss diverged"
    assert stats.collapse_reason({"collapsed": True}) == "collapsed in training"
    # a run that says it did not collapse is believed, even if its test predictions are one class
    assert stats.collapse_reason({"collapsed": False, "confusion_matrix": [[5, 0], [3, 0]]}) is None
    # older runs: every test prediction in one column
    assert stats.collapse_reason({"confusion_matrix": [[5, 0], [3, 0]]}) == stats.SINGLE_CLASS_ON_TEST
    assert stats.collapse_reason({"confusion_matrix": [[0, 5, 0], [0, 3, 0], [0, 1, 0]]}) == stats.SINGLE_CLASS_ON_TEST
    assert stats.collapse_reason({"confusion_matrix": [[5, 1], [3, 0]]}) is None
    assert stats.collapse_reason({"confusion_matrix": [[0, 0], [0, 0]]}) is None  # nothing predicted
    assert stats.collapse_reason({"confusion_matrix": [[4]]}) is None  # one class only: nothing to collapse to
    assert stats.collapse_reason({"confusion_matrix": "garbage"}) is None
    assert stats.collapse_reason({"confusion_matrix": [[1, 2], [3]]}) is None
    assert stats.collapse_reason({}) is None and stats.collapse_reason(None) is None


def binomial_quantile(n: int, q: float) -> int:
    """The smallest k with P(Binomial(n, 1/2) <= k) >= q."""
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.comb(n, k) / 2**n
        if cdf >= q:
            return k
    return n


def test_the_bootstrap_interval_is_the_2_5_and_97_5_percentiles_of_the_resampled_differences():
    # A right everywhere, B on the first 100 of 200 images: each resample's difference is the share of
    # second-half images drawn, Binomial(200, 1/2) / 200. Its 2.5% and 97.5% quantiles are 86 and 114
    # images, and the CDF steps there (0.0200 -> 0.0280, 0.9720 -> 0.9800) are wide enough that 20000
    # resamples land on exactly those atoms.
    n = 200
    interval = stats.bootstrap_difference([np.ones(n, bool)], [np.arange(n) < 100], paired_seeds=True, resamples=20000)
    assert interval.low == pytest.approx(binomial_quantile(n, 0.025) / n, abs=1e-12)
    assert interval.high == pytest.approx(binomial_quantile(n, 0.975) / n, abs=1e-12)
    assert (interval.low, interval.high) == (pytest.approx(0.43), pytest.approx(0.57))
    # every resample, even a single one, is a real draw: right everywhere vs wrong everywhere is 1 in each
    one = stats.bootstrap_difference([np.ones(5, bool)], [np.zeros(5, bool)], paired_seeds=True, resamples=1)
    assert (one.mean, one.low, one.high, one.n) == (1.0, 1.0, 1.0, 1)
    # a single test image can be drawn too
    single = stats.bootstrap_difference([np.ones(1, bool)], [np.zeros(1, bool)], paired_seeds=False)
    assert (single.mean, single.low, single.high) == (1.0, 1.0, 1.0)


def test_unpaired_seeds_are_drawn_independently_from_each_side():
    # A: one seed right on every image (score 1 in every draw). B: two seeds, one right everywhere, one
    # wrong everywhere; drawing B's two seeds with replacement gives B = 1, 0.5 or 0 with probability
    # 1/4, 1/2, 1/4, so A - B is 0, 0.5 or 1 and the 2.5% / 97.5% percentiles are exactly 0 and 1
    n = 50
    a = [np.ones(n, bool)]
    b = [np.ones(n, bool), np.zeros(n, bool)]
    interval = stats.bootstrap_difference(a, b, paired_seeds=False)
    assert (interval.mean, interval.low, interval.high, interval.n) == (0.5, 0.0, 1.0, 1)
    three = stats.bootstrap_difference(b, [np.ones(n, bool)] * 3, paired_seeds=False)
    assert three.n == 2 and three.mean == -0.5 and (three.low, three.high) == (-1.0, 0.0)
    # n is the smaller number of seeds, however few the images
    assert stats.bootstrap_difference([np.ones(1, bool)] * 2, [np.ones(1, bool)] * 3, paired_seeds=False).n == 2


def test_balanced_accuracy_counts_only_the_classes_present():
    # labels 0, 0, 0, 2: class 1 absent, class 2 a single image. A is right everywhere (balanced 1), B on
    # class 0 only (recalls 1 and 0 over the two present classes: 0.5); plain accuracy would be 1 - 0.75
    labels = np.array([0, 0, 0, 2])
    a, b = [np.ones(4, bool)], [labels == 0]
    assert stats.bootstrap_difference(a, b, paired_seeds=True, labels=labels).mean == pytest.approx(0.5)
    assert stats.bootstrap_difference(a, b, paired_seeds=True).mean == pytest.approx(0.25)
    # A right on class 0 of a skewed set (150 of 200 images: accuracy 0.75, balanced 0.5) against nothing
    # right: balanced accuracy is 0.5 on both sides' every resample that draws both classes, so the
    # interval is the point; plain accuracy would wander with the draw
    skewed = np.array([0] * 150 + [1] * 50)
    balanced = stats.bootstrap_difference([skewed == 0], [np.zeros(200, bool)], paired_seeds=True, labels=skewed)
    assert (balanced.mean, balanced.low, balanced.high) == (0.5, 0.5, 0.5)


def test_bad_input_says_what_is_wrong():
    with pytest.raises(ValueError, match=r"^per-image results of different lengths: 3 and 4$"):
        stats.bootstrap_difference([np.ones(3, bool)], [np.ones(4, bool)], paired_seeds=True)
    with pytest.raises(ValueError, match=r"^paired seeds need the same number of seeds on both sides$"):
        stats.bootstrap_difference([np.ones(3, bool)] * 2, [np.ones(3, bool)], paired_seeds=True)
    with pytest.raises(ValueError, match=r"^degrees of freedom must be >= 1, got 0$"):
        stats.t95(0)


def test_small_edges_of_the_interval_helpers():
    empty = stats.mean_interval([])
    assert not empty.has_interval and math.isnan(empty.low) and math.isnan(empty.high) and empty.n == 0
    # a value that is not a number is skipped, wherever it comes
    assert stats.mean_interval([None, "x", 0.5, 0.7]).mean == pytest.approx(0.6)
    # a single prediction in one column is a collapse too
    assert stats.collapse_reason({"confusion_matrix": [[1, 0], [0, 0]]}) == stats.SINGLE_CLASS_ON_TEST
    assert stats.collapse_reason({"confusion_matrix": [[2, -2], [0, 0]]}) is None  # malformed: no predictions in all


def test_comparisons_are_cached_and_unhashable_runs_still_compare():
    a = [{"seed": s, "accuracy": v, "test_labels": [0, 1]} for s, v in enumerate([0.84, 0.87, 0.87])]
    b = [{"seed": s, "accuracy": v, "test_labels": [0, 1]} for s, v in enumerate([0.70, 0.72, 0.74])]
    first = stats.compare(a, b)
    assert stats.compare(a, b) is first  # the same answer object: computed once
    plain = [{"seed": r["seed"], "accuracy": r["accuracy"]} for r in a]  # no per-image classes at all
    assert stats.compare(plain, b) is stats.compare(plain, b)
    assert stats.compare(b, a) is not first and stats.compare(b, a).difference == pytest.approx(-0.14)
    stats.clear_cache()
    assert stats.compare(a, b) is not first and stats.compare(a, b) == first
    # per-seed differences 0.14, 0.15, 0.13: mean 0.14, half width 4.303 * 0.01 / sqrt(3) = 0.024843
    odd = [{**r, "test_labels": {"not": "hashable"}} for r in a]
    result = stats.compare(odd, b)
    assert result.method == stats.PAIRED_T and result.difference == pytest.approx(0.14)
    assert result.low == pytest.approx(0.14 - 0.024843, abs=1e-6) and (result.n_a, result.n_b) == (3, 3)
    # the metric reaches the fallback too: balanced accuracy 0.1 lower on A's side only
    balanced_a = [{**r, "balanced_accuracy": r["accuracy"] - 0.1} for r in odd]
    balanced_b = [{**r, "balanced_accuracy": r["accuracy"]} for r in b]
    assert stats.compare(balanced_a, balanced_b, "balanced_accuracy").difference == pytest.approx(0.04)


def test_welch_degrees_of_freedom_and_the_sizes_it_reports():
    # x: 0.80, 0.90, 0.85 (mean 0.85, s^2 = 0.0025, s^2/n = 0.000833); y: 0.60, 0.80, 0.70, 0.75, 0.65
    # (mean 0.70, s^2 = 0.00625, s^2/n = 0.00125). se^2 = 0.0020833; df = se^4 / (0.000833^2 / 2 + 0.00125^2 / 4)
    # = 5.88 -> t(5) = 2.571; half = 2.571 * sqrt(0.0020833) = 0.117351
    welch = stats.welch_interval([0.80, 0.90, 0.85], [0.60, 0.80, 0.70, 0.75, 0.65])
    assert welch.mean == pytest.approx(0.15) and welch.n == 3
    assert welch.low == pytest.approx(0.15 - 0.117351, abs=1e-5) and welch.high == pytest.approx(
        0.15 + 0.117351, abs=1e-5
    )
    # one value on one side: the difference of the means, no interval
    lonely = stats.welch_interval([0.80], [0.70, 0.75])
    assert lonely.mean == pytest.approx(0.075) and lonely.n == 1 and not lonely.has_interval and math.isnan(lonely.high)
    empty = stats.welch_interval([], [0.5])
    assert empty.n == 0 and all(math.isnan(v) for v in (empty.mean, empty.low, empty.high))
    flat = stats.welch_interval([0.6, 0.6, 0.6], [0.5, 0.5])
    assert flat.mean == pytest.approx(0.1) and flat.n == 2
    # through compare: the sizes are the runs on each side
    other = stats.compare_runs(
        [{"seed": s, "accuracy": v} for s, v in enumerate([0.80, 0.90, 0.85])],
        [{"seed": s + 10, "accuracy": v} for s, v in enumerate([0.60, 0.80, 0.70, 0.75, 0.65])],
    )  # the default metric is accuracy
    assert other.method == stats.WELCH_T and (other.n_a, other.n_b) == (3, 5)
    assert other.low == pytest.approx(0.15 - 0.117351, abs=1e-5)
    assert stats.compare([{"seed": 0, "accuracy": 0.8}], [{"seed": 1, "accuracy": 0.7}]).n_b == 1


def test_paired_t_skips_a_seed_missing_on_either_side_and_pairs_seeds_of_any_type():
    a = [{"seed": s, "accuracy": v} for s, v in enumerate([0.80, 0.90, 0.70])]
    b = [{"seed": 0, "accuracy": 0.75}, {"seed": 1, "accuracy": 0.80}, {"seed": 2, "accuracy": None}]
    # seed 2 has no value for B: differences 0.05 and 0.10 -> mean 0.075, s = 0.035355, t(1) = 12.706
    paired = stats.compare(a, b)
    assert paired.method == stats.PAIRED_T and paired.difference == pytest.approx(0.075)
    assert paired.low == pytest.approx(0.075 - 12.706 * 0.035355 / math.sqrt(2), abs=1e-5)
    assert stats.compare(b, a).difference == pytest.approx(-0.075)
    # seeds named by a string and a number still pair (per-image results: the paired bootstrap)
    right, wrong = "1" * 20, "0" * 20
    mixed_a = [
        {"seed": "a", "accuracy": 1.0, "test_correct": right},
        {"seed": 1, "accuracy": 1.0, "test_correct": right},
    ]
    mixed_b = [
        {"seed": 1, "accuracy": 0.0, "test_correct": wrong},
        {"seed": "a", "accuracy": 0.0, "test_correct": wrong},
    ]
    both = stats.compare(mixed_a, mixed_b)
    assert both.method == stats.PAIRED_BOOTSTRAP and (both.difference, both.low, both.high) == (1.0, 1.0, 1.0)


def test_per_image_comparisons_of_balanced_accuracy_use_each_images_class():
    # 3 images of class 0, 1 of class 1. A right on class 0 only: accuracy 0.75, balanced 0.5. B right on the
    # class-1 image only: accuracy 0.25, balanced 0.5. Balanced: no difference; plain accuracy: +0.5.
    labels = [0, 0, 0, 1]
    a = [
        {"seed": s, "accuracy": 0.75, "balanced_accuracy": 0.5, "test_correct": "1110", "test_labels": labels}
        for s in (0, 1)
    ]
    b = [
        {"seed": s, "accuracy": 0.25, "balanced_accuracy": 0.5, "test_correct": "0001", "test_labels": labels}
        for s in (0, 1)
    ]
    paired = stats.compare(a, b, "balanced_accuracy")
    assert paired.method == stats.PAIRED_BOOTSTRAP and paired.difference == 0.0
    unpaired = stats.compare(a, [{**r, "seed": r["seed"] + 5} for r in b], "balanced_accuracy")
    assert unpaired.method == stats.IMAGE_BOOTSTRAP and unpaired.difference == 0.0
    assert stats.compare(a, b).difference == pytest.approx(0.5)
    # nothing on one side: no comparison, and no error
    nothing = stats.compare([], b)
    assert (
        math.isnan(nothing.difference) and nothing.method == stats.NO_INTERVAL and (nothing.n_a, nothing.n_b) == (0, 2)
    )


def test_an_accuracys_interval_is_cut_to_what_can_happen():
    # two seeds at 90% and 100%: t(1) = 12.706, s = 0.0707, half-width 12.706 * 0.0707 / sqrt(2) = 0.635
    cut = stats.mean_interval([0.9, 1.0], bounds=(0.0, 1.0))
    assert cut.mean == pytest.approx(0.95)
    assert cut.low == pytest.approx(0.95 - 0.6353, abs=1e-3) and cut.high == 1.0
    low = stats.mean_interval([0.0, 0.1], bounds=(0.0, 1.0))
    assert low.low == 0.0 and low.high == pytest.approx(0.05 + 0.6353, abs=1e-3)
    free = stats.mean_interval([0.9, 1.0])  # a difference of accuracies has no such bound
    assert free.high == pytest.approx(0.95 + 0.6353, abs=1e-3)
