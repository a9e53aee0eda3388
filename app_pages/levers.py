"""Cost levers: why whitened bilinear prompts converge differently (burstiness before / after whitening),
and which blocks this task can skip (per-block redundancy, greedy and DAS searches, their traces)."""

from __future__ import annotations

import streamlit as st

from vptdash.engine import whitening
from vptdash.engine.backbones import BackboneError
from vptdash.engine.cost import block_macs
from vptdash.engine.data import DatasetError
from vptdash.engine.prompts import PromptConfigError
from vptdash.engine.train import ConfigError, RunConfig
from vptdash.methods import skipping
from vptdash.ui import jobqueue, look, resources, session
from vptdash.views import levers_charts, wording

# What a manager should take from this page, before any of its technical detail.
TAKEAWAY = (
    "**In short:** prompts make every image more expensive to process, and this page shows two ways to pay "
    "less: skip the blocks your task does not need (found here, on your images) or train bilinear prompts, "
    "which learn fewer numbers; keep a lever only if its run on the Train page still reaches the accuracy "
    "you need."
)
LIVE = ("queued", "running")
INLINE_GMACS = 20.0  # about a second of this CPU: smaller searches run inline, bigger ones as a job

store = resources.get_store()
setup = session.active_setup()
st.title("Cost levers")
st.info(TAKEAWAY, icon="✔️")
st.caption(
    f"On **{wording.dataset_md(setup['dataset'], setup['cell_type'])}** with `{setup['backbone']}` at "
    f"{setup['resolution']} px (change them on the Data and Train pages). Prompts add compute; these two "
    "levers spend less of it: bilinear prompts learn faster per parameter, skipped blocks are never executed."
)

shape, backbone_error = resources.backbone_shape_or_error(setup["backbone"], setup["resolution"])
if backbone_error:
    st.error(f"Backbone `{setup['backbone']}` cannot be built here: {wording.md_escape(backbone_error)}")
    st.stop()
depth = int(shape["depth"])


def setup_config(**overrides) -> RunConfig:
    return session.base_config(**overrides)


@st.cache_data(show_spinner=False, max_entries=16)
def burstiness_of(config_items: tuple, block: int) -> dict:
    return whitening.burstiness_for_config(RunConfig.from_dict(dict(config_items)), block=block).to_dict()


burst_tab, skip_tab = st.tabs(["Burstiness and whitening", "Layer skipping"])

# ------------------------------------------------------------------------------------ burstiness
with burst_tab:
    st.markdown(
        "A prompt's attention logits against the image are the entries of **W_q W_k^T X^T** (X: the patch tokens "
        "a block's attention sees). A few of them are huge (*burstiness*), which makes plain prompts learn slowly "
        "and unstably. **Whitening** that matrix with statistics of *your* training images evens them out; "
        "*bilinear-whitened* prompts (`P = Z W`) start W from the whitening matrix (Train page, prompt type)."
    )
    c = st.columns([3, 2])
    block = c[0].select_slider(
        "Block",
        list(range(depth)),
        value=0,
        key="levers_block",
        help="Block 0 is where shallow prompts enter. Later blocks need a forward pass "
        "through the earlier ones (a few seconds).",
    )
    seed = c[1].number_input(
        "Shot draw (seed)",
        min_value=0,
        max_value=10_000,
        value=0,
        step=1,
        key="levers_seed",
        help="Which training images the few-shot split draws: the same as a run with this seed.",
    )
    config = setup_config(seed=int(seed))
    try:
        with st.spinner("Reading the training images' patch tokens..."):
            result = burstiness_of(tuple(sorted(config.to_dict().items(), key=lambda kv: kv[0])), int(block))
    except (DatasetError, BackboneError, ConfigError, PromptConfigError) as exc:
        st.error(f"Cannot compute it on this setup: {wording.md_escape(exc)}")
    else:
        m = st.columns(4)
        m[0].metric("Kurtosis before", f"{result['kurtosis_before']:.1f}", help="3 for a Gaussian, 6 for a Laplacian.")
        m[1].metric(
            "Kurtosis after",
            f"{result['kurtosis_after']:.1f}",
            f"{result['kurtosis_after'] - result['kurtosis_before']:+.1f}",
            delta_color="inverse",
        )
        m[2].metric(
            "Largest entry (std)",
            f"{result['max_before']:.0f} → {result['max_after']:.0f}",
            help="The largest |entry| in units of the standard deviation, before and after whitening.",
        )
        m[3].metric(
            "Effective rank",
            f"{result['effective_rank']} / {result['dim']}",
            help="Directions of the covariance above 1e-6 of the largest; the rest are clamped "
            "(grey images replicated to 3 channels have far fewer than d).",
        )
        look.show_plotly(
            levers_charts.burstiness_figure(
                result, title=f"Burstiness at block {block}: {result['n_images']} training images"
            ),
            key="levers_burst",
        )
        st.caption(
            f"{result['n_entries']:,} entries, each side in units of its own standard deviation; the dotted "
            "line is a Gaussian with as many entries. Heavy tails = bursty."
        )

# ------------------------------------------------------------------------------------ skipping
with skip_tab:
    st.markdown(
        "Skipped blocks are **never executed** (the residual stream passes through), so GMACs and latency really "
        "drop. The search scores each subset of blocks by the validation loss of the frozen network with those "
        "blocks skipped (a linear head fitted on the full network's features). **Greedy** drops the least "
        "useful block, then the next; **DAS** samples subsets and learns skip scores by REINFORCE "
        "(reward `exp(-loss)`). Apply a result on the Train page."
    )
    c = st.columns([1, 2, 1, 2])
    k = c[0].number_input(
        "Blocks to skip (k)", min_value=1, max_value=max(1, depth - 1), value=min(4, depth - 1), step=1, key="levers_k"
    )
    method = c[1].segmented_control(
        "Method",
        list(skipping.SKIP_METHODS),
        default="greedy",
        key="levers_method",
        required=True,
        format_func={"greedy": "greedy (cheap)", "das": "DAS search"}.get,
    )
    steps = c[2].number_input(
        "DAS steps",
        min_value=10,
        max_value=2000,
        value=skipping.DEFAULT_STEPS,
        step=50,
        key="levers_steps",
        disabled=method != "das",
    )
    with c[3]:
        st.write("")
        search_clicked = st.button(
            f"Find {int(k)} blocks to skip",
            key="levers_search",
            type="primary",
            icon="✂️",
            width="stretch",
        )
    if search_clicked:
        config = setup_config()
        per_image = (
            block_macs(shape["num_prefix_tokens"] + shape["num_patches"], shape["embed_dim"], shape["mlp_dim"]) / 1e9
        )  # one block on one image
        estimate = skipping.estimated_gmacs(depth, per_image, int(k), method or "greedy", steps=int(steps))
        try:
            if estimate < INLINE_GMACS:
                with st.spinner("Searching..."):
                    row = skipping.skip_search_now(
                        store, config, int(k), method or "greedy", steps=int(steps), source="live"
                    )
            else:
                run_id = skipping.submit_skip_search(store, config, int(k), method or "greedy", steps=int(steps))
                jobqueue.start_worker(store)
                row = store.get_run(run_id)
        except ConfigError as exc:
            st.error(f"Not started: {wording.md_escape(exc)}")
        else:
            st.session_state["levers_watch"] = row["id"]
            st.rerun()

    searches = [
        r
        for r in skipping.search_rows(store, dataset=setup["dataset"])
        if r["config"].get("backbone") == setup["backbone"] and r["config"].get("resolution") == setup["resolution"]
    ]
    if not searches:
        st.info("No search on this setup yet.", icon="ℹ️")
        st.stop()
    by_id = {r["id"]: r for r in searches}
    if st.session_state.get("levers_watch") not in by_id:
        st.session_state["levers_watch"] = searches[0]["id"]

    def describe(run_id: int) -> str:
        r = by_id[run_id]
        spec = skipping.search_spec(r["config"])
        shots = r["config"].get("shots")
        return f"#{run_id} · {spec['method']} k={spec['k']} · {'all' if shots is None else shots} shots · {r['status']}"

    watch = st.selectbox("Search", list(by_id), key="levers_watch", format_func=describe)
    live = by_id[watch]["status"] in LIVE

    @st.fragment(run_every=1.5 if live else None)
    def show_search() -> None:
        row = store.get_run(watch)
        if row is None:
            st.warning("This search was deleted.")
            return
        if row["status"] in LIVE:
            events = store.progress(watch)
            fraction, text = wording.progress_of(row, events[-1] if events else None)
            st.progress(fraction, text=f"{row['status']}: {text}")
            if st.button("Cancel search", key="levers_cancel", icon="✖️"):
                store.request_cancel(watch)
                st.rerun(scope="fragment")
            return
        if row["status"] == "failed":
            st.error(f"The search failed: {wording.md_escape(wording.first_line(row.get('error')))}")
            return
        result = skipping.stored_result(store, watch)
        if result is None:
            st.warning(f"Search #{watch} ({row['status']}) has no result.")
            return
        m = st.columns(4)
        m[0].metric("Skip blocks", ", ".join(map(str, result.skip)))
        m[1].metric(
            "Validation loss",
            f"{result.chosen_loss:.3f}",
            f"{result.chosen_loss - result.base_loss:+.3f}",
            delta_color="inverse",
            help=f"With no block skipped: {result.base_loss:.3f}. {skipping.OBJECTIVE}.",
        )
        m[2].metric("Subnetworks evaluated", f"{result.evaluations}")
        m[3].metric("Search time", wording.fmt_duration(result.seconds))
        cost_share = (depth - len(result.skip)) / depth
        st.caption(
            f"Skipping {len(result.skip)} of {depth} blocks leaves about {cost_share:.0%} of the blocks' "
            f"compute. {result.n_train} training images (head) and {result.n_val} validation images (loss)."
            + (f" Stopped early: {result.stopped}." if result.stopped else "")
        )
        if st.button(
            f"Use on the Train page: skip {', '.join(map(str, result.skip))}",
            key="levers_apply",
            icon="▶️",
        ):
            st.session_state["skip_suggestion"] = list(result.skip)
            st.switch_page("app_pages/train.py")
        left, right = st.columns(2)
        with left:
            if any(v is not None for v in result.redundancy):
                look.show_plotly(levers_charts.redundancy_figure(result), key="levers_redundancy")
        with right:
            look.show_plotly(levers_charts.trace_figure(result), key="levers_trace")

    show_search()
