"""``fused.add_linear`` and the bottleneck forward that uses it: the same function and the same
gradients as the written-out formulas (``residual + scale * (up(act(down(h))))``), in float64 so
that any difference beyond rounding fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapterkit import resolve_config
from adapterkit.methods.bottleneck import Bottleneck
from adapterkit.methods.fused import add_linear, fold_layer_norm, linear_of_layer_norm
from adapterkit.places.slots import ArgRef, Site, SlotIO
from adapterkit.strategies import Add


def _unit(config) -> Bottleneck:
    """A bottleneck module as the core places it: with the residual-add strategy attached."""
    unit = Bottleneck(config, D, D)
    unit.strategy = Add()
    return unit

D = 12


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_add_linear_is_the_written_out_sum_with_its_gradients(with_bias, scale):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    expected = y + scale * F.linear(x, w, b)
    assert torch.allclose(add_linear(y, x, w, b, scale), expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: add_linear(*t, scale), (y, x, w, b))


def _written_out(adapter: Bottleneck, io: SlotIO, preset: str) -> torch.Tensor:
    """Each preset's formula as AdapterHub's ``Adapter.pre_forward`` / ``forward`` spell it."""
    mlp = lambda h, act: adapter.up(act(adapter.down(h)))  # noqa: E731
    if preset == "pfeiffer":  # original_ln_before, residual_before_ln=True
        return io.y + mlp(io.layer_norm(io.y + io.residual), F.relu)
    if preset == "houlsby":
        return io.y + mlp(io.y, F.silu)
    return io.y + 4.0 * mlp(io.residual, F.relu)  # parallel: reads the sub-layer input, scaling 4


@pytest.mark.parametrize("preset", ["pfeiffer", "houlsby", "parallel"])
@pytest.mark.parametrize("training", [False, True])
def test_bottleneck_forward_and_gradients_match_the_written_out_formula(preset, training):
    torch.manual_seed(0)
    adapter = _unit(resolve_config(preset)).double().train(training)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)  # non-zero up-projection: the adapter changes the output
    norm = nn.LayerNorm(D).double()
    y = torch.randn(3, 4, D, dtype=torch.float64, requires_grad=True)
    io = SlotIO(x=torch.randn(3, 4, D, dtype=torch.float64), y=y,
                residual=torch.randn(3, 4, D, dtype=torch.float64), layer_norm=norm,
                place=adapter.config.resolved_place)
    params = [*adapter.parameters(), y]
    ours = adapter.run(io)
    expected = _written_out(adapter, io, preset)
    assert (ours - io.y).abs().max() > 0.1
    assert torch.allclose(ours, expected, atol=1e-12)
    cotangent = torch.randn_like(ours)
    for got, want in zip(torch.autograd.grad(ours, params, cotangent),
                         torch.autograd.grad(expected, params, cotangent)):
        assert torch.allclose(got, want, atol=1e-12)


def test_dropout_while_training_takes_the_written_out_path():
    """Dropout acts on the adapter's output alone, so it cannot ride on the fused GEMM: with
    dropout set, training outputs vary from call to call and eval outputs do not."""
    torch.manual_seed(0)
    adapter = _unit(resolve_config("houlsby", dropout=0.5))
    with torch.no_grad():
        adapter.up.weight.normal_()
    y = torch.randn(2, 3, D)
    io = SlotIO(x=y, y=y)
    assert not torch.equal(adapter.run(io), adapter.run(io))
    adapter.eval()
    assert torch.equal(adapter.run(io), adapter.run(io))
    assert torch.allclose(adapter.run(io), y + adapter.up(F.silu(adapter.down(y))), atol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_of_layer_norm_is_the_linear_of_the_layer_norm(affine, dtype):
    g = torch.Generator().manual_seed(1)
    norm = nn.LayerNorm(D, elementwise_affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.5, generator=g)
            norm.bias.normal_(0.0, 0.5, generator=g)
    w, b = torch.randn(5, D, dtype=dtype, generator=g), torch.randn(5, dtype=dtype, generator=g)
    s = 3.0 * torch.randn(40, D, dtype=dtype, generator=g) + torch.randn(40, 1, dtype=dtype, generator=g)
    got = linear_of_layer_norm(s, norm.eps, fold_layer_norm(norm, w, b))
    expected = F.linear(norm(s), w, b)
    assert torch.allclose(got, expected, atol=1e-12 if dtype == torch.float64 else 2e-5)


def test_linear_of_layer_norm_declines_rows_whose_mean_dwarfs_their_spread():
    norm, w = nn.LayerNorm(D), torch.randn(5, D)
    s = torch.randn(4, D)
    assert linear_of_layer_norm(s, norm.eps, fold_layer_norm(norm, w, None)) is not None
    s[2] = 3000.0 + torch.randn(D)  # E[s^2] - mean^2 would keep few digits in float32
    assert linear_of_layer_norm(s, norm.eps, fold_layer_norm(norm, w, None)) is None


def _pfeiffer_io(dtype=torch.float64, offset: float = 0.0) -> tuple[Bottleneck, SlotIO]:
    torch.manual_seed(0)
    adapter = _unit(resolve_config("pfeiffer")).to(dtype).eval()
    norm = nn.LayerNorm(D).to(dtype)
    with torch.no_grad():
        for p in [*adapter.parameters(), *norm.parameters()]:
            p.normal_(0, 0.3)
    io = SlotIO(x=torch.randn(3, 4, D, dtype=dtype), y=torch.randn(3, 4, D, dtype=dtype) + offset,
                residual=torch.randn(3, 4, D, dtype=dtype), layer_norm=norm)
    # as the core compiles a plan: the site (a post place with a residual and the model's norm) allows the fold
    adapter.compile_at(Site("x", nn.Identity(), D, D, residual_from=(nn.Identity(), ArgRef(0, "x")), layer_norm=norm))
    return adapter, io


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_pfeiffer_inference_path_matches_the_written_out_formula(mode):
    adapter, io = _pfeiffer_io()
    y_before = io.y.clone()
    with mode():
        ours = adapter.run(io)
        expected = _written_out(adapter, io, "pfeiffer")
    assert adapter._folded is not None  # the folded path ran
    assert torch.allclose(ours, expected, atol=1e-12)
    assert torch.equal(io.y, y_before)  # the output went to a buffer of its own, not over y


def test_pfeiffer_inference_path_follows_weight_updates():
    adapter, io = _pfeiffer_io()
    with torch.no_grad():
        adapter.run(io)
        adapter.down.weight.add_(0.5)  # an optimizer step or load_adapter writes in place
        io.layer_norm.bias.mul_(2.0)
        assert torch.allclose(adapter.run(io), _written_out(adapter, io, "pfeiffer"), atol=1e-12)
        adapter.down.weight = nn.Parameter(adapter.down.weight * 2.0)  # a new tensor, version 0
        adapter.down.bias.data = adapter.down.bias + 1.0  # new storage under the same Parameter
        assert torch.allclose(adapter.run(io), _written_out(adapter, io, "pfeiffer"), atol=1e-12)
    adapter.to(torch.float32)  # new tensors: the fold is made again for them
    io32 = SlotIO(x=io.x.float(), y=io.y.float(), residual=io.residual.float(), layer_norm=io.layer_norm.float())
    with torch.no_grad():
        assert torch.allclose(adapter.run(io32), _written_out(adapter, io32, "pfeiffer"), atol=1e-5)


def test_pfeiffer_inference_path_falls_back_where_the_fold_would_lose_precision():
    adapter, io = _pfeiffer_io(torch.float32, offset=3000.0)
    with torch.no_grad():
        delta = adapter.run(io) - io.y
        expected = _written_out(adapter, io, "pfeiffer") - io.y
    assert adapter._folded is not None and delta.abs().max() > 0.1
    assert torch.allclose(delta, expected, rtol=0.0, atol=2e-3)


def test_the_fused_path_is_chosen_when_the_plan_is_compiled():
    """Without ``compile_at`` (no plan compiled for the unit's site) the unit takes the plain path;
    after it, the fold; a site without the model's norm keeps the plain path."""
    adapter, io = _pfeiffer_io()
    adapter._foldable = False  # as built, before any plan
    with torch.no_grad():
        plain = adapter.run(io)
        assert adapter._folded is None
        adapter.compile_at(Site("x", nn.Identity(), D, D, residual_from=(nn.Identity(), ArgRef(0, "x")),
                                layer_norm=io.layer_norm))
        folded = adapter.run(io)
        assert adapter._folded is not None
        adapter.compile_at(Site("x", nn.Identity(), D, D, residual_from=(nn.Identity(), ArgRef(0, "x"))))
        assert not adapter._foldable
    assert torch.allclose(plain, folded, atol=1e-12)
