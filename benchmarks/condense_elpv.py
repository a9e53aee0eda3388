"""Prompt condensation on ELPV with the offline backbone: how many deep prompts can go at
<= 1 accuracy point?

    nice -n 10 python benchmarks/condense_elpv.py                 # train parents, condense, write docs/results.md
    python benchmarks/condense_elpv.py --no-write                 # print only
    python benchmarks/condense_elpv.py --store /tmp/c.sqlite      # another store (finished runs are reused)
    python benchmarks/condense_elpv.py --recount-costs            # reused runs' GMACs counted on today's graph

Setting (chosen so that a CPU run stays around 20-25 minutes on a shared 2-core machine):
elpv-binary, offline DINOv2 ViT-S/14 at 112 px (64 patches), 64 training images per class, the fixed
stratified test split (25 %, 656 cells), deep prompts 50 and 100 per block (12 blocks: 600 and 1,200
prompt vectors), AdamW lr 1e-2, batch 16, bf16 autocast for training and evaluation (scoring runs in
float32), one seed. Each parent is condensed with the Taylor score to several kept fractions and
fine-tuned for a few epochs; a linear probe gives the no-prompt reference. GMACs are fvcore counts
(fused attention off); latency is the median fp32 batch-1 forward on this machine (shared, noisy).

Finished runs already in the store with the same configuration are reused, so an interrupted
benchmark resumes. The section "## Prompt condensation" of docs/results.md is replaced
(only that section: from its heading to the next "## " heading), re-read right before writing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.common import recount_store_costs  # noqa: E402
from vptdash.engine import paths
from vptdash.engine.train import RunConfig  # noqa: E402
from vptdash.methods import attention, condense  # noqa: E402
from vptdash.runs import jobs
from vptdash.runs.store import RunStore  # noqa: E402

HEADING = "## Prompt condensation"
RESULTS = ROOT / "docs" / "results.md"
LATENCY_ROUNDS = 15


def base_config(args) -> dict:
    return dict(
        dataset="elpv-binary",
        backbone=args.backbone,
        resolution=args.resolution,
        shots=args.shots,
        test_fraction=0.25,
        val_fraction=0.05,
        split_seed=0,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=16,
        lr=1e-2,
        warmup_epochs=1.0,
        eval_every=args.epochs,
        precision=args.precision,
        measure_latency=True,
    )


def finished(store: RunStore, config: RunConfig, kind: str) -> dict | None:
    wanted = config.to_dict()
    for row in store.list_runs(status="done", kind=kind):
        if all(row["config"].get(k) == v for k, v in wanted.items()):
            return row
    return None


def finished_condense(store: RunStore, parent_id: int, fraction: float, epochs: int, lr: float) -> dict | None:
    for row in store.list_runs(status="done", kind="condense"):
        c = row["config"]
        if (
            row["parent_id"] == parent_id
            and c.get("condense_keep_fraction") == fraction
            and c.get("epochs") == epochs
            and c.get("lr") == lr
        ):
            return row
    return None


@torch.inference_mode()
def paired_latency(configs: dict[int, RunConfig], rounds: int = LATENCY_ROUNDS) -> dict[int, float]:
    """Median fp32 batch-1 forward time (ms) per configuration, measured round-robin: every round times
    each model once, in a rotating order, so that the load of a shared machine hits all of them alike.
    Latency depends on the graph, not on the weights, so models are built from the configurations."""
    from vptdash.engine.train import build_model

    models = {run_id: build_model(config, 2).eval() for run_id, config in configs.items()}
    resolution = next(iter(configs.values())).resolution  # one benchmark, one resolution (--resolution)
    image = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    for model in models.values():
        for _ in range(2):
            model(image)
    times: dict[int, list[float]] = {run_id: [] for run_id in models}
    order = list(models)
    for round_index in range(rounds):
        shift = round_index % len(order)
        for run_id in order[shift:] + order[:shift]:
            start = time.perf_counter()
            models[run_id](image)
            times[run_id].append(1000 * (time.perf_counter() - start))
    return {run_id: float(sorted(values)[len(values) // 2]) for run_id, values in times.items()}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Its own folder: a store keeps its artifacts in artifacts/ next to the database file, so two stores
    # in one folder would overwrite each other's run_<id>.safetensors.
    parser.add_argument("--store", default=str(paths.data_dir() / "benchmarks" / "condense_elpv" / "runs.sqlite"))
    parser.add_argument("--counts", default="50,100", help="deep prompts per block of the parents")
    parser.add_argument("--fractions", default="0.3,0.1", help="kept fractions of the prompt vectors")
    parser.add_argument("--shots", type=int, default=64)
    parser.add_argument("--backbone", default="dinov2_s14", help="tiny-random for a smoke test (with --no-write)")
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=10, help="parent training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--pull-images", type=int, default=16, help="test images for the prompt-pull numbers")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/results.md")
    parser.add_argument(
        "--recount-costs",
        action="store_true",
        help="re-count the stored runs' GMACs first (after a change in what the forward pass computes)",
    )
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    Path(args.store).parent.mkdir(parents=True, exist_ok=True)
    store = RunStore(args.store)
    started = time.perf_counter()
    log(f"store {args.store}, torch threads {torch.get_num_threads()}")

    base = base_config(args)
    probe_config = RunConfig(
        **{
            **base,
            "tuning": "linear",
            "num_prompts": 0,
            "placement": "none",
            "epochs": 100,
            "eval_every": 100,
            "batch_size": 32,
            "warmup_epochs": 0.0,
        }
    )
    probe = finished(store, probe_config, "probe")
    if probe is None:
        log("linear probe")
        probe = jobs.run_now(store, probe_config, source="cli")
    runs = []
    for count in counts:
        config = RunConfig(**{**base, "num_prompts": count, "placement": "deep"})
        parent = finished(store, config, "train")
        if parent is None:
            log(f"parent: {count} deep prompts per block, {args.epochs} epochs")
            t = time.perf_counter()
            parent = jobs.run_now(store, config, source="cli")
            log(
                f"  {parent['status']} in {time.perf_counter() - t:.0f}s, accuracy {pct(parent['metrics'].get('accuracy'))}"
            )
        if parent["status"] != "done":
            log(f"  parent failed: {parent['error']}")
            return 1
        children = []
        for fraction in fractions:
            child = finished_condense(
                store,
                parent["id"],
                fraction,
                args.finetune_epochs,
                condense.FINETUNE_LR_FACTOR * parent["config"]["lr"],
            )
            if child is None:
                log(f"  condense run {parent['id']} to {fraction:.0%}, {args.finetune_epochs} fine-tuning epochs")
                t = time.perf_counter()
                child = condense.condense_now(
                    store, parent["id"], keep_fraction=fraction, epochs=args.finetune_epochs, source="cli"
                )
                log(
                    f"  {child['status']} in {time.perf_counter() - t:.0f}s, accuracy {pct(child['metrics'].get('accuracy'))}"
                    f" (pruned {pct(child['metrics'].get('accuracy_pruned'))})"
                )
            if child["status"] != "done":
                log(f"  condensation failed: {child['error']}")
                continue
            children.append(child)
        runs.append((parent, children))

    if args.recount_costs:
        log("re-counting GMACs of the stored runs")
        recount_store_costs(store, latency=False)  # latency: the paired pass below
        probe = store.get_run(probe["id"])
        runs = [
            (store.get_run(parent["id"]), [store.get_run(child["id"]) for child in children])
            for parent, children in runs
        ]
    log("prompt pull")
    pulls = {}
    for parent, children in runs:
        for row in [parent, *children]:
            try:
                pulls[row["id"]] = attention.run_pull(store, row["id"], n_images=args.pull_images)
            except (KeyError, FileNotFoundError) as exc:  # prompts not stored (any more): no pull for this run
                log(f"  no prompt pull for run {row['id']}: {exc}")
                pulls[row["id"]] = None
    log("paired latency pass")
    load_before_latency = os.getloadavg()[0]
    configs = {
        row["id"]: RunConfig.from_dict(row["config"]) for parent, children in runs for row in [parent, *children]
    }
    configs[probe["id"]] = RunConfig.from_dict(probe["config"])
    latency = paired_latency(configs)
    this_run_s = time.perf_counter() - started
    used = [probe] + [row for parent, children in runs for row in [parent, *children]]
    runs_s = sum((row["finished_at"] or 0) - (row["started_at"] or 0) for row in used)

    first_started_at = min(row["started_at"] or time.time() for row in used)
    report = summarise(
        args,
        probe,
        runs,
        pulls,
        {
            "this_invocation_s": this_run_s,
            "runs_s": runs_s,
            "first_started_at": first_started_at,
            "load_before_latency": load_before_latency,
        },
        latency,
    )
    print(json.dumps(report["json"], indent=1))
    print(report["markdown"])  # the section as it is (or would be) written
    if not args.no_write:
        write_section(report["markdown"])
        log(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


def pull_text(pull) -> str:
    return "n/a" if pull is None else f"{100 * pull['cls_pull']:.1f} ({100 * pull['uniform']:.1f})"


def pull_sentence(rows) -> str:
    measured = [
        (e.get("pull"), sum(e["kept_counts"]) / 12 if "kept_counts" in e else e["prompts_per_block"])
        for e in rows + [c for e in rows for c in e["condensed"]]
    ]
    known = [(p, n) for p, n in measured if p is not None]
    text = ""
    if len(known) >= 2:
        pulls = [100 * p["cls_pull"] for p, _ in known]
        uniform = [100 * p["uniform"] for p, _ in known]
        counts = [n for _, n in known]
        text += (
            f" Across {min(counts):.0f} to {max(counts):.0f} prompts per block (on average) the CLS pull ranges "
            f"{min(pulls):.0f}-{max(pulls):.0f} % while the uniform share ranges {min(uniform):.0f}-{max(uniform):.0f} %"
        )
        # p/T is not the yardstick for what training did: untrained prompts in the same blocks already draw
        # far more than p/T from the frozen backbone. Only the comparison with untrained prompts says it.
        text += (
            ". These figures include the frozen backbone's own pull towards any prompt, so they cannot say what "
            "training did: see 'Prompt pull against untrained prompts' for trained against untrained prompts."
        )
    missing = [e.get("parent_id", e.get("run_id")) for e in rows if e.get("pull") is None]
    missing += [c["run_id"] for e in rows for c in e["condensed"] if c.get("pull") is None]
    if missing:
        text += (
            f" Pull n/a for run(s) {', '.join(f'#{i}' for i in missing)}: stored prompts missing (run #2's were "
            "overwritten by another benchmark's run store that shared the folder: each store keeps "
            "artifacts/run_<id>.safetensors next to its database, so this benchmark's store now has a folder of its own)."
        )
    return text


def summarise(args, probe, runs, pulls, total_s: dict, latency: dict[int, float]) -> dict:
    rows, lines = [], []
    for parent, children in runs:
        pm, pc = parent["metrics"], parent["costs"]
        total = condense.parent_prompt_total(parent["config"], 12)
        entry = {
            "parent_id": parent["id"],
            "prompts_per_block": parent["config"]["num_prompts"],
            "prompt_vectors": total,
            "accuracy": pm["accuracy"],
            "balanced_accuracy": pm["balanced_accuracy"],
            "gmacs": pc.get("gmacs"),
            "latency_ms_b1": latency[parent["id"]],
            "train_seconds": parent["timings"].get("train_seconds"),
            "pull": pulls[parent["id"]],
            "condensed": [],
        }
        for child in children:
            cm, cc = child["metrics"], child["costs"]
            entry["condensed"].append(
                {
                    "run_id": child["id"],
                    "kept_fraction": cm["kept_fraction"],
                    "kept": cm["kept_prompts"],
                    "kept_counts": cm["kept_counts"],
                    "accuracy_pruned": cm.get("accuracy_pruned"),
                    "accuracy": cm["accuracy"],
                    "balanced_accuracy": cm["balanced_accuracy"],
                    "gmacs": cc.get("gmacs"),
                    "latency_ms_b1": latency[child["id"]],
                    "seconds": (child["finished_at"] or 0) - (child["started_at"] or 0),
                    "pull": pulls[child["id"]],
                }
            )
        rows.append(entry)

    def loss_points(parent, child):
        return 100 * (parent["accuracy"] - child["accuracy"])

    lines.append(HEADING)
    lines.append("")
    trained_on = time.strftime("%Y-%m-%d", time.localtime(total_s["first_started_at"]))
    lines.append(
        f"Reproduced by `nice -n 10 python benchmarks/condense_elpv.py` ({time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads). The runs were "
        f"trained from {trained_on} on (their wall clock: {total_s['runs_s'] / 60:.0f} min in all, over resumed "
        f"invocations, on a shared machine); GMACs, prompt pull and latency come from the last invocation "
        f"({total_s['this_invocation_s'] / 60:.0f} min; load average {total_s['load_before_latency']:.1f} on "
        f"{os.cpu_count()} cores when the latency pass began)."
    )
    lines.append("")
    # The split's sizes as the runs stored them, so the text follows --shots and the data set.
    sizes = runs[0][0]["metrics"].get("split_sizes", {}) if runs else {}
    n_test, n_train = sizes.get("test"), sizes.get("train")
    backbone = "offline DINOv2 ViT-S/14" if args.backbone == "dinov2_s14" else f"`{args.backbone}`"
    lines.append(
        f"**Setting.** elpv-binary, {backbone} at {args.resolution} px, {args.shots} training images per class, "
        f"fixed stratified test split (25 %, {n_test} cells; 1 point = {n_test / 100:.1f} cells), deep prompts (12 blocks), "
        f"AdamW lr 1e-2, batch 16, {args.epochs} epochs, {args.precision} autocast for training and evaluation, "
        f"seed {args.seed} only (one seed: CPU time). Condensation: first-order Taylor score "
        f"`|sum(P * dL/dP)|` per prompt vector over the {n_train} training images (float32, deterministic), global "
        f"ranking across blocks, keep the top fraction, fine-tune kept prompts + head for {args.finetune_epochs} "
        "epochs (AdamW at a tenth of the parent's lr, no warm-up, cosine). *Pruned* = the kept prompts before fine-tuning. GMACs: fvcore, per image. "
        "Latency: median fp32 forward at batch 1, all configurations measured round-robin in one pass "
        f"({LATENCY_ROUNDS} rounds) so that any load on the machine hits them alike; compare them with each other."
    )
    lines.append("")
    probe_acc = probe["metrics"].get("accuracy") if probe and probe["status"] == "done" else None
    if probe_acc is not None:
        lines.append(
            f"Linear probe (no prompts, same data): accuracy {pct(probe_acc)} % "
            f"(balanced {pct(probe['metrics'].get('balanced_accuracy'))} %), "
            f"{probe['costs'].get('gmacs', float('nan')):.3f} GMACs, {latency[probe['id']]:.1f} ms."
        )
        lines.append("")
    lines.append(
        "| run | prompt vectors kept | accuracy % (pruned → fine-tuned) | Δ vs parent, points | balanced % | GMACs | latency ms | CLS pull % (uniform %) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    verdicts = []
    for entry in rows:
        pull = entry["pull"]
        lines.append(
            f"| #{entry['parent_id']} deep {entry['prompts_per_block']} (parent) | {entry['prompt_vectors']} (100 %) | "
            f"{pct(entry['accuracy'])} | – | {pct(entry['balanced_accuracy'])} | {entry['gmacs']:.3f} | "
            f"{entry['latency_ms_b1']:.1f} | {pull_text(pull)} |"
        )
        ok = []
        for child in entry["condensed"]:
            delta = -loss_points(entry, child)
            pull = child["pull"]
            lines.append(
                f"| #{child['run_id']} condensed | {child['kept']} ({100 * child['kept_fraction']:.0f} %) | "
                f"{pct(child['accuracy_pruned'])} → {pct(child['accuracy'])} | {delta:+.1f} | "
                f"{pct(child['balanced_accuracy'])} | {child['gmacs']:.3f} | {child['latency_ms_b1']:.1f} | "
                f"{pull_text(pull)} |"
            )
            if loss_points(entry, child) <= 1.0:
                ok.append(child)
        if ok:
            best = min(ok, key=lambda c: c["kept"])
            dropped = entry["prompt_vectors"] - best["kept"]
            verdicts.append(
                f"- **deep {entry['prompts_per_block']}** ({entry['prompt_vectors']} prompt vectors, {pct(entry['accuracy'])} %): "
                f"{dropped} of {entry['prompt_vectors']} ({100 * dropped / entry['prompt_vectors']:.0f} %) dropped at "
                f"{-loss_points(entry, best):+.1f} points ({pct(best['accuracy'])} %), "
                f"{entry['gmacs']:.3f} → {best['gmacs']:.3f} GMACs ({100 * (1 - best['gmacs'] / entry['gmacs']):.0f} % less), "
                f"{entry['latency_ms_b1']:.1f} → {best['latency_ms_b1']:.1f} ms. Smallest kept fraction tried: "
                f"{100 * min(c['kept_fraction'] for c in entry['condensed']):.0f} %."
            )
        else:
            verdicts.append(
                f"- **deep {entry['prompts_per_block']}**: no kept fraction tried stayed within 1 point "
                f"of the parent ({pct(entry['accuracy'])} %)."
            )
    lines.append("")
    prompted = [e["accuracy"] for e in rows] + [c["accuracy"] for e in rows for c in e["condensed"]]
    if probe_acc is not None and prompted and probe_acc >= max(prompted):
        lines.append(
            f"**Read this first:** in this setting the linear probe ({pct(probe_acc)} %) beats every prompted "
            "run, parents and condensed ones: deep prompts do not pay here, so dropping most of them costs "
            "nothing, and the brief fine-tune mostly moves the condensed runs back towards the probe. The "
            "numbers below show that condensation works mechanically (exact cost cut, no accuracy lost); "
            "they are not evidence that prompts matter on ELPV at 64 shots."
        )
        lines.append("")
    lines.append("**How many can be dropped at <= 1 point accuracy loss** (among the fractions tried):")
    lines.append("")
    lines.extend(verdicts)
    lines.append("")
    shares = [sum(c["kept_counts"][8:]) / max(1, sum(c["kept_counts"])) for e in rows for c in e["condensed"]]
    lines.append(
        "Kept prompts per block (block 0 → 11) for each condensed run: "
        + "; ".join(f"#{c['run_id']}: {c['kept_counts']}" for e in rows for c in e["condensed"])
        + "."
        + (
            f" The global ranking keeps {100 * min(shares):.0f}-{100 * max(shares):.0f} % of the kept vectors in "
            "the last four blocks (a third of the blocks)."
            if shares
            else ""
        )
    )
    lines.append("")
    lines.append(
        f"Prompt pull: mean over blocks of the attention mass the CLS query puts on prompt keys, on the first "
        f"{args.pull_images} test images, next to the uniform share p/T it would get if attention ignored content."
        + pull_sentence(rows)
    )
    lines.append("")
    lines.append(
        "Fine-tuning recipe: a first attempt fine-tuned at the parent's lr (1e-2) without warm-up; its loss "
        "jumped on the second step and a condensed run ended as a majority-class predictor (those runs were "
        "not kept, so their figures are not quoted). The condensation default is now a tenth of the parent's lr."
    )
    lines.append("")
    probe_gmacs = probe["costs"].get("gmacs") if probe and probe["status"] == "done" else None
    extra = (
        "; ".join(f"{e['prompts_per_block']} per block add {100 * (e['gmacs'] / probe_gmacs - 1):.0f} %" for e in rows)
        if probe_gmacs
        else ""
    )
    # Binomial standard error of one accuracy on this test split, at the parents' mean accuracy.
    parent_acc = sum(e["accuracy"] for e in rows) / max(1, len(rows))
    se_points = 100 * math.sqrt(parent_acc * (1 - parent_acc) / n_test) if n_test else float("nan")
    lines.append(
        f"Caveats: one seed and one split; the standard error of a {n_test}-image accuracy near "
        f"{100 * parent_acc:.0f} % is about {se_points:.1f} "
        "points, so '<= 1 point' is a statement about this split, not a significance claim (the comparison is "
        "paired: same test images). Condensed GMACs equal a fresh run with the same per-block counts; vs a "
        "uniform deep run with the same total they differ only through the last block, where each kept "
        "prompt is 2d(R-1) MACs cheaper (deep prompts are keys and values only: a block's cost is linear in "
        "its prompt count; tests/test_condense.py). Deep prompts are cheap to begin with"
        + (f" ({extra} to the probe's GMACs)" if extra else "")
        + ", so condensing them saves less compute than condensing shallow ones would."
    )
    lines.append("")
    return {
        "markdown": "\n".join(lines),
        "json": {
            "setting": base_config(args),
            "probe_accuracy": probe_acc,
            "runs": rows,
            "seconds": total_s,
            "latency_ms_b1": latency,
        },
    }


def write_section(section: str) -> None:
    """Replace (or append) our section only: from HEADING to the next '## ' heading (and keep its copy)."""
    body = section.strip()
    if body.startswith(HEADING):
        body = body[len(HEADING) :]
    common.write_section(HEADING, body, RESULTS)


if __name__ == "__main__":
    raise SystemExit(main())
