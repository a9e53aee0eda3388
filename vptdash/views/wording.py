"""Numbers and runs in words, the same on every page, in the CLI and in the report: durations,
counts, percentages, what a stored job is, how far a running one has got. No Streamlit here."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from vptdash.engine import data
from vptdash.engine.train import RunConfig
from vptdash.methods import vlprompts
from vptdash.runs import eta, uploads

# Every ASCII punctuation character may be backslash-escaped in CommonMark, and each one starts some
# construct somewhere: links and images ([ ] ( ) !), emphasis, code, headings, tables, HTML tags and
# entities (< > &), Streamlit's :material/icon: and :red[colour] directives (:), LaTeX ($).
_MD_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def md_escape(text: object) -> str:
    """`text` as literal characters inside Streamlit Markdown (st.markdown, captions, alerts,
    headers, widget labels): no link, image, HTML, emphasis or directive in it is interpreted, and a
    line break cannot start a heading or a list. Use it for every string a user supplied (upload and
    class names, file names, error messages that may quote them)."""
    flat = _LINE_BREAKS.sub(" ", str(text))
    return _MD_SPECIAL.sub(r"\\\1", flat)


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


def dataset_md(spec: str, cell_type: str | None = None) -> str:
    """`dataset_label` ready for Markdown: an upload's name is the user's text, shown literally."""
    return md_escape(dataset_label(spec, cell_type))


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
        if kind == vlprompts.KIND:
            return vlprompts.family_and_label(config)[1]
        label = RunConfig.from_dict(config).label()
        if kind == "skip-search":
            return (
                f"skip search ({config.get('skip_search_method') or 'greedy'}, "
                f"{config.get('skip_search_k')} blocks) for {label}"
            )
        return label
    except Exception:  # noqa: BLE001 - a label must never break a page
        return "run"


def engine_line(metrics: dict, timings: dict) -> str | None:
    """How the run computed, and why: its precision (measured or set) and whether its training step was
    compiled, from what the engine stored. None when neither was recorded (older runs)."""
    metrics, timings = metrics or {}, timings or {}
    parts = []
    if metrics.get("precision"):
        reason = metrics.get("precision_reason")
        parts.append(f"Trained in {metrics['precision']}" + (f" ({reason})" if reason else ""))
    if timings.get("compile_reason"):
        text = str(timings["compile_reason"])
        seconds = number(timings.get("compile_first_step_s"))
        if timings.get("compiled") and seconds is not None:
            text += f"; compiling and the first step took {seconds:.1f} s"
        parts.append("Training step " + text)
    return ". ".join(parts) + "." if parts else None


def clip_summary(metrics: dict, costs: dict) -> str:
    """A CLIP prompt run's figures beyond the card: base / novel accuracy, and the text tower's cost,
    which is paid once per class set, not per image."""
    metrics, costs = metrics or {}, costs or {}
    parts = []
    if metrics.get("harmonic_mean") is not None:
        parts.append(
            f"Base-to-novel: base {fmt_pct(metrics.get('base_accuracy'))}, "
            f"novel {fmt_pct(metrics.get('novel_accuracy'))}, "
            f"harmonic mean {fmt_pct(metrics.get('harmonic_mean'))} (the accuracy shown)."
        )
    text = number(costs.get("text_gmacs_per_class_set"))
    if text is not None:
        images = int(number(costs.get("text_amortised_images")) or 0)
        amortised = number(costs.get("text_gmacs_per_image_amortised"))
        parts.append(
            f"Text tower: {text:.3g} GMACs once for the {costs.get('text_classes', '?')} classes"
            + (f" ({amortised:.3g} per image over {images:,} images)" if amortised is not None and images else "")
            + "; GMACs per image count the image tower with its prompts only."
        )
    return " ".join(parts)


def run_family(config: dict) -> str:
    if (config or {}).get("tuning") == vlprompts.KIND:  # CLIP prompt runs store their own configuration
        return vlprompts.family_and_label(config)[0]
    try:
        return RunConfig.from_dict(config or {}).family()
    except Exception:  # noqa: BLE001
        return "unknown"


def progress_of(
    run: dict, event: dict | None, now: float | None = None, history: eta.PhaseHistory | None = None
) -> tuple[float, str]:
    """(fraction done 0..1, one line of status text) for a running run's latest event.

    For a training run the ETA counts every phase left (`runs.eta.remaining`: training, held-out
    evaluation, costs), with `history` (`runs.eta.phase_history`) for the phases this run has not
    measured yet; while one of them is unknown the line says the ETA is training's and evaluation follows."""
    now = time.time() if now is None else now
    if not event:
        return 0.0, "starting..."
    phase = event.get("phase")
    step, total = number(event.get("step")), number(event.get("total_steps"))
    training = run.get("kind", "train") in eta.TRAINING_KINDS
    left = eta.remaining(run, event, history, now) if training else None
    full = f" · ETA {fmt_duration(left['total'])}" if left and left["total"] is not None else ""
    if phase == "setup":
        return 0.0, event.get("message") or "setting up"
    if phase in ("test", "cost"):
        return 1.0, (event.get("message") or "evaluating on held-out images") + full
    fraction = min(1.0, step / total) if step and total else 0.0
    if phase == "val" and event.get("epoch") == (run.get("config") or {}).get("epochs"):
        return 1.0, "finishing: test set, compute and latency" + full
    epoch = event.get("epoch")
    config_epochs = (run.get("config") or {}).get("epochs")
    text = f"epoch {epoch}/{config_epochs}" if epoch and config_epochs else "training"
    if full:
        return fraction, text + full
    remaining = number(event.get("eta_s"))
    started, elapsed = number(run.get("started_at")), number(event.get("elapsed_s"))
    if remaining is not None and started is not None and elapsed is not None:
        remaining = max(0.0, remaining - max(0.0, now - (started + elapsed)))  # time since the event was written
    if remaining is not None:
        text += f" · ETA {fmt_duration(remaining)}" + (" + evaluation" if training else "")
    return fraction, text
