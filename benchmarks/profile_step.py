"""Where a training step's time goes: torch.profiler over engine steps of the standard configuration
(dinov2_s14, 112 px, 10 deep prompts, batch 32, bf16 autocast), top operators by self CPU time.

    python benchmarks/profile_step.py [--precision fp32] [--placement 8,9,10,11] [--batch 8] [--threads 1]

The step is the engine's own (`train._Candidate.train_epoch`): a gather of the batch's cached tokens,
the schedule's rate set on both parameter groups of `train.make_optimizer`, forward under
`train.training_precision`, fp32 loss, backward, optimizer step. `--wall` also prints the median wall
time of plain steps (no profiler) and the profiler's time outside any operator (Python, dispatch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vptdash.bench import engine_batches  # noqa: E402
from vptdash.engine import data  # noqa: E402
from vptdash.engine.backbones import load_backbone  # noqa: E402
from vptdash.engine.prompts import PromptedViT  # noqa: E402
from vptdash.engine.train import RunConfig, make_optimizer, training_precision  # noqa: E402


def make_step(precision: str = "bf16", placement: str = "deep", batch: int = 32, prompts: int = 10):
    """One engine training step over a rotating window of the first 128 ELPV images (112 px)."""
    image_set = data.load_image_set("elpv-binary", 112)
    pool = max(batch, 128)
    images, labels = image_set.images[:pool], image_set.labels[:pool]
    model = PromptedViT(load_backbone("dinov2_s14", None, 112), 2, num_prompts=prompts, placement=placement, seed=0)
    encoded = engine_batches(model, images, precision)
    optimizer = make_optimizer(RunConfig(lr=1e-3), model, 1e-3)
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(0))
    position = [0]

    def step():
        start = position[0] % (pool - batch + 1)
        index = order[start : start + batch]
        position[0] += batch
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * group.get("lr_scale", 1.0)
        model.train()
        with training_precision(model, precision):  # exactly the engine's step numerics
            logits = model.forward_from_frozen(encoded[index])
        loss = nn.functional.cross_entropy(logits.float(), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def wall_seconds(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_table(
    precision: str = "bf16", placement: str = "deep", steps: int = 3, rows: int = 15, batch: int = 32
) -> str:
    """The profiler's operator table (self CPU time) over `steps` training steps after one warm-up."""
    step = make_step(precision, placement, batch)
    step()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--placement", default="deep")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--wall", type=int, default=0, help="also time this many plain steps (median)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.wall:
        step = make_step(args.precision, args.placement, args.batch)
        step()
        print(f"median wall time of {args.wall} steps: {wall_seconds(step, args.wall):.3f} s")
    print(profile_table(args.precision, args.placement, args.steps, args.rows, args.batch))


if __name__ == "__main__":
    main()
