"""The statistics behind every verdict: intervals over seeds, paired comparisons, collapsed runs.

Pure functions on plain numbers and strings (no pandas): a test can check each against a value
worked out by hand. Accuracies are fractions (0..1); differences are fractions too, the words
layer turns them into points.

* `mean_interval`: mean over seeds and its 95% Student-t interval (one seed: no spread, no interval);
* `compare`: configuration A minus configuration B, with a 95% interval from the best evidence the
  runs carry, and the name of the method used:
  - per-image results (`test_correct`, same test images): a bootstrap that resamples the test images
    and the seeds (paired by seed when both have the same seeds), fixed random seed;
  - otherwise the same seeds on both sides: a paired t interval on the per-seed differences;
  - otherwise a Welch (unpaired) t interval on the seed values; with one seed on a side, none.
* `collapse_reason`: why a run counts as collapsed (predicts one class, loss diverged), or None.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; past 30 the last one, which
# errs wide (at most 4% wider than the normal 1.96), never narrow.
T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0

PAIRED_BOOTSTRAP = "paired bootstrap over seeds and test images"
IMAGE_BOOTSTRAP = "bootstrap over seeds and the same test images (seeds differ)"
PAIRED_T = "paired t over seeds"
WELCH_T = "unpaired (Welch) t over seeds"
NO_INTERVAL = "none (one seed and no per-image results)"


def t95(df: float) -> float:
    """The two-sided 95% Student-t quantile for `df` degrees of freedom (df >= 1; fractional df, as
    Welch's, round down: wider)."""
    if not df >= 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T95[min(int(df), len(T95)) - 1]


@dataclass(frozen=True)
class Interval:
    """A mean over `n` values with its 95% interval; low and high are NaN when there is no spread to
    judge (one value) and everything is NaN for none."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def has_interval(self) -> bool:
        return not math.isnan(self.low)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _finite(values: Sequence[Any]) -> list[float]:
    out = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out.append(number)
    return out


def mean_interval(values: Sequence[Any], bounds: tuple[float, float] | None = None) -> Interval:
    """Mean and 95% t interval (mean ± t(n-1) · s / sqrt(n), s with n-1) of the finite values; with
    `bounds` (an accuracy's 0 and 1) the interval is cut to them: a few seeds near a bound give a t
    interval reaching past what can happen."""
    numbers = _finite(values)
    n = len(numbers)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(numbers) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in numbers) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high, n)


def welch_interval(a: Sequence[Any], b: Sequence[Any]) -> Interval:
    """mean(a) - mean(b) with a Welch 95% interval (Welch-Satterthwaite df); NaN bounds when either
    side has fewer than two values. n is the smaller sample."""
    x, y = _finite(a), _finite(b)
    if not x or not y:
        return Interval(math.nan, math.nan, math.nan, 0)
    diff = sum(x) / len(x) - sum(y) / len(y)
    if len(x) < 2 or len(y) < 2:
        return Interval(diff, math.nan, math.nan, min(len(x), len(y)))
    vx = mean_interval(x)
    vy = mean_interval(y)
    sx2 = ((vx.high - vx.mean) / t95(len(x) - 1)) ** 2  # s^2 / n, back from the interval
    sy2 = ((vy.high - vy.mean) / t95(len(y) - 1)) ** 2
    se2 = sx2 + sy2
    if se2 == 0:
        return Interval(diff, diff, diff, min(len(x), len(y)))
    df = se2**2 / (sx2**2 / (len(x) - 1) + sy2**2 / (len(y) - 1))
    half = t95(df) * math.sqrt(se2)
    return Interval(diff, diff - half, diff + half, min(len(x), len(y)))


# ---------------------------------------------------------------------------------------- per image
def correct_vector(text: Any) -> np.ndarray | None:
    """A run's per-image results ("0110...", one character per test image) as a bool array; None
    for anything else (missing, empty, another character)."""
    if not isinstance(text, str) or not text or set(text) - {"0", "1"}:
        return None
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")


def labels_vector(values: Any, n: int) -> np.ndarray | None:
    """Per-image true classes (a list of ints, or a string of digits) of length `n`, else None."""
    if isinstance(values, str):
        values = list(values)
    if not isinstance(values, (list, tuple)) or len(values) != n:
        return None
    try:
        labels = np.array([int(v) for v in values], dtype=np.int64)
    except (TypeError, ValueError):
        return None
    return labels if labels.min() >= 0 else None


def _score(correct: np.ndarray, labels: np.ndarray | None, n_classes: int) -> np.ndarray:
    """Accuracy (labels None) or balanced accuracy (mean recall over the classes present) along the
    last axis of `correct` (..., seeds, n_images); `labels` is (n_images,) or (..., n_images)."""
    if labels is None:
        return correct.mean(axis=-1)
    labels = labels[..., None, :]  # broadcast over the seed axis
    recalls, present = 0.0, 0
    for k in range(n_classes):
        in_class = labels == k
        support = in_class.sum(axis=-1)
        hits = (correct & in_class).sum(axis=-1)
        recalls = recalls + np.where(support > 0, hits / np.maximum(support, 1), 0.0)
        present = present + (support > 0)
    return recalls / present


def bootstrap_difference(
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    *,
    paired_seeds: bool,
    labels: np.ndarray | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """Score(A) - score(B) (mean over seeds) with a 95% percentile-bootstrap interval.

    `a` and `b` hold one bool vector per seed, all over the same test images in the same order. Each
    resample draws the test images with replacement (the same images for A and B) and the seeds with
    replacement: one draw shared by both sides when `paired_seeds` (a[i] and b[i] are the same seed),
    independent draws otherwise. So the interval carries both the image noise and the seed noise; with
    one seed per side it carries the image noise only. `labels` (the true class of each image) makes
    the score balanced accuracy. The point estimate is the difference on the data as it is."""
    xa, xb = np.stack(list(a)), np.stack(list(b))
    n_images = xa.shape[1]
    if xb.shape[1] != n_images:
        raise ValueError(f"per-image results of different lengths: {n_images} and {xb.shape[1]}")
    if paired_seeds and xa.shape[0] != xb.shape[0]:
        raise ValueError("paired seeds need the same number of seeds on both sides")
    n_classes = int(labels.max()) + 1 if labels is not None else 0
    estimate = float(_score(xa, labels, n_classes).mean() - _score(xb, labels, n_classes).mean())
    rng = np.random.default_rng(seed)
    images = rng.integers(0, n_images, size=(resamples, n_images))
    seeds_a = rng.integers(0, xa.shape[0], size=(resamples, xa.shape[0]))
    seeds_b = seeds_a if paired_seeds else rng.integers(0, xb.shape[0], size=(resamples, xb.shape[0]))
    diffs = np.empty(resamples)
    for start in range(0, resamples, 250):  # chunks keep memory at (250, seeds, images)
        part = slice(start, start + 250)
        pick = images[part][:, None, :]
        drawn_labels = labels[images[part]] if labels is not None else None
        sa = _score(xa[seeds_a[part][:, :, None], pick], drawn_labels, n_classes)
        sb = _score(xb[seeds_b[part][:, :, None], pick], drawn_labels, n_classes)
        diffs[part] = sa.mean(axis=-1) - sb.mean(axis=-1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return Interval(estimate, float(low), float(high), min(xa.shape[0], xb.shape[0]))


# ---------------------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class Comparison:
    """A minus B in the metric (fractions), its 95% interval and how it was obtained."""

    difference: float
    low: float
    high: float
    method: str
    n_a: int
    n_b: int

    @property
    def has_interval(self) -> bool:
        return not math.isnan(self.low)

    @property
    def beyond_noise(self) -> bool:
        """The interval excludes zero."""
        return self.has_interval and (self.low > 0 or self.high < 0)


def _frozen(runs: Sequence[dict], metric: str) -> tuple:
    def labels(value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    return tuple((r.get("seed"), r.get(metric), r.get("test_correct"), labels(r.get("test_labels"))) for r in runs)


def compare(a_runs: Sequence[dict], b_runs: Sequence[dict], metric: str = "accuracy") -> Comparison:
    """Configuration A minus configuration B in `metric`: see `compare_runs`. Results are cached (the
    dashboard redraws every few seconds; a bootstrap takes about 0.1 s)."""
    try:
        return _compare_cached(_frozen(a_runs, metric), _frozen(b_runs, metric), metric)
    except TypeError:  # something unhashable in a run: no cache
        return compare_runs(a_runs, b_runs, metric)


def clear_cache() -> None:
    """Forget cached comparisons (tests, and mutation testing, whose forked runs would else reuse them)."""
    _compare_cached.cache_clear()


@functools.lru_cache(maxsize=1024)
def _compare_cached(a: tuple, b: tuple, metric: str) -> Comparison:
    def runs(frozen: tuple) -> list[dict]:
        keys = ("seed", metric, "test_correct", "test_labels")
        return [dict(zip(keys, values)) for values in frozen]

    return compare_runs(runs(a), runs(b), metric)


def compare_runs(a_runs: Sequence[dict], b_runs: Sequence[dict], metric: str = "accuracy") -> Comparison:
    """Configuration A minus configuration B in `metric` ("accuracy" or "balanced_accuracy").

    Each run is a dict with "seed", the metric, and optionally "test_correct" (per-image string) and
    "test_labels" (per-image true class, needed to bootstrap balanced accuracy). Collapsed runs must
    already be left out. See the module docstring for which method is used when."""
    a_runs, b_runs = list(a_runs), list(b_runs)
    a_vals = {r.get("seed"): r.get(metric) for r in a_runs}
    b_vals = {r.get("seed"): r.get(metric) for r in b_runs}
    same_seeds = set(a_vals) == set(b_vals) and None not in a_vals
    balanced = metric == "balanced_accuracy"

    vectors_a = [correct_vector(r.get("test_correct")) for r in a_runs]
    vectors_b = [correct_vector(r.get("test_correct")) for r in b_runs]
    lengths = {len(v) for v in vectors_a + vectors_b if v is not None}
    per_image = bool(a_runs and b_runs) and all(v is not None for v in vectors_a + vectors_b) and len(lengths) == 1
    labels = None
    if per_image and balanced:
        n = lengths.pop()
        candidates = [labels_vector(r.get("test_labels"), n) for r in a_runs + b_runs]
        labels = candidates[0]
        if labels is None or any(c is None or not np.array_equal(c, labels) for c in candidates):
            per_image = False  # no common per-image classes: balanced accuracy cannot be resampled
    if per_image:
        if same_seeds:
            order = sorted(a_vals, key=str)
            by_seed_a = {r.get("seed"): v for r, v in zip(a_runs, vectors_a)}
            by_seed_b = {r.get("seed"): v for r, v in zip(b_runs, vectors_b)}
            interval = bootstrap_difference(
                [by_seed_a[s] for s in order], [by_seed_b[s] for s in order], paired_seeds=True, labels=labels
            )
            method = PAIRED_BOOTSTRAP
        else:
            interval = bootstrap_difference(vectors_a, vectors_b, paired_seeds=False, labels=labels)
            method = IMAGE_BOOTSTRAP
        return Comparison(interval.mean, interval.low, interval.high, method, len(a_runs), len(b_runs))
    if same_seeds and len(a_vals) >= 2:
        diffs = []
        for seed in a_vals:
            x, y = _finite([a_vals[seed]]), _finite([b_vals[seed]])
            if x and y:
                diffs.append(x[0] - y[0])
        interval = mean_interval(diffs)
        return Comparison(interval.mean, interval.low, interval.high, PAIRED_T, len(a_runs), len(b_runs))
    interval = welch_interval(list(a_vals.values()), list(b_vals.values()))
    method = WELCH_T if interval.has_interval else NO_INTERVAL
    return Comparison(interval.mean, interval.low, interval.high, method, len(a_runs), len(b_runs))


# ---------------------------------------------------------------------------------------- collapse
SINGLE_CLASS_ON_TEST = "predicts a single class on test"


def collapse_reason(metrics: Any) -> str | None:
    """Why a run counts as collapsed, or None. A run that says (`metrics["collapsed"]`) is believed,
    with its `collapse_reason`; an older run that does not say counts as collapsed when its test
    confusion matrix has every prediction in one column."""
    if not isinstance(metrics, dict):
        return None
    flag = metrics.get("collapsed")
    if flag is not None:
        if not flag:
            return None
        reason = metrics.get("collapse_reason")
        return str(reason) if reason else "collapsed in training"
    matrix = metrics.get("confusion_matrix")
    try:
        columns = np.asarray(matrix, dtype=np.float64).sum(axis=0)
    except (TypeError, ValueError):
        return None
    if columns.ndim != 1 or len(columns) < 2 or columns.sum() <= 0:
        return None
    return SINGLE_CLASS_ON_TEST if int((columns > 0).sum()) == 1 else None
