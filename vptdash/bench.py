"""`python -m vptdash bench --json`: how close the engine runs to this machine's limit.

In one process it measures
  - the machine's matmul peak (fp32 and bf16),
  - the training throughput of a standard configuration with the project's engine (bf16 autocast,
    frozen layers encoded once, data decoded once, only the block output rows something reads:
    `vptdash.engine.rows`),
  - the same configuration with a naive reference loop written here (eager fp32, images decoded and
    resized from disk every step, the whole network recomputed every step with every block computing
    every token, as the official VPT code does),
  - optionally, the standard meeting sweep end to end.
Achieved GFLOP/s counts what the step really executes (torch's FlopCounterMode over forward and
backward, attention unfused so that it is counted), divided by the measured step time; the FLOPs of
both steps are reported (`engine_step_gflop`, `naive_step_gflop`): work not done is not counted.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vptdash.engine import compiled, data, paths
from vptdash.engine.backbones import load_backbone
from vptdash.engine.cost import unfused_attention
from vptdash.engine.precision import block_shapes, choose_precision, cpu_description, machine_override
from vptdash.engine.prompts import PromptedViT
from vptdash.engine.train import RunConfig, autocast, training_precision
from vptdash.runs import floor
from vptdash.runs.executors import LocalExecutor
from vptdash.runs.jobs import new_sweep_id
from vptdash.runs.presets import meeting_sweep_configs
from vptdash.runs.store import RunStore

STANDARD = dict(
    backbone="dinov2_s14", dataset="elpv-binary", resolution=112, num_prompts=10, placement="deep", batch_size=32
)


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """Best sustained GFLOP/s of a square matmul (2 n^3 flops) over a short window."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def step_flops(
    model: PromptedViT, batch: torch.Tensor, labels: torch.Tensor, *, from_frozen: bool, row_selection: bool = True
) -> float:
    """FLOPs (2 per multiply-add) of one training step, forward and backward, as executed."""
    rows = nullcontext() if row_selection else model.whole_blocks()
    with rows, unfused_attention(model), FlopCounterMode(display=False) as counter:
        logits = model.forward_from_frozen(batch) if from_frozen else model(batch)
        nn.functional.cross_entropy(logits, labels).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _normalized(model: PromptedViT, images: torch.Tensor) -> torch.Tensor:
    return data.normalize(images, model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"])


def engine_batches(model: PromptedViT, images: torch.Tensor, precision: str):
    """What the engine trains on: the frozen prefix encoded once (patch embedding for block-0 prompts)."""
    with autocast(precision):
        return model.encode_frozen(_normalized(model, images)).float()


def time_engine_steps(
    model: PromptedViT,
    encoded: torch.Tensor,
    labels: torch.Tensor,
    *,
    precision: str,
    steps: int,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Seconds per step of the engine's inner loop (as in `train.run_training`'s loop), through `forward`
    (the compiled step) when given."""
    step = timed_step(model, encoded, labels, precision=precision)
    times = [step(forward or model.forward_from_frozen) for _ in range(steps + 1)]
    times = times[1:]  # the first step warms caches and allocators
    return sorted(times)[len(times) // 2]


def timed_step(
    model: PromptedViT, encoded: torch.Tensor, labels: torch.Tensor, *, precision: str
) -> Callable[[Callable[[torch.Tensor], torch.Tensor]], float]:
    """One engine training step on this batch (AdamW, as `train.run_training` steps), through the forward
    it is given (eager or compiled, sharing one optimizer), returning its seconds."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)

    def step(forward: Callable[[torch.Tensor], torch.Tensor]) -> float:
        start = time.perf_counter()
        with training_precision(model, precision):
            logits = forward(encoded)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def time_compiled_steps(
    model: PromptedViT, encoded: torch.Tensor, labels: torch.Tensor, *, precision: str, steps: int
) -> tuple[float, float]:
    """(seconds per step, seconds of the compile and its first step) of the compiled step a long run
    trains with (`engine.compiled`): inductor's cache may already hold it, as it would for a run."""
    forward = compiled.compile_forward(model.forward_from_frozen)
    compile_s = timed_step(model, encoded, labels, precision=precision)(forward)  # forward and backward compile
    return time_engine_steps(model, encoded, labels, precision=precision, steps=steps, forward=forward), compile_s


def time_naive_steps(model: PromptedViT, files: list[str], labels: torch.Tensor, resolution: int, steps: int) -> float:
    """Seconds per step of the naive reference: decode + resize + normalise from disk, fp32 eager, full forward."""
    mean = torch.tensor(model.backbone.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.pretrained_cfg["std"]).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        batch = []
        for path in files:
            with Image.open(path) as image:
                grey = image.convert("RGB").resize((resolution, resolution), Image.BILINEAR)
                batch.append(torch.from_numpy(np.asarray(grey).copy()).permute(2, 0, 1))
        images = (torch.stack(batch).float() / 255 - mean) / std
        with model.whole_blocks():  # discarded prompt outputs computed too
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _elpv_files(image_set: data.ImageSet, count: int) -> list[str]:
    root = Path(find_spec("elpv_dataset").submodule_search_locations[0]) / "data"
    return [str(root / name) for name in image_set.files[:count]]


def run_bench(
    *,
    backbone: str = "dinov2_s14",
    resolution: int = 112,
    batch: int = 32,
    small_batch: int = 8,
    steps: int = 10,
    peak_seconds: float = 2.0,
    sweep: bool = False,
    late_blocks: str | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """All figures of `python -m vptdash bench`, in one process (see the module docstring).

    The engine trains in `precision` ("auto": whichever of fp32 and bf16 measured faster here, at the
    standard run's shapes, as a training run with precision "auto" does); the naive loop is always fp32.
    Keys for the few-shot batch (`small_batch`, the demo's 8) carry the suffix `_b8`."""
    config = RunConfig(**{**STANDARD, "backbone": backbone, "resolution": resolution, "batch_size": batch})
    result: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "backbone": backbone,
        "resolution": resolution,
        "batch_size": batch,
        "small_batch_size": small_batch,
        "prompts": config.num_prompts,
    }
    result["peak_gflops_fp32"] = matmul_peak_gflops(torch.float32, seconds=peak_seconds)
    result["peak_gflops_bf16"] = matmul_peak_gflops(torch.bfloat16, seconds=peak_seconds)

    image_set = data.load_image_set(config.dataset, config.resolution)
    model_backbone = load_backbone(config.backbone, None, config.resolution)
    depth = len(model_backbone.blocks)
    late_blocks = late_blocks or ",".join(str(b) for b in range(depth - depth // 3, depth))
    result["late_blocks"] = late_blocks
    tokens = model_backbone.patch_embed.num_patches + 1 + config.num_prompts
    mlp_dim = int(model_backbone.blocks[0].mlp.fc1.out_features)
    choice = choose_precision(precision, block_shapes(batch * tokens, int(model_backbone.embed_dim), mlp_dim))
    result["precision"], result["precision_reason"] = choice.precision, choice.reason
    # A long run (the full split) compiles its step when that pays here: the batch-32 figures are also
    # timed through the compiled step then (keys ending "_compiled"); short runs train eagerly.
    long_run = compiled.decide(choice.precision, compiled.COLD_MIN_IMAGES, warm=False, from_cache=True)
    result["long_runs_compile"], result["long_runs_compile_reason"] = long_run.compile, long_run.reason

    for size, batch_suffix in ((batch, ""), (small_batch, "_b8")):
        images, labels = image_set.images[:size], image_set.labels[:size]
        files = _elpv_files(image_set, size)
        for block_suffix, placement in (("", config.placement), ("_late", late_blocks)):
            suffix = block_suffix + batch_suffix
            model = PromptedViT(model_backbone, 2, num_prompts=config.num_prompts, placement=placement, seed=0)
            encoded = engine_batches(model, images, choice.precision)
            engine_s = time_engine_steps(model, encoded, labels, precision=choice.precision, steps=steps)
            naive_s = time_naive_steps(model, files, labels, config.resolution, steps=steps)  # equal step counts
            flops = step_flops(model, encoded, labels, from_frozen=True)
            naive_flops = step_flops(model, _normalized(model, images), labels, from_frozen=False, row_selection=False)
            result[f"engine_step_gflop{suffix}"] = flops / 1e9
            result[f"naive_step_gflop{suffix}"] = naive_flops / 1e9
            result[f"engine_images_per_s{suffix}"] = size / engine_s
            result[f"naive_images_per_s{suffix}"] = size / naive_s
            result[f"speedup_vs_naive{suffix}"] = naive_s / engine_s
            result[f"engine_gflops{suffix}"] = flops / engine_s / 1e9
            if long_run.compile and not batch_suffix:
                compiled_s, compile_s = time_compiled_steps(
                    model, encoded, labels, precision=choice.precision, steps=steps
                )
                result[f"compile_seconds{suffix}"] = compile_s
                result[f"engine_images_per_s{suffix}_compiled"] = size / compiled_s
                result[f"speedup_vs_naive{suffix}_compiled"] = naive_s / compiled_s
                result[f"engine_gflops{suffix}_compiled"] = flops / compiled_s / 1e9
    result["efficiency_vs_bf16_peak"] = result["engine_gflops"] / result["peak_gflops_bf16"]
    # Against the better of the two precisions' peaks: on a CPU whose bf16 is slow, the bf16 peak flatters.
    # A machine set to one precision (VPTDASH_PRECISION) is timed as a CPU that has only that one fast.
    setting = machine_override()
    result["precision_setting"] = setting or "auto"
    best_peak = (
        result[f"peak_gflops_{setting}"] if setting else max(result["peak_gflops_fp32"], result["peak_gflops_bf16"])
    )
    result["efficiency_vs_best_peak"] = result["engine_gflops"] / best_peak
    if "engine_gflops_compiled" in result:
        result["efficiency_vs_best_peak_compiled"] = result["engine_gflops_compiled"] / best_peak
    if sweep:
        processes = sweep_processes()
        result["sweep_processes"] = processes
        result["sweep_threads_per_process"] = max(1, torch.get_num_threads() // processes)
        peaks = sweep_peaks(result["peak_gflops_fp32"], result["peak_gflops_bf16"], processes, peak_seconds)
        result["sweep_seconds"], sweep_floor = time_meeting_sweep(processes, peaks=peaks)
        # What the sweep's arithmetic needs at the best rate its processes could reach together
        # (vptdash.runs.floor's convention): how far sweep_seconds is from what this CPU can do at all. The
        # probe's encoding is counted even when its features came from the cache, so it is reported apart.
        result["sweep_peak_gflops"] = sweep_floor["peak_gflops"]
        result["sweep_floor_s"] = sweep_floor["floor_s"]
        result["sweep_floor_encode_s"] = sweep_floor["encode_s"]
        result["sweep_efficiency_vs_floor"] = sweep_floor["floor_s"] / result["sweep_seconds"]
    else:
        result["sweep_seconds"] = None
    return result


def sweep_peaks(fp32: float, bf16: float, processes: int, seconds: float) -> tuple[float, float]:
    """The best matmul rates (fp32, bf16) a sweep of `processes` processes could reach together: with one,
    the all-thread peaks measured here; with several, also `processes` x the peak of one process's share of
    the threads (1-thread matmuls skip the threads' synchronisation, so side by side they can beat one
    2-thread matmul). The larger of the two, as a floor must not understate the machine."""
    if processes <= 1:
        return fp32, bf16
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // processes))
    try:
        share = (
            matmul_peak_gflops(torch.float32, seconds=seconds),
            matmul_peak_gflops(torch.bfloat16, seconds=seconds),
        )
    finally:
        torch.set_num_threads(threads)
    return max(fp32, processes * share[0]), max(bf16, processes * share[1])


def sweep_processes() -> int:
    """Two worker processes once there are two threads: on 2 cores two 1-thread runs side by side give more
    throughput than one 2-thread run (1.15x on full-split runs; executors.LocalExecutor)."""
    return 2 if torch.get_num_threads() >= 2 else 1


def run_meeting_sweep(processes: int = 1) -> tuple[float, list[dict], RunStore]:
    """The standard meeting sweep end to end, as `python -m vptdash sweep --processes N` runs it: latency
    measurement, training, evaluation, GMAC counts, storing. Returns its seconds, its finished runs (as
    stored) and their store."""
    store = RunStore(paths.data_dir() / "bench-sweep.sqlite")
    start = time.perf_counter()
    rows = LocalExecutor(processes).run(store, meeting_sweep_configs(), sweep_id=new_sweep_id(), source="cli")
    seconds = time.perf_counter() - start
    failed = [row["id"] for row in rows if row["status"] != "done"]
    if failed:
        raise RuntimeError(f"meeting sweep runs {failed} did not finish: see `python -m vptdash runs list`")
    return seconds, rows, store


def time_meeting_sweep(processes: int = 1, *, peaks: tuple[float, float] | None = None) -> tuple[float, dict | None]:
    """`run_meeting_sweep`'s seconds and its compute floor at `peaks` (fp32, bf16 GFLOP/s;
    `floor.runs_floor`), None without peaks."""
    seconds, rows, store = run_meeting_sweep(processes)
    if peaks is None:
        return seconds, None
    works = [floor.run_work(row, store.progress(row["id"])) for row in rows]
    return seconds, floor.runs_floor(works, *peaks, precision=machine_override())


def main(*, as_json: bool, sweep: bool, steps: int, backbone: str, resolution: int, precision: str = "auto") -> int:
    result = run_bench(steps=steps, sweep=sweep, backbone=backbone, resolution=resolution, precision=precision)
    if not as_json:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    print(json.dumps(result))  # the last line: one JSON object
    return 0
