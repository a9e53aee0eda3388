"""The look every figure shares, so a family has one colour on every page and in the report, and
titles and fonts stay readable on a projector."""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go

FAMILY_COLORS: dict[str, str] = {
    "linear probe": "#7f7f7f",  # grey
    "shallow": "#1f77b4",  # blue
    "deep": "#e4572e",  # red-orange
    "custom blocks": "#2ca02c",  # green
    "full fine-tune": "#9467bd",  # purple
    "bilinear": "#17becf",  # teal
    "skip blocks": "#8c564b",  # brown
    "condensed": "#e377c2",  # pink
    # vision-language prompts on CLIP (methods.vlprompts): one hue family, darker = more learned
    "zero-shot CLIP": "#f2b701",  # amber
    "CoOp": "#d95f02",  # orange
    "MaPLe": "#a50f15",  # crimson
}
_EXTRA_COLORS = ["#bcbd22", "#ff7f0e", "#393b79", "#637939", "#843c39", "#7b4173"]

BASE_FONT_SIZE = 18
TEMPLATE = "plotly_white"


def family_color(family: str) -> str:
    """The family's colour; unknown families get a stable colour from a spare palette."""
    if family in FAMILY_COLORS:
        return FAMILY_COLORS[family]
    return _EXTRA_COLORS[sum(map(ord, str(family))) % len(_EXTRA_COLORS)]


def apply_layout(fig: go.Figure, title: str, **extra) -> go.Figure:
    """Title, fonts, template and margins shared by every figure; `extra` goes to `update_layout`."""
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title, "font": {"size": BASE_FONT_SIZE + 6}},
        font={"size": BASE_FONT_SIZE},
        legend={"font": {"size": BASE_FONT_SIZE - 2}},
        hoverlabel={"font": {"size": BASE_FONT_SIZE - 2}},
        showlegend=True,
        margin={"l": 80, "r": 40, "t": 80, "b": 70},
        **extra,
    )
    return fig


def placeholder(fig: go.Figure, text: str) -> None:
    """A grey note in the middle of an empty figure, saying why it is empty."""
    fig.add_annotation(
        text=text,
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
        showarrow=False,
        font={"size": BASE_FONT_SIZE + 2, "color": "#888"},
    )


def finite(value: Any) -> bool:
    """A number that can be drawn: not None, not NaN or infinite, convertible to float."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
