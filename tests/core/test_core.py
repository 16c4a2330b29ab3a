"""The algorithm's invariants, on a tiny model and random data (pure core, no files)."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from fst_plugin.core import (
    MODES,
    TuningConfig,
    defense_effectiveness_rating,
    evaluate_backdoor,
    feature_shift_penalty,
    find_head,
    get_mode,
    reinit_head,
    tune,
)
from fst_plugin.core.modes import PAPER_MODES
from fst_plugin.errors import ConfigError, ModelError, TrainingDiverged
from fst_plugin.models import build_model


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def batches(n_batches: int = 3, size: int = 8, classes: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n_batches)]


class Watch:
    """An iterable of batches that calls ``check(model)`` before each batch, i.e. after every optimiser step."""

    def __init__(self, data, check) -> None:
        self.data, self.check, self.calls = data, check, 0

    def __iter__(self):
        for batch in self.data:
            self.check()
            self.calls += 1
            yield batch


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_modes_are_the_papers_table() -> None:
    table = {name: (m.reinit_head, m.train_head, m.train_backbone, m.feature_shift_penalty, m.path_aware)
             for name, m in MODES.items()}
    assert table == {
        "lp": (False, True, False, False, False),
        "vanilla-ft": (False, True, True, False, False),
        "fe-tuning": (True, False, True, False, False),
        "ft-init": (True, True, True, False, False),
        "fst": (True, True, True, True, False),
        "pam": (False, True, True, False, True),   # the follow-up's: vanilla FT with PAM's step and data
    }
    assert all(MODES[m].project_head_norm for m in PAPER_MODES)  # the official code's default
    assert not MODES["pam"].project_head_norm  # the authors' PAM code has no projection
    assert get_mode("FE_tuning").name == "fe-tuning"
    with pytest.raises(ConfigError, match="unknown tuning mode"):
        get_mode("nope")


def test_reinit_draws_from_the_uniform_range() -> None:
    model = TinyNet()
    head = find_head(model, 4)
    bound = 1 / math.sqrt(model.fc.in_features)
    model.fc.weight.data.fill_(5.0)
    reinit_head(head)
    for tensor in (model.fc.weight, model.fc.bias):
        assert tensor.abs().max() <= bound
        assert tensor.std() > 0
    big = nn.Linear(512, 10)
    reinit_head(find_head(big, 10))
    assert big.weight.abs().max() <= 1 / math.sqrt(512)
    assert big.weight.abs().max() > 0.9 / math.sqrt(512)  # the whole range is used


def test_penalty_gradient_is_alpha_w0_plus_ce_gradient() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    head = find_head(model, 4)
    w0 = model.fc.weight.detach().clone()
    reinit_head(head)
    x, y = batches(1)[0]
    alpha = 0.37
    ce = nn.functional.cross_entropy(model(x), y)
    (ce_grad,) = torch.autograd.grad(ce, model.fc.weight)
    total = nn.functional.cross_entropy(model(x), y) + alpha * feature_shift_penalty(head, [w0])
    (total_grad,) = torch.autograd.grad(total, model.fc.weight)
    torch.testing.assert_close(total_grad, ce_grad + alpha * w0)
    assert feature_shift_penalty(head, [w0]).item() == pytest.approx((model.fc.weight * w0).sum().item())


@pytest.mark.parametrize("mode", PAPER_MODES)  # the modes that project by default (pam does not)
def test_head_norm_equals_w0_norm_after_every_step(mode: str) -> None:
    torch.manual_seed(1)
    model = TinyNet()
    target = model.fc.weight.norm().item()
    norms: list[float] = []
    loader = Watch(batches(4), lambda: norms.append(model.fc.weight.norm().item()))
    tune(model, find_head(model, 4), get_mode(mode), loader, TuningConfig(epochs=2, lr=0.5, show_progress=False))
    norms.append(model.fc.weight.norm().item())
    assert len(norms) == 9  # before each of the 8 steps (after the previous one) and at the end
    assert norms == pytest.approx([target] * len(norms), rel=1e-5)


def test_projection_off_lets_the_norm_move() -> None:
    torch.manual_seed(1)
    model = TinyNet()
    target = model.fc.weight.norm().item()
    tune(model, find_head(model, 4), get_mode("fst"), batches(4),
         TuningConfig(epochs=2, lr=0.5, projection=False, show_progress=False))
    assert model.fc.weight.norm().item() != pytest.approx(target, rel=1e-3)


def test_projection_at_most_keeps_a_small_reinitialised_head_and_caps_a_growing_one() -> None:
    """The paper's constraint ‖W‖ ≤ ‖W₀‖: FT-init's fresh head (smaller than W₀) is left alone at the start;
    FST's penalty grows the head, and the bound stops it at ‖W₀‖."""
    torch.manual_seed(1)
    model = TinyNet()
    with torch.no_grad():
        model.fc.weight.mul_(50)                 # a backdoored head much larger than a fresh one
    target = model.fc.weight.norm().item()
    norms: list[float] = []
    loader = Watch(batches(4), lambda: norms.append(model.fc.weight.norm().item()))
    tune(model, find_head(model, 4), get_mode("ft-init"), loader,
         TuningConfig(epochs=1, lr=0.01, projection_bound="at_most", show_progress=False))
    assert norms[0] < 0.5 * target               # not rescaled up to ‖W₀‖ (the "equal" bound would)
    assert max(norms) <= target * (1 + 1e-5)

    torch.manual_seed(1)
    model = TinyNet()
    target = model.fc.weight.norm().item()
    tune(model, find_head(model, 4), get_mode("fst"), batches(4),
         TuningConfig(epochs=3, lr=0.5, alpha=5.0, projection_bound="at_most", show_progress=False))
    assert model.fc.weight.norm().item() == pytest.approx(target, rel=1e-5)   # pushed to the bound, no further


def test_unknown_projection_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="projection_bound"):
        TuningConfig(projection_bound="sometimes")


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("mode, head_changes, backbone_changes", [
    ("lp", True, False), ("vanilla-ft", True, True), ("fe-tuning", True, True),
    ("ft-init", True, True), ("fst", True, True),
])
def test_which_parameters_each_mode_changes(mode: str, head_changes: bool, backbone_changes: bool) -> None:
    torch.manual_seed(2)
    model = TinyNet()
    before = snapshot(model)
    tune(model, find_head(model, 4), get_mode(mode), batches(3), TuningConfig(epochs=1, lr=0.1, show_progress=False))
    changed = _changed(before, snapshot(model))
    head_keys = {"fc.weight", "fc.bias"}
    assert bool(changed & head_keys) == head_changes
    backbone = changed - head_keys
    if backbone_changes:
        # the conv's weight; its bias feeds a BatchNorm, which cancels any shift, so its gradient is zero
        # up to rounding (torch 2.15 computes it as exactly zero)
        assert "features.0.weight" in backbone
    else:  # LP: not one backbone tensor moves, BatchNorm statistics included
        assert backbone == set()
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


@pytest.mark.parametrize("mode", ["lp", "fe-tuning"])
def test_frozen_parameters_never_change_during_training(mode: str) -> None:
    torch.manual_seed(3)
    model = TinyNet()
    frozen_prefix = "features." if mode == "lp" else "fc."
    seen: list[dict[str, torch.Tensor]] = []
    loader = Watch(batches(4), lambda: seen.append({k: v.clone() for k, v in snapshot(model).items()
                                                    if k.startswith(frozen_prefix)}))
    tune(model, find_head(model, 4), get_mode(mode), loader, TuningConfig(epochs=2, lr=0.2, show_progress=False))
    seen.append({k: v for k, v in snapshot(model).items() if k.startswith(frozen_prefix)})
    assert len(seen) == 9
    for state in seen[1:]:
        assert all(torch.equal(state[k], seen[0][k]) for k in state)


def test_fe_tuning_head_is_reinitialised_and_rescaled_once() -> None:
    torch.manual_seed(4)
    model = TinyNet()
    w0 = model.fc.weight.detach().clone()
    tune(model, find_head(model, 4), get_mode("fe-tuning"), batches(2), TuningConfig(epochs=1, show_progress=False))
    assert not torch.allclose(model.fc.weight, w0)
    assert model.fc.weight.norm().item() == pytest.approx(w0.norm().item(), rel=1e-5)


def test_same_seed_same_result_on_cpu() -> None:
    states = []
    for _ in range(2):
        torch.manual_seed(123)  # same initial model
        model = TinyNet()
        torch.manual_seed(999)  # different global state: tune must reseed
        history = tune(model, find_head(model, 4), get_mode("fst"), batches(3),
                       TuningConfig(epochs=2, seed=7, show_progress=False))
        states.append((snapshot(model), history))
    assert _changed(states[0][0], states[1][0]) == set()
    assert states[0][1] == states[1][1]


def test_resume_from_a_saved_state_ends_identically() -> None:
    data = batches(3)
    torch.manual_seed(5)
    reference = TinyNet()
    start = snapshot(reference)
    saved = []
    tune(reference, find_head(reference, 4), get_mode("fst"), data, TuningConfig(epochs=3, show_progress=False),
         on_epoch_end=saved.append)
    resumed = TinyNet()
    resumed.load_state_dict(start)
    history = tune(resumed, find_head(resumed, 4), get_mode("fst"), data, TuningConfig(epochs=3, show_progress=False),
                   resume=saved[0])
    assert len(history) == 3 and history[0] == saved[0].history[0]
    assert _changed(snapshot(reference), snapshot(resumed)) == set()


def test_nan_loss_stops_with_a_clear_error() -> None:
    model = TinyNet()
    x, y = batches(1)[0]
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        tune(model, find_head(model, 4), get_mode("fst"), [(x * float("nan"), y)],
             TuningConfig(epochs=1, show_progress=False))


def test_find_head_in_common_models() -> None:
    assert find_head(build_model("preactresnet18", 10), 10).names == ["linear"]
    assert find_head(torchvision.models.resnet18(num_classes=10), 10).names == ["fc"]
    vgg = torchvision.models.vgg11(num_classes=10)
    assert find_head(vgg, 10).names == ["classifier.6"]
    assert find_head(vgg, 10, whole_classifier=True).names == ["classifier.0", "classifier.3", "classifier.6"]
    assert find_head(vgg, 10, head_name="classifier").names == ["classifier.6"]

    class ViTLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(8, 8)
            self.heads = nn.Sequential()
            self.heads.add_module("head", nn.Linear(8, 10))

    assert find_head(ViTLike(), 10).names == ["heads.head"]
    assert find_head(ViTLike(), 10, head_name="heads.head").names == ["heads.head"]


def test_find_head_errors() -> None:
    model = TinyNet()
    with pytest.raises(ModelError, match="no nn.Linear layer with 7 outputs"):
        find_head(model, 7)
    with pytest.raises(ModelError, match="names no module"):
        find_head(model, 4, head_name="classifier")
    with pytest.raises(ModelError, match="not an nn.Linear"):
        find_head(model, 4, head_name="features.0")


def test_whole_classifier_penalises_and_projects_every_layer() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))
    wrapper = nn.Module()
    wrapper.classifier = model
    wrapper.forward = model.forward  # type: ignore[assignment]
    head = find_head(wrapper, 4, whole_classifier=True)
    assert head.names == ["classifier.1", "classifier.3"]
    norms = [layer.weight.norm().item() for layer in head.modules]
    tune(wrapper, head, get_mode("fst"), batches(2), TuningConfig(epochs=1, lr=0.5, show_progress=False))
    assert [layer.weight.norm().item() for layer in head.modules] == pytest.approx(norms, rel=1e-5)


def test_metrics_count_asr_and_ra_against_the_right_labels() -> None:
    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(len(x), 3)
            logits[:, 0] = 1.0  # always predicts class 0
            return logits

    clean = [(torch.zeros(4, 1), torch.tensor([0, 0, 1, 2]))]
    # items: image, backdoor label (target 0), original index, poison flag, original label
    bd = [(torch.zeros(4, 1), torch.tensor([0, 0, 0, 0]), torch.arange(4), torch.ones(4), torch.tensor([1, 2, 1, 0]))]
    metrics = evaluate_backdoor(Constant(), clean, bd)
    assert (metrics.test_acc, metrics.test_asr, metrics.test_ra) == (0.5, 1.0, 0.25)


def test_defense_effectiveness_rating() -> None:
    assert defense_effectiveness_rating(0.9, 1.0, 0.9, 0.0) == 1.0
    assert defense_effectiveness_rating(0.9, 1.0, 0.8, 1.0) == pytest.approx(0.45)
    assert defense_effectiveness_rating(0.9, 0.5, 0.95, 0.9) == 0.5


def test_preactresnet18_state_dict_matches_backdoorbench_layout() -> None:
    """BackdoorBench's PreActResNet18: 102 entries in this order (checked against its models/preact_resnet.py)."""
    state = build_model("preactresnet18", 10).state_dict()
    keys = list(state)
    assert len(keys) == 102
    assert keys[:7] == ["conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.bn1.running_mean",
                        "layer1.0.bn1.running_var", "layer1.0.bn1.num_batches_tracked", "layer1.0.conv1.weight"]
    block = [k[len("layer2.0."):] for k in keys if k.startswith("layer2.0.")]
    assert block == ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
                     "conv1.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
                     "bn2.num_batches_tracked", "conv2.weight", "shortcut.0.weight"]
    assert keys[-2:] == ["linear.weight", "linear.bias"]
    assert state["linear.weight"].shape == (10, 512) and state["conv1.weight"].shape == (64, 3, 3, 3)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
