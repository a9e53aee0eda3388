"""Continual learning: sequential prompt tuning vs null-space prompts (NSP2) vs joint training,
3 seeds, on ELPV (4 classes, 2 tasks) and on the generated 10-class textures (5 tasks), with the
offline DINOv2 ViT-S/14 at 112 px. Prints a markdown section and writes it into docs/results.md
(only the section "## Continual learning").

    nice -n 10 python benchmarks/continual_elpv.py                  # both scenarios, 3 seeds (~1 h on 2 busy cores)
    python benchmarks/continual_elpv.py --scenarios elpv --seeds 0 --no-write

Runs go into their own run store (default: <data dir>/benchmarks/continual.sqlite); finished runs with
the same configuration are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, today, write_section  # noqa: E402
from vptdash.engine import paths
from vptdash.methods import continual  # noqa: E402
from vptdash.methods.continual import ContinualConfig  # noqa: E402
from vptdash.runs.store import RunStore  # noqa: E402

HEADING = "## Continual learning"
SCENARIOS = {
    # ELPV: 4 classes by defect probability, natural order: T1 = {p=0, p=1/3}, T2 = {p=2/3, p=1}.
    "elpv": dict(dataset="elpv", tasks=2, shots=32, epochs=10, batch_size=16),
    # Generated textures: 10 classes, 5 tasks of 2 in folder order; 60 images per class (15 test).
    "textures-10": dict(dataset="textures-10", tasks=5, shots=16, epochs=5, batch_size=8),
}
COMMON = dict(
    backbone="dinov2_s14",
    resolution=112,
    num_prompts=4,
    placement="last4",
    lr=1e-2,
    weight_decay=1e-4,
    eta=continual.DEFAULT_ETA,
    precision="fp32",
)
PAPER = "NSP2 paper (ViT-B/16 IN-21k, 10-split): forgetting 12.3 -> 3.3 on CIFAR-100 (-73%), 19.4 -> 5.1 on ImageNet-R (-74%)"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def finished(store: RunStore, config: ContinualConfig) -> dict | None:
    wanted = config.to_dict()
    for row in store.list_runs(status="done", kind=continual.KIND):
        if all(row["config"].get(k) == v for k, v in wanted.items()):
            return row
    return None


def pm(values: list[float], scale: float = 100.0) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = float(np.mean(values)) * scale
    return f"{mean:.1f} ± {float(np.std(values, ddof=1)) * scale:.1f}" if len(values) > 1 else f"{mean:.1f}"


def matrix_text(matrix) -> str:
    return "[" + "; ".join(" ".join("—" if v is None else f"{100 * v:.0f}" for v in row) for row in matrix) + "]"


def mean_of(rows: list[dict], key: str) -> float | None:
    values = [r["metrics"].get(key) for r in rows if r["metrics"].get(key) is not None]
    return float(np.mean(values)) if values else None


def observations(by_method: dict[str, list[dict]]) -> list[str]:
    """What the table says, as sentences computed from it (so a rerun cannot leave stale prose)."""
    seq, nsp = by_method.get("sequential") or [], by_method.get("nsp2") or []
    if not seq or not nsp:
        return []
    f_seq, f_nsp = mean_of(seq, "forgetting"), mean_of(nsp, "forgetting")
    t_seq, t_nsp = mean_of(seq, "forgetting_task_il"), mean_of(nsp, "forgetting_task_il")
    d_seq = np.mean([r["metrics"]["feature_drift"][-1][0] for r in seq])
    d_nsp = np.mean([r["metrics"]["feature_drift"][-1][0] for r in nsp])
    lines = []
    if f_seq is not None and f_nsp is not None:
        change = f"{100 * (f_nsp / f_seq - 1):+.0f} %" if f_seq > 0.005 else "n/a: sequential hardly forgets"
        lines.append(
            f"- Class-incremental forgetting, NSP2 vs sequential: {100 * f_nsp:.1f} vs {100 * f_seq:.1f} "
            f"points ({change}; the paper reports about −75 %)."
        )
    if t_seq is not None and t_nsp is not None:
        change = f" ({100 * (t_nsp / t_seq - 1):+.0f} %)" if t_seq > 0.005 else ""
        lines.append(
            f"- With the task given, forgetting is {100 * t_nsp:.1f} (NSP2) vs {100 * t_seq:.1f} (sequential) "
            f"points{change}; negative = the old task got better. The rest of the class-incremental drop is "
            "old images being assigned to newer classes, which the prompts cannot prevent (each head block "
            "only ever saw its own task's classes)."
        )
    lines.append(
        f"- The first task's test features moved by {100 * d_nsp:.0f} % with NSP2 vs {100 * d_seq:.0f} % with "
        f"sequential tuning (mean relative change, end of T1 to the end)."
    )
    learn = {
        name: np.mean(
            [
                np.mean([r["metrics"]["accuracy_matrix"][i][i] for i in range(len(r["metrics"]["tasks"]))])
                for r in entries
            ]
        )
        for name, entries in (("sequential", seq), ("nsp2", nsp))
    }
    lines.append(
        f"- Learning accuracy (each task tested right after it was trained, class-incremental, mean over tasks): NSP2 "
        f"{100 * learn['nsp2']:.1f} vs sequential {100 * learn['sequential']:.1f} %"
        + (": the projection also limits what new tasks learn." if learn["nsp2"] < learn["sequential"] - 0.05 else ".")
    )
    first = [r["metrics"]["balanced_accuracy_matrix"][0][0] for r in seq + nsp]
    classes = len(seq[0]["metrics"]["tasks"][0])
    lines.append(
        f"- Right after T1, its balanced accuracy is {100 * np.mean(first):.0f} % (chance {100 / classes:.0f} %)."
    )
    return lines


def scenario_section(name: str, rows: list[dict]) -> list[str]:
    settings = {**COMMON, **SCENARIOS[name]}
    tasks = rows[0]["metrics"]["tasks"]
    by_method = {m: [r for r in rows if r["config"]["method"] == m] for m in continual.METHODS}
    lines = [
        f"### {name}: {settings['tasks']} tasks " + " → ".join("{" + ", ".join(t) + "}" for t in tasks),
        "",
        f"{settings['shots']} training images per class, batch {settings['batch_size']}, "
        f"{settings['epochs']} epochs per task (joint: "
        f"{settings['epochs']} epochs over all tasks' images), test split 25 % "
        f"({' / '.join(map(str, rows[0]['metrics']['test_sizes']))} test images per task), "
        f"seeds {sorted({r['config']['seed'] for r in rows})}.",
        "",
        "| method | avg accuracy | forgetting | balanced avg | balanced forgetting | task given: avg | "
        "task given: forgetting | T1 feature drift | minutes per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, entries in by_method.items():
        if not entries:
            continue
        m = [r["metrics"] for r in entries]
        drift = [x["feature_drift"][-1][0] for x in m if len(x["feature_drift"]) > 1]
        lines.append(
            f"| {continual.METHOD_LABELS[method]} | {pm([x['avg_accuracy'] for x in m])} | "
            f"{pm([x['forgetting'] for x in m])} | {pm([x['avg_balanced_accuracy'] for x in m])} | "
            f"{pm([x['forgetting_balanced'] for x in m])} | {pm([x['avg_accuracy_task_il'] for x in m])} | "
            f"{pm([x['forgetting_task_il'] for x in m])} | {pm(drift) if method != 'joint' else '—'} | "
            f"{np.mean([r['timings']['train_seconds'] for r in entries]) / 60:.1f} |"
        )
    lines += [""] + observations(by_method)
    lines += [
        "",
        "Mean accuracy matrices (rows: after task i, columns: task j, %, class-incremental): "
        + ", ".join(
            f"{continual.METHOD_LABELS[m].split(' (')[0]} {matrix_text(continual.mean_matrix(entries))}"
            for m, entries in by_method.items()
            if entries
        )
        + ".",
        "",
    ]
    nullity = [n for r in by_method["nsp2"] for n in r["metrics"]["nullity"]]
    if nullity:
        k1 = [k[0] for n in nullity for k in n["blocks"].values()]
        k2 = [k[1] for n in nullity for k in n["blocks"].values()]
        dims = next(iter(nullity[0]["dims"].values()))
        lines += [
            f"NSP2 nullity at the elbow, per prompted block and task: {min(k1)}–{max(k1)} of {dims[0]} "
            f"(affinity condition), {min(k2)}–{max(k2)} of {dims[1]} (aggregation condition).",
            "",
        ]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(continual.METHODS))
    parser.add_argument("--store", default=str(paths.data_dir() / "benchmarks" / "continual.sqlite"))
    parser.add_argument("--no-write", action="store_true", help="print the section, do not touch docs/results.md")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    Path(args.store).parent.mkdir(parents=True, exist_ok=True)
    store = RunStore(args.store)
    rows: dict[str, list[dict]] = {}
    for name in scenarios:
        base = ContinualConfig(**COMMON, **SCENARIOS[name])
        for config in continual.continual_configs(base, methods, seeds):
            row = finished(store, config)
            if row is None:
                log(f"{name}: {config.label()} ...")
                row = continual.run_continual_now(store, config, sweep_id=f"bench-{name}")
                if row["status"] != "done":
                    log(f"  {row['status']}: {row.get('error')}")
                    return 1
            m = row["metrics"]
            log(
                f"  {name} {config.method} seed {config.seed}: avg {m['avg_accuracy']:.3f}, forgetting "
                f"{m['forgetting'] if m['forgetting'] is None else round(m['forgetting'], 3)}, "
                f"{row['timings']['train_seconds'] / 60:.1f} min"
            )
            rows.setdefault(name, []).append(row)

    all_rows = [r for entries in rows.values() for r in entries]
    run_minutes = sum(r["timings"]["train_seconds"] for r in all_rows) / 60
    body = [
        f"Machine: {machine()} (shared with other developers' jobs: times are indicative). Date: {today()}.",
        f"Command: `nice -n 10 python benchmarks/continual_elpv.py --scenarios {','.join(scenarios)} "
        f"--seeds {args.seeds}` ({len(all_rows)} runs, {run_minutes:.0f} min of run time in total; finished runs "
        "in the benchmark's store are reused).",
        "",
        "Settings: offline DINOv2 ViT-S/14 at 112 px, 4 prompts in each of the last 4 blocks (the 8 blocks "
        "before run once per image), AdamW lr 1e-2 with one warm-up epoch and cosine decay per task, fp32. "
        "Class-incremental: one head block per task, trained on its own classes and frozen afterwards; at test "
        "time the prediction is among every class seen so far. NSP2: covariances of both conditions summed "
        "over the old tasks' training images, nullity at the spectrum's elbow, eta = 0.97, projection of "
        "AdamW's update, LayerNorm consistency loss (weight 1). Joint: one training on all tasks' images.",
        "",
        "Columns: accuracies and forgetting in % (mean ± sample std over seeds). *Avg accuracy*: mean over "
        "tasks after the last one; *forgetting*: mean over old tasks of (best earlier accuracy − final "
        "accuracy); *balanced*: mean recall over a task's classes; *task given*: prediction among the task's "
        "own classes (what the features still know, without confusion between tasks); *T1 feature drift*: "
        "relative change of the first task's pooled test features from the end of T1 to the end.",
        "",
    ]
    for name, entries in rows.items():
        body += scenario_section(name, entries)
    body += [PAPER + ".", ""]
    section = HEADING + "\n\n" + "\n".join(body)
    print(section)
    if not args.no_write:
        write_section(HEADING, "\n".join(body))
        log("wrote docs/results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
