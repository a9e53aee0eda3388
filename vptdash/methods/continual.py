"""Continual learning: classes arrive task after task; prompts and a growing head learn them in turn.

Class-incremental protocol (methods.md, section 4). The classes of a data set are split, in a
user-chosen order, into T tasks. One set of prompts and one growing head are trained task after task
on a frozen backbone; after each task every task seen so far is tested with the head covering *all*
classes seen so far (no task identity at test time). `A[i][j]` is the accuracy on task j's test
images after training task i.

Methods:
- "sequential": plain VPT, task after task (the forgetting baseline).
- "nsp2": VPT-NSP2 (Lu et al., NeurIPS 2024). After each task the covariances of the two consistency
  conditions are accumulated per prompted block over that task's training images; while training a
  later task every prompt update that Adam proposes is projected, ``dP = B2 @ dP @ B1``, onto their
  null spaces (nullity at the elbow of the spectrum, blended ``eta * B + (1 - eta) * I``), and a
  LayerNorm consistency loss keeps each prompt token's mean and standard deviation where the
  previous task left them.
- "joint": one training on all tasks' data at once (the upper bound; only the last row of `A`).

Choices, each with its reason:
- Head: one linear block per task. A task trains only its own block, with the loss over its own
  classes; the blocks of earlier tasks are frozen (as in the NSP2 code). At test time the blocks are
  concatenated and the prediction is the argmax over every class seen so far. Each task therefore
  needs at least two classes (ELPV's 4 classes give T <= 2).
- The condition matrices are the exact first-order ones for a pre-LN timm block: per head h, the rows
  of ``Q_X W_k,h diag(gamma)``, centred (LayerNorm ignores a shift of a prompt token), stacked over
  heads (the affinity condition); and ``S_P diag(1/sigma_P)``, the attention of image queries (CLS
  and patches) on the prompt keys, scaled by each prompt's LayerNorm sigma (the aggregation
  condition). With the LayerNorm statistics held by the consistency loss, an update in both null
  spaces leaves that block's image-token outputs unchanged to first order.
- Deep prompts: every prompted block is protected with its own projectors. Shallow prompts: only
  block 0 is protected (later blocks see changed prompt outputs), so the guarantee is weaker there.

Two recipes (`RECIPES`, `recipe_config`):
- "official" (the default): the official implementation's choices (methods.md, section 4): projectors
  blended with the identity by `eta`, then divided by their Frobenius norm (a step about sqrt(nullity)
  smaller); 4 prompts in every block, init uniform(-1, 1); logits divided by a temperature (28) in the
  loss; longer training per task on augmented images (random resized crop, flip); class order shuffled
  with the seed. On a CPU a task still trains far fewer steps than the paper's ~2,000.
- "compact": the earlier, CPU-friendly variant: true projectors (no normalisation), prompts in the last
  4 blocks (the blocks before them run once per image through the shared frozen-encoding cache), VPT's
  xavier-style init, no temperature, 10 epochs without augmentation, classes in folder order.

Metrics (`accuracy_metrics`): average accuracy after the last task (mean over tasks of the last
row), average forgetting (mean over old tasks of the best earlier accuracy minus the last one), and
the average incremental accuracy. Diagnostics beside them say whether prompts or heads forgot: the
same figures with task identity given ("task-IL": argmax within the task's own classes); the learning
accuracy (each task tested right after it was learned: the diagonal of `A`); nearest-class-mean
accuracy over all classes on the pooled features, before the first task and after the last (class means
from the training images, no head involved: a drop means the features themselves got worse for old
classes); the same among each task's own classes, with untrained prompts and after every task (what the
prompts added to the frozen features, and whether later tasks took it away); and `feature_drift`, how far
the pooled features of old tasks' test images moved.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from vptdash.engine import backbones, data, paths, train
from vptdash.engine.prompts import PromptConfigError, PromptedViT, parse_placement
from vptdash.engine.train import ConfigError
from vptdash.methods import cues
from vptdash.runs.jobs import ProgressWriter, claim_job, fail_job, register_kind
from vptdash.runs.store import RunStore

EventCallback = Callable[[dict[str, Any]], None]
CancelCheck = Callable[[], bool]

METHODS = ("sequential", "nsp2", "joint")
RECIPES: dict[str, dict[str, Any]] = {
    # Settings that differ between the recipes; every other field keeps the dataclass default.
    "official": dict(
        placement="deep",
        prompt_init="uniform-1",
        projector_norm="frobenius",
        temperature=28.0,
        augment=True,
        shuffle_classes=True,
        epochs=20,
    ),
    "compact": dict(
        placement="last4",
        prompt_init="vpt",
        projector_norm="none",
        temperature=1.0,
        augment=False,
        shuffle_classes=False,
        epochs=10,
    ),
}
RECIPE_LABELS = {
    "official": "Official NSP2 recipe (all blocks, Frobenius-normalised projector, temperature, augmentation)",
    "compact": "Compact variant (last 4 blocks, plain projector, no temperature or augmentation)",
}
PROMPT_INITS = ("uniform-1", "vpt")
PROJECTOR_NORMS = ("frobenius", "none")
METHOD_LABELS = {
    "sequential": "Sequential fine-tuning",
    "nsp2": "Null-space prompts (NSP2)",
    "joint": "Joint training (upper bound)",
}
KIND = "continual"
SUMMARY_KEYS = (
    "avg_accuracy",
    "forgetting",
    "avg_balanced_accuracy",
    "forgetting_balanced",
    "avg_accuracy_task_il",
    "forgetting_task_il",
    "learning_accuracy",
    "ncm_accuracy",
    "ncm_accuracy_initial",
    "avg_ncm_task_il",
    "ncm_forgetting_task_il",
    "ncm_learning_task_il",
    "avg_ncm_task_il_untrained",
)
# Ways to read the results: (matrix, average after the last task, forgetting, what it means).
VIEWS = {
    "class-incremental": (
        "accuracy_matrix",
        "avg_accuracy",
        "forgetting",
        "Accuracy, predicting among every class seen so far (no task identity).",
    ),
    "balanced": (
        "balanced_accuracy_matrix",
        "avg_balanced_accuracy",
        "forgetting_balanced",
        "Mean recall over the task's classes, predicting among every class seen so far (honest on imbalanced ELPV).",
    ),
    "task given": (
        "task_il_matrix",
        "avg_accuracy_task_il",
        "forgetting_task_il",
        "Accuracy when the task is known and the prediction is among its own classes: what the "
        "features still know, without the confusion between tasks.",
    ),
    "features": (
        "ncm_task_il_matrix",
        "avg_ncm_task_il",
        "ncm_forgetting_task_il",
        "Nearest class mean among the task's own classes (class means of the pooled training features, no "
        "head), measured after each task: a drop is the features forgetting what separated an old task's "
        "classes. Frozen features would give a constant column.",
    ),
}
EVAL_BATCH = 128
DEFAULT_ETA = 0.97

# A generated "new classes arrive" scenario: procedurally drawn textures, one class per pattern.
GENERATED_DATASETS = {
    "textures-10": "Generated textures, 10 classes (stripes at 4 angles, checks, dots, rings, grid, blobs, "
    "speckle), 60 images each: 5 tasks of 2 classes",
    "textures-30": "Generated textures, 30 classes (the 10 patterns at 3 scales: coarse, medium, fine), "
    "40 images each: 5 tasks of 6 classes",
    cues.NAME: "Generated cue conflict, 30 classes (5 families of 6: stripe angle, ring centre, dot density, "
    "stripe frequency, plaid angle), 40 images each: 5 tasks, one family each, in an order shuffled with the seed",
}
# Sets whose classes come in groups meant to arrive together: a shuffled order keeps each group one task.
TASK_GROUPS = {cues.NAME: cues.family_groups()}
# Classes per generated set: (pattern, scale) pairs; scale None = the original frequency range.
ORIGINAL_BAND = (5.0, 9.0)  # textures-10's frequency range: its images stay as they were drawn
TEXTURE_SCALES = {"coarse": (2.5, 4.5), "medium": (5.0, 8.0), "fine": (9.5, 14.0)}
# Why ELPV cannot test class-incremental learning (shown on the page beside the data set choice).
ELPV_NOTE = (
    "ELPV has 4 ordinal classes: at most 2 tasks of 2 classes. With 2-class tasks the old heads' logit "
    "scale decides most of the measured forgetting, so it cannot show what null-space prompts do; use a "
    "generated set with 5 tasks of several classes (textures-30) for that."
)
_GENERATED_VERSION = 2
TEXTURE_CLASSES = [
    "stripes-0",
    "stripes-45",
    "stripes-90",
    "stripes-135",
    "checks",
    "dots",
    "rings",
    "grid",
    "blobs",
    "speckle",
]


# ============================================================================ configuration
@dataclass
class ContinualConfig:
    """One continual experiment: one method, one seed. Stored flat with the run (kind 'continual')."""

    backbone: str = backbones.DEFAULT_BACKBONE
    weights: str | None = None
    dataset: str = "elpv"
    cell_type: str | None = None
    resolution: int = 112
    shots: int | None = 32  # training images per class
    test_fraction: float = 0.25
    max_test_per_class: int | None = None  # cap on test images per class (None: the whole test split)
    split_seed: int = 0
    tasks: int = 2
    class_order: list[int] | None = None  # class indices in arrival order (None: see shuffle_classes)
    method: str = "nsp2"
    recipe: str = "official"  # a name from RECIPES: which settings below follow which recipe (for display)
    num_prompts: int = 4
    placement: str = "deep"  # "shallow" | "deep" | "lastK" | block list "8,9,10,11"
    prompt_init: str = "uniform-1"  # "uniform-1": uniform(-1, 1) (official NSP2); "vpt": VPT's xavier bound
    projector_norm: str = "frobenius"  # "frobenius": projector / its Frobenius norm (official); "none"
    temperature: float = 28.0  # logits / temperature in the loss (official: 28 for CIFAR-100)
    augment: bool = True  # random resized crop + horizontal flip of training images, every step
    shuffle_classes: bool = True  # class_order None: classes shuffled with the seed (else folder order)
    epochs: int = 20  # per task (joint: over all tasks' data)
    batch_size: int = 16  # few-shot tasks: 2 classes x 32 shots = 4 steps per epoch
    lr: float = 1e-2
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    eta: float = DEFAULT_ETA
    null_threshold: float | None = None  # None: nullity at the elbow; else keep s <= threshold * s_max
    ln_loss_weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ContinualConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def label(self) -> str:
        recipe = "" if self.recipe == "official" else f" ({self.recipe} recipe)"
        return f"{METHOD_LABELS.get(self.method, self.method)}{recipe}, {self.tasks} tasks, seed {self.seed}"

    def arrival_order(self, num_classes: int) -> list[int] | None:
        """The class order tasks take: the given one, else shuffled with the seed (a set in `TASK_GROUPS`
        split into as many tasks as it has groups: the groups' order and each group's classes shuffled, so
        that each group stays one task), else None (folder order)."""
        if self.class_order is not None:
            return [int(c) for c in self.class_order]
        if self.shuffle_classes:
            rng = np.random.default_rng([self.seed, 1993])
            groups = TASK_GROUPS.get(self.dataset)
            if groups and len(groups) == self.tasks and sum(map(len, groups)) == num_classes:
                return [int(c) for g in rng.permutation(len(groups)) for c in rng.permutation(groups[g])]
            return [int(c) for c in rng.permutation(num_classes)]
        return None

    def validate(self) -> "ContinualConfig":
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (1 <= self.tasks <= 100, f"number of tasks must be between 1 and 100, got {self.tasks}"),
            (
                1 <= self.num_prompts <= train.MAX_PROMPTS,
                f"prompt count must be between 1 and {train.MAX_PROMPTS}, got {self.num_prompts}",
            ),
            (0.0 <= self.eta <= 1.0, f"eta must be in [0, 1], got {self.eta}"),
            (self.recipe in RECIPES, f"recipe must be one of {tuple(RECIPES)}, got {self.recipe!r}"),
            (self.prompt_init in PROMPT_INITS, f"prompt init must be one of {PROMPT_INITS}, got {self.prompt_init!r}"),
            (
                self.projector_norm in PROJECTOR_NORMS,
                f"projector normalisation must be one of {PROJECTOR_NORMS}, got {self.projector_norm!r}",
            ),
            (
                math.isfinite(self.temperature) and self.temperature > 0,
                f"temperature must be > 0, got {self.temperature}",
            ),
            (
                self.null_threshold is None or 0.0 <= self.null_threshold < 1.0,
                f"null threshold must be None (elbow) or in [0, 1), got {self.null_threshold}",
            ),
            (self.ln_loss_weight >= 0, "LayerNorm loss weight must be >= 0"),
            (self.max_test_per_class is None or self.max_test_per_class >= 1, "max test images per class must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.run_config().validate()
        return self

    def run_config(self, depth: int | None = None) -> train.RunConfig:
        """The single-run configuration that builds the same prompted model (and keys the frozen cache).
        Without `depth` the placement is a stand-in ("deep"): enough to validate the other settings."""
        placement = "deep" if depth is None else ",".join(map(str, resolve_placement(self.placement, depth)))
        return train.RunConfig(
            backbone=self.backbone,
            weights=self.weights,
            dataset=self.dataset,
            cell_type=self.cell_type,
            resolution=self.resolution,
            shots=self.shots,
            test_fraction=self.test_fraction,
            val_fraction=0.0,
            split_seed=self.split_seed,
            tuning="prompt",
            num_prompts=self.num_prompts,
            placement=placement,
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="adamw",
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            seed=self.seed,
            precision=self.precision,
            measure_latency=False,
        )


def recipe_config(recipe: str = "official", **overrides: Any) -> ContinualConfig:
    """A configuration following a named recipe (`RECIPES`), with any field overridden."""
    if recipe not in RECIPES:
        raise ConfigError(f"recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
    return ContinualConfig(**{**RECIPES[recipe], "recipe": recipe, **overrides})


def resolve_placement(placement: str, depth: int) -> tuple[int, ...]:
    """'lastK' -> the last K blocks; anything else as `prompts.parse_placement`."""
    text = str(placement).strip().lower()
    if text.startswith("last"):
        try:
            count = int(text[4:])
        except ValueError:
            raise ConfigError(f"placement {placement!r}: expected 'lastK' with K a number of blocks") from None
        if not 1 <= count <= depth:
            raise ConfigError(f"placement {placement!r}: K must be between 1 and {depth} (the backbone's blocks)")
        return tuple(range(depth - count, depth))
    try:
        blocks = parse_placement(placement, depth)
    except PromptConfigError as exc:
        raise ConfigError(str(exc)) from None
    if not blocks:
        raise ConfigError("continual learning needs prompts in at least one block")
    return blocks


def continual_configs(base: ContinualConfig, methods: Sequence[str], seeds: Sequence[int]) -> list[ContinualConfig]:
    """One configuration per (seed, method), every one validated."""
    configs = [
        ContinualConfig.from_dict({**base.to_dict(), "method": m, "seed": int(s)}) for s in seeds for m in methods
    ]
    for config in configs:
        config.validate()
    return configs


# ============================================================================ data: tasks
def split_classes(num_classes: int, tasks: int, class_order: Sequence[int] | None = None) -> list[list[int]]:
    """The classes (original indices) of each task, in arrival order; sizes differ by at most one.

    Every task needs two classes: a task trains only its own head block, with the loss over its own
    classes, and one class gives nothing to learn."""
    order = list(range(num_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise ConfigError(f"class order must be a permutation of 0..{num_classes - 1}, got {order}")
    if tasks < 1 or 2 * tasks > num_classes:
        raise ConfigError(
            f"{num_classes} classes can make at most {num_classes // 2} tasks of at least 2 classes; {tasks} asked"
        )
    return [list(map(int, part)) for part in np.array_split(np.array(order), tasks)]


def _cap_per_class(index: torch.Tensor, labels: torch.Tensor, cap: int | None, seed: int) -> torch.Tensor:
    if cap is None:
        return index
    kept = []
    for class_index in labels[index].unique().tolist():
        members = index[labels[index] == class_index]
        order = np.random.default_rng([seed, class_index, 7]).permutation(len(members))[:cap]
        kept.append(members[torch.from_numpy(np.sort(order))])
    return torch.sort(torch.cat(kept)).values if kept else index


# ---------------------------------------------------------------------------- generated textures
def generated_dataset_path(name: str) -> Path:
    return paths.data_dir() / "generated" / f"{name}-v{_GENERATED_VERSION}"


def resolve_dataset(spec: str) -> str | Path:
    """A generated set's name -> its folder (drawn on first use); anything else unchanged."""
    if spec == "textures-30":
        return make_textures(generated_dataset_path(spec), classes=30, per_class=40)
    if spec == cues.NAME:
        return cues.make_cues(generated_dataset_path(spec))
    if spec in GENERATED_DATASETS:
        return make_textures(generated_dataset_path(spec))
    return spec


def dataset_class_names(spec: str, resolution: int = 112, cell_type: str | None = None) -> list[str]:
    """The classes of a data set, in index order (a generated set is drawn on first use)."""
    return data.load_image_set(resolve_dataset(spec), resolution, cell_type=cell_type).class_names


def texture_classes(classes: int) -> list[tuple[str, int, tuple[float, float]]]:
    """(name, pattern, frequency range) of each class of a generated set: up to 10 patterns at one scale,
    or the 10 patterns at each of the 3 scales (30 classes), pattern-major."""
    if classes <= len(TEXTURE_CLASSES):
        return [(name, kind, ORIGINAL_BAND) for kind, name in enumerate(TEXTURE_CLASSES[:classes])]
    if classes != len(TEXTURE_CLASSES) * len(TEXTURE_SCALES):
        raise ValueError(f"a generated texture set has up to 10 or exactly 30 classes, not {classes}")
    return [
        (f"{name}-{scale}", kind, band)
        for kind, name in enumerate(TEXTURE_CLASSES)
        for scale, band in TEXTURE_SCALES.items()
    ]


def _texture(kind: int, size: int, rng: np.random.Generator, band: tuple[float, float] = ORIGINAL_BAND) -> np.ndarray:
    """One grey texture in [0, 1] of class `kind` (0..9), with random frequency (within `band`, cycles
    per image), phase and contrast."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    freq = rng.uniform(*band)
    phase = rng.uniform(0, 2 * np.pi)
    if kind < 4:  # stripes at 0, 45, 90, 135 degrees (+- 8 degrees)
        angle = np.deg2rad(45 * kind + rng.uniform(-8, 8))
        img = np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    elif kind == 4:  # checkerboard
        img = np.sign(np.sin(2 * np.pi * freq / 2 * x + phase)) * np.sign(np.sin(2 * np.pi * freq / 2 * y + phase))
    elif kind == 5:  # dots on a grid
        img = np.cos(2 * np.pi * freq * x + phase) * np.cos(2 * np.pi * freq * y + phase)
        img = (img > 0.6).astype(np.float64) * 2 - 1
    elif kind == 6:  # concentric rings around a random centre
        cx, cy = rng.uniform(0.3, 0.7, 2)
        img = np.sin(2 * np.pi * freq * np.hypot(x - cx, y - cy) + phase)
    elif kind == 7:  # grid lines
        img = np.maximum(np.cos(2 * np.pi * freq * x + phase), np.cos(2 * np.pi * freq * y + phase))
        img = (img > 0.8).astype(np.float64) * 2 - 1
    elif kind == 8:  # smooth blobs: coarse noise, bicubically upsampled
        cells = 6 if band == ORIGINAL_BAND else max(2, int(round(freq * 0.7)))
        coarse = Image.fromarray(rng.normal(size=(cells, cells)).astype(np.float32))
        img = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float64)
        img = np.tanh(2 * (img - img.mean()))
    else:  # sparse speckle: dots of a size that shrinks as the frequency grows
        grain = 1 if band == ORIGINAL_BAND else max(1, int(round(size / (freq * 6))))
        small = rng.random((-(-size // grain), -(-size // grain))) > 0.93
        img = np.kron(small, np.ones((grain, grain)))[:size, :size].astype(np.float64) * 2 - 1
    contrast = rng.uniform(0.3, 0.5)
    img = 0.5 + contrast * img + rng.normal(0, 0.12, (size, size))
    return np.clip(img, 0, 1)


def make_textures(folder: Path, *, classes: int = 10, per_class: int = 60, size: int = 128, seed: int = 0) -> Path:
    """Draw the textures set as an ImageFolder (class folders of PNGs), once; returns the folder."""
    specs = texture_classes(classes)
    rng = np.random.default_rng(seed)
    return data.draw_image_folder(
        folder, [name for name, _, _ in specs], per_class, lambda c: _texture(specs[c][1], size, rng, specs[c][2])
    )


# ============================================================================ metrics
def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def accuracy_metrics(matrix: Sequence[Sequence[float | None]]) -> dict[str, float | None]:
    """Summary of an accuracy matrix (rows: after task i, columns: task j; None where not measured).

    avg_accuracy: mean of the last row. forgetting: mean over j < T-1 of
    (max over i in [j, T-2] of A[i][j]) - A[T-1][j]; None for one task or without the earlier rows
    (joint training). avg_incremental_accuracy: mean over i of the mean of row i over j <= i."""
    rows = [list(row) for row in matrix]
    if not rows:
        return {"avg_accuracy": None, "forgetting": None, "avg_incremental_accuracy": None}
    last = [v for v in rows[-1] if _finite(v)]
    avg = float(np.mean(last)) if last else None
    drops = []
    for j in range(len(rows) - 1):
        earlier = [rows[i][j] for i in range(j, len(rows) - 1) if _finite(rows[i][j])]
        if earlier and _finite(rows[-1][j]):
            drops.append(max(earlier) - rows[-1][j])
    forgetting = float(np.mean(drops)) if drops and len(drops) == len(rows) - 1 else None
    means = [
        np.mean([v for v in row[: i + 1] if _finite(v)])
        for i, row in enumerate(rows)
        if any(_finite(v) for v in row[: i + 1])
    ]
    incremental = float(np.mean(means)) if len(means) == len(rows) else None
    return {"avg_accuracy": avg, "forgetting": forgetting, "avg_incremental_accuracy": incremental}


# ============================================================================ null space
def null_space_basis(cov: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Orthonormal basis (columns) of the approximate null space of a symmetric PSD matrix.

    threshold=None: the nullity is chosen at the elbow of the spectrum s_0 >= s_1 >= ... >= s_{n-1}
    (normalised by s_0), found as the point farthest below the chord from (0, s_0) to (n-1, s_{n-1})
    ("kneedle"); the elbow and every direction after it form the null space, the directions before it
    are protected (at least the first). With one or two values there is no elbow: the smaller one is
    the null space (n = 2) or there is none (n = 1, unless it is zero).
    A float: the null space is the directions with s <= threshold * s_0 (0 for the exact null space)."""
    cov = 0.5 * (cov + cov.T).double()
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    n = len(values)
    if values[0] <= 0:
        return vectors  # nothing stored: every direction is free
    s = values / values[0]
    if threshold is not None:
        protected = s > threshold
        return vectors[:, int(protected.nonzero().max()) + 1 :]
    if n <= 2:
        return vectors[:, 1:]
    position = torch.arange(n, dtype=torch.float64) / (n - 1)
    chord = 1.0 + (s[-1] - 1.0) * position
    start = int(torch.argmax((chord - s)[1:])) + 1
    return vectors[:, start:]


def projector(
    cov: torch.Tensor, eta: float = DEFAULT_ETA, threshold: float | None = None, norm: str = "none"
) -> tuple[torch.Tensor, int]:
    """(eta * U0 U0^T + (1 - eta) * I, nullity) in float32, U0 the null-space basis of `cov`.

    norm="frobenius" divides the blended matrix by its Frobenius norm, as the official implementation
    does: the same directions, a step about sqrt(nullity) times smaller."""
    basis = null_space_basis(cov, threshold)
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    blended = eta * (basis @ basis.T) + (1.0 - eta) * eye
    if norm == "frobenius":
        blended = blended / torch.linalg.matrix_norm(blended).clamp_min(1e-12)
    return blended.float(), int(basis.shape[1])


def project_update(delta: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """NSP2's projected prompt update ``B2 @ dP @ B1`` for one block's (m, d) prompt update."""
    return b2 @ delta @ b1


@torch.no_grad()
def condition_features(
    block: nn.Module, x: torch.Tensor, num_prefix: int, num_prompts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two condition matrices of one pre-LN timm block for the tokens `x` entering it.

    x: (B, T, d) with the prompts at [num_prefix, num_prefix + num_prompts). Returns
    F1 (rows, d): per head h, ``Q_X W_k,h diag(gamma)`` centred over d, rows = images x heads x queries;
    F2 (rows, m): the attention of those queries on the prompt keys, divided by each prompt's sigma.
    An update dP (m, d) leaves this block's image-token outputs unchanged to first order iff
    ``F1 @ dP.T == 0`` and ``F2 @ dP == 0`` (LayerNorm statistics of the prompts held)."""
    attn, norm = block.attn, block.norm1
    batch, tokens, dim = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    h = norm(x)
    qkv = attn.qkv(h).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, H, T, dh)
    image = torch.cat([torch.arange(num_prefix), torch.arange(num_prefix + num_prompts, tokens)])
    q_img = q[:, :, image]
    w_k = attn.qkv.weight[dim : 2 * dim].reshape(heads, head_dim, dim)
    gamma = norm.weight if norm.weight is not None else torch.ones(dim)
    f1 = torch.einsum("bhnc,hcd->bhnd", q_img, w_k) * gamma
    f1 = f1 - f1.mean(dim=-1, keepdim=True)
    probs = ((q_img * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    prompts = x[0, num_prefix : num_prefix + num_prompts]
    sigma = torch.sqrt(prompts.var(dim=-1, unbiased=False) + norm.eps)
    f2 = probs[..., num_prefix : num_prefix + num_prompts] / sigma
    return f1.reshape(-1, dim), f2.reshape(-1, num_prompts)


class NullSpaceMemory:
    """Per prompted block: the two covariances, summed over tasks (each task's mean over its rows)."""

    def __init__(self, blocks: Sequence[int], dim: int, counts: Sequence[int]):
        self.blocks = tuple(blocks)
        self.cov1 = {b: torch.zeros(dim, dim, dtype=torch.float64) for b in self.blocks}
        self.cov2 = {b: torch.zeros(m, m, dtype=torch.float64) for b, m in zip(self.blocks, counts)}
        self.tasks = 0

    @torch.no_grad()
    def add_task(self, model: PromptedViT, encoded: torch.Tensor, batch_size: int = EVAL_BATCH) -> None:
        """Accumulate the covariances of one task's images (`encoded` = frozen-prefix encodings)."""
        sums1 = {b: torch.zeros_like(c) for b, c in self.cov1.items()}
        sums2 = {b: torch.zeros_like(c) for b, c in self.cov2.items()}
        rows = {b: 0 for b in self.blocks}

        def hook_for(index: int):
            def hook(block, args):
                f1, f2 = condition_features(
                    block, args[0].float(), model.num_prefix_tokens, model.prompt_counts[model.block_to_slot[index]]
                )
                sums1[index] += (f1.T @ f1).double()
                sums2[index] += (f2.T @ f2).double()
                rows[index] += f1.shape[0]

            return hook

        handles = [model.backbone.blocks[b].register_forward_pre_hook(hook_for(b)) for b in self.blocks]
        was_training = model.training
        try:
            model.eval()
            with model.whole_blocks():  # every block called as a module, so the hooks fire
                for start in range(0, len(encoded), batch_size):
                    model.forward_from_frozen(encoded[start : start + batch_size])
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
        for b in self.blocks:
            if rows[b]:
                self.cov1[b] += sums1[b] / rows[b]
                self.cov2[b] += sums2[b] / rows[b]
        self.tasks += 1

    def projectors(self, eta: float, threshold: float | None, norm: str = "none") -> dict[int, dict[str, Any]]:
        result = {}
        for b in self.blocks:
            b1, k1 = projector(self.cov1[b], eta, threshold, norm)
            b2, k2 = projector(self.cov2[b], eta, threshold, norm)
            result[b] = {"b1": b1, "b2": b2, "nullity": [k1, k2], "dims": [b1.shape[0], b2.shape[0]]}
        return result


def ln_consistency_loss(prompts: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """|mu_new - mu_old|_1 + |sigma_new - sigma_old|_1 per prompt token (mean over tokens), summed over blocks."""
    total = torch.zeros(())
    for now, old in zip(prompts, reference):
        total = total + nn.functional.l1_loss(now.mean(-1), old.mean(-1))
        total = total + nn.functional.l1_loss(now.std(-1, unbiased=False), old.std(-1, unbiased=False))
    return total


# ============================================================================ the model
class TaskHeads(nn.Module):
    """A growing head: one linear block per task; forward gives the logits of the first `active` tasks."""

    def __init__(self, dim: int, sizes: Sequence[int], seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919)
            self.heads = nn.ModuleList(nn.Linear(dim, n) for n in sizes)
            for head in self.heads:
                nn.init.trunc_normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)
        self.sizes = list(sizes)
        self.active = len(sizes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.heads[t](features) for t in range(self.active)], dim=1)


@dataclass
class ContinualResult:
    status: str  # "done" | "cancelled"
    metrics: dict[str, Any]
    timings: dict[str, Any]
    trainable_state: dict[str, torch.Tensor]
    class_names: list[str]


class _Cancelled(Exception):
    pass


class PhaseClock:
    """Seconds spent per phase of a run (`with clock("train"): ...`), summed over its entries; stored
    with the run's timings, so a slow run says where its time went."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def prepare(config: ContinualConfig):
    """The data (drawn on first use for a generated set), its split, the task classes and the model."""
    image_set = data.load_image_set(resolve_dataset(config.dataset), config.resolution, cell_type=config.cell_type)
    num_classes = len(image_set.class_names)
    task_classes = split_classes(num_classes, config.tasks, config.arrival_order(num_classes))
    split = data.split_image_set(
        image_set,
        test_fraction=config.test_fraction,
        val_fraction=0.0,
        shots=config.shots,
        split_seed=config.split_seed,
        shot_seed=config.seed,
    )
    test_index = _cap_per_class(split.test, image_set.labels, config.max_test_per_class, config.split_seed)
    backbone = backbones.load_backbone(config.backbone, config.weights, config.resolution)
    run_config = config.run_config(depth=len(backbone.blocks))
    model = train.build_model(run_config, num_classes=2)
    model.head = TaskHeads(model.embed_dim, [len(c) for c in task_classes], config.seed)
    if config.prompt_init == "uniform-1":
        init_prompts_uniform(model, config.seed)
    mean, std = backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"]
    return image_set, split, test_index, task_classes, model, mean, std


def run_continual(
    config: ContinualConfig, *, on_event: EventCallback | None = None, should_cancel: CancelCheck | None = None
) -> ContinualResult:
    """Train the tasks in turn with `config.method` and measure the accuracy matrix.

    Events: {"phase": "setup"|"train"|"epoch"|"task"|"test", "task", "tasks", "epoch", "step",
    "total_steps", "loss", "elapsed_s", "eta_s"}; a "task" event carries that row of the matrix.
    Cancelling returns status "cancelled" with the rows measured so far."""
    emit = on_event or (lambda event: None)
    cancelled = should_cancel or (lambda: False)
    config.validate()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    clock = PhaseClock()

    emit({"phase": "setup", "message": "loading data and backbone", "elapsed_s": 0.0})
    with clock("data"):
        image_set, split, test_index, task_classes, model, mean, std = prepare(config)
    dim = model.embed_dim

    # Global labels follow the arrival order: task t owns the columns [offset_t, offset_t + n_t).
    order = [c for classes in task_classes for c in classes]
    remap = torch.empty(len(order), dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(len(order))
    labels = remap[image_set.labels]
    offsets = np.cumsum([0] + [len(c) for c in task_classes]).tolist()
    task_of_label = torch.tensor([t for t, classes in enumerate(task_classes) for _ in classes])

    emit({"phase": "setup", "message": "encoding frozen layers once", "elapsed_s": time.perf_counter() - started})
    run_config = config.run_config(depth=model.depth)
    encode = lambda index: train.encode_frozen_split(model, run_config, image_set, index, mean, std)  # noqa: E731
    with clock("encode"):
        train_enc, test_enc = encode(split.train), encode(test_index)
    train_labels, test_labels = labels[split.train], labels[test_index]
    train_images = image_set.images[split.train] if config.augment else None
    train_task, test_task = task_of_label[train_labels], task_of_label[test_labels]
    with clock("ncm"):
        initial_train = _features(model, train_enc, config.precision)
        initial_test = _features(model, test_enc, config.precision)
        ncm_initial = ncm_accuracy(initial_train, train_labels, initial_test, test_labels)
        # What the features separate within each task before any training: what prompts can add to it.
        initial_by_task = ncm_by_task(initial_train, train_labels, train_task, initial_test, test_labels, test_task)
        ncm_task_il_initial = [initial_by_task.get(t, (None, None))[1] for t in range(len(task_classes))]
        del initial_train, initial_test
    cache_seconds = time.perf_counter() - started

    T = len(task_classes)
    stages = [list(range(T))] if config.method == "joint" else [[t] for t in range(T)]
    steps_per_epoch = [
        max(1, math.ceil(int(torch.isin(train_task, torch.tensor(s)).sum()) / config.batch_size)) for s in stages
    ]
    total_steps = sum(steps_per_epoch) * config.epochs
    matrix = [[None] * T for _ in range(T)]
    balanced = [[None] * T for _ in range(T)]
    task_il = [[None] * T for _ in range(T)]
    drift = [[None] * T for _ in range(T)]
    ncm_matrix = [[None] * T for _ in range(T)]
    ncm_task_il = [[None] * T for _ in range(T)]
    last_train_features = None  # the training features of the last NCM, if it covered every task
    reference_features: dict[int, torch.Tensor] = {}
    nullity: list[dict] = []
    memory = NullSpaceMemory(model.placement, dim, model.prompt_counts) if config.method == "nsp2" else None
    progress = {"step": 0, "loop_started": time.perf_counter()}
    status = "done"
    context = _TrainContext(config, model, emit, cancelled, started, total_steps, progress, clock)
    last_features = None  # the test features of the last evaluation, if it covered every task

    try:
        for stage_index, stage in enumerate(stages):
            last_task = stage[-1]
            model.head.active = last_task + 1
            in_stage = torch.isin(train_task, torch.tensor(stage))
            enc, y = train_enc[in_stage], train_labels[in_stage]
            projections = None
            if memory is not None and memory.tasks:
                with clock("projectors"):
                    projections = memory.projectors(config.eta, config.null_threshold, config.projector_norm)
                nullity.append(
                    {
                        "task": last_task + 1,
                        "blocks": {str(b): p["nullity"] for b, p in projections.items()},
                        "dims": {str(b): p["dims"] for b, p in projections.items()},
                    }
                )
            if config.method == "joint":
                heads, columns = list(range(T)), (0, offsets[-1])
            else:
                heads, columns = [last_task], (offsets[last_task], offsets[last_task + 1])
            if train_images is None:
                inputs: Callable[[torch.Tensor], torch.Tensor] = enc.__getitem__
            else:
                inputs = _augmented_inputs(model, train_images[in_stage], mean, std, config, stage_index)
            context.train_stage(
                inputs, y - columns[0], columns, heads, projections, stage_index, T, steps_per_epoch[stage_index]
            )
            if memory is not None and last_task < T - 1:
                with clock("null_space"):
                    memory.add_task(model, enc)
            with clock("evaluate"):
                rows, features = evaluate_seen(model, test_enc, test_labels, test_task, last_task + 1, offsets, config)
            last_features = features if len(features) == len(test_labels) else None
            with clock("ncm"):
                seen_train, seen_test = train_task <= last_task, test_task <= last_task
                train_features = _features(model, train_enc[seen_train], config.precision)
                by_task = ncm_by_task(
                    train_features,
                    train_labels[seen_train],
                    train_task[seen_train],
                    features,
                    test_labels[seen_test],
                    test_task[seen_test],
                )
            last_train_features = train_features if bool(seen_train.all()) else None
            for j, (among_seen, own) in by_task.items():
                ncm_matrix[last_task][j], ncm_task_il[last_task][j] = among_seen, own
            for j, row in rows.items():
                matrix[last_task][j], balanced[last_task][j], task_il[last_task][j] = (
                    row["accuracy"],
                    row["balanced_accuracy"],
                    row["task_il_accuracy"],
                )
                if j not in reference_features:
                    reference_features[j] = row["features"]
                moved = (row["features"] - reference_features[j]).norm(dim=1) / reference_features[j].norm(dim=1)
                drift[last_task][j] = float(moved.mean())
            emit(
                {
                    "phase": "task",
                    "task": last_task + 1,
                    "tasks": T,
                    "accuracies": matrix[last_task][: last_task + 1],
                    "task_il_accuracies": task_il[last_task][: last_task + 1],
                    "step": progress["step"],
                    "total_steps": total_steps,
                    "epoch": config.epochs,
                    "elapsed_s": time.perf_counter() - started,
                }
            )
    except _Cancelled:
        status = "cancelled"

    summary = accuracy_metrics(matrix)
    summary_til = accuracy_metrics(task_il)
    summary_balanced = accuracy_metrics(balanced)
    summary_ncm = accuracy_metrics(ncm_task_il)
    finished = status == "done"
    ncm_final = None
    if finished:
        with clock("ncm"):
            # The last task's evaluation already ran every test image through the final model.
            test_features = last_features if last_features is not None else _features(model, test_enc, config.precision)
            if last_train_features is None:
                last_train_features = _features(model, train_enc, config.precision)
            ncm_final = ncm_accuracy(last_train_features, train_labels, test_features, test_labels)
    just_learned = [matrix[t][t] for t in range(T)] if config.method != "joint" else []
    just_learned_til = [task_il[t][t] for t in range(T)] if config.method != "joint" else []
    ncm_just_learned = [ncm_task_il[t][t] for t in range(T)] if config.method != "joint" else []
    metrics = {
        "method": config.method,
        "tasks": [[image_set.class_names[c] for c in classes] for classes in task_classes],
        "accuracy_matrix": matrix,
        "balanced_accuracy_matrix": balanced,
        "task_il_matrix": task_il,
        "feature_drift": drift,
        **summary,
        "avg_balanced_accuracy": summary_balanced["avg_accuracy"],
        "forgetting_balanced": summary_balanced["forgetting"],
        "avg_accuracy_task_il": summary_til["avg_accuracy"],
        "forgetting_task_il": summary_til["forgetting"],
        "just_learned": just_learned,
        "just_learned_task_il": just_learned_til,
        "learning_accuracy": _mean_finite(just_learned),
        "learning_accuracy_task_il": _mean_finite(just_learned_til),
        "ncm_accuracy": ncm_final,
        "ncm_accuracy_initial": ncm_initial,
        "ncm_matrix": ncm_matrix,
        "ncm_task_il_matrix": ncm_task_il,
        "avg_ncm_task_il": summary_ncm["avg_accuracy"],
        "ncm_forgetting_task_il": summary_ncm["forgetting"],
        "ncm_learning_task_il": _mean_finite(ncm_just_learned),
        "ncm_task_il_untrained": ncm_task_il_initial,
        "avg_ncm_task_il_untrained": _mean_finite(ncm_task_il_initial),
        "recipe": config.recipe,
        "nullity": nullity,
        "train_sizes": [int((train_task == t).sum()) for t in range(T)],
        "test_sizes": [int((test_task == t).sum()) for t in range(T)],
        "class_names": image_set.class_names,
    }
    timings = {
        "train_seconds": time.perf_counter() - started,
        "cache_seconds": cache_seconds,
        "steps": progress["step"],
        "threads": torch.get_num_threads(),
        "phases": {name: round(seconds, 3) for name, seconds in clock.seconds.items()},
    }
    if status == "done":
        emit(
            {
                "phase": "test",
                "avg_accuracy": summary["avg_accuracy"],
                "forgetting": summary["forgetting"],
                "elapsed_s": time.perf_counter() - started,
            }
        )
    return ContinualResult(status, metrics, timings, model.trainable_state(), image_set.class_names)


def _mean_finite(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if _finite(v)]
    return float(np.mean(kept)) if kept else None


def init_prompts_uniform(model: PromptedViT, seed: int, bound: float = 1.0) -> None:
    """Prompts drawn uniform(-bound, bound) (the official NSP2 init), reproducibly per seed."""
    generator = torch.Generator().manual_seed(seed * 7 + 11)
    with torch.no_grad():
        for tensor in model.prompts.tensors:
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * 2 * bound - bound)


def ncm_accuracy(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor
) -> float | None:
    """Nearest-class-mean accuracy on L2-normalised features: class means from the training features,
    each test feature assigned to the closest mean (cosine). Uses no head, so it measures what the
    features themselves still separate."""
    if not len(test_labels) or not len(train_labels):
        return None
    train_n = nn.functional.normalize(train_features.float(), dim=1)
    test_n = nn.functional.normalize(test_features.float(), dim=1)
    classes = train_labels.unique()
    means = torch.stack([train_n[train_labels == c].mean(dim=0) for c in classes])
    means = nn.functional.normalize(means, dim=1)
    predicted = classes[(test_n @ means.T).argmax(dim=1)]
    return float((predicted == test_labels).float().mean())


def ncm_by_task(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    train_task: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    test_task: torch.Tensor,
) -> dict[int, tuple[float, float]]:
    """Nearest-class-mean accuracy of each task's test images (cosine to the class means of the training
    features, as `ncm_accuracy`): task -> (among every class in the training features, among the task's
    own classes). The second is what the features still separate within an old task, whatever the
    later classes look like; the first also counts confusion with later classes."""
    out: dict[int, tuple[float, float]] = {}
    if not len(train_labels):
        return out
    train_n = nn.functional.normalize(train_features.float(), dim=1)
    test_n = nn.functional.normalize(test_features.float(), dim=1)
    classes = train_labels.unique()
    means = nn.functional.normalize(torch.stack([train_n[train_labels == c].mean(dim=0) for c in classes]), dim=1)
    class_task = torch.stack([train_task[train_labels == c][0] for c in classes])
    similarity = test_n @ means.T
    for j in test_task.unique().tolist():
        mine, own = test_task == j, class_task == j
        if not own.any():
            continue
        among_all = classes[similarity[mine].argmax(dim=1)]
        among_own = classes[own][similarity[mine][:, own].argmax(dim=1)]
        out[int(j)] = (
            float((among_all == test_labels[mine]).float().mean()),
            float((among_own == test_labels[mine]).float().mean()),
        )
    return out


def augment_images(images: torch.Tensor, generator: torch.Generator, min_scale: float = 0.5) -> torch.Tensor:
    """Random resized crop (area min_scale..1, aspect 3/4..4/3) and horizontal flip, per image, back to
    the input size. Works on float images (B, C, H, W); the training-time augmentation of the recipe."""
    batch, _, height, width = images.shape
    out = torch.empty_like(images)
    draws = torch.rand(batch, 4, generator=generator)
    for i in range(batch):
        area = min_scale + (1 - min_scale) * float(draws[i, 0])
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(draws[i, 1]))
        h = max(1, min(height, int(round(height * math.sqrt(area / aspect)))))
        w = max(1, min(width, int(round(width * math.sqrt(area * aspect)))))
        top = int(float(draws[i, 2]) * (height - h + 1))
        left = int(float(draws[i, 3]) * (width - w + 1))
        crop = images[i : i + 1, :, top : top + h, left : left + w]
        crop = nn.functional.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
        out[i] = crop[0]
    flip = torch.rand(batch, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _augmented_inputs(model: PromptedViT, images_uint8: torch.Tensor, mean, std, config, stage_index: int):
    """index -> the frozen-prefix encodings of freshly augmented training images (one new draw per call)."""
    generator = torch.Generator().manual_seed(config.seed * 1000 + stage_index + 500)

    def inputs(index: torch.Tensor) -> torch.Tensor:
        images = augment_images(data.normalize(images_uint8[index], mean, std), generator)
        with torch.no_grad(), train.autocast(config.precision):
            tokens = model.embed(images)
            if model.first_prompt_block:
                tokens, _ = model.run_blocks(tokens, 0, model.first_prompt_block)
        return tokens.float()

    return inputs


@torch.inference_mode()
def _features(model: PromptedViT, encoded: torch.Tensor, precision: str) -> torch.Tensor:
    chunks = []
    with train.autocast(precision):
        for start in range(0, len(encoded), EVAL_BATCH):
            batch = encoded[start : start + EVAL_BATCH]
            tokens, prompts_in_x = model.run_blocks(batch, model.first_prompt_block, pooled=True)
            chunks.append(model.pool(tokens, prompts_in_x).float())
    return torch.cat(chunks) if chunks else torch.empty(0, model.embed_dim)


def evaluate_seen(
    model: PromptedViT,
    test_enc: torch.Tensor,
    test_labels: torch.Tensor,
    test_task: torch.Tensor,
    seen: int,
    offsets: Sequence[int],
    config: ContinualConfig,
) -> tuple[dict[int, dict[str, Any]], torch.Tensor]:
    """One row of the accuracy matrices after `seen` tasks: per task j < seen with test images, its
    accuracy among every seen class, balanced accuracy, accuracy among its own classes (task given)
    and its images' pooled features. Returns (rows, the features of every seen task's test image).

    Only the seen tasks' test images run through the model: the later tasks' images enter no metric
    yet (the head has no columns for them), and each image's features do not depend on the others in
    its batch, so the figures are those of a pass over the whole test set."""
    keep = test_task < seen
    labels, tasks = test_labels[keep], test_task[keep]
    features = _features(model, test_enc[keep], config.precision)
    with torch.no_grad():
        logits = model.head(features)
    predictions = logits.argmax(dim=1)
    rows: dict[int, dict[str, Any]] = {}
    for j in range(seen):
        mask = tasks == j
        if not mask.any():
            continue
        correct = predictions[mask] == labels[mask]
        own = logits[mask][:, offsets[j] : offsets[j + 1]].argmax(dim=1) + offsets[j]
        rows[j] = {
            "accuracy": float(correct.float().mean()),
            "balanced_accuracy": float(
                np.mean([float(correct[labels[mask] == c].float().mean()) for c in labels[mask].unique().tolist()])
            ),
            "task_il_accuracy": float((own == labels[mask]).float().mean()),
            "features": features[mask],
        }
    return rows, features


class _TrainContext:
    """The training loop of one stage (one task, or every task at once for joint training)."""

    def __init__(self, config, model, emit, cancelled, started, total_steps, progress, clock):
        self.config, self.model, self.emit, self.cancelled = config, model, emit, cancelled
        self.started, self.total_steps, self.progress, self.clock = started, total_steps, progress, clock

    def train_stage(self, inputs, local_labels, columns, heads, projections, stage_index, tasks, steps_per_epoch):
        """inputs: index tensor -> that batch's frozen-prefix encodings (cached, or augmented afresh)."""
        config, model = self.config, self.model
        prompt_params = list(model.prompts.tensors)
        head_params = [p for t in heads for p in model.head.heads[t].parameters()]
        optimizer = torch.optim.AdamW(prompt_params + head_params, lr=config.lr, weight_decay=config.weight_decay)
        reference = [p.detach().clone() for p in prompt_params] if projections else None
        total = steps_per_epoch * config.epochs
        warmup = int(round(config.warmup_epochs * steps_per_epoch))
        generator = torch.Generator().manual_seed(config.seed * 1000 + stage_index)
        n, step = len(local_labels), 0
        for epoch in range(config.epochs):
            model.train()
            order = torch.randperm(n, generator=generator)
            losses = []
            for start in range(0, n, config.batch_size):
                if self.cancelled():
                    raise _Cancelled
                index = order[start : start + config.batch_size]
                lr = train.lr_at(step, total, warmup, config.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with self.clock("inputs"):
                    batch = inputs(index)
                with self.clock("train"):
                    with train.autocast(config.precision):
                        logits = model.forward_from_frozen(batch)
                    scaled = logits.float()[:, columns[0] : columns[1]] / config.temperature
                    loss = nn.functional.cross_entropy(scaled, local_labels[index])
                    if reference is not None and config.ln_loss_weight:
                        loss = loss + config.ln_loss_weight * ln_consistency_loss(prompt_params, reference)
                    model.zero_grad(set_to_none=True)
                    loss.backward()
                    projected_step(optimizer, prompt_params, model.placement, projections)
                step += 1
                self.progress["step"] += 1
                losses.append(float(loss.detach()))
                done = self.progress["step"]
                elapsed = time.perf_counter() - self.progress["loop_started"]
                self.emit(
                    {
                        "phase": "train",
                        "task": stage_index + 1 if len(heads) == 1 else tasks,
                        "tasks": tasks,
                        "epoch": epoch + 1,
                        "step": done,
                        "total_steps": self.total_steps,
                        "loss": losses[-1],
                        "lr": lr,
                        "elapsed_s": time.perf_counter() - self.started,
                        "eta_s": elapsed / done * (self.total_steps - done),
                    }
                )
            model.eval()
            done = self.progress["step"]
            elapsed = time.perf_counter() - self.progress["loop_started"]
            self.emit(
                {
                    "phase": "epoch",
                    "task": heads[-1] + 1,
                    "tasks": tasks,
                    "epoch": epoch + 1,
                    "loss": float(np.mean(losses)),
                    "step": done,
                    "total_steps": self.total_steps,
                    "elapsed_s": time.perf_counter() - self.started,
                    "eta_s": elapsed / done * (self.total_steps - done),
                }
            )


def projected_step(
    optimizer: torch.optim.Optimizer,
    prompt_params: Sequence[torch.Tensor],
    blocks: Sequence[int],
    projections: dict[int, dict[str, Any]] | None,
) -> None:
    """optimizer.step(), then each prompt's update replaced by its projection B2 @ update @ B1.

    The projection acts on the update the optimizer proposes (Adam's moments, weight decay and all),
    not on the raw gradient, as in NSP2."""
    if not projections:
        optimizer.step()
        return
    before = [p.detach().clone() for p in prompt_params]
    optimizer.step()
    with torch.no_grad():
        for param, old, block in zip(prompt_params, before, blocks):
            p = projections[block]
            param.copy_(old + project_update(param - old, p["b1"], p["b2"]))


# ============================================================================ stored runs
def submit_continual(
    store: RunStore, config: ContinualConfig, *, source: str = "live", sweep_id: str | None = None
) -> int:
    """Validate and queue one continual experiment (the dashboard worker runs it)."""
    config.validate()
    return store.create_run(config.to_dict(), status="queued", kind=KIND, source=source, sweep_id=sweep_id)


def execute_continual(store: RunStore, run_id: int, *, echo: Callable[[dict], None] | None = None) -> dict:
    """Run a stored continual job to its end; never raises for a failing run (stored as failed)."""
    row = claim_job(store, run_id)
    try:
        config = ContinualConfig.from_dict(row["config"])
        result = run_continual(
            config,
            on_event=ProgressWriter(store, run_id, echo),
            should_cancel=lambda: store.is_cancel_requested(run_id),
        )
    except Exception as exc:  # noqa: BLE001 - stored with the run, never kills the worker
        return fail_job(store, run_id, exc)
    if store.get_run(run_id) is None:  # deleted while it ran (another tab): nothing left to store into
        return {"id": run_id, "status": "deleted"}
    if result.trainable_state:
        store.save_artifact(run_id, result.trainable_state, metadata={"class_names": ",".join(result.class_names)})
    store.finish_run(run_id, result.status, metrics=result.metrics, timings=result.timings)
    return store.get_run(run_id)


def run_continual_now(
    store: RunStore,
    config: ContinualConfig,
    *,
    source: str = "cli",
    sweep_id: str | None = None,
    echo: Callable[[dict], None] | None = None,
) -> dict:
    """Execute in this process (CLI, benchmarks); created 'running' so no worker can claim it."""
    config.validate()
    run_id = store.create_run(config.to_dict(), status="running", kind=KIND, source=source, sweep_id=sweep_id)
    return execute_continual(store, run_id, echo=echo)


def summarize_runs(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """Finished continual runs -> one row per method: mean and sample std over seeds of the summary figures."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("kind") == KIND and row.get("status") == "done":
            by_method.setdefault(row["config"].get("method"), []).append(row["metrics"])
    table = []
    for method in [m for m in METHODS if m in by_method] + sorted(set(by_method) - set(METHODS), key=str):
        entries = by_method[method]
        line: dict[str, Any] = {
            "method": method,
            "label": METHOD_LABELS.get(method, str(method)),
            "seeds": len(entries),
        }
        for key in (*SUMMARY_KEYS, "avg_incremental_accuracy"):
            values = [m.get(key) for m in entries if _finite(m.get(key))]
            line[f"{key}_mean"] = float(np.mean(values)) if values else None
            line[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None)
        table.append(line)
    return table


def list_experiments(store: RunStore, limit: int = 500) -> list[dict[str, Any]]:
    """Continual runs grouped by experiment (sweep id; a run without one is its own), newest first."""
    groups: dict[str, dict[str, Any]] = {}
    for row in store.list_runs(kind=KIND, limit=limit):
        key = row.get("sweep_id") or f"run-{row['id']}"
        group = groups.setdefault(key, {"id": key, "rows": [], "created_at": row["created_at"]})
        group["rows"].append(row)
    for group in groups.values():
        rows, config = group["rows"], group["rows"][0]["config"]
        group["rows"] = sorted(rows, key=lambda r: r["id"])
        group["dataset"], group["tasks"] = config.get("dataset"), config.get("tasks")
        group["methods"] = [m for m in METHODS if any(r["config"].get("method") == m for r in rows)]
        group["seeds"] = sorted({r["config"].get("seed") for r in rows}, key=str)
        group["statuses"] = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
    return sorted(groups.values(), key=lambda g: g["created_at"], reverse=True)


def mean_matrix(rows: Sequence[dict], key: str = "accuracy_matrix") -> list[list[float | None]] | None:
    """Element-wise mean over runs of a stored matrix (None where no run measured it)."""
    matrices = [row["metrics"].get(key) for row in rows if row.get("metrics") and row["metrics"].get(key)]
    if not matrices:
        return None
    size = len(matrices[0])
    out = []
    for i in range(size):
        line = []
        for j in range(size):
            values = [m[i][j] for m in matrices if len(m) == size and _finite(m[i][j])]
            line.append(float(np.mean(values)) if values else None)
        out.append(line)
    return out


register_kind(KIND, execute_continual)
