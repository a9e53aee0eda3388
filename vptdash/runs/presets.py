"""Named configurations the dashboard, the CLI benchmarks and the docs share.

The meeting demo and the shipped reference sweep use the same data setting, so the demo's live points
land beside the reference curves on the Budget explorer.
"""

from __future__ import annotations

from vptdash.engine.train import RunConfig
from vptdash.runs.jobs import sweep_configs

# Binary ELPV (defective if p > 0.5): a linear probe on 16 shots sits above the 69% majority class,
# unlike 4-class few-shot (40% against a 57% majority), so differences between budgets are real.
DEMO_DATASET = "elpv-binary"
DEMO_SHOTS = 16
DEMO_EPOCHS = 20  # 16 shots x 2 classes at batch 8: 80 optimiser steps
# The demo answers "where" live (no prompts vs 10 shallow vs 10 deep, one seed: 96 s on 2 cores, worker start
# included, the first point after about 20 s);
# the shipped reference sweep beside it answers "how many" with 3 seeds. Measured (3 seeds): 16-shot
# runs need the 20 epochs; at 10 epochs deep prompts collapsed to the majority class on one seed.
DEMO_COUNTS = (0, 10)
DEMO_PLACEMENTS = ("shallow", "deep")
MEETING_COUNTS = (0, 1, 5, 10, 25, 50, 100)


def demo_base() -> RunConfig:
    return RunConfig(
        dataset=DEMO_DATASET,
        shots=DEMO_SHOTS,
        resolution=112,
        epochs=DEMO_EPOCHS,
        batch_size=8,
        lr=1e-2,
        precision="bf16",
        val_fraction=0.05,
    )


def demo_configs() -> list[RunConfig]:
    """The one-click meeting demo: the linear probe, 10 shallow and 10 deep prompts (about 1.5 minutes, 2 cores)."""
    return sweep_configs(demo_base(), list(DEMO_COUNTS), list(DEMO_PLACEMENTS), [0])


def meeting_sweep_configs() -> list[RunConfig]:
    """The standard meeting sweep, {0,1,5,10,25,50,100} x {shallow, deep}, 1 seed (timed by `bench --sweep`
    as `sweep_seconds`)."""
    return sweep_configs(demo_base(), list(MEETING_COUNTS), list(DEMO_PLACEMENTS), [0])
