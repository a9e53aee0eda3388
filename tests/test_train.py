import pytest
import torch

from vptdash.engine.train import ConfigError, RunConfig, classification_metrics, lr_at, run_training


def tiny_config(dataset, **overrides) -> RunConfig:
    values = dict(
        backbone="tiny-random",
        dataset=str(dataset),
        resolution=32,
        shots=None,
        epochs=3,
        batch_size=8,
        lr=1e-2,
        num_prompts=4,
        placement="deep",
        measure_latency=False,
    )
    values.update(overrides)
    return RunConfig(**values)


def test_metrics_on_an_imbalanced_set():
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    always_zero = classification_metrics(torch.zeros(8, dtype=torch.long), labels, 2)
    assert always_zero["accuracy"] == 0.75
    assert always_zero["balanced_accuracy"] == 0.5  # the majority-class trick does not pay here
    assert always_zero["majority_accuracy"] == 0.75
    assert always_zero["confusion_matrix"] == [[6, 0], [2, 0]]
    assert always_zero["per_class_accuracy"] == [1.0, 0.0]


def test_schedule_warms_up_then_decays_to_zero():
    values = [lr_at(step, 100, 10, 1.0) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] < 0.01


def test_run_end_to_end_with_events(image_folder):
    events = []
    result = run_training(tiny_config(image_folder), on_event=events.append)
    assert result.status == "done"
    metrics = result.metrics
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert len(metrics["confusion_matrix"]) == 3
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["split_sizes"]["test"]
    phases = {e["phase"] for e in events}
    assert {"setup", "train", "val", "test", "cost"} <= phases
    steps = [e for e in events if e["phase"] == "train"]
    assert [e["step"] for e in steps] == list(range(1, len(steps) + 1))
    assert steps[-1]["eta_s"] == 0
    assert [e["epoch"] for e in result.curve][-1] == 3
    assert result.costs["gmacs"] > 0 and result.costs["params_trainable"] == 4 * 32 * 4 + 32 * 3 + 3
    assert set(result.trainable_state) == {f"prompts.tensors.{i}" for i in range(4)} | {"head.weight", "head.bias"}


def test_same_seed_same_result_on_cpu(image_folder):
    a = run_training(tiny_config(image_folder, seed=3), compute_costs=False)
    b = run_training(tiny_config(image_folder, seed=3), compute_costs=False)
    for key in a.trainable_state:
        assert torch.equal(a.trainable_state[key], b.trainable_state[key])
    assert a.metrics["accuracy"] == b.metrics["accuracy"]


def test_learns_an_easy_task(image_folder):
    result = run_training(
        tiny_config(image_folder, epochs=30, lr=3e-2, tuning="linear", num_prompts=0), compute_costs=False
    )
    assert result.metrics["accuracy"] > 0.8


def test_cancel_stops_between_steps(image_folder):
    steps = []

    def cancel_after_two():
        return len(steps) >= 2

    result = run_training(
        tiny_config(image_folder, epochs=50),
        on_event=lambda e: steps.append(e) if e["phase"] == "train" else None,
        should_cancel=cancel_after_two,
    )
    assert result.status == "cancelled"
    assert len(steps) == 2
    assert "accuracy" not in result.metrics  # no test figures for a half-trained model


def test_full_finetune_does_not_touch_the_shared_backbone(image_folder):
    from vptdash.engine.backbones import load_backbone

    shared = load_backbone("tiny-random", None, 32)
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    run_training(tiny_config(image_folder, tuning="full", num_prompts=0, epochs=1), compute_costs=False)
    assert all(torch.equal(v, before[k]) for k, v in shared.state_dict().items())
    assert not any(p.requires_grad for p in shared.parameters())


def test_bf16_runs(image_folder):
    result = run_training(tiny_config(image_folder, precision="bf16", epochs=1), compute_costs=False)
    assert result.status == "done"


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_prompts", 100000, "prompt count"),
        ("num_prompts", -3, "prompt count"),
        ("epochs", 0, "epochs"),
        ("lr", 0.0, "learning rate"),
        ("resolution", 4, "resolution"),
        ("shots", 0, "shots"),
        ("placement", "0,99", "outside"),
    ],
)
def test_absurd_budgets_fail_before_loading(image_folder, field, value, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        run_training(tiny_config(image_folder, **{field: value}), compute_costs=False)


def test_config_round_trip_and_labels():
    config = RunConfig(num_prompts=10, placement="deep", skip_blocks=[3])
    assert RunConfig.from_dict({**config.to_dict(), "unknown_future_key": 1}) == config
    assert config.label() == "10 deep prompts, skip 1 blocks"
    assert RunConfig(tuning="linear").family() == "linear probe"
    assert RunConfig(num_prompts=0).family() == "linear probe"
    assert RunConfig(placement="0,5").family() == "custom blocks"


def test_bf16_training_steps_use_explicit_attention_and_restore_it():
    """bf16 steps route attention through explicit matmuls (the CPU flash-attention backward in bf16 is
    slow); the backbone's fused setting comes back after the step, and the outputs agree with fp32."""
    from vptdash.engine.backbones import load_backbone
    from vptdash.engine.prompts import PromptedViT
    from vptdash.engine.train import training_precision

    model = PromptedViT(load_backbone("tiny-random", None, 32), 2, num_prompts=3, placement="deep", seed=0)
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    assert fused, "timm attention modules expected"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with training_precision(model, "fp32"):
        assert all(m.fused_attn for m in fused)
        reference = model(x)
    with training_precision(model, "bf16"):
        assert not any(m.fused_attn for m in fused)
        approx = model(x)
    assert all(m.fused_attn for m in fused)
    # Measured on this model (20 seeded inputs, 2026-11-26): bf16 moves these logits by 0.0006 typically,
    # 0.0012 at most, while the logits reach 0.04-0.12. 5e-3 is 4x the largest error seen; outputs off by
    # a factor (scaled by 0.1, say) miss it by far more, as the last line checks.
    tolerance = 5e-3
    assert reference.abs().max() > 5 * tolerance  # logits large enough for the check to mean something
    assert torch.allclose(approx.float(), reference, atol=tolerance, rtol=0)
    assert not torch.allclose(0.1 * approx.float(), reference, atol=tolerance, rtol=0)


def test_a_second_run_of_an_architecture_reuses_its_count_and_latency(image_folder, cost_spies):
    """fvcore and the latency timer run once per architecture: a run with another seed reuses them, a run
    with another prompt count does not."""
    calls = cost_spies
    first = run_training(tiny_config(image_folder, epochs=1, measure_latency=True))
    second = run_training(tiny_config(image_folder, epochs=1, measure_latency=True, seed=5, lr=3e-3))
    assert calls == {"fvcore": 1, "latency": 1}
    assert second.costs["gmacs"] == first.costs["gmacs"] and second.costs["gmacs_cached"]
    assert second.costs["latency_ms_b1"] == first.costs["latency_ms_b1"] and second.costs["latency_cached"]
    other = run_training(tiny_config(image_folder, epochs=1, measure_latency=True, num_prompts=2))
    assert calls == {"fvcore": 2, "latency": 2} and not other.costs["gmacs_cached"]
    assert other.costs["gmacs"] < first.costs["gmacs"]


def _split_inputs(image_folder, **overrides):
    from vptdash.engine import data
    from vptdash.engine.train import SplitInputs, build_model

    config = tiny_config(image_folder, **overrides)
    image_set, split = data.load_and_split(config)
    model = build_model(config, len(image_set.class_names)).eval()
    mean, std = model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"]
    index = torch.arange(len(image_set.labels))
    return SplitInputs(model, config, image_set, index, mean, std, "test"), image_set.labels


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluation_does_not_depend_on_the_batching(image_folder, precision):
    from vptdash.engine.train import evaluate

    inputs, labels = _split_inputs(image_folder, num_prompts=4, placement="deep")
    default_predictions, default = evaluate(inputs, labels, 3, precision)  # batches of EVAL_BATCH
    small_predictions, small = evaluate(inputs, labels, 3, precision, batch_size=5)
    assert torch.equal(default_predictions, small_predictions)
    assert default["confusion_matrix"] == small["confusion_matrix"]
    assert default["loss"] == pytest.approx(small["loss"], rel=1e-2 if precision == "bf16" else 1e-5)


def test_evaluation_runs_only_the_blocks_after_the_cached_prefix(image_folder):
    """Every split's frozen prefix is encoded once (SplitInputs); evaluating a late placement runs none
    of the blocks before it, and the logits equal the full forward pass's."""
    from vptdash.engine import data
    from vptdash.engine.train import evaluate

    inputs, labels = _split_inputs(image_folder, num_prompts=3, placement="2,3")
    model = inputs.model
    calls = []
    hooks = [b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(model.backbone.blocks)]
    try:
        predictions, _ = evaluate(inputs, labels, 3, "fp32")
    finally:
        for hook in hooks:
            hook.remove()
    assert model.first_prompt_block == 2 and not [i for i in calls if i < 2]
    image_set = data.load_image_set(str(image_folder), 32)
    images = data.normalize(
        image_set.images, model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"]
    )
    with torch.inference_mode():
        assert torch.equal(model(images).argmax(dim=1), predictions)


@pytest.mark.parametrize(
    ("given", "torch_first", "expected_env", "in_force"),
    [
        ({}, False, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"}, "GOMP_SPINCOUNT=10000"),
        (
            {"OMP_WAIT_POLICY": "PASSIVE"},
            False,
            {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None},
            "OMP_WAIT_POLICY=PASSIVE",
        ),
        (
            {"GOMP_SPINCOUNT": "300000"},
            False,
            {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000"},
            "GOMP_SPINCOUNT=300000",
        ),
        # torch loaded first: its runtime read the environment without the setting; processes it starts get it.
        ({}, True, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"}, "default"),
    ],
)
def test_openmp_threads_spin_briefly_unless_the_user_chose(given, torch_first, expected_env, in_force):
    """Set by `import vptdash`, before torch loads its OpenMP runtime (which reads it only then); a wait
    setting of the user's, either variable, is left as it is; what is in force is what the runtime read."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    code = (
        ("import torch; " if torch_first else "")
        + "import json, os, vptdash.engine.train; from vptdash.engine import openmp, precision; "
        "print(json.dumps([{k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}, "
        "openmp.in_force(), precision.cpu_description()['openmp_wait']]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [expected_env, in_force, in_force]
