"""Adapters on a quantized frozen base (``adapterkit.quantization``): every method x {int8, int4}.

The tiny BERT has widths divisible by 32 (int4's group), so every Linear and the token embeddings
are quantized. What holds on the quantized base:

* every method (and LoRA initialised from the weight: PiSSA, OLoRA; DoRA, whose norm reads the
  dequantized weight) adds what it adds on the float base, within the quantization error
  (``DELTA_TOL``, relative);
* gradients reach every adapter parameter (also below quantized layers) and no base weight, and
  point where the float base's do;
* an adapter of every method saved on the quantized base loads on the float one bit for bit and
  the reverse, a different base is still refused; merging into quantized weights is refused;
* per-example routing gives each example what it gets alone (``ROUTED_TOL``);
* the base fingerprint is the float base's in every version (1: the blocks; 2: the whole backbone
  and hosts outside it, such as an untied, quantized LM head).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers as T
from torch import nn

from adapterkit import AdapterModel
from adapterkit.errors import AdapterError, CheckpointError
from adapterkit.fingerprint import base_fingerprint
from adapterkit.quantization import (QuantizedEmbedding, QuantizedLinear, dequantized, precision, quantize_base,
                                     weight_bytes)

pytest.importorskip("torchao")

SCHEMES = ("int8", "int4")
#: test name -> (method, options): every method, and LoRA's initialisations from the host's weight
METHODS = {
    "pfeiffer": ("pfeiffer", {}),
    "houlsby": ("houlsby", {}),
    "parallel": ("parallel", {}),
    "compacter": ("compacter", {"reduction_factor": 8}),  # bottleneck 8: phm_dim 4 divides it
    "lora": ("lora", {}),
    "lora_all": ("lora", {"roles": ["all-linear", "embeddings"]}),
    "pissa": ("lora", {"init_weights": "pissa"}),  # the host's SVD: of the dequantized weight
    "olora": ("lora", {"init_weights": "olora"}),  # the host's QR: of the dequantized weight
    "dora": ("dora", {}),  # the norm of the dequantized weight + B A
    "vera": ("vera", {}),
    "ia3": ("ia3", {}),
    "loreft": ("loreft", {"suffix_positions": 1}),  # both units used: each must get a gradient
    "prefix_tuning": ("prefix_tuning", {}),
    "prompt_tuning": ("prompt_tuning", {}),
    "e_adapter": ("e_adapter", {}),  # ELP-adapter tuning's parts
    "l_adapter": ("l_adapter", {}),
    "p_adapter": ("p_adapter", {}),
    "union": ("lora+prefix_tuning", {}),  # several methods as one adapter (MAM-like)
}
#: relative error of the adapter's contribution, quantized vs float base (measured, 2026-12-07:
#: int8 0.002-0.021, int4 0.012-0.12; largest for IA3, VeRA, PiSSA, prefix tuning, LoRA on q, v,
#: whose change passes through every quantized layer above it or scales a quantized output)
DELTA_TOL = {"int8": 0.05, "int4": 0.15}
#: how far the adapters are moved from their initialisation: enough to change the output by > 5 %
#: (IA3's scales start at one; DoRA's magnitudes and VeRA's vectors act through the small weights),
#: not so far that the output is another (the union's two parts at 0.3 changed it by 98 %, measured)
PERTURB = {"ia3": 2.0, "dora": 1.0, "vera": 1.0, "union": 0.15}
#: routed against alone, relative error of each example's hidden states: int8 quantizes activations
#: per token at run time, so the float rounding by which a routed batch differs from one example
#: run alone (<= 1e-6 on the float base, measured) can move activations by one int8 step (measured:
#: up to 1e-4 relative, 4e-3 on one entry). A wrong route errs by the adapter's contribution (> 5 %).
ROUTED_TOL = {"int8": 2e-3, "int4": 1e-5}
#: relative error of the bare base's hidden states
BASE_TOL = {"int8": 0.03, "int4": 0.08}


def _base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       vocab_size=96, max_position_embeddings=64)
    return T.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def bases() -> dict:
    float_base = _base()
    return {"float": float_base, **{q: quantize_base(copy.deepcopy(float_base), q) for q in SCHEMES}}


def _batch(n: int = 4, t: int = 9, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(1, 96, (n, t), generator=g), "attention_mask": mask}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _hidden(model: AdapterModel, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _perturb(module: nn.Module, seed: int = 7, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _pair(bases: dict, scheme: str, method: str) -> tuple[AdapterModel, AdapterModel]:
    """The same (perturbed) adapter on the float base and on its ``scheme`` copy, active, eval mode."""
    fm, qm = AdapterModel(copy.deepcopy(bases["float"])), AdapterModel(copy.deepcopy(bases[scheme]))
    kind, options = METHODS[method]
    for m in (fm, qm):
        m.add_adapter("a", kind, **options)
    _perturb(fm.adapters["a"], scale=PERTURB.get(method, 0.3))
    qm.adapters["a"].load_state_dict(fm.adapters["a"].state_dict())
    for m in (fm, qm):
        m.set_active_adapters("a")
        m.eval()
    return fm, qm


@pytest.mark.parametrize("scheme", SCHEMES)
def test_base_is_quantized_close_to_float_and_smaller(bases, scheme):
    q = bases[scheme]
    linears = [m for m in q.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, QuantizedLinear) for m in linears)
    assert precision(q) == scheme and precision(bases["float"]) == "float32"
    batch = _batch()
    f_out = bases["float"](**batch).last_hidden_state
    q_out = q(**batch).last_hidden_state
    assert 1e-4 < _rel(q_out, f_out) < BASE_TOL[scheme]  # quantized (not the float weights), and close
    emb = q.embeddings.word_embeddings  # looks up int8 rows as torchao's own (whole-table) embedding does
    assert isinstance(emb, QuantizedEmbedding)
    assert torch.equal(emb(batch["input_ids"]), torch.nn.functional.embedding(batch["input_ids"], emb.weight))
    ratio = weight_bytes(q) / weight_bytes(bases["float"])
    assert ratio < {"int8": 0.30, "int4": 0.20}[scheme]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", METHODS)
def test_adapter_adds_the_same_on_a_quantized_base(bases, scheme, method):
    fm, qm = _pair(bases, scheme, method)
    batch = _batch()
    f_delta = _hidden(fm, batch) - AdapterModel(bases["float"])(**batch).last_hidden_state.detach()
    with qm.disable_adapters():
        q_bare = _hidden(qm, batch)
    q_delta = _hidden(qm, batch) - q_bare
    assert f_delta.norm() > 0.05 * q_bare.norm()  # the adapter does something
    assert _rel(q_delta, f_delta) < DELTA_TOL[scheme]
    with qm.disable_adapters():  # adapters off: the quantized base, bit for bit
        assert torch.equal(_hidden(qm, batch), bases[scheme](**batch).last_hidden_state)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_adapters_only_and_match_float(bases, scheme, method):
    fm, qm = _pair(bases, scheme, method)
    batch = _batch()
    grads = {}
    for key, m in (("float", fm), ("quant", qm)):
        m.add_classification_head("a", num_labels=2)
        m.train_adapter("a")
        m.eval()  # no dropout: the two runs are comparable
        if key == "quant":
            m.heads["a"].load_state_dict(fm.heads["a"].state_dict())
        m(**batch, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        grads[key] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        assert not [n for n in grads[key] if n.startswith("model.")]  # no base weight
        trainable = {n for n, p in m.adapters.named_parameters(prefix="adapters") if p.requires_grad}
        assert trainable and trainable <= set(grads[key])  # every adapter weight, the lowest layer's too
    f = torch.cat([g.reshape(-1) for n, g in sorted(grads["float"].items())])
    q = torch.cat([g.reshape(-1) for n, g in sorted(grads["quant"].items())])
    assert torch.nn.functional.cosine_similarity(f, q, dim=0) > 0.95
    assert all(not p.requires_grad for p in qm.model.parameters())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", METHODS)
def test_save_on_quantized_load_on_float_and_back(bases, scheme, method, tmp_path):
    fm, qm = _pair(bases, scheme, method)
    qm.save_adapter(tmp_path / "from_quant", "a")
    other = AdapterModel(copy.deepcopy(bases["float"]))
    with pytest.warns(UserWarning, match=f"trained on this base in {scheme}"):
        other.load_adapter(tmp_path / "from_quant", set_active=True)
    other.eval()
    assert torch.equal(_hidden(other, _batch()), _hidden(fm, _batch()))  # the same adapter, exactly

    fm.save_adapter(tmp_path / "from_float", "a")
    back = AdapterModel(copy.deepcopy(bases[scheme]))
    with pytest.warns(UserWarning, match=f"in float32; it runs here on the {scheme} copy"):
        back.load_adapter(tmp_path / "from_float", set_active=True)
    back.eval()
    assert torch.equal(_hidden(back, _batch()), _hidden(qm, _batch()))

    stranger = AdapterModel(quantize_base(_base(seed=5), scheme))
    with pytest.raises(CheckpointError, match="another base model"):
        stranger.load_adapter(tmp_path / "from_float")
    assert "a" not in stranger.adapters


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", METHODS)
def test_routed_equals_alone_on_quantized_base(bases, scheme, method):
    model = AdapterModel(copy.deepcopy(bases[scheme]))
    for i, (kind, options) in enumerate((METHODS[method], METHODS[method], METHODS["pfeiffer"])):
        model.add_adapter(f"a{i}", kind, **options)
        _perturb(model.adapters[f"a{i}"], seed=i)
    model.eval()
    batch = _batch()
    names = ["a0", "a1", None, "a2"]
    with torch.no_grad():
        routed = model(**batch, adapter_names=names).last_hidden_state
    for row, name in enumerate(names):
        model.set_active_adapters(name)
        one = {k: v[row:row + 1] for k, v in batch.items()}
        alone = _hidden(model, one)
        assert _rel(routed[row:row + 1], alone) <= ROUTED_TOL[scheme], (row, name)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", ["lora", "pissa", "dora", "vera", "ia3"])
def test_merge_into_quantized_base_is_refused(bases, scheme, method):
    _, qm = _pair(bases, scheme, method)
    before = _hidden(qm, _batch())
    with pytest.raises(AdapterError, match=f"cannot be merged: the base is quantized .*{scheme} weights.*unmerged"):
        qm.merge_adapter("a")
    assert qm.merged_adapters == []
    assert torch.equal(_hidden(qm, _batch()), before)


def test_bad_scheme_and_double_quantization_are_refused(bases):
    with pytest.raises(AdapterError, match="quantize='int3' is not a scheme; use one of int8, int4"):
        quantize_base(_base(), "int3")
    with pytest.raises(AdapterError, match="already quantized"):
        quantize_base(bases["int8"], "int4")
    with pytest.raises(AdapterError, match="before it is wrapped"):
        quantize_base(AdapterModel(_base()), "int8")
    assert quantize_base(bases["float"], None) is bases["float"]


def test_tied_embeddings_stay_float_in_a_decoder():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    float_lm = T.LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_base(copy.deepcopy(float_lm), "int8")
    assert q.lm_head.weight is q.model.embed_tokens.weight  # still tied, still float
    assert type(q.lm_head) is nn.Linear and type(q.model.embed_tokens.weight) is nn.Parameter
    model = AdapterModel(q)
    model.add_adapter("a", "lora")
    _perturb(model.adapters["a"])
    model.set_active_adapters("a")
    ids = torch.randint(1, 96, (2, 7))
    ref = AdapterModel(float_lm)
    ref.add_adapter("a", "lora")
    ref.adapters["a"].load_state_dict(model.adapters["a"].state_dict())
    ref.set_active_adapters("a")
    with torch.no_grad():
        assert _rel(model(input_ids=ids).logits, ref(input_ids=ids).logits) < 0.05


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fingerprint_is_the_float_bases_in_every_version(bases, scheme):
    f, q = AdapterModel(copy.deepcopy(bases["float"])), AdapterModel(copy.deepcopy(bases[scheme]))
    for version in (1, 2):
        assert base_fingerprint(q.model, q.layout, version=version) == base_fingerprint(f.model, f.layout,
                                                                                        version=version)
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    float_lm = T.LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q_lm = quantize_base(copy.deepcopy(float_lm), scheme)
    assert isinstance(q_lm.lm_head, QuantizedLinear)  # outside the backbone, quantized
    assert (base_fingerprint(q_lm, hosts=[q_lm.lm_head]) == base_fingerprint(float_lm, hosts=[float_lm.lm_head])
            != base_fingerprint(float_lm))
    other = copy.deepcopy(float_lm)
    with torch.no_grad():
        other.lm_head.weight.mul_(-1)  # another LM head: version 2 tells the bases apart
    assert base_fingerprint(q_lm, hosts=[q_lm.lm_head]) != base_fingerprint(other, hosts=[other.lm_head])


def test_the_docs_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "quantization.md").read_text(encoding="utf-8")
    block = re.search(r"## Python\s+```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "docs/quantization.md", "exec"), namespace)
    model = namespace["model"]
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith(("adapters.sst2.", "heads.sst2.")) for n in grads)
    saved = json.loads((tmp_path / "out/sst2/adapter_config.json").read_text())
    assert saved["base_model"]["precision"] == "int8"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dora_norms_the_dequantized_weight(bases, scheme):
    """DoRA's magnitude starts at the row norms of the weight the quantized one stands for, so a
    fresh DoRA leaves the quantized base's output unchanged, bit for bit."""
    model = AdapterModel(copy.deepcopy(bases[scheme]))
    model.add_adapter("a", "dora", set_active=True)
    model.eval()
    with model.disable_adapters():
        bare = _hidden(model, _batch())
    assert torch.equal(_hidden(model, _batch()), bare)
    query = model.model.encoder.layer[0].attention.self.query
    magnitude = next(m.lora_magnitude_vector for m in model.adapters["a"].modules()
                     if hasattr(m, "lora_magnitude_vector") and m.host_weight().shape == query.weight.shape
                     and m._host[0] is query)
    float_rows = bases["float"].encoder.layer[0].attention.self.query.weight.norm(dim=1)
    assert torch.allclose(magnitude, dequantized(query.weight, query.compute_dtype).float().norm(dim=1), rtol=1e-5)
    assert 0 < _rel(magnitude, float_rows) < BASE_TOL[scheme]  # the quantized weight's norms, near the float's


@pytest.mark.parametrize("scheme", SCHEMES)
def test_prompt_tuning_generates_with_a_cache_on_a_quantized_decoder(scheme):
    """A decoder with untied (so quantized) token embeddings: prompt tuning's cached steps probe the
    table's dtype (torchao's int8 tensor has no ``new_zeros``); cached = uncached generation."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AdapterModel(quantize_base(T.LlamaForCausalLM(cfg).eval(), scheme))
    assert isinstance(model.model.model.embed_tokens, QuantizedEmbedding)
    model.add_adapter("p", "prompt_tuning", set_active=True)
    _perturb(model.adapters["p"])
    ids = torch.randint(1, 96, (2, 5))
    cached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.shape == (2, 9) and torch.equal(cached, uncached)
