"""AdapterHub code runs after changing one import line: the quickstart and the training example
of docs/sharing.md run here as written (on a tiny BERT, with the Hub served on 127.0.0.1)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from sharing_helpers import hub_server

import adapterkit as adapters
from adapterkit import AdapterModel
from adapterkit.errors import AdapterError, CheckpointError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "interop"
WORDS = ["this", "works", "great", "!", "a", "fine", "film", "dull", "and", "long"]


def doc_block(index: int) -> str:
    text = (ROOT / "docs" / "sharing.md").read_text()
    section = text.split("## Moving over from AdapterHub")[1]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)[index]


@pytest.fixture
def base(tmp_path) -> Path:
    """The interop fixtures' tiny BERT (vocabulary 100) with a matching WordPiece tokenizer."""
    folder = tmp_path / "bert"
    shutil.copytree(FIXTURES / "bases" / "bert", folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    T.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_adapterhub_quickstart_runs_with_one_import_changed(base, tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub"
    shutil.copytree(FIXTURES / "ah_bert_seqbn_cls" / "adapter", hub / "AdapterHub" / "bert-tiny-pf-sst2")
    namespace = {"BASE": str(base)}
    with hub_server(hub) as (url, seen):
        monkeypatch.setenv("HF_ENDPOINT", url)
        exec(compile(doc_block(0), "docs/sharing.md quickstart", "exec"), namespace)  # noqa: S102 - the doc example
    assert any("/AdapterHub/bert-tiny-pf-sst2/resolve/main/" in path for path, _ in seen)
    # the same logits as the adapter loaded from its folder
    local = AdapterModel.from_pretrained(str(base))
    local.load_adapter(FIXTURES / "ah_bert_seqbn_cls" / "adapter", set_active=True)
    local.eval()
    tokenizer = T.AutoTokenizer.from_pretrained(base)
    want = local(**tokenizer("This works great!", return_tensors="pt")).logits  # with autograd, as the quickstart
    assert torch.equal(namespace["outputs"].logits, want)
    assert "tensor(" in capsys.readouterr().out


def test_adapterhub_training_example_runs_with_one_import_changed(base, tmp_path):
    tokenizer = T.AutoTokenizer.from_pretrained(base)
    train = [{**tokenizer(text, padding="max_length", max_length=8), "labels": label} for text, label in
             [("a fine film", 1), ("dull and long", 0), ("this works great !", 1), ("long and dull", 0)] * 4]
    namespace = {"BASE": str(base), "OUT": str(tmp_path / "out"), "TRAIN": train}
    torch.manual_seed(0)
    exec(compile(doc_block(1), "docs/sharing.md training", "exec"), namespace)  # noqa: S102 - the doc example
    model = namespace["model"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("adapterkit_adapters.rotten_tomatoes.") for n in trained)
    fresh = T.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    for name, p in fresh.named_parameters():  # the base (and its head) did not change
        if not name.startswith("classifier"):
            assert torch.equal(p, dict(model.named_parameters())[name])
    assert (tmp_path / "out" / "rotten_tomatoes" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-4" / "rotten_tomatoes" / "adapter_model.safetensors").is_file()
    # the saved adapter loads back: the same outputs as the trained model (its head copied over)
    x = tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        want = model(**x).logits
    fresh.classifier.load_state_dict(model.classifier.state_dict())
    adapters.init(fresh)
    fresh.load_adapter(str(tmp_path / "out" / "rotten_tomatoes"), set_active=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, want)


def test_hub_names_without_source_and_retired_sources_are_refused_with_the_fix(base):
    model = AdapterModel.from_pretrained(str(base))
    with pytest.raises(CheckpointError, match="hf://nli/multinli"):
        model.load_adapter("nli/multinli@ukp")
    with pytest.raises(AdapterError, match="retired"):
        model.load_adapter("sentiment/sst-2@ukp", source="ah")
    assert not model.adapters
