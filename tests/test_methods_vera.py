"""VeRA (``methods/vera.py``): shared frozen matrices drawn from a seed as PEFT draws them, PEFT
folders read and written exactly, routing. The shared invariants run in ``test_invariants.py``."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from adapterhub_peer import assert_adapterhub_computes_ours, fixture_base
from helpers import ARCHS, assert_routed_equals_alone, make_base, make_batch, perturb, run

from adapterkit import AdapterError, AdapterModel

BERT, GPT2 = ARCHS["bert"], ARCHS["gpt2"]


def _peft_vera(arch, targets, save_projection=True):
    model = peft.get_peft_model(make_base(arch), peft.VeraConfig(r=6, projection_prng_key=11, target_modules=targets,
                                                                 save_projection=save_projection))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("arch,targets", [(BERT, ["query", "value", "intermediate.dense"]), (GPT2, ["c_attn", "c_fc"])],
                         ids=["bert", "gpt2-conv1d"])
def test_peft_vera_loads_merges_and_exports_exactly(arch, targets, save_projection, tmp_path):
    batch = make_batch()
    reference = _peft_vera(arch, targets, save_projection)
    expected = run(reference, batch)
    assert (expected - run(make_base(arch), batch)).abs().max() > 1e-3
    reference.save_pretrained(tmp_path / "peft")
    model = AdapterModel(make_base(arch))
    name = model.load_adapter(tmp_path / "peft", set_active=True)
    assert (run(model.eval(), batch) - expected).abs().max() <= 1e-5
    model.save_adapter(tmp_path / "back", name, format="peft")
    again = peft.PeftModel.from_pretrained(make_base(arch), tmp_path / "back").eval()
    assert (run(again, batch) - expected).abs().max() <= 1e-5
    model.merge_adapter(name)
    assert (run(model, batch) - expected).abs().max() <= 1e-5


def test_matrices_are_shared_frozen_and_not_saved(tmp_path):
    model = AdapterModel(make_base(BERT))
    model.add_adapter("v", "vera", r=4, roles=["q", "v", "ffn_in"], set_active=True)
    units = [m for m in model.adapters["v"].modules() if hasattr(m, "vera_A")]
    assert len(units) == 12 and len({m.vera_A.untyped_storage().data_ptr() for m in units}) == 1  # one tensor
    assert all(not m.vera_A.requires_grad for m in units)
    perturb(model.adapters["v"])
    batch = make_batch()
    out = run(model, batch)
    model.save_adapter(tmp_path / "v", "v")
    saved = json.dumps(list(model.state_dict()))
    assert "vera_A" not in saved and "vera_B" not in saved
    again = AdapterModel(make_base(BERT))
    again.load_adapter(tmp_path / "v", set_active=True)
    assert torch.equal(run(again, batch), out)


def test_a_wrong_projection_in_a_peft_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _peft_vera(BERT, ["query", "value"]).save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 2
    save_file(tensors, str(weights))
    model = AdapterModel(make_base(BERT))
    with pytest.raises(AdapterError, match="projection_prng_key=11"):
        model.load_adapter(tmp_path / "peft")
    assert list(model.adapters) == []


def test_routed_vera_equals_each_example_alone():
    model = AdapterModel(make_base(ARCHS["llama"]))
    model.add_adapter("a0", "vera", r=4)
    model.add_adapter("a1", "vera", r=8, projection_prng_key=3, roles=["q", "k", "v"])
    perturb(model.adapters, scale=0.5)
    model.eval()
    batch = make_batch(batch_size=4)
    assert_routed_equals_alone(model, batch, ["a1", None, "a0", "a1"])


# -- AdapterHub's VeRA (full_scaling): the fixture ah_bert_vera_cls is read in tests/test_interop.py ------------
@pytest.mark.parametrize("full", [True, False])
def test_adapterhub_loads_our_vera_export(full, tmp_path):
    """AdapterHub computes our outputs for a VeRA written in its format: ``full_scaling`` as it is,
    vectors as the diagonal matrices they are (``alpha = r``: a factor of one)."""
    model = AdapterModel(fixture_base("bert", causal_lm=False))
    model.add_adapter("v", "vera", r=4, full_scaling=full, roles=["q", "v"], set_active=True)
    perturb(model.adapters["v"], scale=0.3)
    assert_adapterhub_computes_ours(model, "v", tmp_path)


def test_full_scaling_vera_saves_its_matrices_and_is_not_written_for_peft(tmp_path):
    model = AdapterModel(make_base(ARCHS["bert"]))
    model.add_adapter("v", "vera", r=4, full_scaling=True, set_active=True)
    unit = next(iter(model.adapters["v"].values()))
    assert unit.vera_lambda_d.shape == (4, 4) and torch.equal(unit.vera_lambda_d, torch.diag(torch.full((4,), 0.1)))
    perturb(model.adapters["v"], scale=0.3)
    with torch.no_grad():
        unit.vera_A.mul_(2.0)  # not the seed's draw any more: the saved matrices must be the ones used
    batch = make_batch()
    out = run(model.eval(), batch)
    model.save_adapter(tmp_path / "v", "v")
    again = AdapterModel(make_base(ARCHS["bert"]))
    again.load_adapter(tmp_path / "v", set_active=True)
    assert torch.equal(run(again.eval(), batch), out)
    with pytest.raises(AdapterError, match="nothing was written"):
        model.save_adapter(tmp_path / "p", "v", format="peft")
    assert not (tmp_path / "p").exists()
