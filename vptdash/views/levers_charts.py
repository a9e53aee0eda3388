"""Figures of the cost levers: the burstiness that whitening removes, and which blocks a task can skip.

The numbers come from `engine.whitening` and `methods.skipping`; this module only draws them."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from vptdash.engine.whitening import Burstiness
from vptdash.methods.skipping import SkipSearchResult
from vptdash.views.style import apply_layout, family_color


def burstiness_figure(result: Burstiness | dict, title: str | None = None):
    """Histogram (log count axis) of the entries before and after whitening, with a Gaussian reference."""
    r = result.to_dict() if isinstance(result, Burstiness) else dict(result)
    edges = np.asarray(r["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    width = float(edges[1] - edges[0]) if len(edges) > 1 else 1.0
    fig = go.Figure()
    for key, name, colour in (
        ("before", f"before whitening (kurtosis {r['kurtosis_before']:.1f})", "#e4572e"),
        ("after", f"after whitening (kurtosis {r['kurtosis_after']:.1f})", "#17becf"),
    ):
        counts = np.asarray(r[key], dtype=float)
        fig.add_trace(
            go.Bar(
                x=centres,
                y=np.where(counts > 0, counts, np.nan),
                width=width,
                name=name,
                marker={"color": colour},
                opacity=0.6,
                hovertemplate="%{x:.1f} std: %{y:,.0f} entries<extra>" + key + "</extra>",
            )
        )
    gauss = np.asarray(r["gaussian"], dtype=float)
    fig.add_trace(
        go.Scatter(
            x=centres,
            y=np.where(gauss >= 0.5, gauss, np.nan),
            mode="lines",
            name="Gaussian (kurtosis 3)",
            line={"color": "#444", "dash": "dot", "width": 2},
        )
    )
    fig.update_layout(barmode="overlay")
    fig.update_yaxes(type="log", title="entries (log scale)")
    fig.update_xaxes(title="entry of W<sub>q</sub> W<sub>k</sub><sup>T</sup> X<sup>T</sup>, in standard deviations")
    return apply_layout(
        fig, title or f"Burstiness at block {r['block']}: {r['n_entries']:,} entries, {r['n_images']} images"
    )


def redundancy_figure(result: SkipSearchResult | dict, title: str | None = None):
    """Loss change per block when skipped alone; the chosen blocks in the "skip blocks" colour."""
    r = result.to_dict() if isinstance(result, SkipSearchResult) else dict(result)
    blocks = [b for b, v in enumerate(r["redundancy"]) if v is not None]
    values = [r["redundancy"][b] for b in blocks]
    chosen = set(r["skip"])
    fig = go.Figure(
        go.Bar(
            x=blocks,
            y=values,
            marker={"color": [family_color("skip blocks") if b in chosen else "#b0b0b0" for b in blocks]},
            hovertemplate="block %{x}: %{y:+.4f}<extra></extra>",
            name="loss change when skipped alone",
        )
    )
    fig.add_trace(
        go.Bar(
            x=[None],
            y=[None],
            marker={"color": family_color("skip blocks")},
            name=f"chosen by {r['method']} (k={r['k']})",
        )
    )
    fig.update_xaxes(title="block (0 = first)", tickmode="linear", dtick=1)
    fig.update_yaxes(title="validation loss change (nats)")
    return apply_layout(
        fig,
        title or f"Block redundancy: loss change when each block is skipped alone (base {r['base_loss']:.3f})",
        barmode="overlay",
    )


def trace_figure(result: SkipSearchResult | dict, title: str | None = None):
    """Greedy: loss after each removal. DAS: each block's skip weight sigmoid(s) over the steps."""
    r = result.to_dict() if isinstance(result, SkipSearchResult) else dict(result)
    fig = go.Figure()
    trace = r.get("trace") or []
    if r["method"] == "greedy":
        xs = [p["step"] for p in trace]
        ys = [p["loss"] for p in trace]
        text = ["none"] + [f"+ block {p['block']}" for p in trace[1:]]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers+text",
                text=text,
                textposition="top center",
                line={"color": family_color("skip blocks"), "width": 3},
                marker={"size": 11},
                name="greedy: loss after each removal",
            )
        )
        fig.update_xaxes(title="blocks skipped", dtick=1)
        fig.update_yaxes(title="validation loss (nats)")
        return apply_layout(
            fig, title or f"Greedy search: {r['evaluations']} subnetworks evaluated in {r['seconds']:.0f} s"
        )
    chosen = set(r["skip"])
    for slot, block in enumerate(r["candidates"]):
        fig.add_trace(
            go.Scatter(
                x=[p["step"] for p in trace],
                y=[p["weights"][slot] for p in trace],
                mode="lines",
                name=f"block {block}",
                line={
                    "width": 3 if block in chosen else 1.2,
                    "color": family_color("skip blocks") if block in chosen else None,
                },
                opacity=1.0 if block in chosen else 0.55,
            )
        )
    fig.update_xaxes(title="REINFORCE step")
    fig.update_yaxes(title="skip weight sigmoid(score)", range=[0, 1])
    return apply_layout(
        fig,
        title or f"DAS search: {r['steps']} steps, {r['evaluations']} subnetworks evaluated in {r['seconds']:.0f} s",
    )
