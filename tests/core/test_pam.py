"""The PAM step (core/pam.py): closed form on a toy quadratic, d = 0 is exactly the base optimiser, buffers are
never perturbed, and the restore is exact."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fst_plugin.core.pam import PathAwareMinimizer, anchor_of


def test_one_step_on_a_quadratic_matches_the_closed_form():
    """L(θ) = ½‖Aθ − b‖²: PAM's gradient is taken at θ + ρ·d/‖d‖ with d = θ₀ − θ, then SGD moves θ."""
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    theta0 = torch.randn(3, dtype=torch.float64)
    theta = nn.Parameter(theta0 + torch.randn(3, dtype=torch.float64))
    lr, rho = 0.1, 0.5
    pam = PathAwareMinimizer(torch.optim.SGD([theta], lr=lr), {theta: theta0}, rho)
    start = theta.detach().clone()
    d = theta0 - start
    probe = start + rho * d / d.norm()
    expected = start - lr * a.T @ (a @ probe - b)

    def closure():
        loss = 0.5 * (a @ theta - b).pow(2).sum()
        loss.backward()
        return loss

    pam.zero_grad()
    loss = pam.step(closure)
    assert torch.allclose(theta.detach(), expected, atol=1e-12)
    assert torch.isclose(loss, 0.5 * (a @ probe - b).pow(2).sum())  # the loss was taken at the probe point


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def test_at_d_zero_a_pam_step_is_exactly_the_base_optimisers_step():
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    plain, wrapped = _model(), _model()
    sgd = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    pam = PathAwareMinimizer(torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9), anchor_of(wrapped), 0.5)
    sgd.zero_grad()
    _closure(plain, x, y)()
    sgd.step()
    pam.zero_grad()
    pam.step(_closure(wrapped, x, y))
    for p, q in zip(plain.state_dict().values(), wrapped.state_dict().values()):
        assert torch.equal(p, q)


def test_later_steps_probe_along_the_path_and_buffers_are_never_perturbed():
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    plain, model = _model(), _model()
    sgd = torch.optim.SGD(plain.parameters(), lr=0.05)
    pam = PathAwareMinimizer(torch.optim.SGD(model.parameters(), lr=0.05), anchor_of(model), 0.5)
    bn = model[1]
    probes = []

    def closure():
        probes.append((bn.running_mean.clone(), [p.detach().clone() for p in model.parameters()]))
        return _closure(model, x, y)()

    for step in range(3):
        sgd.zero_grad()
        _closure(plain, x, y)()
        sgd.step()
        buffers_before = bn.running_mean.clone()
        params_before = [p.detach().clone() for p in model.parameters()]
        pam.zero_grad()
        pam.step(closure)
        assert torch.equal(probes[-1][0], buffers_before)  # the probe point has the buffers, unperturbed
        moved = [q - p for q, p in zip(probes[-1][1], params_before)]
        total = torch.linalg.vector_norm(torch.stack([m.norm() for m in moved]))
        assert torch.isclose(total, torch.tensor(0.0 if step == 0 else 0.5), atol=1e-5)
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), model.parameters()))


def test_the_restore_is_exact_and_the_anchor_is_a_copy():
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    model = _model()
    anchor = anchor_of(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    frozen_at = [p.detach().clone() for p in model.parameters()]

    class NoStep(torch.optim.SGD):
        def step(self, closure=None):  # only the perturb/restore around the closure is tested
            return None

    pam = PathAwareMinimizer(NoStep(model.parameters(), lr=1.0), anchor, 0.7)
    moved = []
    pam.step(lambda: (moved.append([p.detach().clone() for p in model.parameters()]),
                      _closure(model, x, y)())[1])
    for before, after in zip(frozen_at, model.parameters()):
        assert torch.equal(before, after)
    offsets = [m - p for m, p in zip(moved[0], model.parameters())]
    total = torch.linalg.vector_norm(torch.stack([o.norm() for o in offsets]))
    assert torch.isclose(total, torch.tensor(0.7), atol=1e-6)  # ρ along the path, one global norm
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(pam.anchor[0], next(model.parameters()))


def test_a_negative_rho_or_a_missing_anchor_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="rho"):
        PathAwareMinimizer(torch.optim.SGD(model.parameters(), lr=0.1), anchor_of(model), -1.0)
    with pytest.raises(ValueError, match="anchor"):
        PathAwareMinimizer(torch.optim.SGD(model.parameters(), lr=0.1), {}, 0.5)
