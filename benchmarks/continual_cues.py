"""Continual learning where the features can forget: sequential vs NSP2 vs joint on the generated cue-conflict
set (`cues-30`: 5 families of 6 classes, one family per task, the families' order shuffled with the seed).

On textures-30 the frozen features already tell every class apart, so nothing the prompts learn can be taken
away (`continual_features.py`). Here the frozen features separate some families poorly (stripe frequency at
any angle, dot density), the prompts must learn them, and later families reward features that ignore what the
earlier ones needed. Official NSP2 recipe, as the continual benchmark (20 epochs per task, batch 32, lr 0.01,
temperature 28, augmentation), 56 px (the 16 patches of ViT-S/14 at 56 px keep a run near 5 minutes on one
core), 30 training and 10 test images per class.

Writes "## Continual learning where the features can forget" of docs/results.md. Runs share the continual
benchmark's store and checkpoint (`continual_nsp2.py`), so a finished run is reused, not trained again, and two
invocations (say one per core, with different --methods or --seeds) can run side by side.

    python benchmarks/continual_cues.py                        # 3 methods x seeds 0,1,2
    python benchmarks/continual_cues.py --methods nsp2 --seeds 1,2 --no-write
    python benchmarks/continual_cues.py --stored-only          # write the section from finished runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import checkpoint_in, today, write_section  # noqa: E402
from benchmarks.continual_nsp2 import (  # noqa: E402
    CHECKPOINT,
    PAPER,
    PAPER_NSP_FORGETTING,
    PAPER_SEQ_FORGETTING,
    benchmark_config,
    finished,
    interval,
    log,
    metric,
    paired_interval,
    train_and_record,
)
from vptdash.engine import paths  # noqa: E402
from vptdash.methods import continual, cues  # noqa: E402
from vptdash.runs.store import RunStore  # noqa: E402

HEADING = "## Continual learning where the features can forget"
RESOLUTION = 56
# Figures a finished run must have to be reused (runs of older code lack the untrained-prompt column).
MEASURED = ("ncm_task_il_matrix", "ncm_task_il_untrained")


def config_for(method: str, seed: int):
    return benchmark_config(dataset=cues.NAME, resolution=RESOLUTION, method=method, seed=seed)


def reusable(store: RunStore, config) -> dict | None:
    row = finished(store, config)
    if row is not None and all(row["metrics"].get(key) is not None for key in MEASURED):
        return row
    return None


def family_of(task_classes: list[str]) -> str:
    families = {name.rsplit("-", 1)[0] for name in task_classes}
    return families.pop() if len(families) == 1 else "mixed"


def by_family(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """family -> {"untrained", "learned", "final"}: within-task nearest class mean of that family's task, one
    value per run (the family's position in the arrival order differs by seed)."""
    out: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        m = row["metrics"]
        matrix = m["ncm_task_il_matrix"]
        for t, names in enumerate(m["tasks"]):
            cell = out.setdefault(family_of(names), {"untrained": [], "learned": [], "final": []})
            cell["untrained"].append(m["ncm_task_il_untrained"][t])
            if matrix[t][t] is not None:
                cell["learned"].append(matrix[t][t])
            cell["final"].append(matrix[-1][t])
    return out


def pct(values: list[float]) -> str:
    return f"{100 * float(np.mean(values)):.0f}" if values else "—"


def section(rows: list[dict], command: str, minutes: float, loads: list[float]) -> list[str]:
    methods = [m for m in continual.METHODS if any(r["config"]["method"] == m for r in rows)]
    group = {
        m: sorted((r for r in rows if r["config"]["method"] == m), key=lambda r: r["config"]["seed"]) for m in methods
    }
    seeds = sorted({r["config"]["seed"] for r in rows})
    trained_on = sorted({r["timings"].get("machine") or "not recorded" for r in rows})
    run_minutes = [r["timings"]["train_seconds"] / 60 for r in rows]
    body = [
        f"Written on {today()} by `{command}` ({len(rows)} runs, {minutes:.0f} min of wall time in this invocation; "
        f"finished runs are reused). Trained on: {'; '.join(trained_on)}; a run took "
        f"{min(run_minutes):.1f}-{max(run_minutes):.1f} min on one thread, beside other benchmark runs (load "
        f"average {min(loads):.1f}-{max(loads):.1f} when the runs ended): times are indicative.",
        "",
        f"Generated `{cues.NAME}`: 5 families of 6 classes, each family's classes told apart by one cue while the "
        "others vary at random inside every class ("
        + "; ".join(f"*{f}*: {d}" for f, d in cues.FAMILIES.items())
        + "). One family per task, the families' order and each family's classes shuffled with the seed. Official "
        f"NSP2 recipe as in the continual benchmark (20 epochs per task, batch 32, lr 0.01, temperature 28, "
        f"augmentation), {RESOLUTION} px, 30 training and 10 test images per class, seeds {', '.join(map(str, seeds))}. "
        "Mean [95 % t-interval over seeds]. *Features*: nearest class mean among each task's own classes (class "
        "means of the pooled training features, no head): with the untrained prompts, right after the task was "
        "learned, and after the last task; its forgetting is, per old task, the best earlier value minus the "
        "final one, averaged.",
        "",
        "| method | seeds | class-incremental accuracy % | forgetting (points) | task given: accuracy % | "
        "features: untrained prompts % | features: right after learning % | features: after the last task % | "
        "features: forgetting (points) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        g = group[method]
        body.append(
            f"| {continual.METHOD_LABELS[method].split(' (')[0]} | {len(g)} | {interval(metric(g, 'avg_accuracy'))} | "
            f"{interval(metric(g, 'forgetting'), accuracy=False)} | {interval(metric(g, 'avg_accuracy_task_il'))} | "
            f"{interval(metric(g, 'avg_ncm_task_il_untrained'))} | {interval(metric(g, 'ncm_learning_task_il'))} | "
            f"{interval(metric(g, 'avg_ncm_task_il'))} | {interval(metric(g, 'ncm_forgetting_task_il'), accuracy=False)} |"
        )
    families = {m: by_family(group[m]) for m in methods if m != "joint"}
    if families:
        body += [
            "",
            "Features per family (within-task nearest class mean %, mean over seeds: untrained prompts → right after "
            "its task → after the last task):",
            "",
            "| family | " + " | ".join(continual.METHOD_LABELS[m].split(" (")[0] for m in families) + " |",
            "|---|" + "---|" * len(families),
        ]
        for family in cues.FAMILIES:
            cells = []
            for m in families:
                f = families[m].get(family)
                cells.append("—" if f is None else f"{pct(f['untrained'])} → {pct(f['learned'])} → {pct(f['final'])}")
            body.append(f"| {family} | " + " | ".join(cells) + " |")
    body += ["", *observations(group)]
    return body


def observations(group: dict[str, list[dict]]) -> list[str]:
    """Sentences computed from the runs (a rerun cannot leave stale prose)."""
    seq, nsp, joint = group.get("sequential") or [], group.get("nsp2") or [], group.get("joint") or []
    lines = []
    if seq:
        drops = metric(seq, "ncm_forgetting_task_il")
        gains = [a - b for a, b in zip(metric(seq, "ncm_learning_task_il"), metric(seq, "avg_ncm_task_il_untrained"))]
        found = interval(drops, accuracy=False)
        lowest = min(d for d in drops if d is not None)
        lines.append(
            f"- Sequential tuning: learning a task raised its features' within-task accuracy by "
            f"{100 * float(np.mean(gains)):+.1f} points over the untrained prompts, and the later tasks took "
            f"{found} points of it away (per seed: {', '.join(f'{100 * d:.1f}' for d in drops)}). "
            + (
                "Every seed lost more than 2 points: here the features themselves forget, the effect the "
                "null-space projection is meant to prevent."
                if lowest > 0.02
                else "Not every seed lost more than 2 points: the features' forgetting is not shown beyond noise."
            )
        )
    if seq and nsp and {r["config"]["seed"] for r in seq} == {r["config"]["seed"] for r in nsp}:
        for key, what in (
            ("ncm_forgetting_task_il", "the features' forgetting"),
            ("forgetting", "class-incremental forgetting"),
            ("avg_accuracy", "class-incremental accuracy"),
            ("ncm_learning_task_il", "the features right after learning"),
            ("avg_ncm_task_il", "the features after the last task"),
        ):
            diff, half = paired_interval(metric(nsp, key), metric(seq, key))
            ci = "one seed: no interval" if half is None else f"95 % CI {diff - half:+.1f} to {diff + half:+.1f}"
            verdict = "" if half is None else (" (within noise)" if abs(diff) <= half else "")
            lines.append(f"- NSP2 − sequential, {what}: {diff:+.1f} points, paired by seed ({ci}){verdict}.")
        f_seq = float(np.mean(metric(seq, "forgetting")))
        f_nsp = float(np.mean(metric(nsp, "forgetting")))
        n_seq = float(np.mean(metric(seq, "ncm_forgetting_task_il")))
        n_nsp = float(np.mean(metric(nsp, "ncm_forgetting_task_il")))
        paper_cut = 100 * (1 - PAPER_NSP_FORGETTING / PAPER_SEQ_FORGETTING)
        cuts = []
        for label, a, b in (("class-incremental", f_seq, f_nsp), ("features'", n_seq, n_nsp)):
            cuts.append(
                f"{label} forgetting {100 * a:.1f} → {100 * b:.1f} points"
                + (f" ({100 * (b - a) / a:+.0f} %)" if a > 0.005 else "")
            )
        lines.append(
            f"- Against the paper: {PAPER}, a cut of {paper_cut:.0f} %. Here: " + "; ".join(cuts) + ". The paper's "
            "backbone, data and ~2,000 steps per task differ from this CPU benchmark's (ViT-S/14 at 56 px, 20 "
            "epochs of 180 images per task); the comparison is of the direction and rough size of the cut."
        )
    if joint:
        lines.append(
            f"- Joint training (all tasks at once, the upper bound): class-incremental accuracy "
            f"{interval(metric(joint, 'avg_accuracy'))} %, features {interval(metric(joint, 'avg_ncm_task_il'))} %."
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(continual.METHODS))
    parser.add_argument("--store", default=str(paths.data_dir() / "benchmarks" / "continual.sqlite"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see continual_nsp2.py)")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not touch docs/results.md")
    parser.add_argument("--stored-only", action="store_true", help="train nothing: write from finished runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    Path(args.store).parent.mkdir(parents=True, exist_ok=True)
    store = RunStore(args.store)
    checkpoint_in(store, CHECKPOINT)
    rows, loads, started = [], [], time.perf_counter()
    for method in methods:
        for seed in seeds:
            config = config_for(method, seed)
            row = reusable(store, config)
            if row is None and args.stored_only:
                log(f"{config.label()}: not finished yet, left out")
                continue
            if row is None:
                log(f"{config.label()} ...")
                row = train_and_record(store, config, f"bench-{cues.NAME}", loads)
                if row["status"] != "done":
                    return 1
            m = row["metrics"]
            log(
                f"  {method} seed {seed}: class-IL {m['avg_accuracy']:.3f}, features {m['avg_ncm_task_il_untrained']:.3f}"
                f" -> {m['ncm_learning_task_il'] or float('nan'):.3f} -> {m['avg_ncm_task_il']:.3f}, "
                f"{row['timings']['train_seconds'] / 60:.1f} min"
            )
            rows.append(row)
    if not rows:
        log("no finished run: nothing to write")
        return 1
    loads = loads or [float(r["timings"].get("load_average_end") or 0.0) for r in rows]
    command = "python benchmarks/continual_cues.py" + (f" --seeds {args.seeds}" if args.seeds != "0,1,2" else "")
    command += " --stored-only" if args.stored_only else ""
    text = HEADING + "\n\n" + "\n".join(section(rows, command, (time.perf_counter() - started) / 60, loads))
    print(text)
    if not args.no_write:
        write_section(HEADING, text.split("\n", 2)[2])
        log("wrote docs/results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
