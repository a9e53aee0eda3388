import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vptdash.engine.cost import (
    analytic_gmacs,
    block_macs,
    count_parameters,
    full_graph_gmacs,
    fvcore_full_graph_gmacs,
    fvcore_gmacs,
    measure_latency,
    run_costs,
)
from vptdash.engine.prompts import PromptedViT

RES = 64


def small_vit():
    """Wide enough that norms/biases are small next to the matmuls, like a real ViT."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=RES, patch_size=8, embed_dim=192, depth=3, num_heads=3, num_classes=0).eval()


@pytest.mark.parametrize("prompts", [0, 10, 100])
@pytest.mark.parametrize("placement", ["shallow", "deep"])
def test_fvcore_agrees_with_formula_within_1_percent(prompts, placement):
    model = PromptedViT(small_vit(), 4, num_prompts=prompts, placement=placement)
    counted, formula = fvcore_gmacs(model, RES), analytic_gmacs(model, RES)
    assert counted == pytest.approx(formula, rel=0.01)


def test_gmacs_grow_with_prompts_as_the_formula_predicts():
    """Prompts add keys/values to every block they reach; deep prompts' own outputs are never computed
    (the next block overwrites them), shallow ones run through every block; the last block computes
    the CLS row only. Growth is linear + quadratic in the prompt count, counted by fvcore."""
    base = fvcore_gmacs(PromptedViT(small_vit(), 4, num_prompts=0), RES)
    d, m, n, depth = 192, 768, 1 + 64, 3

    def extra(p: int, rows_before_last: int) -> float:
        early = (depth - 1) * (block_macs(n + p, d, m, rows_before_last) - block_macs(n, d, m))
        return (early + block_macs(n + p, d, m, 1) - block_macs(n, d, m, 1)) / 1e9

    for p in (10, 50):
        deep = fvcore_gmacs(PromptedViT(small_vit(), 4, num_prompts=p, placement="deep"), RES)
        shallow = fvcore_gmacs(PromptedViT(small_vit(), 4, num_prompts=p, placement="shallow"), RES)
        # rel 2%: fvcore also counts the layer norms over the prompt rows, which the formula leaves out
        assert deep - base == pytest.approx(extra(p, n), rel=0.02)
        assert shallow - base == pytest.approx(extra(p, n + p), rel=0.02)
        assert deep < shallow


def test_whole_blocks_cost_the_textbook_formula():
    """With row selection off (the official VPT code's graph) every block computes every token."""
    model = PromptedViT(small_vit(), 4, num_prompts=10, placement="deep")
    model.row_selection = False
    assert model.rows_per_block() == model.tokens_per_block() == [75, 75, 75]
    whole = fvcore_gmacs(model, RES)
    model.row_selection = True
    assert model.rows_per_block() == [65, 65, 1]
    assert fvcore_gmacs(model, RES) < 0.8 * whole
    assert whole == pytest.approx(
        analytic_gmacs(PromptedViT(small_vit(), 4, num_prompts=0), RES)
        + 3 * (block_macs(75, 192, 768) - block_macs(65, 192, 768)) / 1e9
        + (block_macs(65, 192, 768) - block_macs(65, 192, 768, 1)) / 1e9,
        rel=0.01,
    )


def test_attention_is_counted_not_dropped():
    """If SDPA were left fused, fvcore would count the attention matmuls as 0 and the quadratic term vanishes."""
    model = PromptedViT(small_vit(), 4, num_prompts=100, placement="deep")
    d, m = 192, 768
    linear_part = (
        sum(
            n * 2 * d * d + r * (2 * d * d + 2 * d * m)
            for n, r in zip(model.tokens_per_block(), model.rows_per_block())
        )
        / 1e9
    )
    assert fvcore_gmacs(model, RES) > linear_part * 1.05


def test_skipping_blocks_cuts_gmacs_by_one_block_each():
    full = PromptedViT(small_vit(), 4, num_prompts=5)
    skipped = PromptedViT(small_vit(), 4, num_prompts=5, skip_blocks=[1, 2])
    one_block = block_macs(1 + 5 + 64, 192, 768) / 1e9
    assert fvcore_gmacs(full, RES) - fvcore_gmacs(skipped, RES) == pytest.approx(2 * one_block, rel=0.01)
    assert analytic_gmacs(full, RES) - analytic_gmacs(skipped, RES) == pytest.approx(2 * one_block, rel=1e-9)


def test_fused_attention_restored_after_counting():
    model = PromptedViT(small_vit(), 4, num_prompts=5)
    fvcore_gmacs(model, RES)
    assert all(block.attn.fused_attn for block in model.backbone.blocks)


def test_parameter_counts():
    model = PromptedViT(small_vit(), 4, num_prompts=10, placement="deep")
    counts = count_parameters(model)
    assert counts["params_prompts"] == 10 * 192 * 3
    assert counts["params_trainable"] == 10 * 192 * 3 + 192 * 4 + 4
    assert counts["params_total"] == counts["params_trainable"] + sum(p.numel() for p in model.backbone.parameters())


def test_latency_reports_median_and_spread():
    model = PromptedViT(small_vit(), 4, num_prompts=5)
    result = measure_latency(model, RES, batch_size=4, warmup=1, repeats=5)
    assert result["repeats"] == 5
    assert 0 < result["p25_ms_per_image"] <= result["median_ms_per_image"] <= result["p75_ms_per_image"]
    assert result["threads"] == torch.get_num_threads()


def test_run_costs_has_every_figure():
    costs = run_costs(PromptedViT(small_vit(), 4, num_prompts=5), RES)
    for key in (
        "gmacs",
        "gmacs_full_graph",
        "gmacs_analytic",
        "latency_ms_b1",
        "latency_ms_b32",
        "params_trainable",
        "tokens_per_block",
    ):
        assert key in costs
    assert costs["tokens_per_block"] == [70, 70, 70]
    # the last block computes only CLS in the executed graph: the full graph is larger
    assert costs["gmacs_full_graph"] > costs["gmacs"]


@pytest.fixture(scope="module")
def vit_b16():
    """ViT-B/16 at 224 px with random weights: the architecture of the published FLOPs tables, no download."""
    import timm  # noqa: PLC0415 - only this fixture builds a timm model by name

    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()


@pytest.mark.parametrize(("prompts", "expected"), [(0, 17.58), (100, 27.00)])
def test_full_graph_matches_the_published_vit_b16_table(vit_b16, prompts, expected):
    """Kim et al. count every token through every block: 17.6 / 26.9 G at 0 / 100 prompts (their FLOPs are
    MACs); to two decimals 17.58 / 27.00 (methods.md section 2). Deep or shallow does not matter there."""
    for placement in ("deep", "shallow"):
        model = PromptedViT(vit_b16, 100, num_prompts=prompts, placement=placement)
        assert full_graph_gmacs(model, 224) == pytest.approx(expected, abs=0.005)
        assert model.row_selection  # the full-graph count leaves the model as it was


def test_fvcore_counts_the_same_full_graph(vit_b16):
    model = PromptedViT(vit_b16, 100, num_prompts=100, placement="deep")
    assert fvcore_full_graph_gmacs(model, 224) == pytest.approx(full_graph_gmacs(model, 224), rel=1e-4)
    for placement, skip in (("deep", ()), ("shallow", ()), ("0,2", (1,))):
        small = PromptedViT(small_vit(), 4, num_prompts=10, placement=placement, skip_blocks=skip)
        assert fvcore_full_graph_gmacs(small, RES) == pytest.approx(full_graph_gmacs(small, RES), rel=1e-4)


def test_executed_deep_prompts_add_keys_values_and_attention_of_the_computed_rows(vit_b16):
    """Per block, N_p deep prompts only add keys and values (2 N_p d^2) and the computed rows R attend to
    them (QK^T and AV: 2 R N_p d); R = 197 in blocks 0..10 and 1 (CLS) in the last block."""
    d, n, depth = 768, 197, 12
    base = analytic_gmacs(PromptedViT(vit_b16, 100, num_prompts=0), 224)
    for p in (1, 50, 100):
        model = PromptedViT(vit_b16, 100, num_prompts=p, placement="deep")
        rows = [n] * (depth - 1) + [1]
        assert model.rows_per_block(196) == rows
        growth = sum(2 * p * d * d + 2 * r * p * d for r in rows) / 1e9
        assert analytic_gmacs(model, 224) - base == pytest.approx(growth, rel=1e-9)
    # the published reading: +53% full graph at 100 prompts, far less executed
    deep100 = PromptedViT(vit_b16, 100, num_prompts=100, placement="deep")
    assert analytic_gmacs(deep100, 224) == pytest.approx(18.10, abs=0.01)
    assert base == pytest.approx(16.35, abs=0.01)


def test_executed_growth_counted_by_fvcore():
    """The same growth law, from the trace, on a small ViT (layer norms over prompt rows: within 2%)."""
    d, n, depth = 192, 65, 3
    base = fvcore_gmacs(PromptedViT(small_vit(), 4, num_prompts=0), RES)
    for p in (10, 40):
        model = PromptedViT(small_vit(), 4, num_prompts=p, placement="deep")
        rows = [n] * (depth - 1) + [1]
        growth = sum(2 * p * d * d + 2 * r * p * d for r in rows) / 1e9
        assert fvcore_gmacs(model, RES) - base == pytest.approx(growth, rel=0.02)


# ---------------------------------------------------------------------------------------- the cost cache
@pytest.fixture
def spies(monkeypatch):
    """Count the expensive passes: fvcore's trace and the latency timer (each returns a fixed figure)."""
    from vptdash.engine import cost

    calls = {"fvcore": 0, "latency": 0}

    def fake_fvcore(model, resolution):
        calls["fvcore"] += 1
        return 1.25

    def fake_latency(model, resolution, *, precision="fp32"):
        calls["latency"] += 1
        return {"latency_ms_b1": 3.0, "latency_ms_b32": 1.5, "latency_precision": precision}

    monkeypatch.setattr(cost, "fvcore_gmacs", fake_fvcore)
    monkeypatch.setattr(cost, "latency_costs", fake_latency)
    return calls


def _arch(**settings) -> str:
    from vptdash.engine.train import RunConfig, architecture_key

    return architecture_key(RunConfig(**{"num_prompts": 5, "placement": "deep", **settings}))


def test_same_architecture_is_counted_and_timed_once(spies, tmp_path):
    path = tmp_path / "costs.json"
    model = PromptedViT(small_vit(), 4, num_prompts=5, placement="deep")
    first = run_costs(model, RES, architecture=_arch(seed=0), cache_path=path)
    assert spies == {"fvcore": 1, "latency": 1}
    assert not first["gmacs_cached"] and not first["latency_cached"]
    # another seed and learning rate: the same network, so nothing is traced or timed again
    again = run_costs(
        PromptedViT(small_vit(), 4, num_prompts=5, placement="deep", seed=7),
        RES,
        architecture=_arch(seed=7, lr=0.1),
        cache_path=path,
    )
    assert spies == {"fvcore": 1, "latency": 1}
    assert again["gmacs_cached"] and again["latency_cached"]
    assert again["gmacs"] == 1.25 and again["latency_ms_b1"] == 3.0
    assert again["gmacs_analytic"] == first["gmacs_analytic"]  # the formula is computed every time


def test_another_prompt_count_is_counted_and_timed_again(spies, tmp_path):
    path = tmp_path / "costs.json"
    run_costs(PromptedViT(small_vit(), 4, num_prompts=5, placement="deep"), RES, architecture=_arch(), cache_path=path)
    other = run_costs(
        PromptedViT(small_vit(), 4, num_prompts=6, placement="deep"),
        RES,
        architecture=_arch(num_prompts=6),
        cache_path=path,
    )
    assert spies == {"fvcore": 2, "latency": 2}
    assert not other["gmacs_cached"] and not other["latency_cached"]


def test_without_latency_only_the_count_is_cached(spies, tmp_path):
    path = tmp_path / "costs.json"
    model = PromptedViT(small_vit(), 4, num_prompts=5, placement="deep")
    costs = run_costs(model, RES, measure=False, architecture=_arch(), cache_path=path)
    assert "latency_ms_b1" not in costs and spies == {"fvcore": 1, "latency": 0}
    costs = run_costs(model, RES, architecture=_arch(), cache_path=path)
    assert spies == {"fvcore": 1, "latency": 1} and costs["latency_ms_b1"] == 3.0


def test_a_cached_count_of_another_graph_is_not_reused(spies, tmp_path):
    """The key names the configuration; if the model it builds executes a different graph (a code change,
    another backbone under the same name) its analytic count differs and fvcore counts again."""
    path = tmp_path / "costs.json"
    run_costs(PromptedViT(small_vit(), 4, num_prompts=5, placement="deep"), RES, architecture=_arch(), cache_path=path)
    different = PromptedViT(small_vit(), 4, num_prompts=5, placement="shallow")  # same key on purpose
    assert run_costs(different, RES, architecture=_arch(), cache_path=path)["gmacs_cached"] is False
    assert spies == {"fvcore": 2, "latency": 2}


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", '{"gmacs": 5}', ""])
def test_a_corrupt_cache_file_is_recounted_with_one_warning_line(spies, tmp_path, capsys, content):
    path = tmp_path / "costs.json"
    path.write_text(content)
    model = PromptedViT(small_vit(), 4, num_prompts=5, placement="deep")
    costs = run_costs(model, RES, architecture=_arch(), cache_path=path)
    assert spies == {"fvcore": 1, "latency": 1} and costs["gmacs"] == 1.25
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cost cache" in err and str(path) in err and "Traceback" not in err
    # the recount replaced the corrupt file: the next run reuses it, silently
    assert run_costs(model, RES, architecture=_arch(), cache_path=path)["gmacs_cached"]
    assert spies == {"fvcore": 1, "latency": 1} and capsys.readouterr().err == ""


def test_a_damaged_entry_is_recounted(spies, tmp_path):
    import json

    path = tmp_path / "costs.json"
    model = PromptedViT(small_vit(), 4, num_prompts=5, placement="deep")
    run_costs(model, RES, architecture=_arch(), cache_path=path)
    entries = json.loads(path.read_text())
    for entry in entries["gmacs"].values():
        entry["values"]["gmacs"] = "many"
    for entry in entries["latency"].values():
        del entry["values"]["latency_ms_b1"]
    path.write_text(json.dumps(entries))
    run_costs(model, RES, architecture=_arch(), cache_path=path)
    assert spies == {"fvcore": 2, "latency": 2}


def test_latency_is_keyed_by_machine_threads_and_precision(spies, tmp_path, monkeypatch):
    from vptdash.engine import cost

    path = tmp_path / "costs.json"
    model = PromptedViT(small_vit(), 4, num_prompts=5, placement="deep")
    run_costs(model, RES, architecture=_arch(), cache_path=path)
    run_costs(model, RES, architecture=_arch(), cache_path=path, precision="bf16")
    assert spies == {"fvcore": 1, "latency": 2}
    machine = cost.cpu_description()
    monkeypatch.setattr(cost, "cpu_description", lambda: {**machine, "threads": machine["threads"] + 1})
    run_costs(model, RES, architecture=_arch(), cache_path=path)
    assert spies == {"fvcore": 1, "latency": 3}  # the count is the machine's business no longer


def test_latency_is_keyed_by_the_openmp_wait_setting(spies, tmp_path, monkeypatch):
    """Passive waiting doubled batch-1 latency on a quiet machine: a figure timed under one wait setting
    is not reused under another."""
    from vptdash.engine import openmp

    path = tmp_path / "costs.json"
    model = PromptedViT(small_vit(), 4, num_prompts=5, placement="deep")
    monkeypatch.setattr(openmp, "in_force", lambda: "GOMP_SPINCOUNT=10000")
    run_costs(model, RES, architecture=_arch(), cache_path=path)
    run_costs(model, RES, architecture=_arch(), cache_path=path)
    assert spies["latency"] == 1
    monkeypatch.setattr(openmp, "in_force", lambda: "OMP_WAIT_POLICY=PASSIVE")
    run_costs(model, RES, architecture=_arch(), cache_path=path)
    assert spies["latency"] == 2


def test_stored_latency_names_the_wait_setting_it_was_timed_under(monkeypatch):
    from vptdash.engine import cost, openmp

    timing = {"median_ms_per_image": 1.0, "p25_ms_per_image": 1.0, "p75_ms_per_image": 1.0, "threads": 2}
    monkeypatch.setattr(cost, "measure_latency", lambda *a, **k: timing)
    monkeypatch.setattr(openmp, "in_force", lambda: "GOMP_SPINCOUNT=3000")
    assert cost.latency_costs(None, RES)["latency_openmp_wait"] == "GOMP_SPINCOUNT=3000"


def test_a_parallel_sweeps_up_front_latency_shares_the_cache_with_single_runs(spies, tmp_path):
    """A sweep with several processes times each architecture up front; a one-process run of the same
    architecture later (or earlier) reuses that timing instead of measuring again, and the other way round."""
    from vptdash.engine.cost import cached_latency_costs

    path = tmp_path / "costs.json"
    model = PromptedViT(small_vit(), 4, num_prompts=5, placement="deep")
    first = cached_latency_costs(model, RES, architecture=_arch(), cache_path=path)
    assert spies["latency"] == 1 and first["latency_cached"] is False and first["latency_ms_b1"] == 3.0
    run = run_costs(model, RES, architecture=_arch(seed=3), cache_path=path)
    assert spies["latency"] == 1 and run["latency_cached"] is True
    again = cached_latency_costs(model, RES, architecture=_arch(lr=0.5), cache_path=path)
    assert spies["latency"] == 1 and again["latency_cached"] is True and again["latency_ms_b32"] == 1.5
    other = PromptedViT(small_vit(), 4, num_prompts=6, placement="deep")
    fresh = cached_latency_costs(other, RES, architecture=_arch(num_prompts=6), cache_path=path)
    assert fresh["latency_cached"] is False
    assert spies["latency"] == 2 and spies["fvcore"] == 1  # the up-front timing never traces
