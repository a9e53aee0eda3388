"""Add the full-graph GMACs (every token through every block: the convention of published FLOPs tables)
to the shipped reference files whose runs were exported before it was counted.

It is counted from each run's stored configuration (`vptdash.runs.recount`, the function `vptdash runs
recount` and the dashboard use for a run store): no training, no data, no latency measurement; rows
that already carry it keep their value, so running it again changes nothing.

    python benchmarks/recount_full_graph.py                 # every vptdash/runs/reference/*.json
    python benchmarks/recount_full_graph.py FILE.json ...   # these files only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, today  # noqa: E402
from vptdash.runs import recount  # noqa: E402
from vptdash.runs.reference import REFERENCE_DIR  # noqa: E402


def recount_file(path: Path) -> str:
    content = json.loads(path.read_text(encoding="utf-8"))
    runs = content if isinstance(content, list) else content.get("runs") or []
    result = recount.fill_full_graph_rows(runs)
    if result.counted and isinstance(content, dict):
        content.setdefault("meta", {})["costs_full_graph"] = (
            f"gmacs_full_graph counted from each run's configuration on {today()} ({machine()}) with "
            "benchmarks/recount_full_graph.py; every other figure as the file had it"
        )
    if result.counted:  # the same compact form the reference scripts write
        path.write_text(json.dumps(content, indent=None, separators=(",", ":")), encoding="utf-8")
    return f"{path.name}: {result.line()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="reference JSON files (default: the shipped ones)")
    args = parser.parse_args(argv)
    files = args.files or sorted(REFERENCE_DIR.glob("*.json"))
    for path in files:
        if not path.is_file():
            print(f"error: no such file: {path}", file=sys.stderr)
            return 1
        print(recount_file(path), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
