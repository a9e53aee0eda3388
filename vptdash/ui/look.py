"""How the dashboard looks: a little CSS for projectors and plotly figures shown as they were made."""

from __future__ import annotations

import streamlit as st

_CSS = """
<style>
[data-testid="stMainBlockContainer"] { padding-top: 2.2rem; padding-left: 2.5rem; padding-right: 2.5rem;
                                        max-width: 100%; }
[data-testid="stMetricValue"] { font-size: 2rem; }
</style>
"""


def style() -> None:
    """A little CSS: less empty space around the page, so charts get the width on a projector."""
    st.html(_CSS)


def show_plotly(fig, key: str | None = None) -> None:
    """Plotly as the figure was made (theme=None: Streamlit's theme would replace the large projector
    fonts and the family colours' template), no logo, PNG export at 2x."""
    st.plotly_chart(
        fig, key=key, theme=None, config={"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}
    )
