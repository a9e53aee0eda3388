import json

from vptdash import cli
from vptdash.bench import matmul_peak_gflops, step_flops
from vptdash.prompts import PromptedViT
from vptdash.train import load_backbone

import torch

KEYS = ("peak_gflops_fp32", "peak_gflops_bf16", "engine_images_per_s", "naive_images_per_s", "speedup_vs_naive",
        "engine_gflops", "efficiency_vs_bf16_peak", "sweep_seconds")


def test_matmul_peak_is_positive():
    assert matmul_peak_gflops(torch.float32, size=256, seconds=0.1) > 0


def test_step_flops_counts_attention_and_backward():
    from torch.utils.flop_counter import FlopCounterMode

    from vptdash.cost import unfused_attention

    backbone = load_backbone("tiny-random", None, 32)
    model = PromptedViT(backbone, 2, num_prompts=4, placement="deep", seed=0)
    encoded = model.encode_frozen(torch.randn(2, 3, 32, 32))
    labels = torch.tensor([0, 1])
    flops = step_flops(model, encoded, labels, from_frozen=True)
    with unfused_attention(model), FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_from_frozen(encoded)
    forward_flops = counter.get_total_flops()
    assert forward_flops * 1.8 < flops < forward_flops * 3.5  # backward through the frozen blocks, no weight grads
    whole = step_flops(model, encoded, labels, from_frozen=True, row_selection=False)  # the naive loop's graph
    assert flops < 0.75 * whole and model.row_selection


def test_bench_prints_the_json_keys_last(capsys):
    code = cli.main(["bench", "--json", "--backbone", "tiny-random", "--resolution", "32", "--steps", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert set(KEYS) <= set(result)
    assert result["engine_images_per_s"] > 0 and result["speedup_vs_naive"] > 0
    assert result["speedup_vs_naive_late"] > 0
