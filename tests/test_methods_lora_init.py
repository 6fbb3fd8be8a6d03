"""PiSSA and OLoRA initialisation (``methods/lora_init.py``): the same function as PEFT's residual
model, on the unmodified base; saved so it loads there; exported as PEFT's own rank-2r conversion."""

from __future__ import annotations

import peft
import pytest
import torch
from helpers import ARCHS, make_base, make_batch, run

from adapterkit import AdapterError, AdapterModel

BERT, LLAMA = ARCHS["bert"], ARCHS["llama"]
TARGETS = {"bert": ["query", "value", "intermediate.dense"], "llama": ["q_proj", "v_proj", "down_proj"]}
ROLES = ["q", "v", "ffn_in"]  # the same modules: BERT's intermediate.dense; Llama's down_proj is ffn_proj
ROLES_OF = {"bert": ROLES, "llama": ["q", "v", "ffn_proj"]}


def _peft(arch, init, tmp_path):
    """PEFT's model (with its residual base), its initial adapter saved for the conversion, and
    every LoRA tensor moved by reproducible noise, as training would."""
    model = peft.get_peft_model(make_base(arch), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                                 target_modules=TARGETS[arch.name]))
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the conversion
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = init
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("arch", [BERT, LLAMA], ids=["bert", "llama"])
def test_same_function_as_peft_and_exported_for_the_unmodified_base(arch, init, tmp_path):
    batch = make_batch()
    reference = _peft(arch, init, tmp_path)
    expected = run(reference, batch)
    model = AdapterModel(make_base(arch))  # the unmodified base
    model.add_adapter("p", "lora", r=4, alpha=8.0, init_weights=init, roles=ROLES_OF[arch.name], set_active=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the same start as PEFT's, then the same noise in PEFT's order
        for name, p in reference.named_parameters():
            if "lora_" in name:
                mine = [q for n, q in model.adapters["p"].named_parameters()
                        if n.endswith(name.split(".")[-3]) and _same_module(n, name)]
                assert len(mine) == 1, name
                noise = 0.1 * torch.randn(p.shape, generator=g)
                assert (mine[0] + noise - p).abs().max() <= 1e-5, f"{name}: PEFT's {init} start differs"
                mine[0].add_(noise)
    assert (run(model.eval(), batch) - expected).abs().max() <= 1e-5
    # PEFT's conversion loads here on the unmodified base, and ours loads in PEFT the same way
    reference.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    again = AdapterModel(make_base(arch))
    again.load_adapter(tmp_path / "converted", set_active=True)
    assert (run(again.eval(), batch) - expected).abs().max() <= 1e-5
    model.save_adapter(tmp_path / "ours", "p", format="peft")
    theirs = peft.PeftModel.from_pretrained(make_base(arch), tmp_path / "ours").eval()
    assert (run(theirs, batch) - expected).abs().max() <= 1e-5


def _same_module(ours: str, theirs: str) -> bool:
    """adapterkit's ``...layers.<i>.<path>...`` and PEFT's ``...layer(s).<i>.<path>.lora_X.default.weight``."""
    import re

    i = re.search(r"layers?\.(\d+)\.", theirs).group(1)
    path = re.search(r"layers?\.\d+\.(.+)\.lora_[AB]", theirs).group(1)
    return ours.split(".")[0] == f"layers-{i}-{path.replace('.', '-')}"


def test_saved_pissa_loads_on_the_unmodified_base_and_merges_exactly(tmp_path):
    batch = make_batch()
    model = AdapterModel(make_base(BERT))
    model.add_adapter("p", "lora", r=4, init_weights="pissa", set_active=True)
    with torch.no_grad():
        for p in model.adapters["p"].parameters():
            p.mul_(1.1)
    out = run(model.eval(), batch)
    model.save_adapter(tmp_path / "p", "p")
    again = AdapterModel(make_base(BERT))
    again.load_adapter(tmp_path / "p", set_active=True)
    assert torch.equal(run(again.eval(), batch), out)
    weights = {k: v.clone() for k, v in again.model.state_dict().items()}
    again.merge_adapter("p")
    assert (run(again, batch) - out).abs().max() <= 1e-5
    again.unmerge_adapter("p")
    assert all(torch.equal(v, weights[k]) for k, v in again.model.state_dict().items())


def test_an_unconverted_peft_pissa_folder_is_refused(tmp_path):
    reference = peft.get_peft_model(make_base(BERT), peft.LoraConfig(r=4, init_lora_weights="pissa",
                                                                     target_modules=["query", "value"]))
    reference.save_pretrained(tmp_path / "pissa")
    model = AdapterModel(make_base(BERT))
    with pytest.raises(AdapterError, match="path_initial_model_for_weight_conversion"):
        model.load_adapter(tmp_path / "pissa")
    assert list(model.adapters) == []


def test_unknown_init_and_non_linear_hosts_are_refused():
    model = AdapterModel(make_base(ARCHS["gpt2"]))
    with pytest.raises(AdapterError, match="Unknown init_weights 'loftq'"):
        model.add_adapter("p", "lora", init_weights="loftq")
    with pytest.raises(AdapterError, match="not a whole Linear layer"):
        model.add_adapter("p", "lora", r=2, init_weights="pissa", roles=["q", "v"])  # slices of c_attn
    assert list(model.adapters) == []
