"""Find the cheapest budget within X points of the best without running the whole grid.

The grid answers "cheapest configuration whose mean accuracy over seeds is within X points of the best"
by training every configuration with every seed. The search answers the same question with fewer runs,
in two phases:

1. explore: every configuration of the space, one seed each, in the order Optuna's TPE sampler
   proposes them (objective: cost; constraint: accuracy within X points of the best seen so far, a per-trial
   constraint TPE honours). In a space larger than the budget this is what decides which
   configurations are tried at all; in a small one it only orders them.
2. race: another seed for a configuration that could still change the answer: one that could be the
   best (its mean plus `z` standard errors reaches the leader's mean minus `z` of its own), or one
   cheaper than the current pick that could be within X points of the best. The one with the fewest
   seeds goes first (the cheaper on a tie). It stops when no contender has seeds left, or at its run
   budget; then it says how many contenders were still open.

Why Optuna, and why not for the whole search: Optuna's samplers are good at proposing configurations
in a large mixed space (counts x placements x block subsets x prompt types x skipped blocks); its study
machinery does not repeat a configuration over seeds, and seed noise is what decides the answer here
(on the shipped ELPV reference one configuration moves by up to 40 points between seeds). The racing
rule is a few lines over means and standard errors, so it is written out here.

The search's runs are ordinary runs in the store (kind train/probe, `parent_id` = the search, one
sweep id), so the Budget explorer's chart and recommendation read them like a grid's. The search row
itself (kind "search") keeps its state in progress events: "search" events as it goes, one "result"
event at the end; never metrics, so it is no point on a chart. On a Ray cluster
(`runs.cluster.cluster_settings`) the runs of one round go to the cluster together.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from vptdash.engine.train import ConfigError, RunConfig
from vptdash.runs import cluster
from vptdash.runs.jobs import ProgressWriter, claim_job, execute_run, fail_job, kind_of, new_sweep_id, register_kind
from vptdash.runs.store import RunStore

KIND = "search"
SEARCH_KEY = "search"  # the row's config: {"base": RunConfig dict, "search": SearchSpec dict}
DEFAULT_Z = 0.5  # a larger z spends more seeds for a surer answer: benchmarks/search_replay.py measures the trade
PRIOR_STD = 0.05  # seed spread assumed before two configurations have two seeds each (5 points)
TUNED_KEYS = ("tuning", "num_prompts", "placement", "prompt_type", "skip_blocks")


@dataclass
class SearchSpec:
    """What to search over and what to find. Tolerance in accuracy points (1.0 = 0.01)."""

    prompt_counts: list[int] = field(default_factory=lambda: [0, 1, 5, 10, 50, 100])
    placements: list[str] = field(default_factory=lambda: ["shallow", "deep"])
    prompt_types: list[str] = field(default_factory=lambda: ["standard"])
    skip_options: list[list[int]] = field(default_factory=lambda: [[]])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tolerance: float = 1.0
    metric: str = "accuracy"
    cost: str = "gmacs"
    max_runs: int | None = None  # None: 40% of the grid's runs
    z: float = DEFAULT_Z
    sampler_seed: int = 0

    def candidates(self) -> list[dict]:
        """Every configuration of the space as overrides of the base config; the linear probe once."""
        found: list[dict] = []
        for count, placement, prompt_type, skip in itertools.product(
            self.prompt_counts, self.placements, self.prompt_types, self.skip_options
        ):
            if int(count) == 0:
                candidate = {"tuning": "linear", "num_prompts": 0, "placement": "none", "prompt_type": "standard"}
            else:
                candidate = {"tuning": "prompt", "num_prompts": int(count), "placement": placement}
                candidate["prompt_type"] = prompt_type
            candidate["skip_blocks"] = sorted(int(b) for b in skip)
            if candidate not in found:
                found.append(candidate)
        return found

    def budget(self) -> int:
        grid = len(self.candidates()) * len(self.seeds)
        return int(self.max_runs) if self.max_runs else max(1, math.ceil(0.4 * grid))

    def validate(self) -> "SearchSpec":
        if not self.prompt_counts or not self.seeds:
            raise ConfigError("a search needs at least one prompt count and one seed")
        if any(int(c) > 0 for c in self.prompt_counts) and not self.placements:
            raise ConfigError("a search over prompt counts needs at least one placement")
        if self.tolerance < 0:
            raise ConfigError("the tolerance must be >= 0 points")
        if self.max_runs is not None and self.max_runs < 1:
            raise ConfigError("a search needs a budget of at least one run")
        return self


def candidate_key(candidate: dict) -> str:
    return json.dumps(candidate, sort_keys=True)


def candidate_label(candidate: dict) -> str:
    return RunConfig.from_dict({**RunConfig().to_dict(), **candidate}).label()


def cheapest_within(stats: dict[str, dict], tolerance_points: float) -> tuple[str, str] | None:
    """(best key, chosen key) over {key: {"mean", "cost"}}: the best mean (the cheaper on a tie), and the
    cheapest whose mean is within the tolerance of it (the better on a cost tie): the search's running
    answer, on point estimates. The dashboard's verdict (`views.budget.recommend`) is stricter on noisy
    data: a cheaper configuration counts there only when its paired 95% interval against the best is
    within the tolerance, so it may name a dearer configuration than this rule."""
    valid = {k: s for k, s in stats.items() if s["mean"] == s["mean"]}
    if not valid:
        return None
    best_mean = max(s["mean"] for s in valid.values())
    best = min((k for k, s in valid.items() if s["mean"] == best_mean), key=lambda k: _cost_order(valid[k]))
    threshold = best_mean - max(tolerance_points, 0.0) / 100.0 - 1e-12
    close = [k for k, s in valid.items() if s["mean"] >= threshold and s["cost"] == s["cost"]]
    if not close:
        return best, best
    chosen = min(close, key=lambda k: (valid[k]["cost"], -valid[k]["mean"]))
    if valid[chosen]["cost"] == valid[best]["cost"]:
        chosen = best
    return best, chosen


def _cost_order(stat: dict) -> tuple[bool, float]:
    cost = stat["cost"]
    return (cost != cost, cost if cost == cost else 0.0)


class BudgetSearch:
    """The search's decisions, with no store: `ask` says which (candidate, seed) runs next, `tell` takes
    a finished run dict (config, status, metrics, costs). The job kind and the replay benchmark share it."""

    def __init__(self, spec: SearchSpec):
        self.spec = spec.validate()
        self.candidates = spec.candidates()
        self.keys = [candidate_key(c) for c in self.candidates]
        self.results: dict[str, list[float]] = {k: [] for k in self.keys}
        self.costs: dict[str, float] = {}
        self.failed: dict[str, int] = {k: 0 for k in self.keys}
        self.pending: set[tuple[str, int]] = set()
        self.runs = 0
        self.rng = random.Random(spec.sampler_seed)
        self.study = None
        self.asked: dict[str, Any] = {}  # key -> the Optuna trial that proposed it, told when its run is back
        self.explore_order = self._explore_order()
        # A space larger than the budget is explored only partly, so that seeds are left for the race.
        budget = spec.budget()
        self.explore_limit = len(self.keys) if len(self.keys) <= budget else max(1, int(0.6 * budget))

    # ------------------------------------------------------------------ explore
    def _explore_order(self) -> list[str]:
        """Every candidate once, in the order TPE proposes them (random in its startup trials, then
        guided by what the earlier proposals cost and scored: see `_tell_optuna`)."""
        order = list(self.keys)
        self.rng.shuffle(order)
        return order

    def _optuna_study(self):
        if self.study is None:
            try:
                import optuna  # noqa: PLC0415 - optional dependency: only a search needs it
            except ImportError as exc:
                raise ConfigError("a budget search needs the `optuna` package: pip install optuna") from exc
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = optuna.samplers.TPESampler(seed=self.spec.sampler_seed, n_startup_trials=min(5, len(self.keys)))
            self.study = optuna.create_study(direction="minimize", sampler=sampler)
            self.optuna = optuna
        return self.study

    def _propose_new(self) -> str | None:
        """An unexplored candidate: TPE's proposal when it names one, else the next in a seeded shuffle."""
        # A configuration whose run failed (a lost node, a transient error) is tried with its next seed.
        explored = sum(1 for k in self.keys if self.results[k] or self._in_flight(k) or self._next_seed(k) is None)
        unexplored = [
            k
            for k in self.explore_order
            if not self.results[k] and not self._in_flight(k) and self._next_seed(k) is not None
        ]
        if not unexplored or explored >= self.explore_limit:
            return None
        if len(self.keys) > 1:
            study = self._optuna_study()
            trial = study.ask()
            key = self.keys[trial.suggest_categorical("candidate", list(range(len(self.keys))))]
            if key in unexplored:
                self.asked[key] = trial
                return key
            self._tell_optuna_trial(trial, key)  # a repeat: answered from what is known, no run
        return unexplored[0]

    def _tell_optuna_trial(self, trial, key: str) -> None:
        values = self.results[key]
        if not values or key not in self.costs:
            self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
            return
        best = max((sum(v) / len(v) for v in self.results.values() if v), default=0.0)
        mean = sum(values) / len(values)
        # Feasible (<= 0) when within the tolerance of the best seen so far (Optuna 5's per-trial constraint).
        trial.set_constraint("within_tolerance", (best - self.spec.tolerance / 100.0) - mean)
        self.study.tell(trial, self.costs[key])

    # ------------------------------------------------------------------ race
    def _in_flight(self, key: str) -> bool:
        return any(k == key for k, _ in self.pending)

    def pooled_std(self) -> float:
        """The seed spread: the pooled within-configuration standard deviation, or the prior."""
        groups = [v for v in self.results.values() if len(v) >= 2]
        if len(groups) < 2:
            return PRIOR_STD
        num = sum(sum((x - sum(v) / len(v)) ** 2 for x in v) for v in groups)
        dof = sum(len(v) - 1 for v in groups)
        return math.sqrt(num / dof) if dof else PRIOR_STD

    def stats(self) -> dict[str, dict]:
        return {
            k: {"mean": sum(v) / len(v), "n": len(v), "cost": self.costs.get(k, float("nan"))}
            for k, v in self.results.items()
            if v
        }

    def answer(self) -> tuple[str, str] | None:
        return cheapest_within(self.stats(), self.spec.tolerance)

    def contenders(self) -> list[str]:
        """Configurations whose further seeds could still change the answer."""
        stats = self.stats()
        answer = cheapest_within(stats, self.spec.tolerance)
        if answer is None:
            return []
        best, chosen = answer
        std, z, tol = self.pooled_std(), self.spec.z, self.spec.tolerance / 100.0

        def se(key: str) -> float:
            return std / math.sqrt(stats[key]["n"])

        leader_low = stats[best]["mean"] - z * se(best)
        chosen_cost = stats[chosen]["cost"]
        open_keys = []
        for key, s in stats.items():
            high = s["mean"] + z * se(key)
            could_be_best = high >= leader_low
            could_be_cheaper_pick = s["cost"] < chosen_cost and high >= stats[best]["mean"] - z * se(best) - tol
            if key in (best, chosen) or could_be_best or could_be_cheaper_pick:
                open_keys.append(key)
        return open_keys

    def _next_seed(self, key: str) -> int | None:
        used = len(self.results[key]) + self.failed[key] + sum(1 for k, _ in self.pending if k == key)
        return self.spec.seeds[used] if used < len(self.spec.seeds) else None

    def ask(self, n: int = 1) -> list[tuple[dict, int]]:
        """Up to `n` runs to start now, as (candidate overrides, seed); [] when the search is over."""
        chosen: list[tuple[str, int]] = []
        while len(chosen) < n and self.runs + len(self.pending) < self.spec.budget():
            key = self._propose_new()
            if key is None:
                if self.pending:  # the race decides on finished runs only
                    break
                taken = {k for k, _ in chosen}
                stats = self.stats()
                open_keys = [k for k in self.contenders() if k not in taken and self._next_seed(k) is not None]
                if not open_keys:
                    break
                key = min(open_keys, key=lambda k: (stats[k]["n"], stats[k]["cost"]))
            seed = self._next_seed(key)
            if seed is None:
                break
            chosen.append((key, seed))
            self.pending.add((key, seed))
        return [(self.candidates[self.keys.index(k)], seed) for k, seed in chosen]

    def tell(self, candidate: dict, seed: int, run: dict) -> None:
        key = candidate_key(candidate)
        self.pending.discard((key, seed))
        self.runs += 1
        value = (run.get("metrics") or {}).get(self.spec.metric)
        if run.get("status") != "done" or value is None:
            self.failed[key] += 1
        else:
            self.results[key].append(float(value))
            cost = (run.get("costs") or {}).get(self.spec.cost)
            if cost is not None:
                self.costs[key] = float(cost)
        trial = self.asked.pop(key, None)
        if trial is not None:
            self._tell_optuna_trial(trial, key)

    def can_continue(self) -> bool:
        """Would the search start another run once its pending runs are back?"""
        if self.runs + len(self.pending) >= self.spec.budget():
            return False
        explored = sum(1 for k in self.keys if self.results[k] or self._next_seed(k) is None)
        if explored < self.explore_limit:
            return True
        return any(self._next_seed(k) is not None for k in self.contenders())

    def summary(self) -> dict[str, Any]:
        """What the dashboard shows: runs used, the grid's size, the current answer, what is still open."""
        answer = self.answer()
        grid = len(self.keys) * len(self.spec.seeds)
        stats = self.stats()
        open_keys = [k for k in self.contenders() if self._next_seed(k) is not None] if answer else []
        out: dict[str, Any] = {
            "runs": self.runs,
            "budget": self.spec.budget(),
            "grid_runs": grid,
            "configurations": len(self.keys),
            "explored": sum(1 for v in self.results.values() if v),
            "open_contenders": len(open_keys),
            "seed_std_points": round(100 * self.pooled_std(), 2),
        }
        if answer:
            best, chosen = answer
            for name, key in (("best", best), ("chosen", chosen)):
                out[name] = {
                    "label": candidate_label(json.loads(key)),
                    "config": json.loads(key),
                    "mean": stats[key]["mean"],
                    "seeds": stats[key]["n"],
                    "cost": stats[key]["cost"],
                }
        return out


# ---------------------------------------------------------------------------------------- the job kind
def submit_search(
    store: RunStore, base: RunConfig, spec: SearchSpec, *, source: str = "live", status: str = "queued"
) -> int:
    """Queue a search (kind "search"); its runs are created as it goes, children of this row."""
    spec.validate()
    for candidate in spec.candidates():  # every configuration must be valid before anything runs
        RunConfig.from_dict({**base.to_dict(), **candidate}).validate()
    config = {"base": base.to_dict(), SEARCH_KEY: asdict(spec), "dataset": base.dataset}
    return store.create_run(
        config, status=status, kind=KIND, source=source, sweep_id="search-" + new_sweep_id().removeprefix("sweep-")
    )


def spec_of(row: dict) -> tuple[RunConfig, SearchSpec]:
    config = row["config"]
    return RunConfig.from_dict(config["base"]), SearchSpec(**config[SEARCH_KEY])


def _run_here(store: RunStore, run_ids: Sequence[int]) -> list[dict]:
    return [execute_run(store, run_id) for run_id in run_ids]


def execute_search(
    store: RunStore,
    run_id: int,
    *,
    echo: Callable[[dict], None] | None = None,
    settings: cluster.ClusterSettings | None = None,
) -> dict:
    """Run a stored search to its end: its runs here, or on the Ray cluster (`settings`, by default the
    dashboard's setting or the environment's) a round at a time."""
    row = claim_job(store, run_id)
    emit = ProgressWriter(store, run_id, echo)
    runner = None
    try:
        base, spec = spec_of(row)
        search = BudgetSearch(spec)
        settings = settings or cluster.cluster_settings(store)
        if settings.address:
            runner = cluster.ClusterRunner(store, settings)
            runner.connect()
        while not store.is_cancel_requested(run_id):
            width = runner.capacity() if runner else 1
            batch = search.ask(width)
            if not batch:
                break
            children = {}
            for candidate, seed in batch:
                config = RunConfig.from_dict({**base.to_dict(), **candidate, "seed": seed})
                child = store.create_run(
                    config.to_dict(),
                    status="running",
                    kind=kind_of(config),
                    source=row["source"],
                    sweep_id=row["sweep_id"],
                    parent_id=run_id,
                )
                children[child] = (candidate, seed)
            if runner:
                for child in children:
                    runner.submit(child, store.get_run(child)["config"])
                done = []
                while runner.in_flight:
                    done += runner.collect(1.0)
            else:
                done = _run_here(store, list(children))
            for child_row in done:
                if child_row.get("id") in children:
                    candidate, seed = children[child_row["id"]]
                    search.tell(candidate, seed, child_row)
            emit({"phase": "search", **search.summary()})
        if store.get_run(run_id) is None:
            return {"id": run_id, "status": "deleted"}
        summary = search.summary()
        emit({"phase": "result", **summary})
        status = "cancelled" if store.is_cancel_requested(run_id) else "done"
        store.finish_run(run_id, status, timings={"runs": summary["runs"]})
        return store.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - a failing search is stored with its reason; its finished runs stay
        return fail_job(store, run_id, exc)
    finally:
        if runner is not None:
            runner.close()


def search_now(
    store: RunStore,
    base: RunConfig,
    spec: SearchSpec,
    *,
    echo=None,
    source: str = "cli",
    settings: cluster.ClusterSettings | None = None,
) -> dict:
    """Search in this process (CLI); created already 'running' so a worker never claims it."""
    run_id = submit_search(store, base, spec, source=source, status="running")
    return execute_search(store, run_id, echo=echo, settings=settings)


def search_state(store: RunStore, run_id: int) -> dict | None:
    """The latest "search" or "result" event of a stored search (what the Budget explorer shows)."""
    for event in reversed(store.progress(run_id)):
        if event.get("phase") in ("search", "result"):
            return event
    return None


register_kind(KIND, execute_search)
