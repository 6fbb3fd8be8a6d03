"""Prefix tuning that can learn (``methods/prefix_tuning.py``): prefixes initialised from the keys
and values the model computes for a real text (Li & Liang sec. 5.2), or at zero; saved flat and
loaded without the text."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from helpers import make_batch, run

from adapterkit import AdapterError, AdapterModel
from adapterkit.loader import load_tokenizer

TEXT = "the movie was wonderful"
VOCAB = 30522  # all-MiniLM-L6-v2's tokenizer ("minilm")


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, pad_token_id=0)).eval()


def test_from_string_prefixes_are_the_models_own_keys_and_values():
    """Each layer's prefix equals the KV cache the model fills for the text (after the rotary embedding)."""
    base = tiny_llama()
    ids = load_tokenizer("minilm")(TEXT, add_special_tokens=False)["input_ids"]
    p = 7
    ids = (ids * 3)[:p]  # repeated, then cut (PEFT's rule)
    with torch.no_grad():
        cache = base(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    model = AdapterModel(base)
    model.add_adapter("p", "prefix_tuning", prefix_length=p, flat=True, prefix_init="from_string",
                      prefix_init_text=TEXT, tokenizer_name_or_path="minilm", set_active=True)
    unit = next(m for m in model.adapters["p"].modules() if hasattr(m, "prefix"))
    for layer in range(3):
        k, v = cache.layers[layer].keys, cache.layers[layer].values  # (1, H_kv, P, d)
        want = torch.stack([t[0].transpose(0, 1).reshape(p, -1) for t in (k, v)])
        assert (unit.prefix[layer] - want).abs().max() <= 1e-6
    assert model.records["p"].config.prefix_init == "from_string"


def test_from_string_adapter_saves_flat_and_loads_without_the_text(tmp_path):
    base = tiny_llama()
    model = AdapterModel(base)
    model.add_adapter("p", "prefix_tuning", prefix_length=4, flat=True, prefix_init="from_string",
                      prefix_init_text=TEXT, tokenizer_name_or_path="minilm", set_active=True)
    batch = make_batch()
    out = run(model, batch)
    assert (out - run(tiny_llama(), batch)).abs().max() > 1e-4  # the prefix is attended to
    model.save_adapter(tmp_path / "p", "p")
    again = AdapterModel(tiny_llama())
    name = again.load_adapter(tmp_path / "p", set_active=True)
    assert again.records[name].config.prefix_init == "random" and again.records[name].config.prefix_init_text is None
    assert torch.equal(run(again, batch), out)


@pytest.mark.parametrize("flat", [True, False])
def test_zero_init_gives_zero_prefixes_that_train(flat):
    model = AdapterModel(tiny_llama())
    model.add_adapter("p", "prefix_tuning", prefix_length=3, bottleneck_size=8, flat=flat, prefix_init="zero",
                      set_active=True)
    unit = next(m for m in model.adapters["p"].modules() if hasattr(m, "folded"))
    assert torch.equal(unit.folded(), torch.zeros_like(unit.folded()))
    model.train_adapter("p")
    batch = make_batch()
    model(**batch).logits.square().mean().backward()
    grads = [p.grad for p in model.adapters["p"].parameters() if p.grad is not None]
    assert grads and any(g.abs().max() > 0 for g in grads)  # zero keys and values still get a gradient


def test_from_string_bad_input_is_refused():
    model = AdapterModel(tiny_llama())
    with pytest.raises(AdapterError, match="flat=True"):
        model.add_adapter("p", "prefix_tuning", prefix_init="from_string", prefix_init_text=TEXT)
    with pytest.raises(AdapterError, match="prefix_init='warm' is unknown"):
        model.add_adapter("p", "prefix_tuning", prefix_init="warm")
    with pytest.raises(AdapterError, match="needs a tokenizer"):
        model.add_adapter("p", "prefix_tuning", flat=True, prefix_init="from_string", prefix_init_text=TEXT)
    assert list(model.adapters) == []


