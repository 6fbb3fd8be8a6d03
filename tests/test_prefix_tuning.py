"""Prefix tuning (issue 12): what the shared invariant tester does not cover.

* the function: equal to the same keys and values given as a KV-cache prefix (PEFT's way) on
  GPT-2 and on Llama with grouped-query attention; no relative position bias on T5's prefix columns;
  eager and sdpa agree;
* ``generate()`` with the KV cache gives the tokens of recomputing the whole sequence every step;
* per-example routing with prefixes of different lengths and rows without one;
* the composition semantics (a prefix counted twice = its keys and values twice);
* the reparametrisation: folded at inference, saved folded (safetensors, ``flat=True``), trained on
  after loading;
* bad input: clear errors, model unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from torch import nn

from adapterkit import AdapterError, AdapterModel, Average, Fuse, Stack
from adapterkit.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from helpers import ARCHS, Snapshot, make_base, make_batch, perturb, run, total_hooks

SMALL = {"prefix_length": 4, "bottleneck_size": 16}


def with_prefix(arch: str, name: str = "p", seed: int = 0, attn: str | None = None, lm: bool = False,
                **options) -> AdapterModel:
    """A tiny ``arch`` with prefix adapter ``name`` active (``lm``: T5 with its LM head, for generate)."""
    torch.manual_seed(seed)
    config = ARCHS[arch].config()
    if attn is not None:
        config._attn_implementation = attn
    auto = T.AutoModelForSeq2SeqLM if lm and ARCHS[arch].encoder_decoder else ARCHS[arch].auto
    model = AdapterModel(auto.from_config(config).eval())
    model.add_adapter(name, "prefix_tuning", set_active=True, **{**SMALL, **options})
    return model.eval()


def unit(model: AdapterModel, name: str = "p", index: int = 0) -> PrefixTuning:
    return list(model.adapters[name].values())[index]


def as_cache(prefix: torch.Tensor, heads: int, config) -> T.DynamicCache:
    """Each layer's keys and values ``(layers, 2, P, H_kv * d)`` as a KV cache of batch 4 (PEFT's prefixes)."""
    cache = T.DynamicCache(config=config)
    for layer, kv in enumerate(prefix):
        k, v = (t.view(t.shape[0], heads, -1).transpose(0, 1).expand(4, -1, -1, -1) for t in kv)
        cache.update(k.contiguous(), v.contiguous(), layer)
    return cache


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@torch.no_grad()
def test_equals_the_same_prefix_given_as_past_key_values(arch):
    """Keys prepended after the rotary embedding and the cache = a cache that already holds them;
    on Llama the prefix has num_key_value_heads (2) heads, not the 4 query heads."""
    model = with_prefix(arch)
    batch = make_batch()
    prefix = unit(model).folded()
    heads = model.config.num_key_value_heads if arch == "llama" else model.config.num_attention_heads
    assert prefix.shape == (4, 2, 4, heads * 8) and heads < model.config.num_attention_heads or arch == "gpt2"
    mask = torch.cat([torch.ones(4, 4, dtype=torch.long), batch["attention_mask"]], dim=1)
    positions = torch.arange(7).expand(4, -1)  # GPT-2's positions are absolute: the prefix takes none
    with model.disable_adapters():
        reference = model.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                                cache=as_cache(prefix, heads, model.config)).logits
    ours = run(model, batch)
    real = batch["attention_mask"].bool()
    assert (ours - reference)[real].abs().max() <= 1e-5
    assert (ours - run(make_base(ARCHS[arch]), batch))[real].abs().max() > 1e-3


@torch.no_grad()
def test_t5_prefix_columns_get_no_relative_position_bias():
    """With zero prefix keys every prefix column scores 0: equal weights across the prefix in each
    row (T5's bias differs with the distance, so a biased prefix would not be flat)."""
    model = with_prefix("t5", attn="eager", flat=True)
    for unit_ in model.adapters["p"].values():
        unit_.prefix.data[:, 0] = 0.0  # keys
    batch = make_batch(arch=ARCHS["t5"])
    out = model(**batch, output_attentions=True)
    for attentions in (out.encoder_attentions, out.decoder_attentions, out.cross_attentions):
        for weights in attentions:  # (B, H, q, P + k)
            prefix = weights[..., :4]
            assert torch.allclose(prefix, prefix[..., :1].expand_as(prefix), atol=1e-7)
            assert prefix.min() > 0
    base_bias = model.model.encoder.block[0].layer[0].SelfAttention.compute_bias(7, 7)
    assert base_bias.std() > 0  # the model does have a relative position bias


@pytest.mark.parametrize("arch", ["bert", "llama", "t5", "bart"])
@torch.no_grad()
def test_eager_and_sdpa_agree(arch):
    batch = make_batch(arch=ARCHS[arch])
    sdpa, eager = run(with_prefix(arch, attn="sdpa"), batch), run(with_prefix(arch, attn="eager"), batch)
    assert (sdpa - eager).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
@torch.no_grad()
def test_generate_with_cache_equals_recomputing_every_step(arch):
    model = with_prefix(arch, lm=True)
    perturb(model.adapters, scale=1.0, seed=3)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if not ARCHS[arch].encoder_decoder:
        mask[1, :2] = 0  # left padding on the decoders
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(**options, use_cache=True)
    assert torch.equal(cached, model.generate(**options, use_cache=False))
    with model.disable_adapters():
        assert not torch.equal(cached, model.generate(**options))  # the prefix matters


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
@torch.no_grad()
def test_routed_generate_equals_each_prompt_alone(arch):
    model = with_prefix(arch, name="p", lm=True)
    model.add_adapter("q", "prefix_tuning", prefix_length=2, bottleneck_size=8)
    perturb(model.adapters, scale=1.0, seed=5)
    ids = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(2))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    names = ["q", None, "p"]
    routed = model.generate(input_ids=ids, adapter_names=names, **options)
    for i, name in enumerate(names):
        model.set_active_adapters(name)
        assert torch.equal(routed[i], model.generate(input_ids=ids[i : i + 1], **options)[0])


@pytest.mark.parametrize("arch", ["bert", "llama", "t5", "bart"])
@torch.no_grad()
def test_routing_prefixes_of_different_lengths_and_none(arch):
    model = with_prefix(arch, name="p")
    model.add_adapter("q", "prefix_tuning", prefix_length=2, bottleneck_size=8, flat=True)
    model.add_adapter("l", "lora", r=2)
    perturb(model.adapters, scale=0.3, seed=5)
    batch = make_batch(arch=ARCHS[arch])
    names = ["q", None, "p", "l"]
    routed = run(model, batch, adapter_names=names)
    for i, name in enumerate(names):
        model.set_active_adapters(name)
        one = run(model, {k: v[i : i + 1] for k, v in batch.items()})
        assert (routed[i : i + 1] - one).abs().max() <= 1e-5
    model.set_active_adapters(None)
    assert total_hooks(model) == 0 and model.model.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_a_prefix_counted_twice_is_its_keys_and_values_twice():
    """Stack(p, p) weighs p's columns 2 (log 2 on the mask): exactly a prefix holding p's twice."""
    model = with_prefix("llama")
    batch = make_batch()
    model.set_active_adapters(Stack("p", "p"))
    twice = run(model, batch)
    model.add_adapter("pp", "prefix_tuning", prefix_length=8, flat=True, set_active=True)
    unit(model, "pp").prefix.data.copy_(unit(model, "p").folded().repeat(1, 1, 2, 1))
    assert (run(model, batch) - twice).abs().max() <= 1e-5
    model.set_active_adapters(Average("p", "p"))
    average = run(model, batch)
    model.set_active_adapters("p")
    assert (average - run(model, batch)).abs().max() <= 1e-6


def test_folded_at_inference_saved_folded_and_trained_on_after_loading(tmp_path):
    model = with_prefix("gpt2", dropout=0.1)
    batch = make_batch()
    p = unit(model)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        training = run(model, batch)  # through the MLP, dropout on
    model.eval()
    folded = run(model, batch)
    assert not torch.equal(training, folded)
    assert p._folded is not None and torch.equal(p.folded(), torch.stack([p._layer(i) for i in range(4)]))
    perturb(model.adapters, scale=0.1, seed=2)  # a weight change refolds
    assert not torch.equal(run(model, batch), folded)
    folded = run(model, batch)

    model.save_adapter(tmp_path / "p", "p")
    tensors = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert list(tensors) == ["adapter.layers-self_attention.prefix"]
    assert tensors["adapter.layers-self_attention.prefix"].shape == (4, 2, 4, 32)
    saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert saved["config"]["flat"] is True and saved["config"]["bottleneck_size"] == 16

    again = AdapterModel(make_base(ARCHS["gpt2"]))
    again.load_adapter(tmp_path / "p", set_active=True)
    assert torch.equal(run(again.eval(), batch), folded)
    again.train_adapter("p")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    again(**batch, labels=labels).loss.backward()
    grads = {n for n, q in again.named_parameters() if q.grad is not None}
    assert grads == {"adapters.p.layers-self_attention.prefix"}


def test_add_adapter_by_method_name_and_presets():
    model = AdapterModel(make_base(ARCHS["bert"]))
    model.add_adapter("p", config="prefix_tuning")
    assert model.records["p"].config == PrefixTuningConfig()
    assert unit(model).control_trans[2].out_features == 4 * 2 * 32 and unit(model).wte.weight.shape == (30, 32)
    model.add_adapter("f", "prefix_tuning_flat")
    assert model.records["f"].config.flat and unit(model, "f").prefix.shape == (4, 2, 30, 32)
    model.add_adapter("d", "prefix_tuning", layers=[1, 3], prefix_length=2, bottleneck_size=4)
    assert unit(model, "d").layers == (1, 3) and unit(model, "d").control_trans[2].out_features == 2 * 2 * 32


def test_encoder_decoder_options_choose_the_sites():
    model = AdapterModel(make_base(ARCHS["t5"]))
    model.add_adapter("all", "prefix_tuning", **SMALL)
    model.add_adapter("dec", "prefix_tuning", encoder_prefix=False, cross_prefix=False, **SMALL)
    assert [s.place_id for s in model.records["all"].sites] == [
        "encoder.layers.self_attention", "decoder.layers.self_attention", "decoder.layers.cross_attention"]
    assert [s.place_id for s in model.records["dec"].sites] == ["decoder.layers.self_attention"]
    assert unit(model, "all", 2).shape == (4, 2, 4, 4 * 6)  # T5: 4 heads of d_kv 6


class _PlainSelfAttention(nn.Module):
    """A BERT self-attention computed by hand, as models whose attention bypasses the interface do."""

    def __init__(self, inner):
        super().__init__()
        self.query, self.key, self.value = inner.query, inner.key, inner.value

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        q, k, v = self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)
        weights = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, -1)
        return weights @ v, None


@pytest.mark.parametrize("make,options,match", [
    (lambda: make_base(ARCHS["bert"]), {"prefix_length": 0}, "prefix_length must be a positive"),
    (lambda: make_base(ARCHS["bert"]), {"bottleneck_size": -1}, "bottleneck_size must be positive"),
    (lambda: make_base(ARCHS["bert"]), {"strategy": "gate"}, "strategy 'add' or 'scaled_add'"),
    (lambda: make_base(ARCHS["bert"]), {"stochastic_depth": 0.1}, "leave stochastic_depth and l2_lambda at 0"),
    (lambda: make_base(ARCHS["bert"]), {"target_modules": ["query"]}, "drop target_modules"),
    (lambda: make_base(ARCHS["bert"]), {"layers": [9]}, r"layers=\[9\] is out of range"),
    (lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)), {}, "has no layout"),
])
def test_bad_options_and_models_are_refused_with_the_model_unchanged(make, options, match):
    torch.manual_seed(0)
    model = AdapterModel(make().eval())
    model.add_adapter("l", "lora", r=2, target_modules=["0"] if isinstance(model.model, nn.Sequential) else None,
                      set_active=True)
    batch = {"x": torch.randn(2, 4)} if isinstance(model.model, nn.Sequential) else make_batch()
    if "x" in batch:
        before = model(batch["x"]).clone()
        with pytest.raises(AdapterError, match=match):
            model.add_adapter("p", "prefix_tuning", **options)
        assert list(model.adapters) == ["l"] and torch.equal(model(batch["x"]), before)
        return
    snapshot = Snapshot.of(model, batch)
    with pytest.raises(AdapterError, match=match):
        model.add_adapter("p", "prefix_tuning", **options)
    snapshot.assert_unchanged(model)


def test_another_attention_implementation_is_refused():
    model = AdapterModel(make_base(ARCHS["bert"]))
    model.config._attn_implementation = "flex_attention"  # not run here: compiling flex is slow on a CPU
    with pytest.raises(AdapterError, match=r"uses \['flex_attention'\]. Load the model with attn_implementation='sdpa'"):
        model.add_adapter("p", "prefix_tuning")
    assert not model.adapters and model.config._attn_implementation == "flex_attention"


def test_attention_outside_the_interface_is_refused_naming_the_layout():
    base = make_base(ARCHS["bert"])
    for layer in base.encoder.layer:
        layer.attention.self = _PlainSelfAttention(layer.attention.self)
    model = AdapterModel(base)
    batch = make_batch()
    snapshot = Snapshot.of(model, batch)
    with pytest.raises(AdapterError, match=r"bert layout\) does not go through transformers' AttentionInterface "
                                           r"\(encoder\.layer\.0\.attention\.self"):
        model.add_adapter("p", "prefix_tuning")
    snapshot.assert_unchanged(model)


def test_fuse_refuses_prefix_adapters():
    model = with_prefix("bert")
    model.add_adapter("q", "prefix_tuning", **SMALL)
    with pytest.raises(AdapterError, match="use Stack instead"):
        model.add_adapter_fusion(Fuse("p", "q"))
    assert not model.fusions


# -- PEFT prefix tuning (interop/peft_prefix.py) ------------------------------------------------------
def _peft_logits(folder, batch) -> torch.Tensor:
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(make_base(ARCHS["llama"]), folder).eval()(**batch).logits


@pytest.mark.parametrize("projection", [True, False])
def test_a_peft_prefix_loads_with_peft_s_logits(projection, tmp_path):
    """PEFT's prefixes enter as past key values and shift the positions; on a rotary Llama with
    grouped-query attention that is the same function as adapterkit's."""
    peft = pytest.importorskip("peft")
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection,
                                     encoder_hidden_size=16)
    source = peft.get_peft_model(make_base(ARCHS["llama"]), config)
    perturb(source.prompt_encoder, scale=0.5, seed=3)
    source.save_pretrained(tmp_path / "peft")
    batch = make_batch()
    expected = _peft_logits(tmp_path / "peft", batch)
    model = AdapterModel(make_base(ARCHS["llama"]))
    assert model.load_adapter(tmp_path / "peft", load_as="p", set_active=True) == "p"
    assert model.records["p"].config == PrefixTuningConfig(prefix_length=4, flat=True)
    real = batch["attention_mask"].bool()
    assert (run(model.eval(), batch) - expected)[real].abs().max() <= 1e-5


def test_an_adapterkit_prefix_exports_to_peft_with_the_same_logits(tmp_path):
    model = with_prefix("llama")
    perturb(model.adapters, scale=0.3, seed=4)
    model.save_adapter(tmp_path / "peft", "p", format="peft")
    batch = make_batch()
    real = batch["attention_mask"].bool()
    assert (_peft_logits(tmp_path / "peft", batch) - run(model, batch))[real].abs().max() <= 1e-5
    again = AdapterModel(make_base(ARCHS["llama"]))
    again.load_adapter(tmp_path / "peft", load_as="p", set_active=True)
    assert (run(again.eval(), batch) - run(model, batch)).abs().max() <= 1e-5  # keys rotated by +P and back


def test_peft_prefix_conversion_is_refused_where_positions_would_differ(tmp_path):
    model = with_prefix("gpt2")
    with pytest.raises(AdapterError, match="shifts the tokens' positions on this gpt2 model"):
        model.save_adapter(tmp_path / "peft", "p", format="peft")
    assert not (tmp_path / "peft").exists()
    model = with_prefix("llama", layers=[0, 1])
    with pytest.raises(AdapterError, match=r"PEFT has no counterpart for the prefix_tuning option\(s\) layers"):
        model.save_adapter(tmp_path / "peft", "p", format="peft")


@torch.no_grad()
def test_adapterdrop_skip_layers_turns_the_prefix_off_in_those_layers():
    model = with_prefix("llama", flat=True)
    perturb(model.adapters, scale=0.5, seed=2)
    batch = make_batch()
    model.set_active_adapters("p", skip_layers=[0, 1])
    skipped = run(model, batch)
    model.add_adapter("upper", "prefix_tuning", prefix_length=4, flat=True, layers=[2, 3], set_active=True)
    unit(model, "upper").prefix.data.copy_(unit(model, "p").prefix.data[2:])
    assert torch.equal(run(model, batch), skipped)
    assert not torch.equal(run(model, batch, adapter_names=["p"] * 4), skipped)  # routing ignores skip_layers


@torch.no_grad()
def test_a_deep_copy_keeps_its_prefix_and_switches_back_on_its_own():
    import copy

    model = with_prefix("gpt2")
    batch = make_batch()
    twin = copy.deepcopy(model)
    assert torch.equal(run(twin, batch), run(model, batch))
    twin.set_active_adapters(None)
    assert twin.model.config._attn_implementation == "sdpa"
    assert torch.equal(run(twin, batch), run(make_base(ARCHS["gpt2"]), batch))
    assert model.model.config._attn_implementation == "adapterkit_prefix_sdpa"
