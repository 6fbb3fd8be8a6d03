"""A user's own method, registered with one decorator: the core v2 contract from the outside.

The method below is the whole of what a user writes (a config and a module returning its
contribution); placement, strategies, routing, saving and loading come from the core.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from adapterkit import AdapterConfig, AdapterError, AdapterModel, register_method
from adapterkit.methods.base import AdapterModule
from helpers import ARCHS, make_base, make_batch, perturb, run


@register_method("test_shift")
@dataclass(frozen=True)
class ShiftConfig(AdapterConfig):
    """A learned per-channel shift after the FFN (a delta, zero at init)."""

    def sites(self, layout):
        return layout.sublayer_sites(["ffn_out"], self.layers, self.leave_out, self.stacks)

    def build(self, site):
        return Shift(site.out_features)


class Shift(AdapterModule):
    def __init__(self, width: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(width))

    def init_nonzero(self) -> None:
        nn.init.normal_(self.shift, std=0.02)

    def forward(self, h, base):
        return self.shift.expand_as(h)


@register_method("test_not_a_module")
@dataclass(frozen=True)
class BrokenConfig(AdapterConfig):
    def sites(self, layout):
        return layout.sublayer_sites(["ffn_out"])

    def build(self, site):
        return nn.Linear(site.in_features, site.out_features)


@pytest.mark.parametrize("strategy", [None, "scaled_add", "gate", "multiply"])
def test_a_registered_method_gets_placement_strategies_and_checkpoints(strategy, tmp_path):
    batch = make_batch()
    base = run(make_base(ARCHS["bert"]), batch)
    model = AdapterModel(make_base(ARCHS["bert"]))
    model.add_adapter("s", "test_shift", strategy=strategy, set_active=True)
    assert len(model.records["s"].sites) == 4
    assert (run(model.eval(), batch) - base).abs().max() <= 1e-6  # the identity at init
    perturb(model.adapters["s"], scale=0.5)
    changed = run(model, batch)
    assert not torch.allclose(changed, base)
    model.save_adapter(tmp_path / "s", "s")
    again = AdapterModel(make_base(ARCHS["bert"]))
    again.load_adapter(tmp_path / "s", set_active=True)
    assert torch.equal(run(again.eval(), batch), changed)


def test_a_registered_method_is_routed_per_example():
    model = AdapterModel(make_base(ARCHS["bert"]))
    for name in ("a", "b"):
        model.add_adapter(name, "test_shift")
    perturb(model.adapters, scale=0.5)
    batch = make_batch(batch_size=3)
    routed = run(model.eval(), batch, adapter_names=["b", None, "a"])
    for i, name in enumerate(["b", None, "a"]):
        model.set_active_adapters(name)
        assert (routed[i : i + 1] - run(model, {k: v[i : i + 1] for k, v in batch.items()})).abs().max() <= 1e-5


def test_a_method_whose_build_returns_a_plain_module_is_refused():
    model = AdapterModel(make_base(ARCHS["bert"]))
    with pytest.raises(AdapterError, match="must return an adapterkit.methods.base.AdapterModule"):
        model.add_adapter("x", "test_not_a_module")
    assert list(model.adapters) == []
