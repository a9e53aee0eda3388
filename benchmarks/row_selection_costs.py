"""GMACs per image with and without row selection, written into docs/results.md ("## Costs after row
selection") and benchmarks/data/row_selection_costs.json.

A block computes only the output rows something reads (vptdash.engine.rows): deep prompts are only keys
and values, and the last block computes the CLS row. This counts, with fvcore, what each configuration
costs on today's graph ("after") and with every block computing every token ("before",
`PromptedViT.whole_blocks()`, the graph the official VPT code runs). Counting needs no training and no
data: GMACs depend on the architecture only. A few minutes on 2 CPU cores.

    python benchmarks/row_selection_costs.py            # count, print, write the section and the JSON
    python benchmarks/row_selection_costs.py --no-write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DATA, machine, today, write_section  # noqa: E402
from vptdash.engine.cost import fvcore_gmacs  # noqa: E402
from vptdash.engine.train import RunConfig, build_model  # noqa: E402

HEADING = "## Costs after row selection"
OUTPUT = DATA / "row_selection_costs.json"
SETTINGS = [(0, "none")] + [(count, placement) for count in (10, 50, 100) for placement in ("shallow", "deep")]


def count(backbone: str, resolution: int) -> list[dict]:
    rows = []
    for prompts, placement in SETTINGS:
        tuning = "linear" if prompts == 0 else "prompt"
        config = RunConfig(
            backbone=backbone, resolution=resolution, num_prompts=prompts, placement=placement, tuning=tuning
        )
        model = build_model(config, 2)
        after = fvcore_gmacs(model, resolution)
        with model.whole_blocks():
            before = fvcore_gmacs(model, resolution)
        rows.append(
            {"label": config.label(), "prompts": prompts, "placement": placement, "before": before, "after": after}
        )
        print(f"{config.label()}: {before:.3f} -> {after:.3f} GMACs", flush=True)
    return rows


def section(rows: list[dict], backbone: str, resolution: int, date: str) -> str:
    lines = [
        f"Produced by `python benchmarks/row_selection_costs.py` on {date} ({backbone} at {resolution} px, "
        "fvcore, GMACs per image; no training: GMACs depend on the architecture only).",
        "",
        "A block computes only the output rows something reads: deep prompts are only keys and values (the "
        "next block overwrites their outputs) and the last block computes the CLS row. Accuracies are "
        "unaffected (same logits up to float rounding, `tests/test_rows.py`); the costs are lower, most for "
        "deep prompts. *Before* = every block computes every token (`PromptedViT.whole_blocks()`, as the "
        "official VPT code runs).",
        "",
        "| configuration | GMACs before | GMACs after | saved % |",
        "|---|---|---|---|",
    ]
    for row in rows:
        saved = 100 * (1 - row["after"] / row["before"])
        lines.append(f"| {row['label']} | {row['before']:.3f} | {row['after']:.3f} | {saved:.1f} |")
    by = {(r["prompts"], r["placement"]): r["after"] for r in rows}
    cheaper = all(by[(n, "deep")] < by[(n, "shallow")] for n in (10, 50, 100))
    lines += [
        "",
        'So "where" has a compute answer too: at the same count deep prompts cost '
        + ("less" if cheaper else "not always less")
        + " than shallow ones ("
        + "; ".join(f"{n}: {by[(n, 'deep')]:.3f} vs {by[(n, 'shallow')]:.3f}" for n in (10, 50, 100))
        + " GMACs, deep vs shallow), and condensing deep prompts saves less compute than it did when every "
        "block computed every token. The condensation, cost-lever and core-engine sections below carry costs "
        "counted on this graph (their scripts' `--recount-costs`); the continual-learning section reports no "
        "costs.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov2_s14")
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    rows = count(args.backbone, args.resolution)
    date = today()
    text = section(rows, args.backbone, args.resolution, date)
    print(text)
    if not args.no_write:
        OUTPUT.write_text(
            json.dumps(
                {
                    "backbone": args.backbone,
                    "resolution": args.resolution,
                    "date": date,
                    "machine": machine(),
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
        write_section(HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
