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
"""

from __future__ import annotations

import statistics
import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

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
    }


def run_costs(model: PromptedViT, resolution: int, *, measure: bool = True, precision: str = "fp32") -> dict[str, Any]:
    """Every cost figure of one trained model, flat, as stored with the run.

    `gmacs` is the executed graph counted by fvcore (what runs here); `gmacs_full_graph` every token
    through every block (published tables' convention, analytic: the formula matches fvcore within 1%
    and costs no trace); `gmacs_analytic` the executed graph by formula."""
    costs: dict[str, Any] = count_parameters(model)
    costs["gmacs"] = fvcore_gmacs(model, resolution)
    costs["gmacs_full_graph"] = full_graph_gmacs(model, resolution)
    costs["gmacs_analytic"] = analytic_gmacs(model, resolution)
    num_patches = (resolution // patch_size_of(model.backbone)) ** 2
    costs["tokens_per_block"] = model.tokens_per_block(num_patches)
    costs["rows_per_block"] = model.rows_per_block(num_patches)
    if measure:
        costs.update(latency_costs(model, resolution, precision=precision))
    return costs
