"""alpha auto's choice in the pure core: the held-out split, the bisection, determinism and the ‖W₀‖² scale."""
from __future__ import annotations

import math

import pytest
import torch

from fst_plugin.core import AlphaSearch, TuningConfig, choose_alpha, find_head, get_mode, split_held_out
from fst_plugin.core.alpha import STRENGTHS, first_affordable, head_norm_sq
from fst_plugin.errors import ConfigError
from tests.core.test_core import TinyNet, batches, snapshot

CONFIG = TuningConfig(epochs=2, lr=0.05, seed=3)


def _choice(model: TinyNet, search: AlphaSearch = AlphaSearch()):
    head = find_head(model, 4)
    return choose_alpha(model, head, get_mode("fst"), batches(3, seed=1), batches(2, seed=2), CONFIG, search)


def _without_times(data: dict) -> dict:
    return {k: _without_times(v) if isinstance(v, dict) else [_without_times(t) for t in v] if isinstance(v, list)
            else v for k, v in data.items() if k != "seconds"}


def test_the_held_out_split_partitions_the_tuning_set_and_depends_only_on_the_seed() -> None:
    fit, held_out = split_held_out(50, 0.2, seed=7)
    assert len(held_out) == 10 and sorted(fit + held_out) == list(range(50)) and not set(fit) & set(held_out)
    assert split_held_out(50, 0.2, seed=7) == (fit, held_out)
    assert split_held_out(50, 0.2, seed=8) != (fit, held_out)


@pytest.mark.parametrize("n, fraction", [(3, 0.1), (2, 0.9)])
def test_a_held_out_part_that_leaves_one_side_empty_is_refused_in_one_line(n: int, fraction: float) -> None:
    with pytest.raises(ConfigError) as caught:
        split_held_out(n, fraction, seed=0)
    assert "alpha auto" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("count", [1, 2, 7, 8])
def test_bisection_finds_the_first_affordable_candidate_in_few_runs(count: int) -> None:
    for threshold in range(count + 1):  # candidates at and after `threshold` are affordable
        asked: list[int] = []
        found = first_affordable(count, lambda i: asked.append(i) or i >= threshold)
        assert found == threshold and all(0 <= i < count for i in asked)
        assert len(asked) <= math.ceil(math.log2(count + 1))


def test_the_choice_is_the_same_for_the_same_seed_and_leaves_the_model_untouched() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    before = snapshot(model)
    first, second = _choice(model), _choice(model)
    assert _without_times(first.to_dict()) == _without_times(second.to_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and first.reference.alpha == 0.0
    assert first.alpha == first.strength / first.head_norm_sq and first.strength in STRENGTHS
    assert 1 <= len(first.trials) <= AlphaSearch().max_candidates and first.held_out_images == 16


def test_a_budget_every_candidate_meets_picks_the_strongest_in_three_runs() -> None:
    torch.manual_seed(0)
    choice = _choice(TinyNet(), AlphaSearch(budget=0.99))
    assert choice.within_budget and choice.strength == STRENGTHS[0]
    assert [t.strength for t in choice.trials] == [STRENGTHS[3], STRENGTHS[1], STRENGTHS[0]]


def test_the_strengths_are_scaled_by_the_heads_squared_norm() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    small = _choice(model, AlphaSearch(budget=0.99))
    with torch.no_grad():
        model.fc.weight.mul_(2.0)
    large = _choice(model, AlphaSearch(budget=0.99))
    assert head_norm_sq(find_head(model, 4)) == pytest.approx(4 * small.head_norm_sq)
    assert large.strength == small.strength and large.alpha == pytest.approx(small.alpha / 4)


def test_a_mode_without_the_penalty_has_no_alpha_to_choose() -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match="no feature-shift penalty"):
        choose_alpha(model, find_head(model, 4), get_mode("ft-init"), batches(), batches(), CONFIG)


@pytest.mark.parametrize("bad", [dict(strengths=(1.0, 2.0)), dict(strengths=()), dict(budget=1.0),
                                 dict(held_out=0.0)])
def test_a_search_with_impossible_settings_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        AlphaSearch(**bad)


def test_a_strength_is_scaled_by_the_backdoored_heads_squared_norm_and_a_number_is_taken_as_given() -> None:
    from fst_plugin.core.alpha import fixed_alpha, parse_strength

    torch.manual_seed(0)
    model = TinyNet()
    head = find_head(model, 4)
    norm_sq = head_norm_sq(head)
    assert fixed_alpha("strength=2", head) == pytest.approx(2 / norm_sq)
    with torch.no_grad():
        model.fc.weight.mul_(2.0)
    assert fixed_alpha("strength=2", head) == pytest.approx(2 / (4 * norm_sq))   # same worth on a 2x larger head
    assert fixed_alpha(0.2, head) == 0.2 and fixed_alpha("auto", head) == 0.0
    assert parse_strength("Strength=0.5") == 0.5 and parse_strength("auto") is None and parse_strength(0.2) is None
    for bad in ("strength=0", "strength=-1", "strength=x", "strength=inf"):
        with pytest.raises(ValueError):
            parse_strength(bad)
    with torch.no_grad():
        model.fc.weight.zero_()
    with pytest.raises(ConfigError):
        fixed_alpha("strength=2", head)
