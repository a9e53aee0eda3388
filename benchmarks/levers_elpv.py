"""Cost levers on ELPV: bilinear prompts (does whitening speed up convergence?) and layer
skipping (what do 0, 2, 4, 6 skipped blocks cost in accuracy, and save in GMACs and latency?).

    nice -n 10 python benchmarks/levers_elpv.py              # run, then write docs/results.md (its section only)
    python benchmarks/levers_elpv.py --no-write              # print only
    python benchmarks/levers_elpv.py --seeds 0,1,2 --recount-costs   # stored runs: GMACs re-counted, latency measured again
    python benchmarks/levers_elpv.py --backbone tiny-random --dataset <folder> --no-write   # smoke test

Setting (sized for about 25 CPU-minutes on a shared 2-core machine): elpv-binary, offline DINOv2
ViT-S/14 at 112 px, 32 training images per class, the fixed stratified test split (25 %, 656 cells),
validation 5 % (131 cells) evaluated after every epoch, 10 shallow prompts, AdamW lr 1e-2, batch 8,
8 epochs, bf16 autocast; standard vs bilinear vs bilinear-whitened prompts at the same m (rank
c = min(75, m) = 10, the recipe scaled down), seeds 0 and 1 (same shots per seed across types).

Skipping: the search objective (`vptdash.methods.skipping`) on the 64 training images (head) and 48
validation images (loss): greedy to
k = 6 (its removal order gives the nested sets for k = 2, 4, 6) and DAS for k = 4 (a few hundred
REINFORCE steps, capped at 250 new subnetworks), sharing one evaluator. Then the best prompt type
of the convergence runs (by mean final validation accuracy, seed 0) is trained with those blocks
skipped; 0 skipped is the convergence run itself. GMACs are fvcore counts (fused attention off);
latency is the median fp32 forward on this machine (batch 1 and 32), measured after training, once
per configuration: on a shared, loaded machine it is noisy, the p25-p75 range is printed.

Finished runs in the store with the same configuration are reused (the benchmark resumes); search
results are kept in a JSON file beside the store, and the CPU time of every invocation in a ledger
beside it (`<store>.cpu.json`, a list of {"date", "cpu_s", "note"}), so a resumed benchmark reports
the CPU time of all its invocations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, recount_store_costs, today, write_section  # noqa: E402
from vptdash.engine import cost, paths, whitening  # noqa: E402
from vptdash.engine.backbones import load_backbone  # noqa: E402
from vptdash.engine.train import RunConfig, build_model  # noqa: E402
from vptdash.methods import skipping
from vptdash.runs import jobs
from vptdash.runs.store import RunStore  # noqa: E402

HEADING = "## Cost levers: bilinear prompts and layer skipping"
TYPES = ("standard", "bilinear", "bilinear-whitened")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def base_config(args) -> dict:
    return dict(
        dataset=args.dataset,
        backbone=args.backbone,
        resolution=args.resolution,
        shots=args.shots,
        test_fraction=0.25,
        val_fraction=args.val_fraction,
        split_seed=0,
        epochs=args.epochs,
        batch_size=8,
        lr=1e-2,
        warmup_epochs=1.0,
        eval_every=1,
        precision=args.precision,
        measure_latency=False,
        num_prompts=args.prompts,
        placement="shallow",
    )


def finished(store: RunStore, config: RunConfig) -> dict | None:
    wanted = config.to_dict()
    for row in store.list_runs(status="done", kind="train"):
        if all(row["config"].get(k) == v for k, v in wanted.items() if k != "measure_latency"):
            return row
    return None


def ensure_run(store: RunStore, config: RunConfig) -> dict:
    row = finished(store, config)
    if row is None:
        log(f"train {config.label()}, seed {config.seed}")
        t = time.perf_counter()
        row = jobs.run_now(store, config, source="cli")
        if row["status"] != "done":
            raise RuntimeError(f"run {row['id']} {row['status']}: {row.get('error')}")
        log(f"  done in {time.perf_counter() - t:.0f} s, test accuracy {row['metrics']['accuracy']:.3f}")
    return row


def curve_of(store: RunStore, row: dict) -> list[dict]:
    return [e for e in store.progress(row["id"]) if e.get("phase") == "val"]


def epochs_to(curve: list[dict], key: str, fraction: float = 0.95) -> int | None:
    """First epoch whose value reaches `fraction` of the final (last-epoch) value."""
    if not curve:
        return None
    final = curve[-1][key]
    return next(int(p["epoch"]) for p in curve if p[key] >= fraction * final)


def measure(store: RunStore, row: dict, again: bool = False) -> dict:
    """fp32 latency at batch 1 and 32, written into the run (once per configuration, unless `again`)."""
    costs = row.get("costs") or {}
    if again or costs.get("latency_ms_b1") is None or costs.get("latency_load_average") is None:
        config = RunConfig.from_dict(row["config"])
        model = build_model(config, num_classes=2)
        b1 = cost.measure_latency(model, config.resolution, batch_size=1, repeats=20)
        b32 = cost.measure_latency(model, config.resolution, batch_size=32, warmup=1, repeats=3)
        costs = {
            "latency_ms_b1": b1["median_ms_per_image"],
            "latency_ms_b1_p25": b1["p25_ms_per_image"],
            "latency_ms_b1_p75": b1["p75_ms_per_image"],
            "latency_ms_b32": b32["median_ms_per_image"],
            "latency_ms_b32_p25": b32["p25_ms_per_image"],
            "latency_ms_b32_p75": b32["p75_ms_per_image"],
            "latency_threads": b1["threads"],
            "latency_precision": "fp32",
            "latency_load_average": os.getloadavg()[0],
        }
        store.update_results(row["id"], costs=costs)
        log(
            f"  latency {config.label()}: {b1['median_ms_per_image']:.1f} ms (b1), "
            f"{b32['median_ms_per_image']:.2f} ms/image (b32)"
        )
    return store.get_run(row["id"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(paths.data_dir() / "benchmarks" / "levers_elpv.sqlite"))
    parser.add_argument("--dataset", default="elpv-binary")
    parser.add_argument("--backbone", default="dinov2_s14")
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--skip-ks", default="2,4,6")
    parser.add_argument("--das-k", type=int, default=4)
    parser.add_argument("--das-steps", type=int, default=300)
    parser.add_argument("--das-max-evals", type=int, default=250, help="DAS: at most this many new subnetworks")
    parser.add_argument("--search-val", type=int, default=48, help="validation images for the search objective")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/results.md")
    parser.add_argument(
        "--recount-costs",
        action="store_true",
        help="stored runs: GMACs counted again and latency measured again (after a change in what the forward pass computes)",
    )
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    skip_ks = [int(k) for k in args.skip_ks.split(",")]
    Path(args.store).parent.mkdir(parents=True, exist_ok=True)
    store = RunStore(args.store)
    started, cpu0 = time.perf_counter(), cpu_seconds()
    log(f"store {args.store}, torch threads {torch.get_num_threads()}")
    if args.recount_costs:
        log("re-counting GMACs of the stored runs")
        recount_store_costs(store, latency=False)  # latency: measure() below, again
    base = base_config(args)

    # ---------------------------------------------------------------- burstiness on the training images
    log("burstiness (block 0 and the middle block)")
    burst_config = RunConfig(**{**base, "seed": seeds[0]})
    depth = len(load_backbone(args.backbone, None, args.resolution).blocks)
    bursts = {block: whitening.burstiness_for_config(burst_config, block=block) for block in (0, depth // 2)}

    # ---------------------------------------------------------------- convergence
    conv: dict[str, list[dict]] = {t: [] for t in TYPES}
    for seed in seeds:
        for prompt_type in TYPES:
            conv[prompt_type].append(ensure_run(store, RunConfig(**{**base, "seed": seed, "prompt_type": prompt_type})))
    best_type = max(TYPES, key=lambda t: (np.mean([r["metrics"]["val_accuracy"] for r in conv[t]]), -TYPES.index(t)))
    log(f"best prompt type by mean final validation accuracy: {best_type}")

    # ---------------------------------------------------------------- skip search
    search_file = Path(args.store).with_suffix(".search.json")
    search_key = json.dumps(
        {
            **base,
            "seed": seeds[0],
            "search_val": args.search_val,
            "ks": max(skip_ks),
            "das_k": args.das_k,
            "das_steps": args.das_steps,
            "das_max": args.das_max_evals,
        },
        sort_keys=True,
    )
    saved = json.loads(search_file.read_text()) if search_file.exists() else {}
    if saved.get("key") != search_key:
        search_config = RunConfig(**{**base, "seed": seeds[0]})
        log("skip search: preparing the evaluator")
        t = time.perf_counter()
        evaluator, candidates = skipping.prepare_evaluator(search_config, max_val=args.search_val)
        prep_s = time.perf_counter() - t
        log(f"  {prep_s:.0f} s; greedy to k={max(skip_ks)}")
        greedy = skipping.search(search_config, max(skip_ks), "greedy", evaluator=evaluator)
        log(f"  greedy: {greedy.order[: max(skip_ks)]} in {greedy.seconds:.0f} s, {greedy.evaluations} subnetworks")
        das = skipping.search(
            search_config,
            args.das_k,
            "das",
            evaluator=evaluator,
            steps=args.das_steps,
            max_evaluations=args.das_max_evals,
        )
        log(
            f"  DAS k={args.das_k}: {das.skip} in {das.seconds:.0f} s, {das.evaluations} new subnetworks, "
            f"{das.steps} steps ({das.stopped or 'all steps'})"
        )
        greedy_losses = {k: evaluator.loss(sorted(greedy.order[:k])) for k in skip_ks}
        saved = {
            "key": search_key,
            "greedy": greedy.to_dict(),
            "das": das.to_dict(),
            "prep_seconds": prep_s,
            "greedy_losses": {str(k): v for k, v in greedy_losses.items()},
        }
        search_file.write_text(json.dumps(saved))
    greedy = skipping.SkipSearchResult.from_dict(saved["greedy"])
    das = skipping.SkipSearchResult.from_dict(saved["das"])

    # ---------------------------------------------------------------- skipped networks
    skip_base = {**base, "seed": seeds[0], "prompt_type": best_type}
    skip_rows = [("none", 0, [], conv[best_type][0])]
    for k in skip_ks:
        blocks = sorted(greedy.order[:k])
        skip_rows.append(("greedy", k, blocks, ensure_run(store, RunConfig(**{**skip_base, "skip_blocks": blocks}))))
    if das.skip not in [blocks for _, _, blocks, _ in skip_rows]:
        skip_rows.append(
            ("DAS", das.k, das.skip, ensure_run(store, RunConfig(**{**skip_base, "skip_blocks": das.skip})))
        )
    else:
        log(f"DAS chose the greedy set for k={das.k}: not trained twice")
    log("latency")
    skip_rows = [(m, k, b, measure(store, row, again=args.recount_costs)) for m, k, b, row in skip_rows]
    wall_s, cpu_s = time.perf_counter() - started, cpu_seconds() - cpu0
    ledger_file = Path(args.store).with_suffix(".cpu.json")
    ledger = json.loads(ledger_file.read_text()) if ledger_file.exists() else []
    ledger.append(
        {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu_s": cpu_s, "wall_s": wall_s, "note": "this invocation"}
    )
    ledger_file.write_text(json.dumps(ledger, indent=1))
    cpu_s = sum(entry["cpu_s"] for entry in ledger)
    args.ledger = ledger

    report = summarise(args, seeds, bursts, conv, best_type, saved, greedy, das, skip_rows, wall_s, cpu_s)
    print(json.dumps(report["json"], indent=1))
    if args.no_write:
        print(f"\n{HEADING}\n\n{report['markdown']}", file=sys.stderr)
    else:
        write_section(HEADING, report["markdown"])
        log("wrote docs/results.md")
    return 0


def _pct(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return _pct(values[0])
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def reading(args, seeds, bursts, conv_json, saved, greedy, das, skip_json) -> list[str]:
    """What the numbers say, computed from them (so a re-run cannot leave stale prose behind)."""
    out = ["### Reading", ""]
    b0 = bursts.get(0)
    if b0 is not None:
        out.append(
            f"- Burstiness: at block 0 whitening takes the kurtosis of the entries from {b0.kurtosis_before:.1f} "
            f"to {b0.kurtosis_after:.1f} (Gaussian: 3); the histogram on the Cost levers page shows it."
        )
    n_val = next(iter(conv_json.values()))["n_val"]
    epochs = {
        t: (float(np.mean(v["epochs_to_95_acc"])), float(np.mean(v["epochs_to_95_balanced"])))
        for t, v in conv_json.items()
    }
    finals = {t: float(np.mean([c for c in v["test_accuracy"]])) for t, v in conv_json.items()}
    order = sorted(epochs, key=lambda t: epochs[t][1])
    out.append(
        "- Convergence (epochs to 95 % of the final balanced validation accuracy): "
        + ", ".join(f"{t} {epochs[t][1]:.1f}" for t in order)
        + "; test accuracy "
        + ", ".join(f"{t} {100 * finals[t]:.1f} %" for t in conv_json)
        + f". With {len(seeds)} seed(s) and {n_val} "
        f"validation images (one image = {100 / max(1, n_val):.1f} points) differences of an epoch or a few points "
        "are within the noise."
    )
    dk = saved.get("greedy_losses", {}).get(str(das.k))
    das_row = next((r for r in skip_json if r["method"] == "DAS"), None)
    greedy_row = next((r for r in skip_json if r["method"] == "greedy" and r["k"] == das.k), None)
    if dk is not None:
        verdict = (
            "DAS found the better set"
            if das.chosen_loss < dk - 1e-9
            else "both found sets of equal objective"
            if abs(das.chosen_loss - dk) < 1e-9
            else "greedy found the better set"
        )
        trained = (
            f"; prompt-tuned, the DAS set reaches {100 * das_row['accuracy']:.1f} % test accuracy vs "
            f"{100 * greedy_row['accuracy']:.1f} % for greedy's (one seed)"
            if das_row and greedy_row
            else ""
        )
        out.append(
            f"- Search at k = {das.k}: {verdict} (objective {das.chosen_loss:.3f} for DAS vs {dk:.3f} for greedy, "
            f"lower is better){trained}. Compute: greedy to k = {greedy.k} took {greedy.block_runs} block "
            f"executions on the validation images; DAS took {das.block_runs} more (it reuses every loss greedy "
            "already computed, so alone it would cost somewhat more)."
        )
    base = next((r for r in skip_json if r["k"] == 0), None)
    if base:
        parts = []
        for r in skip_json:
            if r["k"] == 0:
                continue
            parts.append(
                f"{r['k']} blocks ({r['method']}): GMACs {100 * (r['gmacs'] / base['gmacs'] - 1):+.0f} %, "
                f"batch-1 latency {100 * (r['latency_ms_b1'] / base['latency_ms_b1'] - 1):+.0f} %, "
                f"batch-32 {100 * (r['latency_ms_b32'] / base['latency_ms_b32'] - 1):+.0f} %, "
                f"test accuracy {100 * (r['accuracy'] - base['accuracy']):+.1f} points"
            )
        out.append("- Skipping, against no skipped block: " + "; ".join(parts) + ".")
    return out


def summarise(args, seeds, bursts, conv, best_type, saved, greedy, das, skip_rows, wall_s, cpu_s) -> dict:
    store_curves = {}
    lines = []
    command = "nice -n 10 python benchmarks/levers_elpv.py" + (
        "" if args.backbone == "dinov2_s14" else f" --backbone {args.backbone}"
    )
    ledger = getattr(args, "ledger", [])
    lines.append(
        f"Script: `{command}` ({today()}; {machine()}). CPU time {cpu_s / 60:.0f} min over "
        f"{len(ledger)} invocations (it resumes from its store; per-invocation CPU in `<store>.cpu.json`). "
        "The 2 cores were shared with other jobs (load average 10-20) for the first invocations, which "
        "inflates the CPU time of a training run about 4x over a quiet machine (seed-0 runs: about 4 CPU-min "
        "each under load, about 1 on the quiet machine at the end); two invocations were stopped by hand (a second seed that did not "
        "fit under load; DAS rerun after fixing its evaluation budget). Wall times are not reported."
    )
    lines.append("")
    lines.append(
        f"Setting: {args.dataset}, `{args.backbone}` at {args.resolution} px, {args.shots} training images per "
        f"class, test 25 % (fixed split), validation {args.val_fraction:.0%} evaluated after every epoch, "
        f"{args.prompts} shallow prompts, AdamW lr 1e-2, batch 8, {args.epochs} epochs, {args.precision} "
        f"autocast; seeds {', '.join(map(str, seeds))}"
        + (" (3 seeds did not fit the CPU budget)." if len(seeds) < 3 else ".")
    )
    lines.append("")

    # burstiness
    lines.append("### Burstiness of `W_q W_k^T X^T` on the training images, before and after whitening")
    lines.append("")
    lines.append(
        "| block | entries | kurtosis before | kurtosis after | max \\|entry\\| / std before | after | "
        "effective rank of Sigma |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for block, b in bursts.items():
        lines.append(
            f"| {block} | {b.n_entries:,} | {b.kurtosis_before:.1f} | {b.kurtosis_after:.1f} | "
            f"{b.max_before:.1f} | {b.max_after:.1f} | {b.effective_rank} of {b.dim} |"
        )
    lines.append("")
    lines.append(
        "X = the block's `norm1` of its input patch tokens (see `vptdash/whitening.py`); a Gaussian has "
        "kurtosis 3. Eigenvalues of Sigma under 1e-6 of the largest are clamped before `S^(-1/2)`"
        + (
            " (ELPV cells are grey images replicated to 3 channels: Sigma is far from full rank)."
            if str(args.dataset).startswith("elpv")
            else "."
        )
    )
    lines.append("")

    # convergence
    lines.append("### Convergence: standard vs bilinear vs bilinear-whitened prompts (same m, same seeds)")
    lines.append("")
    epochs = args.epochs
    header = (
        "| prompts | trainable prompt params | "
        + " | ".join(f"ep {e}" for e in range(1, epochs + 1))
        + " | epochs to 95 % of final (acc / balanced) | test accuracy | test balanced |"
    )
    lines.append("Validation accuracy after each epoch (mean over seeds, %):")
    lines.append("")
    lines.append(header)
    lines.append("|" + "---|" * (epochs + 5))
    conv_json = {}
    store = RunStore(args.store)
    for prompt_type in TYPES:
        rows = conv[prompt_type]
        curves = [curve_of(store, r) for r in rows]
        store_curves[prompt_type] = curves
        per_epoch = []
        for e in range(epochs):
            values = [c[e]["val_accuracy"] for c in curves if len(c) > e]
            per_epoch.append(float(np.mean(values)) if values else float("nan"))
        to_acc = [epochs_to(c, "val_accuracy") for c in curves]
        to_bal = [epochs_to(c, "val_balanced_accuracy") for c in curves]
        label = RunConfig.from_dict(rows[0]["config"]).label()
        params = (rows[0]["costs"] or {}).get("params_prompts")
        lines.append(
            f"| {label} | {params:,} | "
            + " | ".join(_pct(v) for v in per_epoch)
            + f" | {np.mean(to_acc):.1f} / {np.mean(to_bal):.1f} | "
            f"{_mean_std([r['metrics']['accuracy'] for r in rows])} | "
            f"{_mean_std([r['metrics']['balanced_accuracy'] for r in rows])} |"
        )
        conv_json[prompt_type] = {
            "label": label,
            "val_accuracy_per_epoch": per_epoch,
            "epochs_to_95_acc": to_acc,
            "epochs_to_95_balanced": to_bal,
            "test_accuracy": [r["metrics"]["accuracy"] for r in rows],
            "test_balanced_accuracy": [r["metrics"]["balanced_accuracy"] for r in rows],
            "run_ids": [r["id"] for r in rows],
            "n_val": rows[0]["metrics"]["split_sizes"]["val"],
        }
    lines.append("")
    lines.append("Balanced validation accuracy per epoch (mean over seeds, %):")
    lines.append("")
    lines.append("| prompts | " + " | ".join(f"ep {e}" for e in range(1, epochs + 1)) + " |")
    lines.append("|" + "---|" * (epochs + 1))
    for prompt_type in TYPES:
        curves = store_curves[prompt_type]
        values = [float(np.mean([c[e]["val_balanced_accuracy"] for c in curves if len(c) > e])) for e in range(epochs)]
        lines.append(f"| {conv_json[prompt_type]['label']} | " + " | ".join(_pct(v) for v in values) + " |")
    lines.append("")

    # skipping
    g, d = greedy, das
    lines.append("### Layer skipping")
    lines.append("")
    lines.append(
        f"Search objective: {skipping.OBJECTIVE}; {g.n_train} training and {g.n_val} validation images. "
        f"Loss with no block skipped: {g.base_loss:.3f}."
    )
    lines.append("")
    lines.append("| block | " + " | ".join(str(b) for b in range(g.depth)) + " |")
    lines.append("|" + "---|" * (g.depth + 1))
    lines.append(
        "| loss change when skipped alone | "
        + " | ".join("n/a" if v is None else f"{v:+.3f}" for v in g.redundancy)
        + " |"
    )
    lines.append("")
    greedy_losses = saved.get("greedy_losses", {})
    lines.append(
        f"- Greedy (the cheap baseline), k = {g.k}: removal order {g.order[: g.k]}, "
        f"{g.evaluations} subnetworks, {g.block_runs} block executions, {g.seconds:.0f} s (after "
        f"{saved.get('prep_seconds', 0):.0f} s of encoding). Loss of its sets: "
        + ", ".join(f"k={k}: {v:.3f}" for k, v in greedy_losses.items())
        + "."
    )
    lines.append(
        f"- DAS, k = {d.k}: skips {d.skip}, loss {d.chosen_loss:.3f} (greedy's k={d.k} set: "
        f"{greedy_losses.get(str(d.k), float('nan')):.3f}); {d.steps} REINFORCE steps x 4 samples, "
        f"{d.evaluations} more subnetworks, {d.block_runs} block executions, {d.seconds:.0f} s"
        + (f", stopped early ({d.stopped})" if d.stopped else "")
        + "."
    )
    lines.append("")
    lines.append(
        f"Prompt-tuned with {best_type} prompts (the best type above by mean final validation accuracy), "
        f"seed {seeds[0]}:"
    )
    lines.append("")
    loads = [(row["costs"] or {}).get("latency_load_average") for _, _, _, row in skip_rows]
    loads = [v for v in loads if v is not None]
    if loads:
        lines.append(
            f"Latency: fp32, median over repeats, measured after training with the 1-minute load average "
            f"at {min(loads):.1f}-{max(loads):.1f} on the 2 cores."
        )
        lines.append("")
    lines.append(
        "| blocks skipped | which (method) | test accuracy | balanced | GMACs (fvcore) | GMACs (formula) | "
        "latency b1, ms (p25-p75) | latency b32, ms/image |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    skip_json = []
    for method, k, blocks, row in skip_rows:
        m, c = row["metrics"], row["costs"]
        lines.append(
            f"| {k} | {blocks or '-'} ({method}) | {_pct(m['accuracy'])} | {_pct(m['balanced_accuracy'])} | "
            f"{c['gmacs']:.3f} | {c['gmacs_analytic']:.3f} | {c['latency_ms_b1']:.1f} "
            f"({c['latency_ms_b1_p25']:.1f}-{c['latency_ms_b1_p75']:.1f}) | {c['latency_ms_b32']:.2f} |"
        )
        skip_json.append(
            {
                "method": method,
                "k": k,
                "blocks": blocks,
                "run_id": row["id"],
                "accuracy": m["accuracy"],
                "balanced_accuracy": m["balanced_accuracy"],
                "gmacs": c["gmacs"],
                "gmacs_analytic": c["gmacs_analytic"],
                "latency_ms_b1": c["latency_ms_b1"],
                "latency_ms_b32": c["latency_ms_b32"],
            }
        )
    lines.append("")
    lines.append(
        "Published (methods.md section 5, LaVIN-7B on ScienceQA, not comparable in scale): skipping 2 / 4 / 6 "
        "layers gave 89.41 / 89.15 / 87.29 % from 89.41 %, inference 3.70 -> 3.44 / 3.23 / 3.06 s."
    )
    lines.append("")
    lines.extend(reading(args, seeds, bursts, conv_json, saved, greedy, das, skip_json))
    return {
        "markdown": "\n".join(lines),
        "json": {
            "burstiness": {
                str(k): {kk: vv for kk, vv in v.to_dict().items() if kk not in ("edges", "before", "after", "gaussian")}
                for k, v in bursts.items()
            },
            "convergence": conv_json,
            "best_type": best_type,
            "greedy": {k: v for k, v in g.to_dict().items() if k != "trace"},
            "das": {k: v for k, v in d.to_dict().items() if k != "trace"},
            "skipping": skip_json,
            "wall_s": wall_s,
            "cpu_s": cpu_s,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
