"""One configuration end to end: data -> frozen backbone + prompts -> training -> held-out metrics.

`run_training` is the single entry point used by the CLI, the dashboard's worker and the benchmarks.
It reports progress through a callback and checks a cancel flag between steps; it knows nothing of
the run store (see `jobs.py`) or of Streamlit.

Never recompute what is frozen: the tokens entering the first prompted block are computed once per
image (`PromptedViT.encode_frozen`) and reused every epoch, for training and for evaluation. For a
linear probe that is the pooled feature itself. There is no random augmentation, which is what
makes the cache exact.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from vptdash.engine import backbones, compiled, cost, data, features
from vptdash.engine.precision import PrecisionChoice, block_shapes, choose_precision
from vptdash.engine.prompts import (
    PROMPT_TYPES,
    TUNING_MODES,
    PromptConfigError,
    PromptedViT,
    default_prompt_rank,
    parse_placement,
)
from vptdash.engine.whitening import whitening_for_config

EventCallback = Callable[[dict[str, Any]], None]
CancelCheck = Callable[[], bool]

MAX_PROMPTS = 1000  # beyond this the sequence is mostly prompts and a CPU run takes hours: refuse clearly
LR_AUTO = "auto"
# Learning rates an "auto" run chooses among on the validation split (AdamW; VPT's SGD grid scaled to Adam).
# 1e-2 is the old fixed default: at that rate Adam's first steps move a prompt entry by about a fifth of
# its init spread, and 14 of 30 reference runs predicted one class at some checkpoint.
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
SGD_LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)  # SGD with momentum needs larger steps than Adam for the same move
# Full fine-tuning moves every backbone weight: a prompt-sized grid would wreck it, and a grid of full
# fine-tunes is too slow on a CPU. "auto" there means this fixed rate (stored with source "fixed").
FULL_FINETUNE_LR = 1e-4
# L2 strengths the converged linear probe chooses among on validation: loss = mean cross-entropy +
# l2 / 2 * ||W||^2 on standardised features (scikit-learn's C = 1 / (l2 * n_train)). It reaches 100 because
# few-shot sets have far fewer images than feature dimensions (32 against 384 at 16 shots, binary): the
# first 16-shot ELPV probe chose 1.0, the top of a grid that stopped there.
PROBE_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
PROBE_MAX_ITER = 500
PROBE_GRAD_TOL = 1e-6  # L-BFGS stops when the largest gradient entry of the objective is below this
# A run diverged when its last epoch's mean training loss is above this many times its first epoch's
# (and above chance, ln K), or when any training loss is not finite.
DIVERGENCE_FACTOR = 2.0
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
# "auto": whichever of PRECISIONS measured faster on this machine at the run's shapes (engine.precision).
PRECISION_CHOICES = ("auto", *PRECISIONS)
ENCODE_BATCH = 64
# Inference batch. Measured here (docs/performance.md): with 50-100 prompts, batches of 256 run at half
# the per-image speed of batches of 32 (the attention working set falls out of cache); 32 is never slower.
EVAL_BATCH = 32


MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A configuration that cannot run, with a message that says which setting and why."""


@dataclass
class RunConfig:
    """Everything that defines a run. Stored as a flat JSON dict with every result."""

    backbone: str = backbones.DEFAULT_BACKBONE
    weights: str | None = None
    dataset: str = "elpv-binary"
    cell_type: str | None = None
    resolution: int = 112
    shots: int | None = 16
    test_fraction: float = 0.25
    val_fraction: float = 0.1
    split_seed: int = 0
    tuning: str = "prompt"
    prompt_type: str = "standard"
    prompt_rank: int | None = None  # bilinear prompts only; None = the BPT recipe (shallow 75, deep 50), at most m
    num_prompts: int = 10
    placement: str = "shallow"
    prompt_counts: list[int] | None = None  # per placed block, when they differ (condensed runs)
    prompt_dropout: float = 0.0
    skip_blocks: list[int] = field(default_factory=list)
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamw"
    # "auto": chosen per configuration on the validation split (successive halving over LR_GRID, see
    # `search_schedule`); a number: that fixed rate. Configurations stored before "auto" existed carry
    # their number, so they keep meaning what they meant.
    lr: float | str = LR_AUTO
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    eval_every: int = 0  # validate every N epochs (0 = automatic: about 5 points per run, and the last epoch)
    seed: int = 0
    precision: str = "fp32"
    measure_latency: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def lr_is_auto(self) -> bool:
        return isinstance(self.lr, str) and self.lr.strip().lower() == LR_AUTO

    @property
    def probe_is_converged(self) -> bool:
        """A linear probe with lr "auto" is an L2-regularised logistic regression fitted to convergence
        (L-BFGS) with its L2 strength chosen on validation; with a fixed lr it is the earlier recipe,
        `epochs` of the optimizer on the head (so stored probe runs keep meaning what they meant)."""
        return self.is_linear_probe and self.tuning != "full" and self.lr_is_auto

    @property
    def is_linear_probe(self) -> bool:
        return self.tuning == "linear" or (self.tuning == "prompt" and self.num_prompts == 0)

    @property
    def is_bilinear(self) -> bool:
        return self.prompt_type != "standard" and not self.is_linear_probe and self.tuning == "prompt"

    def effective_prompt_rank(self) -> int | None:
        """The rank c of bilinear prompts (the explicit one, or the recipe's default); None otherwise."""
        if not self.is_bilinear:
            return None
        if self.prompt_rank is not None:
            return int(self.prompt_rank)
        text = str(self.placement).strip().lower()
        blocks = 1 if text == "shallow" else 2 if text == "deep" else len([b for b in text.split(",") if b.strip()])
        count = max(self.prompt_counts) if self.prompt_counts else self.num_prompts
        return default_prompt_rank(count, blocks)

    def family(self) -> str:
        """The colour group on every chart: linear probe, full fine-tune, skip blocks, bilinear,
        condensed, shallow, deep, custom blocks.

        Precedence, first match wins: the baselines; then "skip blocks" (skipping is the lever that
        moves a point along the cost axis, so a skipped network is compared as such whatever its
        prompts: its label still says "bilinear"); then "bilinear" (either bilinear type); then
        "condensed"; then the placement."""
        if self.is_linear_probe:
            return "linear probe"
        if self.tuning == "full":
            return "full fine-tune"
        if self.skip_blocks:
            return "skip blocks"
        if self.is_bilinear:
            return "bilinear"
        if self.prompt_counts is not None:
            return "condensed"
        return self.placement if self.placement in ("shallow", "deep") else "custom blocks"

    def label(self) -> str:
        if self.is_linear_probe:
            text = "linear probe"
        elif self.tuning == "full":
            text = "full fine-tune"
        else:
            kind = f"{self.prompt_type} " if self.is_bilinear else ""  # "50 bilinear-whitened deep prompts"
            if self.prompt_counts is not None:
                text = f"{sum(self.prompt_counts)} condensed {kind}{self.placement} prompts"
            elif self.placement in ("shallow", "deep"):
                text = f"{self.num_prompts} {kind}{self.placement} prompts"
            else:
                text = f"{self.num_prompts} {kind}prompts in blocks {self.placement}"
            if self.is_bilinear:
                text += f" (rank {self.effective_prompt_rank()})"
        if self.skip_blocks:
            text += f", skip {len(self.skip_blocks)} blocks"
        return text

    def validate(self, depth: int | None = None) -> "RunConfig":
        """Reject absurd budgets before anything heavy is loaded."""
        checks = [
            (self.tuning in TUNING_MODES, f"tuning must be one of {TUNING_MODES}"),
            (self.prompt_type in PROMPT_TYPES, f"prompt type must be one of {PROMPT_TYPES}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.precision in PRECISION_CHOICES, f"precision must be one of {PRECISION_CHOICES}"),
            (
                0 <= self.num_prompts <= MAX_PROMPTS,
                f"prompt count must be between 0 and {MAX_PROMPTS}, got {self.num_prompts}",
            ),
            (1 <= self.epochs <= 1000, f"epochs must be between 1 and 1000, got {self.epochs}"),
            (1 <= self.batch_size <= 4096, f"batch size must be between 1 and 4096, got {self.batch_size}"),
            (_lr_ok(self.lr), f"learning rate must be 'auto' or a number in (0, 10), got {self.lr!r}"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (self.warmup_epochs >= 0, "warm-up epochs must be >= 0"),
            (self.eval_every >= 0, "eval_every must be >= 0"),
            (32 <= self.resolution <= 1024, f"resolution must be between 32 and 1024 px, got {self.resolution}"),
            (self.shots is None or self.shots >= 1, f"shots per class must be >= 1, got {self.shots}"),
            (0 < self.test_fraction < 1, "test fraction must be in (0, 1)"),
            (0 <= self.val_fraction < 1 - self.test_fraction, "val fraction must leave room for training images"),
            (0 <= self.prompt_dropout < 1, "prompt dropout must be in [0, 1)"),
            (
                not (self.lr_is_auto and self.tuning != "full" and self.val_fraction == 0),
                "learning rate 'auto' is chosen on the validation split: give a validation fraction above 0 "
                "or a fixed learning rate",
            ),
            (
                self.prompt_rank is None or (isinstance(self.prompt_rank, int) and 1 <= self.prompt_rank <= 4096),
                f"bilinear prompt rank must be an integer between 1 and 4096, got {self.prompt_rank}",
            ),
            (
                self.prompt_rank is None or self.prompt_type != "standard",
                "a prompt rank only applies to bilinear prompts (prompt type 'bilinear' or 'bilinear-whitened')",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for name, value in (("seed", self.seed), ("split seed", self.split_seed)):
            # numpy takes seeds in [0, 2**32): anything else fails deep inside a run, after it was stored
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
                raise ConfigError(f"{name} must be a whole number between 0 and {MAX_SEED}, got {value!r}")
        if self.tuning == "prompt" and self.prompt_counts is None:
            if str(self.placement).strip().lower() in ("", "none"):
                raise ConfigError(
                    "prompt tuning needs a placement: 'shallow', 'deep' or block indices like 0,5,11 "
                    "(for no prompts at all, run a linear probe)"
                )
            try:  # syntax and negative blocks now; the upper bound needs the backbone's depth
                parse_placement(self.placement, depth or 1_000_000)
            except PromptConfigError as exc:
                raise ConfigError(str(exc)) from None
        if depth is not None:
            try:
                parse_placement(self.placement, depth)
            except PromptConfigError as exc:
                raise ConfigError(str(exc)) from None
            bad = [b for b in self.skip_blocks if not 0 <= int(b) < depth]
            if bad:
                raise ConfigError(f"skip blocks {bad} are outside 0..{depth - 1}")
            if len(set(self.skip_blocks)) >= depth:
                raise ConfigError("cannot skip every block")
        return self


# Settings that change only training or data, never the network a run builds or what it executes.
TRAINING_ONLY_SETTINGS = frozenset(
    {
        "weights",
        "shots",
        "test_fraction",
        "val_fraction",
        "split_seed",
        "prompt_dropout",
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "weight_decay",
        "warmup_epochs",
        "eval_every",
        "seed",
        "precision",
        "measure_latency",
    }
)


def architecture_key(config: RunConfig) -> str:
    """What a run's GMACs and latency depend on: every setting except those that only change training or
    data. Runs with equal keys share one fvcore count and one latency measurement (`cost.run_costs`)."""
    return json.dumps({k: v for k, v in config.to_dict().items() if k not in TRAINING_ONLY_SETTINGS}, sort_keys=True)


def _lr_ok(lr: Any) -> bool:
    if isinstance(lr, str):
        return lr.strip().lower() == LR_AUTO
    return isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < 10


def parse_lr(text: str | float) -> float | str:
    """'auto' (any case) or a number: the CLI's and the pages' reading of a learning rate."""
    if isinstance(text, str) and text.strip().lower() == LR_AUTO:
        return LR_AUTO
    return float(text)


def used_lr(config: RunConfig, metrics: dict | None = None) -> float | None:
    """The learning rate a run trained with: the stored choice of an "auto" run, else its fixed rate;
    None for a converged linear probe (L-BFGS has no learning rate) or an "auto" run not finished."""
    stored = (metrics or {}).get("lr")
    if stored is not None:
        return float(stored)
    return None if config.lr_is_auto else float(config.lr)


@dataclass
class RunResult:
    status: str  # "done" | "cancelled"
    metrics: dict[str, Any]
    costs: dict[str, Any]
    timings: dict[str, Any]
    curve: list[dict[str, Any]]
    trainable_state: dict[str, torch.Tensor]
    class_names: list[str]


class RunCancelled(Exception):
    pass


# ---------------------------------------------------------------------------------------- metrics
def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean per-class recall: the honest figure on imbalanced ELPV),
    per-class accuracy, confusion matrix (rows = true class) and the majority-class baseline."""
    predictions, labels = predictions.cpu().long(), labels.cpu().long()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(dim=1)
    per_class = [float(confusion[c, c] / support[c]) if support[c] > 0 else None for c in range(num_classes)]
    present = [value for value in per_class if value is not None]
    total = max(int(support.sum()), 1)
    return {
        "accuracy": float(confusion.diag().sum()) / total,
        "balanced_accuracy": float(np.mean(present)) if present else 0.0,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "majority_accuracy": float(support.max()) / total,
        "n": int(support.sum()),
    }


# ---------------------------------------------------------------------------------------- helpers
def autocast(precision: str):
    """The forward numerics of a run: bf16 autocast on the CPU, or plain fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def training_precision(model: nn.Module, precision: str):
    """The numerics of one training step. bf16: autocast, with attention as explicit matmuls.

    Why: profiled here (docs/performance.md), torch's CPU flash-attention *backward* in bf16 takes about
    4x its fp32 time and half of the whole step, while explicit bf16 matmuls run on the matrix units:
    0.37 s instead of 0.73 s per step (dinov2_s14, 112 px, 10 deep prompts, batch 32). Softmax stays
    fp32 under autocast. Inference keeps the fused kernel (its forward is not slow)."""
    if precision != "bf16":
        yield
        return
    with cost.unfused_attention(model), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up, then cosine decay to zero (the VPT recipe's schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# The head's rate relative to the prompts'. Measured reasoning, not a search: the head's weights start at
# std 0.02 and Adam moves each by about lr per step, so at the grid's smallest rate (3e-4) 80 steps can
# still change a logit by several units: one rate serves both. The head has its own group so the
# schedule sets each group's rate explicitly and a run's events report the head's.
HEAD_LR_SCALE = 1.0


def make_optimizer(config: RunConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The run's optimizer with two parameter groups: "head" (the linear classifier) and "body" (prompts,
    or every backbone weight when fully fine-tuned). Each group's "lr_scale" multiplies the scheduled rate."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    head = [p for name, p in named if name.startswith("head.")]
    body = [p for name, p in named if not name.startswith("head.")]
    groups = [
        group
        for group in (
            {"params": body, "name": "body", "lr_scale": 1.0},
            {"params": head, "name": "head", "lr_scale": HEAD_LR_SCALE},
        )
        if group["params"]
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)


def lr_candidates(config: RunConfig) -> tuple[float, ...]:
    """The rates a run tries: the grid for "auto" (one fixed rate for full fine-tuning), else its own."""
    if not config.lr_is_auto:
        return (float(config.lr),)
    if config.tuning == "full":
        return (FULL_FINETUNE_LR,)
    return SGD_LR_GRID if config.optimizer == "sgd" else LR_GRID


def search_schedule(epochs: int, candidates: int) -> list[tuple[int, int]]:
    """Successive halving: (epoch, survivors after it) at each rung where half of the candidates stop.

    Every candidate follows its own full-length schedule (warm-up, cosine to zero over `epochs`); at
    each rung the better half by validation score goes on, so the winner's model is exactly the model
    a full grid would have trained at that rate, and the search picks the full grid's rate unless the
    winner ranked in the worse half at a rung. Rungs fall at epochs/2^k (rounded up): with 4 candidates
    at a quarter and at half of the epochs, a cost of 2 runs instead of the full grid's 4."""
    rungs: list[tuple[int, int]] = []
    alive = candidates
    halvings = max(0, math.ceil(math.log2(candidates))) if candidates > 1 else 0
    for k in range(halvings, 0, -1):
        epoch = math.ceil(epochs / 2**k)
        if epoch >= epochs or alive <= 1:
            continue
        alive = math.ceil(alive / 2)
        if rungs and rungs[-1][0] == epoch:
            rungs[-1] = (epoch, alive)
        else:
            rungs.append((epoch, alive))
    return rungs


def search_cost_factor(config: RunConfig) -> float:
    """Training cost of this configuration relative to one training run at a fixed rate: what a sweep's
    cost estimate multiplies a run's training time by (cost per epoch x epochs x this factor).

    1.0 for a fixed rate, for full fine-tuning (its "auto" is a fixed rate) and for the converged linear
    probe (its L2 grid refits a logistic regression on cached features: milliseconds next to encoding);
    for an "auto" prompt run, the epochs all candidates train under successive halving over the epochs
    of one run, e.g. 2.0 with 4 candidates and 20 epochs. Validation passes at the rungs are not counted."""
    candidates = lr_candidates(config)
    if len(candidates) == 1 or config.probe_is_converged:
        return 1.0
    epochs = config.epochs
    trained, alive, start = 0, len(candidates), 0
    for epoch, survivors in search_schedule(epochs, len(candidates)):
        trained += alive * (epoch - start)
        alive, start = survivors, epoch
    trained += alive * (epochs - start)
    return trained / epochs


def build_model(config: RunConfig, num_classes: int) -> PromptedViT:
    backbone = backbones.load_backbone(config.backbone, config.weights, config.resolution)
    if config.tuning == "full":
        backbone = copy.deepcopy(backbone)
    config.validate(depth=len(backbone.blocks))
    if config.prompt_counts is not None:
        num_prompts = list(config.prompt_counts)
    else:
        num_prompts = 0 if config.tuning == "linear" else config.num_prompts
    return PromptedViT(
        backbone,
        num_classes,
        num_prompts=num_prompts,
        placement=config.placement,
        prompt_dropout=config.prompt_dropout,
        tuning="linear" if config.is_linear_probe and config.tuning != "full" else config.tuning,
        skip_blocks=config.skip_blocks,
        seed=config.seed,
        **_bilinear_options(config, backbone),
    )


def _bilinear_options(config: RunConfig, backbone) -> dict[str, Any]:
    """prompt_type / prompt_rank for PromptedViT; for bilinear-whitened prompts also the whitening
    matrices of the placed blocks, from the run's TRAIN split images (vptdash.engine.whitening)."""
    if not config.is_bilinear:
        return {}
    options: dict[str, Any] = {"prompt_type": config.prompt_type, "prompt_rank": config.effective_prompt_rank()}
    if config.prompt_type == "bilinear-whitened":
        blocks = parse_placement(config.placement, len(backbone.blocks))
        options["prompt_whitening"] = whitening_for_config(config, backbone, blocks)
    return options


def encode_frozen_split(
    model: PromptedViT, config: RunConfig, image_set, index: torch.Tensor, mean, std
) -> torch.Tensor:
    """The frozen part's output for these images, from the cross-run cache where it pays.

    With prompts from block 0 the frozen part is only the patch embedding: not worth keeping across
    runs. Otherwise (late placements, linear probes) the encodings are shared by every run with the
    same backbone, data, resolution, first prompted block, skipped blocks below it and precision."""

    def encode(which: torch.Tensor) -> torch.Tensor:
        chunks = []
        with autocast(config.precision):
            for start in range(0, len(which), ENCODE_BATCH):
                batch = data.normalize(image_set.images[which[start : start + ENCODE_BATCH]], mean, std)
                chunks.append(model.encode_frozen(batch).float())
        return torch.cat(chunks) if chunks else torch.empty(0)

    first = model.first_prompt_block
    if first == 0:
        return encode(index)
    key = features.encoding_key(
        backbones.backbone_fingerprint(config.backbone, config.weights),
        config.resolution,
        features.dataset_fingerprint(image_set.images, image_set.labels),
        first,
        tuple(sorted(b for b in model.skip_blocks if b < first)),
        config.precision,
    )
    return features.cached_encodings(key, len(image_set.labels), index, encode, persist=first == model.depth)


class SplitInputs:
    """Per split: cached frozen encodings (prompt tuning, linear probe) or raw images (full fine-tuning)."""

    def __init__(
        self, model: PromptedViT, config: RunConfig, image_set, index: torch.Tensor, mean, std, name: str = ""
    ):
        self.model = model
        self.name = name  # "train" | "val" | "test": which split these are (tests check who reads which)
        self.cached = model.tuning != "full"
        if self.cached:
            self.encoded = encode_frozen_split(model, config, image_set, index, mean, std)
        else:
            self.images, self.mean, self.std = image_set.images[index], mean, std

    def __len__(self) -> int:
        return len(self.encoded) if self.cached else len(self.images)

    def for_model(self, model: PromptedViT) -> "SplitInputs":
        """The same inputs (same cached encodings, no copy) read through another model with the same
        frozen part: the candidates of a learning-rate search share one encoding."""
        other = copy.copy(self)
        other.model = model
        return other

    def logits(self, index: torch.Tensor) -> torch.Tensor:
        if self.cached:
            return self.model.forward_from_frozen(self.encoded[index])
        return self.model(data.normalize(self.images[index], self.mean, self.std))


@torch.inference_mode()
def predict(inputs: SplitInputs, precision: str, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    predictions = []
    with autocast(precision):
        for start in range(0, len(inputs), batch_size):
            index = torch.arange(start, min(start + batch_size, len(inputs)))
            predictions.append(inputs.logits(index).argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


@torch.inference_mode()
def evaluate(
    inputs: SplitInputs, labels: torch.Tensor, num_classes: int, precision: str, batch_size: int = EVAL_BATCH
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Predictions on one split and its metrics (`classification_metrics`) plus "loss": the mean
    cross-entropy (NaN on an empty split)."""
    chunks = []
    with autocast(precision):
        for start in range(0, len(inputs), batch_size):
            chunks.append(inputs.logits(torch.arange(start, min(start + batch_size, len(inputs)))).float())
    if not chunks:
        empty = torch.empty(0, dtype=torch.long)
        return empty, {**classification_metrics(empty, empty, num_classes), "loss": float("nan")}
    logits = torch.cat(chunks)
    predictions = logits.argmax(dim=1)
    result = classification_metrics(predictions, labels, num_classes)
    result["loss"] = float(nn.functional.cross_entropy(logits, labels.long()))
    return predictions, result


def detect_collapse(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    epoch_losses: list[float] | None = None,
    nonfinite_step: int | None = None,
) -> tuple[bool, str | None]:
    """(collapsed, reason) of a finished run. Collapsed means either:

    - it predicts a single class for every image of the split given (the validation split, or the
      training split when there is none) while that split holds at least two classes; or
    - its training diverged: a training loss was not finite (`nonfinite_step`), or the mean training
      loss of its last epoch is above DIVERGENCE_FACTOR x the first epoch's mean and above chance
      level ln K (K classes), so a warm-started run whose loss starts low is not flagged for ending
      near chance. `epoch_losses`: the mean training loss of each epoch, in order."""
    if nonfinite_step is not None:
        return True, f"training loss was not finite at step {nonfinite_step}"
    losses = [float(v) for v in (epoch_losses or [])]
    if any(not math.isfinite(v) for v in losses):
        return True, "training loss was not finite"
    if len(losses) >= 2:
        threshold = max(DIVERGENCE_FACTOR * losses[0], math.log(max(2, len(class_names))))
        if losses[-1] > threshold:
            return True, (
                f"training loss diverged: last epoch mean {losses[-1]:.3f} > {DIVERGENCE_FACTOR:g} x first "
                f"epoch mean {losses[0]:.3f} and above chance"
            )
    predictions, labels = predictions.long().cpu(), labels.long().cpu()
    if len(predictions) and len(torch.unique(labels)) >= 2 and len(torch.unique(predictions)) == 1:
        only = int(predictions[0])
        name = class_names[only] if 0 <= only < len(class_names) else str(only)
        return True, f"predicts only {name!r} on every validation image"
    return False, None


def correct_string(predictions: torch.Tensor, labels: torch.Tensor) -> str:
    """'1' where the prediction is right, '0' where wrong, one character per image in split order."""
    return "".join("1" if bool(ok) else "0" for ok in (predictions.long().cpu() == labels.long().cpu()).tolist())


def label_record(labels: torch.Tensor) -> str | list[int]:
    """The true class of each image in split order, stored beside `correct_string` so that balanced accuracy
    can be bootstrapped over the same images: a string of digits when every class index is one digit (656
    bytes for ELPV's test split), else a list of ints."""
    values = [int(v) for v in labels.long().cpu().tolist()]
    return "".join(map(str, values)) if all(0 <= v < 10 for v in values) else values


# ---------------------------------------------------------------------------------------- linear probe
def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    max_iter: int = PROBE_MAX_ITER,
    tol: float = PROBE_GRAD_TOL,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Multinomial logistic regression fitted to convergence with L-BFGS: minimises the mean cross-entropy
    + l2 / 2 * ||W||^2 (the bias is not penalised) on features standardised with the training mean and
    spread (conditioning), in float64. Returns (weight (K, d), bias (K,)) acting on the raw features, and
    {"iterations", "loss", "grad_max"}: the objective's largest gradient entry at the end (a converged
    fit is below `tol`). Convex with a zero start: no seed enters it."""
    x = features.detach().double()
    y = labels.long()
    mean = x.mean(dim=0)
    spread = x.std(dim=0, unbiased=False).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(mean)
    z = (x - mean) / spread
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    calls = [0]

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(z @ weight.T + bias, y) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        calls[0] += 1
        return loss

    optimizer.step(objective)
    final = objective().detach()
    grad_max = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
    raw_weight = (weight.detach() / spread).float()
    raw_bias = (bias.detach() - (weight.detach() / spread) @ mean).float()
    iterations = int(optimizer.state[weight].get("n_iter", calls[0]))  # L-BFGS keeps its count on the first parameter
    return raw_weight, raw_bias, {"iterations": iterations, "loss": float(final), "grad_max": grad_max}


def _rank_key(val: dict[str, Any], collapsed: bool) -> tuple:
    """How candidates (learning rates, L2 strengths) are ordered on validation, best first: a collapsed
    candidate last; then higher balanced accuracy (ELPV is imbalanced: plain accuracy would favour
    answering the majority class); then lower validation cross-entropy (few images: ties are common)."""
    loss = val.get("loss")
    loss = loss if loss is not None and math.isfinite(loss) else math.inf
    return (bool(collapsed), -float(val.get("balanced_accuracy") or 0.0), loss)


# ---------------------------------------------------------------------------------------- the run
def choose_run_precision(config: RunConfig, model: PromptedViT) -> PrecisionChoice:
    """The precision this run trains and evaluates in: the configured one, or for "auto" the faster of
    fp32 and bf16 measured at this run's block shapes (batch x tokens, width, MLP width), once per
    machine (engine.precision caches it)."""
    backbone = model.backbone
    prompts = max(config.prompt_counts) if config.prompt_counts else config.num_prompts
    tokens = model.num_prefix_tokens + int(backbone.patch_embed.num_patches) + prompts
    shapes = block_shapes(
        config.batch_size * tokens, int(backbone.embed_dim), int(backbone.blocks[0].mlp.fc1.out_features)
    )
    return choose_precision(config.precision, shapes)


def encode_ahead(config: RunConfig) -> None:
    """Put what a run of `config` encodes once (the frozen part over its train, validation and test
    images) into the cross-run cache, without training. A waiting worker does this for the meeting
    demo's linear probe, so the first press pays only the probe's fit: encoding the demo's 819 images
    was most of the probe's 13.5 s on a 2-core EPYC (benchmarks/meeting_demo.py)."""
    config.validate()
    image_set, split = data.load_and_split(config)
    model = build_model(config, len(image_set.class_names))
    if model.tuning == "full" or model.first_prompt_block == 0:
        return  # nothing a later run would reuse
    config = replace(config, precision=choose_run_precision(config, model).precision)
    mean, std = model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"]
    for index in (split.train, split.val, split.test):
        encode_frozen_split(model, config, image_set, index, mean, std)


def config_costs(config: RunConfig, model: PromptedViT, *, measure: bool) -> dict[str, Any]:
    """The cost figures a run of `config` stores, through the per-machine cost cache under its architecture
    key: the one call behind a run's cost phase and `count_ahead`, so both read and write the same entries."""
    return cost.run_costs(model, config.resolution, measure=measure, architecture=architecture_key(config))


def count_ahead(config: RunConfig) -> dict[str, Any]:
    """Put fvcore's GMAC count and (when the config measures it) the latency of `config`'s network into the
    per-machine cost cache, without training: a later run of this architecture then finds both there
    ("gmacs_cached", "latency_cached") and skips its cost phase. Both depend only on the architecture
    (and the machine), so a model with untrained prompts counts and times the same. A waiting worker does
    this for the meeting demo's runs while the machine is otherwise idle, which is also the honest time to
    time a forward pass. Returns the figures, as `config_costs` does."""
    config.validate()
    image_set, _ = data.load_and_split(config)
    model = build_model(config, len(image_set.class_names))
    return config_costs(config, model, measure=config.measure_latency)


def latency_ready(config: RunConfig) -> bool:
    """Whether a run of `config` has no latency to time: it measures none, or this machine's cost cache
    holds its architecture's (a run that must time it should do so on a quiet machine)."""
    if not config.measure_latency:
        return True
    image_set, _ = data.load_and_split(config)
    model = build_model(config, len(image_set.class_names))
    return cost.latency_in_cache(model, config.resolution, architecture=architecture_key(config))


def run_training(
    config: RunConfig,
    *,
    on_event: EventCallback | None = None,
    should_cancel: CancelCheck | None = None,
    compute_costs: bool = True,
    initial_state: dict[str, torch.Tensor] | None = None,
    measure_latency: bool | None = None,
) -> RunResult:
    """Train one configuration and evaluate it on held-out images.

    The learning rate: a fixed `config.lr`, or with lr "auto" the best of `lr_candidates` on the
    validation split by successive halving (`search_schedule`). A linear probe with lr "auto" is a
    logistic regression fitted to convergence (`fit_logistic`) with its L2 strength chosen on validation.
    The test split is read once, after every choice is made.

    Metrics add to the test figures: "lr" (the rate used; None for the converged probe), "lr_source"
    ("validation" or "fixed"), "collapsed" and "collapse_reason" (`detect_collapse`), "test_correct"
    (`correct_string` of the test split), "test_labels" (`label_record`) and the search's record
    ("lr_search" or "l2_search").

    Events: {"phase": "setup"|"search"|"train"|"val"|"test"|"cost", ...} with step, epoch, loss, lr,
    val_accuracy, elapsed_s, eta_s; "search" events (several candidates still training) count steps over
    the whole search. Cancelling (should_cancel() -> True, checked between steps) returns status
    "cancelled" with the curve so far and no test metrics. `initial_state` (prompts and head of an earlier
    run, e.g. the prompts kept by condensation) replaces the fresh initialisation of every candidate.
    `measure_latency=False` leaves latency to the caller (a parallel sweep measures it on a quiet
    machine); None follows the config.
    """
    emit = on_event or (lambda event: None)
    cancelled = should_cancel or (lambda: False)
    config.validate()
    started = time.perf_counter()
    torch.manual_seed(config.seed)

    emit({"phase": "setup", "message": "loading data and backbone", "elapsed_s": 0.0})
    image_set, split = data.load_and_split(config)
    num_classes = len(image_set.class_names)
    model = build_model(config, num_classes)
    if initial_state is not None:
        model.load_trainable_state(initial_state)
    precision_choice = choose_run_precision(config, model)
    config = replace(config, precision=precision_choice.precision)  # the rest of the run uses what was chosen
    mean, std = model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"]
    if len(split.val) == 0 and (config.probe_is_converged or len(lr_candidates(config)) > 1):
        raise ConfigError(
            "learning rate 'auto' chooses on the validation split, and this split has no validation images: "
            "raise the validation fraction or give a fixed learning rate"
        )

    emit({"phase": "setup", "message": "encoding frozen layers once", "elapsed_s": time.perf_counter() - started})
    cache_started = time.perf_counter()
    indices = {"train": split.train, "val": split.val, "test": split.test}
    inputs = {name: SplitInputs(model, config, image_set, index, mean, std, name) for name, index in indices.items()}
    labels = {name: image_set.labels[index] for name, index in indices.items()}
    cache_seconds = time.perf_counter() - cache_started

    context = _RunContext(config, inputs, labels, image_set.class_names, emit, cancelled, started)
    if config.probe_is_converged:
        outcome = _fit_probe(context, model)
    else:
        outcome = _train_with_search(context, model, initial_state)
    model = outcome.model
    train_seconds = time.perf_counter() - started
    timings = {
        "train_seconds": train_seconds,
        "cache_seconds": cache_seconds,
        "epoch_seconds_mean": float(np.mean(outcome.epoch_seconds)) if outcome.epoch_seconds else None,
        "epochs_completed": len(outcome.epoch_seconds),
        "epochs_trained_all_candidates": outcome.candidate_epochs,
        "threads": torch.get_num_threads(),
        **context.compile,
    }
    if context.compile["compiled"] and "compile_first_step_s" in context.compile:
        compiled.remember(architecture_key(config), config.batch_size, config.precision)
    split_sizes = split.sizes()
    common = {
        "split_sizes": split_sizes,
        "class_names": image_set.class_names,
        **outcome.choice,
        "precision": precision_choice.precision,
        "precision_reason": precision_choice.reason,
    }
    if outcome.cancelled:
        last_val = outcome.curve[-1] if outcome.curve else {}
        metrics = {**common, "val_accuracy": last_val.get("val_accuracy")}
        return RunResult(
            "cancelled", metrics, {}, timings, outcome.curve, model.trainable_state(), image_set.class_names
        )

    # The final model's validation predictions decide "collapsed"; without a validation split, the training split's.
    # (the last epoch is always validated: its predictions are reused, not computed again)
    check = "val" if len(split.val) else "train"
    check_predictions = outcome.val_predictions
    if check == "train" or check_predictions is None:
        check_predictions, _ = evaluate(inputs[check].for_model(model), labels[check], num_classes, config.precision)
    collapsed, reason = detect_collapse(
        check_predictions, labels[check], image_set.class_names, outcome.epoch_losses, outcome.nonfinite_step
    )
    test_predictions, test = evaluate(inputs["test"].for_model(model), labels["test"], num_classes, config.precision)
    test.pop("loss", None)
    final_val = outcome.curve[-1]  # the last epoch is always validated: no second pass over val for these
    metrics = {
        **common,
        **test,
        "val_accuracy": final_val["val_accuracy"],
        "val_balanced_accuracy": final_val["val_balanced_accuracy"],
        "collapsed": collapsed,
        "collapse_reason": reason,
        "test_correct": correct_string(test_predictions, labels["test"]),
        "test_labels": label_record(labels["test"]),
    }
    emit(
        {
            "phase": "test",
            "accuracy": test["accuracy"],
            "balanced_accuracy": test["balanced_accuracy"],
            "elapsed_s": time.perf_counter() - started,
        }
    )

    costs = {}
    if compute_costs:
        emit(
            {
                "phase": "cost",
                "message": "counting GMACs and measuring latency",
                "elapsed_s": time.perf_counter() - started,
            }
        )
        measure = config.measure_latency if measure_latency is None else measure_latency
        costs = config_costs(config, model, measure=measure)
    return RunResult("done", metrics, costs, timings, outcome.curve, model.trainable_state(), image_set.class_names)


def _validate_after(epoch: int, config: RunConfig) -> bool:
    """Validation costs a forward pass over the whole val split: a few points per run are enough
    for the live curve, and the last epoch is always validated."""
    every = config.eval_every or max(1, math.ceil(config.epochs / 5))
    return epoch % every == 0 or epoch == config.epochs


@dataclass
class _RunContext:
    config: RunConfig
    inputs: dict[str, SplitInputs]
    labels: dict[str, torch.Tensor]
    class_names: list[str]
    emit: EventCallback
    cancelled: CancelCheck
    started: float
    # Whether the training step is compiled (`engine.compiled`), why, and the first compiled step's seconds.
    compile: dict[str, Any] = field(default_factory=lambda: {"compiled": False, "compile_reason": None})
    candidates: list["_Candidate"] = field(default_factory=list)  # every model of the search, compiled or not

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class _Outcome:
    model: PromptedViT
    curve: list[dict[str, Any]]
    epoch_seconds: list[float]
    epoch_losses: list[float]
    choice: dict[str, Any]  # lr, lr_source and the search's record, stored in the metrics
    cancelled: bool = False
    nonfinite_step: int | None = None
    candidate_epochs: int = 0
    val_predictions: torch.Tensor | None = None  # the returned model's, at its last validation


class _Candidate:
    """One model training at one learning rate: its own optimizer, data order, schedule and history."""

    def __init__(self, context: _RunContext, model: PromptedViT, lr: float):
        config = context.config
        self.context, self.model, self.lr = context, model, lr
        self.inputs = {name: inputs.for_model(model) for name, inputs in context.inputs.items()}
        self.optimizer = make_optimizer(config, model, lr)
        self.generator = torch.Generator().manual_seed(config.seed)  # the same data order for every candidate
        self.n_train = len(self.inputs["train"])
        self.steps_per_epoch = max(1, math.ceil(self.n_train / config.batch_size))
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = int(round(config.warmup_epochs * self.steps_per_epoch))
        self.step = 0
        self.epoch = 0
        self.curve: list[dict[str, Any]] = []
        self.epoch_seconds: list[float] = []
        self.epoch_losses: list[float] = []
        self.nonfinite_step: int | None = None
        self.last_val: dict[str, Any] | None = None
        self.last_val_predictions: torch.Tensor | None = None
        self.last_loss = float("nan")
        self.compiled_forward: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _loss(self, index: torch.Tensor, *, through_compiled: bool = False) -> torch.Tensor:
        """One step's loss, its gradients computed."""
        config, inputs = self.context.config, self.inputs["train"]
        with training_precision(self.model, config.precision):
            if through_compiled and self.compiled_forward is not None:
                logits = self.compiled_forward(inputs.encoded[index])
            else:
                logits = inputs.logits(index)
        loss = nn.functional.cross_entropy(logits.float(), self.context.labels["train"][index])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def _compiled_loss(self, index: torch.Tensor) -> torch.Tensor:
        """`_loss`, falling back to eager for good when the compile fails (nothing stepped yet: the
        optimizer steps after this returns, and gradients are set afresh)."""
        first = "compile_first_step_s" not in self.context.compile
        started = time.perf_counter()
        try:
            loss = self._loss(index, through_compiled=True)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the run goes on eagerly
            self.context.compile.update(
                compiled=False, compile_reason=f"compile failed, trained eagerly: {type(error).__name__}: {error}"[:300]
            )
            self.compiled_forward = None
            for other in self.context.candidates:
                other.compiled_forward = None
            return self._loss(index)
        if first:
            self.context.compile["compile_first_step_s"] = time.perf_counter() - started
        return loss

    def train_epoch(self, on_step: Callable[["_Candidate", float, float], None]) -> bool:
        """One epoch; False when cancelled before it ended."""
        config, context = self.context.config, self.context
        epoch_started = time.perf_counter()
        self.model.train()
        order = torch.randperm(self.n_train, generator=self.generator)
        losses = []
        for start in range(0, self.n_train, config.batch_size):
            if context.cancelled():
                return False
            index = order[start : start + config.batch_size]
            lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            full = self.compiled_forward is not None and len(index) == config.batch_size
            loss = self._compiled_loss(index) if full else self._loss(index)
            self.optimizer.step()
            value = float(loss.detach())
            self.step += 1
            if not math.isfinite(value) and self.nonfinite_step is None:
                self.nonfinite_step = self.step
            losses.append(value)
            self.last_loss = value
            on_step(self, value, lr)
        self.model.eval()
        self.epoch += 1
        self.epoch_seconds.append(time.perf_counter() - epoch_started)
        self.epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
        return True

    def validate(self) -> dict[str, Any]:
        context = self.context
        self.last_val_predictions, self.last_val = evaluate(
            self.inputs["val"], context.labels["val"], context.num_classes, context.config.precision
        )
        return self.last_val

    def diverged(self) -> bool:
        return self.nonfinite_step is not None or not math.isfinite(self.last_loss)

    def rank_key(self) -> tuple:
        val = self.last_val or {}
        one_class = False
        if self.last_val_predictions is not None:  # the same rule as `detect_collapse`
            labels = self.context.labels["val"]
            one_class = len(torch.unique(self.last_val_predictions)) == 1 and len(torch.unique(labels)) >= 2
        return _rank_key(val, self.diverged() or one_class)

    def curve_point(self, val: dict[str, Any], started: float, eta_s: float) -> dict[str, Any]:
        return {
            "phase": "val",
            "epoch": self.epoch,
            "step": self.step,
            "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "loss": self.last_loss,
            "elapsed_s": time.perf_counter() - started,
            "eta_s": eta_s,
        }


def _plan_compile(context: _RunContext, candidates: list[_Candidate], total_steps: int) -> None:
    """Compile every candidate's training step when the run is long enough to pay for it (`compiled.decide`)."""
    config = context.config
    context.candidates = candidates
    first = candidates[0]
    full_batches = first.n_train // config.batch_size  # a partial last batch runs eagerly (static shapes)
    images = total_steps * config.batch_size * full_batches // max(1, first.steps_per_epoch)
    key = architecture_key(config)
    decision = compiled.decide(
        config.precision,
        images,
        warm=compiled.compiled_before(key, config.batch_size, config.precision),
        from_cache=first.inputs["train"].cached and full_batches > 0,
    )
    context.compile.update(compiled=decision.compile, compile_reason=decision.reason)
    if not decision.compile:
        return
    context.emit(
        {
            "phase": "setup",
            "message": f"compiling the training step once ({decision.reason})",
            "elapsed_s": time.perf_counter() - context.started,
        }
    )
    for candidate in candidates:
        candidate.compiled_forward = compiled.compile_forward(candidate.model.forward_from_frozen)


def _train_with_search(context: _RunContext, model: PromptedViT, initial_state) -> _Outcome:
    """Train at a fixed rate, or at every candidate rate with successive halving on validation."""
    config, emit, started = context.config, context.emit, context.started
    rates = lr_candidates(config)
    searching = len(rates) > 1
    init = model.trainable_state()
    candidates = [_Candidate(context, model, rates[0])]
    for lr in rates[1:]:
        other = build_model(config, context.num_classes)
        other.load_trainable_state(init)  # every candidate starts from the same prompts and head
        candidates.append(_Candidate(context, other, lr))
    del initial_state  # already in `model`, hence in `init`
    rungs = dict(search_schedule(config.epochs, len(rates))) if searching else {}
    steps_per_epoch = candidates[0].steps_per_epoch
    alive, total = len(candidates), 0
    for epoch in range(1, config.epochs + 1):
        total += alive * steps_per_epoch
        alive = rungs.get(epoch, alive)
    progress = {"step": 0, "total": total}
    _plan_compile(context, candidates, total)
    loop_started = time.perf_counter()
    active = list(candidates)
    record: dict[float, dict[str, Any]] = {}

    def eta() -> float:
        done = max(1, progress["step"])
        # The compile happens once, in the first step: it says nothing about the steps left.
        elapsed = time.perf_counter() - loop_started - context.compile.get("compile_first_step_s", 0.0)
        return max(0.0, elapsed) / done * (progress["total"] - progress["step"])

    def on_step(candidate: _Candidate, loss: float, lr: float) -> None:
        progress["step"] += 1
        if len(active) > 1:
            event = {"phase": "search", "step": progress["step"], "total_steps": progress["total"]}
            event["candidate_lr"] = candidate.lr
        else:  # one model left: its own steps, as a run at a fixed rate reports them
            event = {"phase": "train", "step": candidate.step, "total_steps": candidate.total_steps}
        emit(
            {
                **event,
                "epoch": candidate.epoch + 1,
                "loss": loss,
                "lr": lr,
                "elapsed_s": time.perf_counter() - started,
                "eta_s": eta(),
            }
        )

    def outcome(winner: _Candidate, cancelled: bool) -> _Outcome:
        choice: dict[str, Any] = {"lr": winner.lr, "lr_source": "validation" if searching else "fixed"}
        if searching:
            choice["lr_search"] = [record[lr] for lr in rates if lr in record]
        return _Outcome(
            winner.model,
            winner.curve,
            winner.epoch_seconds,
            winner.epoch_losses,
            choice,
            cancelled=cancelled,
            nonfinite_step=winner.nonfinite_step,
            candidate_epochs=sum(c.epoch for c in candidates),
            val_predictions=winner.last_val_predictions,
        )

    for epoch in range(1, config.epochs + 1):
        for candidate in list(active):
            if not candidate.train_epoch(on_step):
                return outcome(min(active, key=_Candidate.rank_key), cancelled=True)
            at_rung = epoch in rungs or (searching and epoch == config.epochs)
            # While several candidates train, they are validated at the rungs only (a validation pass can
            # cost more than a few-shot epoch); those points are their curves. Then on the usual schedule.
            on_curve = at_rung if len(active) > 1 else _validate_after(epoch, config)
            if not (on_curve or at_rung):
                continue
            val = candidate.validate()
            if on_curve:
                point = candidate.curve_point(val, started, eta())
                candidate.curve.append(point)
                if len(active) == 1:
                    emit(point)
            if at_rung:
                record[candidate.lr] = {
                    "lr": candidate.lr,
                    "epochs": candidate.epoch,
                    "val_accuracy": val["accuracy"],
                    "val_balanced_accuracy": val["balanced_accuracy"],
                    "val_loss": val["loss"],
                    "collapsed": candidate.rank_key()[0],
                }
                emit(
                    {
                        "phase": "search",
                        "step": progress["step"],
                        "total_steps": progress["total"],
                        "epoch": epoch,
                        "message": f"lr {candidate.lr:g}: validation balanced accuracy "
                        f"{100 * val['balanced_accuracy']:.1f}% after {epoch} epochs",
                        "elapsed_s": time.perf_counter() - started,
                        "eta_s": eta(),
                    }
                )
        if epoch in rungs and len(active) > 1:
            active = sorted(active, key=_Candidate.rank_key)[: rungs[epoch]]
            if len(active) == 1:  # the winner's earlier validation points join the live curve now
                for point in active[0].curve:
                    emit(point)
    winner = min(active, key=_Candidate.rank_key)
    if searching and len(active) > 1:
        for point in winner.curve:
            emit(point)
    return outcome(winner, cancelled=False)


def _fit_probe(context: _RunContext, model: PromptedViT) -> _Outcome:
    """The converged linear probe: one L-BFGS logistic regression per L2 strength on the cached pooled
    features, the strength with the best validation score kept."""
    config, emit, started = context.config, context.emit, context.started
    features = context.inputs["train"].encoded
    labels = context.labels["train"]
    record, best, best_key = [], None, None
    fit_started = time.perf_counter()
    train_loss = float("nan")
    for position, l2 in enumerate(PROBE_L2_GRID, 1):
        if context.cancelled():
            curve = []
            return _Outcome(model, curve, [], [], {"lr": None, "lr_source": "validation"}, cancelled=True)
        weight, bias, info = fit_logistic(features, labels, context.num_classes, l2)
        with torch.no_grad():
            model.head.weight.copy_(weight)
            model.head.bias.copy_(bias)
        model.eval()
        predictions, val = evaluate(
            context.inputs["val"].for_model(model), context.labels["val"], context.num_classes, config.precision
        )
        key = _rank_key(val, collapsed=False)
        record.append(
            {
                "l2": l2,
                "val_accuracy": val["accuracy"],
                "val_balanced_accuracy": val["balanced_accuracy"],
                "val_loss": val["loss"],
                "iterations": info["iterations"],
                "grad_max": info["grad_max"],
            }
        )
        emit(
            {
                "phase": "search",
                "step": position,
                "total_steps": len(PROBE_L2_GRID),
                "message": f"L2 {l2:g}: validation balanced accuracy {100 * val['balanced_accuracy']:.1f}%",
                "elapsed_s": time.perf_counter() - started,
            }
        )
        if best_key is None or key < best_key:
            best_key, best = key, (l2, weight, bias, info, val, predictions)
    l2, weight, bias, info, val, predictions = best
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    train_loss = info["loss"]
    steps = len(PROBE_L2_GRID)
    emit(
        {
            "phase": "train",
            "step": steps,
            "total_steps": steps,
            "epoch": config.epochs,
            "loss": train_loss,
            "lr": None,
            "elapsed_s": time.perf_counter() - started,
            "eta_s": 0.0,
        }
    )
    point = {
        "phase": "val",
        "epoch": config.epochs,
        "step": steps,
        "val_accuracy": val["accuracy"],
        "val_balanced_accuracy": val["balanced_accuracy"],
        "loss": train_loss,
        "elapsed_s": time.perf_counter() - started,
        "eta_s": 0.0,
    }
    emit(point)
    choice = {
        "lr": None,  # L-BFGS takes its steps from a line search: no learning rate
        "lr_source": "validation",  # its one hyperparameter, the L2 strength, was chosen there
        "probe_solver": "lbfgs",
        "l2": l2,
        "l2_search": record,
        "probe_iterations": info["iterations"],
        "probe_grad_max": info["grad_max"],
    }
    return _Outcome(model, [point], [time.perf_counter() - fit_started], [], choice, val_predictions=predictions)
