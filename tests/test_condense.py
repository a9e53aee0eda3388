"""Prompt condensation (vptdash.methods.condense): scoring, selection, the child run, its cost, the parent untouched."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from vptdash import cli
from vptdash.engine import cost
from vptdash.engine.train import RunConfig, build_model
from vptdash.methods import attention, condense
from vptdash.runs import jobs
from vptdash.runs.store import RunStore
from vptdash.views import attention_charts, budget, charts

DIM, DEPTH = 32, 4  # tiny-random


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two parents trained once for the whole module (shallow 6, deep 4 per block), in their own store."""
    root = tmp_path_factory.mktemp("condense")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VPTDASH_HOME", str(root / "home"))
        folder = make_image_folder(root / "images", per_class=10)
        store = RunStore(root / "store" / "runs.sqlite")
        base = dict(
            backbone="tiny-random",
            dataset=str(folder),
            resolution=32,
            shots=None,
            epochs=2,
            batch_size=8,
            lr=1e-2,
            measure_latency=False,
            seed=0,
        )
        shallow = jobs.run_now(store, RunConfig(**base, num_prompts=6, placement="shallow"))
        deep = jobs.run_now(store, RunConfig(**base, num_prompts=4, placement="deep"))
    assert shallow["status"] == "done" and deep["status"] == "done", (shallow["error"], deep["error"])
    return {"store": store, "shallow": shallow["id"], "deep": deep["id"], "base": base, "root": root}


def snapshot(store, run_id):
    row = store.get_run(run_id)
    digest = hashlib.sha256(Path(row["artifact_path"]).read_bytes()).hexdigest()
    return {k: row[k] for k in ("status", "config", "metrics", "costs", "timings", "kind", "parent_id")}, digest


def fresh_gmacs(config: RunConfig, num_classes: int = 3) -> float:
    return cost.fvcore_gmacs(build_model(config, num_classes), config.resolution)


def test_shallow_condensed_run_has_exactly_k_prompts_and_the_cost_of_a_fresh_k_run(trained):
    store, parent = trained["store"], trained["shallow"]
    before = snapshot(store, parent)
    run_id = condense.submit_condense(store, parent, keep=2, epochs=1)
    row = jobs.execute_run(store, run_id)  # the worker's path: dispatched on kind "condense"
    assert row["status"] == "done", row["error"]
    assert row["kind"] == "condense" and row["parent_id"] == parent
    config = RunConfig.from_dict(row["config"])
    assert config.prompt_counts == [2] and config.family() == "condensed" and config.placement == "shallow"
    assert config.lr == pytest.approx(condense.FINETUNE_LR_FACTOR * trained["base"]["lr"])  # a gentle fine-tune
    assert config.epochs == 1 and config.warmup_epochs == 0 and config.seed == trained["base"]["seed"]
    state = store.load_artifact(run_id)
    assert state["prompts.tensors.0"].shape == (2, DIM)
    assert row["metrics"]["kept_prompts"] == 2 and row["metrics"]["parent_prompts"] == 6
    assert row["costs"]["params_prompts"] == 2 * DIM
    fresh = RunConfig(**trained["base"], num_prompts=2, placement="shallow")
    assert row["costs"]["gmacs"] == pytest.approx(fresh_gmacs(fresh), rel=1e-12)
    assert row["costs"]["tokens_per_block"] == build_model(fresh, 3).tokens_per_block((32 // 16) ** 2)
    assert snapshot(store, parent) == before  # the parent is untouched


def test_deep_condensed_run_costs_what_its_per_block_counts_cost(trained):
    store, parent = trained["store"], trained["deep"]
    before = snapshot(store, parent)
    row = condense.condense_now(store, parent, keep=8, epochs=1)
    assert row["status"] == "done", row["error"]
    counts = row["config"]["prompt_counts"]
    assert sum(counts) == 8 and len(counts) == DEPTH and row["metrics"]["kept_counts"] == counts
    state = store.load_artifact(row["id"])
    assert [state[f"prompts.tensors.{i}"].shape[0] for i in range(DEPTH)] == counts
    # exactly the GMACs of a fresh run with the same per-block counts
    same = RunConfig(**trained["base"], num_prompts=max(counts), placement="deep", prompt_counts=counts)
    assert row["costs"]["gmacs"] == pytest.approx(fresh_gmacs(same), rel=1e-12)
    # vs a fresh uniform deep run with 8 / 4 = 2 per block: the same prompt tokens in total. Deep prompts
    # are only keys and values (their own rows are never computed: vptdash.engine.rows), so each block's cost is
    # linear in its prompt count, 2 d^2 + 2 R d per prompt with R its computed rows: R = prefix + patches,
    # except the last block, whose single CLS row makes each of its prompts 2 d (R - 1) MACs cheaper.
    uniform = RunConfig(**trained["base"], num_prompts=2, placement="deep")
    tokens = row["costs"]["tokens_per_block"]
    uniform_model, condensed_model = build_model(uniform, 3), build_model(same, 3)
    assert sum(tokens) == sum(uniform_model.tokens_per_block(4))
    assert row["costs"]["rows_per_block"] == condensed_model.rows_per_block(4) == [1 + 4] * (DEPTH - 1) + [1]
    expected = -2 * DIM * (1 + 4 - 1) * (counts[-1] - 2) / 1e9
    assert cost.analytic_gmacs(condensed_model, 32) - cost.analytic_gmacs(uniform_model, 32) == pytest.approx(
        expected, abs=1e-15
    )
    assert row["costs"]["gmacs"] - fresh_gmacs(uniform) == pytest.approx(expected, abs=1e-15)
    assert snapshot(store, parent) == before


def test_keeping_everything_reproduces_the_parent_before_fine_tuning(trained):
    store, parent = trained["store"], trained["deep"]
    row = condense.condense_now(store, parent, keep_fraction=1.0, epochs=1, lr=3e-4)
    assert row["status"] == "done", row["error"]
    assert row["config"]["lr"] == 3e-4
    assert row["config"]["prompt_counts"] == [4] * DEPTH
    assert row["metrics"]["accuracy_pruned"] == store.get_run(parent)["metrics"]["accuracy"]


def test_scoring_is_deterministic_and_batch_independent(trained):
    store, parent = trained["store"], trained["deep"]
    a = condense.score_run(store, parent)
    b = condense.score_run(store, parent)
    assert a.counts == [4] * DEPTH and a.method == "taylor" and a.n_images > 0
    assert all(np.array_equal(x, y) for x, y in zip(a.scores, b.scores))
    assert a.ranking() == b.ranking()
    assert all((s >= 0).all() for s in a.scores) and any((s > 0).any() for s in a.scores)
    # the score is |P . dL/dP| of the mean loss over the whole train split, whatever the batching
    run = attention.load_trained_model(store, parent)
    images = attention.run_images(run.config, "train")
    encoded = run.model.encode_frozen(attention.normalize_for(run.model, images.images))
    whole = condense.taylor_scores(run.model, encoded, images.labels, batch_size=len(images.labels))
    pairs = condense.taylor_scores(run.model, encoded, images.labels, batch_size=2)
    # A score is |sum(P * dL/dP)|: a sum that cancels, so another batching changes a small score by
    # rounding relative to the block's largest one, not to itself. Measured on a 2-core EPYC: 1.1e-9
    # on a score of 7.9e-7 (0.14% of it) whose block's largest is 2.7e-6 (0.04% of that); the bound
    # is 0.2% of the block's largest. A change of the batching's meaning (a sum instead of the mean
    # loss) moves every score by the batch-count factor and fails it.
    for x, y, z in zip(whole.scores, pairs.scores, a.scores):
        scale = float(np.abs(x).max())
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-3 * scale)
        np.testing.assert_allclose(x, z, rtol=1e-4, atol=2e-3 * scale)
    # by hand for one prompt
    params = list(run.model.prompts.tensors)
    loss = torch.nn.functional.cross_entropy(run.model.forward_from_frozen(encoded), images.labels)
    grads = torch.autograd.grad(loss, params)
    by_hand = float((params[1][3] * grads[1][3]).sum().abs().detach())
    assert whole.scores[1][3] == pytest.approx(by_hand, rel=1e-4)


def test_same_seed_same_scores_across_retrained_parents(trained, tmp_path):
    store = RunStore(tmp_path / "other.sqlite")
    config = RunConfig(**trained["base"], num_prompts=4, placement="deep")
    first = jobs.run_now(store, config)["id"]
    second = jobs.run_now(store, RunConfig.from_dict(config.to_dict()))["id"]
    a, b = condense.score_run(store, first), condense.score_run(store, second)
    assert all(np.array_equal(x, y) for x, y in zip(a.scores, b.scores))
    kept = condense.select_prompts(a, 5)
    assert kept == condense.select_prompts(b, 5) and sum(map(len, kept)) == 5


def test_global_selection_and_state():
    scores = condense.PromptScores((0, 1, 2), [np.array([0.5, 0.1, 0.9]), np.array([0.7, 0.7]), np.array([0.05])])
    assert scores.ranking()[:4] == [(0, 2), (1, 0), (1, 1), (0, 0)]  # ties by block, then index
    assert condense.select_prompts(scores, 3) == [[2], [0, 1], []]
    parent = {
        "prompts.tensors.0": torch.arange(6.0).reshape(3, 2),
        "prompts.tensors.1": torch.ones(2, 2),
        "prompts.tensors.2": torch.zeros(1, 2),
        "head.weight": torch.ones(3, 2),
        "head.bias": torch.zeros(3),
    }
    state = condense.condensed_state(parent, [[0, 2], [], [0]])
    assert torch.equal(state["prompts.tensors.0"], torch.tensor([[0.0, 1.0], [4.0, 5.0]]))
    assert state["prompts.tensors.1"].shape == (0, 2)
    assert torch.equal(state["head.weight"], parent["head.weight"])
    assert condense.resolve_keep(1200, keep_fraction=0.3) == 360
    assert condense.resolve_keep(10, keep_fraction=0.01) == 1
    for bad in (
        {"keep": 0},
        {"keep": 11},
        {"keep_fraction": 0.0},
        {"keep_fraction": 1.5},
        {},
        {"keep": 2, "keep_fraction": 0.5},
    ):
        with pytest.raises(condense.CondenseError):
            condense.resolve_keep(10, **bad)


def test_refusals_are_clear_and_store_nothing(trained, tmp_path):
    store = trained["store"]
    n = len(store.list_runs())
    with pytest.raises(condense.CondenseError, match="exactly one"):
        condense.submit_condense(store, trained["shallow"])
    with pytest.raises(condense.CondenseError, match="no run"):
        condense.submit_condense(store, 99999, keep=1)
    probe = store.create_run(
        {**RunConfig(**trained["base"], tuning="linear", num_prompts=0).to_dict()}, status="done", kind="probe"
    )
    with pytest.raises(condense.CondenseError, match="linear probe"):
        condense.submit_condense(store, probe, keep=1)
    no_artifact = store.create_run(RunConfig(**trained["base"], num_prompts=3).to_dict(), status="done")
    with pytest.raises(condense.CondenseError, match="no stored prompts"):
        condense.submit_condense(store, no_artifact, keep=1)
    store.delete_run(probe)
    store.delete_run(no_artifact)
    assert len(store.list_runs()) == n
    # too many prompts: known only once scored, so the job fails with the reason
    row = condense.condense_now(store, trained["shallow"], keep=7, epochs=1)
    assert row["status"] == "failed" and "between 1 and the run's 6" in row["error"]
    store.delete_run(row["id"])


def test_cli_condense_json(trained, capsys):
    store = trained["store"]
    code = cli.main(
        [
            "condense",
            "--run",
            str(trained["shallow"]),
            "--keep-fraction",
            "0.5",
            "--epochs",
            "1",
            "--store",
            str(store.path),
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["status"] == "done" and out["parent_id"] == trained["shallow"]
    assert out["kept_prompts"] == 3 and out["parent_prompts"] == 6 and out["gmacs"] > 0
    assert cli.main(["condense", "--run", str(trained["shallow"]), "--keep", "0", "--store", str(store.path)]) == 2


def test_budget_chart_arrows_and_pairs(trained):
    store = trained["store"]
    rows = store.list_runs(status="done")
    table = budget.runs_table(rows)
    agg = budget.aggregate_over_seeds(table)
    assert "condensed" in set(agg["family"])
    fig = charts.cost_accuracy_figure(agg, cost="gmacs", metric="accuracy_mean")
    drawn = attention_charts.add_condensation_arrows(fig, agg, table, cost="gmacs", metric="accuracy_mean")
    children = [r for r in rows if r["kind"] == "condense"]
    assert drawn == len(children) > 0
    arrows = [a for a in fig.layout.annotations if a.showarrow and a.axref == "x"]
    assert len(arrows) == drawn
    pairs = condense.condensation_pairs(rows)
    assert {p["run_id"] for p in pairs} == {r["id"] for r in children}
    assert all(p["parent_accuracy"] is not None and p["gmacs"] is not None for p in pairs)
    assert len(attention_charts.condensation_figure(pairs).layout.annotations) == len(pairs)


def test_run_pull_on_a_stored_run(trained):
    store = trained["store"]
    result = attention.run_pull(store, trained["deep"], n_images=4)
    assert result["num_prompts"] == 4 and result["placed_blocks"] == DEPTH and result["n_images"] == 4
    assert 0 <= result["cls_pull"] <= 1 and result["uniform"] == pytest.approx(4 / (1 + 4 + 4))
    fig = attention_charts.pull_vs_count_figure([result])
    assert len(fig.data) == 2


def test_benchmark_recount_restores_every_stored_runs_gmacs(trained):
    """benchmarks/condense_elpv.py --recount-costs: GMACs of stored runs (condensed ones included, whose
    per-block counts live in their configuration) counted again from the configuration alone."""
    from benchmarks.common import recount_store_costs

    store = trained["store"]
    truth = {row["id"]: row["costs"]["gmacs"] for row in store.list_runs(status="done")}
    for run_id in truth:
        store.update_results(run_id, costs={"gmacs": 99.0})  # as if counted on another graph
    recount_store_costs(store, latency=False)
    assert {row["id"]: row["costs"]["gmacs"] for row in store.list_runs(status="done")} == pytest.approx(truth)
