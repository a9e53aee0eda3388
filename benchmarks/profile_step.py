"""Where a training step's time goes: torch.profiler over engine steps of the standard configuration
(dinov2_s14, 112 px, 10 deep prompts, batch 32, bf16 autocast), top operators by self CPU time.

    python benchmarks/profile_step.py [--precision fp32] [--placement 8,9,10,11]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vptdash.bench import engine_batches  # noqa: E402
from vptdash.engine import data  # noqa: E402
from vptdash.engine.backbones import load_backbone  # noqa: E402
from vptdash.engine.prompts import PromptedViT  # noqa: E402
from vptdash.engine.train import training_precision  # noqa: E402


def profile_table(precision: str = "bf16", placement: str = "deep", steps: int = 3, rows: int = 15) -> str:
    """The profiler's operator table (self CPU time) over `steps` training steps after one warm-up."""
    image_set = data.load_image_set("elpv-binary", 112)
    images, labels = image_set.images[:32], image_set.labels[:32]
    model = PromptedViT(load_backbone("dinov2_s14", None, 112), 2, num_prompts=10, placement=placement, seed=0)
    encoded = engine_batches(model, images, precision)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)

    def step():
        with training_precision(model, precision):  # exactly the engine's step numerics
            logits = model.forward_from_frozen(encoded)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--placement", default="deep")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    print(profile_table(args.precision, args.placement, args.steps, args.rows))


if __name__ == "__main__":
    main()
