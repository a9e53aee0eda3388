"""Training runs on a Ray cluster, results in this machine's run store.

The cluster's nodes cannot see this machine's SQLite file or its uploads, so:

* the driver (the dashboard's worker process, or a CLI sweep) keeps the store: a node trains and
  evaluates and sends everything back as data (metrics, costs, timings, the progress curve, the trained
  prompts + head); the driver stores each result as it arrives, so a run that finished is stored even if
  the sweep dies a minute later;
* an image set that exists only here (an upload folder or zip) travels content-addressed: packed once
  into a zip, put into Ray's object store under its SHA-256, and each node writes it once to its own
  cache (`<node's cache dir>/cluster-datasets/<sha256>.zip`); the remote task trains on that copy. The
  stored configuration keeps this machine's path, so the run reads like a local one;
* the vptdash package itself travels as a Ray `py_modules` entry: nodes need the dependencies
  (torch, timm, ...), not vptdash;
* a node that dies costs only the runs it held: each is sent again, at most `max_retries` times, then
  stored as failed with the reason. A run never stays "running" after its driver is gone: the driver's
  pid is on it, and `RunStore.fail_orphaned_runs` fails it with the reason when the pid has died.

Settings: the environment (`VPTDASH_RAY_ADDRESS`, `VPTDASH_RAY_CPUS_PER_RUN`, `VPTDASH_RAY_GPUS_PER_RUN`,
`VPTDASH_RAY_RETRIES`) and, over it, the dashboard's setting, a JSON file next to the run store (the
worker is another process; the file is what both read).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vptdash.engine import paths
from vptdash.engine.data import BUILTIN_DATASETS
from vptdash.engine.train import RunConfig, run_training
from vptdash.runs.jobs import execute_run, job_error
from vptdash.runs.store import RunStore

ADDRESS_ENV = "VPTDASH_RAY_ADDRESS"
CPUS_ENV = "VPTDASH_RAY_CPUS_PER_RUN"
GPUS_ENV = "VPTDASH_RAY_GPUS_PER_RUN"
RETRIES_ENV = "VPTDASH_RAY_RETRIES"
REMOTE_KINDS = ("train", "probe")  # what a node can run: other kinds read the store, so they run on the driver
CAPACITY_REFRESH_S = 10.0
RECONNECT_AFTER_S = 60.0  # after a failed connection, runs fail with its reason for this long without retrying
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # vptdash/, shipped to the nodes as a py_module


@dataclass(frozen=True)
class ClusterSettings:
    """Where training runs go. address None: on this machine (the Ray executor then starts a local
    single-node cluster; the dashboard's worker trains in its own process)."""

    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_retries: int = 2  # after a lost node; a run's own error is never retried

    def __post_init__(self) -> None:
        if self.cpus_per_run <= 0 or self.gpus_per_run < 0 or self.max_retries < 0:
            raise ValueError(
                f"cluster resources must be positive (CPUs per run {self.cpus_per_run}, GPUs per run "
                f"{self.gpus_per_run}, retries {self.max_retries})"
            )


def settings_path(store: RunStore) -> Path:
    return Path(store.path).with_suffix(".cluster.json")


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    try:
        return float(text) if text else default
    except ValueError:
        return default


def cluster_settings(store: RunStore | None = None) -> ClusterSettings:
    """The environment's settings, overridden by what the dashboard saved for this store (an empty
    address saved there means "on this machine", even when the environment names a cluster)."""
    values: dict[str, Any] = {
        "address": os.environ.get(ADDRESS_ENV, "").strip() or None,
        "cpus_per_run": _env_float(CPUS_ENV, 1.0),
        "gpus_per_run": _env_float(GPUS_ENV, 0.0),
        "max_retries": int(_env_float(RETRIES_ENV, 2)),
    }
    if store is not None:
        try:
            saved = json.loads(settings_path(store).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
        if isinstance(saved, dict):
            for key in values:
                if key in saved:
                    values[key] = saved[key]
    values["address"] = (str(values["address"]).strip() or None) if values["address"] else None
    try:
        return ClusterSettings(**values)
    except (TypeError, ValueError):  # a hand-edited file with nonsense: the defaults, not a crash
        return ClusterSettings(address=values["address"])


def save_cluster_settings(store: RunStore, settings: ClusterSettings) -> Path:
    """What the dashboard's setting writes; the worker reads it before each dispatch."""
    path = settings_path(store)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps({**asdict(settings), "address": settings.address or ""}), encoding="utf-8")
    os.replace(tmp, path)
    return path


def import_ray():
    try:
        import ray  # noqa: PLC0415 - optional dependency: only runs on a cluster need it
    except ImportError as exc:
        raise RuntimeError("running on a Ray cluster needs the `ray` package: pip install 'ray>=2.9'") from exc
    return ray


# ------------------------------------------------------------------------------ image sets that travel
def _is_local_dataset(spec: Any) -> bool:
    return isinstance(spec, str) and spec not in BUILTIN_DATASETS and Path(spec).expanduser().exists()


def _tree_signature(path: Path) -> tuple:
    if path.is_file():
        info = path.stat()
        return (("", info.st_size, info.st_mtime_ns),)
    entries = []
    for file in sorted(path.rglob("*")):
        if file.is_file():
            info = file.stat()
            entries.append((file.relative_to(path).as_posix(), info.st_size, info.st_mtime_ns))
    return tuple(entries)


def pack_dataset(path: Path) -> bytes:
    """A zip of the image set: a zip as it is, a folder packed deterministically (sorted names, fixed
    dates, stored uncompressed: images are compressed already), so the same images give the same hash."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        return path.read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for file in sorted(path.rglob("*")):
            relative = file.relative_to(path)
            if not file.is_file() or any(part.startswith(".") for part in relative.parts):
                continue  # hidden files (the upload's own metadata) are not images
            info = zipfile.ZipInfo(relative.as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, file.read_bytes())
    return buffer.getvalue()


def node_dataset_copy(digest: str, holder: list) -> Path:
    """On a node: the local copy of a travelling image set, written once per node (and reused by every
    later run there; the object is fetched from the object store only when the copy is missing)."""
    target = paths.cache_dir() / "cluster-datasets" / f"{digest}.zip"
    if target.exists():
        return target
    ray = import_ray()
    payload = ray.get(holder[0])
    if hashlib.sha256(payload).hexdigest() != digest:
        raise RuntimeError(f"the image set {digest[:12]} arrived damaged")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, target)  # atomic: two runs starting together on one node both end with a whole file
    return target


def train_on_node(config_dict: dict[str, Any], dataset: dict | None, threads: int) -> dict[str, Any]:
    """The body of one Ray task: train and evaluate; never raises (errors come back as data)."""
    torch.set_num_threads(max(1, threads))
    where = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        if dataset is not None:
            copy = node_dataset_copy(dataset["digest"], dataset["holder"])
            config_dict = {**config_dict, "dataset": str(copy)}
            where["dataset_copy"] = str(copy)
        config = RunConfig.from_dict(config_dict)
        result = run_training(config)
    except Exception as exc:  # noqa: BLE001 - reported to the driver as data, as a local job stores it
        return {"status": "failed", "error": job_error(exc), "node": where}
    return {
        "status": result.status,
        "metrics": result.metrics,
        "costs": result.costs,
        "timings": result.timings,
        "curve": result.curve,
        "class_names": result.class_names,
        "state": {name: tensor.numpy() for name, tensor in result.trainable_state.items()},
        "node": where,
    }


def store_remote_result(store: RunStore, run_id: int, result: dict[str, Any]) -> dict:
    """Store what a node sent back for `run_id` (a run deleted meanwhile stays deleted)."""
    if store.get_run(run_id) is None:
        return {"id": run_id, "status": "deleted"}
    if result.get("node"):
        store.append_progress(run_id, {"phase": "setup", "message": "ran on the Ray cluster", **result["node"]})
    if result["status"] == "failed":
        store.finish_run(run_id, "failed", error=result["error"])
        return store.get_run(run_id)
    store.append_progress_many(run_id, result["curve"])
    state = {name: torch.from_numpy(array.copy()) for name, array in result["state"].items()}
    if state:
        store.save_artifact(run_id, state, metadata={"class_names": ",".join(result["class_names"])})
    store.finish_run(
        run_id, result["status"], metrics=result["metrics"], costs=result["costs"], timings=result["timings"]
    )
    return store.get_run(run_id)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


@dataclass
class _InFlight:
    run_id: int
    config: dict
    attempt: int


class ClusterRunner:
    """Runs on a Ray cluster: `submit` sends one, `collect` stores those that came back.

    Connects on first use (or reuses this process's connection). With no address it starts a local
    single-node cluster (`num_cpus` of them) and stops it in `close`."""

    def __init__(self, store: RunStore, settings: ClusterSettings, *, num_cpus: int | None = None):
        self.store, self.settings, self.num_cpus = store, settings, num_cpus
        self.ray = None
        self.started_here = False
        self.in_flight: dict[Any, _InFlight] = {}
        self.datasets: dict[str, dict] = {}  # digest -> {"digest", "holder": [ObjectRef]}
        self.signatures: dict[str, tuple[tuple, str]] = {}  # path -> (tree signature, digest)
        self.task = None
        self._capacity, self._capacity_at = 1, float("-inf")

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        if self.ray is not None:
            return
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(
                address=self.settings.address,
                num_cpus=self.num_cpus if self.settings.address is None else None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                # The package travels to every node (its source, under a MB), so a node needs only the
                # dependencies installed, not vptdash.
                runtime_env={"py_modules": [str(PACKAGE_DIR)]},
            )
            self.started_here = True
        self.ray = ray
        # max_retries=0: a lost run is sent again by `collect`, which counts attempts and says so in the store.
        self.task = ray.remote(num_cpus=self.settings.cpus_per_run, num_gpus=self.settings.gpus_per_run, max_retries=0)(
            train_on_node
        )

    def close(self, reason: str = "the driver stopped before the run came back") -> None:
        """Fail the runs still out with `reason` (nothing is left 'running'), and disconnect if this
        runner connected."""
        for ref in list(self.in_flight):
            self._give_up(ref, reason)
        if self.ray is not None and self.started_here:
            try:
                self.ray.shutdown()
            except Exception:  # noqa: BLE001 - a cluster that is gone cannot be left more cleanly
                pass
        self.ray, self.started_here = None, False

    def capacity(self) -> int:
        """How many runs the cluster trains at once now (its CPUs, or GPUs, over a run's share)."""
        now = time.monotonic()
        if now - self._capacity_at > CAPACITY_REFRESH_S:
            resources = self.ray.cluster_resources()
            by_cpu = int(resources.get("CPU", 0) // self.settings.cpus_per_run)
            by_gpu = (
                int(resources.get("GPU", 0) // self.settings.gpus_per_run) if self.settings.gpus_per_run else by_cpu
            )
            self._capacity, self._capacity_at = max(1, min(by_cpu, by_gpu)), now
        return self._capacity

    # ------------------------------------------------------------------ image sets
    def _dataset(self, spec: Any) -> dict | None:
        if not _is_local_dataset(spec):
            return None  # built in (each node has it), or missing: the node's own error then says so
        path = Path(spec).expanduser().resolve()
        signature = _tree_signature(path)
        known = self.signatures.get(str(path))
        if known is None or known[0] != signature:
            payload = pack_dataset(path)
            digest = hashlib.sha256(payload).hexdigest()
            if digest not in self.datasets:
                # Held in a list so a task receives the reference, not the bytes: a node that has the copy
                # never fetches them.
                self.datasets[digest] = {"digest": digest, "holder": [self.ray.put(payload)]}
            self.signatures[str(path)] = (signature, digest)
            known = self.signatures[str(path)]
        return self.datasets[known[1]]

    # ------------------------------------------------------------------ runs
    def submit(self, run_id: int, config: dict, attempt: int = 1) -> None:
        """Send a run (already marked running by this process) to the cluster."""
        self.connect()
        try:
            dataset = self._dataset(config.get("dataset"))
        except OSError as exc:
            self.store.finish_run(run_id, "failed", error=f"the image set could not be packed for the cluster: {exc}")
            return
        threads = max(1, int(self.settings.cpus_per_run))
        ref = self.task.remote(config, dataset, threads)
        self.in_flight[ref] = _InFlight(run_id, config, attempt)
        where = self.settings.address or "a local Ray cluster"
        message = f"sent to {where}" + (
            f" (attempt {attempt} of {self.settings.max_retries + 1})" if attempt > 1 else ""
        )
        self.store.append_progress(run_id, {"phase": "setup", "message": message})

    def cancel_requested(self) -> list[dict]:
        """Stop the in-flight runs somebody cancelled; their rows, now cancelled."""
        rows = []
        for ref, job in list(self.in_flight.items()):
            if self.store.is_cancel_requested(job.run_id):
                self.in_flight.pop(ref)
                self.ray.cancel(ref, force=True)
                if self.store.get_run(job.run_id) is not None:
                    self.store.finish_run(job.run_id, "cancelled", error="cancelled while on the cluster")
                    rows.append(self.store.get_run(job.run_id))
        return rows

    def collect(self, timeout: float) -> list[dict]:
        """Wait up to `timeout` s; store every run that came back; their rows (retried runs are not
        among them: they are in flight again)."""
        if not self.in_flight:
            return []
        rows = self.cancel_requested()
        ready, _ = self.ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=timeout)
        for ref in ready:
            job = self.in_flight.pop(ref)
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.TaskCancelledError:
                continue
            except self.ray.exceptions.RayTaskError as exc:  # raised inside the task: retrying changes nothing
                self.store.finish_run(job.run_id, "failed", error=job_error(exc))
                rows.append(self.store.get_run(job.run_id))
                continue
            except Exception as exc:  # noqa: BLE001 - a lost node or worker: the run's progress is lost, not the run
                if job.attempt <= self.settings.max_retries and self.store.get_run(job.run_id) is not None:
                    self.store.append_progress(
                        job.run_id,
                        {"phase": "setup", "message": f"lost on the cluster ({_first_line(exc)}); sent again"},
                    )
                    self.submit(job.run_id, job.config, job.attempt + 1)
                    continue
                self._give_up(ref, f"lost on the Ray cluster {job.attempt} time(s): {_first_line(exc)}", job)
                rows.append(self.store.get_run(job.run_id))
                continue
            rows.append(store_remote_result(self.store, job.run_id, result))
        return [row for row in rows if row]

    def _give_up(self, ref, reason: str, job: _InFlight | None = None) -> None:
        job = job or self.in_flight.pop(ref)
        if self.store.get_run(job.run_id) is not None:
            self.store.finish_run(job.run_id, "failed", error=reason)


# ------------------------------------------------------------------------------ the dashboard's worker
class Dispatcher:
    """What the dashboard's worker does while a cluster is configured: claims queued training runs,
    keeps as many on the cluster as it has room for, stores each as it comes back. Other job kinds
    (they read the store) run here, between, when nothing is in flight."""

    def __init__(self, store: RunStore, settings: ClusterSettings, *, echo: Callable[[str], None] | None = None):
        self.store, self.settings = store, settings
        self.runner = ClusterRunner(store, settings)
        self.echo = echo or (lambda line: None)
        self.failed_at: float | None = None
        self.connect_error = ""

    def step(self, wait_s: float) -> bool:
        """One round: fill the cluster, store what came back. False when there was nothing to do.

        If the cluster itself fails (its head node lost, the connection dropped), the runs out on it are
        failed with the reason, never left running, and the next runs try a fresh connection later."""
        try:
            return self._step(wait_s)
        except Exception as exc:  # noqa: BLE001 - one line in the store, the worker goes on
            reason = f"the Ray cluster at {self.settings.address} failed: {_first_line(exc)}"
            self.runner.close(reason)
            self.runner = ClusterRunner(self.store, self.settings)
            self.failed_at, self.connect_error = time.monotonic(), reason
            self.echo(reason)
            return True

    def _step(self, wait_s: float) -> bool:
        worked = False
        while True:
            if self.runner.ray is not None and len(self.runner.in_flight) >= self.runner.capacity():
                break
            job = self.store.claim_next_queued(worker_pid=os.getpid(), kinds=REMOTE_KINDS)
            if job is None:
                break
            worked = True
            error = self._connect()
            if error:
                self.store.finish_run(job["id"], "failed", error=error)
                self.echo(error)
                continue
            try:
                self.runner.submit(job["id"], job["config"])
            except Exception as exc:
                self.store.finish_run(job["id"], "failed", error=f"not sent to the Ray cluster: {_first_line(exc)}")
                raise
        if self.runner.in_flight:
            for row in self.runner.collect(wait_s):
                self.echo(f"run {row['id']} {row['status']}")
            return True
        other = self.store.claim_next_queued(worker_pid=os.getpid())
        if other is not None:
            execute_run(self.store, other["id"])
            return True
        return worked

    def _connect(self) -> str | None:
        """None when connected; else the reason, remembered for a while: every run of a sweep would
        otherwise wait out Ray's own connection timeout before failing with the same line."""
        if self.failed_at is not None and time.monotonic() - self.failed_at < RECONNECT_AFTER_S:
            return self.connect_error
        try:
            self.runner.connect()
        except Exception as exc:  # noqa: BLE001 - an unreachable cluster fails the run with one line
            self.failed_at = time.monotonic()
            self.connect_error = f"cannot reach the Ray cluster at {self.settings.address}: {_first_line(exc)}"
            return self.connect_error
        self.failed_at = None
        return None

    def close(self) -> None:
        self.runner.close()


def dispatcher_for(store: RunStore, current: Dispatcher | None) -> Dispatcher | None:
    """The dispatcher the worker should use now: None without a cluster; the current one while it has
    runs in flight (a changed setting applies to the next runs); else one for the current settings."""
    settings = cluster_settings(store)
    if current is not None and (current.runner.in_flight or current.settings == settings):
        return current
    if current is not None:
        current.close()
    return Dispatcher(store, settings) if settings.address else None
