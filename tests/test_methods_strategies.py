"""Strategies open to users (``strategies.register_strategy``): a class registered by name works
with every method like a built-in, is saved in the config by its name, and unknown names are refused."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ARCHS, make_base, make_batch, perturb, run
from torch import nn

from adapterkit import AdapterError, AdapterModel, Strategy, available_strategies, register_strategy
from adapterkit.strategies import as_delta


@register_strategy("tanh_gate")
class TanhGate(Strategy):
    """``base + tanh(g) * delta`` with one learned ``g`` per channel starting at zero (a user's strategy)."""

    makes_identity = True

    def __init__(self, width: int, **regularisers: float):
        super().__init__(**regularisers)
        self.g = nn.Parameter(torch.zeros(width))

    @classmethod
    def create(cls, width, scale, **regularisers):
        return cls(width, **regularisers)

    def delta(self, base, c, output):
        return as_delta(base, c, output) * torch.tanh(self.g)


@pytest.mark.parametrize("method,options", [("pfeiffer", {}), ("lora", {"r": 4}), ("ia3", {}), ("dora", {"r": 2})])
def test_a_registered_strategy_works_like_a_builtin(method, options, tmp_path):
    batch = make_batch()
    base = run(make_base(ARCHS["bert"]), batch)
    model = AdapterModel(make_base(ARCHS["bert"]))
    model.add_adapter("a", method, strategy="tanh_gate", set_active=True, **options)
    assert (run(model.eval(), batch) - base).abs().max() <= 1e-6  # identity at init through the zero gate
    model.train_adapter("a")
    out = model.model(**batch)[0].sum()
    out.backward()
    assert all(p.grad is not None for p in model.adapters["a"].parameters())
    assert any(n.endswith(".g") for n, _ in model.adapters["a"].named_parameters())
    perturb(model.adapters["a"])
    model.eval()
    expected = run(model, batch)
    model.save_adapter(tmp_path / "a", "a")
    saved = json.loads(next((tmp_path / "a").glob("*.json")).read_text())
    assert "tanh_gate" in json.dumps(saved)
    again = AdapterModel(make_base(ARCHS["bert"]))
    again.load_adapter(tmp_path / "a", set_active=True)
    assert torch.equal(run(again.eval(), batch), expected)


def test_registered_names_are_listed_and_unknown_ones_refused():
    assert {"add", "scaled_add", "gate", "channel_gate", "multiply", "tanh_gate"} <= set(available_strategies())
    model = AdapterModel(make_base(ARCHS["bert"]))
    with pytest.raises(AdapterError, match="Unknown strategy 'tahn_gate'.*tanh_gate.*register_strategy"):
        model.add_adapter("a", "lora", strategy="tahn_gate")
    assert list(model.adapters) == []


def test_registration_checks_the_class_and_the_name():
    with pytest.raises(AdapterError, match="subclass of adapterkit.strategies.Strategy"):
        register_strategy("plain")(object)
    with pytest.raises(AdapterError, match="already registered"):
        register_strategy("add")(TanhGate)
    with pytest.raises(AdapterError, match="Python identifier"):
        register_strategy("my gate")(TanhGate)
