"""Attention extraction, prompt pull, CLS maps and rollout (vptdash.methods.attention), on the tiny-random ViT."""

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from vptdash.engine.backbones import load_backbone
from vptdash.engine.prompts import PromptedViT
from vptdash.methods import attention
from vptdash.methods.attention import AttentionMaps, BlockAttention

RES = 64  # tiny-random has 16 px patches: a 4 x 4 grid


def model(num_prompts=3, placement="deep", **kwargs) -> PromptedViT:
    torch.manual_seed(0)
    return PromptedViT(
        load_backbone("tiny-random", None, RES), 3, num_prompts=num_prompts, placement=placement, seed=1, **kwargs
    )


def images(n=2) -> torch.Tensor:
    return torch.randn(n, 3, RES, RES, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("placement", ["shallow", "deep", "1,3"])
def test_rows_sum_to_one_and_prompt_counts_follow_the_placement(placement):
    m = model(3, placement)
    maps = attention.extract_attention(m, images())
    lengths = m.tokens_per_block()
    assert maps.depth == 4 and maps.grid == (4, 4)
    for entry, length in zip(maps.blocks, lengths):
        assert entry.probs.shape == (2, m.backbone.blocks[0].attn.num_heads, length, length)
        torch.testing.assert_close(entry.probs.sum(-1), torch.ones(entry.probs.shape[:-1]))
        assert entry.num_prompts == length - 1 - 16
    expected = {"shallow": [3, 3, 3, 3], "deep": [3, 3, 3, 3], "1,3": [0, 3, 3, 3]}[placement]
    assert [e.num_prompts for e in maps.blocks] == expected


def test_probabilities_are_exactly_what_the_block_computes():
    """proj(probs @ v) must reproduce the block's own (fused) attention output, and timm's unfused
    path must give the same probabilities."""
    m = model(2, "deep")
    x = m.embed(images())
    x, _ = m.write_prompts(x, 0, 0, m.prompts())
    block = m.backbone.blocks[0]
    probs = attention.block_attention_probs(block, x)
    attn, h = block.attn, block.norm1(x)
    b, t, _ = h.shape
    v = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    rebuilt = attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(b, t, -1)))
    torch.testing.assert_close(rebuilt, attn(h), rtol=1e-5, atol=1e-6)

    private = copy.deepcopy(block)  # timm's own unfused path, read with a hook on a private copy
    private.attn.fused_attn = False
    seen = []
    private.attn.attn_drop.register_forward_hook(lambda mod, inp, out: seen.append(out))
    private.attn(h)
    torch.testing.assert_close(seen[0], probs, rtol=1e-5, atol=1e-7)


def test_extraction_leaves_the_backbone_and_outputs_untouched():
    m = model(2, "deep")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fused = [blk.attn.fused_attn for blk in m.backbone.blocks]
    m.train()
    x = images()
    with torch.no_grad():
        m.eval()
        logits = m(x)
        m.train()
    attention.extract_attention(m, x)
    assert m.training  # mode restored
    assert [blk.attn.fused_attn for blk in m.backbone.blocks] == fused
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not any(blk.attn._forward_hooks or blk._forward_pre_hooks for blk in m.backbone.blocks)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), logits)


def test_zero_prompts_pull_is_zero():
    m = model(0, "shallow", tuning="linear")
    maps = attention.extract_attention(m, images())
    rows = attention.prompt_pull(maps)
    assert all(r["cls_pull"] == 0.0 and r["patch_pull"] == 0.0 and r["uniform"] == 0.0 for r in rows)
    assert attention.per_prompt_pull(maps, 0).numel() == 0


def hand_maps() -> AttentionMaps:
    """1 image, 2 heads, tokens [CLS, P0, P1, patch x4] (2 x 2 grid), one block."""
    t = 7
    head0 = torch.full((t, t), 0.0)
    head0[0] = torch.tensor([0.1, 0.3, 0.1, 0.1, 0.2, 0.1, 0.1])  # CLS: 0.4 on prompts
    head0[1:] = torch.tensor([0.0, 0.5, 0.0, 0.125, 0.125, 0.125, 0.125])  # others: 0.5 on P0
    head1 = torch.full((t, t), 1.0 / t)  # uniform: 2/7 on prompts
    probs = torch.stack([head0, head1])[None]
    return AttentionMaps(
        [BlockAttention(0, probs, 2)],
        num_prefix_tokens=1,
        has_class_token=True,
        grid=(2, 2),
        placement=(0,),
        prompt_counts=(2,),
    )


def test_hand_built_matrix_gives_the_expected_pull():
    maps = hand_maps()
    (row,) = attention.prompt_pull(maps)
    assert row["cls_pull"] == pytest.approx((0.4 + 2 / 7) / 2)
    assert row["patch_pull"] == pytest.approx((0.5 + 2 / 7) / 2)
    assert row["uniform"] == pytest.approx(2 / 7)
    assert row["tokens"] == 7 and row["prompts"] == 2
    cls = attention.per_prompt_pull(maps, 0, "cls")
    torch.testing.assert_close(cls, torch.tensor([(0.3 + 1 / 7) / 2, (0.1 + 1 / 7) / 2]))
    assert float(cls.sum()) == pytest.approx(row["cls_pull"])
    patches = attention.per_prompt_pull(maps, 0, "patches")
    torch.testing.assert_close(patches, torch.tensor([(0.5 + 1 / 7) / 2, (0.0 + 1 / 7) / 2]))
    grid = attention.cls_patch_map(maps, 0, head=0)
    torch.testing.assert_close(grid, torch.tensor([[[0.1, 0.2], [0.1, 0.1]]]))
    torch.testing.assert_close(attention.cls_patch_map(maps, 0)[0, 0, 1], torch.tensor((0.2 + 1 / 7) / 2))


def test_value_weighted_share_by_hand():
    """share = sum_h sum_{j in prompts} A_h,ij n_h,j / sum_h sum_j A_h,ij n_h,j (n: value-output norms)."""
    maps = hand_maps()
    norms = torch.tensor([[1.0, 4.0, 0.0, 1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])[None]
    maps.blocks[0].value_norms = norms
    probs = maps.blocks[0].probs[0]
    # CLS row: head 0 gives 0.3 * 4 + 0.1 * 0 on prompts out of 0.1 + 1.2 + 0 + 0.1 + 0.2 + 0.1 + 0.1 = 1.8;
    # head 1 (uniform attention, equal norms) gives 2 * 2/7 out of 2
    expected_cls = (1.2 + 4 / 7) / (1.8 + 2.0)
    (row,) = attention.prompt_pull(maps)
    assert row["cls_value_share"] == pytest.approx(expected_cls)
    patch_rows = []
    for i in range(3, 7):
        num = sum(float(probs[h, i, j] * norms[0, h, j]) for h in range(2) for j in (1, 2))
        den = sum(float(probs[h, i, j] * norms[0, h, j]) for h in range(2) for j in range(7))
        patch_rows.append(num / den)
    assert row["patch_value_share"] == pytest.approx(np.mean(patch_rows))
    # without value norms the share is unknown, not invented
    maps.blocks[0].value_norms = None
    assert np.isnan(attention.prompt_pull(maps)[0]["cls_value_share"])


def test_value_norms_are_each_heads_contribution_through_the_output_projection():
    """n_h,j = ||W_O[:, head h columns] v_j,h||; summed with A they bound the block's attention output."""
    m = model(2, "deep")
    x, _ = m.write_prompts(m.embed(images()), 0, 0, m.prompts())
    block = m.backbone.blocks[0]
    attn, h = block.attn, block.norm1(x)
    b, t, d = h.shape
    v = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim)[:, :, 2]  # (B, T, H, dh)
    norms = attention.block_value_norms(block, x)
    for head in range(attn.num_heads):
        columns = slice(head * attn.head_dim, (head + 1) * attn.head_dim)
        out = v[:, :, head] @ attn.proj.weight[:, columns].T  # (B, T, d)
        torch.testing.assert_close(norms[:, head], out.norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_untrained_twin_is_the_runs_own_start_and_masking_removes_the_prompts(tmp_path, monkeypatch):
    from conftest import make_image_folder

    from vptdash.engine.train import RunConfig, build_model
    from vptdash.runs import jobs
    from vptdash.runs.store import RunStore

    monkeypatch.setenv("VPTDASH_HOME", str(tmp_path / "home"))
    folder = make_image_folder(tmp_path / "images", per_class=12)
    store = RunStore()
    config = RunConfig(
        backbone="tiny-random",
        dataset=str(folder),
        resolution=32,
        shots=None,
        epochs=2,
        batch_size=8,
        lr=0.1,
        num_prompts=3,
        placement="deep",
        seed=3,
        measure_latency=False,
    )
    run_id = jobs.run_now(store, config)["id"]
    run = attention.load_trained_model(store, run_id)
    twin = attention.untrained_twin(run)
    fresh = build_model(RunConfig.from_dict(store.get_run(run_id)["config"]), run.model.head.out_features)
    for trained, untrained, start in zip(run.model.prompts.tensors, twin.prompts.tensors, fresh.prompts.tensors):
        assert torch.equal(untrained, start)  # the same seeded draw the run started from
        assert not torch.equal(trained, untrained)  # and training moved it
    assert torch.equal(twin.head.weight, run.model.head.weight)
    assert twin.placement == run.model.placement and twin.prompt_counts == run.model.prompt_counts

    result = attention.run_pull(store, run_id, n_images=6)
    assert 1 <= result["n_images"] <= 6
    assert result["cls_pull_gain"] == pytest.approx(result["cls_pull"] - result["cls_pull_untrained"])
    assert len(result["blocks_untrained"]) == len(result["blocks"])
    assert 0 <= result["cls_value_share"] <= 1 and 0 <= result["cls_value_share_untrained"] <= 1

    # masking: the model without prompts is the frozen backbone with the same head
    images = attention.run_images(run.config, "test", limit=6)
    bare = attention.without_prompts(run.model)
    assert bare.placement == () and torch.equal(bare.head.weight, run.model.head.weight)
    with torch.no_grad():
        bare_logits = bare(attention.normalize_for(bare, images.images))
        logits = run.model.eval()(attention.normalize_for(run.model, images.images))
    labels = bare_logits.argmax(dim=1)  # labels the bare model gets all right
    effect = attention.masked_prompt_effect(run.model, images.images, labels, twin)
    assert effect["accuracy_without_prompts"] == 1.0
    changed = float((logits.argmax(dim=1) != labels).float().mean())
    assert effect["prediction_change"] == pytest.approx(changed)
    assert effect["accuracy_sample"] == pytest.approx(1 - changed)
    assert effect["logit_change"] == pytest.approx(float((logits - bare_logits).norm(dim=1).mean()), rel=1e-5)


def test_pull_charts_show_both_baselines_and_the_gain():
    from vptdash.views import attention_charts

    rows = [
        {"block": 0, "prompts": 2, "tokens": 10, "cls_pull": 0.5, "uniform": 0.2, "skipped": False},
        {"block": 1, "prompts": 2, "tokens": 10, "cls_pull": 0.4, "uniform": 0.2, "skipped": False},
    ]
    untrained = [{**r, "cls_pull": 0.3} for r in rows]
    fig = attention_charts.pull_per_block_figure({"run": rows}, baselines={"run": untrained})
    names = [t.name for t in fig.data]
    assert names == ["run: trained", "run: untrained prompts", "run: uniform share p/T"]
    assert list(fig.data[1].y) == pytest.approx([30.0, 30.0])
    record = dict(
        run_id=1, label="deep 2", family="deep", num_prompts=2, total_prompts=4, placed_blocks=2,
        cls_pull=0.45, cls_pull_untrained=0.30, uniform=0.2,
    )  # fmt: skip
    fig = attention_charts.pull_vs_count_figure([record, {**record, "run_id": 2, "cls_pull_untrained": None}])
    assert list(fig.data[0].y) == pytest.approx([15.0])  # trained minus untrained, points; no baseline: left out
    assert list(fig.data[1].y) == pytest.approx([-10.0])  # p/T minus untrained


def test_maps_have_the_patch_grid_shape():
    m = model(3, "deep")
    maps = attention.extract_attention(m, images(3))
    for block in range(4):
        assert attention.cls_patch_map(maps, block).shape == (3, 4, 4)
        assert attention.cls_patch_map(maps, block, head=1).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="several blocks"):
        attention.attention_rollout(maps)
    assert "discards the previous prompt tokens" in attention.rollout_unavailable_reason(m.placement, m.depth)


@pytest.mark.parametrize("placement,prompts", [("shallow", 3), ("shallow", 0), ("2", 2)])
def test_rollout_for_prompts_written_once(placement, prompts):
    m = model(prompts, placement, tuning="prompt" if prompts else "linear")
    maps = attention.extract_attention(m, images(2))
    assert attention.rollout_unavailable_reason(m.placement, m.depth) is None
    rollout = attention.attention_rollout(maps)
    assert rollout.shape == (2, 4, 4) and (rollout >= 0).all()
    assert float(rollout.sum(dim=(1, 2)).max()) <= 1.0 + 1e-6  # part of CLS's mass stays on CLS / prompts


def test_rollout_matches_a_hand_computation_without_prompts():
    probs = [torch.softmax(torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(i)), -1) for i in range(2)]
    maps = AttentionMaps([BlockAttention(i, p, 0) for i, p in enumerate(probs)], 1, True, (2, 2))
    expected = torch.eye(5)
    for p in probs:
        a = 0.5 * torch.eye(5) + 0.5 * p[0].mean(0)
        expected = (a / a.sum(-1, keepdim=True)) @ expected
    torch.testing.assert_close(attention.attention_rollout(maps)[0].flatten(), expected[0, 1:])


def test_measure_pull_averages_over_batches():
    m = model(2, "deep")
    x = (torch.rand(5, 3, RES, RES, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    streamed = attention.measure_pull(m, x, batch_size=2)
    whole = attention.prompt_pull(attention.extract_attention(m, attention.normalize_for(m, x)))
    assert streamed.n_images == 5
    for a, b in zip(streamed.blocks, whole):
        assert a["cls_pull"] == pytest.approx(b["cls_pull"], rel=1e-5)
        assert a["patch_pull"] == pytest.approx(b["patch_pull"], rel=1e-5)
        assert a["uniform"] == pytest.approx(b["uniform"])
    assert np.allclose([s.sum() for s in streamed.per_prompt_cls], [r["cls_pull"] for r in whole], rtol=1e-5)


def test_skipped_blocks_have_no_attention():
    m = model(2, "deep", skip_blocks=[2])
    maps = attention.extract_attention(m, images())
    assert maps.blocks[2].probs is None
    rows = attention.prompt_pull(maps)
    assert rows[2]["skipped"] and rows[2]["cls_pull"] != rows[2]["cls_pull"]  # NaN
    with pytest.raises(ValueError, match="skipped"):
        attention.cls_patch_map(maps, 2)


def test_uploaded_image_is_decoded_like_the_data_sets():
    buffer = io.BytesIO()
    Image.fromarray(np.full((50, 70), 128, dtype=np.uint8)).save(buffer, format="PNG")
    tensor = attention.image_from_bytes(buffer.getvalue(), RES)
    assert tensor.shape == (1, 3, RES, RES) and tensor.dtype == torch.uint8
    from vptdash.engine.data import DatasetError

    with pytest.raises(DatasetError):
        attention.image_from_bytes(b"not an image", RES)


# ---------------------------------------------------------------------------------------- the page
def test_attention_page_renders_maps_pull_and_queues_a_condensation(tmp_path, monkeypatch):
    """The page under AppTest inside a stand-in navigation (app.py registers it): two tiny runs, a test
    image, per-block and rollout views, pull for all runs, and a condensation queued + executed."""
    from pathlib import Path

    from conftest import make_image_folder
    from streamlit.testing.v1 import AppTest

    from vptdash.engine.train import RunConfig
    from vptdash.runs import jobs, worker
    from vptdash.runs.store import RunStore

    monkeypatch.setenv("VPTDASH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(worker, "ensure_worker", lambda store, **kw: True)
    folder = make_image_folder(tmp_path / "images", per_class=8)
    store = RunStore()
    base = dict(
        backbone="tiny-random",
        dataset=str(folder),
        resolution=32,
        shots=None,
        epochs=1,
        batch_size=8,
        measure_latency=False,
    )
    shallow = jobs.run_now(store, RunConfig(**base, num_prompts=2, placement="shallow"))["id"]
    deep = jobs.run_now(store, RunConfig(**base, num_prompts=3, placement="deep"))["id"]
    page = Path(__file__).resolve().parent.parent / "app_pages" / "attention.py"
    script = (
        f"import streamlit as st\nfrom vptdash.ui import session\nsession.init_state()\n"
        f"st.navigation([st.Page({str(page)!r}, title='Attention')]).run()\n"
    )
    at = AppTest.from_string(script, default_timeout=60)
    at.session_state["active_dataset"] = str(folder)
    at.session_state["active_backbone"] = "tiny-random"
    at.session_state["active_resolution"] = 32
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.selectbox(key="att_run_a").value == deep  # newest first
    at.selectbox(key="att_run_b").set_value(shallow).run()
    assert not at.exception, [e.message for e in at.exception]
    charts = at.get("plotly_chart")
    assert len(charts) >= 3  # two overlays + pull per block
    at.segmented_control(key="att_view").set_value("Rollout").run()
    assert not at.exception, [e.message for e in at.exception]
    assert "several blocks" in "\n".join(str(i.value) for i in at.info)  # deep: reason shown; shallow: map
    at.button(key="att_pull_all").click().run()
    assert not at.exception, [e.message for e in at.exception]
    at.slider(key="att_keep_fraction").set_value(0.5).run()
    at.button(key="att_condense_go").click().run()
    assert not at.exception, [e.message for e in at.exception]
    (queued,) = store.list_runs(kind="condense")
    assert queued["parent_id"] == deep and queued["config"]["condense_keep_fraction"] == 0.5
    jobs.execute_queued(store, [queued["id"]])
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert store.get_run(queued["id"])["status"] == "done"
    assert any(d.value is not None for d in at.dataframe)
