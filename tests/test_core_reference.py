"""Reference equivalence with PEFT (litgpt ``test_lora.py::test_against_hf_*`` style): the same
weights in adapterkit and in ``peft`` give the same outputs.

LoRA on BERT (nn.Linear) and GPT-2 (transformers' Conv1D, PEFT ``fan_in_fan_out``), and IA3 on
attention keys and values (where both libraries scale the layer's output), unmerged and merged.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

from adapterkit import AdapterModel  # noqa: E402
from helpers import ARCHS, make_base, run  # noqa: E402

# arch -> (adapterkit roles, PEFT target module names, PEFT fan_in_fan_out)
LORA_TARGETS = {
    "bert": (["q", "v", "ffn_proj"], ["query", "value", "output.dense"], False),
    "gpt2": (["qkv", "ffn_in"], ["c_attn", "c_fc"], True),
    "llama": (["q", "v", "ffn_gate"], ["q_proj", "v_proj", "gate_proj"], False),
}
IA3_TARGETS = {"bert": (["k", "v"], ["key", "value"]), "llama": (["k", "v"], ["k_proj", "v_proj"])}


def _peft_module(peft_model, place_id: str, model: AdapterModel) -> torch.nn.Module:
    layer, rest = place_id.split(".", 2)[1:]
    return peft_model.base_model.model.get_submodule(f"{model.layout.blocks_path}.{layer}.{rest}")


@torch.no_grad()
def _randomise(model: AdapterModel) -> None:
    g = torch.Generator().manual_seed(5)
    for p in model.adapters.parameters():
        p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch_name", LORA_TARGETS)
def test_lora_matches_peft(arch_name, batch):
    roles, targets, fan_in_fan_out = LORA_TARGETS[arch_name]
    ours = AdapterModel(make_base(ARCHS[arch_name]))
    ours.add_adapter("a", "lora", r=4, alpha=12.0, roles=roles, set_active=True)
    _randomise(ours)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                             lora_dropout=0.0)
    theirs = peft.get_peft_model(make_base(ARCHS[arch_name]), config).eval()
    for site in ours.records["a"].sites:
        module, lora = _peft_module(theirs, site.place_id, ours), ours.adapters["a"][site.key]
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(lora.lora_A)
            module.lora_B["default"].weight.copy_(lora.lora_B)
    assert len(ours.records["a"].sites) == 4 * len(roles)
    expected = run(theirs, batch)
    assert (expected - run(make_base(ARCHS[arch_name]), batch)).abs().max() > 1e-3  # the adapter matters
    assert (run(ours.eval(), batch) - expected).abs().max() <= 1e-5
    ours.merge_adapter("a")
    assert (run(ours, batch) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch_name", IA3_TARGETS)
def test_ia3_on_keys_and_values_matches_peft(arch_name, batch):
    roles, targets = IA3_TARGETS[arch_name]
    ours = AdapterModel(make_base(ARCHS[arch_name]))
    ours.add_adapter("a", "ia3", roles=roles, set_active=True)
    _randomise(ours)
    config = peft.IA3Config(target_modules=targets, feedforward_modules=[])
    theirs = peft.get_peft_model(make_base(ARCHS[arch_name]), config).eval()
    for site in ours.records["a"].sites:
        module = _peft_module(theirs, site.place_id, ours)
        with torch.no_grad():
            module.ia3_l["default"].copy_(ours.adapters["a"][site.key].ia3_l.view_as(module.ia3_l["default"]))
    expected = run(theirs, batch)
    assert (expected - run(make_base(ARCHS[arch_name]), batch)).abs().max() > 1e-3  # the adapter matters
    assert (run(ours.eval(), batch) - expected).abs().max() <= 1e-5
    ours.merge_adapter("a")
    assert (run(ours, batch) - expected).abs().max() <= 1e-5
