"""What a prompt budget costs: parameters, GMACs counted from the real graph, and measured latency.

Units: fvcore counts one multiply-add as one "flop", i.e. MACs. Every figure here is in GMACs per
image (1 GMAC = 2 GFLOPs). fvcore does not count `scaled_dot_product_attention`, so the count is
taken with timm's fused attention switched off: the attention matmuls then appear as plain matmuls
and are counted, which matters because they grow quadratically with the prompt count.

Two conventions, both true, and a figure must say which one it is:
- executed graph (`gmacs`, `analytic_gmacs`): what runs here. Blocks compute only the output rows
  something reads (`vptdash.engine.rows`: deep prompts are keys and values only, the last block computes
  the CLS row), following `PromptedViT.rows_per_block`. This is what a deployment pays.
- full graph (`gmacs_full_graph`, `full_graph_gmacs`): every token through every block, as the official
  VPT code runs and as published FLOPs tables count (Kim et al.: ViT-B/16 17.6 / 26.9 GFLOPs at 0 / 100
  prompts, in their table's MAC-as-FLOP unit).

Counted once per architecture: fvcore's count depends only on the architecture, and latency only on
the architecture, the machine and the precision, so `run_costs` given an architecture key keeps both in
`costs.json` in the cache dir and every later run of that architecture reuses them (a trace and the
timed forward passes took 3-20 s of a few-shot run). The analytic count is exact for the executed graph,
so it is always computed afresh (microseconds) and guards each reused count: an entry whose analytic
GMACs or parameter count disagree with the model at hand (the executed graph changed) is counted again.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vptdash.engine import openmp
from vptdash.engine.paths import cache_dir
from vptdash.engine.precision import cpu_description
from vptdash.engine.prompts import PromptedViT, patch_size_of


# ---------------------------------------------------------------------------------------- parameters
def count_parameters(model: PromptedViT) -> dict[str, int]:
    prompt_params = sum(p.numel() for p in model.prompts.parameters())
    return {
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_prompts": prompt_params,
        "params_head": sum(p.numel() for p in model.head.parameters()),
    }


# ---------------------------------------------------------------------------------------- GMACs
@contextmanager
def unfused_attention(model: nn.Module):
    """Temporarily route timm attention through explicit matmuls (countable, inspectable)."""
    switched = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    for module in switched:
        module.fused_attn = False
    try:
        yield model
    finally:
        for module in switched:
            module.fused_attn = True


def load_counter() -> None:
    """Import fvcore ahead of the first count (a waiting worker's head start: it takes about a second)."""
    import fvcore.nn  # noqa: F401, PLC0415 - slow to import: loaded ahead only by a worker that waits anyway


def fvcore_gmacs(model: PromptedViT, resolution: int) -> float:
    """GMACs per image of the inference graph, counted by fvcore from a traced forward pass."""
    from fvcore.nn import FlopCountAnalysis  # noqa: PLC0415 - slow to import (~1 s): only when counting

    was_training = model.training
    model.eval()
    image = torch.zeros(1, 3, resolution, resolution)
    try:
        with unfused_attention(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, image)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            total = analysis.total()
    finally:
        model.train(was_training)
    return total / 1e9


def block_macs(tokens: int, dim: int, mlp_dim: int, rows: int | None = None) -> int:
    """One transformer block on N tokens computing R output rows (R = N: the whole block).

    Keys and values for every token (2 N d^2); query + proj (2 R d^2), MLP (2 R d m) and QK^T, AV
    (2 R N d) for the computed rows only (`vptdash.engine.rows`)."""
    rows = tokens if rows is None else rows
    return 2 * tokens * dim * dim + rows * (2 * dim * dim + 2 * dim * mlp_dim) + 2 * rows * tokens * dim


def analytic_gmacs(model: PromptedViT, resolution: int) -> float:
    """The formula beside the counter: blocks (with their real token counts) + patch embedding + head."""
    backbone = model.backbone
    patch = patch_size_of(backbone)
    num_patches = (resolution // patch) ** 2
    in_chans = backbone.patch_embed.proj.in_channels
    mlp_dim = backbone.blocks[0].mlp.fc1.out_features
    dim = model.embed_dim
    tokens, rows = model.tokens_per_block(num_patches), model.rows_per_block(num_patches)
    blocks = sum(block_macs(n, dim, mlp_dim, r) for n, r in zip(tokens, rows) if n)
    patch_embed = num_patches * in_chans * patch * patch * dim
    head = dim * model.head.out_features
    return (blocks + patch_embed + head) / 1e9


LAYER_NORM_OPS_PER_ELEMENT = 5  # fvcore's count for an affine LayerNorm (mean, variance, scale, shift)


def full_graph_gmacs(model: PromptedViT, resolution: int) -> float:
    """GMACs per image with every token through every block (row selection off): the convention of
    published FLOPs tables. Analytic: `analytic_gmacs`'s matmuls on whole blocks plus the layer norms,
    counted as the counters behind those tables count them (`LAYER_NORM_OPS_PER_ELEMENT` per element,
    two per block and the final one), so it matches `fvcore_full_graph_gmacs` to the MAC; ViT-B/16 at
    224 px: 17.58 at 0 prompts, 27.00 at 100."""
    with model.whole_blocks():
        matmuls = analytic_gmacs(model, resolution)
        num_patches = (resolution // patch_size_of(model.backbone)) ** 2
        tokens = model.tokens_per_block(num_patches)
    final_tokens = model.num_prefix_tokens + num_patches + (model.prompt_counts[-1] if model.placement else 0)
    norm_elements = (2 * sum(tokens) + final_tokens) * model.embed_dim
    return matmuls + LAYER_NORM_OPS_PER_ELEMENT * norm_elements / 1e9


def fvcore_full_graph_gmacs(model: PromptedViT, resolution: int) -> float:
    """fvcore's count of the full graph (`PromptedViT.whole_blocks`): the cross-check of `full_graph_gmacs`."""
    with model.whole_blocks():
        return fvcore_gmacs(model, resolution)


# ---------------------------------------------------------------------------------------- latency
@torch.inference_mode()
def measure_latency(
    model: PromptedViT,
    resolution: int,
    *,
    batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 10,
    max_seconds: float = 5.0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Median and spread of wall-clock forward time, after warm-up, in ms per image.

    Stops early after `max_seconds` of timed repeats (but always keeps at least 3), so a big
    batch on a slow CPU cannot stall a sweep."""
    was_training = model.training
    model.eval()
    images = torch.randn(batch_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    times = []
    with autocast:
        for _ in range(warmup):
            model(images)
        budget_start = time.perf_counter()
        for index in range(repeats):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
            if index >= 2 and time.perf_counter() - budget_start > max_seconds:
                break
    model.train(was_training)
    per_image_ms = sorted(t * 1000 / batch_size for t in times)
    quartiles = statistics.quantiles(per_image_ms, n=4) if len(per_image_ms) >= 2 else per_image_ms * 3
    return {
        "batch_size": batch_size,
        "median_ms_per_image": statistics.median(per_image_ms),
        "p25_ms_per_image": quartiles[0],
        "p75_ms_per_image": quartiles[-1],
        "repeats": len(per_image_ms),
        "threads": torch.get_num_threads(),
        "precision": precision,
    }


# ---------------------------------------------------------------------------------------- all together
def latency_costs(model: PromptedViT, resolution: int, *, precision: str = "fp32") -> dict[str, Any]:
    """The latency figures stored with a run: batch 1 and batch 32, median and quartiles, ms per image.

    It depends on the architecture only (not on trained values, seed or data), so a sweep may measure
    it once per budget on a quiet machine (`executors.LocalExecutor` with several processes)."""
    b1 = measure_latency(model, resolution, batch_size=1, repeats=20, precision=precision)
    # Batch 32: at least 3 timed batches, more only within 1 s (with 100 prompts one fp32 batch takes
    # 1.5 s here; a sweep measures a dozen architectures and latency was a sixth of its time).
    b32 = measure_latency(model, resolution, batch_size=32, warmup=1, repeats=5, max_seconds=1.0, precision=precision)
    return {
        "latency_ms_b1": b1["median_ms_per_image"],
        "latency_ms_b1_p25": b1["p25_ms_per_image"],
        "latency_ms_b1_p75": b1["p75_ms_per_image"],
        "latency_ms_b32": b32["median_ms_per_image"],
        "latency_ms_b32_p25": b32["p25_ms_per_image"],
        "latency_ms_b32_p75": b32["p75_ms_per_image"],
        "latency_threads": b1["threads"],
        "latency_precision": precision,
        "latency_openmp_wait": openmp.in_force(),
    }


def run_costs(
    model: PromptedViT,
    resolution: int,
    *,
    measure: bool = True,
    precision: str = "fp32",
    architecture: str | None = None,
    cache_path: Path | None = None,
) -> dict[str, Any]:
    """Every cost figure of one trained model, flat, as stored with the run.

    `gmacs` is the executed graph counted by fvcore (what runs here); `gmacs_full_graph` every token
    through every block (published tables' convention, analytic: the formula matches fvcore within 1%
    and costs no trace); `gmacs_analytic` the executed graph by formula.

    With `architecture` (`train.architecture_key` of the run's configuration) fvcore's count and the
    latency come from the per-machine cost cache when this architecture was counted (and timed, on this
    machine, at this precision and thread count) before; "gmacs_cached" and "latency_cached" say which."""
    costs: dict[str, Any] = count_parameters(model)
    costs["gmacs_full_graph"] = full_graph_gmacs(model, resolution)
    costs["gmacs_analytic"] = analytic_gmacs(model, resolution)
    num_patches = (resolution // patch_size_of(model.backbone)) ** 2
    costs["tokens_per_block"] = model.tokens_per_block(num_patches)
    costs["rows_per_block"] = model.rows_per_block(num_patches)
    cache = CostCache(cache_path or default_cost_cache_path()) if architecture is not None else None
    check = _cache_check(costs["gmacs_analytic"], costs["params_total"], resolution)
    count_key = _count_key(architecture) if cache else None
    count = cache.get("gmacs", count_key, check, ("gmacs",)) if cache else None
    costs["gmacs"] = count["gmacs"] if count else fvcore_gmacs(model, resolution)
    costs["gmacs_cached"] = count is not None
    if cache and count is None:
        cache.put("gmacs", count_key, check, {"gmacs": costs["gmacs"]})
    if measure:
        costs.update(_latency_through(cache, architecture, check, model, resolution, precision))
    return costs


def cached_latency_costs(
    model: PromptedViT,
    resolution: int,
    *,
    architecture: str,
    precision: str = "fp32",
    cache_path: Path | None = None,
) -> dict[str, Any]:
    """`latency_costs` through the per-machine cost cache, as `run_costs` measures it: what a parallel sweep
    measures up front, once per architecture, is then reused by every later run or sweep on this machine.
    "latency_cached" says whether the figures came from the cache."""
    cache = CostCache(cache_path or default_cost_cache_path())
    check = _model_check(model, resolution)
    return _latency_through(cache, architecture, check, model, resolution, precision)


def latency_in_cache(
    model: PromptedViT, resolution: int, *, architecture: str, precision: str = "fp32", cache_path: Path | None = None
) -> bool:
    """Whether `cached_latency_costs` would read this architecture's latency from the cache (measuring
    nothing), with the threads `latency_threads` sets."""
    cache = CostCache(cache_path or default_cost_cache_path())
    check = _model_check(model, resolution)
    return cache.get("latency", _latency_key(architecture, precision), check, LATENCY_KEYS) is not None


def _model_check(model: PromptedViT, resolution: int) -> dict:
    return _cache_check(analytic_gmacs(model, resolution), count_parameters(model)["params_total"], resolution)


def _cache_check(gmacs_analytic: float, params_total: int, resolution: int) -> dict:
    """What a reused entry must agree with: the analytic count follows the executed graph exactly."""
    return {"gmacs_analytic": gmacs_analytic, "params_total": params_total, "resolution": resolution}


# Threads latency is measured (and cached) with while set by `latency_threads`; None: the process's own.
_latency_threads: int | None = None


@contextmanager
def latency_threads(threads: int):
    """Inside, latency is timed and looked up with `threads` torch threads, whatever the caller trains
    with: a run in one of the worker's two lanes trains with half the cores, but its latency is a figure
    of the machine (all of the worker's threads), the same as a run alone stores and the warm-up caches."""
    global _latency_threads
    before = _latency_threads
    _latency_threads = threads
    try:
        yield
    finally:
        _latency_threads = before


@contextmanager
def _torch_threads(threads: int | None):
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _latency_through(
    cache: CostCache | None, architecture: str | None, check: dict, model: PromptedViT, resolution: int, precision: str
) -> dict[str, Any]:
    latency_key = _latency_key(architecture, precision) if cache else None
    latency = cache.get("latency", latency_key, check, LATENCY_KEYS) if cache else None
    cached = latency is not None
    if latency is None:
        with _torch_threads(_latency_threads):  # the key names these threads: time with them
            latency = latency_costs(model, resolution, precision=precision)
        if cache:
            cache.put("latency", latency_key, check, latency)
    return {**latency, "latency_cached": cached}


# ---------------------------------------------------------------------------------------- the cache
LATENCY_KEYS = ("latency_ms_b1", "latency_ms_b32")
# Bump when the executed graph changes in a way the analytic check would not notice.
COUNT_VERSION = 1
COST_CACHE_FILE = "costs.json"


def default_cost_cache_path() -> Path:
    return cache_dir() / COST_CACHE_FILE


def _count_key(architecture: str) -> str:
    """fvcore's count depends on the architecture and on the code that builds and traces it."""
    return json.dumps(
        {"architecture": architecture, "version": COUNT_VERSION, "torch": torch.__version__, "timm": timm.__version__},
        sort_keys=True,
    )


def _latency_key(architecture: str, precision: str) -> str:
    """Latency also depends on the machine (CPU model and flags, threads, torch) and the precision."""
    machine = cpu_description()
    if _latency_threads is not None:  # timed with these threads (`latency_threads`), whatever runs now
        machine = {**machine, "threads": _latency_threads}
    return json.dumps({"architecture": architecture, "machine": machine, "precision": precision}, sort_keys=True)


class CostCache:
    """`costs.json` in the cache dir: {"gmacs": {key: entry}, "latency": {key: entry}}, each entry holding
    the figures and the `check` values they were measured with.

    Written atomically (a reader sees the old file or the new one; two processes writing at once lose at
    most one entry, which is counted again later). An unreadable file prints one warning line and is
    replaced by the next write: a cache never fails a run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict | None = None

    def _read(self, *, warn: bool) -> dict:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            if warn:
                self._warn(f"cannot be read ({exc.strerror or exc})")
            return {}
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            if warn:
                self._warn("is not a valid cost cache")
            return {}
        return value

    def _warn(self, what: str) -> None:
        print(f"warning: cost cache {self.path} {what}; counting and timing again", file=sys.stderr)

    def get(self, section: str, key: str, check: dict, required: tuple[str, ...]) -> dict | None:
        """The values stored under `key` if their check values equal `check` and every `required` value is
        a number; else None."""
        if self._entries is None:  # read (and warn) once per cache object, i.e. once per run
            self._entries = self._read(warn=True)
        entry = self._entries.get(section, {}).get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("values"), dict):
            return None
        stored = entry.get("check")
        if not isinstance(stored, dict) or set(stored) != set(check):
            return None
        if any(not _close(stored[name], value) for name, value in check.items()):
            return None
        values = entry["values"]
        if any(
            not isinstance(values.get(name), (int, float)) or isinstance(values.get(name), bool) for name in required
        ):
            return None
        return values

    def put(self, section: str, key: str, check: dict, values: dict) -> None:
        entries = self._read(warn=False)  # afresh: keep what other processes wrote meanwhile
        entries.setdefault(section, {})[key] = {"check": check, "values": values, "measured_at": time.time()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".costs-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(entries, handle, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError:  # a read-only or full cache dir costs the next run a recount, nothing else
            pass


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b
