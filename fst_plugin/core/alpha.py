"""FST's penalty strength chosen from the clean tuning set alone (``alpha: auto``).

Why: the head is kept at ‖W₀‖ (the projection), so the penalty α·⟨W, W₀⟩ is worth up to α·Σ‖W₀_l‖² nats, while
the cross-entropy it competes with is a few nats on any model. The paper's α is therefore a different strength on
every head: 0.2 suits its ResNet-18 on CIFAR-10, but on ``resnet9_cpu`` (‖W₀‖ = 6.77) it is worth 9.2 nats and
costs 14 points of clean accuracy. So the candidates are *strengths* s, α = s / Σ‖W₀_l‖² (what the penalty is
worth at the projection radius), and a held-out part of the tuning set picks one: the strongest s whose held-out
accuracy is at most ``budget`` below that of the same tuning without the penalty (α = 0, i.e. FT-init, on the same
images, seed and batch order, so the comparison is paired). A stronger penalty costs more accuracy and, as the
paper shows, removes more of the backdoor, so the aim is the strongest affordable one; bisection over the
descending grid finds it in ⌈log₂(k + 1)⌉ runs (3 for the 7 default strengths) after the reference run.

Nothing here sees poisoned data or a test set: the caller splits the tuning set (:func:`split_held_out` says which
positions go where) and hands in the two parts. Each candidate is the real run in small, through the one loop
(:func:`~fst_plugin.core.tuning.tune`), on the fit part and from a fresh copy of the backdoored model (the model
handed in is not touched). Candidates run without PAM's step (``pam_rho``), whose reversed samples they lack. The
final run then tunes on the whole tuning set with the chosen α, exactly as a run given that α would.

``alpha: strength=S`` takes the same scale without the search: α = S / Σ‖W₀_l‖² of the backdoored head, one
number that means the same on every head, at no cost in time (:func:`fixed_alpha`).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from fst_plugin.core.head import ClassifierHead
from fst_plugin.core.metrics import predict
from fst_plugin.core.modes import TuningMode
from fst_plugin.core.tuning import TuningConfig, tune
from fst_plugin.errors import ConfigError
from fst_plugin.runtime import progress

log = logging.getLogger(__name__)

# strengths s (α = s / Σ‖W₀‖²), strongest first; the paper's α = 0.2 is s = 9.2 on resnet9_cpu
STRENGTHS = (8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125)


@dataclass(frozen=True)
class AlphaSearch:
    """How ``alpha: auto`` searches: the candidate strengths, the accuracy budget and the held-out share."""

    strengths: tuple[float, ...] = STRENGTHS  # descending, > 0
    budget: float = 0.01                      # held-out accuracy (a fraction) the penalty may cost against α = 0
    held_out: float = 0.2                     # share of the tuning set held out to score the candidates

    def __post_init__(self) -> None:
        s = self.strengths
        if not s or any(not v > 0 for v in s) or any(a <= b for a, b in zip(s, s[1:])):
            raise ValueError(f"strengths {s} must be positive and strictly descending")
        if not 0 <= self.budget < 1:
            raise ValueError(f"budget is {self.budget}; it must be in [0, 1)")
        if not 0 < self.held_out < 1:
            raise ValueError(f"held_out is {self.held_out}; it must be in (0, 1)")

    @property
    def max_candidates(self) -> int:
        """The most candidate runs bisection takes (the reference run not counted)."""
        return math.ceil(math.log2(len(self.strengths) + 1))


@dataclass(frozen=True)
class AlphaTrial:
    """One candidate's score on the held-out images (strength 0: the reference run, α = 0)."""

    strength: float
    alpha: float
    held_out_acc: float
    held_out_loss: float      # mean cross-entropy per held-out image
    disagreement: float       # share of held-out images predicted otherwise than by the reference run
    paired_se: float          # standard error of held_out_acc minus the reference's (paired, same images)
    seconds: float


@dataclass
class AlphaChoice:
    """What ``alpha: auto`` chose and why: the α, every run's held-out score, and the time it took."""

    alpha: float
    strength: float
    within_budget: bool       # False: even the weakest candidate cost more than the budget (it is used anyway)
    head_norm_sq: float       # Σ‖W₀_l‖², the scale of the strengths
    budget: float
    held_out_images: int
    reference: AlphaTrial
    trials: list[AlphaTrial] = field(default_factory=list)  # the candidates, in the order they ran
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AlphaChoice":
        values = dict(data)
        values["reference"] = AlphaTrial(**values["reference"])
        values["trials"] = [AlphaTrial(**t) for t in values.get("trials", [])]
        return cls(**values)


def split_held_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions 0..n-1 of the tuning set, split at random (seeded) into (fit, held-out); held-out has
    round(n·fraction) of them, and both parts at least one."""
    n_held = round(n * fraction)
    if n_held < 1 or n - n_held < 1:
        raise ConfigError(f"alpha auto cannot hold out {fraction:g} of a tuning set of {n} images "
                          f"({n_held} held out, {n - n_held} left to tune on)",
                          "use a larger tuning set (ratio or index), another alpha_held_out, or a number for alpha")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_held:]), sorted(order[:n_held])


def first_affordable(count: int, affordable: Callable[[int], bool]) -> int:
    """Bisection over ``count`` candidates ordered strongest first, affordability being monotone (a candidate
    weaker than an affordable one is affordable): the first affordable index, or ``count`` when none is. Asks
    ``affordable`` at most ⌈log₂(count + 1)⌉ times, and only ever about indices below ``count``."""
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        if affordable(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def head_norm_sq(head: ClassifierHead) -> float:
    """Σ_l ‖W_l‖² of the head as it is now (before re-initialisation: the backdoored head's, Σ‖W₀_l‖²)."""
    return float(sum(layer.weight.detach().double().pow(2).sum().item() for layer in head.modules))


STRENGTH_PREFIX = "strength="   # alpha: strength=S, the penalty's weight given as a strength (α = S / Σ‖W₀_l‖²)


def parse_strength(value: object) -> Optional[float]:
    """S of an ``alpha: strength=S`` value (S > 0 and finite), None for any other value; a ValueError for a
    ``strength=`` whose S is not such a number."""
    if not (isinstance(value, str) and value.strip().lower().startswith(STRENGTH_PREFIX)):
        return None
    text = value.strip()[len(STRENGTH_PREFIX):]
    try:
        strength = float(text)
    except ValueError:
        strength = math.nan
    if not (math.isfinite(strength) and strength > 0):
        raise ValueError(f"the strength in {value!r} must be a number > 0")
    return strength


def fixed_alpha(alpha: Union[float, str], head: ClassifierHead) -> float:
    """The penalty's weight a run tunes with, short of alpha auto's choice: a number as given; ``strength=S`` as
    S / Σ‖W₀_l‖² of ``head`` as it is now (call it before re-initialisation: the backdoored head), the same worth in
    nats on every head (module docstring); ``auto`` 0 until its choice is made."""
    strength = parse_strength(alpha)
    if strength is not None:
        norm_sq = head_norm_sq(head)
        if not norm_sq > 0:
            raise ConfigError(f"alpha {alpha} scales by the head's squared norm, which is {norm_sq}",
                              "give alpha as a number for a model whose head is all zeros")
        log.info("alpha %s: %.4g (the backdoored head's squared norm %.4g)", alpha, strength / norm_sq, norm_sq)
        return strength / norm_sq
    return 0.0 if alpha == "auto" else float(alpha)


def choose_alpha(model: nn.Module, head: ClassifierHead, mode: TuningMode, fit_loader: Iterable,
                 held_out_loader: Iterable, config: TuningConfig, search: AlphaSearch = AlphaSearch()) -> AlphaChoice:
    """The strongest α = s / Σ‖W₀_l‖² over the strengths s of ``search`` whose held-out accuracy stays within its
    budget of α = 0's (the same tuning without the penalty: a paired comparison), found by bisection; each
    candidate tunes a fresh copy of ``model`` on ``fit_loader`` with ``config`` (the real run's; its α and PAM step
    are ignored). Only the two loaders are read; ``model`` and ``head`` are left as they are."""
    if not mode.feature_shift_penalty:
        raise ValueError(f"mode {mode.name} has no feature-shift penalty to choose alpha for")
    started = time.time()
    norm_sq = head_norm_sq(head)
    if not norm_sq > 0:
        raise ConfigError("alpha auto: the classifier head's weight is zero, so its strengths have no scale",
                          "give alpha a number")
    base = dataclasses.replace(config, pam_rho=0.0, show_progress=False)
    reference_preds: list[torch.Tensor] = []

    def run(strength: float) -> AlphaTrial:
        begun = time.time()
        alpha = strength / norm_sq
        trial_model = copy.deepcopy(model)
        trial_head = ClassifierHead(tuple((name, trial_model.get_submodule(name)) for name in head.names))
        tune(trial_model, trial_head, mode, fit_loader, dataclasses.replace(base, alpha=alpha))
        preds, labels, loss = predict(trial_model, held_out_loader, config.device)
        if not reference_preds:
            reference_preds.append(preds)
        ref = reference_preds[0]
        n = max(len(labels), 1)
        acc = (preds == labels).double().mean().item()
        diff = acc - (ref == labels).double().mean().item()
        disagreement = (preds != ref).double().mean().item()
        paired_se = math.sqrt(max(disagreement - diff * diff, 0.0) / n)
        trial = AlphaTrial(strength, alpha, acc, loss, disagreement, paired_se, time.time() - begun)
        if strength == 0:
            log.info("alpha auto: alpha 0 (the reference): held-out accuracy %.4f, loss %.4f (%.1f s)", acc, loss,
                     trial.seconds)
        else:
            log.info("alpha auto: strength %g (alpha %.4g): held-out accuracy %.4f (%+.4f +- %.4f against alpha 0), "
                     "loss %.4f (%.1f s)", strength, alpha, acc, diff, paired_se, loss, trial.seconds)
        return trial

    strengths = search.strengths
    ticks = iter(progress(range(1 + search.max_candidates), config.show_progress, "alpha auto"))
    next(ticks, None)
    reference = run(0.0)
    trials: list[AlphaTrial] = []

    def affordable(index: int) -> bool:
        next(ticks, None)
        trials.append(run(strengths[index]))
        return trials[-1].held_out_acc >= reference.held_out_acc - search.budget

    first = first_affordable(len(strengths), affordable)
    for _ in ticks:  # fill the bar: bisection may need fewer runs than it allows for
        pass
    within = first < len(strengths)
    strength = strengths[first] if within else strengths[-1]
    choice = AlphaChoice(alpha=strength / norm_sq, strength=strength, within_budget=within, head_norm_sq=norm_sq,
                         budget=search.budget, held_out_images=len(reference_preds[0]),
                         reference=reference, trials=trials, seconds=time.time() - started)
    if not within:
        log.warning("alpha auto: even the weakest strength %g cost more than %.3f held-out accuracy; using it",
                    strength, search.budget)
    log.info("alpha auto: alpha %.4g (strength %g, ||W0||^2 %.3g) chosen from %d runs in %.1f s", choice.alpha,
             strength, norm_sq, 1 + len(trials), choice.seconds)
    return choice

