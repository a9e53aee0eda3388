"""The precomputed reference sweep shipped with the app (ELPV), so the charts are never empty.

Two files may ship: `elpv_reference_v2.json` (made by benchmarks/reference_sweep.py: learning rates
chosen on validation, converged linear probe, several data sizes) and the older 16-shot
`elpv_reference_sweep.json` (fixed lr 1e-2). The loader uses the newer one when it exists, and always
adds `elpv_trained_examples.json`: a few runs of the newer recipe with their trained prompts.

A file is `{"meta": {"command", "machine", "date", "note", ...}, "runs": [rows as RunStore.export_runs
gives them]}`; it is imported into the run store with source "precomputed" (idempotent: every exported
row carries its dedupe_key). A row may name an "artifact": a safetensors file of its trained prompts and
head in `reference/artifacts/`, attached to the imported run so the Attention page can load it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from vptdash.runs.store import RunStore

REFERENCE_DIR = Path(__file__).parent / "reference"
REFERENCE_V2_FILE = REFERENCE_DIR / "elpv_reference_v2.json"
REFERENCE_V1_FILE = REFERENCE_DIR / "elpv_reference_sweep.json"
ARTIFACT_DIR = REFERENCE_DIR / "artifacts"
# A few reference runs with their trained prompts and head (the Attention page's material on a fresh
# install), shipped beside the reference file and loaded with it; the same runs in the newer reference
# share their dedupe keys, so none is imported twice.
EXAMPLES_NAME = "elpv_trained_examples.json"
EXAMPLES_FILE = REFERENCE_DIR / EXAMPLES_NAME


def default_files() -> list[Path]:
    """What `load_reference` reads by default: the reference file and the examples file beside it."""
    return [REFERENCE_FILE, REFERENCE_FILE.parent / EXAMPLES_NAME]


# The file `load_reference` reads by default: the newer reference when it ships, else the older one.
REFERENCE_FILE = REFERENCE_V2_FILE if REFERENCE_V2_FILE.is_file() else REFERENCE_V1_FILE


def _read(path: Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    content = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(content, list):  # a bare export_runs list
        return {"meta": {}, "runs": content}
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object with 'meta' and 'runs'")
    return content


def load_reference(store: RunStore, path: Path | None = None) -> int:
    """Import the reference runs into `store` as source "precomputed"; returns how many were new
    (0 when the file is missing or every run is already there). Runs imported earlier take the file's
    current costs (`benchmarks/make_reference.py --recount-costs` re-counts them without retraining).
    Rows naming an artifact get it attached (when the run has none yet). Without `path`: the shipped
    reference and the trained examples."""
    paths = default_files() if path is None else [Path(path)]  # looked up at call time
    inserted = 0
    for one in paths:
        content = _read(one)
        runs = (content or {}).get("runs") or []
        if runs:
            inserted += store.import_runs(runs, source="precomputed", refresh_costs=True)
            attach_artifacts(store, runs, one.parent / "artifacts")
    return inserted


def attach_artifacts(store: RunStore, runs: list[dict], folder: Path) -> int:
    """Save each row's shipped artifact (trained prompts and head) into the store for the imported run
    with the row's dedupe_key; returns how many were attached. A missing or unreadable file is skipped:
    the run stays, only without its trained state."""
    wanted = {row["dedupe_key"]: row["artifact"] for row in runs if row.get("artifact") and row.get("dedupe_key")}
    if not wanted:
        return 0
    attached = 0
    for run in store.list_runs(source="precomputed"):
        name = wanted.get(run.get("dedupe_key"))
        if name is None or run.get("artifact_path"):
            continue
        try:
            state = load_file(str(folder / name))
        except Exception:  # noqa: BLE001 - a damaged shipped file must not stop the app from starting
            continue
        class_names = ",".join((run.get("metrics") or {}).get("class_names") or [])
        store.save_artifact(run["id"], state, metadata={"class_names": class_names})
        attached += 1
    return attached


def reference_info(path: Path | None = None) -> dict | None:
    """The file's "meta" dict (command, machine, date, note) plus "n_runs" (what `load_reference` imports
    into an empty store); None without a file."""
    content = _read(REFERENCE_FILE if path is None else path)  # looked up at call time
    if content is None:
        return None
    meta = dict(content.get("meta") or {})
    keys = {row.get("dedupe_key") for row in content.get("runs") or []}
    n_runs = len(content.get("runs") or [])
    if path is None:  # the examples beside it are imported too: count those not already in the reference
        examples = _read(default_files()[1]) or {}
        n_runs += sum(1 for row in examples.get("runs") or [] if row.get("dedupe_key") not in keys)
    meta.setdefault("n_runs", n_runs)
    return meta
