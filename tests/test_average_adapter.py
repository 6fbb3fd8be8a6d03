"""``average_adapter``: merging adapters' weights into a new adapter (``merge_adapters.py``).

Each strategy is checked against its formula written out here on the inputs' own tensors:
linear (weights normalised once), lora_svd (the new ``delta W`` is the weighted sum of the
inputs' at full rank, its best rank-r approximation below), ties (a hand-worked example of
trim / elect / disjoint mean). Bad input leaves the model exactly as it was.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from adapterkit import AdapterError, AdapterModel
from adapterkit.averaging import normalised_weights, ties_tensor


def tiny() -> AdapterModel:
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       vocab_size=100)
    return AdapterModel(T.BertModel(cfg).eval())


def perturb(model: AdapterModel, names, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for p in model.adapters[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def params(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.adapters[name].state_dict().items()}


IDS = torch.tensor([[1, 5, 7, 9, 2], [3, 4, 8, 2, 0]])


def out(model: AdapterModel) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def test_weights_are_normalised_once():
    assert normalised_weights(None, 4) == [0.25] * 4
    assert normalised_weights([1, 3], 2) == [0.25, 0.75]
    assert normalised_weights([1.0, -0.5], 2, normalize=False) == [1.0, -0.5]
    with pytest.raises(AdapterError, match="positive sum"):
        normalised_weights([1.0, -1.0], 2)
    with pytest.raises(AdapterError, match="one weight per adapter"):
        normalised_weights([1.0], 2)


@pytest.mark.parametrize("preset", ["pfeiffer", "houlsby", "lora", "ia3"])
def test_linear_is_the_weighted_sum_of_each_parameter(preset):
    model = tiny()
    for n in "abc":
        model.add_adapter(n, preset)
    perturb(model, "abc")
    a, b, c = (params(model, n) for n in "abc")
    model.average_adapter("avg", ["a", "b", "c"], weights=[1.0, 2.0, 1.0])
    merged = params(model, "avg")
    assert merged.keys() == a.keys()
    for k in a:
        torch.testing.assert_close(merged[k], 0.25 * a[k] + 0.5 * b[k] + 0.25 * c[k], rtol=0, atol=1e-7)
    # default: the plain mean, 1/N each (not 1/N^2)
    model.average_adapter("mean", ["a", "b"])
    for k, v in params(model, "mean").items():
        torch.testing.assert_close(v, (a[k] + b[k]) / 2, rtol=0, atol=1e-7)
    # negative weights as given (task arithmetic: unlearning)
    model.average_adapter("neg", ["a", "b"], weights=[1.0, -0.5], normalize_weights=False)
    for k, v in params(model, "neg").items():
        torch.testing.assert_close(v, a[k] - 0.5 * b[k], rtol=0, atol=1e-7)
    assert model.records["avg"].config == model.records["a"].config


def test_linear_of_one_adapter_reproduces_it():
    model = tiny()
    model.add_adapter("a", "pfeiffer")
    perturb(model, "a")
    model.set_active_adapters("a")
    ref = out(model)
    model.average_adapter("copy", ["a"], set_active=True)
    assert model.active_adapters.names() == ["copy"]
    torch.testing.assert_close(out(model), ref, rtol=0, atol=0)


def test_lora_svd_full_rank_equals_weighted_sum_of_deltas():
    model = tiny()
    model.add_adapter("a", "lora", r=2, alpha=4.0)
    model.add_adapter("b", "lora", r=3, alpha=3.0)
    perturb(model, "ab")
    ra, rb = model.records["a"], model.records["b"]
    model.average_adapter("svd", ["a", "b"], weights=[3.0, 1.0], combine_strategy="lora_svd", svd_rank=5)
    merged = model.records["svd"]
    assert merged.config.r == 5 and merged.config.alpha == 5.0
    for key, unit in merged.modules.items():
        expected = 0.75 * ra.modules[key].delta_weight() + 0.25 * rb.modules[key].delta_weight()
        torch.testing.assert_close(unit.delta_weight(), expected, rtol=0, atol=1e-5)
    # the merged adapter gives the outputs of both LoRAs' weighted deltas in the weights
    model.set_active_adapters("svd")
    got = out(model)
    model.set_active_adapters(None)
    with torch.no_grad():
        for key, site in [(s.key, s) for s in ra.sites]:
            site.host.weight += 0.75 * ra.modules[key].delta_weight() + 0.25 * rb.modules[key].delta_weight()
    torch.testing.assert_close(got, out(model), rtol=0, atol=1e-5)


def test_lora_svd_low_rank_is_the_truncated_svd():
    model = tiny()
    model.add_adapter("a", "lora", r=4)
    model.add_adapter("b", "lora", r=4)
    perturb(model, "ab")
    ra, rb = model.records["a"], model.records["b"]
    model.average_adapter("svd", ["a", "b"], combine_strategy="lora_svd", svd_rank=2)
    for key, unit in model.records["svd"].modules.items():
        delta = 0.5 * ra.modules[key].delta_weight() + 0.5 * rb.modules[key].delta_weight()
        u, s, vh = torch.linalg.svd(delta)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        assert unit.lora_A.shape[0] == 2
        torch.testing.assert_close(unit.delta_weight(), best, rtol=0, atol=1e-5)


def test_ties_by_hand():
    # three task vectors of 5 entries; density 0.4 keeps 2 entries of each
    t1 = torch.tensor([0.9, -0.1, 0.5, 0.0, 0.2])   # keeps 0.9, 0.5
    t2 = torch.tensor([-0.3, 0.1, -0.8, 0.05, 0.6])  # keeps -0.8, 0.6
    t3 = torch.tensor([0.4, -0.7, 0.1, 0.0, -0.2])  # keeps 0.4, -0.7
    merged = ties_tensor([t1, t2, t3], [1 / 3] * 3, density=0.4)
    # entry 0: kept 0.9, 0.4 -> sign +, mean 0.65; entry 1: -0.7 only; entry 2: 0.5 vs -0.8 -> sign -,
    # only -0.8; entry 3: nothing kept -> 0; entry 4: 0.6 only
    torch.testing.assert_close(merged, torch.tensor([0.65, -0.7, -0.8, 0.0, 0.6]))
    # weights: a weighted mean over the agreeing adapters, and they steer the elected sign
    weighted = ties_tensor([t1, t2, t3], [0.6, 0.2, 0.2], density=0.4)
    torch.testing.assert_close(weighted, torch.tensor([(0.6 * 0.9 + 0.2 * 0.4) / 0.8, -0.7, 0.5, 0.0, 0.6]))


def test_ties_on_adapters_applies_per_tensor():
    model = tiny()
    for n in "ab":
        model.add_adapter(n, "pfeiffer")
    perturb(model, "ab")
    a, b = params(model, "a"), params(model, "b")
    model.average_adapter("t", ["a", "b"], combine_strategy="ties", density=0.5)
    for k, v in params(model, "t").items():
        torch.testing.assert_close(v, ties_tensor([a[k], b[k]], [0.5, 0.5], 0.5))
    # density 1 and equal signs everywhere: the plain mean
    model.average_adapter("t1", ["a", "a"], combine_strategy="ties", density=1.0)
    for k, v in params(model, "t1").items():
        torch.testing.assert_close(v, a[k])


def snapshot(model: AdapterModel):
    return (list(model.adapters), model.active_adapters, sorted(model._slots), dict(model.heads))


@pytest.mark.parametrize("call, match", [
    (lambda m: m.average_adapter("x", ["a", "nope"]), "No adapter named"),
    (lambda m: m.average_adapter("x", ["a", "l"]), "one config"),
    (lambda m: m.average_adapter("x", ["l", "l8"]), "lora_svd"),
    (lambda m: m.average_adapter("x", ["a", "b"], combine_strategy="lora_svd"), "applies to lora"),
    (lambda m: m.average_adapter("x", ["i", "i"], combine_strategy="ties"), "not i \\(ia3\\)"),
    (lambda m: m.average_adapter("x", ["a", "b"], combine_strategy="mean"), "Unknown combine_strategy"),
    (lambda m: m.average_adapter("x", ["a", "b"], weights=[1.0, -1.0], combine_strategy="ties",
                                 normalize_weights=False), "positive weights"),
    (lambda m: m.average_adapter("x", ["l", "l8"], combine_strategy="lora_svd", svd_rank=99), "exceeds"),
    (lambda m: m.average_adapter("a", ["l", "l"]), "already exists"),
    (lambda m: m.average_adapter("a", ["a", "b"], overwrite=True), "already exists"),
    (lambda m: m.average_adapter("x", "a"), "list of adapter names"),
])
def test_bad_input_changes_nothing(call, match):
    model = tiny()
    model.add_adapter("a", "pfeiffer")
    model.add_adapter("b", "pfeiffer")
    model.add_adapter("l", "lora", r=2)
    model.add_adapter("l8", "lora", r=8)
    model.add_adapter("i", "ia3")
    model.set_active_adapters("a")
    before, weights = snapshot(model), params(model, "a")
    with pytest.raises(AdapterError, match=match):
        call(model)
    assert snapshot(model) == before
    for k, v in params(model, "a").items():
        assert torch.equal(v, weights[k])


def test_merged_adapter_saves_and_loads(tmp_path):
    model = tiny()
    model.add_adapter("a", "lora", r=2)
    model.add_adapter("b", "lora", r=2)
    perturb(model, "ab")
    model.average_adapter("m", ["a", "b"], combine_strategy="lora_svd", svd_rank=3, set_active=True)
    ref = out(model)
    model.save_adapter(tmp_path / "m", "m")
    fresh = tiny()
    fresh.load_adapter(tmp_path / "m", set_active=True)
    torch.testing.assert_close(out(fresh), ref, rtol=0, atol=0)
