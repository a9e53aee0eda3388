"""Task-specific layer skipping (DAS, Wu et al. NeurIPS 2023; methods.md section 5).

Not every block is needed for every task. This module finds k blocks to skip on the user's data;
training the skipped network is then just ``RunConfig(skip_blocks=[...])`` (skipped blocks never run:
the residual stream passes through, see `PromptedViT`), so its GMACs and latency really drop.

The objective (the same for every method, so their answers are comparable):

    loss(S) = cross-entropy on validation images of the frozen backbone with the blocks in S skipped,
              through one linear head fitted (L-BFGS, L2) on the *full* network's pooled training
              features.

It is a conservative proxy: the prompt-tuned network retrains its head (and prompts) after skipping,
so a block whose removal only shifts the features a little costs less than `loss` says. Prompts play
no part in the search (the decision is made before prompt tuning).

* `redundancy`: loss({b}) - loss({}) for every candidate block b (skipped alone).
* greedy (the cheap baseline): repeatedly add the block whose removal gives the lowest loss.
* DAS: every candidate block has a score s, weight sigmoid(s); each step samples several k-subsets
  (Plackett-Luce without replacement, proportional to the weights), rewards each with exp(-loss), and
  moves the scores by REINFORCE (leave-one-out baseline, Adam). After a few hundred steps the k blocks
  with the highest scores are skipped. (DAS proper trains adapters during the search and uses
  mini-batch training losses; here the model is frozen, so the loss of a subnetwork is deterministic
  and computed once over the capped validation set, then remembered: the later steps cost nothing.)

Cheap by construction: the tokens entering the first candidate block are computed once; every later
block (candidate or not) runs per evaluated subnetwork, with the token states entering each block
kept in a bounded LRU cache keyed by the skips below it, so subnetworks sharing their first blocks share
that work; every subnetwork's loss is remembered.

Jobs: `submit_skip_search` queues a run of kind "skip-search" whose config is the run configuration
plus ``skip_search_*`` keys; `jobs.execute_run` hands such rows to `execute_skip_search`. The result
goes into the run's last progress event (phase "result"), never into its metrics: a search is not a
trained model and must not appear on the accuracy-vs-cost charts.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vptdash.engine import backbones, data
from vptdash.engine.train import ConfigError, RunConfig, autocast
from vptdash.runs.jobs import ProgressWriter, claim_job, fail_job, register_kind

KIND = "skip-search"  # the job kind of a stored block-skip search

SKIP_METHODS = ("greedy", "das")
DEFAULT_STEPS = 300
DEFAULT_SAMPLES = 4
DEFAULT_LR = 0.1
MAX_VAL_IMAGES = 64
MAX_TRAIN_IMAGES = 256
HEAD_L2 = 1e-3
CACHE_BYTES = 768 * 2**20
SEARCH_KEYS = ("skip_search_k", "skip_search_method", "skip_search_steps", "skip_search_candidates")
OBJECTIVE = (
    "validation cross-entropy of the frozen backbone with the blocks skipped, through a linear head "
    "fitted on the full network's training features (lower = the block is more redundant)"
)


class SkipSearchError(ConfigError):
    """A search that cannot run (bad k, unknown method, ...), with a clear message."""


# ---------------------------------------------------------------------------------------- result
@dataclass
class SkipSearchResult:
    method: str
    k: int
    skip: list[int]  # the k blocks to skip, sorted
    order: list[int]  # every candidate, most skippable first (greedy: removal order, then by redundancy)
    candidates: list[int]
    depth: int
    base_loss: float
    chosen_loss: float  # loss(skip), same objective for every method
    redundancy: list[float | None]  # per block: loss change when skipped alone (None: not a candidate)
    trace: list[dict[str, Any]] = field(default_factory=list)
    scores: list[float] | None = None  # DAS: final score per candidate (same order as candidates)
    steps: int = 0
    evaluations: int = 0  # distinct subnetworks whose loss was computed
    block_runs: int = 0  # blocks executed over the validation images (the search's compute)
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    stopped: str | None = None  # why a search ended early ("cancelled", "evaluation budget")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SkipSearchResult":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


# ---------------------------------------------------------------------------------------- evaluator
def fit_linear_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = HEAD_L2, iterations: int = 200
) -> nn.Linear:
    """Multinomial logistic regression (mean cross-entropy + l2 * |W|^2), L-BFGS, deterministic."""
    features = features.float()
    head = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(features), labels) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head.requires_grad_(False)


class SubnetEvaluator:
    """loss(skip set) over cached validation tokens, remembered per subnetwork."""

    def __init__(
        self,
        backbone,
        start: int,
        train_tokens: torch.Tensor,
        train_labels: torch.Tensor,
        val_tokens: torch.Tensor,
        val_labels: torch.Tensor,
        num_classes: int,
        *,
        precision: str = "fp32",
        cache_bytes: int = CACHE_BYTES,
    ):
        self.backbone = backbone
        self.depth = len(backbone.blocks)
        self.start = int(start)
        self.precision = precision
        self.val_tokens, self.val_labels = val_tokens, val_labels
        self.num_classes = num_classes
        self.prefix = int(backbone.num_prefix_tokens)
        self.has_class_token = backbone.cls_token is not None
        self.cache_bytes = int(cache_bytes)
        self.states: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.state_bytes = 0
        self.memo: dict[frozenset, float] = {}
        self.block_runs = 0
        self.n_train, self.n_val = len(train_tokens), len(val_tokens)
        self.head = fit_linear_head(self._pooled(train_tokens, frozenset(), cache=False), train_labels, num_classes)

    @property
    def evaluations(self) -> int:
        return len(self.memo)

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.norm(tokens)
        return tokens[:, 0] if self.has_class_token else tokens[:, self.prefix :].mean(dim=1)

    def _key(self, block: int, skip: frozenset) -> tuple:
        return block, tuple(sorted(b for b in skip if b < block))

    def _remember(self, key: tuple, state: torch.Tensor) -> None:
        size = state.numel() * state.element_size()
        if size > self.cache_bytes:
            return
        self.states[key] = state
        self.state_bytes += size
        while self.state_bytes > self.cache_bytes:
            _, old = self.states.popitem(last=False)
            self.state_bytes -= old.numel() * old.element_size()

    @torch.no_grad()
    def _pooled(self, tokens: torch.Tensor, skip: frozenset, cache: bool = True) -> torch.Tensor:
        block, x = self.start, tokens
        if cache:  # resume from the deepest cached state of this subnetwork's prefix
            for j in range(self.depth, self.start, -1):
                key = self._key(j, skip)
                if key in self.states:
                    self.states.move_to_end(key)
                    block, x = j, self.states[key]
                    break
        with autocast(self.precision):
            for index in range(block, self.depth):
                if index not in skip:
                    x = self.backbone.blocks[index](x).float()
                    if cache:
                        self.block_runs += 1
                if cache:
                    self._remember(self._key(index + 1, skip), x)
            return self._pool(x).float()

    def loss(self, skip: Sequence[int] | frozenset) -> float:
        skip = frozenset(int(b) for b in skip)
        if skip not in self.memo:
            logits = self.head(self._pooled(self.val_tokens, skip))
            self.memo[skip] = float(nn.functional.cross_entropy(logits, self.val_labels))
        return self.memo[skip]


def _subset(index: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    if len(index) <= limit:
        return index
    keep = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))[:limit]
    return index[keep.sort().values]


@torch.no_grad()
def prepare_evaluator(
    config: RunConfig,
    candidates: Sequence[int] | None = None,
    *,
    max_val: int = MAX_VAL_IMAGES,
    max_train: int = MAX_TRAIN_IMAGES,
) -> tuple[SubnetEvaluator, list[int]]:
    """The evaluator on a run configuration's data (train split for the head, a seeded subset of at
    most `max_val` validation images for the loss) and the checked candidate list."""
    backbone = backbones.load_backbone(config.backbone, config.weights, config.resolution)
    depth = len(backbone.blocks)
    candidates = check_candidates(candidates, depth)
    image_set, split = data.load_and_split(config)
    if len(split.val) == 0:
        raise SkipSearchError("the skip search needs validation images: set a validation fraction > 0")
    train_index = _subset(split.train, max_train, config.seed)
    val_index = _subset(split.val, max_val, config.seed)
    start = min(candidates)
    mean, std = backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"]

    def tokens_entering_start(index: torch.Tensor) -> torch.Tensor:
        chunks = []
        with autocast(config.precision):
            for first in range(0, len(index), 64):
                x = data.normalize(image_set.images[index[first : first + 64]], mean, std)
                x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x))))
                for block in range(start):
                    x = backbone.blocks[block](x)
                chunks.append(x.float())
        return torch.cat(chunks)

    evaluator = SubnetEvaluator(
        backbone,
        start,
        tokens_entering_start(train_index),
        image_set.labels[train_index],
        tokens_entering_start(val_index),
        image_set.labels[val_index],
        len(image_set.class_names),
        precision=config.precision,
    )
    return evaluator, candidates


def check_candidates(candidates: Sequence[int] | None, depth: int) -> list[int]:
    blocks = list(range(depth)) if candidates is None else sorted({int(b) for b in candidates})
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise SkipSearchError(f"candidate blocks {bad} are outside 0..{depth - 1}")
    if not blocks:
        raise SkipSearchError("no candidate blocks to skip")
    return blocks


def check_k(k: int, candidates: Sequence[int], depth: int) -> None:
    if not 1 <= int(k) <= len(candidates):
        raise SkipSearchError(f"k must be between 1 and the {len(candidates)} candidate blocks, got {k}")
    if int(k) >= depth:
        raise SkipSearchError(f"cannot skip all {depth} blocks")


# ---------------------------------------------------------------------------------------- searches
Progress = Callable[[dict[str, Any]], None]


def redundancy(evaluator: SubnetEvaluator, candidates: Sequence[int]) -> dict[int, float]:
    base = evaluator.loss(())
    return {b: evaluator.loss((b,)) - base for b in candidates}


def greedy_search(
    evaluator: SubnetEvaluator,
    k: int,
    candidates: Sequence[int],
    *,
    on_step: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Drop the block whose removal gives the lowest loss, k times. Returns chosen order and trace."""
    cancelled = should_cancel or (lambda: False)
    chosen: list[int] = []
    trace = [{"step": 0, "skipped": [], "loss": evaluator.loss(())}]
    for step in range(1, k + 1):
        losses = {}
        for block in candidates:
            if block in chosen:
                continue
            if cancelled():
                return {"order": chosen, "trace": trace, "stopped": "cancelled"}
            losses[block] = evaluator.loss(chosen + [block])
        best = min(losses, key=lambda b: (losses[b], b))
        chosen.append(best)
        trace.append(
            {
                "step": step,
                "block": best,
                "skipped": list(chosen),
                "loss": losses[best],
                "candidate_losses": {str(b): v for b, v in losses.items()},
            }
        )
        if on_step:
            on_step({"step": step, "total_steps": k, "loss": losses[best], "block": best})
    return {"order": chosen, "trace": trace, "stopped": None}


def _sample_subset(weights: torch.Tensor, k: int, generator: torch.Generator) -> tuple[list[int], torch.Tensor]:
    """Plackett-Luce: k indices without replacement, each proportional to its weight among those left;
    returns them with the (differentiable) log-probability of that ordered draw."""
    remaining = torch.ones_like(weights, dtype=torch.bool)
    picked, log_prob = [], weights.new_zeros(())
    for _ in range(k):
        masked = torch.where(remaining, weights, torch.zeros_like(weights))
        total = masked.sum()
        index = int(torch.multinomial((masked / total).detach(), 1, generator=generator))
        log_prob = log_prob + torch.log(masked[index] / total)
        picked.append(index)
        remaining = remaining.clone()  # a new mask: the old one is saved for backward
        remaining[index] = False
    return picked, log_prob


def das_search(
    evaluator: SubnetEvaluator,
    k: int,
    candidates: Sequence[int],
    *,
    steps: int = DEFAULT_STEPS,
    samples: int = DEFAULT_SAMPLES,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    max_evaluations: int | None = None,
    on_step: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """REINFORCE over skip scores (see the module docstring). Returns order, scores and trace.
    `max_evaluations` caps the subnetworks this search evaluates for the first time (losses already
    remembered by a shared evaluator are free); reaching it ends the search early."""
    cancelled = should_cancel or (lambda: False)
    candidates = list(candidates)
    scores = torch.zeros(len(candidates), requires_grad=True)
    optimizer = torch.optim.Adam([scores], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    trace, stopped, best = [], None, (math.inf, ())
    samples = max(2, int(samples))
    done, evaluations0 = 0, evaluator.evaluations  # the budget counts this search's new subnetworks only
    for step in range(1, steps + 1):
        if cancelled():
            stopped = "cancelled"
            break
        if max_evaluations is not None and evaluator.evaluations - evaluations0 >= max_evaluations:
            stopped = "evaluation budget"
            break
        weights = torch.sigmoid(scores)
        draws = [_sample_subset(weights, k, generator) for _ in range(samples)]
        losses = [evaluator.loss(candidates[i] for i in picked) for picked, _ in draws]
        rewards = torch.tensor([math.exp(-loss) for loss in losses])
        baseline = (rewards.sum() - rewards) / (samples - 1)  # leave-one-out
        objective = -((rewards - baseline) * torch.stack([lp for _, lp in draws])).mean()
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        for (picked, _), loss in zip(draws, losses):
            if loss < best[0]:
                best = (loss, tuple(sorted(candidates[i] for i in picked)))
        done = step
        point = {
            "step": step,
            "mean_loss": float(sum(losses) / len(losses)),
            "best_loss": best[0],
            "best_skip": list(best[1]),
            "evaluations": evaluator.evaluations,
            "weights": [round(float(w), 4) for w in torch.sigmoid(scores.detach())],
        }
        trace.append(point)
        if on_step:
            on_step(
                {"step": step, "total_steps": steps, "loss": point["mean_loss"], "evaluations": evaluator.evaluations}
            )
    final = scores.detach()
    order = [candidates[i] for i in sorted(range(len(candidates)), key=lambda i: (-float(final[i]), candidates[i]))]
    return {"order": order, "trace": trace, "scores": final.tolist(), "steps": done, "stopped": stopped}


def search(
    config: RunConfig,
    k: int,
    method: str = "greedy",
    *,
    candidates: Sequence[int] | None = None,
    steps: int = DEFAULT_STEPS,
    samples: int = DEFAULT_SAMPLES,
    max_val: int = MAX_VAL_IMAGES,
    max_evaluations: int | None = None,
    with_redundancy: bool = True,
    evaluator: SubnetEvaluator | None = None,
    on_event: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> SkipSearchResult:
    """Find k blocks to skip on a run configuration's data. `evaluator` (from `prepare_evaluator`)
    may be shared between calls: remembered losses are then reused (e.g. greedy and DAS, or several k)."""
    if method not in SKIP_METHODS:
        raise SkipSearchError(f"method must be one of {SKIP_METHODS}, got {method!r}")
    if steps < 1:
        raise SkipSearchError(f"steps must be >= 1, got {steps}")
    config.validate()
    emit = on_event or (lambda event: None)
    started = time.perf_counter()
    emit({"phase": "setup", "message": "encoding the validation images once", "elapsed_s": 0.0})
    if evaluator is None:
        evaluator, candidates = prepare_evaluator(config, candidates, max_val=max_val)
    else:
        candidates = check_candidates(
            candidates if candidates is not None else range(evaluator.start, evaluator.depth), evaluator.depth
        )
        if min(candidates) < evaluator.start:
            raise SkipSearchError(
                f"this evaluator caches tokens entering block {evaluator.start}: "
                f"candidates must be >= {evaluator.start}"
            )
    check_k(k, candidates, evaluator.depth)
    evaluations0, runs0 = evaluator.evaluations, evaluator.block_runs

    def on_step(info: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - started
        done, total = info["step"], info["total_steps"]
        emit(
            {
                "phase": "search",
                **info,
                "elapsed_s": elapsed,
                "eta_s": elapsed / max(done, 1) * (total - done),
                "message": f"{method} search, step {done}/{total}",
            }
        )

    base = evaluator.loss(())
    red = redundancy(evaluator, candidates) if with_redundancy or method == "greedy" else {}
    if method == "greedy":
        found = greedy_search(evaluator, k, candidates, on_step=on_step, should_cancel=should_cancel)
        order = found["order"] + sorted((b for b in candidates if b not in found["order"]), key=lambda b: (red[b], b))
        scores, step_count = None, len(found["order"])
    else:
        found = das_search(
            evaluator,
            k,
            candidates,
            steps=steps,
            samples=samples,
            seed=config.seed,
            max_evaluations=max_evaluations,
            on_step=on_step,
            should_cancel=should_cancel,
        )
        order, scores, step_count = found["order"], found["scores"], found["steps"]
    skip = sorted(order[:k])
    return SkipSearchResult(
        method=method,
        k=int(k),
        skip=skip,
        order=order,
        candidates=list(candidates),
        depth=evaluator.depth,
        base_loss=base,
        chosen_loss=evaluator.loss(skip) if found["stopped"] != "cancelled" else float("nan"),
        redundancy=[red.get(b) for b in range(evaluator.depth)],
        trace=found["trace"],
        scores=scores,
        steps=step_count,
        evaluations=evaluator.evaluations - evaluations0,
        block_runs=evaluator.block_runs - runs0,
        seconds=time.perf_counter() - started,
        n_train=evaluator.n_train,
        n_val=evaluator.n_val,
        stopped=found["stopped"],
    )


def estimated_gmacs(
    depth: int,
    block_gmacs: float,
    k: int,
    method: str,
    *,
    n_val: int = MAX_VAL_IMAGES,
    n_train: int = 64,
    candidates: int | None = None,
    steps: int = DEFAULT_STEPS,
    samples: int = DEFAULT_SAMPLES,
) -> float:
    """A rough upper estimate of a search's compute (GMACs), to decide whether it can run inline.
    `block_gmacs`: one block on one image. Evaluations run about half the blocks (prefix cache)."""
    n = depth if candidates is None else candidates
    evaluations = 1 + n + (sum(n - i for i in range(1, k)) if method == "greedy" else min(steps * samples, 200))
    return (n_train * depth + evaluations * n_val * depth / 2) * block_gmacs


# ---------------------------------------------------------------------------------------- jobs
def search_spec(row_config: dict) -> dict[str, Any]:
    return {key.removeprefix("skip_search_"): row_config.get(key) for key in SEARCH_KEYS}


def submit_skip_search(
    store,
    config: RunConfig,
    k: int,
    method: str = "greedy",
    *,
    steps: int = DEFAULT_STEPS,
    candidates: Sequence[int] | None = None,
    source: str = "live",
    status: str = "queued",
) -> int:
    """Queue a search (kind "skip-search"); the row's config is the run configuration + skip_search_* keys."""
    config.validate()
    if method not in SKIP_METHODS:
        raise SkipSearchError(f"method must be one of {SKIP_METHODS}, got {method!r}")
    if int(k) < 1:
        raise SkipSearchError(f"k must be >= 1, got {k}")
    if steps < 1:
        raise SkipSearchError(f"steps must be >= 1, got {steps}")
    row = {
        **config.to_dict(),
        "skip_search_k": int(k),
        "skip_search_method": method,
        "skip_search_steps": int(steps),
        "skip_search_candidates": None if candidates is None else sorted(int(b) for b in candidates),
    }
    return store.create_run(row, status=status, kind=KIND, source=source)


def execute_skip_search(store, run_id: int, *, echo: Callable[[dict], None] | None = None) -> dict:
    """Run a stored search to its end (the worker's path, via `jobs.execute_run`). Never raises for a
    failing search: the row is marked failed with the error, and returned."""
    row = claim_job(store, run_id)
    emit = ProgressWriter(store, run_id, echo)
    last = [0.0]

    def thinned(event: dict) -> None:  # search steps are fast once losses are remembered
        now = time.monotonic()
        if event.get("phase") == "search" and event.get("step") != event.get("total_steps") and now - last[0] < 0.5:
            return
        last[0] = now
        emit(event)

    spec = search_spec(row["config"])
    try:
        result = search(
            RunConfig.from_dict(row["config"]),
            int(spec["k"] or 0),
            spec["method"] or "greedy",
            candidates=spec["candidates"],
            steps=int(spec["steps"] or DEFAULT_STEPS),
            on_event=thinned,
            should_cancel=lambda: store.is_cancel_requested(run_id),
        )
    except Exception as exc:  # noqa: BLE001 - stored with the run, never kills the worker
        return fail_job(store, run_id, exc)
    store.append_progress(run_id, {"phase": "result", "skip_search": result.to_dict()})
    status = "cancelled" if result.stopped == "cancelled" else "done"
    store.finish_run(
        run_id,
        status,
        timings={"search_seconds": result.seconds, "evaluations": result.evaluations, "block_runs": result.block_runs},
    )
    return store.get_run(run_id)


def skip_search_now(
    store,
    config: RunConfig,
    k: int,
    method: str = "greedy",
    *,
    steps: int = DEFAULT_STEPS,
    candidates: Sequence[int] | None = None,
    source: str = "cli",
    echo: Callable[[dict], None] | None = None,
) -> dict:
    """Search in this process (CLI); created already 'running' so a worker never claims it."""
    run_id = submit_skip_search(
        store, config, k, method, steps=steps, candidates=candidates, source=source, status="running"
    )
    return execute_skip_search(store, run_id, echo=echo)


def stored_result(store, run_id: int) -> SkipSearchResult | None:
    """The result of a finished search job (its last "result" progress event), or None."""
    for event in reversed(store.progress(run_id)):
        if event.get("phase") == "result" and isinstance(event.get("skip_search"), dict):
            return SkipSearchResult.from_dict(event["skip_search"])
    return None


def search_rows(store, *, dataset: str | None = None, status: str | None = None) -> list[dict]:
    """Search jobs, newest first."""
    return store.list_runs(kind=KIND, dataset=dataset, status=status)


register_kind(KIND, execute_skip_search)
