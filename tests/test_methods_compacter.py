"""Compacter (``methods/compacter.py``): PHM projections whose rule is one parameter shared by every
layer of the adapter, AdapterHub's checkpoints read exactly (fixtures ``ah_*compacter*`` in
``test_interop.py``) and our exports loaded by AdapterHub itself, routing."""

from __future__ import annotations

import pytest
import torch
from adapterhub_peer import assert_adapterhub_computes_ours, fixture_base
from helpers import ARCHS, assert_routed_equals_alone, make_base, make_batch, perturb, run

from adapterkit import AdapterError, AdapterModel


def rules(model, name):
    return [m.phm_rule for m in model.adapters[name].modules() if hasattr(m, "phm_rule")]


def test_the_rule_is_one_parameter_trained_once_and_still_shared_after_loading(tmp_path):
    model = AdapterModel(make_base(ARCHS["bert"]))
    model.add_adapter("c", "compacter", reduction_factor=8, set_active=True)
    assert len(rules(model, "c")) == 16 and len({id(r) for r in rules(model, "c")}) == 1  # 4 layers x 2 sites x 2
    perturb(model.adapters["c"], scale=0.3)  # away from the start, where the rule's gradient is ~1e-30
    model.train_adapter("c")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = make_batch()
    before = rules(model, "c")[0].detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        model.model(**batch)[0].square().mean().backward()
        optimizer.step()
    assert not torch.equal(rules(model, "c")[0], before)  # trained, and the same tensor everywhere
    model.eval()
    out = run(model, batch)
    model.save_adapter(tmp_path / "c", "c")
    again = AdapterModel(make_base(ARCHS["bert"]))
    again.load_adapter(tmp_path / "c", set_active=True)
    assert torch.equal(run(again.eval(), batch), out)
    assert len({id(r) for r in rules(again, "c")}) == 1


@pytest.mark.parametrize("preset", ["compacter++", "compacter"])
def test_adapterhub_loads_our_compacter_export(preset, tmp_path):
    model = AdapterModel(fixture_base("bert", causal_lm=False))
    model.add_adapter("c", preset, reduction_factor=8, set_active=True)
    perturb(model.adapters["c"], scale=0.3)
    assert_adapterhub_computes_ours(model, "c", tmp_path)


def test_routed_compacter_equals_each_example_alone():
    model = AdapterModel(make_base(ARCHS["llama"]))
    model.add_adapter("a0", "compacter++", reduction_factor=8)
    model.add_adapter("a1", "compacter", reduction_factor=4, phm_dim=2)
    perturb(model.adapters, scale=0.2)
    model.eval()
    batch = make_batch(batch_size=4)
    assert_routed_equals_alone(model, batch, ["a1", None, "a0", "a1"])


def test_phm_dim_must_divide_the_widths():
    model = AdapterModel(make_base(ARCHS["bert"]))
    with pytest.raises(AdapterError, match="phm_dim=3 must divide the widths 32 -> 4 -> 32"):
        model.add_adapter("c", "compacter++", reduction_factor=8, phm_dim=3)
    assert list(model.adapters) == []


@pytest.mark.parametrize("preset", ["compacter", "compacter++"])
def test_inference_mode_gives_the_no_grad_output(preset):
    """Under ``torch.inference_mode`` the PHM weights are inference tensors, which carry no version
    counter: the bottleneck's layer-norm fold (cached by version) crashed ``adapterkit train``'s
    evaluation with "Inference tensors do not track version counter"."""
    model = AdapterModel(make_base(ARCHS["bert"]))
    model.add_adapter("c", preset, reduction_factor=4, phm_dim=2, set_active=True)
    perturb(model.adapters, 0.3)
    model.eval()
    batch = make_batch(arch=ARCHS["bert"])
    with torch.no_grad():
        expected = run(model, batch)
    with torch.inference_mode():
        got = run(model, batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
