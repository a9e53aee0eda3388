"""Data: pick built-in ELPV or upload your own images; see what the model will be trained on."""

import html
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from vptdash.engine import data
from vptdash.runs import uploads
from vptdash.ui import look, resources, session
from vptdash.views import wording

THUMBS_PER_CLASS = 8
SOURCE_ELPV, SOURCE_OWN = "Built-in: ELPV solar cells", "My own images"

store = resources.get_store()
st.title("Data")
st.caption("What the prompts are trained and tested on. The choice here is the active data set on every page.")


def use_dataset(spec: str, cell_type: str | None = None) -> None:
    session.set_active(dataset=spec, cell_type=cell_type)
    for key in ("data_elpv_classes", "data_cell_type"):
        st.session_state.pop(key, None)


def save_and_use(save) -> None:
    """Save an upload (checking every image) and make it the active data set; a bad upload is
    explained in the page and nothing is kept."""
    try:
        with st.spinner("Checking every image..."):
            info = save()
    except data.DatasetError as exc:
        st.error(f"That upload cannot be used: {wording.md_escape(exc)}")
        return
    use_dataset(uploads.upload_spec(info.slug))
    # The saved-uploads selectbox already exists in this run: its value may only be set before it
    # is created, so the next run applies this pending pick first.
    st.session_state["data_pending_pick"] = info.slug
    st.session_state["data_upload_message"] = (info.name, info.n_images, len(info.skipped))
    st.rerun()


def upload_title(info: uploads.UploadInfo) -> str:
    classes = ", ".join(f"{name} ({count})" for name, count in info.classes.items())
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created_at))
    return f"{info.name} · {info.n_images} images · {classes} · {when}"


# ------------------------------------------------------------------------------------ choose
setup = session.active_setup()
source = st.radio(
    "Images",
    [SOURCE_ELPV, SOURCE_OWN],
    index=0 if wording.is_elpv(setup["dataset"]) else 1,
    horizontal=True,
    key="data_source",
    label_visibility="collapsed",
)

if source == SOURCE_ELPV:
    left, right = st.columns([1, 1], gap="large")
    with left:
        classes_key = "data_elpv_classes"
        elpv_sets = ["elpv-binary", "elpv"]
        st.radio(
            "Classes",
            elpv_sets,
            key=classes_key,
            index=elpv_sets.index(setup["dataset"] if wording.is_elpv(setup["dataset"]) else "elpv-binary"),
            format_func=lambda spec: {
                "elpv-binary": "2 classes: functional / defective",
                "elpv": "4 classes: defect probability 0, 1/3, 2/3, 1",
            }[spec],
            help="\n\n".join(f"**{k}**: {v}" for k, v in data.BUILTIN_DATASETS.items()),
        )
        cells = ["all", "mono", "poly"]
        st.radio(
            "Cell type",
            cells,
            key="data_cell_type",
            horizontal=True,
            index=cells.index((setup["cell_type"] if wording.is_elpv(setup["dataset"]) else None) or "all"),
            format_func=lambda v: "mono + poly" if v == "all" else f"{v} only",
            help="Monocrystalline and polycrystalline cells look different; train on one kind only.",
        )
        cell = st.session_state["data_cell_type"]
        chosen = (st.session_state[classes_key], None if cell == "all" else cell)
        if chosen != (setup["dataset"], setup["cell_type"]):
            session.set_active(dataset=chosen[0], cell_type=chosen[1])
            st.rerun()  # the sidebar (drawn before this page) shows the new choice
    with right:
        st.info(
            "**ELPV** electroluminescence images of solar-cell modules, labelled by experts with a defect "
            "probability. Licence and source: under the table of splits below.",
            icon="©️",
        )
else:
    saved = uploads.list_uploads()
    left, right = st.columns([1, 1], gap="large")
    with left:
        st.subheader("Saved uploads")
        if not saved:
            st.caption("None yet: upload a zip or a few images on the right.")
        else:
            by_slug = {info.slug: info for info in saved}
            current = next(
                (info.slug for info in saved if uploads.upload_spec(info.slug) == setup["dataset"]), saved[0].slug
            )
            pending = st.session_state.pop("data_pending_pick", None)
            if pending in by_slug:
                st.session_state["data_saved_pick"] = pending
            if st.session_state.get("data_saved_pick") not in by_slug:
                st.session_state["data_saved_pick"] = current
            pick = st.selectbox(
                "Data set", list(by_slug), key="data_saved_pick", format_func=lambda slug: upload_title(by_slug[slug])
            )
            b1, b2 = st.columns(2)
            active_slug = current if uploads.upload_spec(current) == setup["dataset"] else None
            if b1.button(
                "Use this data set", key="data_use_saved", type="primary", disabled=pick == active_slug, width="stretch"
            ):
                use_dataset(uploads.upload_spec(pick))
                st.rerun()
            if b2.button("Delete...", key="data_delete_saved", width="stretch"):
                st.session_state["data_confirm_delete"] = pick
            doomed = st.session_state.get("data_confirm_delete")
            if doomed in by_slug:
                st.warning(
                    f"Delete the upload **{wording.md_escape(by_slug[doomed].name)}** from disk? "
                    "Runs trained on it stay in the history."
                )
                c1, c2 = st.columns(2)
                if c1.button("Yes, delete", key="data_delete_yes", type="primary", width="stretch"):
                    was_active = uploads.upload_spec(doomed) == setup["dataset"]
                    try:
                        uploads.delete_upload(doomed)
                    except (OSError, ValueError) as exc:
                        st.error(f"Could not delete it: {wording.md_escape(exc)}")
                    st.session_state.pop("data_confirm_delete", None)
                    st.session_state.pop("data_saved_pick", None)
                    if was_active:
                        use_dataset(session.DEFAULT_SETUP["dataset"])
                    st.rerun()
                if c2.button("Keep it", key="data_delete_no", width="stretch"):
                    st.session_state.pop("data_confirm_delete", None)
                    st.rerun()

    with right:
        st.subheader("New upload")
        zip_tab, files_tab = st.tabs(["A .zip of class folders", "Image files + a class name each"])
        with zip_tab:
            st.caption(
                "One folder per class: `cracked/img1.png`, `ok/img7.png`... (a single wrapper folder "
                "is fine). PNG, JPEG, BMP, GIF, TIFF, WebP; grey or colour."
            )
            zip_file = st.file_uploader("Zip file", type=["zip"], key="data_zip")
            zip_name = st.text_input("Name", key="data_zip_name", placeholder="defaults to the file name")
            if st.button("Save and use", key="data_zip_save", type="primary", disabled=zip_file is None):
                name = zip_name.strip() or Path(zip_file.name).stem
                save_and_use(lambda: uploads.save_zip_upload(name, zip_file.getvalue()))
        with files_tab:
            st.caption("Drop the images of each class under its name; two classes at least.")
            n_groups = st.number_input(
                "Number of classes", min_value=2, max_value=12, value=2, step=1, key="data_n_groups"
            )
            groups = []
            for index in range(int(n_groups)):
                c1, c2 = st.columns([1, 2])
                class_name = c1.text_input(
                    f"Class {index + 1} name", key=f"data_class_{index}", placeholder=f"class {index + 1}"
                )
                files = c2.file_uploader(
                    f"Images of class {index + 1}",
                    accept_multiple_files=True,
                    key=f"data_files_{index}",
                    type=sorted(ext.lstrip(".") for ext in data.IMAGE_EXTENSIONS),
                )
                groups.append((class_name.strip(), files or []))
            files_name = st.text_input("Name", key="data_files_name", placeholder="my images")
            ready = sum(1 for _, files in groups if files) >= 2
            if st.button("Save and use", key="data_files_save", type="primary", disabled=not ready):
                missing = [i + 1 for i, (name, files) in enumerate(groups) if files and not name]
                if missing:
                    st.error(f"Give class {', '.join(map(str, missing))} a name.")
                else:
                    triples = [(f.name, f.getvalue(), name) for name, files in groups for f in files]
                    save_and_use(lambda: uploads.save_files_upload(files_name.strip() or "my images", triples))

message = st.session_state.pop("data_upload_message", None)
if message:
    name, n_images, n_skipped = message
    st.success(
        f"Saved **{wording.md_escape(name)}**: {n_images} images"
        + (f", {n_skipped} files skipped (listed below)." if n_skipped else ".")
    )

# ------------------------------------------------------------------------------------ preview
setup = session.active_setup()
st.divider()
st.header(f"Active data set: {wording.dataset_md(setup['dataset'], setup['cell_type'])}")

try:
    with st.spinner("Loading images (the first time takes a few seconds)..."):
        image_set = resources.load_image_set(setup["dataset"], setup["resolution"], setup["cell_type"])
except data.DatasetError as exc:
    st.error(f"This data set cannot be loaded: {wording.md_escape(exc)}")
    if st.button("Switch back to ELPV", key="data_back_to_elpv"):
        use_dataset(session.DEFAULT_SETUP["dataset"])
        st.rerun()
    st.stop()

controls = st.columns([2, 2, 3])
with controls[0]:
    session.shots_widget("data_shots")
with controls[1]:
    st.slider(
        "Test fraction",
        0.1,
        0.5,
        value=float(setup["test_fraction"]),
        step=0.05,
        help="Share of each class held out for the test set.",
        **session.bind("data_test_fraction", "test_fraction"),
    )

setup = session.active_setup()
counts = image_set.class_counts()
try:
    split = data.split_image_set(image_set, test_fraction=setup["test_fraction"], shots=setup["shots"])
except data.DatasetError as exc:
    st.error(f"These images cannot be split for training and testing: {wording.md_escape(exc)}")
    st.stop()

labels = image_set.labels.numpy()
per_class = []
for index, name in enumerate(image_set.class_names):
    per_class.append(
        {
            "class": name,
            "images": counts[name],
            "train": int((labels[split.train.numpy()] == index).sum()),
            "val": int((labels[split.val.numpy()] == index).sum()),
            "test": int((labels[split.test.numpy()] == index).sum()),
        }
    )
sizes = split.sizes()

m = st.columns(5)
m[0].metric("Images", f"{len(labels):,}")
m[1].metric("Classes", len(image_set.class_names))
m[2].metric("Train", sizes["train"], help="After the few-shot cut.")
m[3].metric("Validation / test", f"{sizes['val']} / {sizes['test']}")
m[4].metric("Skipped files", len(image_set.skipped))

chart_col, table_col = st.columns([3, 2], gap="large")
with chart_col:
    fig = go.Figure()
    names = [html.escape(row["class"]) for row in per_class]  # plotly reads tags such as <a href> in labels
    unused = [row["images"] - row["train"] - row["val"] - row["test"] for row in per_class]
    for part, color, values in (
        ("train", "#1f77b4", [r["train"] for r in per_class]),
        ("validation", "#ff7f0e", [r["val"] for r in per_class]),
        ("test", "#2ca02c", [r["test"] for r in per_class]),
        ("not used (few-shot)", "#d0d0d0", unused),
    ):
        fig.add_trace(
            go.Bar(
                y=names,
                x=values,
                name=part,
                orientation="h",
                marker_color=color,
                hovertemplate="%{y}: %{x} images " + part + "<extra></extra>",
            )
        )
    fig.update_layout(
        barmode="stack",
        template="plotly_white",
        font={"size": 17},
        title={"text": "Images per class and split", "font": {"size": 22}},
        xaxis_title="Images",
        yaxis={"autorange": "reversed", "type": "category"},
        height=max(300, 150 + 60 * len(names)),
        margin={"l": 10, "r": 10, "t": 100, "b": 60},
        legend={"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom", "traceorder": "normal"},
    )
    look.show_plotly(fig, key="data_split_chart")
with table_col:
    st.dataframe(per_class, hide_index=True, width="stretch")
    if image_set.license:
        st.caption(f"Licence: {wording.md_escape(image_set.license)}")
    if image_set.source:
        st.caption(f"Source: {wording.md_escape(image_set.source)}")

st.subheader("Examples per class")
rng = np.random.default_rng(0)
for index, name in enumerate(image_set.class_names):
    members = np.flatnonzero(labels == index)
    if len(members) == 0:
        continue
    picks = np.sort(rng.choice(members, size=min(THUMBS_PER_CLASS, len(members)), replace=False))
    thumbs = [image_set.images[i].permute(1, 2, 0).numpy() for i in picks]
    st.markdown(f"**{wording.md_escape(name)}** · {counts[name]} images")
    st.image(thumbs, width=112, caption=[wording.md_escape(Path(image_set.files[i]).name[:18]) for i in picks])

st.subheader(f"Skipped files ({len(image_set.skipped)})")
if image_set.skipped:
    st.dataframe([{"file": f, "reason": r} for f, r in image_set.skipped], hide_index=True, width="stretch")
else:
    st.caption("Every file was used.")
