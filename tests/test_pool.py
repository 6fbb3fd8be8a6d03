"""Thousands of adapters over one base: what a call or a setup change costs must not grow with
the number of adapters loaded (counted in Python function calls and compile work, not timed)."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers as T

from adapterkit import AdapterModel

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
