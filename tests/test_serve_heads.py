"""Per-example heads: ``model(..., adapter_names=names, routed_heads=True)`` runs the body once and
each example's own head, and equals each example alone with its adapter and head."""

import pytest
import torch
import transformers

from adapterkit import AdapterModel
from adapterkit.errors import AdapterError
from adapterkit.heads import RoutedHeadsOutput


def _model() -> AdapterModel:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    model = AdapterModel(transformers.BertModel(cfg))
    model.add_adapter("sent", "pfeiffer")
    model.add_classification_head("sent", num_labels=2)
    model.add_adapter("topic", "lora", r=4)
    model.add_classification_head("topic", num_labels=5)
    model.add_adapter("ner", "ia3")
    model.add_tagging_head("ner", num_labels=3)
    model.add_adapter("score", "pfeiffer")
    model.add_regression_head("score")
    model.add_adapter("bare", "lora")  # no head
    for p in model.adapters.parameters():  # adapters start as identity: make them matter
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def test_routed_heads_equal_each_example_alone():
    model = _model()
    ids = torch.randint(1, 100, (6, 7))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    names = ["sent", "topic", "ner", None, "score", "bare"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, adapter_names=names, routed_heads=True)
        assert isinstance(out, RoutedHeadsOutput)
        assert out.head_names == ["sent", "topic", "ner", None, "score", None]
        assert [None if t is None else tuple(t.shape) for t in out.logits] == [(2,), (5,), (7, 3), None, (1,), None]
        for i, name in enumerate(names):
            if out.head_names[i] is None:
                continue
            model.set_active_adapters(name)
            alone = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], head=name).logits[0]
            torch.testing.assert_close(out.logits[i], alone, atol=1e-5, rtol=1e-5)
        model.set_active_adapters(None)
        base = model.model(input_ids=ids[3:4], attention_mask=mask[3:4]).last_hidden_state[0]
        torch.testing.assert_close(out.hidden_states[3], base, atol=1e-5, rtol=1e-5)


def test_routed_heads_bad_calls():
    model = _model()
    ids = torch.randint(1, 100, (2, 5))
    with pytest.raises(AdapterError, match="adapter_names"):
        model(input_ids=ids, routed_heads=True)
    with pytest.raises(AdapterError, match="labels"):
        model(input_ids=ids, adapter_names=["sent", "topic"], labels=torch.tensor([0, 1]), routed_heads=True)
    with pytest.raises(AdapterError, match="No adapter named"):
        model(input_ids=ids, adapter_names=["sent", "nope"], routed_heads=True)
