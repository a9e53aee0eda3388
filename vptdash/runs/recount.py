"""The full-graph compute of stored runs that predate it, counted again from their configurations.

`costs.gmacs_full_graph` (every token through every block: the convention of published FLOPs tables,
`engine.cost.full_graph_gmacs`) depends only on the architecture: backbone, resolution, prompts per
block, prompt type and rank, skipped blocks, number of classes. It needs no training, no data and no
trained values, so a run stored before the key existed gets it from its configuration alone.

One function fills a run store (`fill_full_graph`: the `vptdash runs recount` command and the
dashboard, once per process when it opens the store, call it) and one a list of exported rows in place
(`fill_full_graph_rows`: the shipped reference files, `benchmarks/recount_full_graph.py`). A run whose
architecture cannot be built here (a hub backbone offline, a weights file gone) keeps no value: its
full-graph compute stays unknown, and the Budget explorer shows it as "cost unknown".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vptdash.engine import backbones
from vptdash.engine.clip import is_clip_backbone
from vptdash.engine.cost import full_graph_gmacs
from vptdash.engine.prompts import PromptConfigError, PromptedViT
from vptdash.engine.train import ConfigError, RunConfig
from vptdash.runs.store import RunStore

KEY = "gmacs_full_graph"
# Kinds stored by the runs layer itself that have a per-image cost; a plug-in kind qualifies when it
# stored the executed count ("gmacs") with its run, as every kind built on PromptedViT does.
_OWN_KINDS = ("train", "probe")


class RecountError(ValueError):
    """This run's full-graph compute cannot be counted here; the message says why in one line."""


@dataclass
class RecountResult:
    counted: int = 0  # runs that got the key
    unknown: dict[int | str, str] = field(default_factory=dict)  # run id (or row index) -> why not

    def line(self) -> str:
        """ "counted the full-graph GMACs of 12 runs; 1 left unknown (#7: ...)"."""
        text = f"counted the full-graph GMACs of {self.counted} run{'s' if self.counted != 1 else ''}"
        if self.unknown:
            first_id, why = next(iter(self.unknown.items()))
            text += f"; {len(self.unknown)} left unknown (#{first_id}: {why})"
        return text


def needs_full_graph(run: dict) -> bool:
    """A finished budget run of a prompted ViT whose costs lack the full-graph count."""
    costs = run.get("costs") or {}
    config = run.get("config") or {}
    if run.get("status", "done") != "done" or costs.get(KEY) is not None:
        return False
    if is_clip_backbone(config.get("backbone")):
        return False  # CLIP runs count their image and text towers themselves (engine.clip)
    return run.get("kind", "train") in _OWN_KINDS or costs.get("gmacs") is not None


def num_classes_of(run: dict) -> int | None:
    """How many classes the run's head had: its class names, else its confusion matrix."""
    metrics = run.get("metrics") or {}
    names, matrix = metrics.get("class_names"), metrics.get("confusion_matrix")
    if isinstance(names, list) and len(names) >= 2:
        return len(names)
    if isinstance(matrix, list) and len(matrix) >= 2:
        return len(matrix)
    return None


def architecture_model(config: RunConfig, num_classes: int) -> PromptedViT:
    """The run's model as far as its cost goes: the same backbone, resolution, per-block prompt counts,
    prompt type and rank, skipped blocks and head. Whitened bilinear prompts are built as bilinear ones
    of the same rank: the whitening only sets their initial values, which no count depends on."""
    backbone = backbones.load_backbone(config.backbone, config.weights, config.resolution)
    config.validate(depth=len(backbone.blocks))
    if config.prompt_counts is not None:
        num_prompts: Any = list(config.prompt_counts)
    else:
        num_prompts = 0 if config.is_linear_probe else config.num_prompts
    options: dict[str, Any] = {}
    if config.is_bilinear:
        options = {"prompt_type": "bilinear", "prompt_rank": config.effective_prompt_rank()}
    return PromptedViT(
        backbone,
        num_classes,
        num_prompts=num_prompts,
        placement=config.placement,
        tuning="linear" if config.is_linear_probe else "prompt",  # "full" would copy the backbone: same graph
        skip_blocks=config.skip_blocks,
        **options,
    )


def full_graph_of(run: dict) -> float:
    """The run's full-graph GMACs per image (`engine.cost.full_graph_gmacs` of its architecture);
    RecountError with one line when it cannot be counted here."""
    classes = num_classes_of(run)
    if classes is None:
        raise RecountError("its number of classes is not stored")
    try:
        config = RunConfig.from_dict(run.get("config") or {})
    except Exception as exc:  # noqa: BLE001 - any malformed stored config: one line, not a traceback
        raise RecountError(f"its configuration cannot be read ({exc})") from None
    try:
        model = architecture_model(config, classes)
    except (backbones.BackboneError, ConfigError, PromptConfigError, OSError, ValueError) as exc:
        raise RecountError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return full_graph_gmacs(model, config.resolution)


def _fill(runs: list[dict], label) -> tuple[RecountResult, dict[Any, float]]:
    """Count every run that needs it, once per architecture (the count depends on nothing else)."""
    result, filled, seen = RecountResult(), {}, {}
    for index, run in enumerate(runs):
        if not needs_full_graph(run):
            continue
        key = (repr(sorted({**(run.get("config") or {}), "seed": None}.items())), num_classes_of(run))
        if key not in seen:
            try:
                seen[key] = full_graph_of(run)
            except RecountError as exc:
                seen[key] = exc
        value = seen[key]
        if isinstance(value, RecountError):
            result.unknown[label(index, run)] = str(value)
            continue
        filled[index] = value
        result.counted += 1
    return result, filled


def fill_full_graph_rows(runs: list[dict]) -> RecountResult:
    """Add `costs.gmacs_full_graph`, in place, to exported rows (`RunStore.export_runs`, the reference
    files) that lack it; rows it cannot count are left as they are and named in the result."""
    result, filled = _fill(runs, lambda index, run: run.get("id", index))
    for index, value in filled.items():
        runs[index]["costs"] = {**(runs[index].get("costs") or {}), KEY: value}
    return result


def fill_full_graph(store: RunStore) -> RecountResult:
    """Add `costs.gmacs_full_graph` to every finished run of `store` that lacks it (nothing else
    changes). A read-only store is left alone."""
    if store.read_only:
        return RecountResult()
    runs = [run for run in store.list_runs(status="done") if needs_full_graph(run)]
    result, filled = _fill(runs, lambda index, run: run["id"])
    for index, value in filled.items():
        store.update_results(runs[index]["id"], costs={KEY: value})
    return result
