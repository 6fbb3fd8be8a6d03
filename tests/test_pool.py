"""Thousands of adapters over one base: what a call or a setup change costs must not grow with
the number of adapters loaded (counted in Python function calls and compile work, not timed);
what an adapter holds beyond its weights (shared stateless modules) and the invariants with them;
``Parallel`` of same-shape adapters as one batch through stacked weights, replicated late."""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch
import transformers as T

from adapterkit import AdapterModel, Parallel
from helpers import assert_routed_equals_alone, perturb, run

CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
NAMES = ["a0", "a1", None, "a0", "a1", "a1"]


def loaded(preset: str, n: int) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(T.BertModel(T.BertConfig(**CFG))).eval()
    for i in range(n):
        model.add_adapter(f"a{i}", preset, **({"r": 2} if preset == "lora" else {}))
    return model


def python_calls(fn) -> int:
    """How many Python functions run inside ``fn()`` (``sys.setprofile`` 'call' events)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "call":
            count += 1

    sys.setprofile(tracer)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


@pytest.mark.parametrize("preset", ["lora", "pfeiffer", "ia3", "prefix_tuning", "prompt_tuning", "houlsby"])
def test_a_routed_call_does_the_same_work_with_4_or_60_adapters_loaded(preset):
    ids = torch.randint(0, 100, (len(NAMES), 5))
    counts = []
    for n in (4, 60):
        model = loaded(preset, n)
        with torch.inference_mode():
            model(input_ids=ids, adapter_names=NAMES)  # first call: lazy set-up of transformers' own
            counts.append(python_calls(lambda: model(input_ids=ids, adapter_names=NAMES)))
    assert counts[0] == counts[1], f"a routed call ran {counts} Python calls with 4 / 60 adapters loaded"


def test_add_delete_and_load_do_the_same_work_with_4_or_60_adapters_loaded(tmp_path):
    """A setup change compiles the changed adapter's units only, and finds a slot's units in the
    store's index: its Python work does not grow with the number of adapters loaded."""
    counts = []
    for n in (4, 60):
        model = loaded("lora", n)
        model.save_adapter(tmp_path / f"saved{n}", "a0")
        calls = [python_calls(lambda: model.add_adapter("new", "lora", r=2)),
                 python_calls(lambda: model.delete_adapter("new")),
                 python_calls(lambda: model.load_adapter(tmp_path / f"saved{n}", load_as="back"))]
        counts.append(calls)
    assert counts[0] == counts[1], f"add / delete / load ran {counts} Python calls with 4 / 60 adapters loaded"


def test_compile_work_of_an_add_is_the_new_adapters_units_only(monkeypatch):
    model = loaded("pfeiffer", 5)
    compiled = []
    original = type(model.adapters["a0"][next(iter(model.adapters["a0"].keys()))]).compile_at

    def counted(self, site):
        compiled.append(self)
        return original(self, site)

    monkeypatch.setattr(type(model.adapters["a0"][next(iter(model.adapters["a0"].keys()))]), "compile_at", counted)
    model.add_adapter("new", "pfeiffer")
    assert set(map(id, compiled)) == set(map(id, model.adapters["new"].values()))
    compiled.clear()
    model.delete_adapter("new")
    assert compiled == []


# -- Parallel of same-shape adapters: one batch through the stacked weights -----------------------------
def _perturbed(preset: str, names: list[str]) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(T.BertModel(T.BertConfig(**CFG))).eval()
    for name in names:
        model.add_adapter(name, preset, **({"r": 2} if preset == "lora" else {}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("preset", ["pfeiffer", "houlsby", "parallel", "lora", "ia3"])
@pytest.mark.parametrize("grad", [False, True])  # inference (Pfeiffer folds the layer norm) and autograd
def test_parallel_of_same_shape_adapters_runs_stacked_and_equals_each_alone(preset, grad, monkeypatch):
    names = ["p0", "p1", "p2"]
    model = _perturbed(preset, names)
    ids = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(2))
    unit_class = type(next(iter(model.adapters["p0"].values())))
    copies = []
    original = unit_class.run_stacked.__func__

    def spied(cls, units, which, io):
        copies.append(which is None)
        return original(cls, units, which, io)

    monkeypatch.setattr(unit_class, "run_stacked", classmethod(spied))
    with torch.set_grad_enabled(grad):
        model.set_active_adapters(Parallel(*names))
        outs = model(input_ids=ids)
        assert copies and all(copies), "the copies did not run through the stacked weights"
        for name, out in zip(names, outs):
            model.set_active_adapters(name)
            torch.testing.assert_close(out.last_hidden_state, model(input_ids=ids).last_hidden_state, rtol=0, atol=1e-6)


def test_parallel_stacked_trains_each_adapter_as_alone():
    """The gradients a Parallel of same-shape adapters gives each adapter are those of the
    adapter alone on its copy of the batch."""
    names = ["p0", "p1"]
    model = _perturbed("pfeiffer", names)
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(3))
    w = torch.randn(3, 5, CFG["hidden_size"], generator=torch.Generator().manual_seed(4))  # (a layer norm's
    model.set_active_adapters(Parallel(*names))  # output has a fixed sum of squares: project it instead)
    sum((out.last_hidden_state * w).sum() for out in model(input_ids=ids)).backward()
    together = {k: p.grad.clone() for k, p in model.adapters.named_parameters()}
    model.adapters.zero_grad(set_to_none=True)
    for name in names:
        model.set_active_adapters(name)
        (model(input_ids=ids).last_hidden_state * w).sum().backward()
    scale = max(float(g.abs().max()) for g in together.values())
    for k, p in model.adapters.named_parameters():  # float32 sums in another order: relative to the scale
        torch.testing.assert_close(together[k], p.grad, rtol=1e-4, atol=1e-5 * scale)


# -- memory per adapter: no module objects where one shared stateless module will do -------------------
def _own_modules(model: AdapterModel, name: str) -> set[int]:
    """The modules only adapter ``name`` holds (not shared with another adapter)."""
    others = {id(m) for n in model.adapters if n != name for m in model.adapters[n].modules()}
    return {id(m) for m in model.adapters[name].modules()} - others


@pytest.mark.parametrize("preset, per_site", [("lora", 1), ("pfeiffer", 3), ("ia3", 1)])
def test_an_adapter_holds_one_module_per_unit_and_shares_the_stateless_ones(preset, per_site):
    """Each ``nn.Module`` costs about 2 KB: an adapter owns its units (a bottleneck also its two
    Linear layers) and its dict of units; strategies, activations and "no dropout" are shared."""
    model = loaded(preset, 3)
    units = list(model.adapters["a1"].values())
    assert len(_own_modules(model, "a1")) == per_site * len(units) + 1
    assert len({id(u.strategy) for n in model.adapters for u in model.adapters[n].values()}) == 1


@pytest.mark.parametrize("options", [{"strategy": "gate"}, {"strategy": "channel_gate"},
                                     {"stochastic_depth": 0.1}, {"l2_lambda": 0.01}, {"dropout": 0.1}])
def test_strategies_and_dropout_with_state_are_not_shared(options):
    torch.manual_seed(0)
    model = AdapterModel(T.BertModel(T.BertConfig(**CFG))).eval()
    for name in ("a", "b"):
        model.add_adapter(name, "pfeiffer", **options)
    a, b = next(iter(model.adapters["a"].values())), next(iter(model.adapters["b"].values()))
    part = "dropout" if "dropout" in options else "strategy"
    assert getattr(a, part) is not getattr(b, part)
    model.adapters["a"].train()
    model.adapters["b"].eval()  # one adapter's mode (dropout, regularisers) never reaches another's
    assert getattr(a, part).training and not getattr(b, part).training


def test_delete_frees_the_adapters_tensors_even_after_routed_and_parallel_calls():
    """Nothing keeps a deleted adapter's weights alive: not the shared modules, not the stacked
    weights a routed or Parallel call keeps at inference (``Bottleneck._stacked``)."""
    model = loaded("pfeiffer", 3)
    ids = torch.randint(0, 100, (len(NAMES), 5))
    with torch.inference_mode():
        model(input_ids=ids, adapter_names=NAMES)
        model.set_active_adapters(Parallel("a0", "a1"))
        model(input_ids=ids)
    model.set_active_adapters(None)
    refs = [weakref.ref(p) for p in model.adapters["a1"].parameters()]
    model.delete_adapter("a1")
    gc.collect()
    assert all(r() is None for r in refs), "a deleted adapter's tensors are still referenced"


def test_parallel_replicates_the_first_block_at_its_adapters_as_adapterhub_does():
    """Pfeiffer adapters (at ``ffn_out``, whose ``BertOutput`` adds the residual and normalises):
    the first block runs its attention and FFN once on the B examples, the copies start at the
    adapters; outputs (with padding) equal each adapter alone."""
    torch.manual_seed(0)
    model = AdapterModel(T.BertModel(T.BertConfig(**{**CFG, "num_hidden_layers": 4}))).eval()
    names = ["p0", "p1", "p2"]
    for name in names:
        model.add_adapter(name, "pfeiffer", layers=[2, 3])
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    seen = {}
    layer = model.model.encoder.layer
    for key, module in {"ffn2": layer[2].intermediate.dense, "norm2": layer[2].output.LayerNorm,
                        "attn3": layer[3].attention.self.query}.items():
        module.register_forward_hook(lambda m, a, out, key=key: seen.__setitem__(key, out.shape[0]))
    model.set_active_adapters(Parallel(*names))
    outs = model(input_ids=ids, attention_mask=mask)
    assert seen == {"ffn2": 2, "norm2": 6, "attn3": 6}
    for name, out in zip(names, outs):
        model.set_active_adapters(name)
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(out.last_hidden_state, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["lora", "pfeiffer"])
def test_the_shared_storage_keeps_the_invariants(preset, tmp_path):
    """With the stateless modules shared by every adapter: routed = alone, save -> load gives the
    same outputs and tensors, merged = unmerged (LoRA), and deleting one adapter changes no other."""
    model = loaded(preset, 4)
    perturb(model.adapters, seed=11)
    batch = {"input_ids": torch.randint(0, 100, (len(NAMES), 5), generator=torch.Generator().manual_seed(6))}
    with torch.no_grad():
        assert_routed_equals_alone(model, batch, NAMES, tol=1e-6)
        model.set_active_adapters("a2")
        before = run(model, batch)
        model.save_adapter(tmp_path / "a2", "a2")
        model.load_adapter(tmp_path / "a2", load_as="back")
        model.set_active_adapters("back")
        assert torch.equal(run(model, batch), before)
        assert all(torch.equal(a, b) for a, b in zip(model.adapters["a2"].state_dict().values(),
                                                       model.adapters["back"].state_dict().values()))
        if preset == "lora":
            model.merge_adapter("back")
            torch.testing.assert_close(run(model, batch), before, rtol=0, atol=1e-5)
            model.unmerge_adapter("back")
        model.delete_adapter("a1")
        model.set_active_adapters("a2")
        assert torch.equal(run(model, batch), before)


def test_parallel_with_its_first_block_skipped_replicates_at_the_block_input():
    """AdapterDrop's ``skip_layers`` on the block where the copies would start late: the plans there
    do not run, so the batch is replicated at that block's input; each copy equals its adapter alone
    with the same layers skipped."""
    torch.manual_seed(0)
    model = AdapterModel(T.BertModel(T.BertConfig(**{**CFG, "num_hidden_layers": 3}))).eval()
    names = ["p0", "p1"]
    for name in names:
        model.add_adapter(name, "pfeiffer", layers=[1, 2])
    perturb(model.adapters, seed=12)
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model.set_active_adapters(Parallel(*names), skip_layers=[1])
        outs = model(input_ids=ids)
        for name, out in zip(names, outs):
            model.set_active_adapters(name, skip_layers=[1])
            torch.testing.assert_close(out.last_hidden_state, run(model, {"input_ids": ids}), rtol=0, atol=1e-6)
