"""Per-architecture maps: where the stacks, layers, sub-layer outputs and projections live.

One declarative entry per family, in the style of AdapterHub's ``AdapterModelInterface``, with
paths relative to one transformer block. No model code is copied: adapters attach to these
modules with hooks (``adapterkit.places.slots``), so the same table works for ``transformers`` 4.57 and
5.x. An architecture has one or more named *stacks* of blocks: ``"encoder"`` and ``"decoder"`` for
encoder-decoders (T5, BART), one stack named after what the model is for the others (BERT:
``"encoder"``, GPT-2 / Llama: ``"decoder"``). Where ``model_type`` is not enough to tell variants
apart, an entry carries a predicate on the config (T5 v1.1's gated feed-forward).

Sub-layer places (read by bottleneck adapters), each with the module whose output is the
sub-layer's output before the residual add, the module whose forward receives the residual
stream, the layer norm after the add (post-LN models) and the module whose first argument is the
sub-layer's input (what a ``pre`` / ``parallel`` adapter reads; for pre-LN models the normalised
stream, as the sub-layer itself reads it):

* ``attn_out``: self-attention, ``cross_attn_out``: cross-attention (decoder stacks of
  encoder-decoders), ``ffn_out``: feed-forward.

Attention roles (read by prefix tuning): ``self`` and ``cross``, the modules that call the attention
function; derived from the projections (the parent of ``q`` / ``qkv``, of ``cross_q``) unless a
stack names them (``StackSpec.attention``).

Linear roles (read by LoRA / IA3): ``q``, ``k``, ``v`` (``qkv`` when fused), ``attn_proj``,
``cross_q``, ``cross_k``, ``cross_v``, ``cross_proj``, ``ffn_in`` (and ``ffn_gate`` on gated
feed-forwards: ``ffn_gate`` is the branch that goes through the activation, ``ffn_in`` the one
multiplied by it), ``ffn_proj``. Which roles a method uses by default is the method's business
(``LoRAConfig.default_roles``); an entry may declare *aliases* through which those defaults
resolve where the architecture fuses projections (GPT-2: ``q`` / ``k`` / ``v`` -> ``qkv``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from ..places.slots import ArgRef

PLACES = ("attn_out", "cross_attn_out", "ffn_out")
ROLES = ("q", "k", "v", "qkv", "attn_proj", "cross_q", "cross_k", "cross_v", "cross_proj",
         "ffn_in", "ffn_gate", "ffn_proj")

#: attention roles (prefix tuning) and the projections whose parent module is that attention
ATTENTION_ROLES = {"self": ("q", "qkv"), "cross": ("cross_q",)}

_HIDDEN = ArgRef(0, "hidden_states")


@dataclass(frozen=True)
class SubLayerSpec:
    """A residual sub-layer inside a block (paths relative to the block; ``""`` = the block).

    Args:
        output: module whose output is the sub-layer's output before the residual add.
        residual: module whose forward receives the residual stream.
        residual_arg: which argument of that forward holds it.
        layer_norm: the layer norm applied after the residual add (post-LN models), else None.
        input: module whose ``input_arg`` is the sub-layer's input (for ``pre`` / ``parallel``).
        input_arg: which argument of ``input``'s forward holds it.
    """

    output: str
    residual: str
    residual_arg: ArgRef
    layer_norm: Optional[str] = None
    input: str = ""
    input_arg: ArgRef = _HIDDEN


@dataclass(frozen=True)
class StackSpec:
    """One stack of identical blocks.

    Args:
        layers: path of the ``nn.ModuleList`` of blocks, matched as a suffix of module names
            (so ``BertModel`` and ``BertForSequenceClassification`` both fit).
        sublayers: place -> sub-layer (``attn_out``, ``cross_attn_out``, ``ffn_out``).
        linears: role -> path of the projection.
        heads_attr: the config attribute holding this stack's number of attention heads, when
            it is not ``num_attention_heads`` (BART's ``decoder_attention_heads``).
        attention: attention role (``"self"``, ``"cross"``) -> path of the module that calls
            ``transformers``' attention function (where prefix tuning adds keys and values);
            ``None`` derives it: the module holding the ``q`` (or fused ``qkv``) projection, and
            the one holding ``cross_q``.
    """

    layers: str
    sublayers: Mapping[str, SubLayerSpec]
    linears: Mapping[str, str]
    heads_attr: Optional[str] = None
    attention: Optional[Mapping[str, str]] = None

    @property
    def attention_modules(self) -> dict[str, str]:
        """Attention role -> path of its attention module inside a block (see ``attention``)."""
        if self.attention is not None:
            return dict(self.attention)
        found = {}
        for role, projections in ATTENTION_ROLES.items():
            path = next((self.linears[p] for p in projections if p in self.linears), None)
            if path is not None and "." in path:
                found[role] = path.rpartition(".")[0]
        return found


def _always(config: Any) -> bool:
    return True


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one architecture family.

    Args:
        name: a short name for messages and docs.
        model_types: the ``config.model_type`` values this entry serves.
        stacks: stack name -> stack, in forward order.
        embeddings: path of the input token embeddings (matched as a suffix).
        aliases: role -> the role that stands for it here, used when a method's *default* roles
            are resolved (GPT-2's fused ``qkv`` stands for ``q``, ``k`` and ``v``).
        fused: a fused role -> the roles of its equal output slices, in order (GPT-2's ``c_attn``
            is ``[q | k | v]``), so that a method can adapt some slices only (LoRA ``roles=["q", "v"]``).
        when: predicate on the config, for variants ``model_type`` cannot tell apart.
        post_ln: the layer norm follows the residual add (BERT, BART).
        decoder: a decoder-only (causal LM) family.
        modality: what the model reads: ``"text"`` (token ids), ``"image"`` (``pixel_values``)
            or ``"audio"`` (``input_values``); heads and input checks follow it (``inputs.py``).
        prefix_tokens: positions before the first patch (ViT's CLS token; DeiT's CLS and
            distillation tokens): an image head's mean over patches skips them.
    """

    name: str
    model_types: tuple[str, ...]
    stacks: Mapping[str, StackSpec]
    embeddings: str
    aliases: Mapping[str, str] = field(default_factory=dict)
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    when: Callable[[Any], bool] = _always
    post_ln: bool = False
    decoder: bool = False
    modality: str = "text"
    prefix_tokens: int = 0

    @property
    def named_stacks(self) -> bool:
        """Place ids carry the stack name (``encoder.layers.3.ffn_out``) when there are several;
        single-stack families keep ``layers.3.ffn_out`` so that existing checkpoints load."""
        return len(self.stacks) > 1


def _sub(output: str, residual: str, residual_arg: ArgRef, layer_norm: Optional[str], input: str,
         input_arg: ArgRef = _HIDDEN) -> SubLayerSpec:
    return SubLayerSpec(output, residual, residual_arg, layer_norm, input, input_arg)


def _attention_roles(prefix: str, q: str, k: str, v: str, o: str, role_prefix: str = "") -> dict[str, str]:
    """Roles of one attention block: ``q``, ``k``, ``v``, ``attn_proj`` (or ``cross_q`` ... ``cross_proj``)."""
    names = (role_prefix + "q", role_prefix + "k", role_prefix + "v", "cross_proj" if role_prefix else "attn_proj")
    return {name: f"{prefix}.{path}" for name, path in zip(names, (q, k, v, o))}


BERT_LIKE = ArchSpec(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra"),
    stacks={"encoder": StackSpec(
        layers="encoder.layer",
        sublayers={
            "attn_out": _sub("attention.output.dropout", "attention.output", ArgRef(1, "input_tensor"),
                             "attention.output.LayerNorm", "attention"),
            "ffn_out": _sub("output.dropout", "output", ArgRef(1, "input_tensor"), "output.LayerNorm", "intermediate"),
        },
        linears={
            **_attention_roles("attention", "self.query", "self.key", "self.value", "output.dense"),
            "ffn_in": "intermediate.dense",
            "ffn_proj": "output.dense",
        },
    )},
    embeddings="embeddings.word_embeddings",
    post_ln=True,
)

DISTILBERT = ArchSpec(
    name="distilbert",
    model_types=("distilbert",),
    stacks={"encoder": StackSpec(
        layers="transformer.layer",
        sublayers={
            "attn_out": _sub("attention.out_lin", "", _HIDDEN, "sa_layer_norm", "attention"),
            "ffn_out": _sub("ffn", "ffn", ArgRef(0, "input"), "output_layer_norm", "ffn", ArgRef(0, "input")),
        },
        linears={
            **_attention_roles("attention", "q_lin", "k_lin", "v_lin", "out_lin"),
            "ffn_in": "ffn.lin1",
            "ffn_proj": "ffn.lin2",
        },
    )},
    embeddings="embeddings.word_embeddings",
    post_ln=True,
)

GPT2 = ArchSpec(
    name="gpt2",
    model_types=("gpt2",),
    stacks={"decoder": StackSpec(
        layers="h",
        sublayers={
            "attn_out": _sub("attn", "ln_1", _HIDDEN, None, "attn"),
            "ffn_out": _sub("mlp", "ln_2", _HIDDEN, None, "mlp"),
        },
        linears={"qkv": "attn.c_attn", "attn_proj": "attn.c_proj", "ffn_in": "mlp.c_fc", "ffn_proj": "mlp.c_proj"},
    )},
    embeddings="wte",
    aliases={"q": "qkv", "k": "qkv", "v": "qkv"},
    fused={"qkv": ("q", "k", "v")},
    decoder=True,
)

LLAMA_LIKE = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    stacks={"decoder": StackSpec(
        layers="layers",
        sublayers={
            "attn_out": _sub("self_attn.o_proj", "input_layernorm", _HIDDEN, None, "self_attn"),
            "ffn_out": _sub("mlp", "post_attention_layernorm", _HIDDEN, None, "mlp"),
        },
        linears={
            **_attention_roles("self_attn", "q_proj", "k_proj", "v_proj", "o_proj"),
            "ffn_gate": "mlp.gate_proj",
            "ffn_in": "mlp.up_proj",
            "ffn_proj": "mlp.down_proj",
        },
    )},
    embeddings="embed_tokens",
    decoder=True,
)


def _t5_stack(layers: str, cross: bool, gated: bool) -> StackSpec:
    """T5 blocks hold a ``layer`` list: self-attention, [cross-attention,] feed-forward. Each is
    pre-LN, ``h + dropout(f(layer_norm(h)))``: the sub-layer's own ``dropout`` module is the host
    (used nowhere else), the sub-layer module's first argument the residual stream."""
    ffn = "layer.2" if cross else "layer.1"
    sublayers = {"attn_out": _sub("layer.0.dropout", "layer.0", _HIDDEN, None, "layer.0.SelfAttention")}
    linears = _attention_roles("layer.0.SelfAttention", "q", "k", "v", "o")
    if cross:
        sublayers["cross_attn_out"] = _sub("layer.1.dropout", "layer.1", _HIDDEN, None, "layer.1.EncDecAttention")
        linears.update(_attention_roles("layer.1.EncDecAttention", "q", "k", "v", "o", role_prefix="cross_"))
    sublayers["ffn_out"] = _sub(f"{ffn}.dropout", ffn, _HIDDEN, None, f"{ffn}.DenseReluDense")
    dense = f"{ffn}.DenseReluDense"
    ffn_roles = {"ffn_gate": f"{dense}.wi_0", "ffn_in": f"{dense}.wi_1"} if gated else {"ffn_in": f"{dense}.wi"}
    linears.update({**ffn_roles, "ffn_proj": f"{dense}.wo"})
    return StackSpec(layers=layers, sublayers=sublayers, linears=linears)


def _t5(gated: bool) -> ArchSpec:
    return ArchSpec(
        name="t5-gated" if gated else "t5",
        model_types=("t5", "mt5"),
        stacks={"encoder": _t5_stack("encoder.block", cross=False, gated=gated),
                "decoder": _t5_stack("decoder.block", cross=True, gated=gated)},
        embeddings="shared",
        when=lambda config: bool(getattr(config, "is_gated_act", False)) == gated,
    )


T5 = _t5(gated=False)
T5_GATED = _t5(gated=True)  # T5 v1.1, mT5: wi_0 (through the activation) * wi_1


def _bart_stack(layers: str, cross: bool, pre_ln: bool, heads_attr: str) -> StackSpec:
    """BART layers (and mBART's, which normalise before each sub-layer instead of after it)."""
    def sub(host: str, norm: str, residual: str, input: str) -> SubLayerSpec:
        if pre_ln:  # residual = input of the layer norm that opens the sub-layer
            return _sub(host, norm, _HIDDEN, None, input)
        return _sub(host, residual, ArgRef(0, "hidden_states"), norm, input)

    sublayers = {"attn_out": sub("self_attn", "self_attn_layer_norm", "self_attn", "self_attn")}
    linears = _attention_roles("self_attn", "q_proj", "k_proj", "v_proj", "out_proj")
    if cross:
        sublayers["cross_attn_out"] = sub("encoder_attn", "encoder_attn_layer_norm", "encoder_attn", "encoder_attn")
        linears.update(_attention_roles("encoder_attn", "q_proj", "k_proj", "v_proj", "out_proj", role_prefix="cross_"))
    sublayers["ffn_out"] = sub("fc2", "final_layer_norm", "fc1", "fc1")
    linears.update({"ffn_in": "fc1", "ffn_proj": "fc2"})
    return StackSpec(layers=layers, sublayers=sublayers, linears=linears, heads_attr=heads_attr)


def _bart(name: str, model_types: tuple[str, ...], pre_ln: bool) -> ArchSpec:
    return ArchSpec(
        name=name,
        model_types=model_types,
        stacks={"encoder": _bart_stack("encoder.layers", False, pre_ln, "encoder_attention_heads"),
                "decoder": _bart_stack("decoder.layers", True, pre_ln, "decoder_attention_heads")},
        embeddings="shared",
        post_ln=not pre_ln,
    )


# BART: x = LN(x + dropout(f(x))) with functional dropout, so the host is the attention / fc2 itself
BART = _bart("bart", ("bart",), pre_ln=False)
MBART = _bart("mbart", ("mbart",), pre_ln=True)



def _vit(name: str, model_types: tuple[str, ...], prefix_tokens: int) -> ArchSpec:
    """ViT-family blocks (transformers 5.x), pre-LN: ``h + attention(layernorm_before(h))``, then
    ``h + mlp(layernorm_after(h))``. The block's one ``dropout`` module runs after both sub-layers,
    so the hosts are ``attention`` and ``mlp`` themselves (in training the model's dropout falls
    after the adapter, as on BART)."""
    return ArchSpec(
        name=name,
        model_types=model_types,
        stacks={"encoder": StackSpec(
            layers="layers",
            sublayers={
                "attn_out": _sub("attention", "layernorm_before", ArgRef(0, "input"), None, "attention"),
                "ffn_out": _sub("mlp", "layernorm_after", ArgRef(0, "input"), None, "mlp"),
            },
            linears={**_attention_roles("attention", "q_proj", "k_proj", "v_proj", "o_proj"),
                     "ffn_in": "mlp.fc1", "ffn_proj": "mlp.fc2"},
        )},
        embeddings="embeddings",
        modality="image",
        prefix_tokens=prefix_tokens,
    )


VIT = _vit("vit", ("vit",), prefix_tokens=1)
DEIT = _vit("deit", ("deit",), prefix_tokens=2)  # CLS + distillation token


def _speech(name: str, model_types: tuple[str, ...], stable: bool) -> ArchSpec:
    """wav2vec2-family encoder layers (wav2vec2, HuBERT, WavLM), in both layer-norm orders.

    ``do_stable_layer_norm=False`` (post-LN, ``Wav2Vec2EncoderLayer``)::

        h = layer_norm(h + dropout(attention(h)));  h = final_layer_norm(h + feed_forward(h))

    ``do_stable_layer_norm=True`` (pre-LN, ``...EncoderLayerStableLayerNorm``)::

        h = h + dropout(attention(layer_norm(h)));  h = h + feed_forward(final_layer_norm(h))

    The block's ``dropout`` runs once, after the attention: it is the ``attn_out`` host (what the
    adapter reads is the attention's output as the model adds it). ``feed_forward`` ends with its
    own dropout and is the ``ffn_out`` host. WavLM's attention reads its projections' weights
    directly, so weight places (LoRA, IA3) are refused there by the host probe."""
    if stable:
        sublayers = {
            "attn_out": _sub("dropout", "layer_norm", ArgRef(0, "input"), None, "attention"),
            "ffn_out": _sub("feed_forward", "final_layer_norm", ArgRef(0, "input"), None, "feed_forward"),
        }
    else:
        sublayers = {
            "attn_out": _sub("dropout", "", _HIDDEN, "layer_norm", "attention"),
            "ffn_out": _sub("feed_forward", "feed_forward", _HIDDEN, "final_layer_norm", "feed_forward"),
        }
    return ArchSpec(
        name=f"{name}-stable-ln" if stable else name,
        model_types=model_types,
        stacks={"encoder": StackSpec(
            layers="encoder.layers",
            sublayers=sublayers,
            linears={**_attention_roles("attention", "q_proj", "k_proj", "v_proj", "out_proj"),
                     "ffn_in": "feed_forward.intermediate_dense", "ffn_proj": "feed_forward.output_dense"},
        )},
        embeddings="feature_projection",
        when=lambda config: bool(getattr(config, "do_stable_layer_norm", False)) == stable,
        post_ln=not stable,
        modality="audio",
    )


_SPEECH_TYPES = ("wav2vec2", "hubert", "wavlm")
WAV2VEC2 = _speech("wav2vec2", _SPEECH_TYPES, stable=False)
WAV2VEC2_STABLE = _speech("wav2vec2", _SPEECH_TYPES, stable=True)

ARCHITECTURES: tuple[ArchSpec, ...] = (BERT_LIKE, DISTILBERT, GPT2, LLAMA_LIKE, T5, T5_GATED, BART, MBART, VIT, DEIT,
                                       WAV2VEC2, WAV2VEC2_STABLE)


def is_decoder_config(config) -> bool:
    """Whether a ``transformers`` config describes a decoder-only (causal LM) model: the one
    place that decides it (the loader picks ``AutoModelForCausalLM`` by it, heads pool the last
    token by it). Encoder-decoder models (T5, BART) are not decoders in this sense."""
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    spec = spec_for(config)
    return bool(getattr(config, "is_decoder", False) or (spec is not None and spec.decoder))


def spec_for(config_or_type: Any) -> Optional[ArchSpec]:
    """The entry for a ``transformers`` config (its ``model_type`` and the entries' predicates),
    or for a bare ``model_type`` string (the first entry of that type)."""
    if config_or_type is None or isinstance(config_or_type, str):
        return next((s for s in ARCHITECTURES if config_or_type in s.model_types), None)
    model_type = getattr(config_or_type, "model_type", None)
    return next((s for s in ARCHITECTURES if model_type in s.model_types and s.when(config_or_type)), None)
