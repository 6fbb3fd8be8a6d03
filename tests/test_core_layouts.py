"""The per-architecture layout tables point at the right modules.

A bottleneck adapter at a sub-layer site sees the sub-layer output ``y``, the residual stream
that entered the sub-layer and (post-LN models) the layer norm after the residual add. If the
table is right, ``norm(y + residual)`` is exactly the stream that leaves the sub-layer: the next
sub-layer's residual (attention -> [cross-attention ->] FFN), or the block's output (FFN). Checked
in every stack of every layout with fresh (identity) Houlsby adapters, which sit at every sub-layer
(with ``cross_adapter=True`` on encoder-decoders).
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


def _record_block_outputs(model: AdapterModel) -> dict[str, list[torch.Tensor]]:
    outs: dict[str, list[torch.Tensor]] = {}
    for name, stack in model.layout.stacks.items():
        for block in stack.blocks:
            block.register_forward_hook(
                lambda mod, args, out, name=name: outs.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out))
    return outs


def _leaving(io) -> torch.Tensor:
    h = io.y + io.residual
    return io.layer_norm(h) if io.layer_norm is not None else h


def _key(model: AdapterModel, stack: str, i: int, place: str) -> str:
    return f"{model.layout.stacks[stack].prefix}.{i}.{place}".replace(".", "-")


@archs
def test_layout_resolves_blocks(arch):
    layout = Layout.of(make_base(arch))
    assert layout.spec is not None and layout.hidden_size == 32
    assert layout.stack_names == list(arch.stacks)
    assert [s.num_layers for s in layout.stacks.values()] == [4] * len(arch.stacks)
    assert layout.num_layers == 4 * len(arch.stacks) == len(layout.blocks)
    assert layout.fingerprint() == {"model_type": arch.config().model_type, "hidden_size": 32,
                                    "num_layers": 4 * len(arch.stacks), "stacks": {s: 4 for s in arch.stacks}}


@archs
@torch.no_grad()
def test_sublayer_sites_see_the_residual_stream(arch, batch):
    """In every stack, each sub-layer's ``norm(y + residual)`` is the next one's residual
    (attention -> [cross-attention ->] FFN) and the last one's is the block's output."""
    model = AdapterModel(make_base(arch))
    model.add_adapter("a", "houlsby", cross_adapter=arch.encoder_decoder, set_active=True)
    seen, blocks = _record_slot_inputs(model), _record_block_outputs(model)
    model.eval()(**batch)
    assert len(seen) == sum(4 * len(arch.places(s)) for s in arch.stacks)
    for stack in arch.stacks:
        assert len(blocks[stack]) == 4
        for i in range(4):
            ios = [seen[_key(model, stack, i, place)] for place in arch.places(stack)]
            for io in ios:
                assert io.residual is not None and io.residual.shape == io.y.shape == blocks[stack][i].shape
                assert io.y.shape[0] == 4 and io.y.shape[-1] == 32
                assert (io.layer_norm is not None) == model.layout.spec.post_ln
            for io, following in zip(ios, ios[1:]):
                assert torch.allclose(_leaving(io), following.residual, atol=1e-6)
            assert torch.allclose(_leaving(ios[-1]), blocks[stack][i], atol=1e-6)


@archs
@torch.no_grad()
def test_sublayer_input_is_what_the_sublayer_reads(arch, batch):
    """``Site.input_from`` (for ``pre`` / ``parallel`` places) holds the sub-layer's input: the
    residual stream itself in post-LN models, its layer norm in pre-LN models."""
    model = AdapterModel(make_base(arch))
    model.add_adapter("a", "houlsby", cross_adapter=arch.encoder_decoder, set_active=True)
    seen = _record_slot_inputs(model)
    inputs: dict[str, torch.Tensor] = {}
    norms: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of every norm module
    for site in model.records["a"].sites:
        module, arg = site.input_from
        module.register_forward_pre_hook(
            lambda mod, args, kwargs, key=site.key, arg=arg: inputs.__setitem__(key, arg.pick(args, kwargs)),
            with_kwargs=True)
    for module in model.model.modules():
        if "norm" in type(module).__name__.lower():
            module.register_forward_hook(lambda mod, args, out: norms.append((args[0], out)))
    model.eval()(**batch)
    assert inputs.keys() == seen.keys()
    for key, x in inputs.items():
        residual = seen[key].residual
        assert x.shape == residual.shape
        if model.layout.spec.post_ln:
            assert torch.equal(x, residual)
        else:
            normed = [out for inp, out in norms if inp.shape == residual.shape and torch.equal(inp, residual)]
            assert normed and torch.equal(x, normed[0]), key


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
    assert len(captured) == 8 * len(arch.stacks)
    for key, x in captured.items():
        assert x is seen[key].residual


@pytest.mark.parametrize("arch", [a for a in ARCHS.values() if a.weight_places],  # not WavLM (refused there)
                         ids=[n for n, a in ARCHS.items() if a.weight_places])
def test_all_linear_puts_lora_on_every_projection_of_every_block(arch):
    """``roles="all-linear"`` (PEFT's name) = every role of each stack's map once; "q,v" reads as a list."""
    model = AdapterModel(make_base(arch))
    model.add_adapter("a", "lora", r=2, roles="all-linear")
    shapes = [shape for roles in arch.stacks.values() for shape in roles.values()]
    want = 4 * sum(2 * (i + o) for i, o in shapes)  # 4 layers, A and B per projection
    assert sum(p.numel() for p in model.adapters["a"].parameters()) == want
    assert len(model.adapters["a"]) == 4 * len(shapes)
    first = next(iter(arch.roles))
    model.add_adapter("b", "lora", r=2, roles=f"all-linear,{first}")  # a role named twice is placed once
    assert len(model.adapters["b"]) == len(model.adapters["a"])
    if "q" in arch.roles:
        model.add_adapter("c", "lora", r=2, roles="q, v")
        assert model.adapters["c"].keys() == model.adapters["a"].keys() & model.adapters["c"].keys()
        assert len(model.adapters["c"]) == 8 * len(arch.stacks)
