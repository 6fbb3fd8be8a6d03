"""The per-architecture layout tables point at the right modules.

A bottleneck adapter at a sub-layer site sees the sub-layer output ``y``, the residual stream
that entered the sub-layer and (post-LN models) the layer norm after the residual add. If the
table is right, ``norm(y + residual)`` is exactly the stream that leaves the sub-layer: the next
sub-layer's residual (attention -> FFN), or the block's output (FFN). Checked on every layout
with fresh (identity) Houlsby adapters, which sit at both sub-layers.
"""

from __future__ import annotations

import pytest
import torch

from adapterkit import AdapterModel
from adapterkit.layouts import Layout
from helpers import ARCHS, make_base

archs = pytest.mark.parametrize("arch", ARCHS.values(), ids=list(ARCHS))


def _record_slot_inputs(model: AdapterModel) -> dict[str, object]:
    """What each slot hands its adapter (the ``SlotIO`` that ``read`` receives)."""
    seen: dict[str, object] = {}
    for key, module in model.adapters["a"].items():
        def read(io, key=key, original=module.read):
            seen[key] = io
            return original(io)
        module.read = read
    return seen


def _record_block_outputs(model: AdapterModel) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    for block in model.layout.blocks:
        block.register_forward_hook(lambda mod, args, out: outs.append(out[0] if isinstance(out, tuple) else out))
    return outs


def _leaving(io) -> torch.Tensor:
    h = io.y + io.residual
    return io.layer_norm(h) if io.layer_norm is not None else h


@archs
def test_layout_resolves_blocks(arch):
    layout = Layout.of(make_base(arch))
    assert layout.spec is not None and layout.num_layers == 4 and layout.hidden_size == 32
    assert layout.fingerprint() == {"model_type": arch.config().model_type, "hidden_size": 32, "num_layers": 4}


@archs
@torch.no_grad()
def test_sublayer_sites_see_the_residual_stream(arch, batch):
    model = AdapterModel(make_base(arch))
    model.add_adapter("a", "houlsby", set_active=True)
    seen, blocks = _record_slot_inputs(model), _record_block_outputs(model)
    model.eval()(**batch)
    assert len(seen) == 8 and len(blocks) == 4
    for i in range(4):
        attn, ffn = seen[f"layers-{i}-attn_out"], seen[f"layers-{i}-ffn_out"]
        for io in (attn, ffn):
            assert io.residual is not None and io.residual.shape == io.y.shape == (4, 7, 32)
            assert (io.layer_norm is not None) == model.layout.spec.post_ln
        assert torch.allclose(_leaving(attn), ffn.residual, atol=1e-6)
        assert torch.allclose(_leaving(ffn), blocks[i], atol=1e-6)


@archs
@torch.no_grad()
def test_parallel_adapter_reads_the_sublayer_input(arch, batch):
    """He et al. 2021 eq. 6: the parallel adapter reads what the sub-layer reads (its residual
    stream input, checked above to be the right tensor), not its output."""
    model = AdapterModel(make_base(arch))
    model.add_adapter("a", "parallel", mh_adapter=True, set_active=True)
    seen = _record_slot_inputs(model)
    captured: dict[str, torch.Tensor] = {}
    for key, module in model.adapters["a"].items():
        module.down.register_forward_pre_hook(lambda mod, args, key=key: captured.__setitem__(key, args[0]))
    model.eval()(**batch)
    assert len(captured) == 8
    for key, x in captured.items():
        assert x is seen[key].residual


@archs
def test_all_linear_puts_lora_on_every_projection_of_every_block(arch):
    """``roles="all-linear"`` (PEFT's name) = every role of the map once; "q,v" reads as a list."""
    model = AdapterModel(make_base(arch))
    model.add_adapter("a", "lora", r=2, roles="all-linear")
    want = 4 * sum(2 * (i + o) for i, o in arch.roles.values())  # 4 layers, A and B per projection
    assert sum(p.numel() for p in model.adapters["a"].parameters()) == want
    assert len(model.adapters["a"]) == 4 * len(arch.roles)
    first = next(iter(arch.roles))
    model.add_adapter("b", "lora", r=2, roles=f"all-linear,{first}")  # a role named twice is placed once
    assert len(model.adapters["b"]) == len(model.adapters["a"])
    if "q" in arch.roles:
        model.add_adapter("c", "lora", r=2, roles="q, v")
        assert model.adapters["c"].keys() == model.adapters["a"].keys() & model.adapters["c"].keys()
        assert len(model.adapters["c"]) == 8
