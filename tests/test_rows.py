"""Row selection (vptdash.engine.rows): blocks compute only the output rows something reads, with the same
logits and gradients as running every block whole."""

import pytest
import torch
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

from vptdash.engine import rows
from vptdash.engine.cost import unfused_attention
from vptdash.engine.prompts import PromptedViT
from vptdash.engine.rows import supports_row_selection

DIM, IMG, PATCH, DEPTH = 32, 32, 8, 4  # 16 patches


def vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    options = dict(
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=4,
        mlp_ratio=2,
        num_classes=0,
        init_values=0.1,
    )
    return VisionTransformer(**{**options, **kw}).eval()


def logits_and_grads(model: PromptedViT, images: torch.Tensor, row_selection: bool):
    model.row_selection = row_selection
    model.zero_grad(set_to_none=True)
    logits = model(images)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.row_selection = True
    return logits.detach(), grads


CASES = [
    ({}, "deep", ()),
    ({}, "shallow", ()),
    ({}, "0,2", (1,)),
    ({}, "deep", (3,)),
    ({}, "1,3", (3,)),
    ({}, "3", ()),
    ({"reg_tokens": 2}, "deep", ()),
    ({"class_token": False, "global_pool": "avg"}, "deep", ()),
    ({"class_token": False, "global_pool": "avg"}, "shallow", (2,)),
    ({"qkv_bias": False, "qk_norm": True}, "deep", ()),
]


@pytest.mark.parametrize("options,placement,skip", CASES)
def test_selected_rows_give_the_whole_blocks_logits_and_gradients(options, placement, skip):
    model = PromptedViT(vit(**options), 3, num_prompts=5, placement=placement, skip_blocks=skip, seed=0)
    assert_same_as_whole_blocks(model)
    assert model.rows_per_block() != model.tokens_per_block()  # something was really left out


def assert_same_as_whole_blocks(model: PromptedViT) -> None:
    images = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    fast, fast_grads = logits_and_grads(model, images, True)
    whole, whole_grads = logits_and_grads(model, images, False)
    assert torch.allclose(fast, whole, atol=1e-5)
    for name, grad in whole_grads.items():
        assert torch.allclose(fast_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_cached_training_path_selects_rows_too():
    model = PromptedViT(vit(), 3, num_prompts=5, placement="2,3", seed=0)
    images = torch.randn(3, 3, IMG, IMG)
    encoded = model.encode_frozen(images)
    assert encoded.shape[1] == 1 + 16  # the frozen prefix hands on every token
    fast = model.forward_from_frozen(encoded)
    model.row_selection = False
    assert torch.allclose(fast, model.forward_from_frozen(encoded), atol=1e-5)


@pytest.mark.parametrize(
    "placement,skip,expected",
    [
        ("deep", (), [17, 17, 17, 1]),  # prompt outputs are overwritten by the next block's prompts
        ("shallow", (), [22, 22, 22, 1]),  # shallow prompts carry on: only the last block shrinks
        ("0,2", (), [22, 17, 22, 1]),  # block 0's prompts feed block 1; block 1's outputs are overwritten
        ("0,1,2", (3,), [17, 17, 1, 0]),  # the last block that runs computes the CLS row
    ],
)
def test_rows_per_block(placement, skip, expected):
    model = PromptedViT(vit(), 3, num_prompts=5, placement=placement, skip_blocks=skip)
    assert model.rows_per_block() == expected


def test_without_a_class_token_the_last_block_keeps_the_patches():
    model = PromptedViT(vit(class_token=False, global_pool="avg"), 3, num_prompts=5, placement="deep")
    assert model.rows_per_block() == [16, 16, 16, 16]


def test_whole_blocks_restores_the_previous_setting():
    model = PromptedViT(vit(), 3, num_prompts=5, placement="deep")
    with model.whole_blocks():
        assert model.rows_per_block() == model.tokens_per_block()
        with model.whole_blocks():
            pass
        assert not model.row_selection  # the inner one restored the outer's setting, not True
    assert model.row_selection and model.rows_per_block() == [17, 17, 17, 1]


def test_other_block_types_run_whole():
    backbone = vit(block_fn=ParallelScalingBlock)
    assert not supports_row_selection(backbone.blocks[0])
    model = PromptedViT(backbone, 3, num_prompts=5, placement="deep")
    assert model.rows_per_block() == model.tokens_per_block()
    assert model(torch.randn(2, 3, IMG, IMG)).shape == (2, 3)


def test_bf16_autocast_stays_close_to_whole_blocks():
    model = PromptedViT(vit(), 3, num_prompts=5, placement="deep", seed=0)
    images = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(images).float()
        model.row_selection = False
        whole = model(images).float()
    # Measured (20 seeded inputs, 2026-11-26): the two paths gave identical bf16 logits every time, and
    # bf16 itself moves these logits (up to 0.25) by at most 1.5e-4 from fp32. 1e-3 leaves room for a
    # kernel that rounds differently, and is 20x below the change of scaling the logits by 0.1.
    tolerance = 1e-3
    assert whole.abs().max() > 0.1
    assert torch.allclose(fast, whole, atol=tolerance, rtol=0)
    assert not torch.allclose(0.1 * fast, whole, atol=tolerance, rtol=0)


def bf16_step(model: PromptedViT, images: torch.Tensor):
    """One bf16 autocast forward + backward: the logits and the trainable parameters' gradients."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2])).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("placement", ["deep", "shallow"])
def test_frozen_weights_cast_once_give_autocasts_own_results_bit_for_bit(monkeypatch, placement):
    model = PromptedViT(vit(), 3, num_prompts=5, placement=placement, seed=0)
    images = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    cached, cached_grads = bf16_step(model, images)
    monkeypatch.setattr(rows, "autocast_weight", lambda weight: weight)  # autocast casts on every call
    plain, plain_grads = bf16_step(model, images)
    assert torch.equal(cached, plain)
    for name, grad in plain_grads.items():
        assert torch.equal(cached_grads[name], grad), name


@pytest.mark.parametrize("placement", ["deep", "shallow"])
def test_every_blocks_frozen_matmul_weights_are_cast_once(monkeypatch, placement):
    """Blocks that keep every row (all but the first and last of shallow prompts) take the cached casts
    too: called as timm modules they would leave every cast to autocast, repeated on every call."""
    model = PromptedViT(vit(), 3, num_prompts=5, placement=placement, seed=0)
    seen = set()
    cast_once = rows.autocast_weight

    def recording(weight):
        seen.add(id(weight))
        return cast_once(weight)

    monkeypatch.setattr(rows, "autocast_weight", recording)
    bf16_step(model, torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1)))
    for index, block in enumerate(model.backbone.blocks):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert id(block.get_submodule(name).weight) in seen, f"block {index} {name}"


def test_a_frozen_weight_is_cast_once_and_trainable_ones_never():
    layer = torch.nn.Linear(4, 4)
    layer.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = rows.autocast_weight(layer.weight)
        assert first.dtype == torch.bfloat16 and rows.autocast_weight(layer.weight) is first
        assert rows.autocast_weight(layer.bias) is layer.bias  # trainable: autocast's own business
    assert rows.autocast_weight(layer.weight) is layer.weight  # no autocast, no cast


def test_changing_a_frozen_weight_in_place_refreshes_its_cast_copy():
    model = PromptedViT(vit(), 3, num_prompts=5, placement="deep", seed=0)
    images = torch.randn(3, 3, IMG, IMG)
    before, _ = bf16_step(model, images)
    other = vit()
    torch.manual_seed(5)
    torch.nn.init.normal_(other.blocks[1].mlp.fc1.weight)
    model.backbone.load_state_dict(other.state_dict())  # copies in place: same tensors, new versions
    after, _ = bf16_step(model, images)
    fresh, _ = bf16_step(PromptedViT(other, 3, num_prompts=5, placement="deep", seed=0), images)
    assert not torch.equal(before, after) and torch.equal(after, fresh)


def test_a_copy_cast_during_evaluation_serves_training():
    model = PromptedViT(vit(), 3, num_prompts=5, placement="deep", seed=0)
    images = torch.randn(3, 3, IMG, IMG)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images)
    _, grads = bf16_step(model, images)  # inference tensors could not be saved for backward
    assert all(grad.abs().sum() > 0 for grad in grads.values())


def test_condensed_counts_with_empty_blocks_match_whole_blocks():
    assert_same_as_whole_blocks(PromptedViT(vit(), 3, num_prompts=[2, 0, 5, 1], placement="deep", seed=0))


def test_cached_tokens_are_not_differentiated_at_the_first_prompted_block():
    """Trained from cached tokens (no gradient), the first prompted block leaves out exactly what a
    gradient for the tokens would cost: the input gradients of their query and key/value projections
    and the query side of attention scores, 2 B d (R d + T 2d + R N) FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    def step_flops(tokens_need_grad: bool) -> int:
        model = PromptedViT(vit(), 3, num_prompts=5, placement="deep", seed=0)
        encoded = model.encode_frozen(torch.randn(4, 3, IMG, IMG)).requires_grad_(tokens_need_grad)
        with unfused_attention(model), FlopCounterMode(display=False) as counter:
            logits = model.forward_from_frozen(encoded)
            torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
        return counter.get_total_flops()

    rows = tokens = 1 + 16  # block 0's kept rows: CLS and patches (deep: the prompt outputs are not read)
    length = tokens + 5
    assert step_flops(True) - step_flops(False) == 2 * 4 * DIM * (rows * DIM + tokens * 2 * DIM + rows * length)


def test_the_training_forward_traces_whole_under_torch_compile():
    """torch.compile sees one graph, not one per linear (benchmarks/compile_step.py measures what it saves)."""
    model = PromptedViT(vit(), 3, num_prompts=5, placement="deep", seed=0)
    for block in model.backbone.blocks:
        block.attn.fused_attn = False
    encoded = model.encode_frozen(torch.randn(2, 3, IMG, IMG))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows.autocast_weight(model.backbone.blocks[0].mlp.fc1.weight)  # a cached cast exists: still no break
        explained = torch._dynamo.explain(model.forward_from_frozen)(encoded)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
