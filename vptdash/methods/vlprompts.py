"""Vision-language prompts on a frozen CLIP (methods.md section 6): zero-shot, CoOp, MaPLe.

A run is a stored job of kind "vlprompt" with its own flat configuration (`VLPromptConfig`), so the
visual-prompt training path (`engine.train`) is untouched; the results land in the same store with the
usual metric and cost keys and appear on the same accuracy-vs-cost chart (families "zero-shot CLIP",
"CoOp", "MaPLe").

Protocol:
- Images: the usual stratified test / val / train split of the data set (`data.split_image_set`),
  `shots` training images per class, at the CLIP model's own input size.
- "all classes": train on every class, test on every class (held-out images).
- base-to-novel (`base_to_novel=True`): the classes are split in two, base = the first ceil(C/2) class
  indices, novel = the rest (CoOp's `subsample_classes`); training and validation use base classes'
  images only; base accuracy is measured on the base classes' test images among the base classes,
  novel accuracy on the novel classes' test images among the novel classes, and the run's `accuracy`
  is their harmonic mean (also stored as `harmonic_mean`, beside `base_accuracy`, `novel_accuracy`).
  It needs at least 4 classes (two per half: one class alone is a trivial classification).
- Hyper-parameters are chosen on validation images; the reported figures are on test images only.
- Zero-shot trains nothing: class names in the templates, evaluated as they are.

Training recipe defaults are MaPLe's released ones (SGD, lr 0.0035, batch 4, 5 epochs, warm-up 1
epoch, cosine decay), for CoOp as well; CoOp's own recipe (batch 32, 200 epochs) can be given.
No augmentation: the prompt-free image features of zero-shot and CoOp runs are computed once per image
and reused every epoch (exact, since nothing random touches the images).

Costs (`clip_costs`): GMACs per image of the image tower with its prompts and the product with the
class set's text features (fvcore count and formula, which agree exactly), the text tower's GMACs once
per class set (shown separately, and amortised per image over `amortise_images` images), trainable
and total parameters, and latency per image with the text features precomputed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vptdash.engine import clip, cost, data
from vptdash.engine.train import ConfigError, classification_metrics, lr_at
from vptdash.methods.attention import AttentionMaps, BlockAttention
from vptdash.runs.jobs import ProgressWriter, claim_job, fail_job, register_kind
from vptdash.runs.store import RunStore

KIND = "vlprompt"
FAMILIES = {"zeroshot": "zero-shot CLIP", "coop": "CoOp", "maple": "MaPLe"}
DEFAULT_TEXT_PROMPTS = {"zeroshot": 0, "coop": 4, "maple": 2}
MAPLE_DEPTH = 9  # MaPLe's released prompt depth; capped at the model's layers
AMORTISE_IMAGES = 1000
# What the text tower reads for the built-in sets, whose class names are labels, not words ("p=1/3").
# Chosen here, by hand, from the data set's description (methods.md section 7); a run may give its own.
CLASS_WORDS = {
    "elpv-binary": ["functional solar cell", "defective solar cell"],
    "elpv": [
        "functional solar cell",
        "possibly defective solar cell",
        "probably defective solar cell",
        "defective solar cell",
    ],
}
ENCODE_BATCH = 64
EVAL_BATCH = 32

EventCallback = Callable[[dict[str, Any]], None]


@dataclass
class VLPromptConfig:
    """Everything that defines a vision-language prompt run; stored flat with its results."""

    backbone: str = clip.TINY_CLIP
    weights: str | None = None
    dataset: str = "elpv-binary"
    cell_type: str | None = None
    resolution: int | None = None  # None: the CLIP model's input size (filled in when validated)
    shots: int | None = 16
    test_fraction: float = 0.25
    val_fraction: float = 0.1
    split_seed: int = 0
    method: str = "coop"
    text_prompts: int | None = None  # None: CoOp 4, MaPLe 2
    vision_prompts: int | None = None  # MaPLe only: equal to text_prompts (the coupling is one to one)
    prompt_depth: int | None = None  # MaPLe only: layers with prompts in both towers (None: 9, at most the layers)
    templates: list[str] = field(default_factory=lambda: list(clip.DEFAULT_TEMPLATES))
    class_words: list[str] | None = None  # what the text tower reads per class (None: CLASS_WORDS or the names)
    base_to_novel: bool = False
    epochs: int = 5
    batch_size: int = 4
    optimizer: str = "sgd"
    lr: float = 0.0035
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    amortise_images: int = AMORTISE_IMAGES
    measure_latency: bool = True
    tuning: str = "vlprompt"  # lets tables that group by tuning mode tell these runs apart

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VLPromptConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})

    # -- budgets, resolved
    @property
    def n_text(self) -> int:
        if self.method == "zeroshot":
            return 0
        return int(self.text_prompts if self.text_prompts is not None else DEFAULT_TEXT_PROMPTS[self.method])

    @property
    def n_vision(self) -> int:
        return self.n_text if self.method == "maple" else 0

    def depth(self, layers: int | None = None) -> int:
        if self.method != "maple":
            return 1 if self.n_text else 0
        if self.prompt_depth is not None:
            return int(self.prompt_depth)
        return MAPLE_DEPTH if layers is None else min(MAPLE_DEPTH, layers)

    def family(self) -> str:
        return FAMILIES.get(self.method, "vision-language")

    def label(self) -> str:
        if self.method == "zeroshot":
            count = len(self.templates)
            text = f"CLIP zero-shot ({count} template{'s' if count != 1 else ''})"
        elif self.method == "coop":
            text = f"CoOp, {self.n_text} text prompts"
        else:
            depth = self.depth() if self.prompt_depth is not None else f"{MAPLE_DEPTH} (capped at the layers)"
            text = f"MaPLe, {self.n_text} text + {self.n_vision} vision prompts, depth {depth}"
        return text + (", base-to-novel" if self.base_to_novel else "")

    def validate(self, layers: int | None = None) -> "VLPromptConfig":
        """Reject what cannot run, with one line that names the setting; `layers`: the smaller tower's
        depth, when known, bounds the prompt depth."""
        n = self.text_prompts
        checks = [
            (
                clip.is_clip_backbone(self.backbone),
                f"{self.backbone!r} is not a CLIP backbone (tiny-clip, open_clip:<model>)",
            ),
            (self.method in clip.METHODS, f"method must be one of {', '.join(clip.METHODS)}, got {self.method!r}"),
            (n is None or 0 <= int(n) <= 64, f"text prompts must be between 1 and 64, got {n}"),
            (self.method == "zeroshot" or self.n_text >= 1, f"{self.family()} needs at least 1 text prompt"),
            (self.method != "zeroshot" or not n, "zero-shot learns no prompts: leave --text-prompts out"),
            (
                self.method == "maple" or not self.vision_prompts,
                f"{self.family()} has no vision prompts: MaPLe is the method with prompts in the image tower",
            ),
            (
                self.method != "maple" or self.vision_prompts in (None, self.n_text),
                f"MaPLe couples each text prompt to one vision prompt: vision prompts must equal text prompts "
                f"({self.n_text}), got {self.vision_prompts}",
            ),
            (
                self.method == "maple" or self.prompt_depth in (None, 1),
                "prompt depth applies to MaPLe only (CoOp's context is in the first layer)",
            ),
            (self.prompt_depth is None or int(self.prompt_depth) >= 1, "prompt depth must be at least 1"),
            (
                layers is None or self.depth(layers) <= layers,
                f"prompt depth {self.prompt_depth} exceeds the model's {layers} layers",
            ),
            (
                bool(self.templates) and all(isinstance(t, str) and "{}" in t for t in self.templates),
                "every template needs a '{}' where the class name goes, e.g. 'a photo of a {}.'",
            ),
            (1 <= self.epochs <= 1000, f"epochs must be between 1 and 1000, got {self.epochs}"),
            (1 <= self.batch_size <= 4096, f"batch size must be between 1 and 4096, got {self.batch_size}"),
            (self.optimizer in ("sgd", "adamw"), "optimizer must be sgd or adamw"),
            (0 < self.lr < 10, f"learning rate must be in (0, 10), got {self.lr}"),
            (self.weight_decay >= 0 and self.warmup_epochs >= 0, "weight decay and warm-up must be >= 0"),
            (self.shots is None or self.shots >= 1, f"shots per class must be >= 1, got {self.shots}"),
            (0 < self.test_fraction < 1, "test fraction must be in (0, 1)"),
            (0 <= self.val_fraction < 1 - self.test_fraction, "val fraction must leave room for training images"),
            (self.amortise_images >= 1, "amortise_images must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def family_and_label(config: dict) -> tuple[str, str]:
    """Chart family and label of a stored vlprompt run's configuration (never raises)."""
    try:
        parsed = VLPromptConfig.from_dict(config or {})
        return parsed.family(), parsed.label()
    except Exception:  # noqa: BLE001 - a malformed stored row still shows up
        return "vision-language", "vision-language prompts"


# ---------------------------------------------------------------------------------------- classes
def base_novel_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """Base = the first ceil(C/2) class indices, novel = the rest (CoOp's split); >= 2 in each."""
    if num_classes < 4:
        raise ConfigError(f"base-to-novel needs at least 4 classes (2 base, 2 novel), this data set has {num_classes}")
    half = math.ceil(num_classes / 2)
    return list(range(half)), list(range(half, num_classes))


def base_novel_split(split: data.Split, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Index sets of a base-to-novel run: train and val from base classes only; test of each half.

    Built from the stratified image split, so each class keeps its share of test images and no image
    is in two sets; the two halves share no class."""
    base, novel = base_novel_classes(num_classes)
    in_base = torch.isin(labels, torch.tensor(base))

    def keep(index: torch.Tensor, base_side: bool) -> torch.Tensor:
        return index[in_base[index] == base_side]

    return {
        "base": base,
        "novel": novel,
        "train": keep(split.train, True),
        "val": keep(split.val, True),
        "test_base": keep(split.test, True),
        "test_novel": keep(split.test, False),
    }


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


# ---------------------------------------------------------------------------------------- features
class ImageInputs:
    """Images of one split for a class set: prompt-free features cached once (zero-shot, CoOp), or
    normalised images run through the image tower with the current vision prompts (MaPLe)."""

    def __init__(self, model: clip.PromptedCLIP, images: torch.Tensor, mean, std):
        self.model, self.images, self.mean, self.std = model, images, mean, std
        self.features = None
        if not model.vision_prompts:
            chunks = []
            with torch.inference_mode():
                for start in range(0, len(images), ENCODE_BATCH):
                    chunks.append(
                        model.encode_image(self._batch(torch.arange(start, min(start + ENCODE_BATCH, len(images)))))
                    )
            self.features = torch.cat(chunks) if chunks else torch.empty(0)

    def __len__(self) -> int:
        return len(self.images)

    def _batch(self, index: torch.Tensor) -> torch.Tensor:
        return data.normalize(self.images[index], self.mean, self.std)

    def image_features(self, index: torch.Tensor, vision: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.features is not None:
            return self.features[index]
        return self.model.encode_image(self._batch(index), vision)


@torch.inference_mode()
def predict(model: clip.PromptedCLIP, inputs: ImageInputs, class_names: Sequence[str]) -> torch.Tensor:
    """Predicted class per image; the class set's text features (and MaPLe's vision prompts) once."""
    was = model.training
    model.eval()
    text, vision = model.text_features(class_names)
    out = []
    for start in range(0, len(inputs), EVAL_BATCH):
        index = torch.arange(start, min(start + EVAL_BATCH, len(inputs)))
        out.append(model.logits(inputs.image_features(index, vision), text).argmax(dim=1))
    model.train(was)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


# ---------------------------------------------------------------------------------------- costs
def clip_costs(
    model: clip.PromptedCLIP,
    class_names: Sequence[str],
    *,
    amortise_images: int = AMORTISE_IMAGES,
    measure: bool = True,
) -> dict[str, Any]:
    """Every cost figure of a run, flat (see the module docstring); `gmacs` is per image, text excluded."""
    size = model.bundle.image_size
    classifier = clip.ImageClassifier(model, class_names)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    frozen = sum(p.numel() for p in model.clip.parameters())
    text = cost.fvcore_gmacs(clip.TextTower(model, class_names), size)
    costs: dict[str, Any] = {
        "params_trainable": trainable,
        "params_total": trainable + frozen,
        "params_prompts": trainable,
        "gmacs": cost.fvcore_gmacs(classifier, size),
        "gmacs_analytic": clip.image_gmacs_analytic(model, len(class_names)),
        "gmacs_convention": "image tower with its prompts + product with the text features, per image (MACs)",
        "text_gmacs_per_class_set": text,
        "text_gmacs_analytic": clip.text_gmacs_analytic(model, len(class_names)),
        "text_classes": len(class_names),
        "text_amortised_images": int(amortise_images),
        "text_gmacs_per_image_amortised": text / amortise_images,
        "image_tokens_per_layer": model.image_tokens_per_layer(),
    }
    costs["gmacs_with_text_amortised"] = costs["gmacs"] + costs["text_gmacs_per_image_amortised"]
    if measure:
        costs.update(cost.latency_costs(classifier, size))
    return costs


# ---------------------------------------------------------------------------------------- the run
def build_model(config: VLPromptConfig) -> clip.PromptedCLIP:
    bundle = clip.load_clip(config.backbone, config.weights)
    config.validate(layers=min(bundle.vision_layers, bundle.text_layers))
    if config.resolution not in (None, bundle.image_size):
        raise ConfigError(f"{config.backbone} takes {bundle.image_size} px images, not {config.resolution}")
    config.resolution = bundle.image_size
    if config.method == "maple":
        config.prompt_depth = config.depth(min(bundle.vision_layers, bundle.text_layers))  # stored resolved
    return clip.PromptedCLIP(
        bundle,
        config.method,
        text_prompts=config.n_text,
        depth=config.depth(min(bundle.vision_layers, bundle.text_layers)),
        templates=config.templates,
        seed=config.seed,
    )


def text_words(config: VLPromptConfig, class_names: Sequence[str]) -> list[str]:
    """The words the text tower reads per class: the run's own, the built-in set's, or the names."""
    words = config.class_words or CLASS_WORDS.get(str(config.dataset)) or list(class_names)
    if len(words) != len(class_names):
        raise ConfigError(f"class words: {len(words)} given for {len(class_names)} classes ({', '.join(class_names)})")
    return [str(w) for w in words]


def run_vlprompt(
    config: VLPromptConfig,
    *,
    on_event: EventCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    compute_costs: bool = True,
) -> dict[str, Any]:
    """Train (unless zero-shot) and evaluate one configuration on held-out images.

    Returns {"status", "metrics", "costs", "timings", "curve", "state", "class_names"}; events as
    `engine.train.run_training` emits them (setup, train, val, test, cost)."""
    emit = on_event or (lambda event: None)
    cancelled = should_cancel or (lambda: False)
    config.validate()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    emit({"phase": "setup", "message": f"loading {config.backbone} and the images", "elapsed_s": 0.0})
    model = build_model(config)
    bundle = model.bundle
    image_set, split = data.load_and_split(config, bundle.image_size)
    names, labels = list(image_set.class_names), image_set.labels
    words = text_words(config, names)
    if config.base_to_novel:
        parts = base_novel_split(split, labels, len(names))
        train_classes = [words[c] for c in parts["base"]]
        tests = {"base": (parts["test_base"], parts["base"]), "novel": (parts["test_novel"], parts["novel"])}
        train_index, val_index = parts["train"], parts["val"]
    else:
        train_classes = words
        tests = {"all": (split.test, list(range(len(names))))}
        train_index, val_index = split.train, split.val

    def local(index: torch.Tensor, classes: list[int]) -> torch.Tensor:
        """Labels renumbered within a class subset (a base-to-novel half is its own classifier)."""
        remap = torch.full((len(names),), -1, dtype=torch.long)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        return remap[labels[index]]

    train_ids = list(range(len(train_classes)))
    mean, std = bundle.mean, bundle.std
    emit({"phase": "setup", "message": "encoding images", "elapsed_s": time.perf_counter() - started})
    inputs = {"val": ImageInputs(model, image_set.images[val_index], mean, std)}
    if config.method != "zeroshot":  # zero-shot never looks at training images
        inputs["train"] = ImageInputs(model, image_set.images[train_index], mean, std)
    y_train, y_val = local(train_index, train_ids), local(val_index, train_ids)

    curve: list[dict[str, Any]] = []
    epochs_done = 0
    if config.method != "zeroshot":
        curve, epochs_done = _train(config, model, inputs, y_train, y_val, train_classes, emit, cancelled, started)
        if epochs_done < config.epochs:
            timings = {"train_seconds": time.perf_counter() - started, "epochs_completed": epochs_done}
            return {
                "status": "cancelled",
                "metrics": {"val_accuracy": curve[-1]["val_accuracy"] if curve else None},
                "costs": {},
                "timings": timings,
                "curve": curve,
                "state": model.trainable_state(),
                "class_names": names,
            }
    train_seconds = time.perf_counter() - started
    model.eval()  # from here the prompts are fixed: each class set's text features are computed once
    calls_before = model.text_tower_calls
    val = classification_metrics(predict(model, inputs["val"], train_classes), y_val, len(train_classes))
    results = {}
    for part, (index, classes) in tests.items():
        part_names = [words[c] for c in classes]
        test_inputs = ImageInputs(model, image_set.images[index], mean, std)
        predictions = predict(model, test_inputs, part_names)
        results[part] = classification_metrics(predictions, local(index, classes), len(classes))
    metrics: dict[str, Any] = {
        "split_sizes": {
            "train": len(train_index),
            "val": len(val_index),
            **{f"test_{k}": len(v[0]) for k, v in tests.items()},
        },
        "class_names": names,
        "val_accuracy": val["accuracy"],
        "val_balanced_accuracy": val["balanced_accuracy"],
        "eval_text_tower_calls": model.text_tower_calls - calls_before,
        "eval_class_sets": len({tuple(train_classes), *(tuple(words[i] for i in c) for _, c in tests.values())}),
        "class_words": words,
    }
    if config.base_to_novel:
        base, novel = results["base"], results["novel"]
        metrics.update(
            {
                "base_classes": [names[c] for c in tests["base"][1]],
                "novel_classes": [names[c] for c in tests["novel"][1]],
                "base_accuracy": base["accuracy"],
                "novel_accuracy": novel["accuracy"],
                "harmonic_mean": harmonic_mean(base["accuracy"], novel["accuracy"]),
                "accuracy": harmonic_mean(base["accuracy"], novel["accuracy"]),
                "balanced_accuracy": harmonic_mean(base["balanced_accuracy"], novel["balanced_accuracy"]),
                "base_balanced_accuracy": base["balanced_accuracy"],
                "novel_balanced_accuracy": novel["balanced_accuracy"],
                "majority_accuracy": harmonic_mean(base["majority_accuracy"], novel["majority_accuracy"]),
                "n": base["n"] + novel["n"],
            }
        )
    else:
        metrics.update(results["all"])
    emit(
        {
            "phase": "test",
            "accuracy": metrics["accuracy"],
            "balanced_accuracy": metrics["balanced_accuracy"],
            "elapsed_s": time.perf_counter() - started,
        }
    )
    costs: dict[str, Any] = {}
    if compute_costs:
        emit(
            {
                "phase": "cost",
                "message": "counting GMACs and measuring latency",
                "elapsed_s": time.perf_counter() - started,
            }
        )
        costs = clip_costs(model, words, amortise_images=config.amortise_images, measure=config.measure_latency)
        costs["cost_classes"] = "every class of the data set"
    timings = {"train_seconds": train_seconds, "epochs_completed": epochs_done, "threads": torch.get_num_threads()}
    return {
        "status": "done",
        "metrics": metrics,
        "costs": costs,
        "timings": timings,
        "curve": curve,
        "state": model.trainable_state(),
        "class_names": names,
    }


def _train(config, model, inputs, y_train, y_val, class_names, emit, cancelled, started):
    n = len(inputs["train"])
    if n == 0:
        raise ConfigError("no training images: the training split is empty")
    steps_per_epoch = max(1, math.ceil(n / config.batch_size))
    total, warmup = steps_per_epoch * config.epochs, int(round(config.warmup_epochs * steps_per_epoch))
    params = model.trainable_parameters()
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    curve, step, loop_started = [], 0, time.perf_counter()
    every = max(1, math.ceil(config.epochs / 5))
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            if cancelled():
                return curve, epoch
            index = order[start : start + config.batch_size]
            lr = lr_at(step, total, warmup, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            text, vision = model.text_features(class_names)  # once per step: the gradients go through it
            logits = model.logits(inputs["train"].image_features(index, vision), text)
            loss = nn.functional.cross_entropy(logits.float(), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            elapsed = time.perf_counter() - loop_started
            emit(
                {
                    "phase": "train",
                    "step": step,
                    "total_steps": total,
                    "epoch": epoch + 1,
                    "loss": float(loss.detach()),
                    "lr": lr,
                    "elapsed_s": time.perf_counter() - started,
                    "eta_s": elapsed / step * (total - step),
                }
            )
        if (epoch + 1) % every and epoch + 1 != config.epochs:
            continue
        val = classification_metrics(predict(model, inputs["val"], class_names), y_val, len(class_names))
        point = {
            "phase": "val",
            "epoch": epoch + 1,
            "step": step,
            "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "loss": float(loss.detach()),
            "elapsed_s": time.perf_counter() - started,
            "eta_s": (time.perf_counter() - loop_started) / step * (total - step),
        }
        curve.append(point)
        emit(point)
    return curve, config.epochs


# ---------------------------------------------------------------------------------------- jobs
def submit_vlprompt(
    store: RunStore,
    config: VLPromptConfig,
    *,
    source: str = "live",
    sweep_id: str | None = None,
    status: str = "queued",
) -> int:
    """Validate and store one run of kind "vlprompt"; returns its id."""
    config.validate()
    if config.resolution is None:
        config.resolution = clip_input_size(config.backbone)
    return store.create_run(config.to_dict(), status=status, kind=KIND, source=source, sweep_id=sweep_id)


def clip_input_size(backbone: str) -> int | None:
    """The model's input size from its open_clip configuration (no weights loaded); None if unknown."""
    if backbone == clip.TINY_CLIP:
        return clip.TINY_IMAGE_SIZE
    try:
        name, _ = clip.parse_clip_name(backbone)
        size = clip.model_config(name)["vision_cfg"]["image_size"]
    except Exception:  # noqa: BLE001 - unknown models fail later, when loaded, with their own message
        return None
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def execute_vlprompt(store: RunStore, run_id: int, *, echo: Callable[[dict], None] | None = None) -> dict:
    """Run a stored vlprompt job to its end; never raises for a failing job (stored as failed)."""
    row = claim_job(store, run_id)
    emit = ProgressWriter(store, run_id, echo)
    try:
        config = VLPromptConfig.from_dict(row["config"])
        result = run_vlprompt(config, on_event=emit, should_cancel=lambda: store.is_cancel_requested(run_id))
    except Exception as exc:  # noqa: BLE001 - stored with the run, never kills the worker
        return fail_job(store, run_id, exc)
    if store.get_run(run_id) is None:
        return {"id": run_id, "status": "deleted"}
    store.update_config(run_id, config.to_dict())  # the resolved resolution
    if result["state"]:
        store.save_artifact(run_id, result["state"], metadata={"class_names": ",".join(result["class_names"])})
    store.finish_run(
        run_id, result["status"], metrics=result["metrics"], costs=result["costs"], timings=result["timings"]
    )
    return store.get_run(run_id)


def vlprompt_now(
    store: RunStore,
    config: VLPromptConfig,
    *,
    source: str = "cli",
    sweep_id: str | None = None,
    echo: Callable[[dict], None] | None = None,
) -> dict:
    """Run in this process (CLI, benchmarks); created 'running' so no worker claims it meanwhile."""
    run_id = submit_vlprompt(store, config, source=source, sweep_id=sweep_id, status="running")
    return execute_vlprompt(store, run_id, echo=echo)


def sweep_vlprompt_configs(
    base: VLPromptConfig,
    methods: Sequence[str],
    text_prompts: Sequence[int],
    depths: Sequence[int | None],
    seeds: Sequence[int],
) -> list[VLPromptConfig]:
    """The grid methods x text prompts x depths x seeds; zero-shot once per seed (it has no budget),
    depth only varies MaPLe. Every configuration is validated before any runs."""
    configs, seen = [], set()
    for seed in seeds:
        for method in methods:
            for count in [None] if method == "zeroshot" else text_prompts:
                for depth in depths if method == "maple" else [None]:
                    values = {**base.to_dict(), "method": method, "text_prompts": count, "prompt_depth": depth}
                    values.update({"seed": seed, "vision_prompts": None})
                    config = VLPromptConfig.from_dict(values).validate()
                    key = str(sorted(config.to_dict().items()))
                    if key not in seen:
                        seen.add(key)
                        configs.append(config)
    return configs


def trained_model(store: RunStore, run_id: int) -> tuple[clip.PromptedCLIP, VLPromptConfig, list[str]]:
    """A finished vlprompt run's model (frozen CLIP + its stored prompts, eval mode), its configuration
    and the words its text tower read per class."""
    row = store.get_run(run_id)
    if row is None or row.get("kind") != KIND:
        raise ConfigError(f"run {run_id} is not a vision-language prompt run")
    config = VLPromptConfig.from_dict(row["config"])
    model = build_model(config)
    if row.get("artifact_path"):
        model.load_trainable_state(store.load_artifact(run_id))
    metrics = row.get("metrics") or {}
    return model.eval(), config, list(metrics.get("class_words") or metrics.get("class_names") or [])


@torch.inference_mode()
def image_attention(model: clip.PromptedCLIP, images_uint8: torch.Tensor, class_words: Sequence[str]) -> AttentionMaps:
    """Every image layer's attention for these images, with the run's vision prompts, in the form the
    Attention page reads for a prompted ViT (token order [CLS, prompts, patches])."""
    _, vision = model.text_features(list(class_words) or ["object"])
    record: list[torch.Tensor] = []
    model.encode_image(data.normalize(images_uint8, model.bundle.mean, model.bundle.std), vision, record=record)
    grid = int(round((model.clip.visual.positional_embedding.shape[0] - 1) ** 0.5))
    n = model.vision_prompts
    layers = range(len(record))
    return AttentionMaps(
        blocks=[BlockAttention(i, probs, n) for i, probs in zip(layers, record)],
        num_prefix_tokens=1,
        has_class_token=True,
        grid=(grid, grid),
        placement=tuple(layers) if n else (),
        prompt_counts=tuple(n for _ in layers) if n else (),
    )


__all__ = [
    "FAMILIES",
    "KIND",
    "VLPromptConfig",
    "base_novel_classes",
    "base_novel_split",
    "clip_costs",
    "execute_vlprompt",
    "family_and_label",
    "harmonic_mean",
    "image_attention",
    "predict",
    "run_vlprompt",
    "submit_vlprompt",
    "sweep_vlprompt_configs",
    "trained_model",
    "vlprompt_now",
]

register_kind(KIND, execute_vlprompt)
