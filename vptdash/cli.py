"""`python -m vptdash ...`: the same training and sweeps as the dashboard, headless.

python -m vptdash train --dataset elpv-binary --shots 16 --prompts 10 --placement deep --json
python -m vptdash sweep --prompts 0,1,5,10,50 --placement shallow,deep --seeds 0,1,2
python -m vptdash probe --dataset elpv
python -m vptdash runs list
python -m vptdash runs export --csv runs.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from vptdash import bench
from vptdash.engine.train import LR_AUTO, ConfigError, RunConfig, parse_lr, used_lr
from vptdash.methods import condense, continual, skipping
from vptdash.runs import worker
from vptdash.runs.executors import get_executor
from vptdash.runs.jobs import new_sweep_id, run_now, sweep_configs
from vptdash.runs.store import RunStore

JSON_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "val_accuracy",
    "gmacs",
    "params_trainable",
    "params_total",
    "latency_ms_b1",
    "train_seconds",
    "lr",
    "lr_source",
    "collapsed",
    "run_id",
    "status",
)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _lr_arg(text: str) -> float | str:
    try:
        return parse_lr(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def parse_placements(text: str) -> list[str]:
    """'shallow,deep' -> two placements; a custom block list goes after ';' ('shallow;0,5,11')."""
    if ";" in text:
        return [part.strip() for part in text.split(";") if part.strip()]
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if all(part.isdigit() for part in parts):
        return [",".join(parts)]
    return parts


def _add_run_options(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    defaults = RunConfig()
    parser.add_argument(
        "--backbone",
        default=defaults.backbone,
        help="dinov2_s14 (offline default), tiny-random, or any timm ViT name (needs network or --weights)",
    )
    parser.add_argument("--weights", default=None, help="local weights file (safetensors or torch) for the backbone")
    parser.add_argument(
        "--dataset", default="elpv-binary", help="elpv | elpv-binary | a folder or .zip of class folders"
    )
    parser.add_argument("--cell-type", choices=["mono", "poly"], default=None, help="ELPV only: filter by cell type")
    parser.add_argument(
        "--shots", type=int, default=None, help="images per class for training (default: the whole training split)"
    )
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--split-seed", type=int, default=defaults.split_seed)
    if sweep:
        parser.add_argument("--prompts", type=_int_list, default=[0, 1, 5, 10, 50, 100])
        parser.add_argument(
            "--placement",
            type=parse_placements,
            default=["shallow", "deep"],
            help="comma-separated placements; custom block lists after ';' e.g. 'deep;8,9,10,11'",
        )
        parser.add_argument("--seeds", type=_int_list, default=[0])
        parser.add_argument("--resume", action="store_true", help="skip configurations already done in the store")
        parser.add_argument(
            "--executor",
            choices=["local", "ray"],
            default="local",
            help="where the runs execute; results land in the same run store either way",
        )
        parser.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
        parser.add_argument(
            "--processes",
            type=int,
            default=1,
            help="local executor: worker processes sharing this machine's threads (2 is fastest on "
            "2 cores for few-shot runs); latency is then measured first, on a quiet machine",
        )
    else:
        parser.add_argument("--prompts", type=int, default=defaults.num_prompts)
        parser.add_argument("--placement", default=defaults.placement, help="shallow | deep | block list like 0,5,11")
        parser.add_argument("--seed", type=int, default=defaults.seed)
        parser.add_argument("--tuning", choices=["prompt", "linear", "full"], default="prompt")
    parser.add_argument("--prompt-dropout", type=float, default=defaults.prompt_dropout)
    parser.add_argument(
        "--prompt-type",
        choices=["standard", "bilinear", "bilinear-whitened"],
        default=defaults.prompt_type,
        help="bilinear: P = Z W of low rank; bilinear-whitened: W starts from the data's whitening matrix",
    )
    parser.add_argument(
        "--prompt-rank",
        type=int,
        default=None,
        help="rank c of bilinear prompts (default: 75 shallow, 50 deep, at most the prompt count)",
    )
    parser.add_argument("--skip-blocks", type=_int_list, default=[], help="blocks never executed, e.g. 3,7")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument(
        "--lr",
        type=_lr_arg,
        default=LR_AUTO,
        help="'auto' (default): chosen per configuration on the validation split; linear probes then fit "
        "a converged logistic regression. A number: that fixed rate",
    )
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default=defaults.optimizer)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=defaults.precision)
    parser.add_argument("--no-latency", action="store_true", help="skip latency measurement (faster)")
    parser.add_argument("--store", default=None, help="run store path (default: the user data dir, or $VPTDASH_HOME)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results on the last line")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    values = dict(
        backbone=args.backbone,
        weights=args.weights,
        dataset=args.dataset,
        cell_type=args.cell_type,
        shots=args.shots,
        resolution=args.resolution,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        prompt_dropout=args.prompt_dropout,
        prompt_type=args.prompt_type,
        prompt_rank=args.prompt_rank,
        skip_blocks=list(args.skip_blocks),
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        warmup_epochs=args.warmup_epochs,
        precision=args.precision,
        measure_latency=not args.no_latency,
    )
    values.update(overrides)
    return RunConfig(**values)


def _printer(quiet: bool):
    if quiet:
        return None

    def show(event: dict) -> None:
        phase = event.get("phase")
        if phase == "val":
            print(
                f"  epoch {event['epoch']:>3}  loss {event['loss']:.4f}  val acc {event['val_accuracy']:.3f}"
                f"  ({event['elapsed_s']:.1f}s, eta {event['eta_s']:.0f}s)",
                file=sys.stderr,
            )
        elif phase in ("setup", "cost"):
            print(f"  {event.get('message', phase)}", file=sys.stderr)

    return show


def summary(row: dict) -> dict[str, Any]:
    metrics, costs, timings = row.get("metrics") or {}, row.get("costs") or {}, row.get("timings") or {}
    merged = {**costs, **timings, **metrics, "run_id": row["id"], "status": row["status"]}
    result = {key: merged.get(key) for key in JSON_KEYS}
    if "lr_source" not in metrics:  # stored before rates were chosen, or not finished: what its config says
        config = RunConfig.from_dict(row.get("config") or {})
        result["lr"] = used_lr(config, metrics)
        result["lr_source"] = None if config.lr_is_auto else "fixed"
    if row.get("error"):
        result["error"] = row["error"].splitlines()[0]
    return result


def _report(row: dict, as_json: bool) -> int:
    result = summary(row)
    if as_json:
        print(json.dumps(result))
    else:
        config = RunConfig.from_dict(row["config"])
        if row["status"] == "failed":
            print(f"run {row['id']} failed: {row['error']}", file=sys.stderr)
        else:
            acc, bal = result["accuracy"], result["balanced_accuracy"]
            print(
                f"run {row['id']} [{row['status']}] {config.label()} on {config.dataset}: "
                + (f"test accuracy {acc:.3f} (balanced {bal:.3f}), " if acc is not None else "")
                + (f"{result['gmacs']:.3f} GMACs/image, " if result["gmacs"] is not None else "")
                + f"{result['params_trainable']} trainable params"
                if result["params_trainable"]
                else ""
            )
            if result["lr_source"] == "validation":
                chosen = (row.get("metrics") or {}).get("l2")
                what = f"L2 {chosen:g}" if result["lr"] is None and chosen is not None else f"lr {result['lr']:g}"
                print(f"  {what}, chosen on the validation split")
            if result["collapsed"]:
                print(f"  warning: collapsed: {(row.get('metrics') or {}).get('collapse_reason')}")
    return 0 if row["status"] in ("done", "cancelled") else 1


def cmd_train(args: argparse.Namespace, *, tuning: str | None = None) -> int:
    store = RunStore(args.store)
    tuning = tuning or args.tuning
    overrides = {
        "tuning": tuning,
        "num_prompts": 0 if tuning == "linear" else args.prompts,
        "placement": "none" if tuning == "linear" else args.placement,
        "seed": args.seed,
    }
    row = run_now(store, config_from_args(args, **overrides), echo=_printer(args.quiet or args.json))
    return _report(row, args.json)


def cmd_sweep(args: argparse.Namespace) -> int:
    store = RunStore(args.store)
    configs = sweep_configs(config_from_args(args), args.prompts, args.placement, args.seeds)
    for config in configs:  # every configuration is checked before the first one runs
        config.validate()
    if args.resume:  # an interrupted sweep continues where it stopped: finished configurations are kept
        # compared as RunConfig (defaults filled in), so runs stored before a new field existed still match
        finished = [RunConfig.from_dict(row["config"]) for row in store.list_runs(status="done")]
        configs = [c for c in configs if c not in finished]
    sweep_id = new_sweep_id()
    print(f"{sweep_id}: {len(configs)} runs on the {args.executor} executor", file=sys.stderr)
    outcome = {"done": 0, "failures": 0}

    def report(row: dict) -> None:
        outcome["done"] += 1
        outcome["failures"] += row["status"] == "failed"
        result = summary(row)
        if args.json:
            print(json.dumps({**result, "config": row["config"]}), flush=True)
        elif not args.quiet:
            acc = result["accuracy"]
            print(
                f"[{outcome['done']}/{len(configs)}] run {row['id']} {RunConfig.from_dict(row['config']).label()} "
                f"seed {row['config']['seed']}: {row['status']}" + (f", acc {acc:.3f}" if acc is not None else ""),
                file=sys.stderr,
            )

    if args.processes < 1:
        print("error: --processes must be at least 1", file=sys.stderr)
        return 2
    options = {"address": args.ray_address} if args.executor == "ray" else {"processes": args.processes}
    get_executor(args.executor, **options).run(store, configs, sweep_id=sweep_id, source="cli", on_done=report)
    return 1 if outcome["failures"] else 0


def cmd_condense(args: argparse.Namespace) -> int:
    """Prompt condensation of a stored run: Taylor-score its prompts, keep the global top K
    (or a fraction), fine-tune the kept ones, store the result as a child run."""
    store = RunStore(args.store)
    row = condense.condense_now(
        store,
        args.run,
        keep=args.keep,
        keep_fraction=args.keep_fraction,
        epochs=args.epochs,
        lr=args.lr,
        echo=_printer(args.quiet or args.json),
    )
    if args.json:
        metrics = row.get("metrics") or {}
        extra = {
            key: metrics.get(key)
            for key in (
                "kept_prompts",
                "parent_prompts",
                "kept_counts",
                "accuracy_pruned",
                "parent_accuracy",
                "parent_gmacs",
            )
        }
        print(json.dumps({**summary(row), "parent_id": row.get("parent_id"), **extra}))
        return 0 if row["status"] in ("done", "cancelled") else 1
    return _report(row, False)


def cmd_skip_search(args: argparse.Namespace) -> int:
    """Which k blocks can this task skip: greedy or DAS search, stored as a "skip-search" job."""
    store = RunStore(args.store)
    config = config_from_args(args, num_prompts=args.prompts, placement=args.placement, seed=args.seed)
    row = skipping.skip_search_now(
        store,
        config,
        args.k,
        args.method,
        steps=args.steps,
        candidates=args.candidates,
        echo=_printer(args.quiet or args.json),
    )
    result = skipping.stored_result(store, row["id"])
    summary_keys = (
        "method",
        "k",
        "skip",
        "order",
        "base_loss",
        "chosen_loss",
        "redundancy",
        "evaluations",
        "block_runs",
        "steps",
        "seconds",
        "n_train",
        "n_val",
        "stopped",
    )
    out = {
        "run_id": row["id"],
        "status": row["status"],
        **({k: getattr(result, k) for k in summary_keys} if result else {}),
    }
    if row.get("error"):
        out["error"] = row["error"].splitlines()[0]
    if args.json:
        print(json.dumps(out))
    elif result:
        print(
            f"run {row['id']}: skip blocks {','.join(map(str, result.skip))} ({result.method}, validation loss "
            f"{result.base_loss:.3f} -> {result.chosen_loss:.3f}, {result.evaluations} subnetworks, "
            f"{result.seconds:.0f} s)"
        )
        print(f"train it with: python -m vptdash train ... --skip-blocks {','.join(map(str, result.skip))}")
    else:
        print(f"run {row['id']} {row['status']}: {row.get('error') or ''}", file=sys.stderr)
    return 0 if row["status"] in ("done", "cancelled") else 1


def cmd_runs(args: argparse.Namespace) -> int:
    store = RunStore(args.store)
    if args.runs_command == "export":
        path = store.export_csv(args.csv)
        print(f"wrote {path}")
        return 0
    frame = store.runs_frame()
    if frame.empty:
        print("no runs yet")
        return 0
    columns = [
        c
        for c in (
            "id",
            "status",
            "kind",
            "source",
            "dataset",
            "tuning",
            "num_prompts",
            "placement",
            "seed",
            "accuracy",
            "balanced_accuracy",
            "gmacs",
            "latency_ms_b1",
        )
        if c in frame.columns
    ]
    print(frame[columns].to_string(index=False))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    return worker.serve(RunStore(args.store), idle_exit_s=args.idle_exit)


def _add_continual_options(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m vptdash continual`."""
    d = continual.ContinualConfig()
    parser.add_argument(
        "--dataset",
        default=d.dataset,
        help=f"elpv | {' | '.join(continual.GENERATED_DATASETS)} (generated) | a folder or .zip of class folders",
    )
    parser.add_argument("--cell-type", choices=["mono", "poly"], default=None, help="ELPV only: filter by cell type")
    parser.add_argument("--tasks", type=int, default=d.tasks, help="number of tasks the classes are split into")
    parser.add_argument("--order", type=_int_list, default=None, help="class indices in arrival order, e.g. 3,1,0,2")
    parser.add_argument(
        "--method", default="sequential,nsp2,joint", help=f"comma-separated, from {','.join(continual.METHODS)}"
    )
    parser.add_argument("--seeds", type=_int_list, default=[0])
    parser.add_argument("--backbone", default=d.backbone)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--resolution", type=int, default=d.resolution)
    parser.add_argument(
        "--shots", type=int, default=d.shots, help="training images per class (0: the whole training split)"
    )
    parser.add_argument("--test-fraction", type=float, default=d.test_fraction)
    parser.add_argument("--max-test-per-class", type=int, default=None)
    parser.add_argument("--split-seed", type=int, default=d.split_seed)
    parser.add_argument("--prompts", type=int, default=d.num_prompts, help="prompt tokens per prompted block")
    parser.add_argument("--placement", default=d.placement, help="lastK (default last4) | deep | shallow | block list")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="epochs per task")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--eta", type=float, default=d.eta, help="NSP2 stability/plasticity blend (1: pure projection)")
    parser.add_argument(
        "--null-threshold",
        type=float,
        default=None,
        help="NSP2 nullity: singular values <= this x the largest (default: at the spectrum's elbow)",
    )
    parser.add_argument("--ln-loss-weight", type=float, default=d.ln_loss_weight)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision)
    parser.add_argument("--store", default=None)
    parser.add_argument("--json", action="store_true", help="one JSON object per run on stdout")
    parser.add_argument("--quiet", action="store_true")


def cmd_continual(args: argparse.Namespace) -> int:
    """Run every (seed, method) in this process, one stored run each, grouped by one sweep id."""
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    base = continual.ContinualConfig(
        backbone=args.backbone,
        weights=args.weights,
        dataset=args.dataset,
        cell_type=args.cell_type,
        resolution=args.resolution,
        shots=args.shots or None,
        test_fraction=args.test_fraction,
        max_test_per_class=args.max_test_per_class,
        split_seed=args.split_seed,
        tasks=args.tasks,
        class_order=args.order,
        num_prompts=args.prompts,
        placement=args.placement,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        precision=args.precision,
        eta=args.eta,
        null_threshold=args.null_threshold,
        ln_loss_weight=args.ln_loss_weight,
    )
    configs = continual.continual_configs(base, methods, args.seeds)  # all checked before the first one runs
    store = RunStore(args.store)
    sweep_id = "continual-" + new_sweep_id().removeprefix("sweep-")
    rows = []
    for position, config in enumerate(configs, 1):
        if not args.quiet and not args.json:
            print(f"[{position}/{len(configs)}] {config.label()}", file=sys.stderr)
        row = continual.run_continual_now(store, config, sweep_id=sweep_id)
        rows.append(row)
        metrics = row.get("metrics") or {}
        result = {
            "run_id": row["id"],
            "status": row["status"],
            "method": config.method,
            "seed": config.seed,
            **{k: metrics.get(k) for k in continual.SUMMARY_KEYS},
            "train_seconds": (row.get("timings") or {}).get("train_seconds"),
        }
        if row.get("error"):
            result["error"] = row["error"].splitlines()[0]
        if args.json:
            print(json.dumps(result), flush=True)
        elif not args.quiet:
            print(
                "  "
                + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k in continual.SUMMARY_KEYS and v is not None)
                + (f"  [{row['status']}] {result.get('error', '')}" if row["status"] != "done" else ""),
                file=sys.stderr,
            )
    if not args.json and not args.quiet:
        print(f"{sweep_id}:", file=sys.stderr)
        for line in continual.summarize_runs(rows):
            print(
                f"  {line['label']:<32} avg accuracy {_pm(line, 'avg_accuracy')}  forgetting {_pm(line, 'forgetting')}"
                f"  ({line['seeds']} seeds)",
                file=sys.stderr,
            )
    return 1 if any(row["status"] == "failed" for row in rows) else 0


def _pm(line: dict, key: str) -> str:
    mean, std = line.get(f"{key}_mean"), line.get(f"{key}_std")
    return "n/a" if mean is None else f"{100 * mean:.1f} ± {100 * (std or 0):.1f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vptdash", description="Visual prompt tuning budgets, headless.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_options(sub.add_parser("train", help="train and evaluate one configuration"))
    probe = sub.add_parser("probe", help="linear probe on cached CLS features (the fast baseline)")
    _add_run_options(probe)
    # lr "auto": a logistic regression fitted to convergence; epochs only count with a fixed --lr
    probe.set_defaults(epochs=100)
    _add_run_options(sub.add_parser("sweep", help="a grid of prompt counts x placements x seeds"), sweep=True)
    condense = sub.add_parser(
        "condense", help="prompt condensation: keep a run's most important prompts, fine-tune them"
    )
    condense.add_argument(
        "--run", type=int, required=True, help="id of a finished prompt-tuning run with stored prompts"
    )
    keep = condense.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep", type=int, default=None, help="prompt vectors to keep, over all placed blocks")
    keep.add_argument("--keep-fraction", type=float, default=None, help="fraction of the prompt vectors to keep (0..1]")
    condense.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs for the kept prompts")
    condense.add_argument(
        "--lr", type=float, default=None, help="fine-tuning learning rate (default: a tenth of the parent's)"
    )
    condense.add_argument("--store", default=None)
    condense.add_argument("--json", action="store_true")
    condense.add_argument("--quiet", action="store_true")
    _add_continual_options(sub.add_parser("continual", help="continual learning: classes arrive task after task"))
    skip = sub.add_parser("skip-search", help="find k blocks this task can skip (greedy baseline or DAS search)")
    _add_run_options(skip)
    skip.add_argument("--k", type=int, required=True, help="how many blocks to skip")
    skip.add_argument("--method", choices=["greedy", "das"], default="greedy")
    skip.add_argument("--steps", type=int, default=300, help="DAS: REINFORCE steps")
    skip.add_argument("--candidates", type=_int_list, default=None, help="blocks that may be skipped (default: all)")
    runs = sub.add_parser("runs", help="the run history")
    runs.add_argument("--store", default=None)
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    runs_sub.add_parser("list")
    export = runs_sub.add_parser("export")
    export.add_argument("--csv", required=True)
    bench = sub.add_parser("bench", help="engine speed against the machine's peak and a naive reference loop")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--sweep", action="store_true", help="also time the standard meeting sweep end to end")
    bench.add_argument(
        "--steps", type=int, default=10, help="timed steps per loop (median; the first, warm-up step is not timed)"
    )
    bench.add_argument("--backbone", default="dinov2_s14")
    bench.add_argument("--resolution", type=int, default=112)
    worker = sub.add_parser("worker", help="the dashboard's background worker: runs queued jobs one at a time")
    worker.add_argument("--store", default=None)
    worker.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:  # an impossible budget: say why, store nothing, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        return cmd_train(args)
    if args.command == "probe":
        return cmd_train(args, tuning="linear")
    if args.command == "sweep":
        return cmd_sweep(args)
    if args.command == "condense":
        return cmd_condense(args)
    if args.command == "continual":
        return cmd_continual(args)
    if args.command == "skip-search":
        return cmd_skip_search(args)
    if args.command == "runs":
        return cmd_runs(args)
    if args.command == "worker":
        return cmd_worker(args)
    if args.command == "bench":
        return bench.main(
            as_json=args.json, sweep=args.sweep, steps=args.steps, backbone=args.backbone, resolution=args.resolution
        )
    return 2


def run() -> None:
    """The `vptdash` console command (pyproject's [project.scripts]): the same as `python -m vptdash`."""
    sys.exit(main())
