"""Strategies (how a contribution meets its base) x methods, NeMo's regularisers, and places.

Every strategy works with every method: identity at init, only adapter parameters get
gradients, the base model is untouched, save -> load gives the same outputs. Stochastic depth
and ``l2_lambda`` follow their formulas for bottleneck, LoRA and IA3 on a one-site model, and the
``pre`` place rewrites a host's input.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterkit import AdapterError, AdapterModel, context
from helpers import ARCHS, clone_state, assert_state_equal, make_base, perturb, run

STRATEGIES = ["add", "scaled_add", "gate", "channel_gate", "multiply"]
METHODS = {"pfeiffer": {}, "houlsby": {}, "parallel": {}, "lora": {"r": 4}, "ia3": {}}
grid = pytest.mark.parametrize("method,strategy", [(m, s) for m in METHODS for s in STRATEGIES])


def adapted(method: str, strategy: str, arch: str = "bert", **extra) -> tuple[AdapterModel, nn.Module]:
    base = make_base(ARCHS[arch])
    model = AdapterModel(make_base(ARCHS[arch]))
    model.add_adapter("a", method, strategy=strategy, strategy_scale=0.5, **METHODS[method], **extra)
    model.add_classification_head("a", num_labels=3)
    model.set_active_adapters("a")
    return model.eval(), base


@grid
def test_every_strategy_is_the_identity_at_init(method, strategy, batch):
    model, base = adapted(method, strategy)
    with torch.no_grad():
        hidden = model.model(**batch)[0]  # the wrapped model, with the adapter's hooks at work
        assert (hidden - base(**batch)[0]).abs().max() <= 1e-6


@grid
def test_every_strategy_trains_only_adapters_and_round_trips(method, strategy, batch, tmp_path):
    model, _ = adapted(method, strategy)
    base_state = clone_state(model.model)
    model.train_adapter("a")
    loss = model(**batch, labels=torch.tensor([0, 1, 2, 1])).loss
    loss.backward()
    assert all(p.grad is None for p in model.model.parameters())
    grads = [p.grad for p in model.adapters["a"].parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    if strategy in ("gate", "channel_gate"):  # the gate starts at zero and learns first
        gates = [m.strategy.gate for m in model.adapters["a"].values()]
        assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    assert_state_equal(model.model, base_state)

    perturb(model.adapters["a"])
    model.eval()
    trained = run(model, batch)
    model.save_adapter(tmp_path / "a", "a")
    again = AdapterModel(make_base(ARCHS["bert"]))
    assert again.load_adapter(tmp_path / "a", set_active=True) == "a"
    assert torch.equal(run(again.eval(), batch), trained)
    with model.disable_adapters():
        assert not torch.allclose(run(model, batch, head="a"), trained)


def test_a_gated_adapter_starts_with_a_non_zero_contribution():
    torch.manual_seed(0)
    model = AdapterModel(nn.Sequential(nn.Linear(6, 6)))
    model.add_adapter("a", "lora", r=2, target_modules=["0"], strategy="gate")
    unit = model.adapters["a"]["0"]
    assert torch.equal(unit.strategy.gate, torch.zeros(1)) and unit.lora_B.abs().sum() > 0


def test_merging_refuses_a_strategy_other_than_the_methods_own():
    model = AdapterModel(nn.Sequential(nn.Linear(6, 6)))
    model.add_adapter("a", "lora", r=2, target_modules=["0"], strategy="gate")
    with pytest.raises(AdapterError, match="strategy 'gate'"):
        model.merge_adapter("a")


@pytest.mark.parametrize("option,value", [("strategy", "sum"), ("stochastic_depth", 1.0), ("l2_lambda", -1.0),
                                          ("place", "weight")])
def test_bad_shared_options_are_refused(option, value):
    model = AdapterModel(nn.Sequential(nn.Linear(6, 6)))
    with pytest.raises(AdapterError, match=option.split("_")[0]):
        model.add_adapter("a", "pfeiffer", target_modules=["0"], **{option: value})
    assert list(model.adapters) == []


# -- the regularisers on one site --------------------------------------------------------------------
def one_site(method: str, **options) -> tuple[AdapterModel, nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    model = AdapterModel(mlp)
    model.add_adapter("a", method, target_modules=["2"], set_active=True, **options)
    perturb(model.adapters, scale=0.5)
    return model, model.adapters["a"]["2"]


def change_of(model: AdapterModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base output, the adapter's full change) at eval: no regulariser at work."""
    with torch.no_grad():
        model.eval()
        out = model(x)
        with model.disable_adapters():
            base = model(x)
    return base, out - base


REGULARISED = [("pfeiffer", {"reduction_factor": 2}), ("lora", {"r": 2}), ("ia3", {})]


@pytest.mark.parametrize("method,options", REGULARISED)
def test_stochastic_depth_drops_whole_examples_and_rescales_kept_ones(method, options):
    model, _ = one_site(method, stochastic_depth=0.5, **options)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    base, change = change_of(model, x)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(x)
    dropped = torch.isclose(out, base, atol=1e-6).all(-1)
    kept = torch.isclose(out, base + 2.0 * change, atol=1e-5).all(-1)
    assert bool((dropped | kept).all()), "each example is either dropped whole or kept and rescaled"
    assert 10 < int(dropped.sum()) < 54 and 10 < int(kept.sum()) < 54
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), base + change, atol=1e-6)  # off at inference


@pytest.mark.parametrize("method,options", REGULARISED)
def test_l2_lambda_penalises_the_contribution_in_training_only(method, options):
    model, _ = one_site(method, l2_lambda=0.25, **options)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    _, change = change_of(model, x)
    expected = 0.25 * change.square().sum(-1).mean()
    model.train()
    with context.forward() as ctx:
        model.model(x)
    assert torch.allclose(ctx.aux_loss(), expected, rtol=1e-5)
    model.eval()
    with context.forward() as ctx:
        model.model(x)
    assert ctx.aux_loss() is None


def test_l2_lambda_reaches_the_handles_output_and_loss(batch):
    model = AdapterModel(make_base(ARCHS["bert"]))
    model.add_adapter("a", "lora", r=2, l2_lambda=0.5)
    model.add_classification_head("a", num_labels=3)
    perturb(model.adapters["a"])
    model.train_adapter("a")
    labels = torch.tensor([0, 1, 2, 1])
    out = model(**batch, labels=labels)
    assert out.aux_loss is not None and out.aux_loss > 0
    head_only = nn.functional.cross_entropy(out.logits, labels)
    assert torch.allclose(out.loss, head_only + out.aux_loss)
    out.loss.backward()
    assert all(p.grad is None for p in model.model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(**batch, labels=labels).aux_loss is None


# -- places ----------------------------------------------------------------------------------------
def test_pre_place_rewrites_the_hosts_input():
    model, unit = one_site("bottleneck", place="pre", reduction_factor=2)
    mlp = model.model
    x = torch.randn(5, 8)
    with torch.no_grad():
        hidden = mlp[1](mlp[0](x))
        linear = lambda h: nn.functional.linear(h, mlp[2].weight, mlp[2].bias)  # noqa: E731 (no hooks)
        expected = linear(hidden + unit.up(unit.act(unit.down(hidden))))
        assert torch.allclose(model.eval()(x), expected, atol=1e-6)
    assert model.records["a"].sites[0].place == "pre"


def test_ia3_at_the_pre_place_scales_the_input_and_merges_exactly():
    model, unit = one_site("ia3", place="pre")
    mlp = model.model
    x = torch.randn(5, 8)
    with torch.no_grad():
        hidden = mlp[1](mlp[0](x))
        expected = nn.functional.linear(hidden * unit.ia3_l, mlp[2].weight, mlp[2].bias)
        assert torch.allclose(model.eval()(x), expected, atol=1e-6)
        model.merge_adapter("a")
        assert torch.allclose(model(x), expected, atol=1e-6)
        model.unmerge_adapter("a")
        assert torch.allclose(model(x), expected, atol=1e-6)
