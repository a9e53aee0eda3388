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
