"""Prompt condensation (Kim et al., "Do We Really Need a Large Number of Visual Prompts?", methods.md 2):
score every prompt of a trained run, keep the most important ones, fine-tune only those briefly, and
store the result as a new run linked to its parent.

The score (one number per prompt vector, i.e. per prompt token of one placed block):

    score(P_i) = | sum_d  P_i[d] * dL/dP_i[d] |

the first-order Taylor estimate of how much the training loss L would change if that prompt
vector were set to zero. L is the mean cross-entropy over the parent's *whole training split*
(the same images it was trained on: same data, shots and seed), computed in float32 in eval mode
(prompt dropout off), in a fixed order: no randomness, so the scores are deterministic for a given
run (and bit-identical on the same machine and thread count). The paper's exact formula is not
verified (methods.md); this is the standard gradient-based pruning score and the one shown in the UI.
It is a proxy: removing a token from the sequence is not the same as zeroing it, which is why the
kept prompts are fine-tuned afterwards, and why the accuracy straight after pruning is recorded too
(`accuracy_pruned`).

Ranking is global across blocks: all prompt vectors of all placed blocks are sorted by score
(ties broken by block, then index, so the order is total) and the top `keep` are kept. Therefore:

* `keep` counts prompt *vectors* over all placed blocks. For a shallow run that is exactly `keep`
  prompts, and the condensed run's graph is the graph of a fresh shallow run with `keep` prompts
  (same GMACs, same latency).
* For a deep run (N per block, depth D, N*D vectors) the kept vectors are spread unevenly over the
  blocks; the condensed run is stored with per-block `prompt_counts` (family "condensed"). Its GMACs
  equal those of a fresh run with the same `prompt_counts`. Compared with a fresh *uniform* deep run
  with keep/D prompts per block, the total prompt tokens (sum over blocks) is the same. Deep prompts
  are only keys and values (the next block overwrites their outputs, so they are never computed:
  `vptdash.engine.rows`), which makes each block's cost linear in its prompt count, 2d^2 + 2Rd MACs per
  prompt with R the rows it computes (prefix + patches; 1 in the last block, which computes the CLS
  row only). So the two differ only through the last block: each prompt kept there is 2d(R-1) MACs
  cheaper than one kept earlier.
  Outside the blocks, the final LayerNorm runs on the tokens leaving the last block, so it costs less
  when the last block kept fewer prompts than keep/D. Both differences are tiny (a few MACs per token);
  `tests/test_condense.py` checks them exactly.
* A block left with 0 prompts still drops the previous block's prompt tokens (deep semantics), so the
  condensed model is exactly the parent with the removed prompt tokens taken out of the sequence.

Fine-tuning: the kept prompts and the head start from the parent's values and train for a few
epochs (`RunConfig(prompt_counts=...)`, `run_training(initial_state=...)`) with the parent's recipe
(optimizer, batch size, precision) at a tenth of its learning rate (`FINETUNE_LR_FACTOR`), no warm-up,
cosine decay. Removed prompts are gone. Why a tenth: on ELPV, fine-tuning a condensed deep-50 run at
the parent's AdamW lr 1e-2 without warm-up blew the loss up on the second step (0.6 -> 5.2) and left
a majority-class predictor (77.6 % pruned -> 68.3 % "fine-tuned"); the prompts are already trained,
so the fine-tune is a small correction, not a new training.

Jobs: `submit_condense` queues a run of kind "condense" (parent_id = the parent); the worker's
`jobs.execute_run` hands such rows to `execute_condense`, which scores, selects, writes the final
configuration into the row, fine-tunes and stores the artifact. The parent's row and artifact are
only read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from vptdash.engine import data
from vptdash.engine.prompts import PromptedViT, parse_placement
from vptdash.engine.train import (
    ConfigError,
    RunConfig,
    SplitInputs,
    build_model,
    classification_metrics,
    predict,
    run_training,
    used_lr,
)
from vptdash.methods.attention import load_trained_model
from vptdash.runs.jobs import ProgressWriter, claim_job, fail_job, register_kind

KIND = "condense"  # the job kind of a stored condensation

SCORE_METHOD = "taylor"
SCORE_DESCRIPTION = (
    "First-order Taylor importance |Σ P·∂L/∂P| per prompt vector, L = mean cross-entropy over the run's "
    "training split (float32, eval mode, fixed order: deterministic), ranked globally across blocks."
)
DEFAULT_EPOCHS = 3
FINETUNE_LR_FACTOR = 0.1  # fine-tuning lr = parent lr x this, unless given (see the module docstring)
SCORE_BATCH = 32
CONDENSE_KEYS = ("condense_keep", "condense_keep_fraction", "condense_score", "condense_parent_prompts")


class CondenseError(ConfigError):
    """A condensation that cannot run (no prompts, bad k, parent missing), with a clear message."""


# ---------------------------------------------------------------------------------------- scoring
@dataclass
class PromptScores:
    """One importance score per prompt vector, per placed block."""

    placement: tuple[int, ...]
    scores: list[np.ndarray]  # per placed block (slot order), shape (count,)
    method: str = SCORE_METHOD
    n_images: int = 0
    loss: float = float("nan")

    @property
    def counts(self) -> list[int]:
        return [len(s) for s in self.scores]

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    def ranking(self) -> list[tuple[int, int]]:
        """All (slot, index) pairs, most important first; ties by slot then index (a total order)."""
        entries = [
            (-float(score), slot, index)
            for slot, values in enumerate(self.scores)
            for index, score in enumerate(values)
        ]
        entries.sort()
        return [(slot, index) for _, slot, index in entries]

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": list(self.placement),
            "scores": [s.tolist() for s in self.scores],
            "method": self.method,
            "n_images": self.n_images,
            "loss": self.loss,
        }


def taylor_scores(
    model: PromptedViT, encoded: torch.Tensor, labels: torch.Tensor, batch_size: int = SCORE_BATCH
) -> PromptScores:
    """|sum(P * dL/dP)| per prompt vector; `encoded` = `model.encode_frozen(images)` of the training
    split, L = mean cross-entropy over all of it (float32, eval mode, fixed order)."""
    if not model.placement or not any(model.prompt_counts):
        raise CondenseError("this run has no prompts to condense")
    if not hasattr(model.prompts, "tensors"):
        raise CondenseError("condensation scores free prompt vectors: standard prompts only")
    was_training = model.training
    model.eval()
    params = list(model.prompts.tensors)
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    total_loss, n = 0.0, len(labels)
    if n == 0:
        raise CondenseError("the run's training split is empty")
    try:
        for start in range(0, n, batch_size):
            logits = model.forward_from_frozen(encoded[start : start + batch_size].float())
            loss = nn.functional.cross_entropy(logits.float(), labels[start : start + batch_size], reduction="sum") / n
            batch_grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, grad in zip(grads, batch_grads):
                if grad is not None:
                    acc += grad.float()
            total_loss += float(loss.detach())
    finally:
        model.train(was_training)
    scores = [(p.detach().float() * g).sum(dim=-1).abs().numpy().astype(np.float64) for p, g in zip(params, grads)]
    return PromptScores(tuple(model.placement), scores, SCORE_METHOD, n, total_loss)


def score_model_on_train(model: PromptedViT, config: RunConfig) -> PromptScores:
    """Taylor scores of `model` (already holding the trained prompts) over `config`'s training split."""
    image_set, split = data.load_and_split(config)
    mean, std = model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"]
    chunks = []
    for start in range(0, len(split.train), SCORE_BATCH):
        index = split.train[start : start + SCORE_BATCH]
        chunks.append(model.encode_frozen(data.normalize(image_set.images[index], mean, std)).float())
    encoded = torch.cat(chunks)
    return taylor_scores(model, encoded, image_set.labels[split.train])


_SCORE_CACHE: dict[tuple, PromptScores] = {}  # (store, run, artifact size+mtime) -> scores, this process only
_SCORE_CACHE_SIZE = 4


def _parent_scores(store, parent_id: int, model: PromptedViT, config: RunConfig) -> PromptScores:
    """Scores of a stored parent, remembered per artifact file: condensing one parent to several k
    (the benchmark, a user trying fractions) scores it once. Artifacts are never rewritten in place."""
    path = Path(store.get_run(parent_id)["artifact_path"])
    stat = path.stat()
    key = (str(store.path), int(parent_id), stat.st_size, stat.st_mtime_ns)
    if key not in _SCORE_CACHE:
        while len(_SCORE_CACHE) >= _SCORE_CACHE_SIZE:
            _SCORE_CACHE.pop(next(iter(_SCORE_CACHE)))
        _SCORE_CACHE[key] = score_model_on_train(model, config)
    return _SCORE_CACHE[key]


def score_run(store, run_id: int) -> PromptScores:
    """Taylor scores of a stored run's prompts (its artifact) over its training split."""
    run = load_trained_model(store, run_id)
    return score_model_on_train(run.model, run.config)


# ---------------------------------------------------------------------------------------- selection
def resolve_keep(total: int, keep: int | None = None, keep_fraction: float | None = None) -> int:
    """How many prompt vectors to keep: `keep` itself, or round(keep_fraction * total) (at least 1)."""
    if (keep is None) == (keep_fraction is None):
        raise CondenseError("give exactly one of keep (a count) or keep_fraction (0 < F <= 1)")
    if keep_fraction is not None:
        if not 0 < float(keep_fraction) <= 1:
            raise CondenseError(f"keep fraction must be in (0, 1], got {keep_fraction}")
        keep = max(1, int(round(float(keep_fraction) * total)))
    keep = int(keep)
    if not 1 <= keep <= total:
        raise CondenseError(f"keep must be between 1 and the run's {total} prompt vectors, got {keep}")
    return keep


def select_prompts(scores: PromptScores, keep: int) -> list[list[int]]:
    """Indices kept per placed block (ascending): the global top `keep` by score."""
    keep = resolve_keep(scores.total, keep=keep)
    kept: list[list[int]] = [[] for _ in scores.scores]
    for slot, index in scores.ranking()[:keep]:
        kept[slot].append(index)
    return [sorted(indices) for indices in kept]


def condensed_state(parent_state: dict[str, torch.Tensor], kept: list[list[int]]) -> dict[str, torch.Tensor]:
    """The parent's prompts and head with only the kept prompt vectors (order within a block kept)."""
    state = {}
    for name, value in parent_state.items():
        if name.startswith("prompts.tensors."):
            slot = int(name.rsplit(".", 1)[1])
            state[name] = value[torch.tensor(kept[slot], dtype=torch.long)].clone()
        else:
            state[name] = value.clone()
    missing = [slot for slot in range(len(kept)) if f"prompts.tensors.{slot}" not in parent_state]
    if missing:
        raise CondenseError(f"the parent's artifact lacks prompts for blocks {missing}")
    return state


def condensed_config(
    parent: RunConfig | dict, counts: list[int], *, epochs: int = DEFAULT_EPOCHS, lr: float | None = None
) -> RunConfig:
    """The parent's configuration with per-block prompt counts and a short fine-tuning schedule."""
    base = parent.to_dict() if isinstance(parent, RunConfig) else dict(parent)
    counts = [int(c) for c in counts]
    values = {**base, "prompt_counts": counts, "num_prompts": max(counts), "epochs": int(epochs), "warmup_epochs": 0.0}
    if lr is not None:
        values["lr"] = float(lr)
    return RunConfig.from_dict(values)


# ---------------------------------------------------------------------------------------- jobs
def _parent_checked(store, parent_id: int) -> dict:
    parent = store.get_run(parent_id)
    if parent is None:
        raise CondenseError(f"no run {parent_id}")
    if parent["status"] != "done":
        raise CondenseError(f"run {parent_id} is {parent['status']}: only finished runs can be condensed")
    config = RunConfig.from_dict(parent["config"])
    if config.tuning != "prompt" or config.is_linear_probe:
        raise CondenseError(
            f"run {parent_id} is a {config.family()} run: only prompt-tuned runs have prompts to condense"
        )
    if getattr(config, "prompt_type", "standard") != "standard":
        raise CondenseError(
            f"run {parent_id} has {config.prompt_type} prompts: condensation keeps or drops free "
            "prompt vectors, so it works on standard prompts only"
        )
    if not parent.get("artifact_path"):
        raise CondenseError(
            f"run {parent_id} has no stored prompts (precomputed reference runs keep none): train it here first"
        )
    return parent


def parent_prompt_total(parent_config: dict, depth: int | None = None) -> int | None:
    """Prompt vectors a run holds (count x placed blocks), from its configuration alone."""
    config = RunConfig.from_dict(parent_config)
    if config.prompt_counts is not None:
        return int(sum(config.prompt_counts))
    if config.placement == "shallow":
        return config.num_prompts
    if depth is not None:
        return config.num_prompts * len(parse_placement(config.placement, depth))
    return None


def submit_condense(
    store,
    parent_id: int,
    *,
    keep: int | None = None,
    keep_fraction: float | None = None,
    epochs: int = DEFAULT_EPOCHS,
    lr: float | None = None,
    source: str = "live",
    status: str = "queued",
) -> int:
    """Queue a condensation of run `parent_id`; returns the new run's id (kind "condense").

    `lr`: the fine-tuning learning rate (default: the parent's x FINETUNE_LR_FACTOR).

    The row's configuration is the parent's with the condensation request (`condense_keep` or
    `condense_keep_fraction`) and the fine-tuning schedule; `execute_condense` fills in the
    per-block prompt counts once the prompts are scored."""
    parent = _parent_checked(store, parent_id)
    if (keep is None) == (keep_fraction is None):
        raise CondenseError("give exactly one of keep (a count) or keep_fraction (0 < F <= 1)")
    if keep is not None and int(keep) < 1:
        raise CondenseError(f"keep must be at least 1, got {keep}")
    if keep_fraction is not None and not 0 < float(keep_fraction) <= 1:
        raise CondenseError(f"keep fraction must be in (0, 1], got {keep_fraction}")
    values = {**parent["config"], "epochs": int(epochs), "warmup_epochs": 0.0}
    # the rate the parent trained with: its stored choice when it was "auto", else its fixed rate
    parent_lr = used_lr(RunConfig.from_dict(parent["config"]), parent.get("metrics"))
    if lr is None and parent_lr is None:
        raise CondenseError(f"run {parent_id} stored no learning rate to scale: give the fine-tuning rate")
    values["lr"] = float(lr) if lr is not None else FINETUNE_LR_FACTOR * parent_lr
    config = RunConfig.from_dict(values).validate().to_dict()
    config.update(
        {
            "condense_keep": None if keep is None else int(keep),
            "condense_keep_fraction": None if keep_fraction is None else float(keep_fraction),
            "condense_score": SCORE_METHOD,
            "condense_parent_prompts": parent_prompt_total(parent["config"]),
        }
    )
    return store.create_run(config, status=status, kind=KIND, source=source, parent_id=parent_id)


def _evaluate(model: PromptedViT, config: RunConfig, split_name: str) -> dict[str, Any]:
    """Accuracy of `model` as it is (no training) on one split of its data: the 'pruned, not yet
    fine-tuned' point."""
    image_set, split = data.load_and_split(config)
    index = getattr(split, split_name)
    mean, std = model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"]
    inputs = SplitInputs(model, config, image_set, index, mean, std)
    predictions = predict(inputs, config.precision)
    return classification_metrics(predictions, image_set.labels[index], len(image_set.class_names))


def execute_condense(
    store, run_id: int, *, echo: Callable[[dict], None] | None = None, evaluate_pruned: bool = True
) -> dict:
    """Run a stored condensation job to its end (the worker's path, via `jobs.execute_run`).

    Scores the parent's prompts, keeps the global top k, writes the final configuration into the
    row, fine-tunes the kept prompts and stores the artifact. Never raises for a failing job: the
    run is marked failed with the error, and the row returned. The parent is only read."""
    row = claim_job(store, run_id)
    emit = ProgressWriter(store, run_id, echo)
    cancelled = lambda: store.is_cancel_requested(run_id)  # noqa: E731
    spec = row["config"]
    try:
        parent_id = row["parent_id"]
        if parent_id is None:
            raise CondenseError(f"condense run {run_id} has no parent run")
        parent = _parent_checked(store, parent_id)
        parent_config = RunConfig.from_dict(parent["config"])
        started = time.perf_counter()
        emit(
            {"phase": "setup", "message": f"scoring the prompts of run {parent_id} ({SCORE_METHOD})", "elapsed_s": 0.0}
        )
        parent_state = store.load_artifact(parent_id)
        class_names = [c for c in store.load_artifact_metadata(parent_id).get("class_names", "").split(",") if c]
        model = build_model(parent_config, int(parent_state["head.weight"].shape[0]))
        model.load_trainable_state(parent_state)
        scores = _parent_scores(store, parent_id, model, parent_config)
        score_seconds = time.perf_counter() - started
        keep = resolve_keep(scores.total, spec.get("condense_keep"), spec.get("condense_keep_fraction"))
        kept = select_prompts(scores, keep)
        counts = [len(k) for k in kept]
        emit(
            {
                "phase": "setup",
                "message": f"keeping {keep} of {scores.total} prompt vectors; fine-tuning",
                "elapsed_s": score_seconds,
                "placement": list(scores.placement),
                "prompt_scores": [s.tolist() for s in scores.scores],
                "kept_indices": kept,
            }
        )
        # The row holds the parent's configuration with the fine-tuning schedule (submit_condense).
        config = condensed_config(RunConfig.from_dict(spec), counts, epochs=spec.get("epochs", DEFAULT_EPOCHS))
        config.warmup_epochs = float(spec.get("warmup_epochs", 0.0))
        final = {**config.to_dict(), **{k: spec.get(k) for k in CONDENSE_KEYS}, "condense_parent_prompts": scores.total}
        store.update_config(run_id, final)
        state = condensed_state(parent_state, kept)

        info: dict[str, Any] = {
            "condense_parent_id": parent_id,
            "condense_method": SCORE_METHOD,
            "kept_prompts": keep,
            "parent_prompts": scores.total,
            "kept_fraction": keep / scores.total,
            "kept_counts": counts,
            "kept_indices": kept,
            "score_seconds": score_seconds,
            "score_images": scores.n_images,
            "parent_accuracy": (parent.get("metrics") or {}).get("accuracy"),
            "parent_balanced_accuracy": (parent.get("metrics") or {}).get("balanced_accuracy"),
            "parent_gmacs": (parent.get("costs") or {}).get("gmacs"),
            "parent_latency_ms_b1": (parent.get("costs") or {}).get("latency_ms_b1"),
        }
        if evaluate_pruned and not cancelled():
            pruned = build_model(config, int(parent_state["head.weight"].shape[0]))
            pruned.load_trainable_state(state)
            before = _evaluate(pruned, config, "test")
            info["accuracy_pruned"] = before["accuracy"]
            info["balanced_accuracy_pruned"] = before["balanced_accuracy"]
        result = run_training(config, on_event=emit, should_cancel=cancelled, initial_state=state)
    except Exception as exc:  # noqa: BLE001 - stored with the run, never kills the worker
        return fail_job(store, run_id, exc)
    if result.trainable_state:
        names = result.class_names or class_names
        store.save_artifact(run_id, result.trainable_state, metadata={"class_names": ",".join(names)})
    timings = {**result.timings, "score_seconds": score_seconds}
    store.finish_run(run_id, result.status, metrics={**result.metrics, **info}, costs=result.costs, timings=timings)
    return store.get_run(run_id)


def condense_now(
    store,
    parent_id: int,
    *,
    keep: int | None = None,
    keep_fraction: float | None = None,
    epochs: int = DEFAULT_EPOCHS,
    lr: float | None = None,
    source: str = "cli",
    echo: Callable[[dict], None] | None = None,
    evaluate_pruned: bool = True,
) -> dict:
    """Condense in this process (CLI, benchmarks). Created already 'running' so a worker sharing the
    store never claims it."""
    run_id = submit_condense(
        store, parent_id, keep=keep, keep_fraction=keep_fraction, epochs=epochs, lr=lr, source=source, status="running"
    )
    return execute_condense(store, run_id, echo=echo, evaluate_pruned=evaluate_pruned)


# ---------------------------------------------------------------------------------------- summaries
def condensation_pairs(rows: list[dict]) -> list[dict[str, Any]]:
    """(parent, condensed) pairs among stored runs, with before/after accuracy, GMACs and latency.

    `rows`: run dicts as `RunStore.list_runs` gives them (finished condense runs whose parent is
    also in `rows`, or whose metrics carry the parent's figures)."""
    by_id = {row["id"]: row for row in rows}
    pairs = []
    for row in rows:
        if row.get("kind") != KIND or row.get("status") != "done":
            continue
        metrics, costs = row.get("metrics") or {}, row.get("costs") or {}
        parent = by_id.get(row.get("parent_id"))
        p_metrics = (parent or {}).get("metrics") or {}
        p_costs = (parent or {}).get("costs") or {}
        pairs.append(
            {
                "parent_id": row.get("parent_id"),
                "run_id": row["id"],
                "parent_label": RunConfig.from_dict((parent or {}).get("config") or {}).label() if parent else None,
                "label": RunConfig.from_dict(row.get("config") or {}).label(),
                "parent_prompts": metrics.get("parent_prompts"),
                "kept_prompts": metrics.get("kept_prompts"),
                "kept_counts": metrics.get("kept_counts"),
                "parent_accuracy": p_metrics.get("accuracy", metrics.get("parent_accuracy")),
                "accuracy_pruned": metrics.get("accuracy_pruned"),
                "accuracy": metrics.get("accuracy"),
                "parent_balanced_accuracy": p_metrics.get("balanced_accuracy", metrics.get("parent_balanced_accuracy")),
                "balanced_accuracy": metrics.get("balanced_accuracy"),
                "parent_gmacs": p_costs.get("gmacs", metrics.get("parent_gmacs")),
                "gmacs": costs.get("gmacs"),
                "parent_latency_ms_b1": p_costs.get("latency_ms_b1", metrics.get("parent_latency_ms_b1")),
                "latency_ms_b1": costs.get("latency_ms_b1"),
                "epochs": (row.get("config") or {}).get("epochs"),
            }
        )
    return pairs


__all__ = [
    "CondenseError",
    "PromptScores",
    "SCORE_DESCRIPTION",
    "SCORE_METHOD",
    "condensation_pairs",
    "condense_now",
    "condensed_config",
    "condensed_state",
    "execute_condense",
    "parent_prompt_total",
    "resolve_keep",
    "score_model_on_train",
    "score_run",
    "select_prompts",
    "submit_condense",
    "taylor_scores",
]


register_kind(KIND, execute_condense)
