"""The training recipe a manager can trust: learning rates chosen on validation (never test), the converged
linear probe, collapse stored as data, per-image test outcomes for paired comparisons."""

import json
import math
from pathlib import Path

import pytest
import torch

from vptdash import cli
from vptdash.engine import train
from vptdash.engine.train import (
    ConfigError,
    RunConfig,
    build_model,
    detect_collapse,
    fit_logistic,
    run_training,
    search_cost_factor,
    search_schedule,
    used_lr,
)
from vptdash.runs import presets


def tiny(dataset, **overrides) -> RunConfig:
    values = dict(
        backbone="tiny-random",
        dataset=str(dataset),
        resolution=32,
        shots=None,
        epochs=2,
        batch_size=8,
        num_prompts=2,
        placement="deep",
        measure_latency=False,
    )
    values.update(overrides)
    return RunConfig(**values)


# ------------------------------------------------------------------------------------ the lr search
def test_successive_halving_schedule_and_its_cost():
    # 4 rates over 20 epochs: half stop at epoch 5 (a quarter), one goes on from epoch 10 (a half)
    assert search_schedule(20, 4) == [(5, 2), (10, 1)]
    # trained epochs 4*5 + 2*5 + 1*10 = 40 for one run's 20: twice the cost, not the full grid's 4x
    assert search_cost_factor(RunConfig(epochs=20, lr="auto")) == pytest.approx(2.0)
    # 3 rates over 8 epochs: (3*2 + 2*2 + 1*4) / 8
    assert search_schedule(8, 3) == [(2, 2), (4, 1)]
    # one epoch: no rung before the end, every rate trains the whole run
    assert search_schedule(1, 4) == []
    assert search_cost_factor(RunConfig(epochs=1, lr="auto")) == pytest.approx(4.0)
    assert search_cost_factor(RunConfig(epochs=20, lr=0.01)) == 1.0
    assert search_cost_factor(RunConfig(epochs=20, lr="auto", tuning="linear", num_prompts=0)) == 1.0
    assert search_cost_factor(RunConfig(epochs=20, lr="auto", tuning="full", num_prompts=0)) == 1.0


def test_lr_is_chosen_on_validation_and_test_is_read_once_at_the_end(image_folder, monkeypatch):
    """A spy gives every candidate rate a validation score; the run must keep the rate with the best
    score, read the test split exactly once and only after every validation."""
    rate_of_model: dict[int, float] = {}
    real_optimizer = train.make_optimizer

    def spy_optimizer(config, model, lr):
        rate_of_model[id(model)] = lr
        return real_optimizer(config, model, lr)

    scores = {3e-4: 0.40, 1e-3: 0.90, 3e-3: 0.55, 1e-2: 0.60}  # 1e-3 best on validation, not the largest
    reads: list[str] = []
    real_evaluate = train.evaluate

    def spy_evaluate(inputs, labels, num_classes, precision, *args, **kwargs):
        reads.append(inputs.name)
        predictions, metrics = real_evaluate(inputs, labels, num_classes, precision, *args, **kwargs)
        if inputs.name == "val":
            metrics = {**metrics, "balanced_accuracy": scores[rate_of_model[id(inputs.model)]]}
            # mixed predictions, so no candidate counts as collapsed whatever the tiny model learned
            predictions = torch.arange(len(predictions)) % num_classes
        return predictions, metrics

    monkeypatch.setattr(train, "make_optimizer", spy_optimizer)
    monkeypatch.setattr(train, "evaluate", spy_evaluate)
    events = []
    result = run_training(tiny(image_folder, epochs=4, lr="auto"), compute_costs=False, on_event=events.append)

    assert sorted(rate_of_model.values()) == sorted(train.LR_GRID)
    assert result.metrics["lr"] == 1e-3 and result.metrics["lr_source"] == "validation"
    searched = {row["lr"]: row for row in result.metrics["lr_search"]}
    assert set(searched) == set(train.LR_GRID)
    # 4 epochs, 4 rates: two stop after epoch 1, one more after epoch 2, the winner trains all 4
    assert searched[1e-3]["epochs"] == 4 and searched[3e-4]["epochs"] == 1
    assert reads.count("test") == 1 and reads[-1] == "test"
    assert set(reads[:-1]) == {"val"}
    assert result.curve[-1]["epoch"] == 4
    assert any(e["phase"] == "search" for e in events)


def test_fixed_lr_is_stored_as_fixed_and_test_outcomes_match_accuracy(image_folder):
    result = run_training(tiny(image_folder, lr=1e-2), compute_costs=False)
    metrics = result.metrics
    assert metrics["lr"] == 1e-2 and metrics["lr_source"] == "fixed" and "lr_search" not in metrics
    correct = metrics["test_correct"]
    assert len(correct) == metrics["split_sizes"]["test"] and set(correct) <= {"0", "1"}
    assert correct.count("1") / len(correct) == pytest.approx(metrics["accuracy"], abs=1e-12)
    confusion = torch.tensor(metrics["confusion_matrix"])
    assert correct.count("1") == int(confusion.diag().sum())
    # the true class of each test image: its counts are the confusion matrix's row sums (rows = true class)
    true_classes = [int(c) for c in metrics["test_labels"]]
    assert len(true_classes) == len(correct)
    assert [true_classes.count(k) for k in range(len(confusion))] == confusion.sum(dim=1).tolist()


def test_label_record_is_digits_up_to_ten_classes_and_a_list_beyond():
    assert train.label_record(torch.tensor([0, 9, 3])) == "093"
    assert train.label_record(torch.tensor([0, 10, 3])) == [0, 10, 3]


def test_head_has_its_own_parameter_group():
    model = build_model(RunConfig(backbone="tiny-random", resolution=32, num_prompts=2, placement="deep"), 3)
    optimizer = train.make_optimizer(RunConfig(), model, 1e-3)
    names = {group["name"]: group for group in optimizer.param_groups}
    assert set(names) == {"body", "head"}
    assert {id(p) for p in names["head"]["params"]} == {id(model.head.weight), id(model.head.bias)}


def test_lr_settings_old_and_new():
    old = RunConfig.from_dict({**RunConfig().to_dict(), "lr": 0.01})  # a row stored before "auto" existed
    assert not old.lr_is_auto and used_lr(old) == 0.01
    assert RunConfig().lr == "auto" and used_lr(RunConfig()) is None
    assert used_lr(RunConfig(), {"lr": 3e-3}) == 3e-3
    with pytest.raises(ConfigError, match="learning rate"):
        RunConfig(lr="fast").validate()
    with pytest.raises(ConfigError, match="validation"):
        RunConfig(lr="auto", val_fraction=0.0).validate()
    RunConfig(lr=0.01, val_fraction=0.0).validate()  # a fixed rate needs no validation split
    assert train.parse_lr("Auto") == "auto" and train.parse_lr("0.003") == 0.003


# ------------------------------------------------------------------------------------ the linear probe
def test_logistic_fit_reaches_the_closed_form_optimum():
    """Two points at x = -3 (class 0) and +3 (class 1). Standardised they sit at -1 and +1; by symmetry the
    optimum has W = [-w, w], b = 0, with the objective log(1 + exp(-2w)) + l2 w^2, whose stationarity
    condition l2 w = 1 / (1 + exp(2w)) is solved here by bisection. On raw x the weight is w / 3."""
    l2 = 0.1
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if l2 * mid - 1 / (1 + math.exp(2 * mid)) < 0 else (lo, mid)
    w = (lo + hi) / 2
    weight, bias, info = fit_logistic(torch.tensor([[-3.0], [3.0]]), torch.tensor([0, 1]), 2, l2)
    assert float(weight[1, 0] - weight[0, 0]) == pytest.approx(2 * w / 3, abs=1e-5)
    assert float(bias[1] - bias[0]) == pytest.approx(0.0, abs=1e-6)
    assert info["grad_max"] < 1e-5


def test_logistic_fit_separates_a_separable_set():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    labels = torch.arange(3).repeat_interleave(20)
    features = centers[labels] + 0.5 * torch.randn(60, 3, generator=generator)
    weight, bias, info = fit_logistic(features, labels, 3, 1e-4)
    assert ((features @ weight.T + bias).argmax(dim=1) == labels).all()  # 100% training accuracy
    assert info["grad_max"] < 1e-5  # converged, not stopped by the iteration cap


def test_converged_probe_run(image_folder):
    result = run_training(tiny(image_folder, tuning="linear", num_prompts=0, placement="none"), compute_costs=False)
    metrics = result.metrics
    assert metrics["lr"] is None and metrics["lr_source"] == "validation" and metrics["probe_solver"] == "lbfgs"
    assert metrics["l2"] in train.PROBE_L2_GRID and len(metrics["l2_search"]) == len(train.PROBE_L2_GRID)
    assert metrics["probe_grad_max"] < 1e-4
    assert metrics["collapsed"] is False and metrics["collapse_reason"] is None
    assert metrics["accuracy"] > 0.8  # brightness and stripes: linearly separable features
    assert len(metrics["test_correct"]) == metrics["split_sizes"]["test"]


# ------------------------------------------------------------------------------------ collapse
def test_detect_collapse_rules():
    names = ["functional", "defective"]
    labels = torch.tensor([0, 0, 1, 1])
    collapsed, reason = detect_collapse(torch.zeros(4, dtype=torch.long), labels, names, [0.7, 0.6])
    assert collapsed and "functional" in reason
    assert detect_collapse(torch.tensor([0, 1, 1, 1]), labels, names, [0.7, 0.6]) == (False, None)
    # a split holding a single class: predicting only it is no evidence of collapse
    assert detect_collapse(torch.zeros(3, dtype=torch.long), torch.zeros(3), names)[0] is False
    mixed = torch.tensor([0, 1, 0, 1])
    # last epoch 1.5 > 2 x 0.7 and > ln 2: diverged
    assert detect_collapse(mixed, labels, names, [0.7, 0.5, 1.5])[0] is True
    # last epoch 1.3 < 2 x 0.7: not diverged
    assert detect_collapse(mixed, labels, names, [0.7, 0.5, 1.3])[0] is False
    # a warm start from 0.1 ending at 0.3: 3x, but below chance (ln 2 = 0.69): not diverged
    assert detect_collapse(mixed, labels, names, [0.1, 0.3])[0] is False
    collapsed, reason = detect_collapse(mixed, labels, names, [0.7, 0.5], nonfinite_step=7)
    assert collapsed and "step 7" in reason


def test_a_run_forced_to_one_class_is_stored_as_collapsed(image_folder):
    config = tiny(image_folder, lr=1e-6, epochs=1)
    state = build_model(config, 3).trainable_state()
    state["head.bias"] = torch.tensor([100.0, 0.0, 0.0])  # class 0 wins every image; lr 1e-6 cannot undo it
    result = run_training(config, compute_costs=False, initial_state=state)
    assert result.metrics["collapsed"] is True
    assert result.metrics["collapse_reason"].startswith(f"predicts only {result.class_names[0]!r}")


# ------------------------------------------------------------------------------------ the CLI
TINY = ["--backbone", "tiny-random", "--resolution", "32", "--epochs", "2", "--batch-size", "8", "--no-latency"]


def test_train_json_reports_lr_source_and_collapse(image_folder, tmp_path, capsys):
    store = str(tmp_path / "runs.sqlite")
    argv = ["--dataset", str(image_folder), *TINY, "--store", store, "--json"]
    assert cli.main(["train", "--prompts", "2", "--placement", "deep", "--lr", "0.01", *argv]) == 0
    fixed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fixed["lr"] == 0.01 and fixed["lr_source"] == "fixed" and fixed["collapsed"] in (True, False)
    assert cli.main(["probe", *argv]) == 0  # lr "auto" by default: the converged probe
    probe = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert probe["lr"] is None and probe["lr_source"] == "validation" and probe["collapsed"] is False
    assert set(cli.JSON_KEYS) <= set(probe)


def test_cli_lr_option_reads_auto_and_numbers():
    parser = cli.build_parser()
    assert parser.parse_args(["train"]).lr == "auto"
    assert parser.parse_args(["sweep"]).lr == "auto"
    assert parser.parse_args(["train", "--lr", "0.01"]).lr == 0.01
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--lr", "fast"])


def test_the_meeting_demo_never_searches():
    """The demo runs live in a meeting: fixed rates measured on validation, a converged probe, no search."""
    configs = presets.demo_configs()
    assert all(search_cost_factor(c) == 1.0 for c in configs)
    probes = [c for c in configs if c.is_linear_probe]
    assert len(probes) == 1 and probes[0].probe_is_converged
    for config in configs:
        if not config.is_linear_probe:
            assert config.lr == presets.DEMO_LRS[config.placement] and not config.lr_is_auto
    assert all(search_cost_factor(c) == 1.0 for c in presets.meeting_sweep_configs())


def test_the_demo_rates_are_the_ones_the_reference_chose_on_validation():
    """The demo does not search: its fixed rates must be what the reference sweep's search picked for 10
    prompts in the demo's setting (binary ELPV, 16 shots, seed 0), read from the stored checkpoint."""
    checkpoint = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "reference_sweep_runs.json"
    runs = json.loads(checkpoint.read_text())["runs"]
    chosen = {}
    for run in runs:
        config = run["config"]
        if (config["dataset"], config["shots"], config["seed"], config["num_prompts"], config["lr"]) == (
            presets.DEMO_DATASET,
            presets.DEMO_SHOTS,
            0,
            10,
            "auto",
        ):
            assert run["metrics"]["lr_source"] == "validation"
            chosen[config["placement"]] = run["metrics"]["lr"]
    assert chosen == presets.DEMO_LRS
    for config in presets.demo_configs():
        expected = "auto" if config.tuning == "linear" else presets.DEMO_LRS[config.placement]
        assert config.lr == expected
        # no search, so validation only serves the collapse check: one pass, after the last epoch
        validated = [epoch for epoch in range(1, config.epochs + 1) if train._validate_after(epoch, config)]
        assert validated == [config.epochs]
