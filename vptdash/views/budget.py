"""Turning stored runs into answers: how many prompts, where, and at what cost.

Everything here works on plain run dicts (as `RunStore.list_runs` / `export_runs` give them) and
pandas frames; nothing trains, nothing imports Streamlit.

* `runs_table`: one flat row per finished run (missing values are NaN, never a KeyError);
* `aggregate_over_seeds`: one row per configuration (the config without its seed), mean and
  standard deviation over seeds;
* `pareto_front` and `recommend`: the cheapest configuration within a tolerance of the best,
  with one sentence a manager can repeat;
* `estimate_grid`: the analytic cost of a grid of prompt budgets before anything runs.

Metrics are fractions (0..1); tolerances are given in accuracy *points* (1.0 = one percentage
point = 0.01).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd

from vptdash.engine.cost import block_macs
from vptdash.engine.prompts import parse_placement, patch_size_of, placement_label, tokens_and_rows
from vptdash.engine.rows import supports_row_selection
from vptdash.engine.train import RunConfig
from vptdash.methods import vlprompts
from vptdash.views import stats

FAMILY_ORDER = ["linear probe", "shallow", "deep", "custom blocks", "full fine-tune"]

# Config keys that do not define *what* was trained: runs differing only in these are repeats.
SEED_KEYS = ("seed", "measure_latency")

_METRIC_COLUMNS = ("accuracy", "balanced_accuracy", "val_accuracy", "majority_accuracy")
_COST_COLUMNS = (
    "gmacs",
    "gmacs_full_graph",
    "gmacs_analytic",
    "latency_ms_b1",
    "latency_ms_b32",
    "params_trainable",
    "params_total",
)
RUN_COLUMNS = [
    "id",
    "family",
    "label",
    "config_key",
    "dataset",
    "backbone",
    "resolution",
    "shots",
    "tuning",
    "num_prompts",
    "placement",
    "seed",
    "source",
    *_METRIC_COLUMNS,
    *_COST_COLUMNS,
    "train_seconds",
    "parent_id",
    "created_at",
    "kind",
    "sweep_id",
    "dataset_name",
    "collapsed",
    "collapse_reason",
    "test_correct",
    "test_labels",
    "n_classes",
    "lr",
    "lr_source",
]

AGG_COLUMNS = [
    "config_key",
    "family",
    "label",
    "dataset",
    "backbone",
    "resolution",
    "shots",
    "tuning",
    "num_prompts",
    "placement",
    "n_seeds",
    "seeds",
    "n_collapsed",
    "accuracy_mean",
    "accuracy_std",
    "accuracy_low",
    "accuracy_high",
    "balanced_accuracy_mean",
    "balanced_accuracy_std",
    "balanced_accuracy_low",
    "balanced_accuracy_high",
    "val_accuracy_mean",
    "majority_accuracy",
    "gmacs",
    "gmacs_full_graph",
    "gmacs_analytic",
    "latency_ms_b1",
    "latency_ms_b1_std",
    "latency_ms_b32",
    "params_trainable",
    "params_total",
    "train_seconds",
    "run_ids",
    "sources",
    "dataset_name",
    "n_classes",
    "lr_text",
    "seed_runs",
    "collapsed_runs",
]

METRIC_WORDS = {
    "accuracy_mean": "accuracy",
    "accuracy": "accuracy",
    "balanced_accuracy_mean": "balanced accuracy",
    "balanced_accuracy": "balanced accuracy",
    "val_accuracy_mean": "validation accuracy",
    "val_accuracy": "validation accuracy",
}


def family_rank(family: Any) -> int:
    """Position of a family in FAMILY_ORDER; unknown families sort after the known ones."""
    try:
        return FAMILY_ORDER.index(family)
    except ValueError:
        return len(FAMILY_ORDER)


def ordered_families(families: Iterable[Any]) -> list[str]:
    """Known families in FAMILY_ORDER, then any others alphabetically."""
    unique = {str(f) for f in families if f is not None and not (isinstance(f, float) and math.isnan(f))}
    return sorted(unique, key=lambda f: (family_rank(f), f))


# ---------------------------------------------------------------------------------------- tables
def _number(value: Any) -> float:
    """A float, or NaN for anything missing or not a number (None, "", a dict, ...)."""
    if value is None or isinstance(value, bool):
        return float("nan") if value is None else float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return number


def config_key(config: dict) -> str:
    """A stable string naming a configuration without its seed: sorted JSON of the full config
    (defaults filled in, so an older row missing a key still matches) minus SEED_KEYS."""
    defaults = RunConfig().to_dict()
    merged = {**defaults, **(config or {})}
    for key in SEED_KEYS:
        merged.pop(key, None)
    return json.dumps(merged, sort_keys=True, default=str)


def dataset_name(spec: Any) -> str:
    """A short display name for a dataset spec: built-in names as they are, a folder or zip path
    (uploads are stored as paths) by its last component."""
    if spec is None or (isinstance(spec, float) and math.isnan(spec)):
        return ""
    text = str(spec).rstrip("/\\")
    if "/" in text or "\\" in text:
        return text.replace("\\", "/").rsplit("/", 1)[-1]
    return text


def _run_config(config: dict) -> RunConfig:
    try:
        return RunConfig.from_dict(config or {})
    except Exception:  # noqa: BLE001 - a malformed stored config still shows up, with defaults
        return RunConfig()


NOT_BUDGET_KINDS = ("continual", "skip-search")

# What makes two runs comparable on one chart beyond their data set: the same backbone, resolution and shots.
SETUP_MATCH_KEYS = ("backbone", "resolution", "shots")
# What a linear probe must share with a run to be its baseline: the same images in every split.
BASELINE_KEYS = ("dataset", "cell_type", "shots", "resolution", "backbone", "test_fraction", "split_seed")


def comparable_runs(rows: list[dict], setup: dict, *, same_setup: bool = True) -> tuple[list[dict], int]:
    """The runs one chart may compare for the active `setup`: same data set and cell type always, and
    with `same_setup` also the same backbone, resolution and shots. Returns (runs, how many runs on the
    same data were left out for another backbone, resolution or shots)."""
    on_data = [
        r
        for r in rows
        if r["config"].get("dataset") == setup.get("dataset") and r["config"].get("cell_type") == setup.get("cell_type")
    ]
    if not same_setup:
        return on_data, 0
    kept = [r for r in on_data if all(r["config"].get(k) == setup.get(k) for k in SETUP_MATCH_KEYS)]
    return kept, len(on_data) - len(kept)


# ---------------------------------------------------------------------------------------- data sizes
# Images per class is an axis of the answer, not noise to average over: runs of different sizes are
# never compared with each other (one chart and one recommendation per size).
SIDE_BY_SIDE = "side by side"
FULL_SPLIT = "full"  # the key of the full training split (shots None)
# What decides which runs one chart may compare, apart from the data size.
SIZE_SETUP_KEYS = tuple(k for k in SETUP_MATCH_KEYS if k != "shots")


def shots_of(config: dict) -> int | None:
    """Training images per class of a stored config (None: the full training split); a config stored
    without the key was trained with the default."""
    value = (config or {}).get("shots", RunConfig.shots)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def size_key(shots: Any) -> str:
    """The selector's value for a data size: "16", "64", "full"."""
    if shots is None or (isinstance(shots, float) and math.isnan(shots)):
        return FULL_SPLIT
    return str(int(shots))


def size_label(key: Any) -> str:
    """ "16 images per class", "1 image per class", "full training split", "side by side"."""
    if key == SIDE_BY_SIDE:
        return SIDE_BY_SIDE
    key = size_key(None if key in (None, FULL_SPLIT) else key)
    if key == FULL_SPLIT:
        return "full training split"
    return f"{key} image{'' if key == '1' else 's'} per class"


def runs_by_size(rows: list[dict], setup: dict, *, same_setup: bool = True) -> tuple[dict[str, list[dict]], int]:
    """The runs on the setup's data set and cell type, grouped by data size (keys `size_key`, fewest
    images first, the full training split last). With `same_setup` only the active backbone and
    resolution; the second value counts the runs on this data left out for another one."""
    on_data, _ = comparable_runs(rows, setup, same_setup=False)
    kept = [r for r in on_data if not same_setup or all(r["config"].get(k) == setup.get(k) for k in SIZE_SETUP_KEYS)]
    order = sorted({shots_of(r["config"]) for r in kept}, key=lambda s: (s is None, s or 0))
    groups = {size_key(shots): [r for r in kept if shots_of(r["config"]) == shots] for shots in order}
    return groups, len(on_data) - len(kept)


def size_options(sizes: Iterable[str]) -> list[str]:
    """The data-size selector's choices: every size present, then "side by side" when there are two or more."""
    sizes = list(sizes)
    return sizes + ([SIDE_BY_SIDE] if len(sizes) > 1 else [])


def default_size(options: list[str], active_shots: Any) -> str | None:
    """The active setup's size when runs have it, else the size with the most images (the last)."""
    sizes = [o for o in options if o != SIDE_BY_SIDE]
    if not sizes:
        return None
    wanted = size_key(active_shots)
    return wanted if wanted in sizes else sizes[-1]


def chosen_sizes(groups: dict[str, list[dict]], choice: Any) -> dict[str, list[dict]]:
    """The groups one view shows: every size side by side, or the chosen one (none when it is absent)."""
    if choice == SIDE_BY_SIDE:
        return dict(groups)
    return {choice: groups[choice]} if choice in groups else {}


@dataclass
class SizeAnswer:
    """One data size's runs and answer: its own table, configurations and recommendation."""

    key: str
    label: str
    table: pd.DataFrame
    agg: pd.DataFrame
    recommendation: Recommendation | None
    cost_unknown: list[str]

    @property
    def heading(self) -> str:
        """The label as a panel's heading: "16 images per class", "Full training split"."""
        return self.label[:1].upper() + self.label[1:]


def answers_by_size(
    groups: dict[str, list[dict]], tolerance_points: float, *, cost: str = "gmacs", metric: str = "accuracy_mean"
) -> list[SizeAnswer]:
    """One answer per data size, each from its own runs only: configurations over seeds, and the
    recommendation among those whose `cost` is known (`split_known_cost`)."""
    answers = []
    for key, rows in groups.items():
        table = runs_table(rows)
        agg = aggregate_over_seeds(table)
        known, unknown = split_known_cost(agg, cost)
        recommendation = recommend(known, tolerance_points, cost=cost, metric=metric) if len(known) else None
        answers.append(SizeAnswer(key, size_label(key), table, agg, recommendation, unknown))
    return answers


# ---------------------------------------------------------------------------------------- compute conventions
# Two honest counts of the same model (`engine.cost`): what runs here, and what published tables count.
COMPUTE_CONVENTIONS = {
    "gmacs": "executed graph",
    "gmacs_full_graph": "full graph, as in published tables",
}
CONVENTION_HELP = (
    "Executed graph: what a deployment here pays (deep prompts enter each block as keys and values only; "
    "the last block computes only the CLS row). Full graph: every token through every block, the "
    "convention of published FLOPs tables (e.g. Kim et al.), so those numbers can be compared."
)
_COST_UNKNOWN_NOUNS = {
    "gmacs": "GMACs per image (executed graph)",
    "gmacs_full_graph": "GMACs per image (full graph)",
    "gmacs_analytic": "analytic GMACs per image",
    "latency_ms_b1": "latency at batch 1",
    "latency_ms_b32": "latency at batch 32",
    "params_trainable": "trainable parameters",
}


def compute_words(cost: str) -> str:
    """ "GMACs per image (executed graph)", "GMACs per image (full graph, as in published tables)"."""
    return f"GMACs per image ({COMPUTE_CONVENTIONS[cost]})" if cost in COMPUTE_CONVENTIONS else cost


def split_known_cost(frame: pd.DataFrame, cost: str) -> tuple[pd.DataFrame, list[str]]:
    """(the configurations whose `cost` is known, one "cost unknown" line per other configuration).

    A configuration without its cost cannot sit on a cost axis: it is not drawn, and the recommendation
    is made without it, so it is never recommended; the lines say which ones and why."""
    if frame is None or len(frame) == 0:
        return (frame if frame is not None else pd.DataFrame(columns=AGG_COLUMNS)), []
    values = pd.to_numeric(frame[cost], errors="coerce") if cost in frame else pd.Series(np.nan, index=frame.index)
    known, unknown = frame[values.notna()], frame[values.isna()]
    noun = _COST_UNKNOWN_NOUNS.get(cost, cost.replace("_", " "))
    lines = []
    for _, row in unknown.iterrows():
        ids = row.get("run_ids")
        runs = ", ".join(f"#{i}" for i in ids) if isinstance(ids, (list, tuple)) and ids else "no run id"
        lines.append(f"{row.get('label')} ({runs}): cost unknown, no {noun} stored")
    return known, lines


def matching_probe(rows: list[dict], config: dict) -> dict | None:
    """The finished linear probe that is `config`'s baseline: same images (BASELINE_KEYS), the same seed
    when there is one, else any seed; None when there is none."""
    candidates = [
        run
        for run in rows
        if run.get("status", "done") == "done"
        and all(run["config"].get(k) == config.get(k) for k in BASELINE_KEYS)
        and _run_config(run["config"]).family() == "linear probe"
    ]
    same_seed = [run for run in candidates if run["config"].get("seed") == config.get("seed")]
    return (same_seed or candidates or [None])[0]


def _n_classes(metrics: dict) -> float:
    """The number of classes a run was tested on (from its confusion matrix), NaN when unknown."""
    matrix = metrics.get("confusion_matrix")
    return float(len(matrix)) if isinstance(matrix, list) and len(matrix) >= 2 else float("nan")


def runs_table(rows: list[dict]) -> pd.DataFrame:
    """One row per finished run (status "done") that has metrics; columns RUN_COLUMNS."""
    records = []
    for row in rows or []:
        # continual experiments and skip searches are stored runs too, but not points on a budget chart
        if row.get("status") != "done" or not row.get("metrics") or row.get("kind") in NOT_BUDGET_KINDS:
            continue
        config = row.get("config") or {}
        metrics = row.get("metrics") or {}
        costs = row.get("costs") or {}
        timings = row.get("timings") or {}
        run_config = _run_config(config)
        family, label = run_config.family(), run_config.label()
        if row.get("kind") == vlprompts.KIND:  # not a RunConfig: CLIP prompts label themselves
            family, label = vlprompts.family_and_label(config)
        reason = stats.collapse_reason(metrics)
        records.append(
            {
                "id": row.get("id"),
                "family": family,
                "label": label,
                "config_key": config_key(config),
                "dataset": config.get("dataset", row.get("dataset")),
                "backbone": config.get("backbone"),
                "resolution": _number(config.get("resolution")),
                "shots": _number(config.get("shots", RunConfig.shots)),  # None (NaN here): the full split
                "tuning": config.get("tuning"),
                "num_prompts": _number(config.get("num_prompts")),
                "placement": config.get("placement"),
                "seed": _number(config.get("seed")),
                "source": row.get("source"),
                **{name: _number(metrics.get(name)) for name in _METRIC_COLUMNS},
                **{name: _number(costs.get(name)) for name in _COST_COLUMNS},
                "train_seconds": _number(timings.get("train_seconds")),
                "parent_id": row.get("parent_id"),
                "created_at": _number(row.get("created_at")),
                "kind": row.get("kind"),
                "sweep_id": row.get("sweep_id"),
                "dataset_name": dataset_name(config.get("dataset", row.get("dataset"))),
                "collapsed": reason is not None,
                "collapse_reason": reason,
                "test_correct": metrics.get("test_correct") if isinstance(metrics.get("test_correct"), str) else None,
                "test_labels": metrics.get("test_labels"),
                "n_classes": _n_classes(metrics),
                "lr": _number(metrics.get("lr")),
                "lr_source": metrics.get("lr_source") if isinstance(metrics.get("lr_source"), str) else None,
            }
        )
    return pd.DataFrame.from_records(records, columns=RUN_COLUMNS)


def _sources(values: Iterable[Any]) -> str:
    unique = sorted({str(v) for v in values if v is not None and v == v})
    if not unique:
        return "unknown"
    return unique[0] if len(unique) == 1 else "mixed"


def _std(series: pd.Series) -> float:
    """Sample standard deviation over seeds (ddof=1); 0 for a single value, NaN for none."""
    values = series.dropna()
    if len(values) == 0:
        return float("nan")
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _mean(series: pd.Series) -> float:
    values = series.dropna()
    return float(values.mean()) if len(values) else float("nan")


def _lr_text(group: pd.DataFrame) -> str:
    """The learning rates of a configuration's runs in words ("1e-03 (validation)", "mixed: ..."), ""
    for runs that did not record one."""
    used = sorted(
        {
            f"{float(lr):.0e}" + (f" ({source})" if isinstance(source, str) and source else "")
            for lr, source in zip(group["lr"], group["lr_source"])
            if lr == lr
        }
    )
    return ", ".join(used)


def _seed_run(row: pd.Series) -> dict:
    """What `stats.compare` reads from one run."""
    return {
        "id": int(row["id"]) if row["id"] == row["id"] and row["id"] is not None else None,
        "seed": int(row["seed"]) if row["seed"] == row["seed"] else None,
        "accuracy": float(row["accuracy"]),
        "balanced_accuracy": float(row["balanced_accuracy"]),
        "test_correct": row.get("test_correct") if isinstance(row.get("test_correct"), str) else None,
        "test_labels": row.get("test_labels") if isinstance(row.get("test_labels"), (list, str)) else None,
    }


def aggregate_over_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (config_key): means over seeds, sample std (ddof=1, 0 for one seed)
    and 95% t interval (`*_low`, `*_high`; NaN for one seed: no spread to judge); "sources" is the
    single source of its runs or "mixed". Sorted by family, then prompt count.

    Collapsed runs (`stats.collapse_reason`) are data, not noise: they are never averaged into the
    metrics. `n_seeds` and `seeds` count the runs that are; `n_collapsed` and `collapsed_runs` (id, seed,
    accuracies, reason) the ones left out. A configuration whose runs all collapsed has NaN metrics.
    Costs, run ids and sources cover every run. `seed_runs` carries what `stats.compare` needs."""
    if table is None or len(table) == 0:
        return pd.DataFrame(columns=AGG_COLUMNS)
    if "collapsed" not in table:
        table = table.assign(collapsed=False)
    for column in ("collapse_reason", "test_correct", "test_labels", "lr_source"):
        if column not in table:
            table = table.assign(**{column: None})
    for column in ("n_classes", "lr", "gmacs_full_graph"):
        if column not in table:
            table = table.assign(**{column: float("nan")})
    records = []
    for key, group in table.groupby("config_key", sort=False):
        group = group.sort_values("seed", na_position="last")
        first = group.iloc[0]
        collapsed = group["collapsed"].fillna(False).astype(bool)
        kept, dropped = group[~collapsed], group[collapsed]
        accuracy = stats.mean_interval(list(kept["accuracy"]), bounds=(0.0, 1.0))
        balanced = stats.mean_interval(list(kept["balanced_accuracy"]), bounds=(0.0, 1.0))
        records.append(
            {
                "config_key": key,
                **{
                    name: first.get(name)
                    for name in (
                        "family",
                        "label",
                        "dataset",
                        "backbone",
                        "resolution",
                        "shots",
                        "tuning",
                        "num_prompts",
                        "placement",
                    )
                },
                "n_seeds": int(len(kept)),
                "seeds": [int(s) if s == s else None for s in kept["seed"]],
                "n_collapsed": int(len(dropped)),
                "accuracy_mean": _mean(kept["accuracy"]),
                "accuracy_std": _std(kept["accuracy"]),
                "accuracy_low": accuracy.low,
                "accuracy_high": accuracy.high,
                "balanced_accuracy_mean": _mean(kept["balanced_accuracy"]),
                "balanced_accuracy_std": _std(kept["balanced_accuracy"]),
                "balanced_accuracy_low": balanced.low,
                "balanced_accuracy_high": balanced.high,
                "val_accuracy_mean": _mean(kept["val_accuracy"]),
                "majority_accuracy": _mean(group["majority_accuracy"]),
                "gmacs": _mean(group["gmacs"]),
                "gmacs_full_graph": _mean(group["gmacs_full_graph"]),
                "gmacs_analytic": _mean(group["gmacs_analytic"]),
                "latency_ms_b1": _mean(group["latency_ms_b1"]),
                "latency_ms_b1_std": _std(group["latency_ms_b1"]),
                "latency_ms_b32": _mean(group["latency_ms_b32"]),
                "params_trainable": _mean(group["params_trainable"]),
                "params_total": _mean(group["params_total"]),
                "train_seconds": _mean(group["train_seconds"]),
                "run_ids": [int(i) for i in group["id"] if i is not None and i == i],
                "sources": _sources(group["source"]),
                "dataset_name": first.get("dataset_name"),
                "n_classes": float(pd.to_numeric(group["n_classes"], errors="coerce").max()),
                "lr_text": _lr_text(group),
                "seed_runs": [_seed_run(row) for _, row in kept.iterrows() if row["accuracy"] == row["accuracy"]],
                "collapsed_runs": [
                    {
                        "id": int(row["id"]) if row["id"] == row["id"] and row["id"] is not None else None,
                        "seed": int(row["seed"]) if row["seed"] == row["seed"] else None,
                        "accuracy": float(row["accuracy"]),
                        "balanced_accuracy": float(row["balanced_accuracy"]),
                        "reason": str(row["collapse_reason"] or "collapsed"),
                    }
                    for _, row in dropped.iterrows()
                ],
            }
        )
    frame = pd.DataFrame.from_records(records, columns=AGG_COLUMNS)
    order = frame["family"].map(family_rank)
    frame = frame.assign(_rank=order).sort_values(
        ["_rank", "family", "num_prompts", "placement", "label"], na_position="last", kind="stable"
    )
    return frame.drop(columns="_rank").reset_index(drop=True)


# Above this share of the test set in one class, accuracy flatters a model that always answers that
# class: the Budget explorer opens on balanced accuracy instead.
IMBALANCE_SHARE = 0.6


def default_metric(frame: pd.DataFrame) -> str:
    """ "balanced_accuracy_mean" when the majority class is over IMBALANCE_SHARE of the test set (the
    largest share among the runs), else "accuracy_mean"."""
    if frame is not None and "majority_accuracy" in frame:
        shares = pd.to_numeric(frame["majority_accuracy"], errors="coerce").dropna()
        if len(shares) and float(shares.max()) > IMBALANCE_SHARE:
            return "balanced_accuracy_mean"
    return "accuracy_mean"


def collapsed_lines(frame: pd.DataFrame) -> list[str]:
    """One line per collapsed run of the aggregated frame: "#12 10 deep prompts, seed 2: predicts a
    single class on test" (plain text: labels may come from users)."""
    lines = []
    if frame is None or "collapsed_runs" not in frame:
        return lines
    for _, row in frame.iterrows():
        runs = row.get("collapsed_runs")
        for run in runs if isinstance(runs, (list, tuple)) else []:
            seed = "" if run.get("seed") is None else f", seed {run['seed']}"
            lines.append(f"#{run.get('id')} {row.get('label')}{seed}: {run.get('reason')}")
    return lines


# ---------------------------------------------------------------------------------------- answers
def pareto_front(frame: pd.DataFrame, cost: str = "gmacs", metric: str = "accuracy_mean") -> pd.DataFrame:
    """Rows no other row dominates (cost <= and metric >= with one strict), by cost ascending.

    Rows with NaN cost or metric are left out. Exact ties (same cost and metric) are all kept:
    neither dominates the other. The original index is kept."""
    if frame is None or len(frame) == 0 or cost not in frame or metric not in frame:
        return frame.iloc[0:0] if frame is not None else pd.DataFrame()
    costs = pd.to_numeric(frame[cost], errors="coerce")
    metrics = pd.to_numeric(frame[metric], errors="coerce")
    valid = frame[costs.notna() & metrics.notna()]
    if len(valid) == 0:
        return valid
    order = sorted(valid.index, key=lambda i: (float(costs[i]), -float(metrics[i])))
    kept, best_metric, best_cost = [], -math.inf, None
    for index in order:
        c, m = float(costs[index]), float(metrics[index])
        if m > best_metric:
            kept.append(index)
            best_metric, best_cost = m, c
        elif m == best_metric and c == best_cost:
            kept.append(index)
    return valid.loc[kept]


# What a Recommendation's verdict says (`Recommendation.verdict`).
VERDICT_BEATS_PROBE = "beats the probe"  # the chosen configuration beats the linear probe beyond noise
VERDICT_WITHIN_NOISE = "within noise"  # no configuration beats the probe beyond noise: the probe is chosen
VERDICT_PROBE_ENOUGH = "probe within tolerance"  # the probe is within the tolerance of the best, as the data shows
VERDICT_UNCLEAR = "not beyond noise"  # the chosen one does not beat the probe beyond noise, another does
VERDICT_NO_INTERVAL = "no interval"  # a comparison the verdict quotes has no interval: point estimates only
VERDICT_NO_PROBE = "no probe"  # no linear probe among the runs: best and cheapest only


@dataclass
class Recommendation:
    best: pd.Series  # the highest-metric configuration (mean over non-collapsed seeds)
    chosen: pd.Series  # the recommended configuration (see `recommend`)
    tolerance_points: float
    cost: str
    metric: str
    sentence: str
    verdict: str = VERDICT_NO_PROBE
    probe: pd.Series | None = None  # the linear probe compared against, when there is one
    chosen_vs_probe: stats.Comparison | None = None
    best_vs_probe: stats.Comparison | None = None
    chosen_vs_best: stats.Comparison | None = None
    vs_probe: dict | None = None  # frame index -> Comparison against the probe, every configuration
    not_judged: list = field(default_factory=list)  # frame indices whose comparison with the probe has no interval

    @property
    def chosen_is_best(self) -> bool:
        return self.chosen.name == self.best.name


def _describe(row: pd.Series) -> str:
    """The configuration in words ("10 shallow prompts", "1 deep prompt", "10 prompts in blocks 0,5,11")."""
    label = str(row.get("label") or "")
    placement, prompts = row.get("placement"), _number(row.get("num_prompts"))
    if prompts == prompts and isinstance(placement, str):
        n = int(prompts)
        prefix = f"{n} {placement} prompts"
        if label.startswith(prefix):
            noun = "prompt" if n == 1 else "prompts"
            head = (
                f"{n} {noun} in blocks {placement}"
                if row.get("family") == "custom blocks"
                else f"{n} {placement} {noun}"
            )
            return head + label[len(prefix) :]
    return label or str(row.get("family") or "configuration")


def _pct(value: float) -> str:
    """A ratio in percent, with more digits when it is small (0.012%, 3%, 31%)."""
    if value >= 1:
        return f"{value:.0f}%"
    return f"{value:.2g}%"


def _cost_words(cost: str) -> tuple[str, str]:
    """(what "X% of its ..." says, how one value is written)."""
    return {
        "gmacs": ("compute", "GMACs per image"),
        "gmacs_analytic": ("compute", "GMACs per image"),
        "gmacs_full_graph": ("full-graph compute", "full-graph GMACs per image"),
        "latency_ms_b1": ("latency", "ms per image at batch 1"),
        "latency_ms_b32": ("latency", "ms per image at batch 32"),
        "params_trainable": ("trainable parameters", "trainable parameters"),
        "train_seconds": ("training time", "s of training"),
    }.get(cost, (cost.replace("_", " "), cost.replace("_", " ")))


def _format_cost(value: float, cost: str) -> str:
    if value != value:
        return "n/a"
    if cost.startswith("params"):
        return f"{value:,.0f}"
    if cost.startswith("latency") or cost == "train_seconds":
        return f"{value:.1f}" if value >= 1 else f"{value:.2g}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def _points(tolerance: float) -> str:
    return f"{tolerance:g} point" + ("" if tolerance == 1 else "s")


def _sentence(best: pd.Series, chosen: pd.Series, tolerance: float, cost: str, metric: str) -> str:
    metric_words = METRIC_WORDS.get(metric, metric.replace("_", " "))
    cost_noun, unit = _cost_words(cost)
    b_metric, c_metric = float(best[metric]) * 100, float(chosen[metric]) * 100
    b_cost, c_cost = _number(best.get(cost)), _number(chosen.get(cost))
    best_name = _describe(best)
    if chosen.name == best.name:
        cost_text = f", {_format_cost(b_cost, cost)} {unit}" if b_cost == b_cost else ""
        return (
            f"The best configuration, {best_name} ({b_metric:.1f}% {metric_words}{cost_text}), "
            f"is also the cheapest within {_points(tolerance)}."
        )
    if b_cost == b_cost and c_cost == c_cost and b_cost > 0:
        share = f"{_pct(100 * c_cost / b_cost)} of its {cost_noun}"
        verb = "with" if cost.startswith("params") else "at"
        unit_text = "" if unit == cost_noun else f" {unit}"  # "(4,610 vs 19,970)", not "parameters" twice
        cost_clause = f"{verb} {share} ({_format_cost(c_cost, cost)} vs {_format_cost(b_cost, cost)}{unit_text})"
    else:
        cost_clause = f"at {_format_cost(c_cost, cost)} vs {_format_cost(b_cost, cost)} {unit}"
    numbers = f"({c_metric:.1f}% vs {b_metric:.1f}% for {best_name})"
    if chosen.get("family") == "linear probe":
        gap = b_metric - c_metric
        closeness = (
            f"matches the best {metric_words}"
            if gap < 0.05
            else f"is within {gap:.1f} points of the best {metric_words}"
        )
        return f"A linear probe (no prompts) {closeness} {numbers} {cost_clause}."
    name = _describe(chosen)
    verb = "reach" if name[:1].isdigit() and not name.startswith("1 ") else "reaches"
    if chosen.get("family") == "full fine-tune":
        name, verb = "Full fine-tuning", "reaches"
    return (
        f"{name[:1].upper() + name[1:]} {verb} {_pct(100 * c_metric / b_metric) if b_metric > 0 else 'n/a'} "
        f"of the best {metric_words} {numbers} {cost_clause}."
    )


def _run_metric(metric: str) -> str:
    """The per-run metric behind an aggregate column ("accuracy_mean" -> "accuracy")."""
    return metric[: -len("_mean")] if metric.endswith("_mean") else metric


def _seed_runs(row: pd.Series) -> list[dict]:
    runs = row.get("seed_runs")
    return list(runs) if isinstance(runs, (list, tuple)) else []


def _compare_rows(a: pd.Series, b: pd.Series, metric: str) -> stats.Comparison:
    """a minus b; without per-seed data (a hand-made frame) the difference of the means, no interval."""
    a_runs, b_runs = _seed_runs(a), _seed_runs(b)
    if a_runs and b_runs:
        return stats.compare(a_runs, b_runs, _run_metric(metric))
    difference = _number(a.get(metric)) - _number(b.get(metric))
    return stats.Comparison(difference, math.nan, math.nan, stats.NO_INTERVAL, 0, 0)


def _signed_points(value: float) -> str:
    return f"{100 * value:+.1f} points"


def _ci(comparison: stats.Comparison) -> str:
    text = f"95% CI {100 * comparison.low:+.1f} to {100 * comparison.high:+.1f}"
    if min(comparison.n_a, comparison.n_b) < 2:
        text += "; one seed, so test-image noise only"  # how much the seed moves it is unknown
    return text


def _relative_cost(value: float, reference: float, cost: str) -> str:
    """ "at +3% compute", "at 2.4x the compute", "with 46x the trainable parameters"; "" when unknown."""
    if not (value == value and reference == reference and reference > 0):
        return ""
    noun, _ = _cost_words(cost)
    verb = "with" if cost.startswith("params") else "at"
    ratio = value / reference
    if ratio >= 2:
        return f" {verb} {ratio:.1f}x the {noun}"
    change = 100 * (ratio - 1)
    amount = f"{change:+.0f}%" if abs(change) >= 1 else f"{change:+.1g}%"
    return f" {verb} {amount} {noun}"


def _where(frame: pd.DataFrame) -> str:
    """ "at 16 images per class", "on the full training split", or "" when the rows mix sizes."""
    if "shots" not in frame:
        return ""
    shots = {float(v) if v == v else None for v in pd.to_numeric(frame["shots"], errors="coerce")}
    if len(shots) != 1:
        return ""
    [value] = shots
    return " on the full training split" if value is None else f" at {value:g} images per class"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _not_judged(count: int) -> str:
    """The clause for configurations left out of the verdict for want of an interval ("" for none)."""
    if count == 0:
        return ""
    subject = "1 configuration was" if count == 1 else f"{count} configurations were"
    return f" {subject} not judged: one seed and no per-image results, so no interval against the probe."


def _probe_index(frame: pd.DataFrame, metrics: pd.Series) -> Any:
    """The linear probe to compare against: the best-scoring linear-probe row, None when none."""
    if "family" not in frame:
        return None
    probes = [i for i in frame.index if frame.at[i, "family"] == "linear probe" and metrics[i] == metrics[i]]
    return max(probes, key=lambda i: float(metrics[i])) if probes else None


def recommend(
    frame: pd.DataFrame, tolerance_points: float = 1.0, *, cost: str = "gmacs", metric: str = "accuracy_mean"
) -> Recommendation | None:
    """The configuration the data supports, with one sentence a manager can repeat (`_recommend`), and
    one more when, in plain accuracy, no configuration beats always answering the most common class:
    a verdict among configurations must not read as if any of them were useful."""
    result = _recommend(frame, tolerance_points, cost=cost, metric=metric)
    if result is None or metric != "accuracy_mean" or "majority_accuracy" not in frame:
        return result
    majority = pd.to_numeric(frame["majority_accuracy"], errors="coerce").max()
    best = _number(result.best.get(metric))
    if majority == majority and best == best and best <= majority:
        result.sentence += (
            f" None of them beats always answering the most common class ({100 * majority:.1f}% of the test "
            "set); balanced accuracy shows what they learned."
        )
    return result


def _recommend(
    frame: pd.DataFrame, tolerance_points: float = 1.0, *, cost: str = "gmacs", metric: str = "accuracy_mean"
) -> Recommendation | None:
    """The configuration the data supports, with one sentence a manager can repeat. None when no row
    has the metric (a configuration whose runs all collapsed has none, so it is never recommended).

    * best: the highest mean (ties: the cheapest known cost, then the most seeds);
    * chosen: the cheapest configuration with a known cost whose mean is within `tolerance_points` of
      the best and, where an interval exists, whose paired difference from the best has its 95% lower
      bound within the tolerance too (equally cheap: the best itself);
    * against the linear probe (the best-scoring probe row, when there is one): when no configuration
      beats it beyond noise (every 95% interval of the difference reaches zero or below), the probe is
      chosen and the sentence says the differences are within noise; otherwise the sentence gives the
      chosen configuration's difference from the probe with its interval and cost. A configuration
      whose difference from the probe has no interval is not judged (never counts as beating it; the
      sentence says how many were left so); the verdict is VERDICT_NO_INTERVAL only when a comparison
      it quotes (chosen or best vs the probe, chosen vs best) has none, or none has one.
    Rows without the cost can be "best" but are never chosen over a row whose cost is known."""
    if frame is None or len(frame) == 0 or metric not in frame:
        return None
    if not frame.index.is_unique:
        frame = frame.reset_index(drop=True)
    metrics = pd.to_numeric(frame[metric], errors="coerce")
    costs = pd.to_numeric(frame[cost], errors="coerce") if cost in frame else pd.Series(np.nan, index=frame.index)
    valid = frame[metrics.notna()]
    if len(valid) == 0:
        return None
    best_value = metrics[valid.index].max()
    top = [i for i in valid.index if metrics[i] == best_value]
    seeds = pd.to_numeric(frame["n_seeds"], errors="coerce") if "n_seeds" in frame else pd.Series(1, index=frame.index)
    # ties on the mean: the cheapest known cost, then the most seeds (more evidence)
    best_index = min(
        top,
        key=lambda i: (
            math.isnan(costs[i]),
            costs[i] if costs[i] == costs[i] else 0.0,
            -(seeds[i] if seeds[i] == seeds[i] else 0),
        ),
    )
    best = frame.loc[best_index]
    tolerance = max(float(tolerance_points), 0.0) / 100.0
    threshold = best_value - tolerance - 1e-12
    gaps: dict[Any, stats.Comparison] = {}
    candidates = []
    for i in valid.index:
        if metrics[i] < threshold or costs[i] != costs[i]:
            continue
        if i != best_index:
            gaps[i] = _compare_rows(frame.loc[i], best, metric)
            if gaps[i].has_interval and gaps[i].low < -tolerance - 1e-12:
                continue  # within the tolerance on average, but the data cannot rule out a larger gap
        candidates.append(i)
    if candidates:
        chosen_index = min(candidates, key=lambda i: (float(costs[i]), -float(metrics[i])))
        if costs[best_index] == costs[chosen_index]:
            chosen_index = best_index  # equally cheap: the best itself
    else:
        chosen_index = best_index
    chosen = frame.loc[chosen_index]
    chosen_vs_best = gaps.get(chosen_index) if chosen_index != best_index else None
    result = Recommendation(
        best=best,
        chosen=chosen,
        tolerance_points=float(tolerance_points),
        cost=cost,
        metric=metric,
        sentence="",
        chosen_vs_best=chosen_vs_best,
    )
    probe_index = _probe_index(frame, metrics)
    if probe_index is None:
        result.sentence = _sentence(best, chosen, float(tolerance_points), cost, metric)
        if chosen_vs_best is not None and chosen_vs_best.has_interval:
            result.sentence += (
                f" The gap to the best: {_signed_points(chosen_vs_best.difference)} ({_ci(chosen_vs_best)})."
            )
        return result
    probe = frame.loc[probe_index]
    vs_probe = {i: _compare_rows(frame.loc[i], probe, metric) for i in valid.index if i != probe_index}
    result.probe, result.vs_probe = probe, vs_probe
    result.best_vs_probe = vs_probe.get(best_index)
    result.chosen_vs_probe = vs_probe.get(chosen_index)
    words = METRIC_WORDS.get(metric, metric.replace("_", " "))
    if not vs_probe:  # the probe is the only configuration
        result.verdict = VERDICT_PROBE_ENOUGH
        result.sentence = _sentence(best, chosen, float(tolerance_points), cost, metric)
        return result
    # Only the comparisons the sentence quotes must have an interval; a configuration whose comparison
    # with the probe has none (one seed, no per-image results) is left unjudged: never a winner over
    # the probe, never the "closest", and counted in one clause, so one old single-seed run beside
    # well-measured ones does not turn the whole verdict into "no evidence".
    judged = {i: c for i, c in vs_probe.items() if c.has_interval}
    result.not_judged = [i for i in vs_probe if i not in judged]
    quoted = [vs_probe[i] for i in {best_index, chosen_index} if i != probe_index]
    quoted += [chosen_vs_best] if chosen_vs_best is not None else []
    if not judged or not all(c.has_interval for c in quoted):
        result.verdict = VERDICT_NO_INTERVAL
        result.sentence = (
            _sentence(best, chosen, float(tolerance_points), cost, metric)
            + " One seed and no per-image results: no interval yet, so this is not evidence."
        )
        return result
    unjudged = _not_judged(len(result.not_judged))
    winners = [i for i in judged if judged[i].low > 0]
    if not winners:
        result.verdict = VERDICT_WITHIN_NOISE
        result.chosen = probe
        result.chosen_vs_probe = None
        spread = max(abs(c.difference) for c in judged.values())
        closest = best_index if best_index != probe_index else max(judged, key=lambda i: float(metrics[i]))
        lead = judged[closest]
        result.sentence = (
            f"No budget beats the linear probe beyond noise{_where(valid)}; the differences in {words} are "
            f"within ±{100 * spread:.1f} points (the {'best' if closest == best_index else 'closest'}, "
            f"{_describe(frame.loc[closest])}: {_signed_points(lead.difference)}, {_ci(lead)}). "
            f"More images or seeds would tell them apart.{unjudged}"
        )
        return result
    if chosen_index == probe_index:
        result.verdict = VERDICT_PROBE_ENOUGH
        gap = vs_probe[best_index]
        result.sentence = (
            f"The linear probe (no prompts) is within {_points(float(tolerance_points))} of the best {words}: "
            f"{_describe(best)} is {_signed_points(gap.difference)} ({_ci(gap)})"
            f"{_relative_cost(_number(best.get(cost)), _number(probe.get(cost)), cost)}.{unjudged}"
        )
        return result
    lead = vs_probe[chosen_index]
    name = _capital(_describe(chosen)) if chosen.get("family") != "full fine-tune" else "Full fine-tuning"
    cost_text = _relative_cost(_number(chosen.get(cost)), _number(probe.get(cost)), cost)
    if lead.low > 0:
        result.verdict = VERDICT_BEATS_PROBE
        sentence = f"{name}: {_signed_points(lead.difference)} over the linear probe ({_ci(lead)}){cost_text}."
    else:
        result.verdict = VERDICT_UNCLEAR
        cheapest = min(winners, key=lambda i: (costs[i] != costs[i], costs[i] if costs[i] == costs[i] else 0.0))
        other = vs_probe[cheapest]
        sentence = (
            f"{name}: {_signed_points(lead.difference)} over the linear probe, within noise ({_ci(lead)}){cost_text}; "
            f"{_describe(frame.loc[cheapest])} does beat it ({_signed_points(other.difference)}, {_ci(other)})."
        )
    if chosen_vs_best is not None:
        sentence += (
            f" It is within {_points(float(tolerance_points))} of the best, {_describe(best)} "
            f"({_signed_points(chosen_vs_best.difference)}, {_ci(chosen_vs_best)})."
        )
    if lead.low > 0:
        # A cheaper configuration that also beats the probe was passed over only because the data does not
        # show it within the tolerance of the best: a manager weighing cost should still hear of it.
        cheaper = [i for i in winners if costs[i] == costs[i] and costs[i] < costs[chosen_index]]
        if cheaper:
            other_index = min(cheaper, key=lambda i: float(costs[i]))
            other = vs_probe[other_index]
            other_cost = _relative_cost(_number(frame.loc[other_index].get(cost)), _number(probe.get(cost)), cost)
            sentence += (
                f" {_capital(_describe(frame.loc[other_index]))} also beats it ({_signed_points(other.difference)}, "
                f"{_ci(other)}){other_cost}, but is not shown to be within {_points(float(tolerance_points))} of "
                "the best."
            )
    result.sentence = sentence + unjudged
    return result


# ---------------------------------------------------------------------------------------- estimates
def estimate_grid(
    depth: int,
    embed_dim: int,
    mlp_dim: int,
    num_patches: int,
    patch_size: int,
    num_classes: int,
    counts: list[int],
    placements: list[str],
    *,
    num_prefix_tokens: int = 1,
    in_chans: int = 3,
    has_class_token: bool = True,
    row_selection: bool = True,
) -> pd.DataFrame:
    """Analytic cost of every (prompt count, placement) before anything runs.

    GMACs follow `cost.analytic_gmacs`: blocks with their real sequence lengths and computed rows
    (`prompts.tokens_and_rows`: prompts join at the first placed block; deep prompts are overwritten
    by the next block, so only their keys and values are ever computed; the last block computes the
    CLS row) + patch embedding + head. So at the same count deep prompts cost fewer GMACs per image
    than shallow ones, while training `depth` times more prompt parameters. A count of 0 is the
    linear probe (one row). Raises `PromptConfigError` for a placement that does not fit `depth`."""
    base_tokens = num_prefix_tokens + num_patches
    fixed = num_patches * in_chans * patch_size * patch_size * embed_dim + embed_dim * num_classes
    head_params = embed_dim * num_classes + num_classes

    def gmacs(prompts: int, blocks: tuple[int, ...]) -> float:
        tokens, rows = tokens_and_rows(
            depth, {b: prompts for b in blocks}, (), base_tokens, has_class_token, row_selection
        )
        return (fixed + sum(block_macs(t, embed_dim, mlp_dim, r) for t, r in zip(tokens, rows))) / 1e9

    zero = gmacs(0, ())
    records, seen = [], set()
    for count in counts:
        count = int(count)
        if count < 0:
            raise ValueError(f"prompt count must be >= 0, got {count}")
        for placement in placements:
            blocks = parse_placement(placement, depth) if count else ()
            name = placement_label(blocks, depth) if count else "none"
            if count and not blocks:
                raise ValueError(f"placement {placement!r} places no prompts")
            if (count, name) in seen:
                continue
            seen.add((count, name))
            config = RunConfig(tuning="prompt", num_prompts=count, placement=name if count else "shallow")
            value = gmacs(count, blocks)
            prompt_params = count * embed_dim * len(blocks)
            records.append(
                {
                    "num_prompts": count,
                    "placement": name,
                    "family": config.family(),
                    "label": config.label(),
                    "gmacs_analytic": value,
                    "params_trainable": prompt_params + head_params,
                    "params_prompts": prompt_params,
                    "n_placed_blocks": len(blocks),
                    "tokens": base_tokens + count,
                    "relative_cost": value / zero,
                }
            )
    columns = [
        "num_prompts",
        "placement",
        "family",
        "label",
        "gmacs_analytic",
        "params_trainable",
        "params_prompts",
        "n_placed_blocks",
        "tokens",
        "relative_cost",
    ]
    frame = pd.DataFrame.from_records(records, columns=columns)
    if len(frame):
        frame = (
            frame.assign(_rank=frame["family"].map(family_rank))
            .sort_values(["_rank", "placement", "num_prompts"], kind="stable")
            .drop(columns="_rank")
            .reset_index(drop=True)
        )
    return frame


def backbone_shape(backbone) -> dict:
    """depth, embed_dim, mlp_dim, patch_size, num_prefix_tokens, in_chans of a timm ViT: the keyword
    arguments of `estimate_grid` (add num_patches = (resolution // patch_size) ** 2 and num_classes)."""
    first = backbone.blocks[0]
    return {
        "depth": len(backbone.blocks),
        "embed_dim": int(backbone.embed_dim),
        "mlp_dim": int(first.mlp.fc1.out_features),
        "patch_size": patch_size_of(backbone),
        "num_prefix_tokens": int(getattr(backbone, "num_prefix_tokens", 1)),
        "in_chans": int(backbone.patch_embed.proj.in_channels),
        "has_class_token": getattr(backbone, "cls_token", None) is not None,
        "row_selection": all(supports_row_selection(block) for block in backbone.blocks),
    }
