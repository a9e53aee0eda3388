"""Layer skipping (methods.md section 5): redundancy, greedy and DAS searches, real savings."""

import json
import time

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vptdash import cli
from vptdash.engine.cost import analytic_gmacs, block_macs, fvcore_gmacs
from vptdash.engine.prompts import PromptedViT
from vptdash.engine.train import RunConfig, build_model, run_training
from vptdash.methods import skipping
from vptdash.runs.jobs import execute_run
from vptdash.runs.store import RunStore
from vptdash.views import levers_charts

RES, DIM, MLP, DEPTH = 64, 192, 768, 6


def small_vit():
    """Wide enough that norms and biases are small next to the matmuls (fvcore vs formula within 1%)."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=RES, patch_size=8, embed_dim=DIM, depth=DEPTH, num_heads=3, num_classes=0).eval()


def count_calls(model: PromptedViT) -> list[int]:
    calls = [0] * len(model.backbone.blocks)
    for index, block in enumerate(model.backbone.blocks):
        # on norm2: a block computing selected rows is not called as a module; its norm2 always runs, once
        block.norm2.register_forward_hook(lambda *args, i=index: calls.__setitem__(i, calls[i] + 1))
    return calls


# ---------------------------------------------------------------------------------------- savings
@pytest.mark.parametrize(
    "skip,prompts,placement", [([1, 4], 0, "shallow"), ([0, 2, 3, 5], 10, "shallow"), ([1, 4], 4, "deep")]
)
def test_skipping_k_blocks_cuts_analytic_and_fvcore_gmacs_by_k_blocks(skip, prompts, placement):
    full = PromptedViT(small_vit(), 4, num_prompts=prompts, placement=placement)
    skipped = PromptedViT(small_vit(), 4, num_prompts=prompts, placement=placement, skip_blocks=skip)
    tokens = 1 + 64 + prompts
    # a skipped block saves what it computed: every row (shallow) or all but the prompt rows, which the
    # next block's prompt write discards (deep; vptdash.engine.rows)
    rows = tokens - prompts if placement == "deep" else tokens
    expected = len(skip) * block_macs(tokens, DIM, MLP, rows) / 1e9
    assert analytic_gmacs(full, RES) - analytic_gmacs(skipped, RES) == pytest.approx(expected, rel=1e-9)
    assert fvcore_gmacs(full, RES) - fvcore_gmacs(skipped, RES) == pytest.approx(expected, rel=0.01)
    assert skipped.tokens_per_block().count(0) == len(skip)


def test_skipped_blocks_never_run_in_any_path(image_folder):
    config = RunConfig(
        backbone="tiny-random",
        dataset=str(image_folder),
        resolution=32,
        num_prompts=3,
        placement="deep",
        skip_blocks=[1, 3],
        measure_latency=False,
    )
    model = build_model(config, 3)
    calls = count_calls(model)
    images = torch.randn(2, 3, 32, 32)
    model(images)
    assert calls == [1, 0, 1, 0]
    model.forward_from_frozen(model.encode_frozen(images))  # the cached training path too
    assert calls == [2, 0, 2, 0]


def test_skipped_network_is_really_faster():
    """Latency: the minimum over repeats (robust on a shared CPU) drops when 4 of 6 blocks are skipped."""
    full = PromptedViT(small_vit(), 4, num_prompts=10)
    skipped = PromptedViT(small_vit(), 4, num_prompts=10, skip_blocks=[0, 2, 3, 5])
    images = torch.randn(4, 3, RES, RES)

    def best_time(model):
        times = []
        with torch.inference_mode():
            model(images)
            for _ in range(5):
                start = time.perf_counter()
                model(images)
                times.append(time.perf_counter() - start)
        return min(times)

    assert best_time(skipped) < 0.8 * best_time(full)


# ---------------------------------------------------------------------------------------- searches
@pytest.fixture
def search_config(image_folder):
    return RunConfig(
        backbone="tiny-random", dataset=str(image_folder), resolution=32, shots=None, val_fraction=0.25, seed=0
    )


def test_redundancy_greedy_and_das_share_one_objective(search_config):
    evaluator, candidates = skipping.prepare_evaluator(search_config)
    assert candidates == [0, 1, 2, 3] and evaluator.start == 0
    base = evaluator.loss(())
    red = skipping.redundancy(evaluator, candidates)
    assert set(red) == {0, 1, 2, 3}
    for block, change in red.items():
        assert change == pytest.approx(evaluator.loss([block]) - base)

    greedy = skipping.search(search_config, 2, "greedy", evaluator=evaluator)
    assert greedy.method == "greedy" and len(greedy.skip) == 2 and greedy.skip == sorted(greedy.order[:2])
    first = min(red, key=lambda b: (red[b], b))
    assert greedy.order[0] == first  # the first greedy step is the most redundant block
    assert greedy.chosen_loss == pytest.approx(evaluator.loss(greedy.skip))
    assert [p["step"] for p in greedy.trace] == [0, 1, 2]
    # every pair containing the first block was tried: greedy's pick is the best of them
    pairs = [evaluator.loss([first, b]) for b in candidates if b != first]
    assert greedy.chosen_loss == pytest.approx(min(pairs))

    das = skipping.search(search_config, 2, "das", evaluator=evaluator, steps=60)
    assert das.steps == 60 and len(das.trace) == 60 and len(das.scores) == 4
    assert sorted(das.order) == candidates and das.skip == sorted(das.order[:2])
    assert all(0 < w < 1 for w in das.trace[-1]["weights"])
    # 6 possible pairs on 4 blocks: DAS has seen them all, and its scores settle on the best one
    best_pair = min(([a, b] for a in candidates for b in candidates if a < b), key=lambda s: evaluator.loss(s))
    assert das.chosen_loss == pytest.approx(evaluator.loss(best_pair))
    json.dumps(das.to_dict())


def test_das_is_reproducible_and_remembers_losses(search_config):
    evaluator, _ = skipping.prepare_evaluator(search_config)
    a = skipping.search(search_config, 1, "das", evaluator=evaluator, steps=20)
    runs = evaluator.block_runs
    b = skipping.search(search_config, 1, "das", evaluator=evaluator, steps=20)
    assert a.trace == b.trace and a.scores == b.scores
    assert evaluator.block_runs == runs and b.evaluations == 0  # nothing recomputed


def test_prefix_cache_gives_the_same_losses(search_config):
    cached, _ = skipping.prepare_evaluator(search_config)
    fresh, _ = skipping.prepare_evaluator(search_config)
    fresh.cache_bytes = 0  # nothing kept: every block runs from the start
    for skip in ([], [2], [1, 2], [0, 3], [3]):
        assert cached.loss(skip) == pytest.approx(fresh.loss(skip), abs=1e-6)
    assert cached.block_runs < fresh.block_runs


def test_bad_searches_fail_clearly(search_config):
    with pytest.raises(skipping.SkipSearchError, match="method"):
        skipping.search(search_config, 1, "random")
    with pytest.raises(skipping.SkipSearchError, match="k must be"):
        skipping.search(search_config, 5, "greedy")
    with pytest.raises(skipping.SkipSearchError, match="outside"):
        skipping.prepare_evaluator(search_config, candidates=[2, 9])
    with pytest.raises(skipping.SkipSearchError, match="validation"):
        skipping.prepare_evaluator(RunConfig.from_dict({**search_config.to_dict(), "val_fraction": 0.0}))


def test_figures(search_config):
    evaluator, _ = skipping.prepare_evaluator(search_config)
    for method in ("greedy", "das"):
        result = skipping.search(search_config, 2, method, steps=10, evaluator=evaluator)
        red = levers_charts.redundancy_figure(result)
        assert list(red.data[0].x) == [0, 1, 2, 3]
        trace = levers_charts.trace_figure(result.to_dict())
        assert len(trace.data) == (1 if method == "greedy" else 4)


# ---------------------------------------------------------------------------------------- jobs, CLI, training
def test_search_job_through_the_store_and_worker_path(search_config):
    store = RunStore()
    run_id = skipping.submit_skip_search(store, search_config, 2, "das", steps=15)
    row = store.get_run(run_id)
    assert row["kind"] == "skip-search" and row["status"] == "queued"
    assert RunConfig.from_dict(row["config"]) == search_config  # the run configuration, plus search keys
    done = execute_run(store, run_id)  # what the worker calls
    assert done["status"] == "done" and done["metrics"] == {}  # a search is not a model: no accuracy point
    result = skipping.stored_result(store, run_id)
    assert result.method == "das" and len(result.skip) == 2 and result.steps == 15
    assert done["timings"]["evaluations"] == result.evaluations
    assert any(e["phase"] == "search" for e in store.progress(run_id))
    from vptdash.views import budget

    assert len(budget.runs_table(store.list_runs(status="done"))) == 0
    assert [r["id"] for r in skipping.search_rows(store)] == [run_id]


def test_failing_search_is_stored_as_failed(search_config):
    store = RunStore()
    run_id = skipping.submit_skip_search(store, search_config, 9, "greedy")  # only 4 blocks
    row = execute_run(store, run_id)
    assert row["status"] == "failed" and "k must be" in row["error"]


def test_cli_skip_search_then_train_the_skipped_network(image_folder, capsys):
    data = ["--backbone", "tiny-random", "--resolution", "32", "--dataset", str(image_folder), "--val-fraction", "0.25"]
    code = cli.main(["skip-search", *data, "--k", "2", "--method", "greedy", "--json"])
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and found["status"] == "done" and len(found["skip"]) == 2
    assert len(found["redundancy"]) == 4

    skip = ",".join(map(str, found["skip"]))
    train = ["--epochs", "1", "--batch-size", "8", "--prompts", "3", "--no-latency", "--json"]
    assert cli.main(["train", *data, *train]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main(["train", *data, *train, "--skip-blocks", skip]) == 0
    skipped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = RunStore().get_run(skipped["run_id"])
    assert row["config"]["skip_blocks"] == found["skip"]  # the run records which blocks were skipped
    assert RunConfig.from_dict(row["config"]).family() == "skip blocks"
    assert row["costs"]["tokens_per_block"].count(0) == 2
    assert skipped["gmacs"] < full["gmacs"]


def test_skipped_run_end_to_end_with_bilinear_prompts(image_folder):
    config = RunConfig(
        backbone="tiny-random",
        dataset=str(image_folder),
        resolution=32,
        shots=None,
        epochs=1,
        batch_size=8,
        num_prompts=4,
        placement="shallow",
        prompt_type="bilinear",
        skip_blocks=[2],
        measure_latency=False,
    )
    result = run_training(config)
    assert result.status == "done"
    assert result.costs["tokens_per_block"][2] == 0
    assert config.family() == "skip blocks" and config.label().endswith("(rank 4), skip 1 blocks")


# ---------------------------------------------------------------------------------------- pages
APP_TEMPLATE = """
import streamlit as st
from vptdash.ui import resources
from vptdash.ui import session

session.init_state()
page = st.navigation([st.Page("app_pages/levers.py", title="Cost levers", default=True),
                      st.Page("app_pages/train.py", title="Train")])
store = resources.get_store()
page.run()
"""


@pytest.fixture
def levers_app(tmp_path, monkeypatch, image_folder):
    """The Cost levers and Train pages in a small navigation (app.py registers app_pages/levers.py in the real app)."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from vptdash.runs import worker

    root = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("VPTDASH_NO_WARMUP", "1")
    monkeypatch.setattr(worker, "ensure_worker", lambda store, **kw: True)
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app_pages").symlink_to(root / "app_pages", target_is_directory=True)
    (app_dir / "app.py").write_text(APP_TEMPLATE)
    monkeypatch.syspath_prepend(str(root))
    at = AppTest.from_file(str(app_dir / "app.py"), default_timeout=60)
    at.session_state["active_dataset"] = str(image_folder)
    at.session_state["active_backbone"] = "tiny-random"
    at.session_state["active_resolution"] = 32
    at.session_state["active_shots"] = None
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _specs(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def test_levers_page_burstiness_search_and_apply(levers_app):
    at = levers_app
    assert at.title[0].value == "Cost levers"
    specs = _specs(at)
    assert specs and specs[0]["layout"]["yaxis"]["type"] == "log"  # the burstiness histogram
    assert "Kurtosis before" in [m.label for m in at.metric]

    at.number_input(key="levers_k").set_value(2).run()
    at.button(key="levers_search").click().run()  # tiny backbone: runs inline
    assert not at.exception, [e.message for e in at.exception]
    [row] = skipping.search_rows(RunStore())
    assert row["status"] == "done"
    result = skipping.stored_result(RunStore(), row["id"])
    titles = [s["layout"]["title"]["text"] for s in _specs(at)]
    assert any("redundancy" in t for t in titles) and any("Greedy search" in t for t in titles)

    at.button(key="levers_apply").click().run()  # -> Train page with the blocks pre-selected
    assert not at.exception, [e.message for e in at.exception]
    assert at.session_state["train_pending_config"]["skip_blocks"] == result.skip


def test_train_page_prompt_type_rank_and_skip_controls(levers_app):
    at = levers_app
    at.switch_page("app_pages/train.py").run()
    at.select_slider(key="train_prompts").set_value(5).run()
    at.button_group(key="train_prompt_type").set_value("bilinear-whitened").run()
    at.number_input(key="train_prompt_rank").set_value(3).run()
    at.button_group(key="train_skip_4").set_value([1, 2]).run()
    config = at.session_state["train_pending_config"]
    assert (config["prompt_type"], config["prompt_rank"], config["skip_blocks"]) == ("bilinear-whitened", 3, [1, 2])
    assert "skip 2 blocks" in at.button(key="train_submit").label

    at.number_input(key="train_skip_k").set_value(1).run()
    at.button(key="train_skip_suggest").click().run()  # inline for the tiny backbone
    assert not at.exception, [e.message for e in at.exception]
    [row] = skipping.search_rows(RunStore())
    found = skipping.stored_result(RunStore(), row["id"])
    assert at.session_state["train_pending_config"]["skip_blocks"] == found.skip and len(found.skip) == 1
    assert "No run yet" in " ".join(str(i.value) for i in at.info)  # a search is not a run to watch


def test_das_evaluation_budget_counts_only_its_own_new_subnetworks(search_config):
    evaluator, _ = skipping.prepare_evaluator(search_config)
    skipping.search(search_config, 2, "greedy", evaluator=evaluator)  # remembers 1 + 4 + 3 subnetworks
    before = evaluator.evaluations
    das = skipping.search(
        search_config, 2, "das", evaluator=evaluator, steps=50, max_evaluations=1, with_redundancy=False
    )
    assert das.stopped == "evaluation budget" and das.steps >= 1
    assert evaluator.evaluations - before >= 1  # it did evaluate something new before stopping
