"""Where a sweep's runs execute: on this machine (local: one after the other, or in a few worker
processes that share the cores), or on a Ray cluster (ray).

Either way the results land in the same run store, so the dashboard reads Ray runs like local ones.
With Ray (`runs.cluster`), the remote tasks only train and evaluate (a cluster node cannot see this
machine's SQLite file); the driver stores each result as it arrives: metrics, costs, timings, the
progress curve and the trained prompts + head.

    python -m vptdash sweep ... --processes 2                  # two local worker processes, 1 thread each
    python -m vptdash sweep ... --executor ray                 # a local single-node Ray cluster
    python -m vptdash sweep ... --executor ray --ray-address auto   # an existing cluster
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Protocol, Sequence

import torch

from vptdash.engine.cost import cached_latency_costs
from vptdash.engine.data import load_image_set
from vptdash.engine.train import RunConfig, architecture_key, build_model
from vptdash.runs import worker
from vptdash.runs.cluster import ClusterRunner, ClusterSettings
from vptdash.runs.jobs import execute_run, kind_of, run_now
from vptdash.runs.lanes import death_reason, spawning_without_main_module
from vptdash.runs.store import RunStore

Echo = Callable[[dict], None]


class Executor(Protocol):
    def run(
        self,
        store: RunStore,
        configs: Sequence[RunConfig],
        *,
        sweep_id: str,
        source: str = "cli",
        on_done: Callable[[dict], None] | None = None,
    ) -> list[dict]: ...


class LocalExecutor:
    """Runs on this machine, results in the store as each finishes.

    processes=1 (the default, and what the dashboard's worker does): one run after the other in this
    process. processes=N: N spawned worker processes with the threads split between them.
    Why: small training steps multiply small matrices, which two threads share badly. Measured on 2 cores:
    two 1-thread runs side by side give 1.15x the throughput of one 2-thread run (full-split parity pairs,
    benchmarks/performance.py; `--sections processes` measures the few-shot meeting sweep). Latency must
    not be measured beside another run, so with N > 1 it is measured first, once per architecture, on the
    still quiet machine (or taken from the machine's cost cache, shared with one-process runs), and written
    into each run of that architecture. A worker process that dies (killed, out of memory) fails only the
    run it had; a fresh process takes the runs still waiting."""

    def __init__(self, processes: int = 1):
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.processes = processes

    def run(self, store, configs, *, sweep_id, source="cli", on_done=None):
        if self.processes == 1 or len(configs) < 2:
            rows = []
            for config in configs:
                row = run_now(store, config, source=source, sweep_id=sweep_id)
                rows.append(row)
                if on_done:
                    on_done(row)
            return rows
        return _run_in_processes(
            store, list(configs), self.processes, sweep_id=sweep_id, source=source, on_done=on_done
        )


def latency_by_architecture(configs: Sequence[RunConfig]) -> dict[str, dict]:
    """Latency once per distinct architecture, measured with every thread of this process, or taken from
    the machine's cost cache when that architecture was timed here before (as a one-process run does)."""
    measured: dict[str, dict] = {}
    for config in configs:
        key = architecture_key(config)
        if key in measured or not config.measure_latency:
            continue
        try:
            classes = load_image_set(config.dataset, config.resolution, cell_type=config.cell_type).class_names
            model = build_model(config, len(classes))
            measured[key] = cached_latency_costs(model, config.resolution, architecture=key)
        except Exception:  # noqa: BLE001 - a config that cannot even be built fails as its own run, later
            continue
    return measured


def _expected_work(config: RunConfig) -> float:
    if config.is_linear_probe:
        return 0.0
    return config.epochs * (1 + max(config.prompt_counts or [config.num_prompts]))


def set_worker_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _serve_runs(store_path: str, connection: Connection, threads: int) -> None:
    """One worker process of a parallel sweep: run the ids it is sent, one at a time, until sent None.
    Like the dashboard's worker it runs below the priority of whoever started it (a dashboard open on
    the same machine stays responsive), with its share of the cores."""
    worker.yield_to_ui(threads=threads)
    store = RunStore(store_path)
    while (run_id := connection.recv()) is not None:
        execute_run(store, run_id, measure_latency=False)
        connection.send(run_id)


def _run_in_processes(
    store: RunStore,
    configs: list[RunConfig],
    processes: int,
    *,
    sweep_id: str,
    source: str,
    on_done: Callable[[dict], None] | None,
) -> list[dict]:
    for config in configs:
        config.validate()
    latency = latency_by_architecture(configs)
    # Created 'running' (with this process's pid) so a dashboard worker sharing the store never claims them.
    run_ids = [
        store.create_run(c.to_dict(), status="running", kind=kind_of(c), source=source, sweep_id=sweep_id)
        for c in configs
    ]
    threads = worker.threads_per_worker(processes)
    # Longest first (prompt count is the proxy: tokens per block), so the last runs to finish are short
    # ones and neither process idles long at the end.
    waiting = deque(sorted(zip(run_ids, configs), key=lambda pair: -_expected_work(pair[1])))
    # Worker processes of our own rather than a ProcessPoolExecutor: a pool whose worker is killed (out of
    # memory, by hand) breaks, failing every run it had; here a death fails only the run that process had,
    # a fresh process takes over, and the other runs go on.
    # spawn, not fork: a forked child would inherit this process's OpenMP thread pool in a broken state.
    context = multiprocessing.get_context("spawn")
    busy: dict[Connection, tuple[Any, int, RunConfig]] = {}  # connection -> (process, run id, config)
    started = []

    def give_work(process=None, connection=None) -> None:
        if not waiting:
            if connection is not None:
                connection.send(None)  # nothing left: that process exits
            return
        if process is None:
            connection, child_end = context.Pipe()
            process = context.Process(target=_serve_runs, args=(str(store.path), child_end, threads), daemon=True)
            with spawning_without_main_module():
                process.start()
            started.append(process)
            child_end.close()
        run_id, config = waiting.popleft()
        connection.send(run_id)
        busy[connection] = (process, run_id, config)

    def finished(run_id: int, config: RunConfig) -> None:
        row = store.get_run(run_id)
        if row and row["status"] == "done" and architecture_key(config) in latency:
            store.update_results(run_id, costs=latency[architecture_key(config)])
            row = store.get_run(run_id)
        if on_done and row:
            on_done(row)

    try:
        for _ in range(min(processes, len(waiting))):
            give_work()
        while busy:
            sentinels = {process.sentinel: connection for connection, (process, _, _) in busy.items()}
            ready = wait([*busy, *sentinels])
            for item in ready:
                connection = sentinels.get(item, item)
                if connection not in busy:
                    continue  # its result and its exit were both ready: handled once
                process, run_id, config = busy.pop(connection)
                try:
                    connection.recv()  # buffered even when the process died right after sending it
                except (EOFError, OSError):  # died during the run
                    process.join(5)
                    connection.close()
                    row = store.get_run(run_id)
                    if row and row["status"] == "running":
                        store.finish_run(run_id, "failed", error=death_reason(process.exitcode))
                    finished(run_id, config)
                    give_work()  # a fresh process for the runs still waiting
                    continue
                finished(run_id, config)
                give_work(process, connection)
    finally:
        for connection, (process, _, _) in busy.items():  # interrupted (Ctrl-C): stop what still runs
            process.terminate()
            connection.close()
        for process in started:
            process.join(5)
    return [row for row in (store.get_run(run_id) for run_id in run_ids) if row]


class RayExecutor:
    """Runs on a Ray cluster (`runs.cluster`): as many at once as the cluster has room for, each stored
    here as it comes back; an image set only this machine has travels to the nodes, and a run lost with
    a node is sent again (bounded). Without an address, a local single-node cluster is started (and
    stopped)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        cpus_per_run: float = 1.0,
        gpus_per_run: float = 0.0,
        num_cpus: int | None = None,
        max_retries: int = 2,
    ):
        self.settings = ClusterSettings(
            address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, max_retries=max_retries
        )
        self.num_cpus = num_cpus

    def run(self, store, configs, *, sweep_id, source="cli", on_done=None):
        for config in configs:
            config.validate()
        runner = ClusterRunner(store, self.settings, num_cpus=self.num_cpus)
        runner.connect()
        try:
            # Created 'running' (with this process's pid): a dashboard worker sharing the store never claims
            # them, and if this process dies they are failed as orphans, never left running.
            waiting = [
                (store.create_run(c.to_dict(), status="running", kind=kind_of(c), source=source, sweep_id=sweep_id), c)
                for c in configs
            ]
            order = [run_id for run_id, _ in waiting]
            waiting.sort(key=lambda pair: -_expected_work(pair[1]))  # longest first: no long run starts last
            while waiting or runner.in_flight:
                while waiting and len(runner.in_flight) < runner.capacity():
                    run_id, config = waiting.pop(0)
                    runner.submit(run_id, config.to_dict())
                for row in runner.collect(timeout=1.0):
                    if on_done:
                        on_done(row)
            return [row for row in (store.get_run(run_id) for run_id in order) if row]
        finally:
            runner.close()


def get_executor(name: str, **options) -> Executor:
    if name == "local":
        return LocalExecutor(**options)
    if name == "ray":
        return RayExecutor(**options)
    raise ValueError(f"unknown executor {name!r}: choose local or ray")
