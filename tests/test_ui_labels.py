"""Run labels in every table and selector say what a job is, whatever its kind."""

from vptdash import ui
from vptdash.continual import ContinualConfig
from vptdash.train import RunConfig


def test_a_trained_run_is_labelled_by_its_budget():
    run = {"kind": "train", "config": RunConfig(num_prompts=10, placement="deep").to_dict()}
    assert ui.run_label(run) == "10 deep prompts"


def test_a_continual_experiment_is_not_labelled_as_a_prompt_budget():
    run = {"kind": "continual", "config": ContinualConfig(method="nsp2", tasks=5, num_prompts=4).to_dict()}
    assert ui.run_label(run) == "continual nsp2: 5 tasks, 4 prompts (last4)"


def test_a_skip_search_names_its_method_and_block_count():
    config = {**RunConfig(num_prompts=0, tuning="linear", placement="none").to_dict(),
              "skip_search_k": 4, "skip_search_method": "das"}
    assert ui.run_label({"kind": "skip-search", "config": config}) == "skip search (das, 4 blocks) for linear probe"
