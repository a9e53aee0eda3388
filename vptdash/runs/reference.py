"""The precomputed reference sweep shipped with the app (ELPV), so the charts are never empty.

The file is `{"meta": {"command", "machine", "date", "note"}, "runs": [rows as
RunStore.export_runs gives them]}`; it is imported into the run store with source "precomputed"
(idempotent: every exported row carries its dedupe_key).
"""

from __future__ import annotations

import json
from pathlib import Path

from vptdash.runs.store import RunStore

REFERENCE_FILE = Path(__file__).parent / "reference" / "elpv_reference_sweep.json"


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
    current costs (`benchmarks/make_reference.py --recount-costs` re-counts them without retraining)."""
    content = _read(REFERENCE_FILE if path is None else path)  # looked up at call time
    if content is None:
        return 0
    runs = content.get("runs") or []
    return store.import_runs(runs, source="precomputed", refresh_costs=True) if runs else 0


def reference_info(path: Path | None = None) -> dict | None:
    """The file's "meta" dict (command, machine, date, note) plus "n_runs"; None without a file."""
    content = _read(REFERENCE_FILE if path is None else path)  # looked up at call time
    if content is None:
        return None
    meta = dict(content.get("meta") or {})
    meta.setdefault("n_runs", len(content.get("runs") or []))
    return meta
