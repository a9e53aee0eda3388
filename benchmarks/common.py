"""Helpers shared by the benchmark scripts: a machine description and section-wise docs updates."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import re
from pathlib import Path

# vptdash before torch: its OpenMP wait setting holds only if set before torch loads (vptdash.engine.openmp),
# and a benchmark times what the dashboard runs.
import vptdash  # noqa: F401

# isort: split
import torch

from vptdash.engine.cost import run_costs
from vptdash.engine.train import RunConfig, build_model
from vptdash.runs.executors import architecture_key, latency_by_architecture
from vptdash.runs.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "docs" / "results.md"
DATA = ROOT / "benchmarks" / "data"
# Every section a script writes into the docs is also kept here, as written: the stored output that
# tests/test_docs_figures.py compares the docs with, so a figure edited by hand in the docs fails a test.
SECTIONS = DATA / "sections"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def today() -> str:
    return _dt.date.today().isoformat()


def section_output(heading: str, path: Path = RESULTS_MD) -> Path:
    """Where the stored copy of a docs section lives: benchmarks/data/sections/<doc>--<heading>.md."""
    slug = re.sub(r"[^a-z0-9]+", "-", heading.lstrip("#").lower()).strip("-")
    return SECTIONS / f"{path.stem}--{slug}.md"


def write_section(heading: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) the section that starts with `heading` ("## ...") up to the next "## ", and keep
    a copy of it in benchmarks/data/sections/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        path.read_text()
        if path.exists()
        else "# Results\n\nEvery figure here is printed by a script in `benchmarks/`.\n"
    )
    section = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")
    stored = section_output(heading, path)
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text(section)


def pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    if mean != mean:  # NaN
        return "n/a"
    if std != std or std == 0:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def measure_latencies(store: RunStore) -> None:
    """Latency does not depend on the seed or the data: measure it once per architecture, after training,
    and write it into every run of that architecture (as parallel sweeps do: executors.latency_by_architecture)."""
    rows = store.list_runs(status="done")
    configs = [RunConfig.from_dict(row["config"]) for row in rows]
    # their sweeps ran with --no-latency: measure here all the same
    measured = latency_by_architecture([dataclasses.replace(c, measure_latency=True) for c in configs])
    for row, config in zip(rows, configs):
        latency = measured.get(architecture_key(config))
        if latency:
            store.update_results(row["id"], costs=latency)
            print(
                f"latency {config.label()} (run {row['id']}): {latency['latency_ms_b1']:.1f} ms (b1), "
                f"{latency['latency_ms_b32']:.2f} ms/image (b32)",
                flush=True,
            )


def recount_costs(runs: list[dict], *, latency: bool = True) -> None:
    """Re-count, in place, the cost figures of exported runs (GMACs, token and row counts, latency) with
    today's graph. They depend on the architecture only, not on training, so a change in what the
    forward pass computes (vptdash.engine.rows) does not need the runs trained again. latency=False keeps
    the stored latency (for scripts that measure their own, side by side)."""
    configs = [RunConfig.from_dict(run["config"]) for run in runs]
    measured = (
        latency_by_architecture([dataclasses.replace(c, measure_latency=True) for c in configs]) if latency else {}
    )
    counted: dict[str, dict] = {}
    for run, config in zip(runs, configs):
        key = architecture_key(config)
        if key not in counted:
            model = build_model(config, len(run["metrics"]["class_names"]))
            counted[key] = {**run_costs(model, config.resolution, measure=False), **measured.get(key, {})}
            print(
                f"costs {config.label()}: {counted[key]['gmacs']:.3f} GMACs, "
                f"{counted[key].get('latency_ms_b1', float('nan')):.1f} ms (b1)",
                flush=True,
            )
        run["costs"] = {**run["costs"], **counted[key]}


def recount_store_costs(store: RunStore, *, latency: bool = True) -> None:
    """`recount_costs` for every finished run of a benchmark's store, written back into the store."""
    rows = store.list_runs(status="done")
    recount_costs(rows, latency=latency)
    for row in rows:
        store.update_results(row["id"], costs=row["costs"])


def checkpoint_in(store: RunStore, path: Path) -> int:
    """Import the finished runs kept in `path` (a JSON export) that `store` lacks: a long benchmark's runs
    travel with the repository, so it continues on another machine or session. Returns how many were new."""
    if not path.exists():
        return 0
    added = store.import_runs(json.loads(path.read_text()), source="cli")
    print(f"checkpoint: {added} finished runs imported from {path.name}", flush=True)
    return added


def checkpoint_out(store: RunStore, path: Path, **filters) -> None:
    """Write the store's finished runs (`filters` as in `RunStore.list_runs`) to `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = store.export_runs(status="done", include_progress=False, **filters)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows, separators=(",", ":")))
    os.replace(tmp, path)
