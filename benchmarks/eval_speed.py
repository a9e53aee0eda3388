"""Test evaluation speed, before/after side by side in one process: the meeting demo's test split
(binary ELPV, 656 images at 112 px) through dinov2_s14 with 10 deep and 10 shallow prompts.

    python benchmarks/eval_speed.py [--rounds 2] [--images 656] [--prompts 10] [--precision auto]

Variants: `train.evaluate` with each of `--batches` (the engine's own is `train.EVAL_BATCH`), and with
`--explicit` also under `training_precision` (attention as explicit matmuls, as training steps run it).
Run it under several OpenMP wait settings to compare those (read when torch loads:
`OMP_WAIT_POLICY=PASSIVE python benchmarks/eval_speed.py`; without one, vptdash's own applies). Rounds
interleave the variants, so load from other processes falls on all of them; the median per variant is printed
with the load average, and the logits of every variant are compared with the first (they must agree: only
the batching differs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# benchmarks.common imports vptdash before torch, so the OpenMP wait setting the dashboard runs with applies
# unless the command line sets one (vptdash.engine.openmp).
from benchmarks.common import machine  # noqa: E402

# isort: split
import torch  # noqa: E402

from vptdash.engine import data, openmp  # noqa: E402
from vptdash.engine.train import (  # noqa: E402
    SplitInputs,
    build_model,
    choose_run_precision,
    evaluate,
    training_precision,
)
from vptdash.runs.presets import demo_base  # noqa: E402


def explicit_evaluate(inputs: SplitInputs, labels, num_classes: int, precision: str):
    with training_precision(inputs.model, precision):
        return evaluate(inputs, labels, num_classes, precision)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=0, help="first N test images (0: all)")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--placements", default="deep,shallow")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--batches", default="32,128", help="inference batch sizes to compare")
    parser.add_argument("--explicit", action="store_true", help="also time explicit attention")
    args = parser.parse_args()
    wait = openmp.in_force()
    print(f"# {machine()}; OpenMP wait {wait}; load average at start {os.getloadavg()}", flush=True)
    cases = {}
    for placement in args.placements.split(","):
        config = dataclasses.replace(
            demo_base(), num_prompts=args.prompts, placement=placement, precision=args.precision
        )
        image_set, split = data.load_and_split(config)
        model = build_model(config, len(image_set.class_names)).eval()
        config = dataclasses.replace(config, precision=choose_run_precision(config, model).precision)
        mean, std = model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"]
        index = split.test[: args.images] if args.images else split.test
        inputs = SplitInputs(model, config, image_set, index, mean, std, "test")
        labels = image_set.labels[index]
        k = len(image_set.class_names)
        variants = {
            f"batch {b}": lambda i=inputs, y=labels, k=k, p=config.precision, b=b: evaluate(i, y, k, p, b)
            for b in (int(text) for text in args.batches.split(","))
        }
        if args.explicit:
            variants["explicit attention"] = lambda i=inputs, y=labels, k=k, p=config.precision: explicit_evaluate(
                i, y, k, p
            )
        cases[placement] = (config.precision, len(index), variants)
    results: dict[str, dict[str, list[float]]] = {p: {v: [] for v in c[2]} for p, c in cases.items()}
    reference: dict[str, torch.Tensor] = {}
    for round_index in range(args.rounds):
        for placement, (precision, n, variants) in cases.items():
            for name, run in variants.items():
                start = time.perf_counter()
                predictions, metrics = run()
                seconds = time.perf_counter() - start
                results[placement][name].append(seconds)
                first = reference.setdefault(placement, predictions)
                agree = float((predictions == first).float().mean())
                print(
                    f"round {round_index} {args.prompts} {placement} {precision} {name}: {seconds:.2f} s "
                    f"({1000 * seconds / n:.1f} ms/image), accuracy {metrics['accuracy']:.4f}, "
                    f"predictions equal to the first variant's {agree:.4f}, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    summary = {
        placement: {name: statistics.median(times) for name, times in variants.items()}
        for placement, variants in results.items()
    }
    images = {p: c[1] for p, c in cases.items()}
    print(json.dumps({"omp_wait_policy": wait, "images": images, "median_s": summary, "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
