"""LoReFT (``methods/reft.py``): interventions at each example's first / last real tokens (the
positions are part of the place: ``Site.positions``, ``slots.token_positions``), AdapterHub's
formula (fixtures ``ah_*reft*`` in ``test_interop.py``), our export loaded by AdapterHub, routing."""

from __future__ import annotations

import pytest
import torch
from adapterhub_peer import adapterhub_output, fixture_base
from helpers import ARCHS, assert_routed_equals_alone, make_base, make_batch, perturb, run

from adapterkit import AdapterError, AdapterModel


def layer_output(model, batch, layer: int) -> torch.Tensor:
    seen = {}
    block = model.layout.stacks["decoder"].blocks[layer]
    handle = block.register_forward_hook(lambda m, a, out: seen.setdefault("y", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen["y"]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_only_the_first_and_last_real_tokens_change_and_by_the_formula(padding):
    model = AdapterModel(make_base(ARCHS["llama"]))
    model.add_adapter("r", "loreft", r=2, prefix_positions=2, suffix_positions=1, layers=[0], set_active=True)
    model.eval()
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 5:] = 0
        real = {0: [0, 1, 7], 1: [0, 1, 4]}
    else:
        mask[1, :3] = 0
        real = {0: [0, 1, 7], 1: [3, 4, 7]}
    batch = {"input_ids": ids, "attention_mask": mask}
    after = layer_output(model, batch, 0)
    with model.disable_adapters():
        before = layer_output(model, batch, 0)
    unit = model.adapters["r"]["layers-0-output"]
    for row, chosen in real.items():
        changed = sorted(int(t) for t in (after[row] - before[row]).abs().amax(-1).nonzero())
        assert changed == chosen
        for j, t in enumerate(chosen):
            u = unit.units[0 if j < 2 else 1]
            h = before[row, t]
            r = u.projection.weight
            want = h + (u.learned_source(h) - r @ h) @ r
            assert (after[row, t] - want).abs().max() <= 1e-5


def test_adapterhub_loads_our_reft_export(tmp_path):
    model = AdapterModel(fixture_base("llama", causal_lm=True))
    model.add_adapter("r", "loreft", r=2, prefix_positions=2, suffix_positions=2, tied_weights=True, set_active=True)
    with torch.no_grad():
        for name, p in model.adapters["r"].named_parameters():
            if "learned_source" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    batch = {"input_ids": torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(2)),
             "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3])}
    ours = run(model.eval(), batch)
    with model.disable_adapters():
        assert (run(model, batch) - ours).abs().max() > 1e-3
    model.save_adapter(tmp_path / "ah", "r", format="adapterhub")
    theirs = adapterhub_output(tmp_path / "ah", "llama", batch, tmp_path, causal_lm=True)
    real = batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-5


def test_routed_reft_equals_each_example_alone():
    model = AdapterModel(make_base(ARCHS["bert"]))
    model.add_adapter("a0", "loreft", r=2)
    model.add_adapter("a1", "loreft", r=1, suffix_positions=2, tied_weights=True)
    perturb(model.adapters, scale=0.2)
    model.eval()
    batch = make_batch(batch_size=4)
    assert_routed_equals_alone(model, batch, ["a1", None, "a0", "a1"])


def test_bad_reft_options_are_refused():
    model = AdapterModel(make_base(ARCHS["bert"]))
    with pytest.raises(AdapterError, match="not both 0"):
        model.add_adapter("r", "loreft", prefix_positions=0)
    with pytest.raises(AdapterError, match="drop place= and target_modules="):
        model.add_adapter("r", "loreft", target_modules=["query"])
    model.add_adapter("d", "direft")
    with pytest.raises(AdapterError, match="nothing was written"):
        model.save_adapter("/nonexistent/never", "d", format="adapterhub")
    assert list(model.adapters) == ["d"]
