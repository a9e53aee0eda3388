"""The core engine's results on ELPV at 112 px with the offline DINOv2 ViT-S/14, written into docs/results.md.

(a) 64 shots per class, 4-class and binary: linear probe, VPT-shallow and VPT-deep at 1, 5, 10, 50
    prompts, 3 seeds each: accuracy and balanced accuracy (mean ± std), GMACs, latency.
(b) The ELPV paper's protocol (test on a stratified 25%, train on the rest minus a 10% validation
    split): the linear probe and the best VPT setting from (a), one seed on CPU.

Runs go into their own run store (resumable: finished configurations are not run again), then latency
is measured once per distinct budget in a separate quiet pass, since it does not depend on the seed.

    python benchmarks/results_elpv.py                 # everything (about an hour on 2 CPU cores)
    python benchmarks/results_elpv.py --part a --tasks elpv-binary --seeds 0
    python benchmarks/results_elpv.py --part report --recount-costs   # stored runs on today's graph, no training
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    checkpoint_in,
    checkpoint_out,
    machine,
    measure_latencies,
    pm,
    recount_store_costs,
    today,
    write_section,
)
from vptdash.engine import paths  # noqa: E402
from vptdash.engine.train import RunConfig  # noqa: E402
from vptdash.runs.store import RunStore  # noqa: E402

COUNTS = (1, 5, 10, 50)
PLACEMENTS = ("shallow", "deep")
HEADING = "## Core engine: ELPV at 112 px"
PAPER = {"CNN (VGG-19), Deitsch et al.": 0.8842, "SVM, Deitsch et al.": 0.8244}


RECIPE_ARGS = [
    "--resolution",
    "112",
    "--epochs",
    "10",
    "--batch-size",
    "16",
    "--lr",
    "0.01",
    "--precision",
    "bf16",
    "--no-latency",
    "--quiet",
]


def sweep_command(task: str, seeds: list[int], store: str) -> list[str]:
    """Part (a) is literally the project's sweep command (resumable)."""
    return [
        "sweep",
        "--dataset",
        task,
        "--shots",
        "64",
        "--prompts",
        "0," + ",".join(map(str, COUNTS)),
        "--placement",
        ",".join(PLACEMENTS),
        "--seeds",
        ",".join(map(str, seeds)),
        *RECIPE_ARGS,
        "--store",
        store,
        "--resume",
    ]


def full_data_command(task: str, prompts: int, placement: str, store: str) -> list[str]:
    if prompts == 0:
        return ["probe", "--dataset", task, *RECIPE_ARGS, "--store", store]
    return [
        "train",
        "--dataset",
        task,
        "--prompts",
        str(prompts),
        "--placement",
        placement,
        *RECIPE_ARGS,
        "--store",
        store,
    ]


def already_done(store: RunStore, argv: list[str]) -> bool:
    from vptdash.cli import build_parser, config_from_args

    args = build_parser().parse_args(argv)
    tuning = "linear" if args.command == "probe" else args.tuning
    config = config_from_args(
        args,
        tuning=tuning,
        num_prompts=0 if tuning == "linear" else args.prompts,
        placement="none" if tuning == "linear" else args.placement,
        seed=args.seed,
    )
    return any(RunConfig.from_dict(r["config"]) == config for r in store.list_runs(status="done"))


def table(store: RunStore, shots_filter) -> pd.DataFrame:
    rows = []
    for row in store.list_runs(status="done"):
        config = RunConfig.from_dict(row["config"])
        if not shots_filter(config.shots):
            continue
        costs = row["costs"]
        rows.append(
            {
                "task": config.dataset,
                "setting": config.label(),
                "family": config.family(),
                "prompts": 0 if config.is_linear_probe else config.num_prompts,
                "seed": config.seed,
                "accuracy": row["metrics"]["accuracy"],
                "balanced": row["metrics"]["balanced_accuracy"],
                "majority": row["metrics"]["majority_accuracy"],
                "gmacs": costs.get("gmacs", float("nan")),
                "lat_b1": costs.get("latency_ms_b1", float("nan")),
                "lat_b32": costs.get("latency_ms_b32", float("nan")),
                "params": costs.get("params_trainable"),
                "train_s": row["timings"].get("train_seconds"),
            }
        )
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby(["task", "family", "prompts", "setting"], sort=False)
    out = grouped.agg(
        acc_mean=("accuracy", "mean"),
        acc_std=("accuracy", "std"),
        bal_mean=("balanced", "mean"),
        bal_std=("balanced", "std"),
        seeds=("seed", "count"),
        majority=("majority", "first"),
        gmacs=("gmacs", "first"),
        lat_b1=("lat_b1", "first"),
        lat_b32=("lat_b32", "first"),
        params=("params", "first"),
        train_s=("train_s", "mean"),
    ).reset_index()
    order = {"linear probe": 0, "shallow": 1, "deep": 2}
    out["order"] = out["family"].map(order).fillna(9)
    return out.sort_values(["task", "order", "prompts"]).drop(columns="order")


def markdown(summary: pd.DataFrame) -> str:
    lines = [
        "| task | setting | seeds | accuracy % | balanced accuracy % | GMACs/image | latency ms (b1) | ms/image (b32) | trainable params | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in summary.iterrows():
        lines.append(
            f"| {r.task} | {r.setting} | {r.seeds} | {pm(r.acc_mean, r.acc_std)} | {pm(r.bal_mean, r.bal_std)} | "
            f"{r.gmacs:.3f} | {r.lat_b1:.1f} | {r.lat_b32:.2f} | {int(r.params):,} | {r.train_s:.0f} |"
        )
    return "\n".join(lines)


# Finished runs travel with the repository, so a long grid can continue on another machine or session.
CHECKPOINT = Path(__file__).resolve().parent / "data" / "results_elpv_runs.json"


def main() -> None:
    from vptdash import cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["a", "b", "all", "report"], default="all")
    parser.add_argument("--tasks", default="elpv-binary,elpv")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--store", default=str(paths.data_dir() / "benchmark-results.sqlite"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--recount-costs",
        action="store_true",
        help="re-count the stored runs' GMACs (after a change in what the forward pass computes)",
    )
    args = parser.parse_args()
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    store = RunStore(args.store)

    checkpoint_in(store, CHECKPOINT)
    if args.part in ("a", "all"):
        for task in tasks:
            print("python -m vptdash " + " ".join(sweep_command(task, seeds, "STORE")), flush=True)
            for seed in seeds:  # one seed at a time, checkpointed into the repo after each
                cli.main(sweep_command(task, [seed], args.store))
                checkpoint_out(store, CHECKPOINT)
    if args.part in ("b", "all"):
        frame_a = summarise(table(store, lambda shots: shots == 64))
        for task in tasks:
            vpt = frame_a[(frame_a.task == task) & (frame_a.family != "linear probe")]
            best = vpt.sort_values("acc_mean", ascending=False).iloc[0]
            for argv in (
                full_data_command(task, 0, "none", args.store),
                full_data_command(task, int(best.prompts), best.family, args.store),
            ):
                if not already_done(store, argv):
                    print("python -m vptdash " + " ".join(argv), flush=True)
                    cli.main(argv)
                    checkpoint_out(store, CHECKPOINT)

    if args.recount_costs:
        recount_store_costs(store, latency=False)  # latency: measure_latencies, next
    measure_latencies(store)
    checkpoint_out(store, CHECKPOINT)  # the stored runs carry the costs the section shows (tests/test_docs_figures.py)
    summary_a = summarise(table(store, lambda shots: shots == 64))
    summary_b = summarise(table(store, lambda shots: shots is None))
    print(markdown(summary_a))
    print(markdown(summary_b))
    if args.no_write:
        return
    recipe_text = (
        "Recipe (the CLI defaults unless stated): AdamW, lr 1e-2, weight decay 1e-4, 1 warm-up epoch then "
        "cosine, 10 epochs, batch 16, bf16 autocast, no augmentation; linear probes train the same way on "
        "cached CLS features. Test split: a stratified 25% (656 images, the same for every run); "
        "validation 10%. Commands: `python -m vptdash " + " ".join(sweep_command("TASK", seeds, "STORE")) + "`."
    )
    paper = " / ".join(f"{name} {acc * 100:.2f}%" for name, acc in PAPER.items())
    body = f"""Produced by `python benchmarks/results_elpv.py` on {today()}; machine: {machine()}.
Backbone: the offline DINOv2 ViT-S/14 (`dinov2_s14`), frozen, 112 px. {recipe_text}
GMACs are counted by fvcore on the real graph (one multiply-add = 1 MAC); latency is the median forward time
per image in fp32, measured once per budget after training, on a quiet machine where possible.

### (a) 64 shots per class, 3 seeds (mean ± std)

{markdown(summary_a)}

### (b) The ELPV paper's protocol: train on the remaining 75% (less the 10% validation split), one seed

One seed on CPU; the paper's baselines on the same 75/25 protocol: {paper}.

{markdown(summary_b)}
"""
    write_section(HEADING, body)


if __name__ == "__main__":
    main()
