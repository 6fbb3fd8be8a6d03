"""AdapterHub's ``use_gating`` (LoRA, bottleneck, prefix tuning) and the UniPELT preset (issue 21).

* the gate is AdapterHub's mean over tokens in an encoder (a later token moves an earlier one's
  output) and per token in a decoder (causal: a prefix of the sequence gives the same outputs), so
  generation with a KV cache equals recomputing;
* gated prefixes are refused in decoder stacks, with the model unchanged; gated LoRA refuses merging;
* UniPELT is AdapterHub's preset; routed calls equal each example alone;
* AdapterHub loads our gated / UniPELT exports and computes our outputs (the reverse direction,
  AdapterHub's own fixtures, is ``tests/test_interop.py``: ``ah_bert_*_gated_*``, ``ah_bert_unipelt_cls``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T

from adapterkit import AdapterError, AdapterModel, resolve_config
from adapterkit.errors import CheckpointError
from adapterhub_peer import FIXTURES, assert_adapterhub_computes_ours, fixture_base
from helpers import ARCHS, Snapshot, assert_routed_equals_alone, make_base, make_batch, perturb, total_hooks

GATED = {"lora": {"r": 4, "alpha": 8.0, "use_gating": True, "roles": "all-linear"},
         "houlsby": {"use_gating": True, "reduction_factor": 4}}


def gated(arch: str, preset: str, lm: bool = False, seed: int = 0, **options) -> AdapterModel:
    torch.manual_seed(seed)
    auto = T.AutoModelForSeq2SeqLM if lm and ARCHS[arch].encoder_decoder else ARCHS[arch].auto
    model = AdapterModel(auto.from_config(ARCHS[arch].config()).eval())
    model.add_adapter("g", preset, set_active=True, **{**GATED.get(preset, {}), **options})
    perturb(model.adapters["g"], scale=1.0, seed=3)
    return model.eval()


def hidden(model: AdapterModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("preset", ["lora", "houlsby"])
def test_decoder_gate_is_per_token_so_earlier_outputs_ignore_later_tokens(preset):
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    decoder = gated("gpt2", preset)
    full, head = hidden(decoder, ids), hidden(decoder, ids[:, :4])
    assert (full[:, :4] - head).abs().max() <= 1e-5  # a mean over the call's tokens would move these
    with decoder.disable_adapters():
        assert (hidden(decoder, ids) - full).abs().max() > 1e-3  # the gated adapter matters
    gates = lambda m: {u.gate.per_token for u in m.adapters["g"].values() if u.gate is not None}  # noqa: E731
    assert gates(decoder) == {True} and gates(gated("bert", preset)) == {False}


def test_encoder_gate_equals_adapterhubs_formula():
    """One gated LoRA on BERT's query: ``sigmoid(gate(x))`` averaged over the tokens times ``B A x``,
    without ``alpha / r`` (AdapterHub's ``LoRA.forward``)."""
    model = gated("bert", "lora", roles=["q"], layers=[0])
    unit = next(iter(model.adapters["g"].values()))
    seen = {}
    query = model.model.encoder.layer[0].attention.self.query
    handle = query.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    hidden(model, ids)
    handle.remove()
    x = seen["x"]
    gate = torch.sigmoid(x @ unit.gate.weight.T + unit.gate.bias).mean(dim=1, keepdim=True)  # (B, 1, 1)
    want = torch.nn.functional.linear(x, query.weight, query.bias) + (x @ unit.lora_A.T @ unit.lora_B.T) * gate
    assert (seen["y"] - want).abs().max() <= 1e-5


@pytest.mark.parametrize("arch, preset, options", [
    ("gpt2", "lora", {}), ("gpt2", "houlsby", {}),
    ("t5", "prefix_tuning", {"prefix_length": 3, "bottleneck_size": 8, "use_gating": True, "stacks": ["encoder"]}),
    ("t5", "unipelt", {"prefix_length": 3, "bottleneck_size": 8, "r": 4}),  # the decoder's LoRA / bottleneck: per token
])
@torch.no_grad()
def test_generate_with_cache_equals_recomputing_every_step(arch, preset, options):
    if preset == "unipelt":
        options = {**options, "stacks": None}
        with pytest.raises(AdapterError, match="use_gating on prefixes is for encoder stacks"):
            gated(arch, preset, lm=True, **options)
        options["stacks"] = ["encoder"]
    model = gated(arch, preset, lm=True, **options)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if not ARCHS[arch].encoder_decoder:
        mask[1, :2] = 0  # left padding on the decoder
    generate = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(**generate, use_cache=True)
    assert torch.equal(cached, model.generate(**generate, use_cache=False))
    scores = lambda: torch.stack(model.generate(**generate, output_scores=True, return_dict_in_generate=True).scores)  # noqa: E731
    adapted = scores()
    with model.disable_adapters():
        assert (scores() - adapted).abs().max() > 1e-4  # the adapter matters


@pytest.mark.parametrize("arch, options", [("gpt2", {}), ("t5", {"stacks": ["decoder"]}), ("t5", {})])
def test_gated_prefix_in_a_decoder_stack_is_refused_with_the_model_unchanged(arch, options):
    model = AdapterModel(make_base(ARCHS[arch]))
    before = Snapshot.of(model, make_batch(arch=ARCHS[arch]))
    with pytest.raises(AdapterError, match="stacks=\\['encoder'\\]"):
        model.add_adapter("p", "prefix_tuning", use_gating=True, prefix_length=2, bottleneck_size=8, **options)
    before.assert_unchanged(model)


def test_gated_lora_is_not_mergeable_and_says_why():
    model = gated("bert", "lora")
    with pytest.raises(AdapterError, match="use_gating=True: its gate depends on the input"):
        model.merge_adapter("g")
    with pytest.raises(AdapterError, match="not a whole Linear layer"):
        AdapterModel(make_base(ARCHS["gpt2"])).add_adapter("s", "lora", use_gating=True, roles=["q", "v"])
    with pytest.raises(AdapterError, match="init_weights='lora'"):
        AdapterModel(make_base(ARCHS["bert"])).add_adapter("s", "lora", use_gating=True, init_weights="pissa")


def test_unipelt_is_adapterhubs_preset():
    parts = {p.method: p for p in resolve_config("unipelt").parts}
    assert set(parts) == {"prefix_tuning", "bottleneck", "lora"}
    assert all(p.use_gating for p in parts.values())
    assert parts["prefix_tuning"].prefix_length == 10 and parts["prefix_tuning"].shared_gating
    assert parts["bottleneck"].reduction_factor == 16 and parts["bottleneck"].output_adapter
    assert not parts["bottleneck"].mh_adapter
    assert (parts["lora"].r, parts["lora"].alpha) == (8, 2.0)
    changed = {p.method: p for p in resolve_config("unipelt", reduction_factor=8, r=2).parts}
    assert changed["bottleneck"].reduction_factor == 8 and changed["lora"].r == 2


def test_routed_gated_adapters_equal_each_example_alone():
    model = AdapterModel(make_base(ARCHS["bert"]))
    model.add_adapter("u", "unipelt", prefix_length=3, bottleneck_size=8, r=4)
    model.add_adapter("l", "lora", **GATED["lora"])
    model.add_adapter("h", "houlsby", **GATED["houlsby"])
    perturb(model.adapters, scale=0.3)
    model.eval()
    assert_routed_equals_alone(model, make_batch(batch_size=4), ["u", "l", None, "h"])


@pytest.mark.parametrize("preset, options", [
    ("unipelt", {"prefix_length": 4, "bottleneck_size": 16}),
    ("lora", {**GATED["lora"], "roles": ["q", "v", "ffn_in"]}),
    ("houlsby", GATED["houlsby"]),
    ("prefix_tuning", {"prefix_length": 3, "bottleneck_size": 8, "use_gating": True, "shared_gating": False,
                       "leave_out": [0]}),
])
def test_adapterhub_loads_our_gated_export(preset, options, tmp_path):
    model = AdapterModel(fixture_base("bert", causal_lm=False))
    model.add_adapter("g", preset, set_active=True, **options)
    perturb(model.adapters["g"], scale=0.3)
    assert_adapterhub_computes_ours(model, "g", tmp_path, padding=True)  # AdapterHub's mean reads padding


def test_a_gated_export_to_adapterhub_on_a_decoder_is_refused(tmp_path):
    model = AdapterModel(fixture_base("llama", causal_lm=True))
    model.add_adapter("g", "lora", r=2, use_gating=True)
    with pytest.raises(AdapterError, match="nothing was written"):
        model.save_adapter(tmp_path / "ah", "g", format="adapterhub")
    assert not (tmp_path / "ah").exists()


def test_an_adapterhub_gated_adapter_on_a_decoder_is_refused_with_the_model_unchanged(tmp_path):
    """AdapterHub's gate there averages over the call's tokens, ours is per token: not loaded."""
    folder = Path(shutil.copytree(FIXTURES / "ah_llama_lora_lm" / "adapter", tmp_path / "ah"))
    data = json.loads((folder / "adapter_config.json").read_text())
    data["config"]["use_gating"] = True
    (folder / "adapter_config.json").write_text(json.dumps(data))
    model = AdapterModel(fixture_base("llama", causal_lm=True))
    with pytest.raises(CheckpointError, match="use_gating on a decoder"):
        model.load_adapter(folder)
    assert list(model.adapters) == [] and total_hooks(model) == 0
