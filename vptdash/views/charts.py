"""Plotly figures for the dashboard and the HTML report, readable on a projector.

One colour per family everywhere (`FAMILY_COLORS`), large fonts, units in every axis title,
a title and a legend on every figure. Accuracies are fractions in the frames and percent on the
axes. No Streamlit here: pages call these and pass the figure to `st.plotly_chart`.
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterable

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from vptdash.views.budget import Recommendation, compute_words, ordered_families, pareto_front
from vptdash.views.style import BASE_FONT_SIZE, FAMILY_COLORS, apply_layout, family_color, finite, placeholder

# Compute always names its convention (`budget.COMPUTE_CONVENTIONS`): the executed graph is not what
# published FLOPs tables count, and a reader who knows those tables must not compare the two unawares.
COST_AXES = {
    "gmacs": compute_words("gmacs"),
    "gmacs_full_graph": compute_words("gmacs_full_graph"),
    "latency_ms_b1": "Latency, ms per image (batch 1)",
    "params_trainable": "Trainable parameters",
}
_MORE_COST_AXES = {
    "gmacs_analytic": "GMACs per image (analytic)",
    "latency_ms_b32": "Latency, ms per image (batch 32)",
    "params_total": "Parameters (total)",
    "train_seconds": "Training time, s",
}
COST_TITLES = {  # how a chart title names the cost: "Test accuracy vs compute (GMACs per image, executed graph)"
    "gmacs": "compute (GMACs per image, executed graph)",
    "gmacs_full_graph": "compute (GMACs per image, full graph)",
    "latency_ms_b1": "latency (ms per image, batch 1)",
    "params_trainable": "trainable parameters",
}
METRIC_AXES = {
    "accuracy_mean": "Test accuracy (%)",
    "accuracy": "Test accuracy (%)",
    "balanced_accuracy_mean": "Balanced test accuracy (%)",
    "balanced_accuracy": "Balanced test accuracy (%)",
    "val_accuracy_mean": "Validation accuracy (%)",
    "val_accuracy": "Validation accuracy (%)",
}

# Marker symbol per run source: the reference sweep shipped with the app vs runs made here. A
# configuration whose seeds mix both ("mixed": a mix always holds a run made here) is drawn as made here:
# a manager looks for where the new runs landed. Points made here are also larger, opaque and outlined
# (HERE_SIZE); only-precomputed points recede (PRECOMPUTED_OPACITY). "square" is no longer drawn.
SOURCE_SYMBOLS = {"precomputed": "circle", "live": "diamond", "cli": "diamond", "mixed": "diamond"}
SOURCE_NAMES = {
    "circle": "● precomputed (reference sweep)",
    "diamond": "◆ run here (dashboard / CLI)",
    "square": "■ precomputed + run here",
}

COLLAPSED_NAME = "○ collapsed run (not in the mean)"
MARKER_SIZE = 13
HIGHLIGHT_SIZE = 22


def source_symbol(source: Any) -> str:
    return SOURCE_SYMBOLS.get(str(source), "diamond")


HERE_SIZE = 19
PRECOMPUTED_OPACITY = 0.55


def made_here(source: Any) -> bool:
    """True for a point with at least one run made here (dashboard or CLI), not only precomputed."""
    return source_symbol(source) == "diamond"


def _fmt(value: Any, pattern: str, missing: str = "n/a") -> str:
    return pattern.format(float(value)) if finite(value) else missing


def _pct_pm(mean: Any, std: Any) -> str:
    if not finite(mean):
        return "n/a"
    text = f"{100 * float(mean):.1f}%"
    return text + (f" ± {100 * float(std):.1f}" if finite(std) else "")


def _pct_ci(row: pd.Series, base: str) -> str:
    """ "84.0% (95% CI 80.1 to 87.9)", "84.0% (one seed: no spread)", "n/a"."""
    mean = row.get(f"{base}_mean", row.get(base))
    if not finite(mean):
        return "n/a"
    text = f"{100 * float(mean):.1f}%"
    low, high = row.get(f"{base}_low"), row.get(f"{base}_high")
    if finite(low) and finite(high):
        return text + f" (95% CI {100 * float(low):.1f} to {100 * float(high):.1f})"
    if f"{base}_low" in row:
        return text + " (one seed: no spread)"
    return _pct_pm(mean, row.get(f"{base}_std"))


def _hover(row: pd.Series) -> str:
    e = lambda v: html.escape(str(v))  # noqa: E731 - placement and labels come from users
    seeds = row.get("seeds")
    seeds_text = ", ".join(str(s) for s in seeds) if isinstance(seeds, (list, tuple)) else ""
    run_ids = row.get("run_ids")
    runs_text = ", ".join(str(i) for i in run_ids) if isinstance(run_ids, (list, tuple)) else ""
    prompts = row.get("num_prompts")
    unknown = "cost unknown"
    lines = [
        f"<b>{e(row.get('label', ''))}</b>",
        f"family: {e(row.get('family', ''))}",
        f"placement: {e(row.get('placement', ''))} · prompts: {int(prompts) if finite(prompts) else 'n/a'}",
        f"seeds: {int(row.get('n_seeds', 1) or 1)}" + (f" ({seeds_text})" if seeds_text else ""),
        f"accuracy: {_pct_ci(row, 'accuracy')}",
        f"balanced accuracy: {_pct_ci(row, 'balanced_accuracy')}",
        f"GMACs per image, executed graph: {_fmt(row.get('gmacs'), '{:.3f}', unknown)}",
        f"GMACs per image, full graph (published tables): {_fmt(row.get('gmacs_full_graph'), '{:.3f}', unknown)}",
        f"latency (batch 1): {_fmt(row.get('latency_ms_b1'), '{:.2f} ms')}",
        f"trainable parameters: {_fmt(row.get('params_trainable'), '{:,.0f}')}",
        f"source: {e(row.get('sources', ''))} ({SOURCE_NAMES[source_symbol(row.get('sources'))]})",
        f"run ids: {runs_text}",
    ]
    collapsed = row.get("n_collapsed")
    if finite(collapsed) and int(collapsed):
        lines.insert(4, f"collapsed runs left out of the mean: {int(collapsed)}")
    lr = row.get("lr_text")
    if isinstance(lr, str) and lr:
        lines.insert(4, f"learning rate: {e(lr)}")
    name = row.get("dataset_name") or row.get("dataset")
    if isinstance(name, str) and name:
        lines.insert(2, f"dataset: {e(name)}")
    return "<br>".join(lines)


def _error_bars(rows: pd.DataFrame, metric: str, std_column: str | None) -> dict | None:
    """95% interval bars from the `*_low`/`*_high` columns (none for one seed); a frame without them
    (older callers) gets std bars."""
    base = metric[: -len("_mean")] if metric.endswith("_mean") else metric
    if f"{base}_low" in rows and f"{base}_high" in rows:
        up, down = [], []
        for mean, low, high in zip(rows[metric], rows[f"{base}_low"], rows[f"{base}_high"]):
            ok = finite(low) and finite(high) and finite(mean)
            up.append(100 * (float(high) - float(mean)) if ok else 0.0)
            down.append(100 * (float(mean) - float(low)) if ok else 0.0)
        if any(up) or any(down):
            return {
                "type": "data",
                "symmetric": False,
                "array": up,
                "arrayminus": down,
                "visible": True,
                "thickness": 1.5,
                "width": 5,
            }
        return None
    if std_column and std_column in rows:
        stds = [100 * float(s) if finite(s) else 0.0 for s in rows[std_column]]
        if any(stds):
            return {"type": "data", "array": stds, "visible": True, "thickness": 1.5, "width": 5}
    return None


def chance_level(frame: pd.DataFrame, metric: str) -> tuple[float, str] | None:
    """(chance level as a fraction, its legend name): the majority class's share of the test set for
    accuracy, 1/K for balanced accuracy; None when the frame does not know it."""
    if metric in ("accuracy_mean", "accuracy") and "majority_accuracy" in frame:
        majority = pd.to_numeric(frame["majority_accuracy"], errors="coerce").dropna()
        if len(majority):
            level = float(majority.median())
            return level, f"Chance: majority class ({100 * level:.1f}%)"
    if metric in ("balanced_accuracy_mean", "balanced_accuracy") and "n_classes" in frame:
        classes = pd.to_numeric(frame["n_classes"], errors="coerce").dropna()
        if len(classes) and classes.max() >= 2:
            k = int(classes.max())
            return 1.0 / k, f"Chance: 1/{k} classes ({100 / k:.1f}%)"
    return None


def collapsed_points(frame: pd.DataFrame, cost: str, metric: str) -> list[dict]:
    """Every collapsed run of the frame's configurations as {"x", "y", "family", "label", "id", "seed",
    "reason"} (y a fraction): drawn hollow, listed under the chart, never in a mean."""
    base = metric[: -len("_mean")] if metric.endswith("_mean") else metric
    points = []
    if frame is None or "collapsed_runs" not in frame:
        return points
    for _, row in frame.iterrows():
        runs = row.get("collapsed_runs")
        if not isinstance(runs, (list, tuple)):
            continue
        for run in runs:
            points.append(
                {
                    "x": row.get(cost),
                    "y": run.get(base),
                    "family": row.get("family"),
                    "label": row.get("label"),
                    "id": run.get("id"),
                    "seed": run.get("seed"),
                    "reason": run.get("reason"),
                }
            )
    return points


def _use_log(values: Iterable[float]) -> bool:
    drawn = [float(v) for v in values if finite(v)]
    return bool(drawn) and min(drawn) > 0 and max(drawn) / min(drawn) > 10


def cost_accuracy_figure(
    agg: pd.DataFrame,
    *,
    cost: str = "gmacs",
    metric: str = "accuracy_mean",
    recommendation: Recommendation | None = None,
    highlight_ids: Iterable[int] = (),
    title: str | None = None,
) -> go.Figure:
    """Cost vs accuracy, one scatter trace per family (error bars: 95% interval over seeds; a frame
    without interval columns gets std bars).

    Marker symbol by source (circle precomputed, diamond run here, square mixed; legend-only key
    traces explain it), the Pareto front as a step line, the recommended point ringed with an
    annotation, highlighted runs larger with a thick outline, collapsed runs as hollow circles (one
    per run, never in a mean), and a dashed chance line when the frame knows it (`chance_level`)."""
    x_title = COST_AXES.get(cost) or _MORE_COST_AXES.get(cost) or cost
    y_title = METRIC_AXES.get(metric, f"{metric} (%)")
    fig = go.Figure()
    default_title = f"{y_title.split(' (')[0]} vs {COST_TITLES.get(cost, x_title)}"
    apply_layout(fig, title or default_title, xaxis_title=x_title, yaxis_title=y_title, hovermode="closest", height=620)
    fig.update_yaxes(ticksuffix="%")
    if agg is None or len(agg) == 0 or cost not in agg or metric not in agg:
        placeholder(fig, "No finished runs yet")
        return fig
    x_all = pd.to_numeric(agg[cost], errors="coerce")
    y_all = pd.to_numeric(agg[metric], errors="coerce")
    frame = agg[x_all.notna() & y_all.notna()]
    if len(frame) == 0 and not collapsed_points(agg, cost, metric):
        placeholder(fig, f"No finished run has {x_title.lower()} recorded")
        return fig
    if _use_log(frame[cost]):
        fig.update_xaxes(type="log")

    front = pareto_front(frame, cost, metric)
    if len(front):
        fig.add_trace(
            go.Scatter(
                x=[float(v) for v in front[cost]],
                y=[100 * float(v) for v in front[metric]],
                mode="lines",
                line={"shape": "hv", "color": "rgba(60,60,60,0.55)", "width": 2.5, "dash": "dot"},
                name="Pareto front",
                hoverinfo="skip",
            )
        )

    std_column = metric[: -len("_mean")] + "_std" if metric.endswith("_mean") else None
    highlight = {int(i) for i in highlight_ids}
    symbols_used = set()
    for family in ordered_families(frame["family"]):
        rows = frame[frame["family"] == family]
        hits = [
            bool(highlight & set(ids)) if isinstance(ids, (list, tuple)) else False
            for ids in rows.get("run_ids", pd.Series([[]] * len(rows), index=rows.index))
        ]
        symbols = [source_symbol(s) for s in rows.get("sources", pd.Series(["live"] * len(rows), index=rows.index))]
        symbols_used.update(symbols)
        error = _error_bars(rows, metric, std_column)
        fig.add_trace(
            go.Scatter(
                x=[float(v) for v in rows[cost]],
                y=[100 * float(v) for v in rows[metric]],
                mode="markers",
                name=family,
                legendgroup=family,
                error_y=error,
                marker={
                    "color": family_color(family),
                    "symbol": symbols,
                    "size": [
                        HIGHLIGHT_SIZE if h else HERE_SIZE if s == "diamond" else MARKER_SIZE
                        for h, s in zip(hits, symbols)
                    ],
                    "line": {
                        "width": [4 if h else 2 if s == "diamond" else 1 for h, s in zip(hits, symbols)],
                        "color": ["#111" if h or s == "diamond" else "white" for h, s in zip(hits, symbols)],
                    },
                    "opacity": [1.0 if h or s == "diamond" else PRECOMPUTED_OPACITY for h, s in zip(hits, symbols)],
                },
                hovertext=[_hover(row) for _, row in rows.iterrows()],
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )

    hollow = [p for p in collapsed_points(agg, cost, metric) if finite(p["x"]) and finite(p["y"])]
    if hollow:
        e = html.escape
        fig.add_trace(
            go.Scatter(
                x=[float(p["x"]) for p in hollow],
                y=[100 * float(p["y"]) for p in hollow],
                mode="markers",
                name=COLLAPSED_NAME,
                marker={
                    "symbol": "circle-open",
                    "size": MARKER_SIZE + 2,
                    "color": [family_color(p["family"]) for p in hollow],
                    "line": {"width": 2.5},
                },
                hovertext=[
                    f"<b>{e(str(p['label']))}</b><br>run {p['id']}, seed {p['seed']}: collapsed "
                    f"({e(str(p['reason']))})<br>left out of the mean and of the recommendation"
                    for p in hollow
                ],
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )

    for symbol in ("circle", "diamond", "square"):
        if symbol in symbols_used:
            fig.add_trace(
                go.Scatter(  # legend key only: no points
                    x=[None],
                    y=[None],
                    mode="markers",
                    name=SOURCE_NAMES[symbol],
                    legendgroup="sources",
                    marker={
                        "symbol": symbol,
                        "color": "#555",
                        "size": HERE_SIZE if symbol == "diamond" else MARKER_SIZE,
                        "opacity": 1.0 if symbol == "diamond" else PRECOMPUTED_OPACITY,
                        "line": {
                            "width": 2 if symbol == "diamond" else 1,
                            "color": "#111" if symbol == "diamond" else "white",
                        },
                    },
                    hoverinfo="skip",
                )
            )

    chance = chance_level(agg, metric)
    if chance is not None:
        level, chance_name = 100 * chance[0], chance[1]
        fig.add_hline(y=level, line={"dash": "dash", "color": "#444", "width": 2})
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="lines",
                name=chance_name,
                line={"dash": "dash", "color": "#444", "width": 2},
                hoverinfo="skip",
            )
        )

    if recommendation is not None:
        chosen = recommendation.chosen
        x, y = chosen.get(cost), chosen.get(metric)
        if finite(x) and finite(y):
            fig.add_trace(
                go.Scatter(
                    x=[float(x)],
                    y=[100 * float(y)],
                    mode="markers",
                    name="Recommended",
                    marker={"symbol": "circle-open", "size": 34, "color": "#111", "line": {"width": 3}},
                    hovertext=[html.escape(recommendation.sentence)],
                    hovertemplate="%{hovertext}<extra></extra>",
                )
            )
            x_ref = math.log10(float(x)) if fig.layout.xaxis.type == "log" and float(x) > 0 else float(x)
            fig.add_annotation(
                x=x_ref,
                y=100 * float(y),
                text=f"<b>Recommended:</b> {html.escape(str(chosen.get('label', '')))}",
                showarrow=True,
                arrowhead=2,
                arrowwidth=2,
                ax=60,
                ay=-55,
                font={"size": BASE_FONT_SIZE},
                bgcolor="rgba(255,255,255,0.85)",
                bordercolor="#111",
                borderwidth=1,
            )
    return fig


def training_curve_figure(events: list[dict]) -> go.Figure:
    """Training loss (left axis) and validation accuracy in % (right axis) against the step."""
    events = events or []
    train = [e for e in events if e.get("phase") == "train" and finite(e.get("step")) and finite(e.get("loss"))]
    val = [e for e in events if e.get("phase") == "val" and finite(e.get("step")) and finite(e.get("val_accuracy"))]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Scatter(
            x=[e["step"] for e in train],
            y=[float(e["loss"]) for e in train],
            mode="lines",
            name="Training loss",
            line={"color": FAMILY_COLORS["shallow"], "width": 2.5},
            hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>",
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=[e["step"] for e in val],
            y=[100 * float(e["val_accuracy"]) for e in val],
            mode="lines+markers",
            name="Validation accuracy",
            line={"color": FAMILY_COLORS["deep"], "width": 2.5},
            marker={"size": 9},
            customdata=[e.get("epoch") for e in val],
            hovertemplate="epoch %{customdata} (step %{x})<br>val accuracy %{y:.1f}%<extra></extra>",
        ),
        secondary_y=True,
    )
    balanced = [e for e in val if finite(e.get("val_balanced_accuracy"))]
    if balanced:
        fig.add_trace(
            go.Scatter(
                x=[e["step"] for e in balanced],
                y=[100 * float(e["val_balanced_accuracy"]) for e in balanced],
                mode="lines+markers",
                name="Validation balanced accuracy",
                line={"color": FAMILY_COLORS["deep"], "width": 2, "dash": "dot"},
                marker={"size": 7},
                hovertemplate="step %{x}<br>val balanced accuracy %{y:.1f}%<extra></extra>",
            ),
            secondary_y=True,
        )
    apply_layout(fig, "Training progress", hovermode="x unified", height=520)
    fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.22, "x": 0})
    fig.update_xaxes(title_text="Training step")
    fig.update_yaxes(title_text="Training loss (cross-entropy)", secondary_y=False, rangemode="tozero")
    fig.update_yaxes(
        title_text="Validation accuracy (%)",
        secondary_y=True,
        range=[0, 100],
        ticksuffix="%",
        tickmode="linear",
        tick0=0,
        dtick=20,
        showgrid=False,
    )
    if not train and not val:
        for trace in fig.data:  # keep the legend entries: plotly hides traces with no data at all
            trace.update(x=[None], y=[None])
        fig.update_xaxes(range=[0, 10])
        placeholder(fig, "Waiting for the first training step…")
    return fig


def confusion_figure(matrix: list[list[int]], class_names: list[str]) -> go.Figure:
    """Heatmap of counts (annotated), rows = true class, columns = predicted class."""
    matrix = [list(map(int, row)) for row in (matrix or [])]
    n = len(matrix)
    names = [str(c) for c in (class_names or [])][:n]
    names += [f"class {i}" for i in range(len(names), n)]
    fig = go.Figure()
    apply_layout(fig, "Confusion matrix (test set)", height=max(380, 110 + 70 * n), width=None)
    fig.update_xaxes(title_text="Predicted class", type="category", side="bottom")
    fig.update_yaxes(title_text="True class", type="category", autorange="reversed")
    if n == 0:
        placeholder(fig, "No confusion matrix recorded for this run")
        return fig
    share = [[100 * v / sum(row) if sum(row) else 0.0 for v in row] for row in matrix]
    fig.add_trace(
        go.Heatmap(
            z=matrix,
            x=names,
            y=names,
            text=matrix,
            texttemplate="%{text}",
            textfont={"size": BASE_FONT_SIZE + 2},
            customdata=share,
            colorscale="Blues",
            colorbar={"title": {"text": "images"}},
            hovertemplate="true: %{y}<br>predicted: %{x}<br>%{z} images (%{customdata:.1f}% of the true class)"
            "<extra></extra>",
            name="images",
        )
    )
    return fig


def figure_points(fig: go.Figure) -> list[dict]:
    """Every scatter point of a figure as {"trace", "x", "y", "hovertext"} (legend-only traces,
    whose points are None, contribute nothing). For tests and AppTest assertions."""
    points = []
    for trace in fig.data:
        if trace.type not in ("scatter", "scattergl"):
            continue
        xs = list(trace.x) if trace.x is not None else []
        ys = list(trace.y) if trace.y is not None else []
        texts = trace.hovertext
        texts = list(texts) if isinstance(texts, (list, tuple)) else [texts] * len(xs)
        for index, (x, y) in enumerate(zip(xs, ys)):
            if x is None and y is None:
                continue
            points.append(
                {"trace": trace.name, "x": x, "y": y, "hovertext": texts[index] if index < len(texts) else None}
            )
    return points


__all__ = [
    "COST_AXES",
    "SOURCE_SYMBOLS",
    "confusion_figure",
    "chance_level",
    "collapsed_points",
    "cost_accuracy_figure",
    "figure_points",
    "training_curve_figure",
]
