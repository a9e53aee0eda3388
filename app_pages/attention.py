"""Attention: where self-attention goes once prompts are in the sequence (prompt pull), attention maps
over the image, and prompt condensation (keep the important prompts, fine-tune, compare)."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import streamlit as st

from vptdash.engine.backbones import BackboneError
from vptdash.engine.data import DatasetError
from vptdash.engine.prompts import PromptConfigError, parse_placement
from vptdash.engine.train import ConfigError, RunConfig
from vptdash.methods import attention, condense, vlprompts
from vptdash.runs.store import RunStore
from vptdash.ui import jobqueue, live, look, resources, session
from vptdash.views import attention_charts, wording
from vptdash.views.budget import dataset_name

PULL_IMAGES = attention.PULL_SAMPLE_IMAGES  # test images behind each pull number (the first ones of the test split)
MAX_PULL_RUNS = 24

store = resources.get_store()
setup = session.active_setup()
st.title("Attention and prompt condensation")
st.caption(
    "Do prompts change where the model looks, and how many of them are really needed? "
    "Attention is read from the frozen backbone block by block (exact probabilities, recomputed from "
    "each block's own weights; training and latency keep the fused kernel)."
)


# ------------------------------------------------------------------------------------ cached work
@st.cache_resource(show_spinner="Loading the run's prompts...", max_entries=4)
def trained_run(store_path: str, run_id: int, finished_at: float) -> attention.TrainedRun:
    return attention.load_trained_model(RunStore(store_path), run_id)


@st.cache_resource(show_spinner="Loading test images...", max_entries=4)
def test_images(config_json: tuple) -> attention.RunImages:
    return attention.run_images(RunConfig.from_dict(dict(config_json)), "test")


@st.cache_resource(show_spinner="Reading attention...", max_entries=16)
def image_maps(store_path: str, run_id: int, finished_at: float, image_key: str, _image) -> attention.AttentionMaps:
    run = trained_run(store_path, run_id, finished_at)
    return attention.extract_attention(run.model, attention.normalize_for(run.model, _image))


@st.cache_data(show_spinner="Measuring prompt pull...", max_entries=64)
def pull_of(store_path: str, run_id: int, finished_at: float) -> dict:
    return attention.run_pull(RunStore(store_path), run_id, n_images=PULL_IMAGES)


def _default(key: str, value) -> None:
    """A widget's starting value, kept in session state (no `value=` next to `key=`: no warning)."""
    st.session_state.setdefault(key, value)


def split_key(config: RunConfig) -> tuple:
    """The test split depends on the data and split settings only (not on shots or seed)."""
    values = {
        k: getattr(config, k)
        for k in ("dataset", "cell_type", "resolution", "test_fraction", "val_fraction", "split_seed")
    }
    return tuple(sorted({**values, "shots": None}.items()))


# ------------------------------------------------------------------------------------ runs
# ------------------------------------------------------------------------------------ CLIP image tower
clip_runs = store.list_runs(status="done", kind=vlprompts.KIND)
if clip_runs:
    with st.expander("CLIP image tower: where the class token looks (zero-shot, CoOp, MaPLe runs)"):
        clip_by_id = {r["id"]: r for r in clip_runs}
        clip_id = st.selectbox(
            "CLIP run",
            list(clip_by_id),
            format_func=lambda i: f"#{i} · {wording.run_label(clip_by_id[i])}",
            key="attention_clip_run",
        )
        try:
            clip_model, clip_config, clip_words = vlprompts.trained_model(store, clip_id)
            clip_images = attention.run_images(clip_config, "test", limit=32)
        except (ConfigError, DatasetError, BackboneError, KeyError) as exc:
            st.error(f"This run cannot be inspected here: {wording.md_escape(exc)}")
        else:
            c = st.columns(2)
            clip_image = c[0].slider(
                "Test image", 0, max(len(clip_images.labels) - 1, 0), 0, key="attention_clip_image"
            )
            clip_layer = c[1].slider(
                "Layer",
                0,
                clip_model.bundle.vision_layers - 1,
                clip_model.bundle.vision_layers - 1,
                key="attention_clip_layer",
            )
            maps = vlprompts.image_attention(clip_model, clip_images.images[clip_image : clip_image + 1], clip_words)
            heat = attention.cls_patch_map(maps, clip_layer)[0]
            pull = attention.prompt_pull(maps)[clip_layer]
            look.show_plotly(
                attention_charts.overlay_figure(
                    clip_images.images[clip_image],
                    heat,
                    title=f"Class-token attention, layer {clip_layer}",
                    caption=f"true class: {clip_images.class_names[int(clip_images.labels[clip_image])]}",
                ),
                key="attention_clip_overlay",
            )
            st.caption(
                f"Attention mass on the {pull['prompts']} vision prompts at this layer: "
                f"{wording.fmt_pct(pull['cls_pull'])} from the class token (uniform share "
                f"{wording.fmt_pct(pull['uniform'])}). Text prompts never enter the image tower."
            )

# CLIP prompt runs (kind "vlprompt") are inspected above: the views below read a prompted ViT
runs = [
    r
    for r in store.list_runs(status="done")
    if r.get("artifact_path") and (r["config"] or {}).get("tuning") not in ("full", vlprompts.KIND)
]
if not runs:
    st.info(
        "No run with stored prompts yet: train one on the Train page. (Precomputed reference points keep "
        "no prompts, so they cannot be inspected here.)"
    )
    st.stop()
by_id = {r["id"]: r for r in runs}
path = str(store.path)


def run_text(run_id: int | None) -> str:
    if run_id is None:
        return "none"
    row = by_id[run_id]
    accuracy = (row.get("metrics") or {}).get("accuracy")
    return f"#{run_id} · {wording.run_label(row)} · {dataset_name(row['config'].get('dataset'))}" + (
        f" · {100 * accuracy:.1f}%" if accuracy is not None else ""
    )


active_runs = [r["id"] for r in runs if r["config"].get("dataset") == setup["dataset"]] or [r["id"] for r in runs]
c = st.columns(2)
run_a = c[0].selectbox(
    "Run",
    active_runs,
    format_func=run_text,
    key="att_run_a",
    help="Finished runs with stored prompts, newest first; runs on the active data set first.",
)
row_a = by_id[run_a]
config_a = RunConfig.from_dict(row_a["config"])
same_data = [
    r["id"] for r in runs if r["id"] != run_a and split_key(RunConfig.from_dict(r["config"])) == split_key(config_a)
]
run_b = c[1].selectbox(
    "Compare with (optional)",
    [None, *same_data],
    format_func=run_text,
    key="att_run_b",
    help="Another run on the same data and resolution, e.g. 5 vs 100 prompts.",
)
chosen = [run_a] + ([run_b] if run_b is not None else [])

# ------------------------------------------------------------------------------------ image
c = st.columns([2, 3])
_default("att_source", "Test split")
source = c[0].segmented_control("Image", ["Test split", "Upload"], key="att_source", required=True)
image, image_key, caption = None, None, ""
try:
    images = test_images(split_key(config_a))
except (DatasetError, OSError) as exc:
    images = None
    st.warning(f"The run's data set cannot be loaded here: {wording.md_escape(exc)}")
if source == "Test split" and images is not None:
    index = c[1].number_input(
        f"Test image (0 to {len(images.labels) - 1})", 0, len(images.labels) - 1, 0, 1, key="att_image_index"
    )
    image = images.images[int(index) : int(index) + 1]
    image_key = f"test:{split_key(config_a)}:{int(index)}"
    # html.escape: the caption becomes a plotly title, and plotly reads tags such as <a href> in titles
    caption = html.escape(f"{images.files[int(index)]} · class {images.class_names[int(images.labels[int(index)])]}")
elif source == "Upload":
    upload = c[1].file_uploader(
        "An image (png, jpg, tif...)", type=["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"], key="att_upload"
    )
    if upload is not None:
        try:
            image = attention.image_from_bytes(upload.getvalue(), config_a.resolution)
            image_key, caption = f"upload:{upload.file_id}", html.escape(upload.name)
        except DatasetError as exc:
            st.error(f"Cannot use this image: {wording.md_escape(exc)}")
if image is None:
    st.info("Pick a test image or upload one.")

# ------------------------------------------------------------------------------------ maps
if image is not None:
    maps = {}
    for run_id in chosen:
        row = by_id[run_id]
        if RunConfig.from_dict(row["config"]).resolution != config_a.resolution:
            st.warning(f"Run #{run_id} uses another resolution: not compared.")
            continue
        try:
            maps[run_id] = image_maps(path, run_id, row["finished_at"], image_key, image)
        except (attention.AttentionError, KeyError, ConfigError) as exc:
            st.error(f"Run #{run_id}: {wording.md_escape(exc)}")
    if maps:
        first = next(iter(maps.values()))
        c = st.columns([3, 2, 2])
        _default("att_view", "Per block")
        view = c[0].segmented_control(
            "Map",
            ["Per block", "Rollout"],
            key="att_view",
            required=True,
            help="Per block: where the CLS token looks in that block. Rollout: attention "
            "multiplied through all blocks (Abnar & Zuidema 2020).",
        )
        block = c[1].slider("Block", 0, first.depth - 1, first.depth - 1, key="att_block", disabled=view == "Rollout")
        heads = ["mean"] + list(range(first.num_heads))
        head = c[2].selectbox(
            "Head",
            heads,
            key="att_head",
            disabled=view == "Rollout",
            format_func=lambda h: "mean of heads" if h == "mean" else f"head {h}",
        )
        columns = st.columns(len(maps))
        for column, (run_id, run_maps) in zip(columns, maps.items()):
            with column:
                label = wording.run_label(by_id[run_id])
                if view == "Rollout":
                    reason = attention.rollout_unavailable_reason(run_maps.placement, run_maps.depth)
                    if reason:
                        st.info(f"**#{run_id} {label}:** {reason}")
                        continue
                    heat = attention.attention_rollout(run_maps)[0]
                    title = f"#{run_id} {label}: rollout"
                else:
                    if run_maps.blocks[block].probs is None:
                        st.info(f"Block {block} is skipped in run #{run_id}: it computes no attention.")
                        continue
                    heat = attention.cls_patch_map(run_maps, block, None if head == "mean" else int(head))[0]
                    p = run_maps.blocks[block].num_prompts
                    title = f"#{run_id} {label}: block {block}, {'mean of heads' if head == 'mean' else f'head {head}'}"
                    caption_text = (
                        f"{caption} · CLS→patches {100 * float(heat.sum()):.0f}% of the mass, "
                        f"→prompts {100 * attention.prompt_pull(run_maps)[block]['cls_pull']:.0f}% ({p} prompts)"
                    )
                fig = attention_charts.overlay_figure(
                    image[0], heat, title=title, caption=caption if view == "Rollout" else caption_text
                )
                look.show_plotly(fig, key=f"att_overlay_{run_id}")

# ------------------------------------------------------------------------------------ prompt pull
st.subheader("Prompt pull")
st.caption(
    f"Share of attention mass on prompt keys, averaged over heads and the first {PULL_IMAGES} test images. "
    "Two baselines: the same run's prompts **before training** (dotted: same blocks, same counts, same "
    "seeded init, same images) and the uniform share p/T (dashed). The frozen backbone already sends far "
    "more than p/T to untrained prompts, so only the gap to the dotted line is what training did. "
    "*Value-weighted share* counts each key's attention times the norm of what it adds to the output "
    "(‖W_O v‖), so a prompt that draws attention but carries little counts little."
)
series = {}
baselines = {}
influence = {}
per_prompt = {}
for run_id in chosen:
    try:
        result = pull_of(path, run_id, by_id[run_id]["finished_at"])
    except (attention.AttentionError, DatasetError, KeyError, ConfigError) as exc:
        st.error(f"Run #{run_id}: {wording.md_escape(exc)}")
        continue
    label = f"#{run_id} {wording.run_label(by_id[run_id])}"
    series[label] = result["blocks"]
    baselines[label] = result.get("blocks_untrained") or []
    influence[label] = result
c = st.columns([2, 2])
_default("att_query", "cls_pull")
query = c[0].segmented_control(
    "Measure",
    list(attention_charts.PULL_MEASURES),
    key="att_query",
    required=True,
    format_func={
        "cls_pull": "CLS attention",
        "patch_pull": "patch attention",
        "cls_value_share": "CLS value-weighted",
        "patch_value_share": "patch value-weighted",
    }.get,
)
look.show_plotly(
    attention_charts.pull_per_block_figure(series, query=query or "cls_pull", baselines=baselines),
    key="att_pull_blocks",
)
if influence:
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "run": label,
                    "CLS pull": r.get("cls_pull"),
                    "untrained": r.get("cls_pull_untrained"),
                    "uniform p/T": r.get("uniform"),
                    "value-weighted": r.get("cls_value_share"),
                    "value-weighted, untrained": r.get("cls_value_share_untrained"),
                    "accuracy": r.get("accuracy_sample"),
                    "prompts removed": r.get("accuracy_without_prompts"),
                    "untrained prompts": r.get("accuracy_untrained_prompts"),
                    "predictions changed": r.get("prediction_change"),
                }
                for label, r in influence.items()
            ]
        ),
        hide_index=True,
        width="stretch",
        column_config={
            k: st.column_config.NumberColumn(format="percent")
            for k in (
                "CLS pull",
                "untrained",
                "uniform p/T",
                "value-weighted",
                "value-weighted, untrained",
                "accuracy",
                "prompts removed",
                "untrained prompts",
                "predictions changed",
            )
        },
    )
    st.caption(
        f"Influence on these {PULL_IMAGES} images (the same head throughout): accuracy with the trained prompts, "
        "with every prompt removed from the sequence, and with the untrained prompts; *predictions changed*: "
        f"share whose class changes when the prompts are removed. {PULL_IMAGES} images: one image moves an "
        f"accuracy by {100 / PULL_IMAGES:.1f} points, so read small differences as noise."
    )

if image is not None and maps:
    with st.expander("Which prompts attract attention (this image)", icon="◻️"):
        for run_id, run_maps in maps.items():
            values = [
                attention.per_prompt_pull(run_maps, b, "cls").numpy()
                if run_maps.blocks[b].probs is not None and run_maps.has_class_token
                else np.zeros(run_maps.blocks[b].num_prompts)
                for b in range(run_maps.depth)
            ]
            fig = attention_charts.per_prompt_figure(
                values,
                list(range(run_maps.depth)),
                title=f"#{run_id}: CLS attention per prompt slot",
                colorbar="attention",
            )
            look.show_plotly(fig, key=f"att_per_prompt_{run_id}")
        st.caption(
            "For shallow prompts the slots in later blocks carry the transformed prompt tokens; for deep "
            "prompts every block has its own fresh prompts."
        )

# pull against prompt count over all stored runs of the same data
same = [
    r
    for r in runs
    if split_key(RunConfig.from_dict(r["config"])) == split_key(config_a)
    and RunConfig.from_dict(r["config"]).backbone == config_a.backbone
]
with st.container(border=True):
    st.markdown(f"##### What did training add to the pull? {len(same)} stored run(s) on this data and backbone")
    st.caption(
        "Trained minus untrained pull (mean over blocks) per run: 0 is what the frozen backbone gives any "
        "prompts of that count; open markers show where the uniform share p/T would put the bar."
    )
    measured_key = f"att_pull_all_{run_a}"
    if st.button(
        f"Measure prompt pull for {min(len(same), MAX_PULL_RUNS)} run(s)",
        key="att_pull_all",
        icon="↗️",
        help="One forward pass per run over the fixed test images.",
    ):
        st.session_state[measured_key] = True
    if st.session_state.get(measured_key):
        records = []
        progress = st.progress(0.0)
        for position, row in enumerate(same[:MAX_PULL_RUNS]):
            try:
                result = pull_of(path, row["id"], row["finished_at"])
                records.append({**result, "accuracy": (row.get("metrics") or {}).get("accuracy")})
            except Exception as exc:  # noqa: BLE001 - one broken run must not hide the others
                st.warning(f"Run #{row['id']}: {wording.md_escape(exc)}")
            progress.progress((position + 1) / min(len(same), MAX_PULL_RUNS))
        progress.empty()
        look.show_plotly(
            attention_charts.pull_vs_count_figure(records, query=query or "cls_pull"), key="att_pull_count"
        )
        if records:
            frame = pd.DataFrame(
                [
                    {
                        "run": r["run_id"],
                        "configuration": r["label"],
                        "prompts/block": r["total_prompts"] / max(r["placed_blocks"], 1),
                        "CLS pull": r["cls_pull"],
                        "untrained CLS pull": r.get("cls_pull_untrained"),
                        "gain (points)": 100 * (r["cls_pull"] - r.get("cls_pull_untrained", float("nan"))),
                        "patch pull": r["patch_pull"],
                        "uniform p/T": r["uniform"],
                        "value-weighted CLS": r.get("cls_value_share"),
                        "accuracy": r["accuracy"],
                        "acc. prompts removed": r.get("accuracy_without_prompts"),
                    }
                    for r in records
                ]
            )
            st.dataframe(
                frame,
                hide_index=True,
                width="stretch",
                column_config={
                    "prompts/block": st.column_config.NumberColumn(format="%.1f"),
                    "gain (points)": st.column_config.NumberColumn(format="%+.1f"),
                    **{
                        k: st.column_config.NumberColumn(format="percent")
                        for k in (
                            "CLS pull",
                            "untrained CLS pull",
                            "patch pull",
                            "uniform p/T",
                            "value-weighted CLS",
                            "accuracy",
                            "acc. prompts removed",
                        )
                    },
                },
            )

# ------------------------------------------------------------------------------------ condensation
st.subheader("Prompt condensation")
st.caption(
    f"**Score:** {condense.SCORE_DESCRIPTION} The kept prompts and the head are then fine-tuned for a few "
    f"epochs at {condense.FINETUNE_LR_FACTOR:g} x the parent's learning rate; the result is a new run "
    "linked to its parent (the parent is not changed)."
)
eligible = [
    r["id"] for r in runs if (r["config"].get("tuning") == "prompt" and (r["config"].get("num_prompts") or 0) > 0)
]
if not eligible:
    st.info("No prompt-tuned run to condense yet.")
else:
    c = st.columns([3, 2, 2, 1])
    default = run_a if run_a in eligible else eligible[0]
    parent_id = c[0].selectbox(
        "Run to condense", eligible, index=eligible.index(default), format_func=run_text, key="att_condense_parent"
    )
    parent_config = by_id[parent_id]["config"]
    shape, _ = resources.backbone_shape_or_error(parent_config.get("backbone"), parent_config.get("resolution"))
    total = condense.parent_prompt_total(parent_config, shape["depth"] if shape else None) or 1
    _default("att_keep_mode", "fraction")
    mode = c[1].segmented_control(
        "Keep",
        ["fraction", "count"],
        key="att_keep_mode",
        required=True,
        help=f"Counted over all {total} prompt vectors of the run (all placed blocks), "
        "ranked globally: blocks keep different numbers.",
    )
    if mode == "count":
        keep = int(
            c[2].number_input(
                f"Prompt vectors to keep (of {total})", 1, max(total, 1), max(1, total // 3), key="att_keep_count"
            )
        )
        fraction = None
    else:
        fraction = c[2].slider("Fraction kept", 0.05, 1.0, 0.3, 0.05, key="att_keep_fraction")
        keep = None
    epochs = int(c[3].number_input("Epochs", 1, 50, condense.DEFAULT_EPOCHS, key="att_condense_epochs"))
    shown = keep if keep is not None else max(1, round(fraction * total))
    try:
        placed = len(parse_placement(parent_config.get("placement"), shape["depth"])) if shape else 1
    except PromptConfigError:
        placed = 1
    st.caption(
        f"Keeps {shown} of {total} prompt vectors ({100 * shown / total:.0f}%)"
        + (f", {shown / placed:.1f} per block on average over {placed} blocks" if placed > 1 else "")
        + ". The condensed run costs the GMACs of a fresh run with the same per-block counts."
    )
    if st.button("Queue condensation", type="primary", key="att_condense_go", icon="⚗️"):
        try:
            new_id = condense.submit_condense(store, parent_id, keep=keep, keep_fraction=fraction, epochs=epochs)
        except ConfigError as exc:
            st.error(f"Not queued: {wording.md_escape(exc)}")
        else:
            jobqueue.start_worker(store)
            st.session_state["att_condense_run"] = new_id
            st.success(f"Queued run #{new_id}: condensing #{parent_id}.")

busy = bool(store.list_runs(status=("queued", "running"), kind="condense", limit=1))


def condensation_progress() -> None:
    pending = st.session_state.get("att_condense_run")
    if pending is not None:
        row = store.get_run(pending)
        if row is None:
            st.session_state.pop("att_condense_run", None)
        elif row["status"] in ("queued", "running"):
            fraction, text = wording.progress_of(row, store.latest_progress(pending))
            st.progress(fraction, text=f"Run #{pending}: {text}")
        elif row["status"] == "failed":
            st.error(f"Run #{pending} failed: {wording.md_escape(wording.first_line(row.get('error')))}")


# While a condensation runs only its progress bar polls; the table and charts below are drawn again when
# the runs changed (a condensation finished), not on every tick.
live.follow(store, "attention_condense", busy=busy, small=condensation_progress, every_idle=None)


def condensations() -> None:
    rows = store.list_runs(status="done")
    pairs = condense.condensation_pairs(rows)
    if not pairs:
        st.caption("No finished condensation yet.")
        return
    frame = pd.DataFrame(
        [
            {
                "parent": p["parent_id"],
                "condensed": p["run_id"],
                "from": p["parent_label"],
                "to": p["label"],
                "kept": f"{p['kept_prompts']} of {p['parent_prompts']}",
                "accuracy before": p["parent_accuracy"],
                "pruned (no fine-tune)": p["accuracy_pruned"],
                "accuracy after": p["accuracy"],
                "GMACs before": p["parent_gmacs"],
                "GMACs after": p["gmacs"],
                "ms before": p["parent_latency_ms_b1"],
                "ms after": p["latency_ms_b1"],
            }
            for p in pairs
        ]
    )
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        column_config={
            **{
                k: st.column_config.NumberColumn(format="percent")
                for k in ("accuracy before", "pruned (no fine-tune)", "accuracy after")
            },
            **{k: st.column_config.NumberColumn(format="%.3f") for k in ("GMACs before", "GMACs after")},
            **{k: st.column_config.NumberColumn(format="%.1f") for k in ("ms before", "ms after")},
        },
    )
    left, right = st.columns(2)
    with left:
        look.show_plotly(attention_charts.condensation_figure(pairs), key="att_condense_chart")
    with right:
        latest = pairs[0]
        events = [e for e in store.progress(latest["run_id"]) if e.get("prompt_scores")]
        if events:
            blocks = events[-1].get("placement") or list(range(len(events[-1]["prompt_scores"])))
            fig = attention_charts.per_prompt_figure(
                [np.asarray(s) for s in events[-1]["prompt_scores"]],
                blocks,
                title=f"Importance of run #{latest['parent_id']}'s prompts (Taylor), kept in #{latest['run_id']}",
                colorbar="score",
                kept=events[-1].get("kept_indices"),
                log_color=True,
            )
            look.show_plotly(fig, key="att_scores_chart")


condensations()
