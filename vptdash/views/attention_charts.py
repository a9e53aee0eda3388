"""Plotly figures for the Attention page and the condensation arrows on the budget chart.

Same conventions as `charts.py` (large fonts, units on the axes, family colours). No Streamlit here.
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from vptdash.views.charts import COST_AXES
from vptdash.views.style import BASE_FONT_SIZE, FAMILY_COLORS, apply_layout, family_color, finite, placeholder

PULL_COLORS = ["#e4572e", "#1f77b4", "#2ca02c", "#9467bd"]  # run A, run B, ...
HEAT_SCALE = "Inferno"


def _layout(fig: go.Figure, title: str, **extra) -> go.Figure:
    """style.apply_layout (fonts, template, legend), then anything it sets itself (showlegend, margin) overridden."""
    own = {key: extra.pop(key) for key in ("showlegend", "margin") if key in extra}
    apply_layout(fig, title, **extra)
    if own:
        fig.update_layout(**own)
    return fig


def _image_hwc(image_uint8) -> np.ndarray:
    array = image_uint8.numpy() if hasattr(image_uint8, "numpy") else np.asarray(image_uint8)
    if array.ndim == 4:
        array = array[0]
    if array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array.astype(np.uint8)


def overlay_figure(image_uint8, heat, *, title: str, opacity: float = 0.45, caption: str = "") -> go.Figure:
    """The image with a patch-grid heatmap on top (one cell per patch), in image pixel coordinates.

    `heat`: (rows, cols) attention values (raw probabilities: the colour bar shows them as they are)."""
    picture = _image_hwc(image_uint8)
    height, width = picture.shape[:2]
    heat = np.asarray(heat.numpy() if hasattr(heat, "numpy") else heat, dtype=float)
    rows, cols = heat.shape
    fig = go.Figure()
    fig.add_trace(go.Image(z=picture, hoverinfo="skip", name="image"))
    fig.add_trace(
        go.Heatmap(
            z=heat,
            x0=width / cols / 2,
            dx=width / cols,
            y0=height / rows / 2,
            dy=height / rows,
            colorscale=HEAT_SCALE,
            opacity=opacity,
            zmin=0.0,
            zmax=float(heat.max()) if heat.size and heat.max() > 0 else 1.0,
            colorbar={"title": {"text": "attention", "side": "right"}, "tickformat": ".3f"},
            hovertemplate="patch row %{y:.0f}px, col %{x:.0f}px<br>attention %{z:.4f}<extra></extra>",
            name="attention",
        )
    )
    _layout(fig, title, height=520, showlegend=False, margin={"l": 20, "r": 20, "t": 70, "b": 40})
    fig.update_xaxes(visible=False, range=[0, width], constrain="domain")
    fig.update_yaxes(visible=False, range=[height, 0], scaleanchor="x")
    if caption:
        fig.add_annotation(
            text=caption,
            xref="paper",
            yref="paper",
            x=0,
            y=-0.06,
            showarrow=False,
            font={"size": BASE_FONT_SIZE - 4, "color": "#555"},
            xanchor="left",
        )
    return fig


PULL_MEASURES = {
    "cls_pull": ("Attention on prompts (%)", "attention mass from the CLS query"),
    "patch_pull": ("Attention on prompts (%)", "attention mass from patch queries"),
    "cls_value_share": ("Value-weighted share from prompts (%)", "value-weighted share, CLS query"),
    "patch_value_share": ("Value-weighted share from prompts (%)", "value-weighted share, patch queries"),
}


def pull_per_block_figure(
    series: dict[str, list[dict[str, Any]]],
    *,
    query: str = "cls_pull",
    baselines: dict[str, list[dict[str, Any]]] | None = None,
) -> go.Figure:
    """Prompt pull (or value-weighted share) per block, one solid line per run, with its two baselines:
    the same measure for the run's untrained prompts (dotted; `baselines`: label -> rows) and, for
    attention mass, the uniform share p / T (dashed). `series`: label -> `attention.prompt_pull` rows."""
    axis, words = PULL_MEASURES.get(query, ("%", query))
    fig = go.Figure()
    _layout(
        fig,
        f"Prompt pull per block ({words}): trained vs untrained prompts",
        xaxis_title="Block",
        yaxis_title=axis,
        height=480,
        hovermode="x unified",
    )
    fig.update_yaxes(ticksuffix="%", rangemode="tozero")
    if not series:
        placeholder(fig, "Pick a run")
        return fig
    baselines = baselines or {}
    for position, (label, rows) in enumerate(series.items()):
        color = PULL_COLORS[position % len(PULL_COLORS)]
        rows = [r for r in rows if not r.get("skipped") and finite(r.get(query))]
        blocks = [r["block"] for r in rows]
        fig.add_trace(
            go.Scatter(
                x=blocks,
                y=[100 * r[query] for r in rows],
                mode="lines+markers",
                name=f"{label}: trained",
                line={"color": color, "width": 3},
                marker={"size": 9},
                customdata=[[r["prompts"], r["tokens"]] for r in rows],
                hovertemplate="trained %{y:.1f}% (%{customdata[0]} prompts of %{customdata[1]} tokens)<extra>"
                + html.escape(label)
                + "</extra>",
            )
        )
        untrained = [r for r in baselines.get(label) or [] if not r.get("skipped") and finite(r.get(query))]
        if untrained:
            fig.add_trace(
                go.Scatter(
                    x=[r["block"] for r in untrained],
                    y=[100 * r[query] for r in untrained],
                    mode="lines+markers",
                    name=f"{label}: untrained prompts",
                    line={"color": color, "width": 2, "dash": "dot"},
                    marker={"size": 6, "symbol": "circle-open"},
                    hovertemplate="untrained %{y:.1f}%<extra></extra>",
                )
            )
        if query in ("cls_pull", "patch_pull"):
            fig.add_trace(
                go.Scatter(
                    x=blocks,
                    y=[100 * r["uniform"] for r in rows],
                    mode="lines",
                    name=f"{label}: uniform share p/T",
                    line={"color": color, "width": 1.5, "dash": "dash"},
                    hovertemplate="uniform %{y:.1f}%<extra></extra>",
                )
            )
    fig.update_xaxes(dtick=1)
    fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.2, "x": 0})
    return fig


def pull_vs_count_figure(records: list[dict[str, Any]], *, query: str = "cls_pull") -> go.Figure:
    """What training did to prompt pull, against prompts per block: trained minus untrained pull (mean
    over blocks), one point per stored run (by family); 0 = the untrained prompts' pull, the frozen
    backbone's own doing. Open markers: where the uniform share p/T lies on the same scale (p/T minus
    untrained), the yardstick that would credit training with the backbone's preference for prompts.
    Runs without an untrained baseline (no prompts, full fine-tuning) are left out."""
    fig = go.Figure()
    axis, words = PULL_MEASURES.get(query, ("%", query))
    _layout(
        fig,
        f"Prompt pull gained by training vs prompt count ({words}, mean over blocks)",
        xaxis_title="Prompts per block",
        yaxis_title="Trained minus untrained (points)",
        height=480,
    )
    fig.update_yaxes(ticksuffix=" pt", zeroline=True, zerolinewidth=2, zerolinecolor="#888")
    baseline = f"{query}_untrained"
    records = [
        r
        for r in records
        if finite(r.get(query)) and finite(r.get(baseline)) and finite(r.get("num_prompts")) and r["num_prompts"] > 0
    ]
    if not records:
        placeholder(fig, "No stored runs with prompts (and an untrained baseline) on this data yet")
        return fig
    frame = pd.DataFrame(records)
    frame["x"] = (
        frame["total_prompts"] / frame["placed_blocks"].clip(lower=1)
        if "placed_blocks" in frame
        else frame["num_prompts"]
    )
    frame["gain"] = 100 * (frame[query] - frame[baseline])
    show_uniform = query in ("cls_pull", "patch_pull") and "uniform" in frame
    for family, rows in frame.groupby("family", sort=True):
        rows = rows.sort_values("x")
        color = family_color(family)
        fig.add_trace(
            go.Scatter(
                x=rows["x"],
                y=rows["gain"],
                mode="lines+markers",
                name=f"{family}: trained − untrained",
                line={"color": color, "width": 2.5},
                marker={"size": 12, "color": color},
                hovertext=[
                    f"run {int(r.run_id)}: {html.escape(str(r.label))}<br>trained {100 * r[query]:.1f}%, "
                    f"untrained {100 * r[baseline]:.1f}%: {r.gain:+.1f} points"
                    + (f"<br>uniform share p/T {100 * r.uniform:.1f}%" if show_uniform else "")
                    for _, r in rows.iterrows()
                ],
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )
        if show_uniform:
            fig.add_trace(
                go.Scatter(
                    x=rows["x"],
                    y=100 * (rows["uniform"] - rows[baseline]),
                    mode="markers",
                    name=f"{family}: uniform share p/T − untrained",
                    marker={"size": 10, "color": color, "symbol": "circle-open", "line": {"width": 2}},
                    hovertemplate="p/T minus untrained: %{y:+.1f} points<extra></extra>",
                )
            )
    if frame["x"].min() > 0 and frame["x"].max() / frame["x"].min() > 10:
        fig.update_xaxes(type="log")
    return fig


def per_prompt_figure(
    values: Sequence[np.ndarray],
    blocks: Sequence[int],
    *,
    title: str,
    colorbar: str = "attention",
    kept: Sequence[Sequence[int]] | None = None,
    log_color: bool = False,
) -> go.Figure:
    """Blocks x prompt slots heatmap (e.g. per-prompt pull or importance scores); `kept` marks the
    prompts a condensation kept; `log_color` colours by log10 (importance scores span decades)."""
    fig = go.Figure()
    width = max((len(v) for v in values), default=0)
    _layout(
        fig,
        title,
        xaxis_title="Prompt slot",
        yaxis_title="Block",
        height=max(320, 60 + 32 * len(values)),
        showlegend=kept is not None,
    )
    if width == 0:
        placeholder(fig, "No prompts")
        return fig
    grid = np.full((len(values), width), np.nan)
    for row, v in enumerate(values):
        grid[row, : len(v)] = np.asarray(v, dtype=float)
    shown, label = grid, colorbar
    if log_color:
        positive = grid[np.isfinite(grid) & (grid > 0)]
        floor = positive.min() if positive.size else 1e-12
        shown, label = np.log10(np.where(np.isfinite(grid), np.maximum(grid, floor), np.nan)), f"log10 {colorbar}"
    fig.add_trace(
        go.Heatmap(
            z=shown,
            y=[f"{b}" for b in blocks],
            colorscale="Viridis",
            customdata=grid,
            colorbar={"title": {"text": label}},
            hovertemplate="block %{y}, prompt %{x}<br>%{customdata:.4g}<extra></extra>",
            name=colorbar,
        )
    )
    if kept is not None:
        xs = [i for row, indices in enumerate(kept) for i in indices]
        ys = [f"{blocks[row]}" for row, indices in enumerate(kept) for _ in indices]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                name="kept",
                marker={"symbol": "square-open", "size": 9, "color": "#ffffff", "line": {"width": 2}},
                hovertemplate="kept: block %{y}, prompt %{x}<extra></extra>",
            )
        )
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0})
    return fig


def condensation_figure(pairs: list[dict[str, Any]], *, cost: str = "gmacs") -> go.Figure:
    """Accuracy against cost for parents and their condensed runs, an arrow from each parent to its child."""
    fig = go.Figure()
    _layout(
        fig,
        "Before and after condensation",
        xaxis_title=COST_AXES.get(cost, cost),
        yaxis_title="Test accuracy (%)",
        height=480,
    )
    fig.update_yaxes(ticksuffix="%")
    pairs = [p for p in pairs if all(finite(p.get(k)) for k in ("parent_accuracy", "accuracy", f"parent_{cost}", cost))]
    if not pairs:
        placeholder(fig, "No finished condensation yet")
        return fig
    fig.add_trace(
        go.Scatter(
            x=[p[f"parent_{cost}"] for p in pairs],
            y=[100 * p["parent_accuracy"] for p in pairs],
            mode="markers",
            name="parent",
            marker={"size": 14, "color": FAMILY_COLORS["deep"]},
            hovertext=[f"run {p['parent_id']}: {html.escape(str(p.get('parent_label') or ''))}" for p in pairs],
            hovertemplate="%{hovertext}<br>%{y:.1f}%<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[p[cost] for p in pairs],
            y=[100 * p["accuracy"] for p in pairs],
            mode="markers",
            name="condensed",
            marker={"size": 14, "color": FAMILY_COLORS["condensed"]},
            hovertext=[_pair_text(p) for p in pairs],
            hovertemplate="%{hovertext}<extra></extra>",
        )
    )
    for p in pairs:
        fig.add_annotation(
            x=p[cost],
            y=100 * p["accuracy"],
            ax=p[f"parent_{cost}"],
            ay=100 * p["parent_accuracy"],
            xref="x",
            yref="y",
            axref="x",
            ayref="y",
            showarrow=True,
            arrowhead=3,
            arrowwidth=2.5,
            arrowcolor=FAMILY_COLORS["condensed"],
            text="",
        )
    return fig


def _pair_text(pair: dict[str, Any]) -> str:
    def pct(v):
        return f"{100 * float(v):.1f}%" if finite(v) else "n/a"

    def num(v, pattern):
        return pattern.format(float(v)) if finite(v) else "n/a"

    lines = [f"<b>run {pair.get('parent_id')} → run {pair.get('run_id')}</b>"]
    if pair.get("parent_label") and pair.get("label"):
        lines.append(f"{html.escape(str(pair['parent_label']))} → {html.escape(str(pair['label']))}")
    if pair.get("kept_prompts") is not None and pair.get("parent_prompts") is not None:
        lines.append(f"prompt vectors kept: {pair['kept_prompts']} of {pair['parent_prompts']}")
    lines += [
        f"accuracy: {pct(pair.get('parent_accuracy'))} → {pct(pair.get('accuracy'))}"
        + (
            f" (pruned, before fine-tuning: {pct(pair.get('accuracy_pruned'))})"
            if finite(pair.get("accuracy_pruned"))
            else ""
        ),
        f"GMACs per image: {num(pair.get('parent_gmacs'), '{:.3f}')} → {num(pair.get('gmacs'), '{:.3f}')}",
        f"latency (batch 1): {num(pair.get('parent_latency_ms_b1'), '{:.2f} ms')} → "
        f"{num(pair.get('latency_ms_b1'), '{:.2f} ms')}",
    ]
    return "<br>".join(lines)


def add_condensation_arrows(
    fig: go.Figure, agg: pd.DataFrame, table: pd.DataFrame, *, cost: str = "gmacs", metric: str = "accuracy_mean"
) -> int:
    """Draw an arrow on a budget chart (`charts.cost_accuracy_figure(agg, cost=..., metric=...)`) from
    each parent configuration to its condensed run, with a hover line giving accuracy, GMACs and
    latency before and after. Returns the number of arrows drawn.

    `agg` is the frame the chart was drawn from (`budget.aggregate_over_seeds`), `table` the runs
    table it came from (`budget.runs_table`: has id, parent_id and kind). Points are located through
    agg's `run_ids`, so an arrow starts at the plotted (seed-mean) point of the parent's configuration.
    Pairs whose parent or child is not on the chart are skipped."""
    if agg is None or table is None or len(agg) == 0 or len(table) == 0 or "parent_id" not in table:
        return 0
    if cost not in agg or metric not in agg or "run_ids" not in agg:
        return 0
    where: dict[int, Any] = {}
    for _, row in agg.iterrows():
        for run_id in row["run_ids"] if isinstance(row["run_ids"], (list, tuple)) else []:
            where[int(run_id)] = row
    children = table[(table["kind"] == "condense") & table["parent_id"].notna()]
    log_x = fig.layout.xaxis.type == "log"
    drawn, legend_shown = 0, False
    for _, child in children.iterrows():
        parent_row, child_row = where.get(int(child["parent_id"])), where.get(int(child["id"]))
        if parent_row is None or child_row is None:
            continue
        x0, y0, x1, y1 = parent_row.get(cost), parent_row.get(metric), child_row.get(cost), child_row.get(metric)
        if not all(finite(v) for v in (x0, y0, x1, y1)):
            continue
        x0, x1, y0, y1 = float(x0), float(x1), 100 * float(y0), 100 * float(y1)
        fx = (lambda v: math.log10(v)) if log_x and x0 > 0 and x1 > 0 else (lambda v: v)
        fig.add_annotation(
            x=fx(x1),
            y=y1,
            ax=fx(x0),
            ay=y0,
            xref="x",
            yref="y",
            axref="x",
            ayref="y",
            text="",
            showarrow=True,
            arrowhead=3,
            arrowsize=1.3,
            arrowwidth=2.5,
            arrowcolor=FAMILY_COLORS["condensed"],
            standoff=8,
            startstandoff=8,
        )
        text = _pair_text(
            {
                "parent_id": int(child["parent_id"]),
                "run_id": int(child["id"]),
                "parent_label": parent_row.get("label"),
                "label": child_row.get("label"),
                "parent_accuracy": parent_row.get("accuracy_mean", parent_row.get("accuracy")),
                "accuracy": child_row.get("accuracy_mean", child_row.get("accuracy")),
                "parent_gmacs": parent_row.get("gmacs"),
                "gmacs": child_row.get("gmacs"),
                "parent_latency_ms_b1": parent_row.get("latency_ms_b1"),
                "latency_ms_b1": child_row.get("latency_ms_b1"),
            }
        )
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                name="condensation (parent → condensed)",
                line={"color": FAMILY_COLORS["condensed"], "width": 2, "dash": "dot"},
                legendgroup="condensation",
                showlegend=not legend_shown,
                hovertext=[text, text],
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )
        legend_shown = True
        drawn += 1
    return drawn


__all__ = [
    "add_condensation_arrows",
    "condensation_figure",
    "overlay_figure",
    "per_prompt_figure",
    "pull_per_block_figure",
    "pull_vs_count_figure",
]
