"""Continual learning: null-space projection math, the effect of a projected step on old
tasks, the accuracy-matrix summary, and a tiny continual run end to end through the store, the job
dispatch, the CLI and the page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from vptdash import cli
from vptdash.engine import backbones, data, train
from vptdash.engine.prompts import PromptedViT
from vptdash.engine.train import ConfigError
from vptdash.methods import continual, cues
from vptdash.methods.continual import (
    ContinualConfig,
    NullSpaceMemory,
    accuracy_metrics,
    condition_features,
    null_space_basis,
    project_update,
    projected_step,
    projector,
    split_classes,
)
from vptdash.runs import jobs
from vptdash.runs.store import RunStore
from vptdash.views import continual_charts

ROOT = Path(__file__).resolve().parent.parent
FOUR = ("dark", "bright", "striped", "bright-striped")
FOUR_SORTED = sorted(FOUR)  # ImageFolder class indices follow the sorted folder names


@pytest.fixture
def four_classes(tmp_path) -> Path:
    return make_image_folder(tmp_path / "four", classes=FOUR, per_class=10, size=32)


def tiny(dataset, **overrides) -> ContinualConfig:
    values = dict(
        backbone="tiny-random",
        dataset=str(dataset),
        resolution=32,
        shots=None,
        tasks=2,
        num_prompts=4,
        placement="deep",
        epochs=3,
        batch_size=8,
        lr=1e-2,
    )
    values.update(overrides)
    return ContinualConfig(**values)


# ------------------------------------------------------------------------------------ metrics
def test_accuracy_matrix_summary_by_hand():
    a = [[0.9, None, None], [0.7, 0.8, None], [0.6, 0.6, 0.9]]
    summary = accuracy_metrics(a)
    assert summary["avg_accuracy"] == pytest.approx((0.6 + 0.6 + 0.9) / 3)
    # task 1: best 0.9 -> 0.6 (0.3); task 2: best 0.8 -> 0.6 (0.2)
    assert summary["forgetting"] == pytest.approx(0.25)
    assert summary["avg_incremental_accuracy"] == pytest.approx((0.9 + 0.75 + 0.7) / 3)
    # the best earlier accuracy counts, not the first one
    assert accuracy_metrics([[0.5, None], [0.8, 0.9]])["forgetting"] == pytest.approx(-0.3)
    assert accuracy_metrics([[0.8]])["forgetting"] is None  # one task: nothing to forget
    joint = accuracy_metrics([[None, None], [0.7, 0.9]])
    assert joint["avg_accuracy"] == pytest.approx(0.8) and joint["forgetting"] is None


def test_classes_split_into_tasks_in_the_chosen_order():
    assert split_classes(4, 2) == [[0, 1], [2, 3]]
    assert split_classes(4, 2, [3, 1, 0, 2]) == [[3, 1], [0, 2]]
    assert split_classes(10, 5, list(range(9, -1, -1)))[0] == [9, 8]
    assert [len(t) for t in split_classes(7, 3)] == [3, 2, 2]
    with pytest.raises(ConfigError, match="at most 2 tasks"):
        split_classes(4, 4)  # one class per task cannot train its own head block
    with pytest.raises(ConfigError, match="permutation"):
        split_classes(4, 2, [0, 1, 1, 2])


# ------------------------------------------------------------------------------------ null space
def test_one_dimensional_toy_update_is_exactly_orthogonal_with_eta_1():
    """Stored features all along u (d dims) and attention rows all along v (m dims): the null spaces
    are known (u's and v's orthogonal complements), and the projected update is orthogonal to both."""
    torch.manual_seed(0)
    d, m = 24, 5
    u, v = torch.randn(d, dtype=torch.float64), torch.rand(m, dtype=torch.float64)
    f1 = torch.randn(40, 1, dtype=torch.float64) * u  # 40 stored rows, all multiples of u
    f2 = torch.rand(40, 1, dtype=torch.float64) * v
    b1, k1 = projector(f1.T @ f1, eta=1.0)
    b2, k2 = projector(f2.T @ f2, eta=1.0)
    assert (k1, k2) == (d - 1, m - 1)
    expected_b1 = torch.eye(d, dtype=torch.float64) - torch.outer(u, u) / u.dot(u)
    assert torch.allclose(b1.double(), expected_b1, atol=1e-6)

    g = torch.randn(m, d)
    dp = project_update(g, b1, b2).double()
    assert (f1 @ dp.T).abs().max() < 1e-5 * g.abs().max()  # Q_X W_k^T dP^T = 0
    assert (f2 @ dp).abs().max() < 1e-5 * g.abs().max()  # S_P dP = 0

    # Through a real Adam step: the projection acts on the update Adam proposes.
    prompt = torch.nn.Parameter(torch.randn(m, d))
    optimizer = torch.optim.Adam([prompt], lr=0.1)
    before = prompt.detach().clone()
    (prompt * torch.randn(m, d)).sum().backward()
    projected_step(optimizer, [prompt], [0], {0: {"b1": b1, "b2": b2}})
    update = (prompt.detach() - before).double()
    assert update.abs().max() > 1e-3
    assert (update @ u).abs().max() < 1e-5 and (v @ update).abs().max() < 1e-5

    # eta blends towards the identity: eta = 0 is plain fine-tuning
    b0, _ = projector(f1.T @ f1, eta=0.0)
    assert torch.allclose(b0, torch.eye(d))


def test_elbow_and_threshold_rules():
    spectrum = torch.tensor([100.0, 30.0, 8.0, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    cov = q @ torch.diag(spectrum) @ q.T
    assert null_space_basis(cov).shape[1] == 6  # the elbow after the two large values
    assert null_space_basis(cov, threshold=0.05).shape[1] == 5
    assert null_space_basis(cov, threshold=0.0).shape[1] == 0
    assert null_space_basis(torch.zeros(3, 3)).shape[1] == 3  # nothing stored: all free


def test_condition_features_are_the_exact_first_order_conditions():
    """One image, 16 prompts, tiny ViT (float64). An update dP with F1 @ dP.T = 0, F2 @ dP = 0 and each
    prompt's LayerNorm sigma held (dP_i orthogonal to its centred prompt: what the consistency loss asks)
    moves the block's image-token outputs only at second order; a free update moves them at first order."""
    import copy

    torch.manual_seed(0)
    backbone = backbones.load_backbone("tiny-random", None, 32)
    model = PromptedViT(backbone, 2, num_prompts=16, placement="shallow", seed=0)
    with torch.no_grad():
        x, _ = model.write_prompts(model.embed(torch.randn(1, 3, 32, 32)), 0, 0, model.prompts())
    block, pre, m = copy.deepcopy(backbone.blocks[0]).double(), model.num_prefix_tokens, 16
    x = x.double()
    f1, f2 = condition_features(block, x, pre, m)
    d = x.shape[-1]
    centred = x[0, pre : pre + m] - x[0, pre : pre + m].mean(-1, keepdim=True)
    constraints = torch.cat(
        [
            torch.kron(torch.eye(m, dtype=torch.float64), f1),  # rows of dP in null(F1)
            torch.kron(f2, torch.eye(d, dtype=torch.float64)),  # columns of dP in null(F2)
            torch.block_diag(*centred[:, None, :]),
        ]
    )  # sigma of every prompt held
    _, values, vh = torch.linalg.svd(constraints)
    assert constraints.shape[0] < m * d  # so an exact null direction exists
    inside = vh[-1].reshape(m, d)
    assert (f1 @ inside.T).abs().max() < 1e-10 and (f2 @ inside).abs().max() < 1e-10
    free = torch.randn(m, d, dtype=torch.float64)
    image = torch.cat([torch.arange(pre), torch.arange(pre + m, x.shape[1])])

    def change(delta, eps):
        moved = x.clone()
        moved[:, pre : pre + m] += eps * delta / delta.norm()
        with torch.no_grad():
            return (block(moved) - block(x))[:, image].norm().item()

    # first order: 10x smaller step, 10x smaller change; second order: 100x smaller
    assert change(inside, 1e-4) < 0.02 * change(inside, 1e-3)
    assert change(free, 1e-4) > 0.08 * change(free, 1e-3)
    assert change(inside, 1e-3) < 0.01 * change(free, 1e-3)


def _old_logit_change(four_classes, projected: bool) -> tuple[float, float]:
    """One Adam step on the new task's images ('striped' classes); how far the old task's logits
    (the other two classes, whose covariances were stored) move: (max abs change, max abs logit)."""
    image_set = data.load_image_set(str(four_classes), 32)
    model = train.build_model(tiny(four_classes).run_config(depth=4), num_classes=4)
    images = data.normalize(
        image_set.images, model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"]
    )
    old, new = images[image_set.labels < 2], images[image_set.labels >= 2]
    memory = NullSpaceMemory(model.placement, model.embed_dim, model.prompt_counts)
    memory.add_task(model, model.encode_frozen(old))
    with torch.no_grad():
        before = model(old)
    prompts = list(model.prompts.tensors)
    optimizer = torch.optim.Adam(prompts, lr=3e-2)
    torch.nn.functional.cross_entropy(model(new), image_set.labels[image_set.labels >= 2]).backward()
    projected_step(
        optimizer, prompts, model.placement, memory.projectors(eta=1.0, threshold=None) if projected else None
    )
    with torch.no_grad():
        return (model(old) - before).abs().max().item(), before.abs().max().item()


def test_old_task_logits_barely_move_after_a_projected_step(four_classes):
    projected, scale = _old_logit_change(four_classes, projected=True)
    free, _ = _old_logit_change(four_classes, projected=False)
    assert projected < 0.02 * scale, (projected, scale)
    assert free > 0.05 * scale, (free, scale)
    assert projected < 0.2 * free


def test_layernorm_consistency_loss_is_zero_at_the_reference_and_grows_with_drift():
    ref = [torch.randn(4, 8), torch.randn(4, 8)]
    assert continual.ln_consistency_loss(ref, ref).item() == 0
    shifted = [ref[0] + 0.5, ref[1] * 2]
    assert continual.ln_consistency_loss(shifted, ref).item() > 0.4


def test_frobenius_normalised_projector_takes_a_step_sqrt_k_smaller():
    """Official NSP2: the projector divided by its Frobenius norm. For eta = 1 and nullity k the blended
    matrix is a rank-k projector (Frobenius norm sqrt(k)), so every null-space direction is scaled 1/sqrt(k)."""
    basis = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)).double())[0]
    cov = basis @ torch.diag(torch.tensor([9.0, 4.0, 0, 0, 0, 0], dtype=torch.float64)) @ basis.T
    plain, k = continual.projector(cov, eta=1.0, threshold=1e-9)
    normed, k2 = continual.projector(cov, eta=1.0, threshold=1e-9, norm="frobenius")
    assert k == k2 == 4
    torch.testing.assert_close(normed, plain / 2.0)  # sqrt(4)
    assert float(torch.linalg.matrix_norm(normed)) == pytest.approx(1.0, abs=1e-6)
    free = basis[:, 2].float()  # a null-space direction
    torch.testing.assert_close(normed @ free, free / 2.0, rtol=1e-5, atol=1e-6)
    blended, _ = continual.projector(cov, eta=0.97, threshold=1e-9, norm="frobenius")
    assert float(torch.linalg.matrix_norm(blended)) == pytest.approx(1.0, abs=1e-6)


def test_recipes_official_is_the_default_and_compact_keeps_the_earlier_variant():
    default, official = ContinualConfig(), continual.recipe_config("official")
    assert official == default and default.recipe == "official"
    assert (default.placement, default.prompt_init, default.projector_norm) == ("deep", "uniform-1", "frobenius")
    assert default.temperature == 28.0 and default.augment and default.shuffle_classes
    compact = continual.recipe_config("compact", seed=2)
    assert (compact.placement, compact.prompt_init, compact.projector_norm) == ("last4", "vpt", "none")
    assert compact.temperature == 1.0 and not compact.augment and compact.arrival_order(10) is None
    assert compact.seed == 2 and compact.label().endswith("(compact recipe), 2 tasks, seed 2")
    with pytest.raises(ConfigError, match="recipe"):
        continual.recipe_config("fast")
    with pytest.raises(ConfigError, match="temperature"):
        ContinualConfig(temperature=0).validate()


def test_class_order_is_shuffled_with_the_seed():
    orders = [ContinualConfig(seed=s).arrival_order(30) for s in range(3)]
    assert all(sorted(o) == list(range(30)) for o in orders)
    assert orders[0] == ContinualConfig(seed=0).arrival_order(30)  # reproducible
    assert len({tuple(o) for o in orders}) == 3
    assert ContinualConfig(seed=1, class_order=[1, 0, 2, 3]).arrival_order(4) == [1, 0, 2, 3]


def test_a_grouped_set_keeps_each_group_one_task_in_a_seeded_order():
    groups = cues.family_groups()
    names = cues.class_names()
    assert sorted(c for g in groups for c in g) == list(range(30)) and [len(g) for g in groups] == [6] * 5
    assert all(len({names[c].rsplit("-", 1)[0] for c in g}) == 1 for g in groups)  # one family each
    family_orders = set()
    for seed in range(4):
        order = ContinualConfig(dataset=cues.NAME, tasks=5, seed=seed).arrival_order(30)
        tasks = split_classes(30, 5, order)
        assert sorted(sorted(t) for t in tasks) == sorted(sorted(g) for g in groups)
        family_orders.add(tuple(groups.index(sorted(t)) for t in tasks))
    assert len(family_orders) > 1  # the families' order follows the seed
    # Any other split mixes the families freely: the plain seeded permutation.
    plain = [int(c) for c in np.random.default_rng([0, 1993]).permutation(30)]
    assert ContinualConfig(dataset=cues.NAME, tasks=3, seed=0).arrival_order(30) == plain
    assert ContinualConfig(dataset="textures-30", tasks=5, seed=0).arrival_order(30) == plain


def _dominant_angle(image: np.ndarray) -> float:
    """Orientation (degrees, 0-180) along which the image changes most: the structure tensor's axis."""
    gy, gx = np.gradient(image)
    return float(np.rad2deg(0.5 * np.arctan2(2 * (gx * gy).sum(), (gx * gx - gy * gy).sum())) % 180)


def _peak_frequency(image: np.ndarray) -> float:
    """Cycles per image of the strongest component of the spectrum."""
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(image - image.mean())))
    row, col = np.unravel_index(spectrum.argmax(), spectrum.shape)
    centre = image.shape[0] // 2
    return float(np.hypot(row - centre, col - centre))


def test_cue_conflict_classes_differ_in_their_cue_and_vary_in_the_others():
    rng = np.random.default_rng(3)
    for k, angle in enumerate(cues.ANGLES):  # angle: the stripes' orientation is the class's, to +-3 degrees
        for _ in range(3):
            found = _dominant_angle(cues.draw("angle", k, 128, rng))
            assert min(abs(found - angle), 180 - abs(found - angle)) <= 4, (k, found)
    for k, freq in enumerate(cues.FREQUENCIES):  # frequency: the spectrum peaks at the class's frequency
        angles = []
        for _ in range(4):
            image = cues.draw("frequency", k, 128, rng)
            assert abs(_peak_frequency(image) - freq) <= 1.0, (k, _peak_frequency(image))
            angles.append(_dominant_angle(image))
        assert np.ptp(angles) > 20  # while the angle varies inside the class
    for k, density in enumerate(cues.DENSITIES):  # density: the share of 4x4 cells that are dots
        share = np.mean(
            [cues.draw("density", k, 128, rng).reshape(32, 4, 32, 4).mean(axis=(1, 3)) > 0.5 for _ in range(4)]
        )
        # each of 4 x 1024 cells is a dot with probability `density`: 4 binomial standard deviations
        assert abs(share - density) < 4 * np.sqrt(density * (1 - density) / 4096), (k, share)
    with pytest.raises(KeyError):
        cues.draw("colour", 0, 32, rng)


def test_cue_conflict_set_is_drawn_once_as_thirty_class_folders(tmp_path):
    folder = cues.make_cues(tmp_path / "cues", per_class=2, size=32)
    image_set = data.load_image_set(folder, 32)
    assert image_set.class_names == cues.class_names() and len(image_set.class_names) == 30
    assert set(image_set.class_counts().values()) == {2}
    stamp = (folder / "angle-1" / "000.png").stat().st_mtime_ns
    assert cues.make_cues(folder) == folder and (folder / "angle-1" / "000.png").stat().st_mtime_ns == stamp
    assert cues.NAME in continual.GENERATED_DATASETS


def test_nearest_class_mean_by_hand():
    train = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    train_labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[5.0, 1.0], [1.0, 5.0], [1.0, 0.9], [0.9, 1.0]])
    # cosine to the means (directions ~(1, 0.025) and ~(0.017, 1)): 0, 1, 0, 1
    assert continual.ncm_accuracy(train, train_labels, test, torch.tensor([0, 1, 0, 1])) == 1.0
    assert continual.ncm_accuracy(train, train_labels, test, torch.tensor([0, 1, 1, 0])) == 0.5
    assert continual.ncm_accuracy(train, train_labels, test[:0], torch.tensor([], dtype=torch.long)) is None


def test_nearest_class_mean_per_task_by_hand():
    """Task 0 owns classes 0 and 1, task 1 class 2. Test image 2 (task 0, class 1) lies nearest class 2's
    mean: wrong among every class, right among its own task's; image 3 (task 0, class 0) is nearer class 1
    and wrong either way."""
    train = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    train_labels, train_task = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])
    test = torch.tensor([[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.0, 0.5, 1.0], [0.2, 1.0, 0.0], [0.0, 0.1, 1.0]])
    test_labels, test_task = torch.tensor([0, 1, 1, 0, 2]), torch.tensor([0, 0, 0, 0, 1])
    rows = continual.ncm_by_task(train, train_labels, train_task, test, test_labels, test_task)
    assert rows == {0: (pytest.approx(2 / 4), pytest.approx(3 / 4)), 1: (1.0, 1.0)}
    # a task without training classes in the means (not seen yet) gets no entry
    rows = continual.ncm_by_task(train[:2], train_labels[:2], train_task[:2], test, test_labels, test_task)
    assert set(rows) == {0}
    assert continual.ncm_by_task(train[:0], train_labels[:0], train_task[:0], test, test_labels, test_task) == {}


def test_augmentation_keeps_the_shape_and_is_reproducible():
    images = torch.rand(4, 3, 16, 16)
    a = continual.augment_images(images, torch.Generator().manual_seed(0))
    b = continual.augment_images(images, torch.Generator().manual_seed(0))
    assert a.shape == images.shape and torch.equal(a, b)
    assert not torch.equal(a, images)
    # crops come from inside the image: values stay within the input's range
    assert a.min() >= images.min() - 1e-6 and a.max() <= images.max() + 1e-6


def test_uniform_prompt_init_is_seeded_and_within_bounds():
    backbone = backbones.load_backbone("tiny-random", None, 32)
    model = PromptedViT(backbone, 2, num_prompts=4, placement="deep", seed=0)
    continual.init_prompts_uniform(model, seed=5)
    first = [t.detach().clone() for t in model.prompts.tensors]
    assert all(float(t.abs().max()) <= 1.0 for t in first)
    assert max(float(t.abs().max()) for t in first) > 0.5  # the unit range, not VPT's small xavier bound
    continual.init_prompts_uniform(model, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, model.prompts.tensors))


def test_thirty_class_textures_make_five_tasks_of_six(tmp_path):
    folder = continual.make_textures(tmp_path / "t30", classes=30, per_class=1, size=24)
    assert len([p for p in folder.iterdir() if p.is_dir()]) == 30
    classes = continual.texture_classes(30)
    assert len({name for name, _, _ in classes}) == 30
    assert {kind for _, kind, _ in classes} == set(range(10))
    assert [len(t) for t in split_classes(30, 5)] == [6] * 5


# ------------------------------------------------------------------------------------ runs
def test_tiny_continual_run_end_to_end(four_classes):
    events = []
    result = continual.run_continual(tiny(four_classes, method="nsp2"), on_event=events.append)
    assert result.status == "done"
    m = result.metrics
    assert len(m["accuracy_matrix"]) == 2 and m["accuracy_matrix"][0][1] is None
    assert all(0 <= v <= 1 for row in m["accuracy_matrix"] for v in row if v is not None)
    order = tiny(four_classes).arrival_order(4)  # shuffled with the seed (the official recipe)
    assert m["tasks"] == [[FOUR_SORTED[c] for c in order[:2]], [FOUR_SORTED[c] for c in order[2:]]]
    # diagnostics: learning accuracy is the matrix diagonal; NCM accuracies are accuracies
    assert m["just_learned"] == [m["accuracy_matrix"][0][0], m["accuracy_matrix"][1][1]]
    assert m["learning_accuracy"] == pytest.approx(np.mean(m["just_learned"]))
    assert m["just_learned_task_il"] == [m["task_il_matrix"][0][0], m["task_il_matrix"][1][1]]
    assert 0 <= m["ncm_accuracy"] <= 1 and 0 <= m["ncm_accuracy_initial"] <= 1
    assert m["recipe"] == "official"
    assert m["nullity"] and set(m["nullity"][0]["blocks"]) == {"0", "1", "2", "3"}
    assert [e["task"] for e in events if e["phase"] == "task"] == [1, 2]
    steps = [e["step"] for e in events if e["phase"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == events[-2]["total_steps"]
    assert {"prompts.tensors.0", "head.heads.0.weight", "head.heads.1.bias"} <= set(result.trainable_state)

    joint = continual.run_continual(tiny(four_classes, method="joint"))
    assert joint.metrics["accuracy_matrix"][0] == [None, None] and joint.metrics["forgetting"] is None


def test_sequential_and_nsp2_share_the_first_task(four_classes):
    a = continual.run_continual(tiny(four_classes, method="sequential", tasks=2))
    b = continual.run_continual(tiny(four_classes, method="nsp2", tasks=2))
    assert a.metrics["accuracy_matrix"][0] == b.metrics["accuracy_matrix"][0]


def test_cancel_stops_between_steps(four_classes):
    seen = []
    result = continual.run_continual(
        tiny(four_classes, epochs=50),
        on_event=seen.append,
        should_cancel=lambda: sum(e["phase"] == "train" for e in seen) >= 2,
    )
    assert result.status == "cancelled"
    assert result.metrics["avg_accuracy"] is None


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="method"):
        ContinualConfig(method="ewc").validate()
    with pytest.raises(ConfigError, match="eta"):
        ContinualConfig(eta=1.5).validate()
    with pytest.raises(ConfigError, match="lastK"):
        continual.resolve_placement("lastx", 12)
    assert continual.resolve_placement("last4", 12) == (8, 9, 10, 11)
    assert continual.resolve_placement("deep", 4) == (0, 1, 2, 3)


def test_stored_run_through_the_job_dispatch_and_summary(four_classes):
    store = RunStore()
    ids = [
        continual.submit_continual(store, c, sweep_id="cl-test")
        for c in continual.continual_configs(tiny(four_classes), ["sequential", "nsp2"], [0, 1])
    ]
    rows = [jobs.execute_run(store, run_id) for run_id in ids]  # the worker's path: dispatch on kind
    assert [r["status"] for r in rows] == ["done"] * 4, [r["error"] for r in rows]
    assert all(r["kind"] == "continual" for r in rows)
    assert rows[0]["metrics"]["accuracy_matrix"] and rows[0]["timings"]["train_seconds"] > 0
    assert any(e.get("phase") == "task" for e in store.progress(ids[0]))
    assert store.load_artifact(ids[1])
    summary = continual.summarize_runs(rows)
    assert [s["method"] for s in summary] == ["sequential", "nsp2"] and summary[0]["seeds"] == 2
    assert continual.mean_matrix(rows[:2])[1][0] is not None


def test_failed_dataset_is_stored_without_traceback(tmp_path):
    store = RunStore()
    run_id = continual.submit_continual(store, tiny(tmp_path / "missing"))
    row = continual.execute_continual(store, run_id)
    assert row["status"] == "failed" and "not found" in row["error"] and "Traceback" not in row["error"]


def test_a_run_deleted_while_it_trains_ends_quietly(four_classes):
    store = RunStore()
    run_id = continual.submit_continual(store, tiny(four_classes))
    row = continual.execute_continual(store, run_id, echo=lambda e: e["phase"] == "train" and store.delete_run(run_id))
    assert row == {"id": run_id, "status": "deleted"} and store.get_run(run_id) is None


def test_cli_runs_methods_and_seeds(four_classes, capsys):
    code = cli.main(
        [
            "continual",
            "--dataset",
            str(four_classes),
            "--backbone",
            "tiny-random",
            "--resolution",
            "32",
            "--tasks",
            "2",
            "--method",
            "sequential,joint",
            "--seeds",
            "0",
            "--epochs",
            "2",
            "--prompts",
            "2",
            "--placement",
            "deep",
            "--batch-size",
            "8",
            "--shots",
            "0",
            "--json",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 0
    assert [line["method"] for line in lines] == ["sequential", "joint"]
    assert all(line["status"] == "done" and line["avg_accuracy"] is not None for line in lines)
    assert len(RunStore().list_runs(kind="continual")) == 2


def test_generated_textures_make_a_ten_class_folder(tmp_path):
    folder = continual.make_textures(tmp_path / "tex", per_class=3, size=32)
    image_set = data.load_image_set(folder, 32)
    assert len(image_set.class_names) == 10 and image_set.class_counts()["rings"] == 3
    assert continual.make_textures(folder) == folder  # drawn once


# ------------------------------------------------------------------------------------ charts and page
def test_diagnostics_chart_has_one_bar_group_per_method():
    summary = [
        {"method": "sequential", "seeds": 2, "learning_accuracy_mean": 0.8, "learning_accuracy_std": 0.1,
         "ncm_accuracy_mean": 0.5, "ncm_accuracy_std": None},
        {"method": "nsp2", "seeds": 2, "learning_accuracy_mean": 0.7, "ncm_accuracy_mean": 0.6},
    ]  # fmt: skip
    fig = continual_charts.diagnostics_bars(summary)
    assert [t.name for t in fig.data] == [continual.METHOD_LABELS["sequential"], continual.METHOD_LABELS["nsp2"]]
    keys = list(continual_charts.DIAGNOSTICS)
    assert fig.data[0].y[keys.index("learning_accuracy")] == pytest.approx(80.0)
    assert fig.data[1].y[keys.index("ncm_accuracy")] == pytest.approx(60.0)
    assert fig.data[1].y[keys.index("avg_accuracy")] is None  # not measured: no bar, not a zero


def test_charts_carry_the_matrix():
    tasks = [["a", "b"], ["c", "d"]]
    matrix = [[0.9, None], [0.6, 0.8]]
    heat = continual_charts.accuracy_heatmaps({"sequential": matrix, "nsp2": matrix}, tasks)
    assert len(heat.data) == 2 and heat.data[0].name == "Sequential fine-tuning"
    assert list(heat.data[0].z[1]) == [pytest.approx(60.0), pytest.approx(80.0)] and heat.data[0].z[0][1] is None
    lines = continual_charts.accuracy_lines({"sequential": matrix, "joint": [[None, None], [0.8, 0.9]]}, tasks)
    seq_t1 = [t for t in lines.data if t.xaxis == "x" and t.name.startswith("T1")][0]
    assert list(seq_t1.x) == [1, 2] and list(seq_t1.y) == [pytest.approx(90.0), pytest.approx(60.0)]
    summary = [
        {
            "method": "sequential",
            "seeds": 3,
            "avg_accuracy_mean": 0.7,
            "avg_accuracy_std": 0.02,
            "forgetting_mean": 0.3,
            "forgetting_std": 0.05,
        }
    ]
    bars = continual_charts.summary_bars(summary)
    assert [t.y[0] for t in bars.data] == [pytest.approx(70.0), pytest.approx(30.0)]
    assert continual_charts.accuracy_heatmaps({}, []).layout.annotations  # a placeholder, no error


def test_page_renders_and_shows_a_finished_experiment(four_classes, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from vptdash.runs import worker

    monkeypatch.setattr(worker, "ensure_worker", lambda store, **kw: True)
    store = RunStore()
    at = AppTest.from_file(str(ROOT / "app_pages" / "continual.py"), default_timeout=60)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.title and "Continual" in at.title[0].value

    for config in continual.continual_configs(tiny(four_classes), ["sequential", "nsp2"], [0]):
        continual.run_continual_now(store, config, source="live", sweep_id="cl-page")
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # heatmaps, lines over tasks, summary bars, who-forgot diagnostics

    # the features' own forgetting (nearest class mean after every task), and runs of code that did not
    # measure it: said so, not shown as "no finished run"
    at.segmented_control(key="cl_view").set_value("features").run()
    assert not at.exception, [e.message for e in at.exception]
    assert "before this view was measured" not in " ".join(i.value for i in at.info)
    heatmap = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert any(v is not None for trace in heatmap["data"] for row in trace["z"] for v in row)
    for row in store.list_runs(kind=continual.KIND):
        store.update_results(row["id"], metrics={"ncm_task_il_matrix": None})
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert "before this view was measured" in " ".join(i.value for i in at.info)

    # The cue-conflict set's preview: each of the 5 tasks is one family (its images are not drawn here)
    read_names = continual.dataset_class_names
    monkeypatch.setattr(
        continual,
        "dataset_class_names",
        lambda spec, *a: cues.class_names() if spec == cues.NAME else read_names(spec, *a),
    )
    at.selectbox(key="cl_dataset").set_value(cues.NAME).run()
    assert not at.exception, [e.message for e in at.exception]
    (preview,) = [c.value for c in at.caption if c.value.startswith("**T1**")]
    tasks = [part.split("** ", 1)[1].split(", ") for part in preview.split(" → ")]
    assert len(tasks) == 5 and all(len({name.rsplit("-", 1)[0] for name in task}) == 1 for task in tasks)


# ------------------------------------------------------------------------------------ fast paths
def _full_pass(model, image_set, index, mean, std):
    """Pooled features of these images through the whole prompted model, one image set, no shortcuts."""
    with torch.no_grad(), model.whole_blocks():  # every block computes every row
        return model.eval().forward_features(data.normalize(image_set.images[index], mean, std))


def test_evaluating_the_seen_tasks_equals_a_pass_over_every_test_image(four_classes):
    """After task 1 of 2 only task 1's test images run; its figures must be those of the whole test set."""
    config = tiny(four_classes, method="sequential", max_test_per_class=None)
    image_set, split, test_index, task_classes, model, mean, std = continual.prepare(config)
    model.eval().head.active = 1
    order = [c for classes in task_classes for c in classes]
    labels = torch.tensor([order.index(int(c)) for c in image_set.labels[test_index]])  # arrival-order labels
    tasks = torch.tensor([0 if label < len(task_classes[0]) else 1 for label in labels.tolist()])
    assert (tasks == 1).any()  # the later task's images exist and must be left out, not lost
    encoded = train.encode_frozen_split(model, config.run_config(depth=4), image_set, test_index, mean, std)
    offsets = [0, len(task_classes[0]), len(order)]

    rows, features = continual.evaluate_seen(model, encoded, labels, tasks, 1, offsets, config)

    full = _full_pass(model, image_set, test_index, mean, std)
    logits = model.head(full)
    mine = tasks == 0
    assert set(rows) == {0} and len(features) == int(mine.sum())
    torch.testing.assert_close(rows[0]["features"], full[mine], rtol=1e-5, atol=1e-5)
    predicted = logits[mine].argmax(dim=1)
    assert rows[0]["accuracy"] == pytest.approx(float((predicted == labels[mine]).float().mean()))
    recalls = [float((predicted[labels[mine] == c] == c).float().mean()) for c in labels[mine].unique().tolist()]
    assert rows[0]["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    own = logits[mine][:, offsets[0] : offsets[1]].argmax(dim=1)
    assert rows[0]["task_il_accuracy"] == pytest.approx(float((own == labels[mine]).float().mean()))


@pytest.mark.parametrize("method", ["nsp2", "joint"])
def test_final_figures_equal_a_fresh_pass_with_the_final_prompts(four_classes, method):
    """The last row of the matrix and the final nearest-class-mean accuracy (which reuses the last
    evaluation's features) against the model rebuilt from the stored prompts and heads, every image
    through the whole model. A large lr moves the features far enough that, for NSP2, the test images'
    features before training give another NCM accuracy (checked): reusing stale features fails here."""
    config = tiny(four_classes, method=method, lr=0.5)
    result = continual.run_continual(config)
    image_set, split, test_index, task_classes, model, mean, std = continual.prepare(config)
    untrained_test_features = _full_pass(model, image_set, test_index, mean, std)
    untrained_train_features = _full_pass(model, image_set, split.train, mean, std)
    model.load_trainable_state(result.trainable_state)
    order = [c for classes in task_classes for c in classes]
    relabel = lambda index: torch.tensor([order.index(int(c)) for c in image_set.labels[index]])  # noqa: E731
    train_labels, test_labels = relabel(split.train), relabel(test_index)
    train_features = _full_pass(model, image_set, split.train, mean, std)
    test_features = _full_pass(model, image_set, test_index, mean, std)

    expected_ncm = continual.ncm_accuracy(train_features, train_labels, test_features, test_labels)
    assert result.metrics["ncm_accuracy"] == pytest.approx(expected_ncm)
    if method == "nsp2":  # one method shows the check can tell fresh features from stale ones (same code for all)
        stale = continual.ncm_accuracy(train_features, train_labels, untrained_test_features, test_labels)
        assert stale != pytest.approx(expected_ncm)
    predicted = model.head(test_features).argmax(dim=1)
    sizes = [len(c) for c in task_classes]
    for j in range(len(task_classes)):
        mine = (test_labels >= sum(sizes[:j])) & (test_labels < sum(sizes[: j + 1]))
        expected = float((predicted[mine] == test_labels[mine]).float().mean())
        assert result.metrics["accuracy_matrix"][-1][j] == pytest.approx(expected)
        # nearest class mean among task j's own classes, from the definition: cosine to the class means
        own = list(range(sum(sizes[:j]), sum(sizes[: j + 1])))

        def ncm_own(train_f, test_f):
            train_n = torch.nn.functional.normalize(train_f, dim=1)
            means = torch.stack([train_n[train_labels == c].mean(0) for c in own])
            similarity = (
                torch.nn.functional.normalize(test_f[mine], dim=1) @ torch.nn.functional.normalize(means, dim=1).T
            )
            return float((torch.tensor(own)[similarity.argmax(1)] == test_labels[mine]).float().mean())

        assert result.metrics["ncm_task_il_matrix"][-1][j] == pytest.approx(ncm_own(train_features, test_features))
        untrained = ncm_own(untrained_train_features, untrained_test_features)  # before the first task
        assert result.metrics["ncm_task_il_untrained"][j] == pytest.approx(untrained)
    untrained_by_task = result.metrics["ncm_task_il_untrained"]
    assert result.metrics["avg_ncm_task_il_untrained"] == pytest.approx(np.mean(untrained_by_task))
    ncm_rows = result.metrics["ncm_task_il_matrix"]
    if method == "joint":  # trained once: only the last row is measured, nothing to forget
        assert all(v is None for row in ncm_rows[:-1] for v in row) and result.metrics["ncm_forgetting_task_il"] is None
    else:  # each row measured after its task, on the tasks seen so far
        assert all((v is not None) == (j <= i) for i, row in enumerate(ncm_rows) for j, v in enumerate(row))
        first = ncm_rows[0][0]
        assert result.metrics["ncm_forgetting_task_il"] == pytest.approx(first - ncm_rows[-1][0])


def test_run_timings_say_where_the_time_went(four_classes):
    result = continual.run_continual(tiny(four_classes, method="nsp2"))
    phases = result.timings["phases"]
    assert {"data", "encode", "ncm", "inputs", "train", "null_space", "projectors", "evaluate"} <= set(phases)
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) <= result.timings["train_seconds"] + 1e-6
