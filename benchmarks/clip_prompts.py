"""Vision-language prompts on a real CLIP: zero-shot, CoOp and MaPLe, all classes and base-to-novel,
with per-image image-tower cost beside the text tower's once-per-class-set cost.

    python benchmarks/clip_prompts.py --weights ViT-B-16.safetensors           # a local open_clip state dict
    python benchmarks/clip_prompts.py --backbone open_clip:ViT-B-16@openai      # from the hub (network)
    python benchmarks/clip_prompts.py --dataset my_images.zip --seeds 0,1,2     # another image set
    python benchmarks/clip_prompts.py --tiny                                    # offline: costs on tiny-clip

Setting (MaPLe's released recipe, methods.md section 6): 16 shots per class, SGD lr 0.0035, batch 4,
5 epochs, warm-up 1 epoch; CoOp with 4 context tokens initialised from "a photo of a", MaPLe with 2
coupled prompts to depth 9; zero-shot with "a photo of a {}."; seeds 0,1,2 (each seed draws other
few-shot images). ELPV's classes are read as the words in `vlprompts.CLASS_WORDS`. Accuracies are on
held-out test images; base-to-novel trains on the first half of the classes and reports base, novel
and their harmonic mean. GMACs are fvcore counts (fused attention off; equal to the formula):
per image for the image tower with its prompts and the product with the text features; the text
tower once per class set, also amortised over `--amortise-images` images. Latency: median fp32
batch-1 forward of the image side on this machine, text features precomputed.

Finished runs with the same configuration in the store are reused (an interrupted benchmark resumes).
With real weights the section "## Vision-language prompts (CLIP)" of docs/results.md is replaced; with
`--tiny` (the random tiny CLIP: no weights needed, no accuracy is meaningful) only the cost section
"## Vision-language prompts: offline check (random tiny CLIP)" is, and no accuracy is written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, today, write_section  # noqa: E402
from vptdash.engine import clip  # noqa: E402
from vptdash.methods import vlprompts  # noqa: E402
from vptdash.runs.store import RunStore  # noqa: E402

HEADING = "## Vision-language prompts (CLIP)"
TINY_HEADING = "## Vision-language prompts: offline check (random tiny CLIP)"
BUDGETS = [("zeroshot", None), ("coop", 4), ("coop", 16), ("maple", 2)]


def configs(args) -> list[vlprompts.VLPromptConfig]:
    out = []
    for seed in args.seeds:
        for base_to_novel in (False, True) if args.base_to_novel else (False,):
            for method, count in BUDGETS:
                depth = min(args.depth, 2) if args.tiny and method == "maple" else args.depth
                out.append(
                    vlprompts.VLPromptConfig(
                        backbone=clip.TINY_CLIP if args.tiny else args.backbone,
                        weights=None if args.tiny else args.weights,
                        dataset=args.dataset,
                        shots=args.shots,
                        method=method,
                        text_prompts=count,
                        prompt_depth=depth if method == "maple" else None,
                        base_to_novel=base_to_novel,
                        epochs=1 if args.tiny else args.epochs,
                        seed=seed,
                        amortise_images=args.amortise_images,
                        measure_latency=not args.no_latency,
                    ).validate()
                )
    return out


def finished(store: RunStore, config: vlprompts.VLPromptConfig) -> dict | None:
    """A finished run of this configuration (resolution and depth are resolved when it runs)."""
    want = {k: v for k, v in config.to_dict().items() if k not in ("resolution", "prompt_depth", "measure_latency")}
    for row in store.list_runs(status="done", kind=vlprompts.KIND):
        have = vlprompts.VLPromptConfig.from_dict(row["config"]).to_dict()
        if all(have.get(k) == v for k, v in want.items()):
            return row
    return None


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def table(rows: list[dict], tiny: bool) -> str:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        config = vlprompts.VLPromptConfig.from_dict(row["config"])
        groups.setdefault(config.label().replace(", base-to-novel", ""), []).append(row)
    if tiny:
        head = (
            "| method, budget | image GMACs / image | text GMACs / class set | amortised / image | trainable params |"
        )
        lines = [head, "|---|---:|---:|---:|---:|"]
    else:
        head = (
            "| method, budget | accuracy, all classes | base | novel | H | image GMACs / image | "
            "text GMACs / class set | trainable params | latency b1 (ms) | seeds |"
        )
        lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, runs in groups.items():
        full = [r for r in runs if not r["config"].get("base_to_novel")]
        b2n = [r for r in runs if r["config"].get("base_to_novel")]
        costs = (full or b2n)[0]["costs"]
        if tiny:
            lines.append(
                f"| {label} | {costs['gmacs']:.6f} | {costs['text_gmacs_per_class_set']:.6f} | "
                f"{costs['text_gmacs_per_image_amortised']:.2e} | {costs['params_trainable']:,} |"
            )
            continue
        latency = costs.get("latency_ms_b1")
        lines.append(
            f"| {label} | {mean_sd([r['metrics'].get('accuracy') for r in full])} | "
            f"{mean_sd([r['metrics'].get('base_accuracy') for r in b2n])} | "
            f"{mean_sd([r['metrics'].get('novel_accuracy') for r in b2n])} | "
            f"{mean_sd([r['metrics'].get('harmonic_mean') for r in b2n])} | {costs['gmacs']:.3f} | "
            f"{costs['text_gmacs_per_class_set']:.2f} | {costs['params_trainable']:,} | "
            + (f"{latency:.1f}" if latency is not None else "n/a")
            + f" | {len({r['config']['seed'] for r in full})} |"
        )
    return "\n".join(lines)


def architecture_costs(model_names: list[str], class_words: list[str], depth: int, amortise: int) -> str:
    """Per-image and per-class-set GMACs of real CLIP architectures (random weights: costs only)."""
    lines = [
        "| architecture | method, budget | image GMACs / image | text GMACs / class set | "
        f"text amortised over {amortise:,} images | trainable params |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in model_names:
        bundle = clip.architecture_only(name)
        for method, count in BUDGETS:
            model = clip.PromptedCLIP(bundle, method, text_prompts=count or 0, depth=depth)
            costs = vlprompts.clip_costs(model, class_words, amortise_images=amortise, measure=False)
            config = vlprompts.VLPromptConfig(method=method, text_prompts=count, prompt_depth=depth)
            lines.append(
                f"| {name} | {config.label()} | {costs['gmacs']:.3f} | {costs['text_gmacs_per_class_set']:.2f} | "
                f"{costs['text_gmacs_per_image_amortised']:.4f} | {costs['params_trainable']:,} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="open_clip:ViT-B-16")
    parser.add_argument("--weights", default=None, help="a local open_clip state dict (.safetensors or .pt)")
    parser.add_argument("--dataset", default="elpv")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")], default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--depth", type=int, default=9)
    parser.add_argument("--amortise-images", type=int, default=vlprompts.AMORTISE_IMAGES)
    parser.add_argument("--no-base-to-novel", dest="base_to_novel", action="store_false")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="offline cost check on the random tiny CLIP")
    parser.add_argument(
        "--architectures",
        type=lambda t: t.split(","),
        default=["ViT-B-16", "ViT-B-32"],
        help="--tiny: open_clip architectures whose costs are counted on random weights",
    )
    parser.add_argument("--store", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seeds, args.base_to_novel = [0], False
    store = RunStore(args.store)
    rows = []
    todo = configs(args)
    for position, config in enumerate(todo, 1):
        row = finished(store, config)
        if row is None:
            print(f"[{position}/{len(todo)}] {config.label()} seed {config.seed}", file=sys.stderr)
            row = vlprompts.vlprompt_now(store, config, source="benchmark")
        if row["status"] != "done":
            print(f"run {row['id']} {row['status']}: {row.get('error')}", file=sys.stderr)
            return 1
        rows.append(row)
    body = table(rows, args.tiny)
    words = vlprompts.text_words(vlprompts.VLPromptConfig(dataset=args.dataset), rows[0]["metrics"]["class_names"])
    if args.tiny:
        real = architecture_costs(args.architectures, words, args.depth, args.amortise_images)
        text = (
            f"Measured {today()} by `python benchmarks/clip_prompts.py --tiny` on {machine()}.\n\n"
            "**Random tiny CLIP (2 layers per tower, width 64, 32 px, 16 patches): no accuracy is claimed or "
            "shown; these are costs of the code path, checked offline.** What the tests verify on it "
            "(`tests/test_vlprompts.py`): with no prompts the towers equal open_clip's own `encode_image` / "
            "`encode_text`; only the prompts and MaPLe's coupling receive gradients and the frozen towers "
            "stay bit-identical through training; each class set's text features are computed once per "
            "evaluation; a state dict written in open_clip's format loads through the path a user's file "
            "takes; zero-shot averages its templates; base-to-novel splits share no class and no image; "
            "the image tower's GMACs (fvcore) equal the formula, grow with vision prompts and not with text "
            "prompts.\n\n"
            f"Data: {args.dataset} ({len(words)} classes, text: {', '.join(words)}); one seed, 1 epoch.\n\n"
            f"{body}\n\n"
            "The same budgets on real CLIP architectures at their own input size, counted on randomly "
            "initialised weights (GMACs and parameter counts depend on the architecture only; no accuracy), "
            f"MaPLe at depth {args.depth}, {len(words)} classes:\n\n"
            f"{real}\n\n"
            "Text prompts (CoOp) cost nothing per image once the class set's text features exist; MaPLe's "
            "vision prompts lengthen every image layer's sequence (whatever the depth: later layers carry "
            "the last prompts), so they are the budget that costs compute per image. The table for a real "
            "CLIP comes from the same script with `--weights FILE` (or a hub name when online)."
        )
        heading = TINY_HEADING
    else:
        text = (
            f"Measured {today()} by `python benchmarks/clip_prompts.py` ({args.backbone}"
            + (f", weights file {Path(args.weights).name}" if args.weights else "")
            + f") on {machine()}; {args.dataset}, {args.shots} shots, seeds {','.join(map(str, args.seeds))}, "
            f"mean ± sd over seeds, test images only. Text GMACs amortised over {args.amortise_images} images "
            "are in each run's costs.\n\n" + body
        )
        heading = HEADING
    print(text)
    if not args.no_write:
        write_section(heading, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
