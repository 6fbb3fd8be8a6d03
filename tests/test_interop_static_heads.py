"""AdapterHub folders saved from a model with a static head (``adapters.init`` on a
``...ForSequenceClassification`` / ``...ForTokenClassification``): ``head_config.json`` has
``"config": null`` and a ``model_class``. The adapter loads in every case; the head is built where
adapterkit has its equivalent, else skipped with a warning that says why. Fixtures written by
AdapterHub 1.3 itself (``fixtures/make_interop_fixtures.py``: ``ah_*_static_*``)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from adapterkit import AdapterModel

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "interop"
STATIC = ["ah_bert_seqbn_static_cls", "ah_gpt2_seqbn_static_cls", "ah_roberta_lora_static_tagging"]


def _base(case: str, cls=T.AutoModel) -> torch.nn.Module:
    arch = json.loads((FIXTURES / case / "case.json").read_text())["base"]
    return cls.from_pretrained(FIXTURES / "bases" / arch, local_files_only=True).eval()


def _expected(case: str) -> dict:
    return load_file(str(FIXTURES / case / "expected.safetensors"))


def _run(model: AdapterModel, expected: dict, **kwargs):
    model.eval()
    with torch.no_grad():
        return model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"], **kwargs)


def _copy(case: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / case / "adapter", tmp_path / case))


@pytest.mark.parametrize("case", STATIC)
def test_static_head_becomes_the_equivalent_head(case):
    expected = _expected(case)
    model = AdapterModel(_base(case))
    name = model.load_adapter(FIXTURES / case / "adapter", set_active=True)
    assert name in model.heads
    logits, want = _run(model, expected).logits, expected["logits"]
    if want.dim() == 3:  # tagging: the real tokens
        mask = expected["attention_mask"].bool()
        logits, want = logits[mask], want[mask]
    assert (logits - want).abs().max().item() <= 1e-5
    assert model.heads[name].config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


def test_static_head_into_the_model_class_it_came_from():
    case = "ah_bert_seqbn_static_cls"
    expected = _expected(case)
    model = AdapterModel(_base(case, T.BertForSequenceClassification))  # model_class matches
    model.load_adapter(FIXTURES / case / "adapter", set_active=True)
    assert (_run(model, expected).logits - expected["logits"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", STATIC)
def test_with_head_false_loads_the_adapter_as_without_the_head_files(case, tmp_path):
    expected = _expected(case)
    stripped = _copy(case, tmp_path)
    for f in ("head_config.json", "model_head.safetensors"):
        (stripped / f).unlink()
    alone = AdapterModel(_base(case))
    alone.load_adapter(stripped, set_active=True)
    model = AdapterModel(_base(case))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        name = model.load_adapter(FIXTURES / case / "adapter", set_active=True, with_head=False)
    assert name in model.adapters and name not in model.heads
    ours, want = _run(model, expected)[0], _run(alone, expected)[0]
    assert torch.equal(ours, want)
    with model.disable_adapters():
        assert (_run(model, expected)[0] - want).abs().max() > 1e-3


@pytest.mark.parametrize("case,edit,words", [
    ("ah_bert_seqbn_static_cls", {"model_class": "BertForMultipleChoice"}, ["BertForMultipleChoice", "without it"]),
    ("ah_bert_seqbn_cls", {"config.head_type": "question_answering"}, ["question_answering", "without it"]),
    ("ah_bert_seqbn_cls", {"config.activation_function": "relu"}, ["relu", "without it"]),
], ids=["static-multiple-choice", "flex-qa", "flex-relu"])
def test_head_without_counterpart_is_skipped_with_the_reason_and_the_adapter_loads(case, edit, words, tmp_path):
    folder = _copy(case, tmp_path)
    data = json.loads((folder / "head_config.json").read_text())
    for key, value in edit.items():
        *path, last = key.split(".")
        target = data
        for part in path:
            target = target[part]
        target[last] = value
    (folder / "head_config.json").write_text(json.dumps(data))
    model = AdapterModel(_base(case))
    with pytest.warns(UserWarning) as caught:
        name = model.load_adapter(folder, set_active=True)
    message = " ".join(str(w.message) for w in caught)
    assert all(w in message for w in words), message
    assert name in model.adapters and name not in model.heads
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        AdapterModel(_base(case)).load_adapter(folder, with_head=False)  # no head asked for: nothing to say
