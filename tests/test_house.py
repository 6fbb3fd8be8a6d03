"""The house rules (issue 18): one store for adapters, heads added through the handle, deprecated
paths that still work for one release, and the import layers checked like any other test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from adapterkit import AdapterModel

ROOT = Path(__file__).resolve().parents[1]


def tiny() -> AdapterModel:
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=100)
    return AdapterModel(T.BertModel(cfg).eval())


def test_adapters_and_records_are_one_store():
    model = tiny()
    model.add_adapter("a", "pfeiffer")
    model.add_adapter("b", "lora")
    model.add_adapter("c", "ia3")
    model.delete_adapter("b")
    assert list(model.adapters) == list(model.records) == ["a", "c"]
    assert all(model.adapters[n] is model.records[n].modules for n in model.records)
    with pytest.raises(TypeError):
        model.records["x"] = model.records["a"]  # a read-only view


def test_head_dropout_is_an_option_of_add_head_methods():
    model = tiny()
    model.add_adapter("a", "pfeiffer")
    model.add_classification_head("a", 2, dropout=0.3)
    model.add_regression_head("r", dropout=0.0)
    model.add_tagging_head("t", 3, dropout=0.25)
    for name, p in (("a", 0.3), ("r", 0.0), ("t", 0.25)):
        assert model.heads[name].config.dropout == p
        assert {m.p for m in model.heads[name].modules() if isinstance(m, torch.nn.Dropout)} == {p}


def test_add_head_loads_given_weights_exactly():
    model = tiny()
    model.add_classification_head("a", 2)
    state = {k: torch.randn_like(v) for k, v in model.heads["a"].state_dict().items()}
    model.add_head("b", model.heads["a"].config, state=state)
    assert all(torch.equal(model.heads["b"].state_dict()[k], v) for k, v in state.items())
    with pytest.raises(Exception, match="head 'c'"):
        model.add_head("c", model.heads["a"].config, state={**state, "extra": torch.zeros(1)})
    assert "c" not in model.heads


def test_the_old_packaged_loader_names_warn_and_still_work():
    import adapterkit.loader
    import adapterkit.packaged

    with pytest.warns(DeprecationWarning, match="adapterkit.loader"):
        assert adapterkit.packaged.load_tokenizer is adapterkit.loader.load_tokenizer
    with pytest.raises(AttributeError):
        adapterkit.packaged.no_such_name


def test_the_import_layers_hold():
    """``[tool.importlinter]`` in pyproject.toml: no upward import, no cycle (scripts/test.sh runs it too)."""
    exe = Path(sys.executable).parent / "lint-imports"
    res = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": str(Path(sys.executable).parent)})
    assert res.returncode == 0, res.stdout[-2000:]
