"""What one report or recommendation is about: one data set and one setup.

Accuracies on different data sets, or on the same data at another backbone, resolution or number of
shots, are not comparable: a report that pooled them would recommend a budget from one data set and
draw it against another's majority-class line. A setup is the data set, its cell type, the backbone,
the image resolution and the shots per class; the rows of a report all share one.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from vptdash.views import budget
from vptdash.views.wording import dataset_label

# The keys one report's runs share: the data (as `budget.comparable_runs` matches it) and the setup.
SCOPE_KEYS = ("dataset", "cell_type", *budget.SETUP_MATCH_KEYS)

Setup = tuple  # values of SCOPE_KEYS, in that order


class MixedSetupsError(ValueError):
    """Runs from more than one setup were given where one is required."""


def setup_of(run: dict) -> Setup:
    config = run.get("config") or {}
    return tuple(config.get(key) for key in SCOPE_KEYS)


def as_dict(setup: Setup) -> dict[str, Any]:
    return dict(zip(SCOPE_KEYS, setup))


def describe(setup: Setup) -> str:
    """e.g. "ELPV solar cells, 2 classes · dinov2_s14 · 112 px · 16 shots per class"."""
    values = as_dict(setup)
    dataset = values["dataset"]
    data = dataset_label(dataset, values["cell_type"]) if isinstance(dataset, str) else "unknown data set"
    shots = values["shots"]
    parts = [
        data,
        str(values["backbone"] or "unknown backbone"),
        f"{values['resolution']} px" if values["resolution"] is not None else "unknown resolution",
        "all training images" if shots is None else f"{shots} shots per class",
    ]
    return " · ".join(parts)


def setups_in(rows: list[dict]) -> list[Setup]:
    """The setups among `rows`, the most frequent first (ties: first seen)."""
    counts = Counter(setup_of(run) for run in rows)
    return [setup for setup, _ in counts.most_common()]


def require_one_setup(rows: list[dict]) -> Setup | None:
    """The one setup all `rows` share (None for no rows); MixedSetupsError naming them otherwise."""
    setups = setups_in(rows)
    if len(setups) > 1:
        named = "; ".join(describe(setup) for setup in setups[:4]) + ("; ..." if len(setups) > 4 else "")
        raise MixedSetupsError(
            f"A report covers one data set and one setup; these {len(rows)} runs come from "
            f"{len(setups)}: {named}. Choose one."
        )
    return setups[0] if setups else None


def default_setup(setups: list[Setup], active: dict) -> Setup | None:
    """The setup to report on when the user has not chosen: the active one when it is among
    `setups`, else the one with the most runs (the first of `setups_in`)."""
    for setup in setups:
        if all(setup[i] == active.get(key) for i, key in enumerate(SCOPE_KEYS)):
            return setup
    return setups[0] if setups else None


def runs_of_setup(rows: list[dict], setup: Setup) -> list[dict]:
    """The rows of `setup`, chosen with the same rule the charts use (`budget.comparable_runs`)."""
    kept, _ = budget.comparable_runs(rows, as_dict(setup))
    return kept
