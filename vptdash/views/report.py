"""One self-contained HTML report of a set of runs: opens offline, mails as one file.

plotly.js is inlined once (with the first chart); every string that came from a user (dataset
names of uploads, placements, labels) is escaped.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any, Callable

import pandas as pd

from vptdash.engine import data
from vptdash.views import budget, charts, scope
from vptdash.views.style import finite

REPORT_COSTS = ("gmacs", "latency_ms_b1", "params_trainable")
ELPV_NOTICE = "ELPV dataset: CC BY-NC-SA 4.0, Deitsch et al. 2019"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } .meta { color: #555; margin-top: 0; }
.answer { font-size: 1.35rem; background: #f3f7fb; border-left: 6px solid #1f77b4; padding: 0.8rem 1.1rem; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0 1.5rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: right; white-space: nowrap; }
th { background: #fafafa; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
.scroll { overflow-x: auto; }
.note { color: #666; font-size: 0.9rem; }
footer { margin-top: 2rem; border-top: 1px solid #ddd; padding-top: 0.8rem; color: #555; font-size: 0.9rem; }
"""


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f}%" if finite(value) else "–"


def _pp(value: Any) -> str:
    return f"{100 * float(value):.1f}" if finite(value) else "–"


def _num(pattern: str) -> Callable[[Any], str]:
    return lambda value: pattern.format(float(value)) if finite(value) else "–"


def _int(value: Any) -> str:
    return f"{float(value):,.0f}" if finite(value) else "–"


def _ids(value: Any) -> str:
    return ", ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return str(value)


def _date(value: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(value))) if finite(value) else "–"


Column = tuple[str, str, Callable[[Any], str], bool]  # (column, header, formatter, is_text)
_WHAT: list[Column] = [
    ("label", "configuration", _text, True),
    ("family", "family", _text, True),
    ("dataset_name", "dataset", _text, True),
]
_COSTS: list[Column] = [
    ("gmacs", "GMACs / image (executed graph)", _num("{:.3f}"), False),
    ("gmacs_full_graph", "GMACs / image (full graph)", _num("{:.3f}"), False),
    ("latency_ms_b1", "latency ms (b=1)", _num("{:.2f}"), False),
    ("params_trainable", "trainable params", _int, False),
]
_AGG_COLUMNS: list[Column] = [
    *_WHAT,
    ("n_seeds", "seeds", _int, False),
    ("n_collapsed", "collapsed", _int, False),
    ("accuracy_mean", "accuracy %", _pp, False),
    ("accuracy_low", "95% CI low", _pp, False),
    ("accuracy_high", "95% CI high", _pp, False),
    ("balanced_accuracy_mean", "balanced acc. %", _pp, False),
    ("balanced_accuracy_low", "95% CI low", _pp, False),
    ("balanced_accuracy_high", "95% CI high", _pp, False),
    *_COSTS,
    ("sources", "source", _text, True),
    ("run_ids", "run ids", _ids, True),
]
_RUN_COLUMNS: list[Column] = [
    ("id", "id", _int, False),
    *_WHAT,
    ("backbone", "backbone", _text, True),
    ("resolution", "px", _int, False),
    ("shots", "shots", _int, False),
    ("seed", "seed", _int, False),
    ("accuracy", "accuracy", _pct, False),
    ("balanced_accuracy", "balanced acc.", _pct, False),
    *_COSTS,
    ("train_seconds", "train s", _num("{:.1f}"), False),
    ("source", "source", _text, True),
    ("created_at", "created (UTC)", _date, True),
]


def html_table(frame: pd.DataFrame, columns: list[tuple[str, str, Callable[[Any], str], bool]]) -> str:
    """A plain HTML table with formatted, escaped cells; missing columns show as "–"."""
    head = "".join(
        f'<th class="{"text" if is_text else "num"}">{html.escape(header)}</th>' for _, header, _, is_text in columns
    )
    body = []
    for _, row in frame.iterrows():
        cells = "".join(
            f'<td class="{"text" if is_text else "num"}">{html.escape(fmt(row.get(column)))}</td>'
            for column, _, fmt, is_text in columns
        )
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _unique(values) -> list[str]:
    return sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})


def _gmacs(value: Any) -> str:
    return f"{float(value):.3f} GMACs per image" if finite(value) else "cost unknown"


def compute_line(name: str, row: pd.Series) -> str:
    """Both compute conventions of one configuration, whichever one a chart used, e.g. "recommended,
    10 deep prompts: 1.380 GMACs per image on the executed graph (what runs here); 1.662 GMACs per
    image on the full graph (every token through every block, as published tables count)"."""
    return (
        f"{name}, {row.get('label')}: {_gmacs(row.get('gmacs'))} on the executed graph (what runs here); "
        f"{_gmacs(row.get('gmacs_full_graph'))} on the full graph (every token through every block, as "
        "published tables count)"
    )


def build_html_report(
    rows: list[dict], *, tolerance_points: float = 1.0, cost: str = "gmacs", title: str = "vptdash report"
) -> str:
    """The whole report as one HTML string (plotly.js inlined once; no network needed).

    The runs must share one data set and setup (`scope.SCOPE_KEYS`): scope.MixedSetupsError otherwise.
    `cost` is what the answer trades accuracy against; compute is "gmacs" (executed graph) or
    "gmacs_full_graph" (full graph), and the report states both for the chosen and best configurations
    either way. Configurations without the cost are listed as "cost unknown", never recommended."""
    scope.require_one_setup(rows)
    table = budget.runs_table(rows)
    agg = budget.aggregate_over_seeds(table)
    metric = budget.default_metric(table)
    known, cost_unknown = budget.split_known_cost(agg, cost)
    recommendation = budget.recommend(known, tolerance_points, cost=cost, metric=metric) if len(known) else None
    datasets, backbones = _unique(table["dataset_name"]), _unique(table["backbone"])
    e = html.escape

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">Generated {e(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))} · '
        f"dataset{'s' if len(datasets) != 1 else ''}: {e(', '.join(datasets) or '–')} · "
        f"backbone{'s' if len(backbones) != 1 else ''}: {e(', '.join(backbones) or '–')} · "
        f"{len(table)} finished run{'s' if len(table) != 1 else ''}, {len(agg)} configuration"
        f"{'s' if len(agg) != 1 else ''}</p>",
    ]
    if recommendation is not None:
        parts.append(f'<p class="answer">{e(recommendation.sentence)}</p>')
        parts.append(
            f'<p class="note">Tolerance: {e(f"{float(tolerance_points):g}")} accuracy point(s); '
            f"cost: {e(charts.COST_AXES.get(cost, cost))}; {e(budget.METRIC_WORDS.get(metric, metric))} is the "
            "mean over seeds on held-out test images, intervals are 95%"
            + (
                f" (balanced accuracy because one class is over {100 * budget.IMBALANCE_SHARE:.0f}% of the test set)"
                if metric == "balanced_accuracy_mean"
                else ""
            )
            + ".</p>"
        )
        shown = [("Recommended", recommendation.chosen)]
        if not recommendation.chosen_is_best:
            shown.append(("Best", recommendation.best))
        parts.append(
            '<p class="note">Compute, in both conventions: '
            + "; ".join(e(compute_line(name, row)) for name, row in shown)
            + ".</p>"
        )
    else:
        parts.append('<p class="answer">No finished runs yet: nothing to recommend.</p>')

    if cost_unknown:
        parts.append(
            "<p class='note'>Cost unknown, so not drawn and never recommended: "
            + "; ".join(e(line) for line in cost_unknown)
            + ".</p>"
        )

    plotly_included = False
    compute = cost if cost in budget.COMPUTE_CONVENTIONS else "gmacs"  # the chosen convention's chart
    for chart_cost in [compute if c == "gmacs" else c for c in REPORT_COSTS]:
        axis = charts.COST_AXES[chart_cost]
        has_values = chart_cost in agg and pd.to_numeric(agg[chart_cost], errors="coerce").notna().any()
        if len(agg) and not has_values:
            parts.append(f"<h2>{e(axis)}</h2><p class='note'>Not recorded for these runs.</p>")
            continue
        chart_known, _ = budget.split_known_cost(agg, chart_cost)
        chart_rec = budget.recommend(chart_known, tolerance_points, cost=chart_cost, metric=metric)
        fig = charts.cost_accuracy_figure(agg, cost=chart_cost, metric=metric, recommendation=chart_rec)
        parts.append(
            fig.to_html(
                full_html=False,
                include_plotlyjs="inline" if not plotly_included else False,
                config={"displaylogo": False, "responsive": True},
            )
        )
        plotly_included = True
        if chart_rec is not None and chart_cost != cost:
            parts.append(f'<p class="note">{e(chart_rec.sentence)}</p>')

    collapsed = budget.collapsed_lines(agg)
    if collapsed:
        parts.append(
            f"<h2>Collapsed runs ({len(collapsed)})</h2><p class='note'>Drawn hollow; left out of every mean, "
            "interval and recommendation.</p><ul>" + "".join(f"<li>{e(line)}</li>" for line in collapsed) + "</ul>"
        )
    parts.append("<h2>Configurations (mean over seeds)</h2>")
    parts.append(html_table(agg, _AGG_COLUMNS) if len(agg) else "<p class='note'>None.</p>")
    parts.append("<h2>Runs</h2>")
    parts.append(html_table(table, _RUN_COLUMNS) if len(table) else "<p class='note'>None.</p>")

    footer = [
        "Markers: ● precomputed points come from the reference sweep shipped with the app; "
        "◆ points were run here (dashboard or CLI); ■ configurations mix both. "
        "Error bars: 95% t interval over seeds (none for one seed). Costs: GMACs (multiply-adds) per image, "
        "on the executed graph (deep prompts enter each block as keys and values only, the last block computes "
        "only the CLS row: what a deployment here pays) or the full graph (every token through every block: "
        "the convention of published FLOPs tables); latency measured on the machine that ran each configuration."
    ]
    if any(str(d) in data.BUILTIN_DATASETS for d in table["dataset"]):
        footer.append(f"{ELPV_NOTICE}. {data.ELPV_LICENSE}")
    parts.append("<footer>" + "".join(f"<p>{e(line)}</p>" for line in footer) + "</footer>")
    parts.append("</body></html>")
    return "\n".join(parts)
