"""Composition: per-example routing, ``Stack``, ``Average`` and ``BatchSplit``.

On the transformer cases each block is compared with running the model the documented way
(each example or slice alone with its adapter; a fresh adapter in a stack is transparent). On a
one-site MLP, where the slot's output is the model's output, the blocks' formulas are checked
exactly against the adapter modules run by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterkit import AdapterError, AdapterModel, Average, BatchSplit, Stack
from adapterkit.composition import setup_from_dict
from adapterkit.places.slots import SlotIO
from helpers import CASE_IDS, CASES, METHODS, hook_counts, make_model, perturb, run

cases = pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
preset_cases = [c for c in CASES if c.method in METHODS]
preset = pytest.mark.parametrize("case", preset_cases, ids=[c.id for c in preset_cases])


def two_adapters(case, seed: int = 7) -> AdapterModel:
    """``a`` from the case and ``b`` a LoRA (so the two occupy different slots), both trained.
    The perturbation changes the outputs by ~0.5 (as a trained adapter would), not by more than the
    signal: float32 results for a batch and for one example differ by rounding that grows with it."""
    model = make_model(case)
    if case.arch.weight_places:
        model.add_adapter("b", "lora", r=2, alpha=4.0, roles=["v", "ffn_proj"] if "v" in case.arch.roles else None)
    else:  # WavLM's attention reads its weights: an L-adapter takes other slots
        model.add_adapter("b", "l_adapter")
    perturb(model.adapters, scale=0.1, seed=seed)
    return model


def alone(model: AdapterModel, setup, batch: dict, rows: slice) -> torch.Tensor:
    model.set_active_adapters(setup)
    return run(model, {k: v[rows] for k, v in batch.items()})


def tol(case) -> float:
    """Batched vs one-example float32 rounding: larger through a speech model's convolutions, and
    where rows that share a batch with another row's prefix attend over masked prefix columns as
    well (the same function, reduced over more columns: ~1e-6 on T5)."""
    return 1e-6 if case.arch.inputs == "text" and case.method != "prefix_tuning" else 1e-5


@cases
def test_per_example_routing_equals_each_example_alone(case, batch):
    model = two_adapters(case)
    model.set_active_adapters("b")
    hooks = hook_counts(model)
    names = ["a", "b", None, "a"]
    routed = run(model, batch, adapter_names=names)
    assert model.active_adapters == Stack("b") and hook_counts(model) == hooks, "routing is for one call only"
    for i, name in enumerate(names):
        assert (routed[i : i + 1] - alone(model, name, batch, slice(i, i + 1))).abs().max() <= 1e-5  # float32 rounding: batched vs one-row matmuls


@preset
def test_batch_split_equals_each_slice_alone(case, batch):
    model = two_adapters(case)
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[1, 3]))
    split = run(model, batch)
    assert (split[:1] - alone(model, "a", batch, slice(0, 1))).abs().max() <= tol(case)
    assert (split[1:] - alone(model, "b", batch, slice(1, 4))).abs().max() <= tol(case)


@preset
def test_nested_batch_split_of_a_stack(case, batch):
    model = two_adapters(case)
    model.set_active_adapters(BatchSplit(Stack("a", "b"), "b", batch_sizes=[2, 2]))
    split = run(model, batch)
    assert (split[:2] - alone(model, Stack("a", "b"), batch, slice(0, 2))).abs().max() <= tol(case)
    assert (split[2:] - alone(model, "b", batch, slice(2, 4))).abs().max() <= tol(case)


@pytest.mark.parametrize("case", [c for c in preset_cases if c.identity_at_init], ids=lambda c: c.id)
def test_stack_with_a_fresh_adapter_is_the_other_alone(case, batch):
    model = make_model(case)
    perturb(model.adapters["a"])
    model.add_adapter("fresh", case.preset, **case.adapter_options())
    expected = run(model, batch)  # "a" alone
    for setup in (Stack("a", "fresh"), Stack("fresh", "a"), ["a", "fresh"]):
        model.set_active_adapters(setup)
        assert (run(model, batch) - expected).abs().max() <= tol(case)


@preset
def test_average_with_all_weight_on_one_is_that_one(case, batch):
    model = two_adapters(case)
    model.set_active_adapters("a")
    only_a = run(model, batch)
    model.set_active_adapters(Average("a", "b", weights=[2.0, 0.0]))
    assert (run(model, batch) - only_a).abs().max() <= tol(case)
    model.set_active_adapters(Average("a", "a"))
    assert (run(model, batch) - only_a).abs().max() <= tol(case)


@preset
def test_stack_order_matters_and_differs_from_each_alone(case, batch):
    model = two_adapters(case)
    model.add_adapter("c", case.preset, **case.adapter_options())
    perturb(model.adapters["c"], seed=11)
    outs = {}
    for setup in ("a", "c", Stack("a", "c"), Stack("c", "a")):
        model.set_active_adapters(setup)
        outs[repr(setup)] = run(model, batch)
    assert not torch.allclose(outs["Stack('a', 'c')"], outs["'a'"])
    assert not torch.allclose(outs["Stack('a', 'c')"], outs["'c'"])
    # additive / multiplicative updates commute (DoRA's and VeRA's are computed from the frozen weight);
    # prefixes are key / value columns, whose order attention ignores
    if case.method not in ("lora", "ia3", "prefix_tuning", "dora", "vera"):
        assert not torch.allclose(outs["Stack('a', 'c')"], outs["Stack('c', 'a')"])


# -- exact formulas on a one-site model ------------------------------------------------------------
def one_site(method: str, **options) -> tuple[AdapterModel, torch.Tensor, SlotIO]:
    """Two trained adapters on the last layer of an MLP, the input, and what the slot sees."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6)).eval()
    model = AdapterModel(mlp)
    for name in ("a", "b"):
        model.add_adapter(name, method, target_modules=["2"], **options)
    perturb(model.adapters)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    hidden = mlp[1](mlp[0](x))
    return model.eval(), x, SlotIO(x=hidden, y=mlp[2](hidden), place=model.records["a"].sites[0].place)


@pytest.mark.parametrize("method,options", [("pfeiffer", {"reduction_factor": 2}), ("lora", {"r": 2}), ("ia3", {})])
@torch.no_grad()
def test_blocks_follow_their_formulas_on_one_site(method, options):
    model, x, io = one_site(method, **options)
    a, b = model.adapters["a"]["2"], model.adapters["b"]["2"]
    out_a, out_b = a.run(io), b.run(io)
    model.set_active_adapters(Stack("a", "b"))
    assert torch.allclose(model(x), b.run(io.with_value(out_a)), atol=1e-6)
    model.set_active_adapters(Average("a", "b", weights=[1.0, 3.0]))
    assert torch.allclose(model(x), 0.25 * out_a + 0.75 * out_b, atol=1e-6)
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[2, 3]))
    assert torch.allclose(model(x), torch.cat([out_a[:2], out_b[2:]]), atol=1e-6)
    routed = model(x, adapter_names=["b", None, "a", "a", "b"])
    assert torch.allclose(routed, torch.stack([out_b[0], io.y[1], out_a[2], out_a[3], out_b[4]]), atol=1e-6)


@pytest.mark.parametrize("block", [
    Stack("a", "b"),
    Average("a", Stack("b", "c"), weights=[1.0, 3.0]),
    BatchSplit(Stack("a", "b"), "c", batch_sizes=[3, 1]),
])
def test_blocks_round_trip_through_dicts(block):
    again = setup_from_dict(block.to_dict())
    assert again == block and again.names() == block.names()


def test_batch_split_with_wrong_sizes_names_them(batch):
    model = two_adapters(CASES[0])
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[1, 1]))
    with pytest.raises(AdapterError, match=r"add up to 2, but the batch has 4"):
        run(model, batch)


@pytest.mark.parametrize("bad", [
    lambda: Average("a", "b", weights=[1.0]),
    lambda: Average("a", "b", weights=[0.0, 0.0]),
    lambda: BatchSplit("a", "b", batch_sizes=[1]),
    lambda: BatchSplit("a", "b", batch_sizes=[-1, 2]),
    lambda: Stack(),
    lambda: Stack("a", 3),
])
def test_malformed_blocks_raise(bad):
    with pytest.raises(AdapterError):
        bad()
