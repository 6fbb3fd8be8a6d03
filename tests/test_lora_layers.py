"""LoRA beyond Linear (issue 12): Embedding, Conv1d / Conv2d, slices of GPT-2's fused ``c_attn``.

The shared invariant tester (``helpers.CASES``) runs them through identity, base-untouched,
gradients, merge / unmerge, save / load and per-example routing; here: the formulas themselves
(PEFT's and loralib's), the batched routing of several embedding adapters, PEFT folders in and
out with PEFT's own outputs, and bad input.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterkit import AdapterError, AdapterModel
from adapterkit.methods.lora_layers import ConvLoRA, EmbeddingLoRA, SlicedLoRA
from helpers import ARCHS, D, IMAGE, PATCH, make_base, make_batch, perturb, run

GPT2, BERT, VIT = ARCHS["gpt2"], ARCHS["bert"], ARCHS["vit"]


def _lora(arch, seed: int = 0, **options) -> AdapterModel:
    model = AdapterModel(make_base(arch, seed))
    model.add_adapter("a", "lora", set_active=True, **options)
    perturb(model.adapters["a"], scale=0.2)
    return model.eval()


# -- formulas ----------------------------------------------------------------------------------------
def test_gpt2_q_v_slices_leave_the_key_slice_alone():
    """loralib's MergedLinear(enable_lora=[True, False, True]): the update sits on the q and v
    thirds of c_attn's output, each with its own rank-r pair; the k third is the base's."""
    model = _lora(GPT2, r=4, alpha=8.0, roles=["q", "v"])
    unit = model.adapters["a"]["layers-0-attn-c_attn"]
    assert isinstance(unit, SlicedLoRA) and unit.lora_A.shape == (8, D) and unit.lora_B.shape == (2 * D, 4)
    delta = unit.delta_weight()  # Conv1D layout: (in, 3 * D)
    assert delta[:, D:2 * D].abs().max() == 0 and delta[:, :D].abs().max() > 0 and delta[:, 2 * D:].abs().max() > 0
    a, b = unit.lora_A, unit.lora_B
    assert torch.allclose(delta[:, :D], (b[:D] @ a[:4]).T * unit.scaling)  # q: its own A and B
    assert torch.allclose(delta[:, 2 * D:], (b[D:] @ a[4:]).T * unit.scaling)  # v
    c_attn = model.model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, D)
    with model.disable_adapters():
        bare = c_attn(x)
    adapted = c_attn(x)
    assert torch.equal(adapted[..., D:2 * D], bare[..., D:2 * D])
    assert torch.allclose(adapted, bare + x @ delta, atol=1e-6)


def test_gpt2_naming_qkv_and_one_of_its_slices_is_refused():
    model = AdapterModel(make_base(GPT2))
    with pytest.raises(AdapterError, match="'qkv' already includes them"):
        model.add_adapter("a", "lora", roles=["qkv", "v"])
    assert list(model.adapters) == []


def test_embedding_lora_is_peft_formula():
    model = _lora(BERT, r=4, alpha=8.0, roles=["embeddings"])
    unit = model.adapters["a"]["embeddings"]
    assert isinstance(unit, EmbeddingLoRA)
    emb = model.model.embeddings.word_embeddings
    ids = torch.tensor([[3, 7, 0, 99]])
    with model.disable_adapters():
        bare = emb(ids)
    expected = bare + unit.lora_embedding_A.T[ids] @ unit.lora_embedding_B.T * unit.scaling
    assert torch.allclose(emb(ids), expected, atol=1e-6)


def test_fresh_embedding_lora_has_zero_a_and_random_b():
    """PEFT's init: A zero (so a fresh adapter is the identity), B normal."""
    model = AdapterModel(make_base(BERT))
    model.add_adapter("a", "lora", r=4, roles=["embeddings"])
    unit = model.adapters["a"]["embeddings"]
    assert unit.lora_embedding_A.abs().max() == 0 and unit.lora_embedding_B.std() > 0.5


def test_conv_lora_is_peft_formula():
    model = _lora(VIT, r=4, alpha=8.0, target_modules=["patch_embeddings.projection"])
    unit = next(iter(model.adapters["a"].values()))
    assert isinstance(unit, ConvLoRA) and unit.lora_A.shape == (4, 3, PATCH, PATCH) and unit.lora_B.shape == (D, 4, 1, 1)
    conv = next(m for m in model.model.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with model.disable_adapters():
        bare = conv(x)
    lora = nn.functional.conv2d(nn.functional.conv2d(x, unit.lora_A, stride=PATCH), unit.lora_B) * unit.scaling
    assert torch.allclose(conv(x), bare + lora, atol=1e-5)
    assert torch.allclose(conv.weight + unit.delta_weight(),
                          conv.weight + torch.einsum("or,rikl->oikl", unit.lora_B[:, :, 0, 0], unit.lora_A) * unit.scaling)


# -- routing ------------------------------------------------------------------------------------------
def test_several_embedding_adapters_routed_in_one_batch_run_stacked(monkeypatch):
    """Three embedding adapters of different ranks at one slot: the batched path (one gather over
    the stacked A tables, one bmm) gives each example what it gets alone."""
    model = AdapterModel(make_base(BERT))
    for name, r in (("a", 2), ("b", 4), ("c", 3)):
        model.add_adapter(name, "lora", r=r, roles=["embeddings"])
    perturb(model.adapters, scale=0.2)
    model.eval()
    calls = []
    original = EmbeddingLoRA.run_stacked.__func__
    monkeypatch.setattr(EmbeddingLoRA, "run_stacked",
                        classmethod(lambda cls, *a: calls.append(1) or original(cls, *a)))
    batch = make_batch()
    names = ["a", "c", None, "b"]
    routed = run(model, batch, adapter_names=names)
    assert calls, "the stacked path was not taken"
    for i, name in enumerate(names):
        model.set_active_adapters(name)
        alone = run(model, {k: v[i:i + 1] for k, v in batch.items()})
        assert (routed[i:i + 1] - alone).abs().max() <= 1e-5


# -- PEFT ---------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _peft_model(arch, targets: list[str], seed: int = 0):
    base = make_base(arch, seed)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("arch,targets,inputs", [
    (BERT, ["word_embeddings", "query", "value"], None),
    (BERT, ["word_embeddings"], None),
    (VIT, ["projection", "query", "value"], VIT),
], ids=["bert-embeddings-qv", "bert-embeddings", "vit-conv2d-qv"])
def test_peft_embedding_and_conv_adapters_load_and_export_exactly(arch, targets, inputs, tmp_path):
    batch = make_batch(arch=inputs)
    reference = _peft_model(arch, targets)
    expected = run(reference, batch)
    assert (expected - run(make_base(arch), batch)).abs().max() > 1e-3  # the adapter matters
    reference.save_pretrained(tmp_path / "peft")
    model = AdapterModel(make_base(arch))
    name = model.load_adapter(tmp_path / "peft", set_active=True)
    assert (run(model.eval(), batch) - expected).abs().max() <= 1e-5
    if arch is BERT:
        assert "embeddings" in model.records[name].config.roles  # the layout role, not a module name
    model.save_adapter(tmp_path / "back", name, format="peft")
    again = peft.PeftModel.from_pretrained(make_base(arch), tmp_path / "back").eval()
    assert (run(again, batch) - expected).abs().max() <= 1e-5


def test_peft_export_of_c_attn_slices_is_refused(tmp_path):
    model = _lora(GPT2, r=2, roles=["q", "v"])
    with pytest.raises(AdapterError, match="no slices of a fused projection"):
        model.save_adapter(tmp_path / "x", "a", format="peft")
    assert not (tmp_path / "x").exists()


# -- bad input ----------------------------------------------------------------------------------------
def test_lora_on_a_module_it_cannot_host_lists_the_supported_types():
    model = AdapterModel(make_base(BERT))
    with pytest.raises(AdapterError, match=r"LayerNorm, which this method cannot adapt; it takes nn\.Linear.*"
                                           r"nn\.Embedding, nn\.Conv1d / Conv2d / Conv3d"):
        model.add_adapter("bad", "lora", target_modules=r"encoder\.layer\.0\.output\.LayerNorm")
    assert list(model.adapters) == []


def test_grouped_convolution_is_refused():
    cnn = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))
    model = AdapterModel(cnn)
    with pytest.raises(AdapterError, match=r"groups=2.*only convolutions with groups=1"):
        model.add_adapter("bad", "lora", r=2, target_modules=["0"])
    model.add_adapter("ok", "lora", r=2, target_modules=["2"])  # the ungrouped one is fine
    assert list(model.adapters) == ["ok"]


@pytest.mark.parametrize("options,match", [
    ({"r": 40, "target_modules": ["patch_embeddings.projection"]}, r"r=40 exceeds.*choose r <= 32"),
    ({"target_modules": ["patch_embeddings.projection"], "strategy": "channel_gate"}, "convolution"),
])
def test_conv_rank_and_channel_gate_are_checked(options, match):
    model = AdapterModel(make_base(VIT))
    with pytest.raises(AdapterError, match=match):
        model.add_adapter("bad", "lora", **options)
    assert list(model.adapters) == []


def test_merging_lora_on_tied_embeddings_is_refused_and_leaves_the_model_unmerged():
    model = _lora(GPT2, r=2, roles=["embeddings"])
    before = run(model, make_batch())
    with pytest.raises(AdapterError, match="tied embeddings"):
        model.merge_adapter("a")
    assert model.merged_adapters == [] and torch.equal(run(model, make_batch()), before)
