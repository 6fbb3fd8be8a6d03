"""A prompt (P-adapter / prompt tuning) and an L-adapter on one model, in either order.

The L-adapter taps every layer at the stack's inner length (prompt positions included); the input
place cuts the prompt positions off the stack's output. Both hook the same module on GPT-2 and
Llama (``GPT2Model`` / ``LlamaModel``) and on speech encoders, so the L-adapter must run first
whichever adapter was added first (it crashed with "size of tensor a (59) must match ... (39)" when
the prompt came first).
"""

from __future__ import annotations

import pytest
import torch

from adapterkit import AdapterModel, Stack
from helpers import ARCHS, make_base, make_batch, perturb, run

ARCH_IDS = ["gpt2", "llama", "wav2vec2"]


def _model(arch, order: tuple[str, ...]) -> AdapterModel:
    model = AdapterModel(make_base(arch))
    presets = {"p": "prompt_tuning", "l": "l_adapter", "u": "e_adapter+l_adapter+p_adapter"}
    for name in order:
        model.add_adapter(name, presets[name])
    for name in order:
        perturb(model.adapters[name], scale=0.1, seed=ord(name))
    return model.eval()


@pytest.mark.parametrize("arch_id", ARCH_IDS)
def test_prompt_added_before_an_l_adapter_stacks_and_routes_as_in_the_other_order(arch_id):
    arch = ARCHS[arch_id]
    batch = make_batch(arch=arch)
    first_p, first_l = _model(arch, ("p", "l")), _model(arch, ("l", "p"))
    first_l.load_state_dict(first_p.state_dict())  # the same adapter weights in both
    with torch.no_grad():
        for model in (first_p, first_l):
            model.set_active_adapters(Stack("p", "l"))
        want = run(first_l, batch)
        torch.testing.assert_close(run(first_p, batch), want, rtol=0, atol=0)
        names = ["p", "l", None, "p"]
        routed = run(first_p, batch, adapter_names=names)
        for i, name in enumerate(names):
            first_p.set_active_adapters(name)
            alone = run(first_p, {k: v[i : i + 1] for k, v in batch.items()})
            assert (routed[i : i + 1] - alone).abs().max() <= 1e-5  # float32: batched vs one-row matmuls


@pytest.mark.parametrize("arch_id", ["wav2vec2"])
def test_elp_union_routed_beside_none_after_a_prompt_adapter(arch_id):
    arch = ARCHS[arch_id]
    batch = make_batch(arch=arch)
    model = _model(arch, ("p", "u"))
    names = ["u", None, "p", "u"]
    with torch.no_grad():
        routed = run(model, batch, adapter_names=names)
        for i, name in enumerate(names):
            model.set_active_adapters(name)
            alone = run(model, {k: v[i : i + 1] for k, v in batch.items()})
            assert (routed[i : i + 1] - alone).abs().max() <= 1e-5
