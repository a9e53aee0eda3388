"""How long a training run still has to go, all phases included.

A training event's own "eta_s" covers the training steps only (this run's measured time per step times
the steps left); after them the run still evaluates the held-out images and counts its costs (GMACs,
latency), which on a laptop took 20-40 s and used to show as "ETA 0 s". The time left is the sum of

  training   the latest event's eta_s, less the time since it was written;
  test       test images x seconds per image. Measured on this run's validation passes when it had one
             ("val_pass_s" on its events): the test split is test_fraction / val_fraction times the
             validation split (both are the same fractions of every class), so test = val_pass_s x
             test_fraction / val_fraction. Before the first validation pass: the latest finished run of
             the same architecture (`train.architecture_key`), its seconds per test image times the
             test images of the latest finished run on the same data and split;
  cost       the cost phase of the latest finished run of the same architecture and the same latency
             setting. It is the latest on purpose: once costs are cached per architecture, the latest
             run's cost phase is a lookup (about zero), while older ones still counted from scratch.

each less the time already spent in it. A phase without any measurement is unknown (None), never
guessed: the caller then says training's ETA and that evaluation follows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from vptdash.engine.train import RunConfig, architecture_key
from vptdash.runs.store import RunStore

TRAINING_KINDS = ("train", "probe")
HISTORY_LIMIT = 500  # finished runs read for the history (newest first): plenty, and bounded


@dataclass(frozen=True)
class PhaseHistory:
    """What earlier finished runs measured for a run's evaluation and cost phases (None: never measured)."""

    test_s_per_image: float | None = None
    test_images: int | None = None
    cost_s: float | None = None

    @property
    def test_s(self) -> float | None:
        if self.test_s_per_image is None or self.test_images is None:
            return None
        return self.test_s_per_image * self.test_images


def _number(value: Any) -> float | None:
    """A finite float (numbers stored as text too) or None."""
    if isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _data_key(config: dict) -> tuple:
    """What decides the test images: the data set and its split."""
    return tuple(config.get(k) for k in ("dataset", "cell_type", "test_fraction", "split_seed"))


def _architecture(config: dict) -> str | None:
    try:
        return architecture_key(RunConfig.from_dict(config))
    except Exception:  # noqa: BLE001 - an old or foreign configuration has no architecture to match
        return None


def phase_history(store: RunStore, config: dict) -> PhaseHistory:
    """The evaluation and cost phases of earlier finished runs that match `config` (module docstring)."""
    key = _architecture(config)
    if key is None:
        return PhaseHistory()
    done = [r for r in store.list_runs(status="done", limit=HISTORY_LIMIT) if r["kind"] in TRAINING_KINDS]
    done.sort(key=lambda r: r.get("finished_at") or 0.0, reverse=True)
    per_image = cost = images = None
    for run in done:
        timings, other = run.get("timings") or {}, run.get("config") or {}
        test_s, test_n = _number(timings.get("test_seconds")), _number(timings.get("test_images"))
        if images is None and test_n and _data_key(other) == _data_key(config):
            images = int(test_n)
        if per_image is None or cost is None:
            if _architecture(other) != key:
                continue
            if per_image is None and test_s is not None and test_n:
                per_image = test_s / test_n
            cost_s = _number(timings.get("cost_seconds"))
            if cost is None and cost_s is not None and other.get("measure_latency") == config.get("measure_latency"):
                cost = cost_s
        if per_image is not None and cost is not None and images is not None:
            break
    return PhaseHistory(per_image, images, cost)


def remaining(
    run: dict, event: dict | None, history: PhaseHistory | None = None, now: float | None = None
) -> dict[str, float | None]:
    """Seconds left per phase ("train", "test", "cost") and in all ("total", None when a phase still to
    come is unknown), for a running training run whose latest event is `event`."""
    now = time.time() if now is None else now
    history = history or PhaseHistory()
    config = run.get("config") or {}
    event = event or {}
    phase = event.get("phase")
    started, elapsed = _number(run.get("started_at")), _number(event.get("elapsed_s"))
    # time since the event was written (its elapsed_s counts from the run's start)
    since = max(0.0, now - (started + elapsed)) if started is not None and elapsed is not None else 0.0

    test_s = history.test_s
    val_pass, test_fraction, val_fraction = (
        _number(event.get("val_pass_s")),
        _number(config.get("test_fraction")),
        _number(config.get("val_fraction")),
    )
    if val_pass is not None and test_fraction and val_fraction:
        test_s = val_pass * test_fraction / val_fraction
    cost_s = history.cost_s
    if phase == "cost":
        left = {"train": 0.0, "test": 0.0, "cost": None if cost_s is None else max(0.0, cost_s - since)}
    elif phase == "test":
        left = {"train": 0.0, "test": 0.0, "cost": cost_s}
    elif phase == "val" and event.get("epoch") == config.get("epochs"):
        # the last epoch is always validated, and that is the last training event: the held-out evaluation runs now
        left = {"train": 0.0, "test": None if test_s is None else max(0.0, test_s - since), "cost": cost_s}
    else:
        eta = _number(event.get("eta_s"))
        left = {"train": None if eta is None else max(0.0, eta - since), "test": test_s, "cost": cost_s}
    parts = list(left.values())
    left["total"] = None if any(p is None for p in parts) else sum(parts)
    return left
