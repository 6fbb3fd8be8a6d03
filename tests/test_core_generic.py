"""The generic path: adapters on any ``nn.Module``, placed by module name.

``target_modules`` is a regex (full match on the module name) or a list of name suffixes;
``layers=`` / ``leave_out=`` restrict to the numbered blocks the names contain; a pattern that
matches nothing raises an error that lists the candidate names.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterkit import AdapterError, AdapterModel
from helpers import assert_state_equal, clone_state, hook_counts, perturb


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    """A small custom model: blocks in a ModuleList, then an output layer."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def seq_of_blocks() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), Block()).eval()


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))

PLACEMENTS = [
    # (model factory, method, options, expected place ids)
    (mlp, "lora", {"r": 2, "target_modules": ["0", "4"]}, ["0", "4"]),
    (mlp, "ia3", {"target_modules": r"[024]"}, ["0", "2", "4"]),
    (mlp, "pfeiffer", {"target_modules": ["2"], "reduction_factor": 4}, ["2"]),
    (mlp, "parallel", {"target_modules": ["0"]}, ["0"]),  # reads 8 features, writes 16
    (net, "lora", {"r": 2, "target_modules": ["fc1"]}, ["blocks.0.fc1", "blocks.1.fc1", "blocks.2.fc1"]),
    (net, "lora", {"r": 2, "target_modules": r"blocks\.\d\.fc\d", "layers": [1]}, ["blocks.1.fc1", "blocks.1.fc2"]),
    (net, "ia3", {"target_modules": ["fc2", "out"], "leave_out": [0]}, ["blocks.1.fc2", "blocks.2.fc2"]),
    (net, "houlsby", {"target_modules": r"blocks\.\d"}, ["blocks.0", "blocks.1", "blocks.2"]),
    (seq_of_blocks, "lora", {"r": 2, "target_modules": ["fc2"], "layers": [0, 2]}, ["0.fc2", "2.fc2"]),
    (seq_of_blocks, "pfeiffer", {"target_modules": r"\d", "leave_out": [1]}, ["0", "2"]),
]
placements = pytest.mark.parametrize(
    "factory,method,options,places", PLACEMENTS, ids=[f"{f.__name__}-{m}-{i}" for i, (f, m, _, _) in enumerate(PLACEMENTS)]
)


def wrapped(factory, method, options) -> AdapterModel:
    model = AdapterModel(factory())
    model.add_adapter("a", method, set_active=True, **options)
    return model.eval()


@placements
def test_target_modules_choose_the_places(factory, method, options, places):
    model = wrapped(factory, method, options)
    assert [site.place_id for site in model.records["a"].sites] == places
    hosts = {id(site.host) for site in model.records["a"].sites}
    assert sum(1 for m in model.model.modules() if len(m._forward_hooks) and id(m) in hosts) == len(places)


@placements
def test_generic_fresh_adapter_is_identity_and_trained_changes(factory, method, options, places):
    model = wrapped(factory, method, options)
    base = factory()(X)
    assert torch.equal(model(X), model.model(X))  # the handle calls a plain module with its input
    assert (model(X) - base).abs().max() <= 1e-6
    perturb(model.adapters["a"])
    assert (model(X) - base).abs().max() > 1e-4
    with model.disable_adapters():
        assert torch.equal(model(X), base)


@placements
def test_generic_training_touches_only_the_adapter(factory, method, options, places):
    model = wrapped(factory, method, options)
    base = clone_state(model.model)
    model.train_adapter("a")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(X).pow(2).mean().backward()
        assert all(p.grad is None for p in model.model.parameters())
        assert all(p.grad is not None for p in model.adapters["a"].parameters())
        optimizer.step()
    assert_state_equal(model.model, base)


def test_generic_routing_per_example():
    model = wrapped(net, "lora", {"r": 2, "target_modules": ["fc1", "fc2"]})
    model.add_adapter("b", "ia3", target_modules=["out", "fc1"])
    perturb(model.adapters)
    routed = model(X, adapter_names=["a", "b", None, "b", "a"])
    for i, name in enumerate(["a", "b", None, "b", "a"]):
        model.set_active_adapters(name)
        assert (routed[i] - model(X[i : i + 1])[0]).abs().max() <= 1e-6


def test_generic_save_and_load_into_a_fresh_module(tmp_path):
    source = wrapped(net, "lora", {"r": 2, "target_modules": r"blocks\.[12]\.fc1"})
    perturb(source.adapters)
    source.save_adapter(tmp_path / "a", "a")
    target = AdapterModel(net())
    target.load_adapter(tmp_path / "a", set_active=True)
    assert torch.equal(target(X), source(X))


def test_generic_merge_and_unmerge(tmp_path):
    model = wrapped(mlp, "lora", {"r": 2, "target_modules": ["0", "2", "4"]})
    perturb(model.adapters, scale=0.1)
    weights, unmerged = clone_state(model.model), model(X)
    model.merge_adapter("a")
    assert (model(X) - unmerged).abs().max() <= 1e-5
    model.unmerge_adapter("a")
    assert_state_equal(model.model, weights)


@pytest.mark.parametrize("factory,pattern", [(mlp, "fc.*"), (mlp, ["lin"]), (net, ["blocks.0.fc3"]), (net, r"block\.\d")])
def test_pattern_matching_nothing_lists_candidates(factory, pattern):
    model = AdapterModel(factory())
    hooks = hook_counts(model)
    with pytest.raises(AdapterError, match="matches no module") as err:
        model.add_adapter("a", "lora", r=2, target_modules=pattern)
    names = [n for n, m in model.model.named_modules() if isinstance(m, nn.Linear)]
    assert all(n in str(err.value) for n in names), "the error should list the Linear layers by name"
    assert len(model.adapters) == 0 and hook_counts(model) == hooks


def test_layers_that_select_nothing_raise():
    model = AdapterModel(net())
    with pytest.raises(AdapterError, match=r"none in layers=\(0,\)"):
        model.add_adapter("a", "lora", r=2, target_modules=["out"], layers=[0])
    with pytest.raises(AdapterError, match=r"the matched modules are in layers \[0, 1, 2\]"):
        model.add_adapter("a", "lora", r=2, target_modules=["fc1"], layers=[5])
    assert len(model.adapters) == 0


def test_placement_without_layout_asks_for_target_modules():
    model = AdapterModel(net())
    with pytest.raises(AdapterError, match="target_modules"):
        model.add_adapter("a", "lora")
    with pytest.raises(AdapterError, match="hidden size"):
        model.add_classification_head("a", num_labels=2)


def norm_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("base_dropout", [False, True])
def test_frozen_base_keeps_batchnorm_statistics_in_training_mode(base_dropout):
    """NeMo's habit: training adapters must not update the frozen base's running statistics, or
    "adapters off" would stop reproducing the base model (with or without the base's dropout)."""
    model = AdapterModel(norm_net())
    model.add_adapter("a", "lora", r=2, target_modules=["0", "3"])
    base = clone_state(model.model)
    model.train_adapter("a", base_dropout=base_dropout)
    assert model.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(X).pow(2).mean().backward()
        optimizer.step()
    assert_state_equal(model.model, base)  # running_mean / running_var / num_batches_tracked too
    with model.disable_adapters():
        assert torch.equal(model(X), norm_net()(X))


def dropout_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))


def test_base_dropout_false_runs_the_frozen_base_as_at_inference():
    """``train_adapter(..., base_dropout=False)``: the base is in eval mode (no dropout), the adapter is not."""
    model = AdapterModel(dropout_net())
    model.add_adapter("a", "bottleneck", target_modules=["3"], bottleneck_dim=4, dropout=0.5, init_weights="bert")
    model.train_adapter("a", base_dropout=False)
    assert model.training and model.adapters["a"].training
    assert not any(m.training for m in model.model.modules())
    with model.disable_adapters():  # the base alone: deterministic, equal to its eval output
        assert torch.equal(model(X), dropout_net().eval()(X))
    assert not torch.equal(model(X), model(X))  # the adapter's own dropout still acts
    model.eval()
    model.train()  # e.g. after an evaluation: the base goes back to eval mode, not to training
    assert not model.model[1].training and model.adapters["a"].training


def test_by_default_the_frozen_base_keeps_its_dropout():
    """AdapterHub's and PEFT's behaviour by default; and a base unfrozen later trains as usual."""
    model = AdapterModel(dropout_net())
    model.add_adapter("a", "lora", r=2, target_modules=["3"])
    model.train_adapter("a")
    assert model.model[1].training
    with model.disable_adapters():
        assert not torch.equal(model(X), model(X))
    model.train_adapter("a", base_dropout=False)
    assert not model.model[1].training
    model.model[0].weight.requires_grad_(True)  # the user unfreezes part of the base
    model.train()
    assert model.model[1].training
