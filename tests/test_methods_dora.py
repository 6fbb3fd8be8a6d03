"""DoRA (``methods/dora.py``): the paper's formula, PEFT's ``use_dora`` and AdapterHub's
``DoRAConfig`` read and written exactly, merging, routing. The shared invariants (identity at
init, gradients, save/load, merge, every layout) run in ``test_invariants.py`` (``helpers.METHODS``)."""

from __future__ import annotations

import peft
import pytest
import torch
from adapterhub_peer import adapterhub_output, fixture_base
from helpers import ARCHS, assert_routed_equals_alone, make_base, make_batch, perturb, run
from torch import nn

from adapterkit import AdapterError, AdapterModel

BERT, GPT2 = ARCHS["bert"], ARCHS["gpt2"]


@pytest.mark.filterwarnings("ignore:adapterkit could not check")
def test_dora_is_the_papers_formula_on_one_linear():
    """``y = m * (W + s B A) / ||W + s B A||_row x + b`` (Liu et al. 2024, eq. 5), computed by hand."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    model = AdapterModel(net)
    model.add_adapter("d", "dora", r=2, alpha=6.0, target_modules=["0"], set_active=True)
    perturb(model.adapters["d"])
    params = dict(model.adapters["d"].named_parameters())
    a = next(v for k, v in params.items() if k.endswith("lora_A"))
    b = next(v for k, v in params.items() if k.endswith("lora_B"))
    m = next(v for k, v in params.items() if k.endswith("lora_magnitude_vector"))
    w = net[0].weight + 3.0 * b @ a
    x = torch.randn(3, 6)
    expected = x @ (m[:, None] * w / w.norm(dim=1, keepdim=True)).T + net[0].bias
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-5


def _peft_dora(arch, targets, seed=3):
    model = peft.get_peft_model(make_base(arch), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                 target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("arch,targets", [(BERT, ["query", "value", "output.dense"]), (GPT2, ["c_attn", "c_fc"])],
                         ids=["bert", "gpt2-conv1d"])
def test_peft_dora_loads_merges_and_exports_exactly(arch, targets, tmp_path):
    batch = make_batch()
    reference = _peft_dora(arch, targets)
    expected = run(reference, batch)
    assert (expected - run(make_base(arch), batch)).abs().max() > 1e-3  # the adapter matters
    reference.save_pretrained(tmp_path / "peft")
    model = AdapterModel(make_base(arch))
    name = model.load_adapter(tmp_path / "peft", set_active=True)
    assert model.records[name].config.method == "dora"
    assert (run(model.eval(), batch) - expected).abs().max() <= 1e-5
    model.save_adapter(tmp_path / "back", name, format="peft")
    again = peft.PeftModel.from_pretrained(make_base(arch), tmp_path / "back").eval()
    assert (run(again, batch) - expected).abs().max() <= 1e-5
    # merging: ours equals PEFT's merge_and_unload, weight for weight
    model.merge_adapter(name)
    assert (run(model, batch) - expected).abs().max() <= 1e-5
    merged = reference.merge_and_unload()
    ours = dict(model.model.named_parameters())
    for key, value in merged.named_parameters():
        assert (ours[key] - value).abs().max() <= 1e-5, key


def test_adapterhub_loads_our_dora_export(tmp_path):
    """An adapterkit DoRA with AdapterHub's formula, written as AdapterHub, gives AdapterHub's own outputs."""
    base = fixture_base("llama", causal_lm=True)
    model = AdapterModel(base)
    model.add_adapter("d", "dora", r=4, alpha=16.0, roles=["q", "v", "ffn_proj"], norm_with_scaling=False,
                      rescale_bias=True, set_active=True)
    perturb(model.adapters["d"], scale=0.2)
    batch = {"input_ids": torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(2))}
    ours = run(model.eval(), batch)
    model.save_adapter(tmp_path / "ah", "d", format="adapterhub")
    theirs = adapterhub_output(tmp_path / "ah", "llama", batch, tmp_path, causal_lm=True)
    assert (ours - theirs).abs().max() <= 1e-5


def test_peft_formula_cannot_be_written_for_adapterhub_and_vice_versa(tmp_path):
    model = AdapterModel(make_base(BERT))
    model.add_adapter("p", "dora", r=2)
    model.add_adapter("h", "dora", r=2, norm_with_scaling=False, rescale_bias=True)
    with pytest.raises(AdapterError, match="nothing was written"):
        model.save_adapter(tmp_path / "x", "p", format="adapterhub")
    with pytest.raises(AdapterError, match="nothing was written"):
        model.save_adapter(tmp_path / "y", "h", format="peft")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_routed_dora_equals_each_example_alone():
    model = AdapterModel(make_base(ARCHS["llama"]))
    model.add_adapter("a0", "dora", r=2)
    model.add_adapter("a1", "dora", r=4, alpha=2.0, roles=["q", "k", "v"])
    perturb(model.adapters, scale=0.2)
    model.eval()
    batch = make_batch(batch_size=4)
    assert_routed_equals_alone(model, batch, ["a1", None, "a0", "a1"])


def test_dora_refuses_slices_and_non_linear_hosts():
    model = AdapterModel(make_base(GPT2))
    with pytest.raises(AdapterError, match="DoRA adapts whole Linear layers"):
        model.add_adapter("d", "dora", r=2, roles=["q", "v"])
    with pytest.raises(AdapterError, match="DoRA adapts whole Linear layers"):
        model.add_adapter("d", "dora", r=2, roles=["embeddings"])
    assert list(model.adapters) == []
