"""Named configurations the dashboard, the CLI benchmarks and the docs share.

The meeting demo and the shipped reference sweep use the same data setting (binary ELPV, 16 images per
class, 112 px, 20 epochs at batch 8, the faster precision of this machine), so the demo's live points
land beside the reference curves on the Budget explorer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from vptdash.engine import backbones, cost, data, train
from vptdash.engine.train import LR_AUTO, RunConfig
from vptdash.runs.jobs import sweep_configs

# Binary ELPV (defective if p > 0.5): a linear probe on 16 shots sits above the 69% majority class,
# unlike 4-class few-shot (40% against a 57% majority), so differences between budgets can be real.
DEMO_DATASET = "elpv-binary"
DEMO_SHOTS = 16
DEMO_EPOCHS = 20  # 16 shots x 2 classes at batch 8: 80 optimiser steps
# The demo answers "where" live (no prompts vs 10 shallow vs 10 deep, one seed); the shipped reference
# beside it answers "how many" with 3 seeds.
DEMO_COUNTS = (0, 10)
DEMO_PLACEMENTS = ("shallow", "deep")
MEETING_COUNTS = (0, 1, 5, 10, 25, 50, 100)
# The demo never searches (a search doubles a run's time): its prompt runs take the rates the reference
# sweep chose on the validation split for 10 prompts in this setting (benchmarks/reference_sweep.py:
# elpv-binary, 16 shots, seed 0, lr "auto", successive halving over 3e-4, 1e-3, 3e-3, 1e-2; the
# checkpoint's "lr" of those two runs, benchmarks/data/reference_sweep_runs.json). The linear probe
# keeps lr "auto": the converged logistic regression, whose L2 choice refits a head on cached features.
DEMO_LRS = {"shallow": 3e-3, "deep": 1e-3}
# The demo's validation split stays at 5% (131 images): validation passes cost more than a 16-shot epoch.
DEMO_VAL_FRACTION = 0.05


def demo_base() -> RunConfig:
    """The demo's setting, at the rate chosen on validation for 10 deep prompts."""
    return RunConfig(
        dataset=DEMO_DATASET,
        shots=DEMO_SHOTS,
        resolution=112,
        epochs=DEMO_EPOCHS,
        batch_size=8,
        lr=DEMO_LRS["deep"],
        precision="auto",  # bf16 is far faster on some CPUs and slower on others: measured per machine
        val_fraction=DEMO_VAL_FRACTION,
        # Validated once, after the last epoch: that pass is what the collapse check reads, and the demo is
        # watched on the Budget explorer, which draws no validation curve. The four passes the automatic
        # schedule adds would each cost about as much as two 16-shot epochs (131 images forward, 32 images
        # forward and backward per epoch).
        eval_every=DEMO_EPOCHS,
    )


def with_demo_rates(configs: list[RunConfig]) -> list[RunConfig]:
    """Each prompt run at its placement's validated rate; the linear probe converged (lr "auto")."""
    out = []
    for config in configs:
        if config.is_linear_probe:
            out.append(dataclasses.replace(config, lr=LR_AUTO))
        else:
            out.append(dataclasses.replace(config, lr=DEMO_LRS.get(config.placement, DEMO_LRS["deep"])))
    return out


def demo_configs() -> list[RunConfig]:
    """The one-click meeting demo: the linear probe, 10 shallow and 10 deep prompts (no learning-rate search)."""
    return with_demo_rates(sweep_configs(demo_base(), list(DEMO_COUNTS), list(DEMO_PLACEMENTS), [0]))


def meeting_sweep_configs() -> list[RunConfig]:
    """The standard meeting sweep, {0,1,5,10,25,50,100} x {shallow, deep}, 1 seed (timed by `bench --sweep`
    as `sweep_seconds`), at the demo's rates: a timing benchmark, so no search either."""
    return with_demo_rates(sweep_configs(demo_base(), list(MEETING_COUNTS), list(DEMO_PLACEMENTS), [0]))


def is_demo_config(config: dict) -> bool:
    """Whether a stored run configuration is one of the meeting demo's runs."""
    try:
        wanted = RunConfig.from_dict(config)
    except Exception:  # noqa: BLE001 - an unreadable configuration is simply not the demo's
        return False
    return any(wanted == demo for demo in demo_configs())


def demo_setting_steps(base: RunConfig) -> list[Callable[[], object]]:
    """Loading the demo's backbone at its resolution, then its image set and split (each kept in the
    process once loaded)."""
    return [
        lambda: backbones.load_backbone(base.backbone, base.weights, base.resolution),
        lambda: data.load_and_split(base),
    ]


def load_demo_setting() -> None:
    """What a second lane of the worker (`runs.lanes`) loads while it waits: the demo's backbone and
    images. The counting and the probe's features are the first lane's (the cost cache is on disk)."""
    for step in demo_setting_steps(demo_base()):
        step()


def warm_demo(should_stop: Callable[[], bool] | None = None) -> bool:
    """What the demo's jobs would load or measure, done ahead by a waiting worker (`worker --warm`): the
    backbone at the demo's resolution, the image set and its split (decoded and resized once per process),
    the GMAC counter's library, the linear probe's frozen features (train.encode_ahead: the same cache the
    probe reads, so the demo's first point waits only for its fit), then each demo run's GMAC count and
    latency (train.count_ahead: the cost cache and keys the runs' cost phase reads, so no run of the demo
    counts or times again). Measured on a 2-core EPYC: a fresh worker took about 7 s to claim the demo's
    first job and its setup about 16 s, and each run's cost phase took 4-5 s (benchmarks/meeting_demo.py).

    The probe's encoding comes first: it is the first point the presenter waits for. The latency is timed
    here, on an idle machine before the press, rather than beside the next run's training.

    `should_stop` is asked between steps: a worker passes "a job other than the demo's is waiting", so a
    presenter who starts a run of their own at once does not wait for the demo's preparation (a press of
    the demo during the warm-up lets it go on: the demo's runs would do the same work). Returns whether
    every step ran."""
    stop = should_stop or (lambda: False)
    base = demo_base()
    configs = demo_configs()
    steps = [
        *demo_setting_steps(base),
        cost.load_counter,
        *[(lambda c=config: train.encode_ahead(c)) for config in configs if config.is_linear_probe],
        # the probe first: its cost phase also stands between the press and the first point
        *[(lambda c=config: train.count_ahead(c)) for config in configs],
    ]
    for step in steps:
        if stop():
            return False
        step()
    return True
