"""A PEFT folder whose config does not declare its weights is refused, naming them.

PEFT builds adapter layers only on the modules its config targets, with the config's ranks, and
never applies other weights in the file; adapterkit reads the sites from the tensors, so it used
to apply weights PEFT would not (8.7e-2 away from PEFT's logits, silently). ``peft_targets``
decides as PEFT does; the reference test checks it against PEFT's own function."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapterkit import AdapterModel, CheckpointError
from adapterkit.interop.peft_targets import targeted
from test_interop import FIXTURES, fixture, load_base, logits_of


DROP = object()  # a change that takes the option out of the config (PEFT then uses its default)


def folder_with(tmp_path: Path, name: str, **changes) -> Path:
    folder = Path(shutil.copytree(FIXTURES / name / "adapter", tmp_path / name))
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update({k: v for k, v in changes.items() if v is not DROP})
    for key in [k for k, v in changes.items() if v is DROP]:
        del config[key]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


LORA, IA3 = "peft_bert_lora_cls", "peft_bert_ia3_tagging"
DORA, VERA = "peft_bert_dora_cls", "peft_bert_vera_cls"  # use_dora (r=4, value 2); VeRA r=8
Q0 = "'bert.encoder.layer.0.attention.self.query'"
LIES = {
    # name: (fixture, config changes, words of the refusal)
    "target_modules names another module": (LORA, {"target_modules": ["key"]}, [Q0, "['key']", "do not name"]),
    "a subset of the targets": (LORA, {"target_modules": ["query", "output.dense"]},
                                ["'bert.encoder.layer.0.attention.self.value'", "do not name"]),
    "a regex that misses some": (LORA, {"target_modules": r".*\.query"}, ["output.dense'", "value'"]),
    "layers_to_transform leaves out a layer": (LORA, {"layers_to_transform": [0]},
                                               ["'bert.encoder.layer.1.attention", "layers_to_transform [0]"]),
    "layers_pattern that matches no layer": (LORA, {"layers_to_transform": [0, 1], "layers_pattern": "blocks"},
                                             [Q0, "do not name"]),
    "a false r absorbed into rank_pattern": (LORA, {"r": 8, "rank_pattern": {}},
                                             ["weights of rank 4", "r / rank_pattern say 8"]),
    "a false rank_pattern": (LORA, {"rank_pattern": {"value": 3}}, ["weights of rank 2", "say 3"]),
    "exclude_modules takes a target out": (LORA, {"exclude_modules": ["value"]}, ["self.value'", "do not name"]),
    "IA3 feedforward_modules left out": (IA3, {"feedforward_modules": []}, ["IA3 vectors", "scale the input"]),
    "IA3 targets that miss key": (IA3, {"target_modules": ["output.dense", "value"]}, ["self.key'"]),
    # DoRA: the magnitude vectors are declared by use_dora, on the targeted modules only
    "DoRA targets that miss value": (DORA, {"target_modules": ["query", "output.dense"]},
                                     ["self.value'", "do not name"]),
    "DoRA vectors under use_dora false": (DORA, {"use_dora": False}, ["DoRA magnitude vectors", "use_dora is false"]),
    "DoRA vectors with use_dora left out": (DORA, {"use_dora": DROP}, ["lora_magnitude_vector", "use_dora=true"]),
    "DoRA a false rank_pattern": (DORA, {"rank_pattern": {}}, ["weights of rank 2", "say 4"]),
    # VeRA: the same targets, one r for all (VeraConfig has no rank_pattern)
    "VeRA targets that miss value": (VERA, {"target_modules": ["query", "output.dense"]},
                                     ["self.value'", "do not name"]),
    "VeRA layers_to_transform leaves out a layer": (VERA, {"layers_to_transform": [1]},
                                                    ["'bert.encoder.layer.0.attention", "layers_to_transform [1]"]),
    "VeRA a false r": (VERA, {"r": 4}, ["weights of rank 8", "its r says 4"]),
    "VeRA's default r (256) when r is left out": (VERA, {"r": DROP}, ["weights of rank 8", "its r says 256"]),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_weights_the_config_does_not_declare_are_refused(lie, tmp_path):
    name, changes, words = LIES[lie]
    case, _, _ = fixture(name)
    model = AdapterModel(load_base(case))
    with pytest.raises(CheckpointError) as err:
        model.load_adapter(folder_with(tmp_path, name, **changes))
    message = str(err.value)
    assert all(w in message for w in words) and "PEFT would not apply them" in message, message
    assert not model.adapters and not model.heads  # nothing half loaded


TRUTHS = {
    "a superset (PEFT's extra layers start as no-ops)": {"target_modules": ["query", "value", "output.dense", "key"]},
    "the same targets as a regex": {"target_modules": r".*\.(query|value|output\.dense)"},
    "layers_to_transform naming every layer": {"layers_to_transform": [0, 1], "layers_pattern": "layer"},
}


METHOD_TRUTHS = {
    "DoRA: a superset": (DORA, {"target_modules": ["query", "value", "output.dense", "key"]}),
    "DoRA: its own config": (DORA, {}),
    "VeRA: a superset (same widths, so the same shared matrices)": (VERA, {"target_modules": ["query", "value",
                                                                                                "output.dense", "key"]}),
    "VeRA: the targets as a regex, every layer named": (VERA, {"target_modules": r".*\.(query|value|output\.dense)",
                                                                "layers_to_transform": [0, 1]}),
}


@pytest.mark.parametrize("truth", sorted(TRUTHS) + sorted(METHOD_TRUTHS))
def test_configs_that_declare_the_weights_load_with_the_peers_logits(truth, tmp_path):
    name, changes = METHOD_TRUTHS[truth] if truth in METHOD_TRUTHS else (LORA, TRUTHS[truth])
    case, expected, _ = fixture(name)
    model = AdapterModel(load_base(case))
    model.load_adapter(folder_with(tmp_path, name, **changes), set_active=True)
    assert (logits_of(model, expected) - expected["logits"]).abs().max().item() <= 1e-5


KEYS = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value",
        "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.0.output.dense", "classifier",
        "model.layers.3.mlp.experts.0.up_proj", "bert.pooler.dense"]
CONFIGS = [
    {"target_modules": ["query", "value"]},
    {"target_modules": ["output.dense"], "layers_to_transform": [1]},
    {"target_modules": ["dense"], "layers_to_transform": 0, "layers_pattern": "layer"},
    {"target_modules": ["up_proj"], "layers_to_transform": [3]},
    {"target_modules": r".*attention.*"},
    {"target_modules": ["dense", "query"], "exclude_modules": ["pooler.dense"]},
    {"target_modules": ["dense", "classifier"], "modules_to_save": ["classifier"]},
    {"target_modules": ["bert.pooler.dense"]},
]


@pytest.mark.parametrize("config", CONFIGS, ids=[json.dumps(c) for c in CONFIGS])
def test_targets_are_decided_as_peft_decides(config):
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    reference = peft.LoraConfig(**config)
    for key in KEYS:
        assert targeted(config, key) == bool(check_target_module_exists(reference, key)), key
