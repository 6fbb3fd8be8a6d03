"""The table the shared invariant suite runs over, and the helpers its tests share.

Every invariant test is parametrised over ``CASES``: (tiny architecture) x (method preset and
options), in the style of PEFT's ``tests/testing_common.py`` ``TEST_CASES``, with AdapterHub's
test dimensions (hidden 32, 4 layers, 4 heads, intermediate 37). Adding an architecture is one
entry in ``ARCHS``; adding a method is one entry in ``METHODS`` (plus its parameter formula in
``expected_adapter_params``). The expected numbers are derived from the model config and the
method's formula, never read back from the modules under test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import transformers as T
from torch import nn

from adapterkit import AdapterModel, resolve_config

SST2_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"

# AdapterHub tests/test_methods: hidden 32, 4 layers, 4 heads, intermediate 37.
D, N_LAYERS, N_HEADS, FFN, VOCAB = 32, 4, 4, 37, 100
KV = D // N_HEADS * 2  # decoders below use 2 key/value heads (grouped-query attention)
T5_KV = 6  # T5's d_kv: its attention width (heads x d_kv = 24) differs from d_model


@dataclass(frozen=True)
class Arch:
    """A tiny ``from_config`` model and the shapes of its projections, by stack and layout role."""

    name: str
    auto: Any  # AutoModel or AutoModelForCausalLM
    config: Callable[[], T.PretrainedConfig]
    stacks: dict[str, dict[str, tuple[int, int]]]  # stack -> role -> (in, out) of that projection
    lora_default: tuple[str, ...]  # the roles a default LoRA takes where a stack has them
    ia3_default: tuple[str, ...]
    #: beyond the stacks' roles: roles LoRA also takes here -> (in, out) (``embeddings``; slices of a
    #: fused projection, GPT-2's ``q`` / ``v`` of ``c_attn``), and whether they sit in every layer
    lora_extra: dict[str, tuple[int, int, bool]] = field(default_factory=dict)
    norm_params: int = 0  # parameters of the layer norms inside one block (train_layer_norms)
    inputs: str = "text"  # "text", "image" (pixel_values) or "audio" (input_values)
    weight_places: bool = True  # False: the attention reads its projections' weights (WavLM)

    @property
    def roles(self) -> dict[str, tuple[int, int]]:
        """Every role of every stack."""
        return {r: shape for roles in self.stacks.values() for r, shape in roles.items()}

    @property
    def causal_lm(self) -> bool:
        return self.auto is T.AutoModelForCausalLM

    @property
    def encoder_decoder(self) -> bool:
        return len(self.stacks) > 1

    def places(self, stack: str) -> list[str]:
        """Sub-layer places of a block of ``stack``: cross-attention where it has cross roles."""
        cross = ["cross_attn_out"] if "cross_q" in self.stacks[stack] else []
        return ["attn_out", *cross, "ffn_out"]


_ENCODER = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                intermediate_size=FFN)
_DECODER = dict(_ENCODER, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENC_ROLES = {"q": (D, D), "k": (D, D), "v": (D, D), "attn_proj": (D, D), "ffn_in": (D, FFN), "ffn_proj": (FFN, D)}
_DEC_ROLES = {"q": (D, D), "k": (D, KV), "v": (D, KV), "attn_proj": (D, D), "ffn_gate": (D, FFN),
              "ffn_in": (D, FFN), "ffn_proj": (FFN, D)}
_LORA, _IA3 = ("q", "v"), ("k", "v", "ffn_in")
_SEQ2SEQ_LORA, _SEQ2SEQ_IA3 = _LORA + ("cross_q", "cross_v"), _IA3 + ("cross_k", "cross_v")


def _seq2seq_roles(attn: tuple[int, int], ffn: dict[str, tuple[int, int]]) -> dict[str, dict[str, tuple[int, int]]]:
    """Encoder and decoder roles of an encoder-decoder: q / k / v (D -> attention width), the
    attention output (width -> D), the same again for cross-attention, and the FFN."""
    self_attn = {"q": attn, "k": attn, "v": attn, "attn_proj": attn[::-1]}
    cross = {"cross_q": attn, "cross_k": attn, "cross_v": attn, "cross_proj": attn[::-1]}
    return {"encoder": {**self_attn, **ffn}, "decoder": {**self_attn, **cross, **ffn}}


_T5 = dict(vocab_size=VOCAB, d_model=D, d_kv=T5_KV, d_ff=FFN, num_layers=N_LAYERS, num_heads=N_HEADS,
           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
_BART = dict(vocab_size=VOCAB, d_model=D, encoder_layers=N_LAYERS, decoder_layers=N_LAYERS,
             encoder_attention_heads=N_HEADS, decoder_attention_heads=N_HEADS, encoder_ffn_dim=FFN,
             decoder_ffn_dim=FFN, max_position_embeddings=64)
_FFN = {"ffn_in": (D, FFN), "ffn_proj": (FFN, D)}
# ViT-family: 32x32 images in 8x8 patches (16 patches + CLS, + distillation token on DeiT)
IMAGE, PATCH = 32, 8
_VIT = dict(hidden_size=D, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, intermediate_size=FFN,
            image_size=IMAGE, patch_size=PATCH)
# wav2vec2-family: two conv layers (kernel 10 / 3, stride 5 / 2: 400 samples -> 39 frames), per-frame layer
# norm in the feature encoder (so padding does not move the real frames), no SpecAugment / LayerDrop
AUDIO_SAMPLES = 400
_SPEECH = dict(hidden_size=D, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, intermediate_size=FFN,
               conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), conv_bias=True, num_conv_pos_embeddings=8,
               num_conv_pos_embedding_groups=2, feat_extract_norm="layer", apply_spec_augment=False, layerdrop=0.0,
               vocab_size=12, pad_token_id=0)

_EMB = {"embeddings": (VOCAB, D, False)}

ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("bert", T.AutoModel, lambda: T.BertConfig(**_ENCODER), {"encoder": _ENC_ROLES}, _LORA, _IA3, _EMB,
         norm_params=2 * 2 * D),
    Arch("roberta", T.AutoModel, lambda: T.RobertaConfig(**_ENCODER, pad_token_id=1), {"encoder": _ENC_ROLES},
         _LORA, _IA3),
    Arch("xlm-roberta", T.AutoModel, lambda: T.XLMRobertaConfig(**_ENCODER, pad_token_id=1),
         {"encoder": _ENC_ROLES}, _LORA, _IA3),
    Arch("distilbert", T.AutoModel,
         lambda: T.DistilBertConfig(vocab_size=VOCAB, dim=D, n_layers=N_LAYERS, n_heads=N_HEADS, hidden_dim=FFN),
         {"encoder": _ENC_ROLES}, _LORA, _IA3),
    Arch("gpt2", T.AutoModelForCausalLM,
         lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=FFN,
                              n_positions=64, bos_token_id=1, eos_token_id=2),
         {"decoder": {"qkv": (D, 3 * D), "attn_proj": (D, D), "ffn_in": (D, FFN), "ffn_proj": (FFN, D)}},
         ("qkv",), ("qkv", "ffn_in"), {**_EMB, "q": (D, D, True), "v": (D, D, True)}),
    Arch("llama", T.AutoModelForCausalLM, lambda: T.LlamaConfig(**_DECODER), {"decoder": _DEC_ROLES}, _LORA, _IA3,
         norm_params=2 * D),
    Arch("mistral", T.AutoModelForCausalLM, lambda: T.MistralConfig(**_DECODER), {"decoder": _DEC_ROLES},
         _LORA, _IA3),
    Arch("qwen2", T.AutoModelForCausalLM, lambda: T.Qwen2Config(**_DECODER), {"decoder": _DEC_ROLES}, _LORA, _IA3),
    Arch("t5", T.AutoModel, lambda: T.T5Config(**_T5), _seq2seq_roles((D, N_HEADS * T5_KV), _FFN),
         _SEQ2SEQ_LORA, _SEQ2SEQ_IA3),
    Arch("t5-v1_1", T.AutoModel, lambda: T.T5Config(**_T5, feed_forward_proj="gated-gelu"),
         _seq2seq_roles((D, N_HEADS * T5_KV), {"ffn_gate": (D, FFN), **_FFN}), _SEQ2SEQ_LORA, _SEQ2SEQ_IA3),
    Arch("bart", T.AutoModel, lambda: T.BartConfig(**_BART), _seq2seq_roles((D, D), _FFN), _SEQ2SEQ_LORA,
         _SEQ2SEQ_IA3),
    Arch("mbart", T.AutoModel, lambda: T.MBartConfig(**_BART), _seq2seq_roles((D, D), _FFN), _SEQ2SEQ_LORA,
         _SEQ2SEQ_IA3),
    Arch("vit", T.AutoModel, lambda: T.ViTConfig(**_VIT), {"encoder": _ENC_ROLES}, _LORA, _IA3, inputs="image",
         lora_extra={"patch_embeddings.projection": (3 * PATCH * PATCH, D, False)}),  # a Conv2d
    Arch("deit", T.AutoModel, lambda: T.DeiTConfig(**_VIT), {"encoder": _ENC_ROLES}, _LORA, _IA3, inputs="image"),
    Arch("wav2vec2", T.AutoModel, lambda: T.Wav2Vec2Config(**_SPEECH), {"encoder": _ENC_ROLES}, _LORA, _IA3,
         inputs="audio",  # the feature extractor's two Conv1d: 1 -> 8, kernel 10; 8 -> 8, kernel 3
         lora_extra={"conv_layers.0.conv": (1 * 10, 8, False), "conv_layers.1.conv": (8 * 3, 8, False)}),
    Arch("wav2vec2-stable-ln", T.AutoModel, lambda: T.Wav2Vec2Config(**_SPEECH, do_stable_layer_norm=True),
         {"encoder": _ENC_ROLES}, _LORA, _IA3, inputs="audio"),
    Arch("hubert", T.AutoModel, lambda: T.HubertConfig(**_SPEECH), {"encoder": _ENC_ROLES}, _LORA, _IA3,
         inputs="audio"),
    Arch("wavlm-stable-ln", T.AutoModel, lambda: T.WavLMConfig(**_SPEECH, do_stable_layer_norm=True),
         {"encoder": _ENC_ROLES}, _LORA, _IA3, inputs="audio", weight_places=False),
]}

#: method id -> (preset, options). Small ranks so that LoRA fits every projection.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "pfeiffer": ("pfeiffer", {}),
    "houlsby": ("houlsby", {}),
    "parallel": ("parallel", {}),
    "lora": ("lora", {"r": 4, "alpha": 8.0}),
    "ia3": ("ia3", {}),
    "prefix_tuning": ("prefix_tuning", {"prefix_length": 3, "bottleneck_size": 8}),
    "dora": ("dora", {"r": 4, "alpha": 8.0}),
    "vera": ("vera", {"r": 4}),
    "loreft": ("loreft", {"r": 2, "suffix_positions": 2}),
    "compacter++": ("compacter++", {"reduction_factor": 8}),
    "unipelt": ("unipelt", {"prefix_length": 3, "bottleneck_size": 8, "r": 4}),
}
#: methods that run on some architectures only (the rest run on all of ``ARCHS``)
METHOD_ARCHS: dict[str, tuple[str, ...]] = {
    "prefix_tuning": ("bert", "gpt2", "llama", "mistral", "qwen2", "t5", "bart"),
    "unipelt": ("bert",),  # gated prefixes: encoder stacks only (methods/gating.py); T5 / BART: SEQ2SEQ_METHODS
}
#: methods whose fresh adapter changes the outputs (prefix tuning: its keys and values are drawn)
NOT_IDENTITY_AT_INIT = {"prefix_tuning", "loreft", "unipelt"}  # LoReFT: W, b and R start random (Wu et al. 2024)

#: Extra configurations that exercise options beyond the presets, run on one architecture per layout
#: family. The third element says whether a fresh adapter is an identity: AdapterHub's
#: ``residual_before_ln=False`` / ``"post_add"`` take the adapter's residual after the model's own
#: residual add, which the model then adds again, so those configs change the output from the start
#: (as in AdapterHub ``adapters`` 1.x); every other invariant still holds for them.
EXTRA_METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "houlsby-prenorm-learned": ("houlsby", {"norm_position": "pre", "scaling": "learned", "bottleneck_dim": 5}, True),
    "pfeiffer-postnorm-channel": ("pfeiffer", {"norm_position": "post", "scaling": "channel", "reduction_factor": 4},
                                  True),
    "pfeiffer-ln-residual": ("pfeiffer", {"residual_before_ln": False, "non_linearity": "gelu"}, False),
    "pfeiffer-post-add-leave-out": ("pfeiffer", {"residual_before_ln": "post_add", "leave_out": [0, 3]}, False),
    "lora-all-roles": ("lora", {"r": 2, "alpha": 4.0, "roles": "ALL"}, True),
    "lora-layers": ("lora", {"r": 3, "alpha": 3.0, "layers": [1, 2]}, True),
    "ia3-all-roles": ("ia3", {"roles": "ALL"}, True),
    "lora-pissa": ("lora", {"r": 4, "alpha": 8.0, "init_weights": "pissa"}, True),
    "lora-olora": ("lora", {"r": 3, "alpha": 6.0, "init_weights": "olora", "roles": ["ffn_in", "ffn_proj"]}, True),
    # AdapterHub's use_gating (methods/gating.py): a mean over tokens in encoders, per token in decoders
    "lora-gated": ("lora", {"r": 4, "alpha": 8.0, "use_gating": True, "roles": "ALL"}, True),
    "pfeiffer-gated": ("pfeiffer", {"use_gating": True}, True),
    "vera-full": ("vera", {"r": 4, "full_scaling": True}, True),  # AdapterHub's VeRA: (r, r) and (out, out) matrices
    "houlsby-gated-postnorm": ("houlsby", {"use_gating": True, "norm_position": "post", "scaling": "learned"}, True),
}

#: Configurations of encoder-decoders only: one stack, and the cross-attention place.
SEQ2SEQ_METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "pfeiffer-decoder-stack": ("pfeiffer", {"stacks": ["decoder"]}, True),
    "houlsby-cross": ("houlsby", {"cross_adapter": True}, True),
    "lora-encoder-stack-layers": ("lora", {"r": 2, "alpha": 4.0, "stacks": ["encoder"], "layers": [0, 3]}, True),
    "ia3-decoder-cross-roles": ("ia3", {"roles": ["cross_k", "cross_v"], "stacks": "decoder"}, True),
    "prefix-gated-encoder": ("prefix_tuning", {"prefix_length": 3, "bottleneck_size": 8, "use_gating": True,
                                               "shared_gating": False, "stacks": ["encoder"]}, False),
    "unipelt-encoder": ("unipelt", {"prefix_length": 3, "bottleneck_size": 8, "r": 4, "stacks": ["encoder"]}, False),
}


#: Methods at the ``input`` place (prompt tuning): not the identity at init, since the prompt rows
#: are attended to from the start; run on one architecture per layout family.
INPUT_METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "prompt_tuning": ("prompt_tuning", {"prompt_length": 4}, False),
    "prompt_tuning-from-vocab": ("prompt_tuning", {"prompt_length": 3, "prompt_init": "from_vocab"}, False),
}


@dataclass(frozen=True)
class Case:
    """One (architecture, method configuration) pair."""

    arch: Arch
    method: str
    preset: str
    options: dict[str, Any] = field(default_factory=dict)
    identity_at_init: bool = True
    merges: bool = True  # False: the method merges, but not here (GPT-2's tied input embeddings)

    @property
    def id(self) -> str:
        return f"{self.arch.name}-{self.method}"

    def adapter_options(self) -> dict[str, Any]:
        opts = dict(self.options)
        if opts.get("roles") == "ALL":
            opts["roles"] = list(self.arch.roles)
        return opts

    @property
    def config(self):
        return resolve_config(self.preset, **self.adapter_options())

    @property
    def stack_merges(self) -> bool:
        """Whether two of its adapters merged in turn equal their ``Stack`` (not DoRA: the second
        one's norm is of the weight the first one changed, ``methods/dora.py``)."""
        return getattr(type(self.config), "stack_merges_exactly", True)

    @property
    def mergeable(self) -> bool:
        return self.config.merges_exactly and self.merges  # not a gated LoRA (use_gating)


def _extra_cases() -> list[Case]:
    archs = ["bert", "distilbert", "gpt2", "llama", "t5", "bart"]  # one per layout family
    seq2seq = ["t5", "bart"]
    return ([Case(ARCHS[a], m, *EXTRA_METHODS[m]) for a in archs for m in EXTRA_METHODS]
            + [Case(ARCHS[a], m, *SEQ2SEQ_METHODS[m]) for a in seq2seq for m in SEQ2SEQ_METHODS]
            + [Case(ARCHS[a], m, *INPUT_METHODS[m]) for a in archs for m in INPUT_METHODS])


_LORA_R = {"r": 4, "alpha": 8.0}


def _issue12_cases() -> list[Case]:
    """LoRA beyond Linear (embeddings, GPT-2's q / v slices of ``c_attn``, Conv2d, Conv1d) and
    ``train_layer_norms`` with Pfeiffer and LoRA on a LayerNorm and an RMSNorm model."""
    vit, w2v = ARCHS["vit"], ARCHS["wav2vec2"]
    return [
        Case(ARCHS["bert"], "lora-embeddings", "lora", {**_LORA_R, "roles": ["embeddings", "q", "v"]}),
        Case(ARCHS["gpt2"], "lora-embeddings", "lora", {**_LORA_R, "roles": ["embeddings"]}, merges=False),  # tied
        Case(ARCHS["gpt2"], "lora-qv-slices", "lora", {**_LORA_R, "roles": ["q", "v"]}),
        Case(vit, "lora-conv2d", "lora", {**_LORA_R, "target_modules": ["patch_embeddings.projection"]}),
        Case(w2v, "lora-conv1d", "lora", {"r": 2, "alpha": 4.0, "target_modules": r".*conv_layers\.\d\.conv"}),
        *[Case(ARCHS[a], f"{m}-layer-norms", m, {**opts, "train_layer_norms": True})
          for a in ("bert", "llama") for m, opts in (("pfeiffer", {}), ("lora", _LORA_R))],
    ]


#: ELP speech adapters (not the identity at init: the L-adapter's sum replaces the last layer's output), on the
#: speech layouts and on BERT (an L-adapter fits any stack inside an encoder module; ViT in transformers 5 keeps its
#: layers on the model itself, so there it needs ViTForImageClassification around the backbone)
LAYER_SUM_METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "l_adapter": ("l_adapter", {}, False),
    "e_adapter+l_adapter": ("e_adapter+l_adapter", {}, False),
}


def _method_cases(arch: Arch) -> list[Case]:
    weight = ("lora", "ia3", "dora", "vera")  # refused where the attention reads its projections' weights directly (WavLM)
    cases = [Case(arch, m, *METHODS[m], identity_at_init=m not in NOT_IDENTITY_AT_INIT) for m in METHODS
             if (arch.weight_places or m not in weight) and arch.name in METHOD_ARCHS.get(m, (arch.name,))]
    if arch.inputs == "audio" or arch.name == "bert":
        cases += [Case(arch, m, *LAYER_SUM_METHODS[m]) for m in LAYER_SUM_METHODS]
    return cases


CASES: list[Case] = ([c for arch in ARCHS.values() for c in _method_cases(arch)] + _extra_cases()
                     + _issue12_cases())
CASE_IDS = [c.id for c in CASES]
MERGEABLE = [c for c in CASES if c.mergeable]


# -- expected sizes, from the formulas ------------------------------------------------------------
def _layers_used(cfg) -> int:
    """Layers per stack (every stack of these models has ``N_LAYERS``)."""
    if cfg.layers is not None:
        return len(set(cfg.layers) - set(cfg.leave_out))
    return N_LAYERS - len(set(cfg.leave_out))


def expected_adapter_params(case: Case) -> int:
    """Trainable parameters of the adapter, from each method's formula, summed over the stacks
    it is placed in (a role or place a stack lacks is skipped there)."""
    cfg = case.config
    layers = _layers_used(cfg)
    stacks = cfg.stacks or tuple(case.arch.stacks)
    norms = layers * case.arch.norm_params if cfg.train_layer_norms else 0
    if cfg.method == "bottleneck":
        # per site: down d*m + m, up m*d + d, plus an optional LayerNorm (2d) and scaling (1 or d)
        m = cfg.bottleneck_dim if cfg.bottleneck_dim is not None else int(D // cfg.reduction_factor)
        per_site = D * m + m + m * D + D
        per_site += 2 * D if cfg.norm_position else 0
        per_site += {"learned": 1, "channel": D}.get(cfg.scaling, 0) if isinstance(cfg.scaling, str) else 0
        per_site += (D + 1) if cfg.use_gating else 0  # the gate: Linear(d, 1)
        chosen = {"attn_out": cfg.mh_adapter, "cross_attn_out": cfg.cross_adapter, "ffn_out": cfg.output_adapter}
        sites = sum(chosen[p] for s in stacks for p in case.arch.places(s))
        return per_site * sites * layers + norms
    if cfg.method == "compacter":  # per site: PHM down d -> m and up m -> d, r (d + m) each plus a bias; one rule
        m, r, n = int(D // cfg.reduction_factor), cfg.phm_rank, cfg.phm_dim
        chosen = {"attn_out": cfg.mh_adapter, "cross_attn_out": cfg.cross_adapter, "ffn_out": cfg.output_adapter}
        sites = sum(chosen[p] for s in stacks for p in case.arch.places(s)) * layers
        return sites * (2 * r * (D + m) + m + D) + n ** 3 + norms
    if cfg.method == "l_adapter":  # per layer: Linear d x d + d, LayerNorm 2d; one mixing weight per layer
        return len(stacks) * layers * (D * D + D + 2 * D + 1)
    if cfg.method == "union":
        return sum(expected_adapter_params(Case(case.arch, part.method, part.method, _options_of(part)))
                   for part in cfg.parts)
    if cfg.method == "reft":  # per layer and unit (one, or one per end): W (r, d) + b (r,) + R (r, d)
        units = 1 if cfg.tied_weights else 2
        return len(stacks) * layers * units * (2 * D * cfg.r + cfg.r)
    if cfg.method in ("dora", "vera"):  # on LoRA's Linear layers
        roles = cfg.roles or case.arch.lora_default
        shapes = [case.arch.stacks[s][r] for s in stacks for r in roles if r in case.arch.stacks[s]]
        if cfg.method == "vera":  # d (r,) and b (out,); the shared random matrices are frozen buffers
            if cfg.full_scaling:  # AdapterHub's: d (r, r) and b (out, out)
                return layers * sum(cfg.r * cfg.r + o * o for _, o in shapes) + norms
            return layers * sum(cfg.r + o for _, o in shapes) + norms
        # DoRA: LoRA's r * (in + out) plus a magnitude per output row
        return layers * sum(cfg.r * (i + o) + o for i, o in shapes) + norms
    if cfg.method in ("lora", "ia3"):
        roles = cfg.roles or (case.arch.lora_default if cfg.method == "lora" else case.arch.ia3_default)
        shapes = [] if cfg.target_modules else [case.arch.stacks[s][r] for s in stacks for r in roles
                                                  if r in case.arch.stacks[s]]  # target_modules replace roles
        per_layer = sum(cfg.r * (i + o) for i, o in shapes) if cfg.method == "lora" else sum(o for _, o in shapes)
        per_layer += sum(i + 1 for i, _ in shapes) if getattr(cfg, "use_gating", False) else 0  # gate Linear(in, 1)
        # LoRA's further hosts: r * (in + out), in counting a convolution's kernel (in_channels x kernel)
        chosen = cfg.target_modules or roles if cfg.method == "lora" else ()
        extra = [case.arch.lora_extra[k] for k in case.arch.lora_extra
                 if k in chosen or (isinstance(chosen, str) and re.fullmatch(chosen, f"x.{k}"))]
        once = sum(cfg.r * (i + o) for i, o, in_layers in extra if not in_layers)
        per_layer += sum(cfg.r * (i + o) for i, o, in_layers in extra if in_layers)
        return layers * per_layer + once + norms
    if cfg.method == "prompt_tuning":
        return cfg.prompt_length * D  # one row of the input width per prompt position
    if cfg.method == "prefix_tuning":
        # per stack and attention role: wte (P, d), Linear(d, m), Linear(m, layers * 2 * kv width);
        # flat: the prefixes themselves, (layers, 2, P, kv width)
        stacks = [s for s in stacks if cfg.encoder_prefix or s != "encoder" or not case.arch.encoder_decoder]
        sites = sum(1 + int(cfg.cross_prefix and "cross_q" in case.arch.stacks[s]) for s in stacks)
        roles = case.arch.roles
        kv_width = roles["k"][1] if "k" in roles else roles["qkv"][1] // 3
        out, p, m = layers * 2 * kv_width, cfg.prefix_length, cfg.bottleneck_size
        gates = layers * (D + 1) * (1 if cfg.shared_gating else 2) if cfg.use_gating else 0  # Linear(d, 1 or 2) a layer
        return sites * (out * p if cfg.flat else p * D + D * m + m + m * out + out) + sites * gates
    raise AssertionError(f"no parameter formula for method {cfg.method}: add one to tests/helpers.py")


def expected_saved_params(case: Case) -> int:
    """Tensors the adapter saves: its trainable parameters, plus PiSSA / OLoRA's frozen initial
    ``A`` and ``B`` (as many again, ``methods/lora_init.py``)."""
    cfg = case.config
    if cfg.method == "compacter":  # each PHM layer saves its copy of the shared rule
        stacks = cfg.stacks or tuple(case.arch.stacks)
        chosen = {"attn_out": cfg.mh_adapter, "cross_attn_out": cfg.cross_adapter, "ffn_out": cfg.output_adapter}
        sites = sum(chosen[p] for s in stacks for p in case.arch.places(s)) * _layers_used(cfg)
        return expected_adapter_params(case) + (2 * sites - 1) * cfg.phm_dim ** 3
    if cfg.method == "reft" and cfg.orthogonality:  # torch's orthogonal parametrisation keeps a (d, d) base
        units = (1 if cfg.tied_weights else 2) * len(cfg.stacks or case.arch.stacks) * _layers_used(cfg)
        return expected_adapter_params(case) + units * D * D
    if cfg.method == "vera" and cfg.full_scaling:  # AdapterHub's VeRA saves its random A (r, in) and B (out, r) too
        roles = cfg.roles or case.arch.lora_default
        shapes = [case.arch.stacks[s][r] for s in (cfg.stacks or case.arch.stacks) for r in roles
                  if r in case.arch.stacks[s]]
        return expected_adapter_params(case) + _layers_used(cfg) * sum(cfg.r * (i + o) for i, o in shapes)
    residual = getattr(cfg, "init_weights", "lora") not in ("lora",) and cfg.method == "lora"
    return expected_adapter_params(case) * (2 if residual else 1)


def _options_of(config) -> dict[str, Any]:
    """A config's non-default options (to rebuild it as a ``Case``)."""
    default = type(config)()
    return {k: v for k, v in config.to_dict().items() if k != "method" and v != default.to_dict()[k]}


def expected_head_params(num_labels: int, layers: int = 2, hidden: int = D) -> int:
    """An MLP head: (layers - 1) hidden Linear(d, d), then Linear(d, num_labels)."""
    return (layers - 1) * (hidden * hidden + hidden) + hidden * num_labels + num_labels


# -- building models and batches ----------------------------------------------------------------
def make_base(arch: Arch, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return arch.auto.from_config(arch.config()).eval()


def make_model(case: Case, *, head: bool = False, seed: int = 0, name: str = "a") -> AdapterModel:
    """Base model (eval mode) wrapped, with adapter ``name`` of ``case`` added and active."""
    model = AdapterModel(make_base(case.arch, seed))
    model.add_adapter(name, case.preset, **case.adapter_options())
    if head:
        model.add_classification_head(name, num_labels=3)
    model.set_active_adapters(name)
    return model.eval()


def make_batch(batch_size: int = 4, seq_len: int = 7, seed: int = 1,
               arch: Optional[Arch] = None) -> dict[str, torch.Tensor]:
    """Token ids (avoiding special ids 0-2) with right padding on two rows. Encoder-decoders
    also get the same ids and mask as the decoder's (so heads pool a (B, T, d) output with the
    batch's mask). Image layouts get ``pixel_values``, speech layouts ``input_values`` with the
    same two rows right-padded (zeros, masked)."""
    g = torch.Generator().manual_seed(seed)
    if arch is not None and arch.inputs == "image":
        return {"pixel_values": torch.randn(batch_size, 3, IMAGE, IMAGE, generator=g)}
    if arch is not None and arch.inputs == "audio":
        values = torch.randn(batch_size, AUDIO_SAMPLES, generator=g)
        mask = torch.ones(batch_size, AUDIO_SAMPLES, dtype=torch.long)
        for row, cut in ((1, 60), (2, 90)):
            if row < batch_size:
                mask[row, AUDIO_SAMPLES - cut:] = 0
        return {"input_values": values * mask, "attention_mask": mask}
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, seq_len - 2:] = 0
    if batch_size > 2:
        attention_mask[2, seq_len - 3:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if arch is not None and arch.encoder_decoder:
        batch.update(decoder_input_ids=input_ids.clone(), decoder_attention_mask=attention_mask.clone())
    return batch


def output_of(out: Any) -> torch.Tensor:
    """The main tensor of a model output: logits when there are, else the last hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out[0]


@torch.no_grad()
def run(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    return output_of(model(**batch, **kwargs))


def assert_routed_equals_alone(model: AdapterModel, batch: dict[str, torch.Tensor], names: list,
                               tol: float = 1e-5) -> None:
    """One routed call over ``names`` (one adapter name or ``None`` per row) equals each row run
    alone with its adapter active; leaves no adapter active."""
    routed = run(model, batch, adapter_names=names)
    for i, name in enumerate(names):
        model.set_active_adapters(name)
        alone = run(model, {k: v[i:i + 1] for k, v in batch.items()})
        assert (routed[i:i + 1] - alone).abs().max() <= tol, (i, name)
    model.set_active_adapters(None)


@torch.no_grad()
def perturb(module: nn.Module, scale: float = 0.3, seed: int = 7) -> None:
    """Move every parameter away from its (identity) initialisation, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in nn.Module.state_dict(module).items()}


def assert_state_equal(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    now = nn.Module.state_dict(module)
    assert now.keys() == saved.keys()
    changed = [k for k in saved if not torch.equal(now[k], saved[k])]
    assert not changed, f"tensors changed: {changed[:5]}"


def hook_counts(model: AdapterModel) -> dict[str, tuple[int, int]]:
    """Forward and forward-pre hooks on every module of the wrapped model."""
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.model.named_modules()}


def total_hooks(model: AdapterModel) -> int:
    return sum(a + b for a, b in hook_counts(model).values())


@dataclass
class Snapshot:
    """Everything a failed call must leave exactly as it was."""

    adapters: list[str]
    configs: dict[str, dict]
    heads: list[str]
    setup: Optional[dict]
    active_head: Optional[str]
    state: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    hooks: dict[str, tuple[int, int]]
    output: torch.Tensor
    batch: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: AdapterModel, batch: dict[str, torch.Tensor]) -> "Snapshot":
        return cls(
            adapters=list(model.adapters),
            configs={n: model.records[n].config.to_dict() for n in model.adapters},
            heads=list(model.heads),
            setup=model.active_adapters.to_dict() if model.active_adapters is not None else None,
            active_head=model.active_head,
            state=clone_state(model),  # base weights, adapters and heads
            requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
            hooks=hook_counts(model),
            output=run(model, batch),
            batch=batch,
        )

    def assert_unchanged(self, model: AdapterModel) -> None:
        assert list(model.adapters) == self.adapters
        assert {n: model.records[n].config.to_dict() for n in model.adapters} == self.configs
        assert list(model.heads) == self.heads
        setup = model.active_adapters.to_dict() if model.active_adapters is not None else None
        assert setup == self.setup
        assert model.active_head == self.active_head
        assert {n: p.requires_grad for n, p in model.named_parameters()} == self.requires_grad
        assert hook_counts(model) == self.hooks, "hooks were left behind or removed"
        assert_state_equal(model, self.state)
        assert torch.equal(run(model, self.batch), self.output)


def read_sst2(split: str, limit: Optional[int] = None) -> tuple[list[str], list[int]]:
    """Sentences and labels from ``../shared/data/sst2/<split>.tsv`` (never copied into the repo)."""
    lines = (SST2_DIR / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t") == ["sentence", "label"], lines[0]
    rows = [line.rsplit("\t", 1) for line in lines[1:] if line.strip()]
    rows = rows[:limit] if limit is not None else rows
    return [s.strip() for s, _ in rows], [int(y) for _, y in rows]
