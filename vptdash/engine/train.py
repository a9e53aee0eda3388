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
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from vptdash.engine import backbones, cost, data, features
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
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
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
    lr: float = 1e-2
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
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (
                0 <= self.num_prompts <= MAX_PROMPTS,
                f"prompt count must be between 0 and {MAX_PROMPTS}, got {self.num_prompts}",
            ),
            (1 <= self.epochs <= 1000, f"epochs must be between 1 and 1000, got {self.epochs}"),
            (1 <= self.batch_size <= 4096, f"batch size must be between 1 and 4096, got {self.batch_size}"),
            (0 < self.lr < 10, f"learning rate must be in (0, 10), got {self.lr}"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (self.warmup_epochs >= 0, "warm-up epochs must be >= 0"),
            (self.eval_every >= 0, "eval_every must be >= 0"),
            (32 <= self.resolution <= 1024, f"resolution must be between 32 and 1024 px, got {self.resolution}"),
            (self.shots is None or self.shots >= 1, f"shots per class must be >= 1, got {self.shots}"),
            (0 < self.test_fraction < 1, "test fraction must be in (0, 1)"),
            (0 <= self.val_fraction < 1 - self.test_fraction, "val fraction must leave room for training images"),
            (0 <= self.prompt_dropout < 1, "prompt dropout must be in [0, 1)"),
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


def _make_optimizer(config: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


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

    def __init__(self, model: PromptedViT, config: RunConfig, image_set, index: torch.Tensor, mean, std):
        self.model = model
        self.cached = model.tuning != "full"
        if self.cached:
            self.encoded = encode_frozen_split(model, config, image_set, index, mean, std)
        else:
            self.images, self.mean, self.std = image_set.images[index], mean, std

    def __len__(self) -> int:
        return len(self.encoded) if self.cached else len(self.images)

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


# ---------------------------------------------------------------------------------------- the run
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

    Events: {"phase": "setup"|"train"|"val"|"test"|"cost", ...} with step, epoch, loss, lr,
    val_accuracy, elapsed_s, eta_s. Cancelling (should_cancel() -> True, checked between steps)
    returns status "cancelled" with the curve so far and no test metrics. `initial_state` (prompts and
    head of an earlier run, e.g. the prompts kept by condensation) replaces the fresh initialisation.
    `measure_latency=False` leaves latency to the caller (a parallel sweep measures it on a quiet
    machine); None follows the config.
    """
    emit = on_event or (lambda event: None)
    cancelled = should_cancel or (lambda: False)
    config.validate()
    started = time.perf_counter()
    torch.manual_seed(config.seed)

    emit({"phase": "setup", "message": "loading data and backbone", "elapsed_s": 0.0})
    image_set = data.load_image_set(config.dataset, config.resolution, cell_type=config.cell_type)
    split = data.split_image_set(
        image_set,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        shots=config.shots,
        split_seed=config.split_seed,
        shot_seed=config.seed,
    )
    num_classes = len(image_set.class_names)
    model = build_model(config, num_classes)
    if initial_state is not None:
        model.load_trainable_state(initial_state)
    mean, std = model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"]

    emit({"phase": "setup", "message": "encoding frozen layers once", "elapsed_s": time.perf_counter() - started})
    cache_started = time.perf_counter()
    indices = {"train": split.train, "val": split.val, "test": split.test}
    inputs = {name: SplitInputs(model, config, image_set, index, mean, std) for name, index in indices.items()}
    labels = {name: image_set.labels[index] for name, index in indices.items()}
    cache_seconds = time.perf_counter() - cache_started

    curve, epoch_seconds = _train_loop(config, model, inputs, labels, num_classes, emit, cancelled, started)
    train_seconds = time.perf_counter() - started
    timings = {
        "train_seconds": train_seconds,
        "cache_seconds": cache_seconds,
        "epoch_seconds_mean": float(np.mean(epoch_seconds)) if epoch_seconds else None,
        "epochs_completed": len(epoch_seconds),
        "threads": torch.get_num_threads(),
    }
    split_sizes = split.sizes()
    common = {"split_sizes": split_sizes, "class_names": image_set.class_names}
    if len(epoch_seconds) < config.epochs:
        last_val = curve[-1] if curve else {}
        metrics = {**common, "val_accuracy": last_val.get("val_accuracy")}
        return RunResult("cancelled", metrics, {}, timings, curve, model.trainable_state(), image_set.class_names)

    test_predictions = predict(inputs["test"], config.precision)
    test = classification_metrics(test_predictions, labels["test"], num_classes)
    final_val = curve[-1]  # the last epoch is always validated (_validate_after): no second pass over val
    metrics = {
        **common,
        **test,
        "val_accuracy": final_val["val_accuracy"],
        "val_balanced_accuracy": final_val["val_balanced_accuracy"],
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
        costs = cost.run_costs(model, config.resolution, measure=measure)
    return RunResult("done", metrics, costs, timings, curve, model.trainable_state(), image_set.class_names)


def _validate_after(epoch: int, config: RunConfig) -> bool:
    """Validation costs a forward pass over the whole val split: a few points per run are enough
    for the live curve, and the last epoch is always validated."""
    every = config.eval_every or max(1, math.ceil(config.epochs / 5))
    return epoch % every == 0 or epoch == config.epochs


def _train_loop(config, model, inputs, labels, num_classes, emit, cancelled, started):
    n_train = len(inputs["train"])
    steps_per_epoch = max(1, math.ceil(n_train / config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    optimizer = _make_optimizer(config, model.trainable_parameters())
    generator = torch.Generator().manual_seed(config.seed)
    curve, epoch_seconds, step = [], [], 0
    loop_started = time.perf_counter()

    for epoch in range(config.epochs):
        epoch_started = time.perf_counter()
        model.train()
        order = torch.randperm(n_train, generator=generator)
        for start in range(0, n_train, config.batch_size):
            if cancelled():
                return curve, epoch_seconds
            index = order[start : start + config.batch_size]
            lr = lr_at(step, total_steps, warmup_steps, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with training_precision(model, config.precision):
                logits = inputs["train"].logits(index)
            loss = nn.functional.cross_entropy(logits.float(), labels["train"][index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss = loss.detach()
            step += 1
            elapsed = time.perf_counter() - loop_started
            emit(
                {
                    "phase": "train",
                    "step": step,
                    "total_steps": total_steps,
                    "epoch": epoch + 1,
                    "loss": float(loss),
                    "lr": lr,
                    "elapsed_s": time.perf_counter() - started,
                    "eta_s": elapsed / step * (total_steps - step),
                }
            )
        model.eval()
        epoch_seconds.append(time.perf_counter() - epoch_started)
        if not _validate_after(epoch + 1, config):
            continue
        val_predictions = predict(inputs["val"], config.precision)
        val = classification_metrics(val_predictions, labels["val"], num_classes)
        point = {
            "phase": "val",
            "epoch": epoch + 1,
            "step": step,
            "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "loss": float(loss),
            "elapsed_s": time.perf_counter() - started,
            "eta_s": (time.perf_counter() - loop_started) / step * (total_steps - step),
        }
        curve.append(point)
        emit(point)
    return curve, epoch_seconds
