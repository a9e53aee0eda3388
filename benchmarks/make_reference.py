"""Produce the older reference sweep (vptdash/runs/reference/elpv_reference_sweep.json, fixed lr 1e-2).

Superseded by benchmarks/reference_sweep.py (lr chosen on validation, several data sizes); kept so the
old file can be re-made and its costs re-counted.

It is the project's own sweep command in the meeting-demo setting (binary ELPV, 16 shots per class,
112 px, the offline DINOv2 ViT-S/14), 3 seeds, followed by one quiet latency measurement per budget;
then the finished runs are exported with the command, machine and date that produced them.

    python benchmarks/make_reference.py                   # about 15 minutes on 2 CPU cores
    python benchmarks/make_reference.py --recount-costs   # only GMACs and latency again (about a minute)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, measure_latencies, recount_costs, today  # noqa: E402
from vptdash import cli  # noqa: E402
from vptdash.engine import paths
from vptdash.runs import presets
from vptdash.runs.reference import REFERENCE_V1_FILE as REFERENCE_FILE  # noqa: E402
from vptdash.runs.store import RunStore  # noqa: E402

COUNTS = "0,1,5,10,50,100"


def sweep_argv(seeds: str, store: str) -> list[str]:
    base = presets.demo_base()
    return [
        "sweep",
        "--dataset",
        base.dataset,
        "--shots",
        str(base.shots),
        "--resolution",
        str(base.resolution),
        "--prompts",
        COUNTS,
        "--placement",
        "shallow,deep",
        "--seeds",
        seeds,
        "--epochs",
        str(base.epochs),
        "--batch-size",
        str(base.batch_size),
        "--lr",
        "0.01",  # the old file's fixed rate
        "--precision",
        base.precision,
        "--val-fraction",
        str(base.val_fraction),
        "--no-latency",
        "--store",
        store,
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--store", default=str(paths.data_dir() / "reference-sweep.sqlite"))
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument(
        "--recount-costs",
        action="store_true",
        help="re-count GMACs and latency of the shipped file's runs (no training)",
    )
    args = parser.parse_args()
    if args.recount_costs:
        recount_shipped_costs()
        return
    store = RunStore(args.store)
    argv = sweep_argv(args.seeds, args.store)
    if not args.export_only:
        cli.main(argv + ["--resume"])
        measure_latencies(store)
    rows = [row for row in store.export_runs(status="done")]
    command = (
        "python -m vptdash "
        + " ".join(a for a in argv if a not in ("--store", args.store)).replace("--no-latency", "--no-latency").strip()
    )
    meta = {
        "command": command + "  (then one latency measurement per budget: benchmarks/make_reference.py)",
        "machine": machine(),
        "date": today(),
        "note": "Precomputed reference sweep: binary ELPV (defective if p > 0.5), 16 shots per class, "
        "112 px, offline DINOv2 ViT-S/14, test = stratified 25% (656 images). ELPV: CC BY-NC-SA 4.0.",
    }
    REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE_FILE.write_text(json.dumps({"meta": meta, "runs": rows}, indent=None, separators=(",", ":")))
    print(f"wrote {len(rows)} runs to {REFERENCE_FILE} ({REFERENCE_FILE.stat().st_size / 1024:.0f} KiB)")


def recount_shipped_costs() -> None:
    reference = json.loads(REFERENCE_FILE.read_text())
    recount_costs(reference["runs"])
    reference["meta"]["costs"] = (
        f"GMACs and latency re-counted on {today()} ({machine()}) with "
        "benchmarks/make_reference.py --recount-costs; accuracies from the sweep"
    )
    REFERENCE_FILE.write_text(json.dumps(reference, indent=None, separators=(",", ":")))
    print(f"re-counted the costs of {len(reference['runs'])} runs in {REFERENCE_FILE}")


if __name__ == "__main__":
    main()
