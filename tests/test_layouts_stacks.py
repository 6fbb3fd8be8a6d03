"""Named stacks and roles: where adapters go in encoder-decoders (T5, BART) and which roles a
method takes by default.

* stacks: names, place ids (single-stack models keep ``layers.3.ffn_out``), ``stacks=`` filters
  (only the decoder's outputs move), ``layers=`` counts within a stack, unknown stacks are refused;
* roles: LoRA / IA3 defaults hit self- and cross-attention (PEFT's T5 default ``["q", "v"]``),
  GPT-2's fused ``qkv`` stands for q / k / v, a default role a stack lacks is skipped, an explicit
  role no stack has is refused;
* the map is chosen by a predicate where ``model_type`` is not enough (T5 v1.1's gated FFN);
* ``generate()`` runs with adapters on T5.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from adapterkit import AdapterError, AdapterModel
from adapterkit.layouts import ARCHITECTURES, Layout, spec_for
from helpers import ARCHS, D, N_HEADS, T5_KV, make_base, make_batch, perturb, run

SEQ2SEQ = ["t5", "bart"]


def _model(name: str) -> AdapterModel:
    return AdapterModel(make_base(ARCHS[name]))


def _module_name(model: AdapterModel, module: torch.nn.Module) -> str:
    return next(n for n, m in model.model.named_modules() if m is module)


# -- stacks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,stacks", [("bert", ["encoder"]), ("distilbert", ["encoder"]), ("gpt2", ["decoder"]),
                                         ("llama", ["decoder"]), ("t5", ["encoder", "decoder"]),
                                         ("bart", ["encoder", "decoder"]), ("mbart", ["encoder", "decoder"])])
def test_stack_names(arch, stacks):
    layout = Layout.of(make_base(ARCHS[arch]))
    assert layout.stack_names == stacks == list(layout.stacks)
    assert layout.is_encoder_decoder == (len(stacks) == 2)


def test_single_stack_models_keep_their_place_ids():
    """Checkpoints saved before stacks existed must still load."""
    model = _model("bert")
    model.add_adapter("h", "houlsby")
    model.add_adapter("l", "lora")
    assert [s.place_id for s in model.records["h"].sites][:2] == ["layers.0.attn_out", "layers.0.ffn_out"]
    assert [s.place_id for s in model.records["l"].sites][:2] == ["layers.0.attention.self.query", "layers.0.attention.self.value"]
    assert {s.stack for s in model.records["h"].sites + model.records["l"].sites} == {"encoder"}
    gpt2 = _model("gpt2")
    gpt2.add_adapter("l", "lora")
    assert [s.place_id for s in gpt2.records["l"].sites] == [f"layers.{i}.attn.c_attn" for i in range(4)]
    assert {s.stack for s in gpt2.records["l"].sites} == {"decoder"}


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_multi_stack_place_ids_name_the_stack(arch):
    model = _model(arch)
    model.add_adapter("h", "houlsby", cross_adapter=True)
    ids = [s.place_id for s in model.records["h"].sites]
    assert ids[:2] == ["encoder.layers.0.attn_out", "encoder.layers.0.ffn_out"]
    assert "decoder.layers.3.cross_attn_out" in ids and "encoder.layers.3.cross_attn_out" not in ids
    assert len(ids) == 4 * 2 + 4 * 3
    for site in model.records["h"].sites:
        assert site.place_id.startswith(site.stack + ".layers.")
        assert _module_name(model, site.host).startswith(model.layout.stacks[site.stack].path + ".")


@pytest.mark.parametrize("arch", SEQ2SEQ)
@pytest.mark.parametrize("method,options", [("pfeiffer", {}), ("lora", {"r": 4}), ("ia3", {})])
@torch.no_grad()
def test_decoder_stack_adapter_leaves_the_encoder_alone(arch, method, options):
    """``stacks=("decoder",)`` (what ``add_adapter("decoder:name")`` sets) places only in the
    decoder: a trained adapter there changes the decoder's output and not the encoder's."""
    base = make_base(ARCHS[arch])
    batch = make_batch(arch=ARCHS[arch])
    before = base(**batch)
    model = AdapterModel(base)
    model.add_adapter("a", method, stacks=("decoder",), set_active=True, **options)
    assert {s.stack for s in model.records["a"].sites} == {"decoder"}
    perturb(model.adapters["a"])
    after = model(**batch)
    assert torch.equal(after.encoder_last_hidden_state, before.encoder_last_hidden_state)
    assert (after.last_hidden_state - before.last_hidden_state).abs().max() > 1e-4


@pytest.mark.parametrize("arch", SEQ2SEQ)
@torch.no_grad()
def test_encoder_stack_adapter_changes_the_encoder(arch):
    base = make_base(ARCHS[arch])
    batch = make_batch(arch=ARCHS[arch])
    before = base(**batch)
    model = AdapterModel(base)
    model.add_adapter("a", "pfeiffer", stacks="encoder", set_active=True)
    assert {s.stack for s in model.records["a"].sites} == {"encoder"}
    perturb(model.adapters["a"])
    assert (model(**batch).encoder_last_hidden_state - before.encoder_last_hidden_state).abs().max() > 1e-4


def _t5_uneven() -> AdapterModel:
    config = ARCHS["t5"].config()
    config.num_decoder_layers = 2
    torch.manual_seed(0)
    return AdapterModel(T.T5Model(config).eval())


def test_layers_count_within_each_stack():
    model = _t5_uneven()
    assert [s.num_layers for s in model.layout.stacks.values()] == [4, 2]
    model.add_adapter("a", "pfeiffer", layers=[1])
    assert [s.place_id for s in model.records["a"].sites] == ["encoder.layers.1.ffn_out", "decoder.layers.1.ffn_out"]
    model.add_adapter("b", "pfeiffer", leave_out=[0, -1])
    assert [s.place_id for s in model.records["b"].sites] == ["encoder.layers.1.ffn_out", "encoder.layers.2.ffn_out"]
    model.add_adapter("c", "lora", layers=[3], stacks=("encoder",))
    assert {s.layer for s in model.records["c"].sites} == {3}
    with pytest.raises(AdapterError, match=r"layers=\[3\] is out of range: the decoder stack of this model has 2 layers"):
        model.add_adapter("d", "lora", layers=[3])
    assert "d" not in model.adapters


@pytest.mark.parametrize("arch,stacks,have", [("t5", ("middle",), r"\['encoder', 'decoder'\]"),
                                              ("bert", ("decoder",), r"\['encoder'\]"),
                                              ("gpt2", ("encoder", "decoder"), r"\['decoder'\]")])
@pytest.mark.parametrize("method", ["pfeiffer", "lora", "ia3"])
def test_unknown_stack_names_the_models_stacks(arch, stacks, have, method):
    model = _model(arch)
    with pytest.raises(AdapterError, match=rf"no stack .*its stacks are {have}"):
        model.add_adapter("a", method, stacks=stacks)
    assert not model.adapters


def test_t5_encoder_model_has_the_encoder_stack_only():
    """Place ids are the family's, so an encoder adapter of T5 fits T5EncoderModel."""
    torch.manual_seed(0)
    model = AdapterModel(T.T5EncoderModel(ARCHS["t5"].config()).eval())
    assert model.layout.stack_names == ["encoder"]
    model.add_adapter("a", "pfeiffer")
    assert model.records["a"].sites[0].place_id == "encoder.layers.0.ffn_out"
    with pytest.raises(AdapterError, match=r"its stacks are \['encoder'\]"):
        model.add_adapter("b", "lora", stacks=["decoder"])


def test_generic_path_honours_stacks_and_names_places_by_stack():
    model = _model("bart")
    model.add_adapter("a", "lora", r=2, target_modules=["fc1"], stacks=["decoder"], layers=[0, 2])
    assert [s.place_id for s in model.records["a"].sites] == ["decoder.layers.0.fc1", "decoder.layers.2.fc1"]
    model.add_adapter("b", "pfeiffer", target_modules=["layernorm_embedding"])
    assert [s.place_id for s in model.records["b"].sites] == ["encoder.layernorm_embedding", "decoder.layernorm_embedding"]
    assert [s.stack for s in model.records["b"].sites] == ["encoder", "decoder"]


# -- roles ----------------------------------------------------------------------------------------
def test_default_roles_live_on_the_methods():
    from adapterkit.methods import IA3Config, LoRAConfig

    assert LoRAConfig.default_roles == ("q", "v", "cross_q", "cross_v")
    assert IA3Config.default_roles == ("k", "v", "ffn_in", "cross_k", "cross_v")
    assert all(not hasattr(spec, "lora_default") for spec in ARCHITECTURES)


def test_t5_lora_default_hits_self_and_cross_attention_like_peft():
    """PEFT's T5 default target_modules ["q", "v"] matches the self- and the cross-attention's."""
    model = _model("t5")
    model.add_adapter("a", "lora")
    names = [_module_name(model, s.host) for s in model.records["a"].sites]
    peft_like = [n for n, m in model.model.named_modules() if n.rsplit(".", 1)[-1] in ("q", "v")]
    assert sorted(names) == sorted(peft_like) and len(names) == 4 * 2 + 4 * 4
    assert "decoder.block.0.layer.1.EncDecAttention.q" in names


def test_t5_ia3_default():
    model = _model("t5")
    model.add_adapter("a", "ia3")
    suffixes = {s.place_id.split(".", 3)[-1] for s in model.records["a"].sites}
    assert suffixes == {"layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.1.DenseReluDense.wi",
                        "layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v", "layer.2.DenseReluDense.wi"}


@pytest.mark.parametrize("method,hosts", [("lora", ["attn.c_attn"]), ("ia3", ["attn.c_attn", "mlp.c_fc"])])
def test_gpt2_defaults_resolve_through_the_fused_qkv_alias(method, hosts):
    model = _model("gpt2")
    model.add_adapter("a", method)
    assert [s.place_id for s in model.records["a"].sites] == [f"layers.{i}.{h}" for i in range(4) for h in hosts]


def test_explicit_q_on_gpt2_is_a_slice_for_lora_and_refused_for_ia3():
    """Aliases serve defaults only: an explicit q on the fused qkv is its q slice where the method
    can adapt slices (LoRA, issue 12) and is refused elsewhere, pointing at qkv (IA3 would scale
    keys and values too)."""
    model = _model("gpt2")
    model.add_adapter("a", "lora", roles=["q"])
    assert [type(s).__name__ for s in model.records["a"].sites] == ["SlicedSite"] * 4
    with pytest.raises(AdapterError, match=r"no linear role \['q'\].*'q' is part of 'qkv' here"):
        model.add_adapter("b", "ia3", roles=["q"])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_cross_roles_on_a_model_without_cross_attention_are_refused(arch):
    model = _model(arch)
    with pytest.raises(AdapterError, match=r"no linear role \['cross_q'\].*Roles: q, k, v"):
        model.add_adapter("a", "lora", roles=["cross_q"])
    with pytest.raises(AdapterError, match=r"no place \['cross_attn_out'\].*Places: attn_out, ffn_out.*T5, BART"):
        model.add_adapter("b", "pfeiffer", cross_adapter=True)
    assert not model.adapters


def test_explicit_role_some_stacks_lack_goes_where_it_exists():
    model = _model("bart")
    model.add_adapter("a", "lora", roles="cross_q,ffn_in", r=2)
    by_stack = {}
    for site in model.records["a"].sites:
        by_stack.setdefault(site.stack, set()).add(site.place_id.split(".", 3)[-1])
    assert by_stack == {"encoder": {"fc1"}, "decoder": {"encoder_attn.q_proj", "fc1"}}
    with pytest.raises(AdapterError, match=r"no linear role \['cross_q'\] in the stack\(s\) \['encoder'\]"):
        model.add_adapter("b", "lora", roles=["cross_q"], stacks=["encoder"])


# -- what the layout knows ------------------------------------------------------------------------
def test_attention_geometry_from_the_config():
    llama = Layout.of(make_base(ARCHS["llama"]))
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == (N_HEADS, 2, D // N_HEADS)
    t5 = Layout.of(make_base(ARCHS["t5"]))
    assert (t5.num_attention_heads, t5.num_key_value_heads, t5.head_dim) == (N_HEADS, N_HEADS, T5_KV)
    config = ARCHS["bart"].config()
    config.decoder_attention_heads = 2
    bart = Layout.of(T.BartModel(config))
    assert [s.num_attention_heads for s in bart.stacks.values()] == [N_HEADS, 2]
    assert bart.embeddings is bart.model.shared and t5.embeddings is t5.model.shared
    assert Layout.of(make_base(ARCHS["bert"])).embeddings is not None


def test_spec_is_chosen_by_a_predicate_on_the_config():
    plain, gated = ARCHS["t5"].config(), ARCHS["t5-v1_1"].config()
    assert spec_for(plain).name == "t5" and spec_for(gated).name == "t5-gated"
    assert spec_for("t5").model_types == spec_for(plain).model_types  # a bare model_type: the first entry
    model = _model("t5-v1_1")
    model.add_adapter("a", "lora", roles=["ffn_gate", "ffn_in"], r=2, stacks=["encoder"], layers=[0])
    assert [s.place_id for s in model.records["a"].sites] == ["encoder.layers.0.layer.1.DenseReluDense.wi_0",
                                                      "encoder.layers.0.layer.1.DenseReluDense.wi_1"]
    with pytest.raises(AdapterError, match="no linear role"):
        _model("t5").add_adapter("b", "lora", roles=["ffn_gate"])


def test_mt5_uses_the_t5_map():
    torch.manual_seed(0)
    config = T.MT5Config(**{k: v for k, v in ARCHS["t5"].config().to_dict().items()
                            if k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")})
    model = AdapterModel(T.MT5Model(config).eval())
    assert model.layout.spec.name == "t5-gated" and model.layout.stack_names == ["encoder", "decoder"]
    model.add_adapter("a", "houlsby", set_active=True)
    batch = make_batch(arch=ARCHS["t5"])
    assert run(model, batch).shape == (4, 7, D)


def test_every_architecture_entry_has_a_tiny_model_in_the_cases():
    """Stricter than a model_type check: variants told apart by a predicate count separately."""
    covered = {spec_for(arch.config()).name for arch in ARCHS.values()}
    assert covered == {spec.name for spec in ARCHITECTURES}


# -- generate ---------------------------------------------------------------------------------------
def _t5_lm(seed: int = 0):
    torch.manual_seed(seed)
    return T.T5ForConditionalGeneration(ARCHS["t5"].config()).eval()


@pytest.mark.parametrize("method,options", [("lora", {"r": 4}), ("pfeiffer", {}), ("houlsby", {"cross_adapter": True})])
@torch.no_grad()
def test_generate_with_adapters_on_t5(method, options):
    batch = make_batch()
    base_tokens = _t5_lm().generate(**batch, max_new_tokens=6, do_sample=False)
    model = AdapterModel(_t5_lm())
    model.add_adapter("a", method, set_active=True, **options)
    fresh = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(fresh, base_tokens)
    perturb(model.adapters["a"], scale=2.0)
    trained = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert trained.shape[0] == 4 and not torch.equal(trained, base_tokens)
    with model.disable_adapters():
        assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), base_tokens)
