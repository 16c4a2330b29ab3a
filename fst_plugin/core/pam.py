"""Path-Aware Minimization (PAM, Min et al., NeurIPS 2024), the optimiser step of the authors' follow-up to FST.

FST's purification is superficial on some attacks: a few poisoned images bring the backdoor back. PAM steers
the purified model away from the backdoored one along the path that joins them. It is SAM with the ascent
direction replaced by that path. With θ₀ the backdoored weights (frozen) and θₜ the current ones, one step:

1. d = θ₀ − θₜ over the optimised parameters, with ONE global L2 norm over all of them;
2. move to θₜ + ρ·d/‖d‖ (buffers, e.g. BatchNorm statistics, are never moved);
3. take the loss's gradient there (the caller's closure: forward + backward);
4. restore θₜ exactly and step the base optimiser with that gradient.

At d = 0 (the first step of a mode that starts from θ₀) nothing moves and the step is the base optimiser's.
Written from the paper and the description of the authors' ``PAM`` class (``fine_tune/BTIDBF/sam.py`` of
AISafety-HKUST/stable_backdoor_purification); where we differ on purpose: every perturbed parameter is restored
(the authors restore only those with a gradient, so a frozen parameter would keep its perturbation), and the
direction covers exactly the parameters the base optimiser updates (theirs: every parameter of the model).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


class PathAwareMinimizer:
    """Wraps ``base`` (e.g. SGD): ``step(closure)`` does one PAM step and returns the closure's loss.

    ``anchor`` maps each optimised parameter to its backdoored value θ₀ (copied here, so later changes to the
    source model do not move it). ``rho`` is the step along the path (the authors' CIFAR-10 default 0.5).
    """

    def __init__(self, base: torch.optim.Optimizer, anchor: dict[torch.Tensor, torch.Tensor], rho: float) -> None:
        if not rho >= 0:
            raise ValueError(f"rho is {rho}; it must be >= 0")
        self.base = base
        self.rho = float(rho)
        self.params = [p for group in base.param_groups for p in group["params"]]
        missing = [i for i, p in enumerate(self.params) if p not in anchor]
        if missing:
            raise ValueError(f"no backdoored value (anchor) for {len(missing)} optimised parameter(s)")
        self.anchor = [anchor[p].detach().clone() for p in self.params]

    @torch.no_grad()
    def path_offset(self) -> list[torch.Tensor]:
        """ρ·d/‖d‖ for every optimised parameter (zeros when d = 0)."""
        diffs = [a.to(p.device, p.dtype) - p for p, a in zip(self.params, self.anchor)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in diffs])) if diffs else 0
        if not float(norm) > 0:
            return [torch.zeros_like(d) for d in diffs]
        return [d * (self.rho / norm) for d in diffs]

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[None]:
        """The parameters at θₜ + ρ·d/‖d‖ inside the block, restored exactly on leaving it (also on an error).
        The tuning loop takes its gradient inside and steps the base optimiser (or a GradScaler) after."""
        offsets = self.path_offset()
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, offset in zip(self.params, offsets):
                p.add_(offset)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, saved):
                    p.copy_(value)

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Perturb along the path, run ``closure`` (zero_grad is the caller's; it must call backward), restore,
        step the base optimiser."""
        with self.perturbed(), torch.enable_grad():
            loss = closure()
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The base optimiser's state (the anchor is rebuilt from the record on resume)."""
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)


def anchor_of(model: torch.nn.Module) -> dict[torch.Tensor, torch.Tensor]:
    """θ₀ for :class:`PathAwareMinimizer`: a copy of every parameter of ``model``, keyed by the parameter."""
    return {p: p.detach().clone() for p in model.parameters()}
