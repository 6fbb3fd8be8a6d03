"""``train_layer_norms=True`` (issue 12, Houlsby et al.): the adapter's own copies of the layer
norms of the layers it covers. The shared invariant tester runs Pfeiffer and LoRA with it on BERT
(LayerNorm) and Llama (RMSNorm); here: that it is exactly "the base with those norms written in",
which norms it takes, every norm class of the layout table, routing two adapters' norms in one
batch, the saved file, and bad input.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adapterkit import AdapterError, AdapterModel
from adapterkit.methods.layer_norms import LayerNormCopy
from helpers import ARCHS, D, N_LAYERS, Snapshot, make_base, perturb, run

BERT, LLAMA = ARCHS["bert"], ARCHS["llama"]


def _with_norms(arch, preset: str, names=("a",), **options) -> AdapterModel:
    model = AdapterModel(make_base(arch))
    for i, name in enumerate(names):
        model.add_adapter(name, preset, train_layer_norms=True, **options)
        perturb(model.adapters[name], scale=0.2, seed=7 + i)
    return model.eval()


@pytest.mark.parametrize("arch,preset,options", [
    (BERT, "pfeiffer", {}), (BERT, "houlsby", {}), (LLAMA, "lora", {"r": 4}), (LLAMA, "pfeiffer", {}),
], ids=["bert-pfeiffer", "bert-houlsby", "llama-lora", "llama-pfeiffer"])
def test_trained_norms_equal_the_base_with_those_norms_written_in(arch, preset, options, batch):
    """The adapter with its norms = a base whose norms hold the copies' values + the same adapter
    without train_layer_norms (Pfeiffer on BERT reads LayerNorm(y + residual) through its copy)."""
    model = _with_norms(arch, preset, **options)
    model.set_active_adapters("a")
    units = model.adapters["a"]
    copies = {s.key: s for s in model.records["a"].sites if isinstance(units[s.key], LayerNormCopy)}
    assert len(copies) == 2 * N_LAYERS
    reference = AdapterModel(make_base(arch))
    reference.add_adapter("a", preset, set_active=True, **options)
    reference.adapters["a"].load_state_dict(
        {k: v for k, v in units.state_dict().items() if k.split(".")[0] not in copies})
    names = {m: n for n, m in model.model.named_modules()}
    with torch.no_grad():
        for key, site in copies.items():
            norm = reference.model.get_submodule(names[site.host])
            norm.weight.copy_(units[key].weight)
            if units[key].bias is not None:
                norm.bias.copy_(units[key].bias)
    assert not torch.equal(run(model, batch), run(AdapterModel(make_base(arch)), batch))
    assert (run(model, batch) - run(reference.eval(), batch)).abs().max() <= 1e-5


def test_the_norms_of_the_covered_layers_only():
    model = AdapterModel(make_base(BERT))
    model.add_adapter("a", "pfeiffer", layers=[1, 2], train_layer_norms=True)
    norms = [s.place_id for s in model.records["a"].sites if isinstance(model.adapters["a"][s.key], LayerNormCopy)]
    assert norms == [f"layers.{i}.{n}" for i in (1, 2) for n in ("attention.output.LayerNorm", "output.LayerNorm")]
    model = AdapterModel(make_base(LLAMA))
    model.add_adapter("a", "lora", r=2, layers=[0], train_layer_norms=True)
    norms = [s.place_id for s in model.records["a"].sites if isinstance(model.adapters["a"][s.key], LayerNormCopy)]
    assert norms == ["layers.0.input_layernorm", "layers.0.post_attention_layernorm"]  # not the final norm
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["a"]["parameters"] == 2 * (D + D) + 2 * (D + ARCHS["llama"].stacks["decoder"]["v"][1]) + 2 * D


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_fresh_copies_reproduce_every_norm_class_exactly(arch_name, batch):
    """LayerNorm (BERT, GPT-2, BART), transformers' RMS norms (Llama, Mistral, Qwen2, T5): a fresh
    adapter's copies give the host's output bit for bit."""
    arch = ARCHS[arch_name]
    model = AdapterModel(make_base(arch))
    method = {"r": 2} if arch.weight_places else {"config": "pfeiffer"}  # WavLM: no weight places
    model.add_adapter("a", method.pop("config", "lora"), **method, train_layer_norms=True, set_active=True)
    assert any(isinstance(m, LayerNormCopy) for m in model.adapters["a"].values())
    assert torch.equal(run(model.eval(), batch), run(make_base(arch), batch))


@pytest.mark.parametrize("preset", ["pfeiffer", "lora"])
def test_two_adapters_with_their_own_norms_routed_in_one_batch(preset, batch):
    model = _with_norms(BERT, preset, names=("a", "b"))
    model.add_adapter("c", preset)  # no norms of its own
    perturb(model.adapters["c"], scale=0.2, seed=3)
    names = ["b", "a", "c", None]
    routed = run(model, batch, adapter_names=names)
    for i, name in enumerate(names):
        model.set_active_adapters(name)
        assert (routed[i:i + 1] - run(model, {k: v[i:i + 1] for k, v in batch.items()})).abs().max() <= 1e-5


def test_norms_are_saved_with_the_adapter(tmp_path, batch):
    model = _with_norms(LLAMA, "pfeiffer")
    model.set_active_adapters("a")
    model.save_adapter(tmp_path / "a", "a")
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "adapter.layers-3-post_attention_layernorm.weight" in keys
    again = AdapterModel(make_base(LLAMA))
    again.load_adapter(tmp_path / "a", set_active=True)
    assert torch.equal(run(again.eval(), batch), run(model, batch))


# -- bad input ------------------------------------------------------------------------------------
def test_a_model_without_norms_in_the_covered_layers_is_refused():
    mlp = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 4)))
    model = AdapterModel(mlp)
    with pytest.raises(AdapterError, match=r"layers this adapter covers \(0\) hold no LayerNorm / RMSNorm"):
        model.add_adapter("a", "lora", r=2, target_modules=["0.0"], train_layer_norms=True)
    assert list(model.adapters) == [] and all(not m._forward_hooks for m in mlp.modules())


def test_an_adapter_outside_the_layers_is_refused(batch):
    model = AdapterModel(make_base(BERT))
    snapshot = Snapshot.of(model, batch)
    with pytest.raises(AdapterError, match="covers no layer"):
        model.add_adapter("a", "lora", r=2, roles=["embeddings"], train_layer_norms=True)
    snapshot.assert_unchanged(model)


class GemmaLikeRMSNorm(nn.Module):
    """An RMS norm scaled by ``1 + weight``: a formula adapterkit does not know."""

    def __init__(self, d: int):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.randn(d)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)


def test_a_norm_of_unknown_formula_is_refused_by_name():
    model = AdapterModel(nn.Sequential(nn.Sequential(nn.Linear(4, 4), GemmaLikeRMSNorm(4))))
    with pytest.raises(AdapterError, match="GemmaLikeRMSNorm.*does not compute the formula"):
        model.add_adapter("a", "lora", r=2, target_modules=["0.0"], train_layer_norms=True)
    assert list(model.adapters) == []


def test_formats_and_combinations_without_a_counterpart_are_refused(tmp_path):
    model = _with_norms(BERT, "lora", names=("a", "b"), r=2)
    for fmt in ("peft", "adapterhub"):
        with pytest.raises(AdapterError, match="no counterpart for the lora option.*train_layer_norms=True"):
            model.save_adapter(tmp_path / fmt, "a", format=fmt)
        assert not (tmp_path / fmt).exists()
    with pytest.raises(AdapterError, match="lora_svd.*LayerNormCopy.*combine_strategy='linear'"):
        model.average_adapter("svd", ["a", "b"], combine_strategy="lora_svd")
    model.average_adapter("mean", ["a", "b"])  # the copies are averaged like the other weights
    assert "mean" in model.adapters and "svd" not in model.adapters
