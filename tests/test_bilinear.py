"""Bilinear prompts (P = Z W), whitening and the burstiness picture (methods.md section 3)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vptdash import cli
from vptdash.engine import cost, whitening
from vptdash.engine.prompts import BilinearPrompts, PromptConfigError, PromptedViT, default_prompt_rank
from vptdash.engine.train import ConfigError, RunConfig, run_training
from vptdash.runs.store import RunStore
from vptdash.views import budget, levers_charts

DEPTH, DIM, IMG, PATCH = 3, 32, 32, 8  # 16 patches


def tiny_vit() -> VisionTransformer:
    """A tiny ViT whose LayerNorms have non-trivial affine parameters, like a trained one (at init a
    LayerNorm output has zero mean over features, so its tokens would span only d - 1 dimensions)."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=2, mlp_ratio=2, num_classes=0
    ).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.norm1.weight.uniform_(0.5, 1.5)
            block.norm1.bias.normal_(0, 0.5)
            for part in (0, 1):  # well-conditioned W_q, W_k (random init gives a nearly singular W_q W_k^T)
                torch.nn.init.orthogonal_(block.attn.qkv.weight[part * DIM : (part + 1) * DIM])
    return model


def images(n=24, seed=1):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def prompt_params(model: PromptedViT) -> int:
    return sum(p.numel() for p in model.prompts.parameters())


# ---------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("m,c", [(10, 4), (100, 32), (7, 7)])
def test_bilinear_parameter_count_is_m_c_plus_c_d(m, c):
    shallow = PromptedViT(tiny_vit(), 3, num_prompts=m, placement="shallow", prompt_type="bilinear", prompt_rank=c)
    assert prompt_params(shallow) == m * c + c * DIM
    assert cost.count_parameters(shallow)["params_prompts"] == m * c + c * DIM
    deep = PromptedViT(tiny_vit(), 3, num_prompts=m, placement="deep", prompt_type="bilinear", prompt_rank=c)
    assert prompt_params(deep) == DEPTH * (m * c + c * DIM)  # every placed block: its own Z and W
    assert {n for n, p in deep.named_parameters() if p.requires_grad} == (
        {f"prompts.z.{i}" for i in range(DEPTH)}
        | {f"prompts.w.{i}" for i in range(DEPTH)}
        | {"head.weight", "head.bias"}
    )


def test_bilinear_prompts_are_z_times_w_in_the_sequence():
    model = PromptedViT(
        tiny_vit(), 3, num_prompts=5, placement="shallow", prompt_type="bilinear", prompt_rank=3, seed=0
    )
    seen = []
    model.backbone.blocks[0].norm1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with model.whole_blocks():  # the sequence is only assembled there (rows.py)
        model(images(2))
    expected = model.prompts.z[0].detach() @ model.prompts.w[0].detach()
    assert seen[0].shape[1] == 1 + 5 + 16
    assert torch.allclose(seen[0][:, 1:6], expected.expand(2, -1, -1))
    loss = torch.nn.functional.cross_entropy(model(images(2)), torch.tensor([0, 1]))
    loss.backward()
    assert model.prompts.z[0].grad.abs().sum() > 0 and model.prompts.w[0].grad.abs().sum() > 0


def test_default_rank_follows_the_recipe_scaled_down():
    assert default_prompt_rank(100, 1) == 75 and default_prompt_rank(50, 12) == 50
    assert default_prompt_rank(10, 1) == 10 and default_prompt_rank(10, 12) == 10
    assert RunConfig(prompt_type="bilinear", num_prompts=100, placement="shallow").effective_prompt_rank() == 75
    assert RunConfig(prompt_type="bilinear", num_prompts=50, placement="deep").effective_prompt_rank() == 50
    assert RunConfig(prompt_type="bilinear", num_prompts=20, placement="0,5").effective_prompt_rank() == 20
    assert RunConfig(prompt_type="bilinear", num_prompts=20, prompt_rank=4).effective_prompt_rank() == 4
    assert RunConfig(num_prompts=20).effective_prompt_rank() is None
    model = PromptedViT(tiny_vit(), 3, num_prompts=10, placement="deep", prompt_type="bilinear")
    assert model.prompts.rank == 10


def test_bad_bilinear_settings_fail_clearly():
    with pytest.raises(PromptConfigError, match="rank"):
        PromptedViT(tiny_vit(), 3, num_prompts=5, prompt_type="bilinear", prompt_rank=DIM + 1)
    with pytest.raises(PromptConfigError, match="whitening"):
        PromptedViT(tiny_vit(), 3, num_prompts=5, prompt_type="bilinear-whitened")
    with pytest.raises(PromptConfigError, match="prompt type"):
        PromptedViT(tiny_vit(), 3, num_prompts=5, prompt_type="trilinear")
    with pytest.raises(ConfigError, match="only applies to bilinear"):
        RunConfig(prompt_rank=4).validate()
    with pytest.raises(ConfigError, match="rank"):
        RunConfig(prompt_type="bilinear", prompt_rank=0).validate()
    with pytest.raises(ConfigError, match="prompt type"):
        RunConfig(prompt_type="fourier").validate()
    with pytest.raises(PromptConfigError, match="shape"):
        BilinearPrompts([4], DIM, 3, init_W=[torch.zeros(2, DIM)])


# ---------------------------------------------------------------------------------------- whitening
def test_whitening_matrix_whitens_its_own_data():
    backbone = tiny_vit()
    tokens = whitening.block_inputs(backbone, images(), [0, 2])
    assert tokens[0].shape == (24, 16, DIM)
    for block in (0, 2):
        qkx = whitening.qkx_of(backbone.blocks[block], tokens[block])
        assert qkx.shape == (24, DIM, 16)
        white, sigma = whitening.whitening_matrix(qkx)
        identity = torch.eye(DIM, dtype=sigma.dtype)
        assert torch.allclose(white @ sigma @ white.T, identity, atol=1e-6)
        # Sigma is the mean over images of qkx qkx^T / n
        manual = sum(q.double() @ q.double().T / 16 for q in qkx) / len(qkx)
        assert torch.allclose(sigma, manual, rtol=1e-9, atol=1e-9)
        # and the whitened entries have an identity second moment
        after = torch.matmul(white, qkx.double())
        assert torch.allclose(whitening.second_moment(after), identity, atol=1e-6)


def test_degenerate_data_is_whitened_on_its_span():
    """Grey images, LayerNorm at init: Sigma is singular. Eigenvalues under eps * max are clamped, so
    W Sigma W^T is the identity on the span of the others (and W stays finite)."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(DIM, 5, generator=gen, dtype=torch.float64)
    qkx = basis @ torch.randn(10, 5, 40, generator=gen, dtype=torch.float64)  # rank 5 of 32
    white, sigma = whitening.whitening_matrix(qkx)
    assert torch.isfinite(white).all()
    span, _ = torch.linalg.qr(basis)
    assert torch.allclose(span.T @ white @ sigma @ white.T @ span, torch.eye(5, dtype=sigma.dtype), atol=1e-6)


def test_qk_product_matches_the_attention_logits():
    backbone = tiny_vit()
    block = backbone.blocks[0]
    x = torch.randn(5, DIM)
    weight, d = block.attn.qkv.weight.detach(), DIM
    q, k = x @ weight[:d].T, x @ weight[d : 2 * d].T  # timm's q and k without biases
    assert torch.allclose(x @ whitening.qk_product(block) @ x.T, q @ k.T, atol=1e-5)


def test_kurtosis_of_known_distributions():
    rng = np.random.default_rng(0)
    assert whitening.kurtosis(rng.normal(size=200_000)) == pytest.approx(3.0, abs=0.1)
    assert whitening.kurtosis(rng.laplace(size=200_000)) == pytest.approx(6.0, abs=0.3)


def test_whitening_lowers_the_kurtosis_of_bursty_data():
    """qkx with a few huge directions (hyper-Laplacian mixing): whitening brings its entries close to
    unit-variance, far less heavy-tailed coordinates."""
    gen = torch.Generator().manual_seed(0)
    d, n = 16, 400
    mixing = torch.randn(d, d, generator=gen) * torch.logspace(0, 3, d)  # very unequal scales
    qkx = (mixing @ torch.randn(8, d, n, generator=gen)).float()
    white, _ = whitening.whitening_matrix(qkx)
    assert whitening.kurtosis(torch.matmul(white, qkx.double())) < whitening.kurtosis(qkx)


def test_burstiness_picture_data():
    result = whitening.burstiness(tiny_vit(), images(), block=0, bins=21)
    assert len(result.edges) == 22 and len(result.before) == len(result.after) == 21
    assert sum(result.before) == sum(result.after) == result.n_entries == 24 * DIM * 16
    assert result.effective_rank == DIM and result.identity_error < 1e-6
    assert result.kurtosis_before > 0 and result.kurtosis_after > 0
    fig = levers_charts.burstiness_figure(result)
    assert fig.layout.yaxis.type == "log"
    assert "kurtosis" in fig.data[0].name and "kurtosis" in fig.data[1].name
    json.dumps(result.to_dict())  # storable / cacheable as plain data


def test_whitened_init_takes_seeded_columns_of_the_whitening_matrix():
    backbone = tiny_vit()
    white = whitening.whitening_matrices(backbone, images(), [0])[0]
    a = PromptedViT(
        backbone, 3, num_prompts=6, prompt_type="bilinear-whitened", prompt_rank=5, prompt_whitening=white, seed=1
    )
    b = PromptedViT(
        backbone, 3, num_prompts=6, prompt_type="bilinear-whitened", prompt_rank=5, prompt_whitening=white, seed=1
    )
    c = PromptedViT(
        backbone, 3, num_prompts=6, prompt_type="bilinear-whitened", prompt_rank=5, prompt_whitening=white, seed=2
    )
    rows = a.prompts.w[0].detach()
    assert rows.shape == (5, DIM)
    columns = white.T  # column j of the whitening matrix, as a row
    matches = [int(torch.where(torch.isclose(columns, row, atol=1e-6).all(dim=1))[0][0]) for row in rows]
    assert len(set(matches)) == 5  # 5 distinct columns
    assert torch.equal(rows, b.prompts.w[0].detach())
    assert not torch.equal(rows, c.prompts.w[0].detach())


# ---------------------------------------------------------------------------------------- runs
def tiny_config(dataset, **overrides) -> RunConfig:
    values = dict(
        backbone="tiny-random",
        dataset=str(dataset),
        resolution=32,
        shots=None,
        epochs=2,
        batch_size=8,
        lr=1e-2,
        num_prompts=6,
        placement="deep",
        measure_latency=False,
        eval_every=1,
    )
    values.update(overrides)
    return RunConfig(**values)


@pytest.mark.parametrize("prompt_type", ["standard", "bilinear", "bilinear-whitened"])
def test_end_to_end_tiny_run_with_each_prompt_type(image_folder, prompt_type):
    config = tiny_config(image_folder, prompt_type=prompt_type)
    result = run_training(config)
    assert result.status == "done" and 0 <= result.metrics["accuracy"] <= 1
    assert [p["epoch"] for p in result.curve] == [1, 2]  # validation after every epoch
    d, depth, m = 32, 4, 6
    expected = m * d * depth if prompt_type == "standard" else depth * (m * 6 + 6 * d)  # rank = min(50, 6)
    assert result.costs["params_prompts"] == expected
    if prompt_type != "standard":
        assert any(name.startswith("prompts.w.") for name in result.trainable_state)


def test_whitened_run_uses_the_train_split(image_folder, monkeypatch):
    seen = {}
    original = whitening.train_images

    def spy(config, backbone, max_images=whitening.MAX_IMAGES):
        out = original(config, backbone, max_images)
        seen["n"] = len(out)
        return out

    monkeypatch.setattr(whitening, "train_images", spy)
    whitening.clear_whitening_cache()
    result = run_training(tiny_config(image_folder, prompt_type="bilinear-whitened", shots=3), compute_costs=False)
    assert seen["n"] == 3 * 3 == result.metrics["split_sizes"]["train"]  # 3 shots x 3 classes


def test_cli_trains_and_stores_bilinear_runs(image_folder, capsys):
    tiny = ["--backbone", "tiny-random", "--resolution", "32", "--epochs", "1", "--batch-size", "8", "--no-latency"]
    code = cli.main(
        [
            "train",
            "--dataset",
            str(image_folder),
            "--prompts",
            "4",
            "--placement",
            "shallow",
            "--prompt-type",
            "bilinear-whitened",
            "--prompt-rank",
            "3",
            *tiny,
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["status"] == "done"
    row = RunStore().get_run(result["run_id"])
    assert row["config"]["prompt_type"] == "bilinear-whitened" and row["config"]["prompt_rank"] == 3
    assert row["costs"]["params_prompts"] == 4 * 3 + 3 * 32
    assert RunConfig.from_dict(row["config"]).label() == "4 bilinear-whitened shallow prompts (rank 3)"


# ---------------------------------------------------------------------------------------- budget explorer
def _row(run_id, config, accuracy, gmacs, seed=0):
    return {
        "id": run_id,
        "status": "done",
        "source": "live",
        "config": {**config, "seed": seed},
        "metrics": {"accuracy": accuracy, "balanced_accuracy": accuracy},
        "costs": {"gmacs": gmacs},
        "timings": {},
    }


def test_bilinear_and_skip_runs_are_their_own_families_inside_the_pareto_front():
    base = dict(dataset="elpv-binary", tuning="prompt", placement="shallow")
    rows = [
        _row(1, {**base, "tuning": "linear", "num_prompts": 0, "placement": "none"}, 0.70, 1.40),
        _row(2, {**base, "num_prompts": 10}, 0.76, 1.60),
        _row(3, {**base, "num_prompts": 10, "prompt_type": "bilinear"}, 0.78, 1.60),
        _row(4, {**base, "num_prompts": 10, "prompt_type": "bilinear-whitened", "prompt_rank": 5}, 0.79, 1.60),
        _row(5, {**base, "num_prompts": 10, "skip_blocks": [3, 7]}, 0.75, 1.35),  # cheaper than the probe
        _row(6, {**base, "num_prompts": 10, "prompt_type": "bilinear", "skip_blocks": [3]}, 0.60, 1.50),
    ]
    table = budget.runs_table(rows)
    assert list(table["family"]) == ["linear probe", "shallow", "bilinear", "bilinear", "skip blocks", "skip blocks"]
    agg = budget.aggregate_over_seeds(table)
    assert len(agg) == 6  # bilinear and whitened, skip sets: distinct configurations
    assert {"bilinear", "skip blocks"} <= set(agg["family"])
    front = budget.pareto_front(agg)
    assert set(front["family"]) == {"skip blocks", "bilinear"}  # skip 2 blocks (cheapest), whitened (best)
    assert list(front["label"]) == [
        "10 shallow prompts, skip 2 blocks",
        "10 bilinear-whitened shallow prompts (rank 5)",
    ]
    rec = budget.recommend(agg, 5.0)
    assert rec.chosen["family"] == "skip blocks"
    from vptdash.views import charts

    fig = charts.cost_accuracy_figure(agg, recommendation=rec)
    names = {trace.name for trace in fig.data if trace.name}
    assert any("bilinear" in n for n in names) and any("skip blocks" in n for n in names)


def test_old_rows_without_the_new_keys_keep_their_family():
    table = budget.runs_table([_row(1, {"dataset": "elpv-binary", "num_prompts": 5, "placement": "deep"}, 0.7, 2.0)])
    assert list(table["family"]) == ["deep"]
    assert isinstance(table, pd.DataFrame)
