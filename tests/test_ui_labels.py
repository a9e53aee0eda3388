"""Run labels in every table and selector say what a job is, whatever its kind."""

from vptdash.engine.train import RunConfig
from vptdash.methods.continual import ContinualConfig
from vptdash.views import wording


def test_a_trained_run_is_labelled_by_its_budget():
    run = {"kind": "train", "config": RunConfig(num_prompts=10, placement="deep").to_dict()}
    assert wording.run_label(run) == "10 deep prompts"


def test_a_continual_experiment_is_not_labelled_as_a_prompt_budget():
    run = {"kind": "continual", "config": ContinualConfig(method="nsp2", tasks=5, num_prompts=4).to_dict()}
    assert (
        wording.run_label(run) == "continual nsp2: 5 tasks, 4 prompts (deep)"
    )  # the official recipe: prompts in every block


def test_a_skip_search_names_its_method_and_block_count():
    config = {
        **RunConfig(num_prompts=0, tuning="linear", placement="none").to_dict(),
        "skip_search_k": 4,
        "skip_search_method": "das",
    }
    assert (
        wording.run_label({"kind": "skip-search", "config": config}) == "skip search (das, 4 blocks) for linear probe"
    )


def test_a_delta_is_signed_scaled_and_silent_when_it_prints_as_zero():
    assert wording.signed_delta(0.80, 0.75, "{:+.1f} pts", 100) == "+5.0 pts"
    assert wording.signed_delta(0.75, 0.80, "{:+.1f} pts", 100) == "-5.0 pts"
    assert wording.signed_delta(0.7501, 0.75, "{:+.1f} pts", 100) is None  # prints +0.0: no arrow
    assert wording.signed_delta(None, 0.75, "{:+.1f} pts", 100) is None
    assert wording.signed_delta(1.5, 1.25, "{:+.2f} ms") == "+0.25 ms"


def test_a_run_says_how_it_computed_and_why():
    metrics = {
        "precision": "bf16",
        "precision_reason": "bf16: matmuls at this run's shapes ran 7.42x faster than fp32 here",
    }
    timings = {"compiled": True, "compile_reason": "compiled: 36,288 training images", "compile_first_step_s": 41.25}
    line = wording.engine_line(metrics, timings)
    assert line == (
        "Trained in bf16 (bf16: matmuls at this run's shapes ran 7.42x faster than fp32 here). Training step "
        "compiled: 36,288 training images; compiling and the first step took 41.2 s."
    )
    eager = wording.engine_line({"precision": "fp32"}, {"compiled": False, "compile_reason": "not compiled: short"})
    assert eager == "Trained in fp32. Training step not compiled: short."
    assert wording.engine_line({}, {}) is None  # runs stored before either was recorded
