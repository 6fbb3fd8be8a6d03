"""``l2_lambda`` on a plain ``nn.Module``: its output is a tensor, which cannot carry the auxiliary
loss, so ``collect_aux_loss`` hands it over, and without it the first forward warns once."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

from adapterkit import AdapterModel, aux_loss, collect_aux_loss
from helpers import perturb

X = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))


def _model(l2_lambda: float = 0.25) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
    model.add_adapter("a", "pfeiffer", target_modules=["2"], reduction_factor=2, l2_lambda=l2_lambda)
    perturb(model.adapters, scale=0.5)
    model.train_adapter("a")
    return model


def _expected(model: AdapterModel) -> torch.Tensor:
    with torch.no_grad():
        model.eval()
        change = model(X)
        with model.disable_adapters():
            change = change - model(X)
        model.train()
    return 0.25 * change.square().sum(-1).mean()


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(aux_loss, "_warned", False)


def test_collect_aux_loss_hands_over_the_l2_penalty_with_its_gradient(fresh_warning):
    model = _model()
    expected = _expected(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", aux_loss.AuxLossDroppedWarning)  # collected: nothing to warn about
        with collect_aux_loss() as aux:
            y = model(X)
            model(X)  # a second forward adds its own
    assert isinstance(y, torch.Tensor) and len(aux.losses) == 2
    torch.testing.assert_close(aux.losses[0], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(aux.total, 2 * expected, rtol=1e-5, atol=0)
    aux.losses[0].backward()
    assert all(p.grad is not None for p in model.adapters.parameters())
    with collect_aux_loss() as none:
        model.eval()
        model(X)
    assert none.losses == [] and float(none.total) == 0.0


def test_without_a_collector_the_first_dropped_loss_warns_once(fresh_warning):
    model = _model()
    with pytest.warns(aux_loss.AuxLossDroppedWarning, match="collect_aux_loss"):
        model(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", aux_loss.AuxLossDroppedWarning)
        model(X)  # once only
        _model(l2_lambda=0.0)(X)


def test_collectors_are_per_thread(fresh_warning):
    model = _model()
    expected = _expected(model)
    counts: dict[int, int] = {}

    def work(i: int) -> None:
        with collect_aux_loss() as aux:
            for _ in range(i + 1):
                model(X)
        counts[i] = len(aux.losses)
        torch.testing.assert_close(aux.total.detach(), (i + 1) * expected, rtol=1e-5, atol=0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == {0: 1, 1: 2, 2: 3}
