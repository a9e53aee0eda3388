"""Plotly figures for the continual-learning page: accuracy matrix, accuracy over tasks, summary.

Same conventions as `charts`: percent on the axes, large fonts, a title and a legend on every figure,
one colour per method everywhere. No Streamlit here.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from vptdash.methods.continual import METHOD_LABELS, METHODS
from vptdash.views.style import BASE_FONT_SIZE, apply_layout, placeholder

METHOD_SHORT = {"sequential": "Sequential", "nsp2": "NSP2", "joint": "Joint"}
METHOD_COLORS = {"sequential": "#e4572e", "nsp2": "#1f77b4", "joint": "#7f7f7f"}
TASK_COLORS = [
    "#1f77b4",
    "#e4572e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#ff7f0e",
    "#393b79",
]


def _ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def task_names(tasks: Sequence[Sequence[str]]) -> list[str]:
    """'T1: p=0, p=1/3' per task (class names joined)."""
    return [f"T{i + 1}: {', '.join(map(str, classes))}" for i, classes in enumerate(tasks)]


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, str(method))


def method_short(method: str) -> str:
    return METHOD_SHORT.get(method, str(method))


def accuracy_heatmaps(
    matrices: dict[str, Sequence[Sequence[float | None]] | None],
    tasks: Sequence[Sequence[str]],
    *,
    title: str = "Accuracy matrix (row: after task i, column: task j)",
    value_name: str = "Accuracy",
) -> go.Figure:
    """A[i][j] per method, side by side with one colour scale (0-100 %); empty cells were not measured."""
    methods = [m for m in METHODS if matrices.get(m)] + sorted(set(m for m in matrices if matrices[m]) - set(METHODS))
    if not methods:
        fig = go.Figure()
        placeholder(fig, "no finished run yet")
        return apply_layout(fig, title)
    fig = make_subplots(
        rows=1, cols=len(methods), horizontal_spacing=0.06, subplot_titles=[method_short(m) for m in methods]
    )
    names = task_names(tasks)
    size = max(len(matrices[m]) for m in methods)
    for col, method in enumerate(methods, start=1):
        matrix = matrices[method]
        n = len(matrix)
        z = [[100 * v if _ok(v) else None for v in row] for row in matrix]
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=[f"T{j + 1}" for j in range(n)],
                y=[f"after T{i + 1}" for i in range(n)],
                text=[[f"{v:.0f}" if v is not None else "" for v in row] for row in z],
                texttemplate="%{text}",
                textfont={"size": BASE_FONT_SIZE if n <= 5 else BASE_FONT_SIZE - 6},
                coloraxis="coloraxis",
                customdata=[[names[j] if j < len(names) else f"T{j + 1}" for j in range(n)] for _ in range(n)],
                hovertemplate=f"{method_label(method)}<br>%{{y}}, tested on %{{customdata}}<br>{value_name} "
                "%{z:.1f}%<extra></extra>",
                hoverongaps=False,
                name=method_label(method),
            ),
            row=1,
            col=col,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=col, showticklabels=col == 1)
        fig.update_xaxes(title_text="tested on", row=1, col=col)
    apply_layout(fig, title, height=220 + 55 * max(size, 2))
    fig.update_layout(
        showlegend=False,
        coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": 100, "colorbar": {"title": {"text": "%"}}},
    )
    return fig


def accuracy_lines(
    matrices: dict[str, Sequence[Sequence[float | None]]],
    tasks: Sequence[Sequence[str]],
    *,
    title: str = "Accuracy on each task as later tasks arrive",
    value_name: str = "Test accuracy (%)",
) -> go.Figure:
    """One panel per method; a line per task j over 'after task i' (i >= j): forgetting is a falling line.
    Joint training has only the last row: its tasks are single points."""
    methods = [m for m in METHODS if matrices.get(m)] + sorted(set(m for m in matrices if matrices[m]) - set(METHODS))
    if not methods:
        fig = go.Figure()
        placeholder(fig, "no finished run yet")
        return apply_layout(fig, title)
    fig = make_subplots(
        rows=1,
        cols=len(methods),
        shared_yaxes=True,
        horizontal_spacing=0.04,
        subplot_titles=[method_short(m) for m in methods],
    )
    names = task_names(tasks)
    for col, method in enumerate(methods, start=1):
        matrix = matrices[method]
        size = len(matrix)
        for j in range(size):
            xs = [i + 1 for i in range(j, size) if _ok(matrix[i][j])]
            ys = [100 * matrix[i - 1][j] for i in xs]
            if not xs:
                continue
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines+markers",
                    name=names[j] if j < len(names) else f"T{j + 1}",
                    legendgroup=f"T{j + 1}",
                    showlegend=col == 1 or method == methods[0],
                    line={"color": TASK_COLORS[j % len(TASK_COLORS)], "width": 3},
                    marker={"size": 11},
                    hovertemplate=f"{method_label(method)}<br>T{j + 1} after T%{{x}}: %{{y:.1f}}%<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(
            title_text="after training task",
            tickmode="linear",
            tick0=1,
            dtick=1,
            range=[0.7, size + 0.3],
            row=1,
            col=col,
        )
    fig.update_yaxes(title_text=value_name, range=[0, 102], row=1, col=1)
    return apply_layout(fig, title, height=460)


def summary_bars(
    summary: Sequence[dict[str, Any]],
    *,
    title: str = "Average accuracy and forgetting after the last task",
    accuracy_key: str = "avg_accuracy",
    forgetting_key: str = "forgetting",
) -> go.Figure:
    """Grouped bars: mean over seeds with the sample std as error bars, one colour per method."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=["Avg accuracy (↑)", "Forgetting (↓)"])
    if not summary:
        placeholder(fig, "no finished run yet")
        return apply_layout(fig, title)
    for col, key in ((1, accuracy_key), (2, forgetting_key)):
        for row in summary:
            mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
            if not _ok(mean):
                continue
            fig.add_trace(
                go.Bar(
                    x=[method_label(row["method"])],
                    y=[100 * mean],
                    name=method_label(row["method"]),
                    marker_color=METHOD_COLORS.get(row["method"], "#bcbd22"),
                    legendgroup=row["method"],
                    showlegend=col == 1,
                    error_y={"type": "data", "array": [100 * std if _ok(std) else 0], "visible": True},
                    hovertemplate=f"{method_label(row['method'])}: %{{y:.1f}} ± {100 * std if _ok(std) else 0:.1f} "
                    f"points ({row.get('seeds', '?')} seeds)<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_yaxes(title_text="%", row=1, col=1)
    fig.update_xaxes(showticklabels=False)
    return apply_layout(fig, title, height=440, barmode="group")


DIAGNOSTICS = {
    # key in `continual.summarize_runs` -> what it says
    "learning_accuracy": "Right after learning (class-incr.)",
    "avg_accuracy": "After the last task (class-incr.)",
    "avg_accuracy_task_il": "After the last task (task given)",
    "ncm_accuracy_initial": "Nearest class mean, untrained prompts",
    "ncm_accuracy": "Nearest class mean, after the last task",
    "avg_ncm_task_il_untrained": "Nearest class mean, task given, untrained prompts",
    "ncm_learning_task_il": "Nearest class mean, task given, right after learning",
    "avg_ncm_task_il": "Nearest class mean, task given, after the last task",
}


def diagnostics_bars(summary: Sequence[dict[str, Any]], *, title: str = "Who forgot: prompts or heads?") -> go.Figure:
    """Grouped bars per diagnostic, one colour per method, mean ± sample std over seeds.

    Reading: a drop from 'right after learning' to 'after the last task' that the task-given accuracy does
    not show is confusion between heads; a drop of the nearest-class-mean accuracy (no head involved) is
    the features themselves getting worse for some classes."""
    fig = go.Figure()
    labels = list(DIAGNOSTICS.values())
    if not summary:
        placeholder(fig, "no finished run yet")
        return apply_layout(fig, title)
    for row in summary:
        means = [row.get(f"{key}_mean") for key in DIAGNOSTICS]
        stds = [row.get(f"{key}_std") for key in DIAGNOSTICS]
        fig.add_trace(
            go.Bar(
                x=labels,
                y=[100 * m if _ok(m) else None for m in means],
                name=method_label(row["method"]),
                marker_color=METHOD_COLORS.get(row["method"], "#bcbd22"),
                error_y={"type": "data", "array": [100 * s if _ok(s) else 0 for s in stds], "visible": True},
                hovertemplate="%{x}: %{y:.1f}%<extra>"
                + method_label(row["method"])
                + f" ({row.get('seeds', '?')} seeds)</extra>",
            )
        )
    fig.update_yaxes(title_text="Accuracy (%)", range=[0, 102])
    return apply_layout(fig, title, height=460, barmode="group")
