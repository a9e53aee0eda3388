"""Where a sweep's runs execute: here, one after the other (local), or on a Ray cluster (ray).

Either way the results land in the same run store, so the dashboard reads Ray runs like local ones.
With Ray, the remote tasks only train and evaluate (a cluster node cannot see this machine's SQLite
file); the driver stores each result as it arrives: metrics, costs, timings, the progress curve and
the trained prompts + head.

    python -m vptdash sweep ... --executor ray                 # a local single-node Ray cluster
    python -m vptdash sweep ... --executor ray --ray-address auto   # an existing cluster
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol, Sequence

from .jobs import job_error, kind_of, run_now
from .store import RunStore
from .train import RunConfig, run_training

Echo = Callable[[dict], None]


class Executor(Protocol):
    def run(self, store: RunStore, configs: Sequence[RunConfig], *, sweep_id: str, source: str = "cli",
            on_done: Callable[[dict], None] | None = None) -> list[dict]: ...


class LocalExecutor:
    """One run after the other in this process (the default; what the dashboard's worker does too)."""

    def run(self, store, configs, *, sweep_id, source="cli", on_done=None):
        rows = []
        for config in configs:
            row = run_now(store, config, source=source, sweep_id=sweep_id)
            rows.append(row)
            if on_done:
                on_done(row)
        return rows


def train_remotely(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The body of one Ray task: train and evaluate; never raises (errors come back as data)."""
    config = RunConfig.from_dict(config_dict)
    try:
        result = run_training(config)
    except Exception as exc:  # noqa: BLE001 - reported to the driver as data, as a local job stores it
        return {"status": "failed", "error": job_error(exc)}
    return {
        "status": result.status, "metrics": result.metrics, "costs": result.costs, "timings": result.timings,
        "curve": result.curve, "class_names": result.class_names,
        "state": {name: tensor.numpy() for name, tensor in result.trainable_state.items()},
    }


class RayExecutor:
    """One Ray task per run. Without an address, a local single-node cluster is started (and stopped)."""

    def __init__(self, address: str | None = None, *, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
                 num_cpus: int | None = None):
        self.address, self.cpus_per_run, self.gpus_per_run, self.num_cpus = address, cpus_per_run, gpus_per_run, num_cpus

    def _start(self):
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError("the Ray executor needs the `ray` package: pip install ray") from exc
        started_here = not ray.is_initialized()
        if started_here:
            # The package's own folder travels to the workers, so a cluster needs no install of vptdash.
            package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            ray.init(address=self.address, num_cpus=self.num_cpus if self.address is None else None,
                     include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": package_root}})
        return ray, started_here

    def run(self, store, configs, *, sweep_id, source="cli", on_done=None):
        ray, started_here = self._start()
        try:
            task = ray.remote(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run)(train_remotely)
            pending = {}
            for config in configs:
                config.validate()
                run_id = store.create_run(config.to_dict(), status="running", kind=kind_of(config), source=source,
                                          sweep_id=sweep_id)
                pending[task.remote(config.to_dict())] = run_id
            order = list(pending.values())
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                run_id = pending.pop(ready[0])
                row = _store_remote_result(store, run_id, ray.get(ready[0]))
                if on_done:
                    on_done(row)
            return [store.get_run(run_id) for run_id in order]
        finally:
            if started_here:
                ray.shutdown()


def _store_remote_result(store: RunStore, run_id: int, result: dict[str, Any]) -> dict:
    import torch

    if result["status"] == "failed":
        store.finish_run(run_id, "failed", error=result["error"])
        return store.get_run(run_id)
    store.append_progress_many(run_id, result["curve"])
    state = {name: torch.from_numpy(array.copy()) for name, array in result["state"].items()}
    if state:
        store.save_artifact(run_id, state, metadata={"class_names": ",".join(result["class_names"])})
    store.finish_run(run_id, result["status"], metrics=result["metrics"], costs=result["costs"],
                     timings=result["timings"])
    return store.get_run(run_id)


def get_executor(name: str, **options) -> Executor:
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(**options)
    raise ValueError(f"unknown executor {name!r}: choose local or ray")
