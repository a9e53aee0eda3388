"""Numbers and runs in words, the same on every page, in the CLI and in the report: durations,
counts, percentages, what a stored job is, how far a running one has got. No Streamlit here."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from vptdash.engine import data
from vptdash.engine.train import RunConfig
from vptdash.runs import uploads

_MARKDOWN_SPECIALS = set("\\`*_{}[]<>()#+-.!|~$:")


def plain_markdown(text: Any) -> str:
    """`text` escaped so that Streamlit's Markdown shows it as typed (labels, names and messages come
    from users: no links, emphasis, HTML or LaTeX)."""
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIALS else ch for ch in str(text))


def upload_name(spec: str) -> str | None:
    """The name a user gave an uploaded image set, or None when `spec` is not one of the uploads."""
    try:
        for info in uploads.list_uploads():
            if uploads.upload_spec(info.slug) == spec:
                return info.name
    except Exception:  # noqa: BLE001 - an unreadable uploads folder only costs the friendly name
        return None
    return None


def dataset_label(spec: str, cell_type: str | None = None) -> str:
    if spec == "elpv-binary":
        text = "ELPV binary (functional / defective)"
    elif spec == "elpv":
        text = "ELPV 4 classes (defect probability)"
    else:
        text = upload_name(spec) or Path(str(spec)).name or str(spec)
    if cell_type:
        text += f", {cell_type} cells"
    return text


def is_elpv(spec: str) -> bool:
    return spec in data.BUILTIN_DATASETS


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_count(value: float | None) -> str:
    """21_700_000 -> '21.7 M', 4610 -> '4.6 k'."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{unit}"
    return f"{value:.0f}"


def fmt_pct(value: float | None, digits: int = 1) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{100 * value:.{digits}f}%"


def first_line(text: Any, limit: int = 300) -> str:
    """The first line of an error message (tracebacks follow it), never failing on None or ""."""
    lines = str(text or "").strip().splitlines()
    return lines[0][:limit] if lines else "no error message recorded"


def number(value: Any) -> float | None:
    """A finite float or None."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def signed_delta(value: Any, reference: Any, pattern: str, scale: float = 1.0) -> str | None:
    """`value - reference` (times `scale`) through `pattern` ("{:+.1f} pts"), or None when either is
    missing or the difference prints as zero ("+0.0 pts"): a metric then shows no arrow."""
    value, reference = number(value), number(reference)
    if value is None or reference is None:
        return None
    text = pattern.format((value - reference) * scale)
    return None if text.lstrip("+-").strip("0.,% ptsm") == "" else text


def run_label(run: dict) -> str:
    """What a stored job is, in words: its run configuration's label, or for the job kinds that are not
    one trained model, what they do (a continual experiment, a search for blocks to skip)."""
    config = run.get("config") or {}
    try:
        kind = run.get("kind")
        if kind == "continual":
            return (
                f"continual {config.get('method', '?')}: {config.get('tasks', '?')} tasks, "
                f"{config.get('num_prompts', '?')} prompts ({config.get('placement', '?')})"
            )
        label = RunConfig.from_dict(config).label()
        if kind == "skip-search":
            return (
                f"skip search ({config.get('skip_search_method') or 'greedy'}, "
                f"{config.get('skip_search_k')} blocks) for {label}"
            )
        return label
    except Exception:  # noqa: BLE001 - a label must never break a page
        return "run"


def run_family(config: dict) -> str:
    try:
        return RunConfig.from_dict(config or {}).family()
    except Exception:  # noqa: BLE001
        return "unknown"


def progress_of(run: dict, event: dict | None, now: float | None = None) -> tuple[float, str]:
    """(fraction done 0..1, one line of status text) for a running run's latest event."""
    now = time.time() if now is None else now
    if not event:
        return 0.0, "starting..."
    phase = event.get("phase")
    step, total = number(event.get("step")), number(event.get("total_steps"))
    if phase == "setup":
        return 0.0, event.get("message") or "setting up"
    if phase in ("test", "cost"):
        return 1.0, event.get("message") or "evaluating on held-out images"
    fraction = min(1.0, step / total) if step and total else 0.0
    if fraction >= 1.0 and phase == "val" and event.get("epoch") == (run.get("config") or {}).get("epochs"):
        return 1.0, "finishing: test set, compute and latency"
    eta = number(event.get("eta_s"))
    started, elapsed = number(run.get("started_at")), number(event.get("elapsed_s"))
    if eta is not None and started is not None and elapsed is not None:
        eta = max(0.0, eta - max(0.0, now - (started + elapsed)))  # time since the event was written
    epoch = event.get("epoch")
    config_epochs = (run.get("config") or {}).get("epochs")
    text = f"epoch {epoch}/{config_epochs}" if epoch and config_epochs else "training"
    if eta is not None:
        text += f" · ETA {fmt_duration(eta)}"
    return fraction, text
