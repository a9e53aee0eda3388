"""Runs as stored jobs: submit a configuration, execute it with progress written to the run store,
and expand sweeps. The CLI, the dashboard's background worker and the benchmarks all go through here,
so a run looks the same in the history whoever started it.

Job kinds are plug-ins: this module executes training and linear-probe runs itself and knows no other
method by name. A method that stores its own kind of job (condensation, a block-skip search, a
continual experiment) registers how to execute it with `register_kind`, and uses the public steps
every kind shares: `claim_job`, `ProgressWriter`, `fail_job`. `vptdash.methods` registers every
built-in kind when it is imported; the CLI (and so the dashboard's worker process) imports it."""

from __future__ import annotations

import itertools
import os
import time
import traceback
import uuid
from typing import Any, Callable, Iterable, Sequence

from vptdash.engine.backbones import BackboneError
from vptdash.engine.data import DatasetError
from vptdash.engine.prompts import PromptConfigError
from vptdash.engine.train import ConfigError, RunConfig, run_training
from vptdash.runs.store import RunStore, StoreError

PROGRESS_WRITE_INTERVAL_S = 0.5  # train-step events are thinned to this rate; epoch events always land

Echo = Callable[[dict], None]
JobExecutor = Callable[..., dict]  # (store, run_id, *, echo=None) -> the stored row; never raises for a failing job

_KINDS: dict[str, JobExecutor] = {}


class UnknownJobKind(Exception):
    """A stored job whose kind no loaded plug-in executes."""


# Errors whose message is already meant for a person: stored without a traceback.
USER_ERRORS = (ConfigError, DatasetError, BackboneError, PromptConfigError, UnknownJobKind)


def register_kind(name: str, execute: JobExecutor) -> JobExecutor:
    """Make `execute_run` run stored jobs of kind `name` with `execute(store, run_id, echo=...)`.

    Registering the same function again is harmless (modules may be re-imported); a different
    function for a taken name is refused, so two plug-ins never silently replace each other."""
    if name in ("train", "probe"):
        raise ValueError(f"job kind {name!r} is built in")
    current = _KINDS.get(name)
    if current is not None and getattr(current, "__qualname__", None) != getattr(execute, "__qualname__", None):
        raise ValueError(f"job kind {name!r} is already registered by {current.__module__}")
    _KINDS[name] = execute
    return execute


def unregister_kind(name: str) -> None:
    """Forget a plug-in kind (a test's own, or a plug-in being unloaded); unknown names are ignored."""
    _KINDS.pop(name, None)


def registered_kinds() -> tuple[str, ...]:
    """Every kind `execute_run` can run now: the built-in ones first, then the plug-ins."""
    return ("train", "probe", *sorted(_KINDS))


def kind_of(config: RunConfig) -> str:
    return "probe" if config.is_linear_probe else "train"


def submit_run(
    store: RunStore,
    config: RunConfig,
    *,
    source: str = "live",
    sweep_id: str | None = None,
    parent_id: int | None = None,
    kind: str | None = None,
) -> int:
    """Validate and queue one run; returns its id. Absurd budgets fail here, before anything loads."""
    config.validate()
    return store.create_run(
        config.to_dict(),
        status="queued",
        kind=kind or kind_of(config),
        source=source,
        sweep_id=sweep_id,
        parent_id=parent_id,
    )


def _is_step(event: dict[str, Any] | None) -> bool:
    """A training step's event (one model, or one candidate of a learning-rate search)."""
    return bool(event) and (event.get("phase") == "train" or "candidate_lr" in event)


class ProgressWriter:
    """Writes events to the store, thinning per-step events so SQLite is not hit 100 times a second.

    It sees every event, thinned or not, so it also times what the events leave implicit, for the ETA
    (`runs.eta`): a validation pass (from the step before it to its result: every later event carries
    the latest as "val_pass_s"), the held-out evaluation (from the last training event to "test") and
    the cost phase (from "cost" to the end); `phase_timings` returns the last two for the run's timings.
    """

    def __init__(self, store: RunStore, run_id: int, echo: Callable[[dict], None] | None):
        self.store, self.run_id, self.echo = store, run_id, echo
        self.last_write = 0.0
        self.previous: dict[str, Any] | None = None
        self.val_pass_s: float | None = None
        self.training_seen_at: float | None = None  # the last train / search / val event
        self.phase_at: dict[str, float] = {}  # when each phase's first event came

    def _timed(self, event: dict[str, Any], now: float) -> dict[str, Any]:
        phase = event.get("phase")
        validated = phase == "val" or (phase == "search" and "message" in event and "candidate_lr" not in event)
        if validated and _is_step(self.previous):
            seconds = (event.get("elapsed_s") or 0.0) - (self.previous.get("elapsed_s") or 0.0)
            if seconds >= 0:
                self.val_pass_s = seconds
        self.previous = event
        self.phase_at.setdefault(phase, now)
        if phase in ("train", "search", "val"):
            self.training_seen_at = now
        return event if self.val_pass_s is None else {**event, "val_pass_s": self.val_pass_s}

    def phase_timings(self, end: float | None = None) -> dict[str, float]:
        """{"test_seconds", "cost_seconds"} as far as they happened; `end` (time.monotonic()) closes
        the cost phase, default now."""
        end = time.monotonic() if end is None else end
        out: dict[str, float] = {}
        test_at, cost_at = self.phase_at.get("test"), self.phase_at.get("cost")
        if test_at is not None and self.training_seen_at is not None and self.training_seen_at <= test_at:
            out["test_seconds"] = test_at - self.training_seen_at
        if cost_at is not None:
            out["cost_seconds"] = max(0.0, end - cost_at)
        return out

    def __call__(self, event: dict[str, Any]) -> None:
        now = time.monotonic()
        event = self._timed(event, now)
        if self.echo:
            self.echo(event)
        is_step = event.get("phase") == "train"
        last_step = is_step and event.get("step") == event.get("total_steps")
        if is_step and not last_step and now - self.last_write < PROGRESS_WRITE_INTERVAL_S:
            return
        self.last_write = now
        self.store.append_progress(self.run_id, event)


def claim_job(store: RunStore, run_id: int) -> dict:
    """The stored row of a job about to run in this process, marked running if it was still queued."""
    row = store.get_run(run_id)
    if row is None:
        raise KeyError(f"no run {run_id}")
    if row["status"] == "queued":
        store.mark_running(run_id, pid=os.getpid())
    return row


def job_error(exc: BaseException) -> str:
    """What a failed job stores: a user error's own message (it says what to change); anything else
    (a bug, the environment) with its traceback, kept for the history. Call it inside `except`."""
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"


def fail_job(store: RunStore, run_id: int, exc: BaseException) -> dict:
    """Store a job as failed with `job_error(exc)`; a job deleted meanwhile (another tab) stays deleted."""
    if store.get_run(run_id) is None:
        return {"id": run_id, "status": "deleted"}
    store.finish_run(run_id, "failed", error=job_error(exc))
    return store.get_run(run_id)


def execute_run(
    store: RunStore,
    run_id: int,
    *,
    echo: Callable[[dict], None] | None = None,
    measure_latency: bool | None = None,
    keep_invalid: bool = True,
) -> dict:
    """Run a stored (queued or claimed) job to its end and store everything it produced.

    Never raises for a failing run: the run is marked failed with the error, and the row returned.
    `measure_latency=False`: a training job stores no latency (the caller measures it; see run_training).
    `keep_invalid=False`: a configuration that turns out invalid once the backbone is known (a block
    beyond its depth) is deleted and its ConfigError raised: it never started, so it is no history."""
    row = store.get_run(run_id)
    if row is None:
        raise KeyError(f"no run {run_id}")
    if row["kind"] not in ("train", "probe"):
        execute = _KINDS.get(row["kind"])
        if execute is None:  # a plug-in that is not loaded here: fail the job, not the worker
            claim_job(store, run_id)
            kinds = ", ".join(registered_kinds())
            return fail_job(store, run_id, UnknownJobKind(f"no executor for job kind {row['kind']!r} (known: {kinds})"))
        return execute(store, run_id, echo=echo)
    claim_job(store, run_id)
    config = RunConfig.from_dict(row["config"])
    progress = ProgressWriter(store, run_id, echo)
    try:
        result = run_training(
            config,
            on_event=progress,
            should_cancel=lambda: store.is_cancel_requested(run_id),
            measure_latency=measure_latency,
        )
    except ConfigError as exc:
        if keep_invalid:
            return fail_job(store, run_id, exc)
        store.delete_run(run_id)
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is stored with the run, none kills the worker
        return fail_job(store, run_id, exc)
    if store.get_run(run_id) is None:  # deleted while it ran (another tab): nothing left to store into
        return {"id": run_id, "status": "deleted"}
    # how long evaluation and costs took, and on how many test images: the next run's ETA reads them
    result.timings.update(progress.phase_timings())
    test_images = (result.metrics.get("split_sizes") or {}).get("test")
    if test_images:
        result.timings["test_images"] = int(test_images)
    if result.trainable_state:
        try:
            store.save_artifact(run_id, result.trainable_state, metadata={"class_names": ",".join(result.class_names)})
        except StoreError as exc:  # a full disk: the numbers are still worth keeping, say what is missing
            store.finish_run(
                run_id,
                "failed",
                metrics=result.metrics,
                costs=result.costs,
                timings=result.timings,
                error=str(exc),
            )
            return store.get_run(run_id)
    store.finish_run(run_id, result.status, metrics=result.metrics, costs=result.costs, timings=result.timings)
    return store.get_run(run_id)


def run_now(
    store: RunStore,
    config: RunConfig,
    *,
    source: str = "cli",
    sweep_id: str | None = None,
    echo: Callable[[dict], None] | None = None,
) -> dict:
    """Execute in this process (the CLI's path). The run is created already 'running' so a dashboard
    worker sharing the store can never claim it in between."""
    config.validate()
    run_id = store.create_run(
        config.to_dict(), status="running", kind=kind_of(config), source=source, sweep_id=sweep_id
    )
    return execute_run(store, run_id, echo=echo, keep_invalid=False)


# ---------------------------------------------------------------------------------------- sweeps
def sweep_configs(
    base: RunConfig,
    prompt_counts: Sequence[int],
    placements: Sequence[str],
    seeds: Sequence[int],
    *,
    include_linear_probe: bool = True,
) -> list[RunConfig]:
    """The grid counts x placements x seeds; 0 prompts is the linear probe, run once per seed."""
    configs: list[RunConfig] = []
    seen: set[tuple] = set()
    for seed, count, placement in itertools.product(seeds, prompt_counts, placements):
        if count == 0:
            if not include_linear_probe:
                continue
            config = RunConfig.from_dict(
                {**base.to_dict(), "tuning": "linear", "num_prompts": 0, "placement": "none", "seed": seed}
            )
        else:
            config = RunConfig.from_dict(
                {**base.to_dict(), "tuning": "prompt", "num_prompts": count, "placement": placement, "seed": seed}
            )
        key = tuple(sorted((k, str(v)) for k, v in config.to_dict().items()))
        if key not in seen:
            seen.add(key)
            configs.append(config)
    if include_linear_probe and 0 not in prompt_counts:
        for seed in seeds:
            configs.insert(
                0,
                RunConfig.from_dict(
                    {**base.to_dict(), "tuning": "linear", "num_prompts": 0, "placement": "none", "seed": seed}
                ),
            )
    return configs


def new_sweep_id() -> str:
    return time.strftime("sweep-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def submit_sweep(store: RunStore, configs: Iterable[RunConfig], *, source: str = "live") -> tuple[str, list[int]]:
    configs = list(configs)
    for config in configs:  # validate everything before queueing anything
        config.validate()
    sweep_id = new_sweep_id()
    return sweep_id, [submit_run(store, c, source=source, sweep_id=sweep_id) for c in configs]


def execute_queued(
    store: RunStore, run_ids: Sequence[int], *, echo: Callable[[dict], None] | None = None
) -> list[dict]:
    """Execute the given queued runs one after the other in this process (the local executor)."""
    rows = []
    for run_id in run_ids:
        row = store.get_run(run_id)
        if row and row["status"] == "queued":
            rows.append(execute_run(store, run_id, echo=echo))
        elif row:
            rows.append(row)
    return rows
