"""Vision-language prompts (zero-shot, CoOp, MaPLe) on the random tiny CLIP: the code path, not accuracy."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from streamlit.testing.v1 import AppTest
from torch.nn import functional as F

from vptdash import cli
from vptdash.engine import clip, cost, data
from vptdash.engine.backbones import BackboneError
from vptdash.engine.train import ConfigError
from vptdash.methods import attention, vlprompts
from vptdash.runs import jobs, reference, worker
from vptdash.runs.store import RunStore
from vptdash.views import budget, style, wording

NAMES = ["dark thing", "bright thing", "striped thing"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny towers are too small for two threads to help; on a loaded machine they only wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle():
    return clip.load_clip(clip.TINY_CLIP)


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-data") / "four"
    return str(make_image_folder(root, classes=("dark", "bright", "striped", "pale"), per_class=8))


def images(n=3, size=clip.TINY_IMAGE_SIZE):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def frozen_snapshot(bundle):
    return {k: v.clone() for k, v in bundle.model.state_dict().items()}


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def short(**values):
    base = {"shots": 2, "epochs": 1, "batch_size": 4, "measure_latency": False}
    return vlprompts.VLPromptConfig(**{**base, **values})


def test_prompt_free_towers_equal_open_clip_fused_and_explicit(bundle):
    model = clip.PromptedCLIP(bundle, "zeroshot")
    x = images()
    tokens = bundle.tokenizer([f"a photo of a {n}." for n in NAMES])
    with torch.no_grad():
        want_image = F.normalize(bundle.model.encode_image(x), dim=-1)
        want_text = F.normalize(bundle.model.encode_text(tokens), dim=-1)
        for fused in (True, False):
            model.fused_attn = fused
            assert torch.allclose(model.encode_image(x), want_image, atol=1e-5)
            assert torch.allclose(model.encode_text(NAMES), want_text, atol=1e-5)


def test_zero_shot_logits_shape_and_template_ensemble(bundle):
    templates = ["a photo of a {}.", "a blurry photo of the {}."]
    model = clip.PromptedCLIP(bundle, "zeroshot", templates=templates).eval()
    with torch.no_grad():
        logits = model(images(5), NAMES)
        per_template = [
            F.normalize(bundle.model.encode_text(bundle.tokenizer([t.format(n) for n in NAMES])), dim=-1)
            for t in templates
        ]
        expected_text = F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)
        text, vision = model.text_features(NAMES)
        expected = bundle.model.logit_scale.exp() * model.encode_image(images(5)) @ expected_text.t()
    assert logits.shape == (5, len(NAMES)) and vision == []
    assert torch.allclose(text, expected_text, atol=1e-5)
    assert torch.allclose(logits, expected, atol=1e-4)
    one = clip.PromptedCLIP(bundle, "zeroshot", templates=templates[:1]).eval()
    with torch.no_grad():
        assert not torch.allclose(one.text_features(NAMES)[0], text, atol=1e-3)  # the second template counts


def test_only_prompts_and_coupling_get_gradients(bundle):
    model = clip.PromptedCLIP(bundle, "maple", text_prompts=2, depth=2).train()
    names = {n for n, _ in model.named_parameters()}
    assert names == {
        "ctx",
        "text_deep.0",
        "coupling.0.weight",
        "coupling.0.bias",
        "coupling.1.weight",
        "coupling.1.bias",
    }
    loss = F.cross_entropy(model(images(4), NAMES), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in bundle.model.parameters())
    assert model.state_dict().keys() == names  # the frozen towers are never part of a run's artifact


def test_training_leaves_the_frozen_towers_bit_identical(bundle, image_folder):
    before = frozen_snapshot(bundle)
    result = vlprompts.run_vlprompt(
        short(dataset=str(image_folder), method="maple", prompt_depth=2), compute_costs=False
    )
    assert result["status"] == "done" and set(result["state"]) >= {"ctx", "coupling.0.weight"}
    after = clip.load_clip(clip.TINY_CLIP).model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_text_features_computed_once_per_class_set_at_evaluation(bundle, image_folder):
    model = clip.PromptedCLIP(bundle, "coop", text_prompts=4).eval()
    split_a = vlprompts.ImageInputs(
        model, torch.randint(0, 255, (40, 3, 32, 32), dtype=torch.uint8), bundle.mean, bundle.std
    )
    start = model.text_tower_calls
    vlprompts.predict(model, split_a, NAMES)  # 40 images in 2 batches
    vlprompts.predict(model, split_a, NAMES)
    assert model.text_tower_calls - start == 1
    vlprompts.predict(model, split_a, NAMES[:2])
    assert model.text_tower_calls - start == 2
    model.train()  # training may change the prompts: the next evaluation recomputes
    model.eval()
    vlprompts.predict(model, split_a, NAMES)
    assert model.text_tower_calls - start == 3
    result = vlprompts.run_vlprompt(short(dataset=str(image_folder), method="coop"), compute_costs=False)
    metrics = result["metrics"]  # validation and test share the class set: one text pass for both
    assert metrics["eval_class_sets"] == 1 and metrics["eval_text_tower_calls"] == 1


def test_a_checkpoint_in_open_clip_format_loads_through_the_users_path(bundle, tmp_path):
    state = {k: (v + 0.25 if v.is_floating_point() else v) for k, v in bundle.model.state_dict().items()}
    for suffix in (".safetensors", ".pt"):
        path = tmp_path / f"tiny{suffix}"
        donor = clip.create_clip(clip.TINY_CLIP)
        donor.model.load_state_dict(state)
        clip.save_clip_weights(donor.model, path)
        loaded = clip.create_clip(f"{clip.CLIP_PREFIX}{clip.TINY_MODEL}", weights=str(path))
        assert loaded.source.startswith("file:")
        assert all(torch.equal(loaded.model.state_dict()[k], state[k]) for k in state)
        assert not any(p.requires_grad for p in loaded.model.parameters())
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.proj")}, tmp_path / "partial.pt")
    with pytest.raises(BackboneError, match="does not fit"):
        clip.create_clip(f"{clip.CLIP_PREFIX}{clip.TINY_MODEL}", weights=str(tmp_path / "partial.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read CLIP weights junk.pt"):
        clip.create_clip(f"{clip.CLIP_PREFIX}{clip.TINY_MODEL}", weights=str(tmp_path / "junk.pt"))
    with pytest.raises(BackboneError, match="not found"):
        clip.create_clip("open_clip:ViT-B-16", weights=str(tmp_path / "missing.pt"))


def test_offline_without_weights_is_one_line_at_once(monkeypatch):
    monkeypatch.setattr(clip, "hub_reachable", lambda timeout=3.0: False)  # no network, without waiting for it
    with pytest.raises(BackboneError) as info:
        clip.create_clip("open_clip:ViT-B-32")
    assert "\n" not in str(info.value) and "--weights FILE" in str(info.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE is set.*--weights FILE"):
        clip.create_clip("open_clip:ViT-B-16@openai")


def test_base_to_novel_splits_are_disjoint_and_stratified(four_classes):
    image_set = data.load_image_set(four_classes, 32)
    split = data.split_image_set(image_set, test_fraction=0.25, val_fraction=0.125, shots=3)
    parts = vlprompts.base_novel_split(split, image_set.labels, 4)
    labels = image_set.labels
    assert parts["base"] == [0, 1] and parts["novel"] == [2, 3]
    sets = [set(parts[k].tolist()) for k in ("train", "val", "test_base", "test_novel")]
    assert sum(len(s) for s in sets) == len(set().union(*sets))  # no image in two sets
    assert set(labels[parts["train"]].tolist()) == {0, 1} and set(labels[parts["val"]].tolist()) == {0, 1}
    assert set(labels[parts["test_base"]].tolist()) == {0, 1} and set(labels[parts["test_novel"]].tolist()) == {2, 3}
    for c in range(4):  # every class keeps its stratified share of test images; training keeps 3 shots per base class
        assert int((labels[split.test] == c).sum()) == 2
        assert int((labels[parts["train"]] == c).sum()) == (3 if c < 2 else 0)
    with pytest.raises(ConfigError, match="at least 4 classes"):
        vlprompts.base_novel_classes(3)


def test_base_to_novel_run_reports_base_novel_and_harmonic_mean(four_classes):
    result = vlprompts.run_vlprompt(
        short(dataset=four_classes, method="zeroshot", base_to_novel=True), compute_costs=False
    )
    m = result["metrics"]
    assert m["accuracy"] == pytest.approx(vlprompts.harmonic_mean(m["base_accuracy"], m["novel_accuracy"]))
    assert m["split_sizes"]["test_base"] == m["split_sizes"]["test_novel"] == 4
    assert m["eval_class_sets"] == m["eval_text_tower_calls"] == 2


def test_image_gmacs_grow_with_vision_prompts_as_the_formula_says_and_not_with_text_prompts(bundle):
    def counted(model):
        return cost.fvcore_gmacs(clip.ImageClassifier(model, NAMES), bundle.image_size)

    zero = clip.PromptedCLIP(bundle, "zeroshot")
    coops = [clip.PromptedCLIP(bundle, "coop", text_prompts=n) for n in (1, 8)]
    maples = {n: clip.PromptedCLIP(bundle, "maple", text_prompts=n, depth=2) for n in (1, 3)}
    shallow = clip.PromptedCLIP(bundle, "maple", text_prompts=3, depth=1)  # prompts carried through layer 1
    assert counted(coops[0]) == counted(coops[1]) == counted(zero)
    assert counted(shallow) == counted(maples[3])  # the depth changes parameters, not per-image compute
    for model in [zero, shallow, *maples.values()]:
        assert counted(model) == pytest.approx(clip.image_gmacs_analytic(model, 3), rel=1e-9)
    # every one of the 2 layers sees 1 + patches + n tokens: the difference by the block formula
    width, mlp, n0 = bundle.vision_width, 4 * bundle.vision_width, 1 + (32 // 8) ** 2
    block = sum(cost.block_macs(n0 + 3, width, mlp) - cost.block_macs(n0 + 1, width, mlp) for _ in range(2))
    norms = (2 * 2 + 1) * 5 * 2 * width  # ln_1, ln_2 per layer and ln_pre, on 2 more tokens (5 per element)
    assert (counted(maples[3]) - counted(maples[1])) * 1e9 == pytest.approx(block + norms, rel=1e-9)
    text = [cost.fvcore_gmacs(clip.TextTower(m, NAMES), 32) for m in (zero, *coops)]
    assert text[0] == text[1] == text[2] == pytest.approx(clip.text_gmacs_analytic(zero, 3), rel=1e-9)


def test_config_rejects_what_cannot_run(bundle):
    model = clip.PromptedCLIP(bundle, "coop", text_prompts=30)  # 30 + "dark thing." + start/end > 32 tokens
    with pytest.raises(ConfigError, match="more than the text tower's 32"):
        model.encode_text(NAMES)
    with pytest.raises(ConfigError, match="no vision prompts"):
        vlprompts.VLPromptConfig(method="coop", vision_prompts=4).validate()
    with pytest.raises(ConfigError, match="must equal text prompts"):
        vlprompts.VLPromptConfig(method="maple", text_prompts=2, vision_prompts=4).validate()
    with pytest.raises(ConfigError, match="exceeds the model's 2 layers"):
        vlprompts.VLPromptConfig(method="maple", prompt_depth=9).validate(layers=2)
    with pytest.raises(ConfigError, match="'{}'"):
        vlprompts.VLPromptConfig(method="zeroshot", templates=["a photo"]).validate()
    assert vlprompts.clip_input_size("open_clip:ViT-B-16") == 224  # from open_clip's config, no weights
    assert vlprompts.clip_input_size("tiny-clip") == clip.TINY_IMAGE_SIZE
    with pytest.raises(ConfigError, match="not a CLIP backbone"):
        vlprompts.VLPromptConfig(backbone="dinov2_s14").validate()


def test_cli_train_runs_offline_end_to_end_and_lands_on_the_budget_table(image_folder, tmp_path, capsys):
    store_path = str(tmp_path / "runs.db")
    argv = ["train", "--backbone", "tiny-clip", "--method", "maple", "--prompt-depth", "2", "--text-prompts", "2"]
    argv += [
        "--dataset",
        str(image_folder),
        "--shots",
        "2",
        "--epochs",
        "1",
        "--json",
        "--no-latency",
        "--store",
        store_path,
    ]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "done" and result["params_trainable"] > 0
    for key in cli.JSON_KEYS:
        assert key in result
    assert result["gmacs"] > 0 and result["text_gmacs_per_class_set"] > 0
    row = RunStore(store_path).get_run(result["run_id"])
    assert row["kind"] == vlprompts.KIND and row["config"]["resolution"] == 32 and row["config"]["epochs"] == 1
    assert row["config"]["optimizer"] == "sgd"  # the CLIP recipe, not the visual-prompt default, unless given
    table = budget.runs_table([row])
    assert table["family"].tolist() == ["MaPLe"] and "2 text + 2 vision prompts" in table["label"].item()
    assert style.family_color("MaPLe") == style.FAMILY_COLORS["MaPLe"]
    assert cli.main(["train", "--method", "coop", "--store", store_path]) == 2
    assert "only for CLIP backbones" in capsys.readouterr().err


def test_cli_sweep_runs_the_grid_and_depth_only_varies_maple(image_folder, tmp_path, capsys):
    argv = ["sweep", "--backbone", "tiny-clip", "--method", "zeroshot,coop,maple", "--text-prompts", "1"]
    argv += ["--prompt-depth", "1,2", "--dataset", str(image_folder), "--shots", "1", "--epochs", "1"]
    argv += ["--no-latency", "--json", "--store", str(tmp_path / "runs.db")]
    assert cli.main(argv) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["method"] for r in results] == ["zeroshot", "coop", "maple", "maple"]
    assert all(r["status"] == "done" for r in results)
    assert results[2]["gmacs"] == results[3]["gmacs"] > results[0]["gmacs"] == results[1]["gmacs"]
    assert results[2]["params_trainable"] < results[3]["params_trainable"]  # depth 2: one more context and coupling


def test_train_page_queues_a_clip_run_that_the_budget_table_labels(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("VPTDASH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VPTDASH_NO_WARMUP", "1")
    monkeypatch.setattr(reference, "REFERENCE_FILE", tmp_path / "no-reference-sweep.json")
    monkeypatch.setattr(worker, "ensure_worker", lambda store, **kw: True)
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60)
    at.run()
    for key, value in {"dataset": str(image_folder), "backbone": "tiny-random", "resolution": 32, "shots": 2}.items():
        at.session_state[f"active_{key}"] = value
    at.switch_page("app_pages/train.py").run()
    at.button_group(key="train_clip_method").set_value("maple").run()
    at.number_input(key="train_clip_text").set_value(2).run()
    at.button(key="train_clip_submit").click().run()
    assert not at.exception, [e.message for e in at.exception]
    store = RunStore()
    [run] = store.list_runs()
    assert run["kind"] == vlprompts.KIND and run["status"] == "queued"
    config = run["config"]
    assert (config["backbone"], config["method"], config["text_prompts"], config["shots"]) == (
        "tiny-clip",
        "maple",
        2,
        2,
    )
    assert config["dataset"] == str(image_folder) and config["resolution"] == clip.TINY_IMAGE_SIZE
    store.update_config(run["id"], {**config, "epochs": 1, "measure_latency": False})
    [done] = jobs.execute_queued(store, [run["id"]])
    assert done["status"] == "done", done.get("error")
    assert wording.run_label(done).startswith("MaPLe, 2 text + 2 vision prompts")
    assert wording.run_family(done["config"]) == "MaPLe"
    assert "Text tower: " in wording.clip_summary(done["metrics"], done["costs"])
    at.switch_page("app_pages/train.py").run()  # the result card of the finished CLIP run
    assert not at.exception, [e.message for e in at.exception]
    assert "Text tower: " in texts(at.caption)
    at.switch_page("app_pages/budget.py").run()
    at.toggle(key="budget_match").set_value(False).run()  # another backbone than the active one
    assert not at.exception, [e.message for e in at.exception]
    drawn = json.dumps([json.loads(chart.proto.spec)["data"] for chart in at.get("plotly_chart")])
    # its own family's trace, or (a random tiny CLIP predicts one class) the collapsed runs' trace, labelled
    assert "MaPLe" in drawn
    at.switch_page("app_pages/attention.py").run()  # the CLIP run's image tower, not as a prompted ViT
    assert not at.exception, [e.message for e in at.exception]
    assert "vision prompts at this layer" in texts(at.caption)


def test_image_attention_reads_the_prompted_image_tower(bundle):
    model = clip.PromptedCLIP(bundle, "maple", text_prompts=3, depth=2).eval()
    pictures = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    maps = vlprompts.image_attention(model, pictures, NAMES)
    tokens = 1 + 3 + 16
    assert maps.depth == 2 and maps.blocks[0].probs.shape == (2, 2, tokens, tokens)
    assert torch.allclose(maps.blocks[1].probs.sum(-1), torch.ones(2, 2, tokens), atol=1e-5)
    assert attention.cls_patch_map(maps, 1).shape == (2, 4, 4)
    pull = attention.prompt_pull(maps)
    assert all(row["prompts"] == 3 and 0 < row["cls_pull"] < 1 for row in pull)
    assert (
        vlprompts.image_attention(clip.PromptedCLIP(bundle, "coop", text_prompts=2), pictures, NAMES)
        .blocks[0]
        .num_prompts
        == 0
    )
