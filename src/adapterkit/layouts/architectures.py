"""Per-architecture maps: where the layers, sub-layer outputs and projections live.

One declarative entry per family, with paths relative to one transformer block, in the style of
AdapterHub's ``AdapterModelInterface``. No model code is copied: adapters attach to these modules
with hooks (``adapterkit.slots``), so the same table works for ``transformers`` 4.57 and 5.x.

Sub-layer places (read by bottleneck adapters):

* ``attn_out``: output of the attention block before the residual add,
* ``ffn_out``: output of the feed-forward block before the residual add.

Linear roles (read by LoRA / IA3): ``q``, ``k``, ``v`` (``qkv`` when fused), ``attn_proj``,
``ffn_in`` (and ``ffn_gate``), ``ffn_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..slots import ArgRef


@dataclass(frozen=True)
class SubLayerSpec:
    """A residual sub-layer inside a block.

    Args:
        output: module whose output is the sub-layer's output before the residual add.
        residual: module whose forward receives the residual stream ("" = the block itself).
        residual_arg: which argument of that forward holds it.
        layer_norm: the layer norm applied after the residual add (post-LN models), else None.
    """

    output: str
    residual: str
    residual_arg: ArgRef
    layer_norm: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one architecture family (paths relative to a block)."""

    model_types: tuple[str, ...]
    layers: str
    sublayers: dict[str, SubLayerSpec]
    linears: dict[str, str]
    embeddings: str
    lora_default: tuple[str, ...] = ("q", "v")
    ia3_default: tuple[str, ...] = ("k", "v", "ffn_in")
    post_ln: bool = False
    decoder: bool = False


_HIDDEN = ArgRef(0, "hidden_states")

BERT_LIKE = ArchSpec(
    model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra"),
    layers="encoder.layer",
    sublayers={
        "attn_out": SubLayerSpec(
            "attention.output.dropout", "attention.output", ArgRef(1, "input_tensor"), "attention.output.LayerNorm"
        ),
        "ffn_out": SubLayerSpec("output.dropout", "output", ArgRef(1, "input_tensor"), "output.LayerNorm"),
    },
    linears={
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "attn_proj": "attention.output.dense",
        "ffn_in": "intermediate.dense",
        "ffn_proj": "output.dense",
    },
    embeddings="embeddings.word_embeddings",
    post_ln=True,
)

DISTILBERT = ArchSpec(
    model_types=("distilbert",),
    layers="transformer.layer",
    sublayers={
        "attn_out": SubLayerSpec("attention.out_lin", "", _HIDDEN, "sa_layer_norm"),
        "ffn_out": SubLayerSpec("ffn", "ffn", ArgRef(0, "input"), "output_layer_norm"),
    },
    linears={
        "q": "attention.q_lin",
        "k": "attention.k_lin",
        "v": "attention.v_lin",
        "attn_proj": "attention.out_lin",
        "ffn_in": "ffn.lin1",
        "ffn_proj": "ffn.lin2",
    },
    embeddings="embeddings.word_embeddings",
    post_ln=True,
)

GPT2 = ArchSpec(
    model_types=("gpt2",),
    layers="h",
    sublayers={
        "attn_out": SubLayerSpec("attn", "ln_1", _HIDDEN),
        "ffn_out": SubLayerSpec("mlp", "ln_2", _HIDDEN),
    },
    linears={"qkv": "attn.c_attn", "attn_proj": "attn.c_proj", "ffn_in": "mlp.c_fc", "ffn_proj": "mlp.c_proj"},
    embeddings="wte",
    lora_default=("qkv",),
    ia3_default=("qkv", "ffn_in"),
    decoder=True,
)

LLAMA_LIKE = ArchSpec(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers="layers",
    sublayers={
        "attn_out": SubLayerSpec("self_attn.o_proj", "input_layernorm", _HIDDEN),
        "ffn_out": SubLayerSpec("mlp", "post_attention_layernorm", _HIDDEN),
    },
    linears={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "attn_proj": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_in": "mlp.up_proj",
        "ffn_proj": "mlp.down_proj",
    },
    embeddings="embed_tokens",
    decoder=True,
)

ARCHITECTURES: tuple[ArchSpec, ...] = (BERT_LIKE, DISTILBERT, GPT2, LLAMA_LIKE)


def is_decoder_config(config) -> bool:
    """Whether a ``transformers`` config describes a decoder-only (causal LM) model: the one
    place that decides it (the loader picks ``AutoModelForCausalLM`` by it, heads pool the last
    token by it). Encoder-decoder models (T5, BART) are not decoders in this sense."""
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    spec = spec_for(getattr(config, "model_type", None))
    return bool(getattr(config, "is_decoder", False) or (spec is not None and spec.decoder))


def spec_for(model_type: str | None) -> ArchSpec | None:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    return None
