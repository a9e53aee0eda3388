"""Prompt pull against untrained prompts: deep prompts at several counts per block, trained on ELPV, each
measured beside the same model before training (same blocks, counts, seeded init, head and images) and
the uniform share p/T; influence as the value-weighted share of attention output from prompts and as the
accuracy change when the prompts are removed. Prints a markdown section and writes it into
docs/results.md (only the section "## Prompt pull against untrained prompts").

    python benchmarks/pull_elpv.py                                   # counts 1,10,100, seeds 0,1,2
    python benchmarks/pull_elpv.py --seeds 0 --epochs 4 --no-write   # a reduced run

Training follows the reference's recipe: the learning rate chosen on the validation split (lr "auto") and
the precision measured faster on this machine (precision "auto"); both are stored with each run and
printed per run.

Runs go into their own run store (default: <data dir>/benchmarks/pull.sqlite, artifacts beside it); finished
runs with the same configuration are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, today, write_section  # noqa: E402
from vptdash.engine import paths  # noqa: E402
from vptdash.engine.train import PRECISION_CHOICES, RunConfig, parse_lr  # noqa: E402
from vptdash.methods import attention  # noqa: E402
from vptdash.runs import jobs  # noqa: E402
from vptdash.runs.store import RunStore  # noqa: E402

HEADING = "## Prompt pull against untrained prompts"
# What the section is written from (every figure of every run), so tests can regenerate it.
OUTPUT = Path(__file__).resolve().parent / "data" / "pull_elpv.json"
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
Z95 = 1.96  # beyond 15 df: the normal quantile (32 paired images: t would be 2.04, 4 % wider)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def finished(store: RunStore, config: RunConfig) -> dict | None:
    wanted = config.to_dict()
    for row in store.list_runs(status="done"):
        if all(row["config"].get(k) == v for k, v in wanted.items()):
            return row
    return None


def half_width(values: np.ndarray) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    quantile = T95[n - 2] if n - 1 <= len(T95) else Z95
    return float(quantile * np.std(values, ddof=1) / np.sqrt(n))


def pct(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"


def measure(store: RunStore, run_id: int, n_images: int, n_masked: int) -> dict:
    run = attention.load_trained_model(store, run_id)
    metrics = store.get_run(run_id)["metrics"]
    images = attention.run_images(run.config, "test", limit=max(n_images, n_masked))
    trained = attention.measure_pull(run.model, images.images[:n_images])
    twin = attention.untrained_twin(run)
    untrained = attention.measure_pull(twin, images.images[:n_images])
    effect = attention.masked_prompt_effect(run.model, images.images[:n_masked], images.labels[:n_masked], twin)
    gain = trained.per_image["cls_pull"] - untrained.per_image["cls_pull"]
    value_gain = trained.per_image["cls_value_share"] - untrained.per_image["cls_value_share"]
    return {
        "prompts": run.model.num_prompts,
        "seed": run.config.seed,
        "accuracy": metrics.get("accuracy"),
        "lr": metrics.get("lr"),
        "lr_source": metrics.get("lr_source"),
        "precision": metrics.get("precision"),
        "collapsed": bool(metrics.get("collapsed")),
        "cls_pull": trained.mean("cls_pull"),
        "cls_pull_untrained": untrained.mean("cls_pull"),
        "uniform": trained.mean("uniform"),
        "gain": float(gain.mean()),
        "gain_half": half_width(gain),
        "value_share": trained.mean("cls_value_share"),
        "value_share_untrained": untrained.mean("cls_value_share"),
        "value_gain": float(value_gain.mean()),
        "value_gain_half": half_width(value_gain),
        "blocks": trained.blocks,
        "blocks_untrained": untrained.blocks,
        "n_images": trained.n_images,
        "n_masked": n_masked,
        **effect,
    }


def section(
    results: list[dict], settings: dict, command: str, minutes: float, loads: list[float], where: str, date: str
) -> list[str]:
    lines = [
        f"Machine: {where}, shared with other developers' jobs (load average {min(loads):.0f}–{max(loads):.0f} "
        f"on 2 cores: times are indicative). Date: {date}. Command: `{command}` ({minutes:.0f} min in this "
        "invocation; finished runs in the benchmark's store are reused).",
        "",
        f"Setting: elpv-binary, offline DINOv2 ViT-S/14 at {settings['resolution']} px, {settings['shots']} training "
        f"images per class, deep prompts, AdamW at {describe_lr(settings['lr'])}, batch {settings['batch_size']}, "
        f"{settings['epochs']} epochs, precision {describe_precision(settings['precision'], results)}. Pull and value-weighted share on the first {results[0]['n_images']} "
        f"test images; accuracies with and without prompts on the first {results[0]['n_masked']} (the same "
        "head). *Untrained*: the same model before training (same blocks, per-block counts, seeded init, images, "
        "and the trained head). Intervals: 95 % over images, paired (trained − untrained on the same image); "
        "they say how stable the figure is over images, not over training seeds.",
        "",
        "| prompts per block | seed | lr | test accuracy (full split) | CLS pull trained | untrained | uniform p/T | "
        "trained − untrained, points | value-weighted share trained | untrained | trained − untrained, points | "
        "accuracy (sample) | prompts removed | untrained prompts | predictions changed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["prompts"], r["seed"])):
        lines.append(
            f"| {r['prompts']} | {r['seed']} | {run_lr(r)} | {pct(r['accuracy'])} | {pct(r['cls_pull'])} | "
            f"{pct(r['cls_pull_untrained'])} | {pct(r['uniform'])} | {100 * r['gain']:+.1f} ± {100 * r['gain_half']:.1f} | "
            f"{pct(r['value_share'])} | {pct(r['value_share_untrained'])} | "
            f"{100 * r['value_gain']:+.1f} ± {100 * r['value_gain_half']:.1f} | {pct(r['accuracy_sample'])} | "
            f"{pct(r['accuracy_without_prompts'])} | {pct(r['accuracy_untrained_prompts'])} | "
            f"{pct(r['prediction_change'])} |"
        )
    lines += ["", "Per block, CLS pull % (trained / untrained), block 0 → 11:", ""]
    for r in sorted(results, key=lambda r: (r["prompts"], r["seed"])):
        pairs = [
            f"{100 * a['cls_pull']:.0f}/{100 * b['cls_pull']:.0f}"
            for a, b in zip(r["blocks"], r["blocks_untrained"])
            if not a["skipped"]
        ]
        lines.append(f"- {r['prompts']} per block, seed {r['seed']}: {', '.join(pairs)}")
    lines += ["", "Reading (computed from the table):", ""]
    lines += over_seeds(results)
    lines += reading(results)
    lines += [
        "",
        "This replaces readings of prompt pull against p/T alone: the condensation section's pull figures "
        "compare trained pull with p/T only, which credits the frozen backbone's preference to training.",
        "",
    ]
    return lines


def describe_lr(lr) -> str:
    return "the learning rate chosen on validation per run (lr auto)" if lr == "auto" else f"lr {lr:g}"


def describe_precision(precision: str, results: list[dict]) -> str:
    used = sorted({r["precision"] for r in results if r.get("precision")})
    if precision == "auto":
        return f"measured faster on this machine (auto: {', '.join(used) or 'n/a'})"
    return precision


def run_lr(r: dict) -> str:
    lr = "n/a" if r.get("lr") is None else f"{r['lr']:g}"
    return (
        lr
        + (" (validation)" if r.get("lr_source") == "validation" else "")
        + (", collapsed" if r.get("collapsed") else "")
    )


def over_seeds(results: list[dict]) -> list[str]:
    """Per prompt count, what training did to CLS pull and to the value-weighted share, as a mean over
    training seeds with a 95 % t-interval over seeds (each seed's figure already averages the images)."""
    lines = []
    for count in sorted({r["prompts"] for r in results}):
        rows = [r for r in results if r["prompts"] == count]
        if len(rows) < 2:
            continue
        parts = []
        for key, name in (("gain", "CLS pull"), ("value_gain", "value-weighted share")):
            values = 100 * np.array([r[key] for r in rows])
            half = half_width(values)
            verdict = (
                "within noise over seeds" if abs(values.mean()) <= half else ("up" if values.mean() > 0 else "down")
            )
            parts.append(
                f"{name} {values.mean():+.1f} points (95 % CI {values.mean() - half:+.1f} to {values.mean() + half:+.1f}: {verdict})"
            )
        # Influence rather than attention mass: the same trained head with the prompts as trained against
        # with their untrained initial values, on the same images.
        use = 100 * np.array([r["accuracy_sample"] - r["accuracy_untrained_prompts"] for r in rows])
        use_half = half_width(use)
        use_verdict = "within noise over seeds" if abs(use.mean()) <= use_half else ("up" if use.mean() > 0 else "down")
        parts.append(
            f"accuracy with the trained prompts against their untrained values (same trained head) "
            f"{use.mean():+.1f} points (95 % CI {use.mean() - use_half:+.1f} to {use.mean() + use_half:+.1f}: {use_verdict})"
        )
        change = 100 * np.array([r["prediction_change"] for r in rows])
        lines.append(
            f"- {count} per block, trained − untrained over {len(rows)} seeds: {'; '.join(parts)}; removing the "
            f"prompts changes {change.mean():.1f} % of predictions on average (range {change.min():.1f}–{change.max():.1f})."
        )
    collapsed = [r for r in results if r.get("collapsed")]
    if collapsed:
        lines.append(
            "- Collapsed runs (one class predicted on validation, or a diverged loss), kept in the table and in "
            "these means: " + ", ".join(f"{r['prompts']} per block seed {r['seed']}" for r in collapsed) + "."
        )
    return lines


def reading(results: list[dict]) -> list[str]:
    lines = []
    above = [r for r in results if r["cls_pull_untrained"] > r["uniform"]]
    lines.append(
        f"- Untrained prompts draw more CLS attention than p/T in {len(above)} of {len(results)} runs: the frozen "
        "backbone's own preference, which p/T alone would credit to training."
    )
    for r in sorted(results, key=lambda r: (r["prompts"], r["seed"])):
        gain, half = 100 * r["gain"], 100 * r["gain_half"]
        verdict = "within noise over images" if abs(gain) <= half else ("up" if gain > 0 else "down")
        removed = 100 * (r["accuracy_sample"] - r["accuracy_without_prompts"])
        lines.append(
            f"- {r['prompts']} per block (seed {r['seed']}): training moved CLS pull {gain:+.1f} ± {half:.1f} points "
            f"({verdict}) and the value-weighted share {100 * r['value_gain']:+.1f} ± {100 * r['value_gain_half']:.1f}; "
            f"removing the prompts changes {pct(r['prediction_change'])} % of predictions and accuracy by "
            f"{-removed:+.1f} points on {r['n_masked']} images (one image = {100 / r['n_masked']:.1f} points); "
            f"with its untrained prompts and the trained head it scores {pct(r['accuracy_untrained_prompts'])} % "
            f"(trained prompts {pct(r['accuracy_sample'])} %)."
        )
    counts = sorted({r["prompts"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    scope = f"- Scope: {len(counts)} prompt count(s) ({', '.join(map(str, counts))} per block) and {len(seeds)} training seed(s)"
    if len(counts) < 3 or len(seeds) < 2:
        scope += (
            ": this cannot say how the gain over untrained prompts changes with the count, nor whether it holds "
            "across seeds. The full run (`python benchmarks/pull_elpv.py`: 1, 10, 100 per block, seeds 0-2, "
            "10 epochs) trains 9 runs."
        )
    else:
        scope += "; intervals over 3 seeds are wide (t = 4.3 at 2 degrees of freedom): more seeds would narrow them."
    lines.append(scope)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,10,100")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--images", type=int, default=attention.PULL_SAMPLE_IMAGES)
    parser.add_argument("--masked-images", type=int, default=128)
    parser.add_argument("--lr", default="auto", help="'auto' (chosen on validation, the default) or a number")
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES)
    parser.add_argument("--store", default=str(paths.data_dir() / "benchmarks" / "pull" / "pull.sqlite"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--from-stored", action="store_true", help=f"only rewrite the section from {OUTPUT.name} (no training)"
    )
    args = parser.parse_args(argv)
    if args.from_stored:
        body = section(**json.loads(OUTPUT.read_text()))
        write_section(HEADING, "\n".join(body))
        log("rewrote docs/results.md from the stored measurements")
        return 0
    settings = dict(
        backbone="dinov2_s14",
        dataset="elpv-binary",
        resolution=args.resolution,
        shots=args.shots,
        test_fraction=0.25,
        val_fraction=0.05,
        split_seed=0,
        epochs=args.epochs,
        eval_every=args.epochs,
        batch_size=16,
        lr=parse_lr(args.lr),
        warmup_epochs=1.0,
        precision=args.precision,
        placement="deep",
        measure_latency=False,
    )
    Path(args.store).parent.mkdir(parents=True, exist_ok=True)
    store = RunStore(args.store)
    started, loads, results = time.perf_counter(), [os.getloadavg()[0]], []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for count in [int(c) for c in args.counts.split(",") if c]:
            config = RunConfig(**settings, num_prompts=count, seed=seed)
            row = finished(store, config)
            if row is None:
                log(f"training {count} deep prompts per block, seed {seed} ...")
                row = jobs.run_now(store, config)
                loads.append(os.getloadavg()[0])
                if row["status"] != "done":
                    log(f"  {row['status']}: {row.get('error')}")
                    return 1
            result = measure(store, row["id"], args.images, args.masked_images)
            loads.append(os.getloadavg()[0])
            log(
                f"  {count} per block, seed {seed}: pull {result['cls_pull']:.3f} vs untrained "
                f"{result['cls_pull_untrained']:.3f} (p/T {result['uniform']:.3f})"
            )
            results.append(result)
    command = "python benchmarks/pull_elpv.py" + "".join(
        f" --{flag} {value}"
        for flag, value, default in (
            ("counts", args.counts, "1,10,100"),
            ("seeds", args.seeds, "0,1,2"),
            ("epochs", args.epochs, 10),
            ("shots", args.shots, 32),
            ("resolution", args.resolution, 112),
            ("images", args.images, attention.PULL_SAMPLE_IMAGES),
            ("masked-images", args.masked_images, 128),
            ("lr", args.lr, "auto"),
            ("precision", args.precision, "auto"),
        )
        if value != default
    )
    kept = dict(
        results=results,
        settings=settings,
        command=command,
        minutes=(time.perf_counter() - started) / 60,
        loads=loads,
        where=machine(),
        date=today(),
    )
    body = section(**kept)
    print(HEADING + "\n\n" + "\n".join(body))
    if not args.no_write:
        OUTPUT.write_text(json.dumps(kept, indent=1, default=float) + "\n")
        write_section(HEADING, "\n".join(body))
        log(f"wrote docs/results.md and {OUTPUT.relative_to(OUTPUT.parents[2])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
