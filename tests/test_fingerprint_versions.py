"""The base fingerprint covers every parameter an adapter can touch or read (version 2), and
checkpoints that recorded a version-1 fingerprint (transformer blocks only) keep loading."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from adapterkit import AdapterModel, CheckpointError
from adapterkit.fingerprint import base_fingerprint

CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)


def _bert(cls=T.BertModel, dtype=torch.float32) -> T.PreTrainedModel:
    torch.manual_seed(0)
    return cls(T.BertConfig(**CFG)).to(dtype).eval()


def _saved(tmp_path, model: AdapterModel, name: str) -> dict:
    model.save_adapter(tmp_path / name, name)
    return json.loads((tmp_path / name / "adapter_config.json").read_text())


def test_lora_on_the_embeddings_is_refused_on_a_base_with_other_embeddings(tmp_path):
    model = AdapterModel(_bert())
    model.add_adapter("emb", "lora", roles=["embeddings"])
    meta = _saved(tmp_path, model, "emb")
    assert meta["base_model"]["fingerprint_version"] == 2
    other = AdapterModel(_bert())
    with torch.no_grad():
        other.model.embeddings.word_embeddings.weight.mul_(2)  # the blocks are the same
    with pytest.raises(CheckpointError, match="another base model.*strict_base=False"):
        other.load_adapter(tmp_path / "emb")
    assert len(other.adapters) == 0
    assert other.load_adapter(tmp_path / "emb", strict_base=False) == "emb"
    AdapterModel(_bert()).load_adapter(tmp_path / "emb")  # the same base loads


def test_a_final_norm_or_pooler_difference_is_seen_too():
    a, b = AdapterModel(_bert()), AdapterModel(_bert())
    assert base_fingerprint(a.model, a.layout) == base_fingerprint(b.model, b.layout)
    with torch.no_grad():
        b.model.pooler.dense.bias.add_(1.0)
    assert base_fingerprint(a.model, a.layout) != base_fingerprint(b.model, b.layout)
    assert base_fingerprint(a.model, a.layout, version=1) == base_fingerprint(b.model, b.layout, version=1)


def test_the_wrapper_class_and_bfloat16_do_not_matter():
    plain = AdapterModel(_bert())
    fp = base_fingerprint(plain.model, plain.layout)
    classifier = _bert(T.BertForSequenceClassification)
    classifier.bert.load_state_dict(plain.model.state_dict())
    wrapped = AdapterModel(classifier)
    assert base_fingerprint(wrapped.model, wrapped.layout) == fp
    bf16 = AdapterModel(_bert(dtype=torch.bfloat16))
    assert base_fingerprint(bf16.model, bf16.layout) == fp


def test_a_lora_on_an_untied_lm_head_covers_that_head(tmp_path):
    def llama() -> AdapterModel:
        torch.manual_seed(0)
        cfg = T.LlamaConfig(**CFG, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0)
        return AdapterModel(T.LlamaForCausalLM(cfg).eval())

    model = llama()
    model.add_adapter("head_lora", "lora", target_modules=["lm_head"])
    _saved(tmp_path, model, "head_lora")
    other = llama()
    with torch.no_grad():
        other.model.lm_head.weight.mul_(2)
    with pytest.raises(CheckpointError, match="another base model"):
        other.load_adapter(tmp_path / "head_lora")
    llama().load_adapter(tmp_path / "head_lora")


def test_a_version_1_checkpoint_is_checked_as_version_1(tmp_path):
    model = AdapterModel(_bert())
    model.add_adapter("old", "pfeiffer")
    meta = _saved(tmp_path, model, "old")
    del meta["base_model"]["fingerprint_version"]  # as written before versions existed
    meta["base_model"]["fingerprint"] = base_fingerprint(model.model, model.layout, version=1)
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(meta))
    assert AdapterModel(_bert()).load_adapter(tmp_path / "old") == "old"
    other_blocks = AdapterModel(_bert())
    with torch.no_grad():
        other_blocks.model.encoder.layer[0].output.dense.weight.mul_(2)
    with pytest.raises(CheckpointError, match="another base model"):
        other_blocks.load_adapter(tmp_path / "old")
