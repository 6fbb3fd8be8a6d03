"""AdapterHub's AdapterFusion folders (``interop/fusion.py``): a fusion AdapterHub saved loads
over AdapterHub adapters with AdapterHub's logits; ours exports to AdapterHub's layout; pickles
and options without a counterpart are refused with nothing changed.

The fixtures (``tests/fixtures/interop/ah_fusion_*``, written by
``tests/fixtures/make_interop_fixtures.py`` with AdapterHub 1.3 in the bench environment) hold
the two adapters, the fusion (safetensors, and a pickled copy), the batch and AdapterHub's logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from adapterkit import AdapterError, AdapterModel, Fuse
from adapterkit.errors import CheckpointError
from adapterkit.composition.fuse import FusionConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "interop"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "fusion_case.json").is_file())


def with_adapters(case: str) -> tuple[AdapterModel, dict]:
    folder = FIXTURES / case
    base = T.AutoModel.from_pretrained(FIXTURES / "bases" / "bert", local_files_only=True).eval()
    model = AdapterModel(base)
    for name in json.loads((folder / "fusion_case.json").read_text())["adapters"]:
        model.load_adapter(folder / name)
    return model.eval(), load_file(str(folder / "expected.safetensors"))


def logits(model: AdapterModel, expected: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits


def test_there_are_fusion_fixtures():
    assert {"ah_fusion_bert_dynamic", "ah_fusion_bert_residual_before"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_adapterhub_fusion_gives_adapterhubs_logits(case):
    model, expected = with_adapters(case)
    fuse = model.load_adapter_fusion(FIXTURES / case / "fusion", set_active=True)
    assert fuse == Fuse("a", "b") and model.active_head == "b"
    assert (logits(model, expected) - expected["logits"]).abs().max().item() <= 1e-5
    model.set_active_adapters("b")  # the fusion matters: b alone gives other logits
    assert (logits(model, expected) - expected["logits"]).abs().max().item() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_our_fusion_exported_to_adapterhubs_layout_loads_back_identically(case, tmp_path):
    model, expected = with_adapters(case)
    model.load_adapter_fusion(FIXTURES / case / "fusion", set_active=True)
    model.save_adapter_fusion(tmp_path / "ah", Fuse("a", "b"), format="adapterhub")
    theirs, ours = (load_file(str(d / "model_adapter_fusion.safetensors")) for d in (FIXTURES / case / "fusion",
                                                                                   tmp_path / "ah"))
    assert set(theirs) == set(ours)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value)
    config = json.loads((tmp_path / "ah" / "adapter_fusion_config.json").read_text())
    assert config["adapter_names"] == ["a", "b"] and config["name"] == "a,b"
    fresh, _ = with_adapters(case)
    fresh.load_adapter_fusion(tmp_path / "ah", set_active=True)
    assert (logits(fresh, expected) - expected["logits"]).abs().max().item() <= 1e-5


def test_a_pickled_fusion_is_refused_naming_the_fix():
    model, _ = with_adapters(CASES[0])
    with pytest.raises(CheckpointError, match=r"pickled.*use_safetensors=True"):
        model.load_adapter_fusion(FIXTURES / CASES[0] / "fusion_bin")
    assert len(model.fusions) == 0 and model.active_adapters is None


@pytest.mark.parametrize("edit, match", [
    ({"temperature": True}, "anneals the softmax temperature"),
    ({"query": False}, "'query' = False has no adapterkit counterpart"),
    ({"new_option": 1}, "unknown fusion option"),
])
def test_adapterhub_fusion_options_without_a_counterpart_are_refused(edit, match, tmp_path):
    folder = shutil.copytree(FIXTURES / CASES[0] / "fusion", tmp_path / "fusion")
    data = json.loads((folder / "adapter_fusion_config.json").read_text())
    data["config"].update(edit)
    (folder / "adapter_fusion_config.json").write_text(json.dumps(data))
    model, _ = with_adapters(CASES[0])
    with pytest.raises(CheckpointError, match=match):
        model.load_adapter_fusion(folder)
    assert len(model.fusions) == 0


@pytest.mark.parametrize("config, match", [
    ({"temperature": 0.5}, "no temperature 0.5"),
    ({"reg_weight": 0.1}, "weight 0.01"),
])
def test_export_refuses_what_adapterhub_cannot_express_and_writes_nothing(config, match, tmp_path):
    model, _ = with_adapters(CASES[0])
    model.add_adapter_fusion(Fuse("a", "b"), FusionConfig(**config))
    with pytest.raises(AdapterError, match=match):
        model.save_adapter_fusion(tmp_path / "out", Fuse("a", "b"), format="adapterhub")
    assert not (tmp_path / "out").exists()
