"""core/metrics' tensor evaluator (backdoor_rates, QRA's measure) agrees with the loader evaluator on the same data."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fst_plugin.core.metrics import BackdoorTestSets, backdoor_rates, evaluate_backdoor


def _tests(n_clean: int = 37, n_bd: int = 29) -> BackdoorTestSets:
    gen = torch.Generator().manual_seed(0)
    return BackdoorTestSets(torch.randn(n_clean, 6, generator=gen), torch.randint(0, 3, (n_clean,), generator=gen),
                       torch.randn(n_bd, 6, generator=gen), torch.zeros(n_bd, dtype=torch.int64),
                       torch.randint(0, 3, (n_bd,), generator=gen))


def test_backdoor_rates_equal_evaluate_backdoor_for_every_model_and_batch_size() -> None:
    torch.manual_seed(0)
    models = {"a": nn.Linear(6, 3).eval(), "b": nn.Linear(6, 3).eval()}
    tests = _tests()
    n_bd = len(tests.bd_inputs)
    clean = DataLoader(TensorDataset(tests.clean_inputs, tests.clean_labels), batch_size=8)
    bd = DataLoader(TensorDataset(tests.bd_inputs, tests.bd_labels, torch.arange(n_bd), torch.ones(n_bd),
                                  tests.bd_original_labels), batch_size=8)
    for batch_size in (5, 256):
        rates = backdoor_rates(models, tests, "cpu", lambda x: x, batch_size=batch_size)
        for name, model in models.items():
            expected = evaluate_backdoor(model, clean, bd)
            assert list(rates[name]) == ["acc", "asr", "ra"]
            assert (rates[name]["acc"], rates[name]["asr"], rates[name]["ra"]) == (
                expected.test_acc, expected.test_asr, expected.test_ra)


def test_the_clean_target_rate_counts_clean_images_predicted_as_the_target_and_prepare_is_applied() -> None:
    class Argmax(nn.Module):  # predicts the index of the largest of the first three inputs
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :3]

    tests = _tests()
    shifted = lambda x: x + torch.tensor([100.0, 0, 0, 0, 0, 0])  # noqa: E731  every input now predicts class 0
    rates = backdoor_rates({"m": Argmax()}, tests, "cpu", shifted, target=0, batch_size=7)["m"]
    assert list(rates) == ["acc", "clean_target", "asr", "ra"]
    assert rates["clean_target"] == 1.0 and rates["asr"] == 1.0
    assert rates["acc"] == (tests.clean_labels == 0).sum().item() / len(tests.clean_labels)
    assert rates["ra"] == (tests.bd_original_labels == 0).sum().item() / len(tests.bd_original_labels)
    plain = backdoor_rates({"m": Argmax()}, tests, "cpu", lambda x: x, target=0)["m"]
    assert plain["clean_target"] == (tests.clean_inputs[:, :3].argmax(1) == 0).sum().item() / len(tests.clean_inputs) < 1
