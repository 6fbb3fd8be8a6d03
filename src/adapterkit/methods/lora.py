"""LoRA: a low-rank update ``W + (alpha / r) * B @ A`` on chosen layers: the config.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", sec. 4.1. This file holds
``LoRAConfig`` (which sites, which rank); the modules, one per kind of host layer (Linear and
GPT-2's Conv1D, slices of a fused projection, Embedding, Conv1d/2d/3d), are in
``lora_layers.py``. Roles beyond the layout's projections: ``"embeddings"`` (the input token
embeddings) and, where the layout fuses projections, the slices of a fused one (GPT-2:
``roles=["q", "v"]`` adapts the q and v slices of ``c_attn``, loralib's
``MergedLinear(enable_lora=[True, False, True])``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..errors import AdapterError
from ..layouts import linear_features
from ..places.slots import Site
from ..quantization import float_weight
from .gating import gate_for, gating_refusal
from .lora_init import INITS, ResidualLoRA
from .lora_layers import HOSTS, LORA_HOSTS, LoRA, SlicedSite, host_kind

__all__ = ["LoRAConfig", "LoRA", "pattern_value", "EMBEDDINGS"]

#: the role of the input token embeddings
EMBEDDINGS = "embeddings"


@register_method("lora")
@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA on Linear, Embedding and convolution layers (``lora_layers.HOSTS``).

    Args:
        r: rank of the update (per slice, on slices of a fused projection).
        alpha: scaling numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the LoRA branch's input (none on embeddings, as in PEFT).
        roles: layout roles to adapt (``"q"``, ``"k"``, ``"v"``, ``"attn_proj"``, ``"ffn_in"``,
            ...), or ``"all-linear"`` for every projection of the blocks; ``None`` =
            ``default_roles``: query and value, in self- and cross-attention (PEFT's T5 default
            ``["q", "v"]`` hits both); GPT-2's fused ``qkv`` stands for them. On SST-2 with MiniLM,
            ``"all-linear"`` came within 0.9 points of full fine-tuning where query and value
            stayed 2.2 points short (``docs/training.md``). ``"embeddings"`` adds the input token
            embeddings (place id ``embeddings``; not counted in ``layers``). Where the layout
            fuses projections, an explicit ``"q"`` / ``"k"`` / ``"v"`` adapts that output slice of
            the fused one only (GPT-2's ``c_attn``), while ``"qkv"`` adapts all of it.
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA, Kalajdzievski 2023) instead
            of ``alpha / r``; PEFT's ``use_rslora``.
        rank_pattern / alpha_pattern: per-site ``r`` / ``alpha``, PEFT's options of the same names:
            ``{pattern: value}``, where a pattern is a regex matched against the end of the place id
            (``"value"`` or ``"layers.0.attention.self.query"``); the first matching pattern
            wins, sites matching none use ``r`` / ``alpha``.
        init_weights: ``"lora"`` (A random, B zero), or one initialised from the host's weight
            (``lora_init.INITS``): ``"pissa"`` (principal singular vectors) or ``"olora"`` (QR),
            PEFT's ``init_lora_weights``; on Linear layers, with the base left untouched
            (``lora_init.py`` says how such an adapter is saved and exported).
        use_gating: multiply the update by a learned gate read from the layer's input,
            AdapterHub's ``use_gating`` (UniPELT; ``gating.py``): ``gate(x) * B A x``, the gate
            taking the place of ``alpha / r`` as in AdapterHub; on whole Linear layers with
            ``init_weights="lora"``. A gated LoRA cannot be merged.
    """

    supports_merge = True
    places = ("weight",)
    weight_hosts = LORA_HOSTS
    #: roles used when ``roles`` is None; a role a stack lacks is skipped there
    default_roles: ClassVar[tuple[str, ...]] = ("q", "v", "cross_q", "cross_v")

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    roles: Optional[tuple[str, ...]] = None

    @classmethod
    def training_defaults(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``adapterkit train`` puts LoRA (and DoRA) on every linear layer unless ``roles`` or
        ``target_modules`` are given: on SST-2 with all-MiniLM-L6-v2, query + value stayed 1.6-2.2
        points below full fine-tuning where every linear layer came within 1 (docs/benchmarks.md).
        The Python API keeps the peers' query + value."""
        return {} if {"roles", "target_modules"} & set(options) else {"roles": "all-linear"}
    use_rslora: bool = False
    rank_pattern: Optional[dict[str, int]] = None
    alpha_pattern: Optional[dict[str, float]] = None
    init_weights: str = "lora"
    use_gating: bool = False

    def merge_refusal(self) -> Optional[str]:
        return gating_refusal(self) or super().merge_refusal()

    def validate(self) -> None:
        ranks = [self.r, *(self.rank_pattern or {}).values()]
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
            raise AdapterError(f"LoRA rank r must be a positive integer, got {ranks} (r and rank_pattern).")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.init_weights != "lora" and self.init_weights not in INITS:
            raise AdapterError(f"Unknown init_weights {self.init_weights!r}; choose 'lora', "
                               f"{', '.join(repr(k) for k in INITS)}.")
        for option in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self, option) or {}:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise AdapterError(f"{option} key {pattern!r} is not a valid regex ({err}).") from None

    def for_site(self, place_id: str) -> "LoRAConfig":
        """This config with ``r`` and ``alpha`` resolved for one site (patterns applied)."""
        r = pattern_value(self.rank_pattern, place_id, self.r)
        alpha = pattern_value(self.alpha_pattern, place_id, self.alpha)
        return dataclasses.replace(self, r=r, alpha=alpha, rank_pattern=None, alpha_pattern=None)

    def sites(self, layout) -> list[Site]:
        if self.target_modules is not None or not self.roles:
            return layout.weight_sites(self)
        sliced = _sliced_roles(layout, self.roles, self.stacks)
        plain = [r for r in self.roles if r != EMBEDDINGS and r not in sliced]
        sites = [layout.embedding_site()] if EMBEDDINGS in self.roles else []
        if plain:
            sites += layout.weight_sites(dataclasses.replace(self, roles=tuple(plain)))
        for fused, enabled in _slices(layout, sliced).items():
            taken = {s.place_id for s in sites}
            for site in layout.linear_sites([fused], self.layers, self.leave_out, self.stacks, hosts=LORA_HOSTS):
                if site.place_id in taken:
                    raise AdapterError(f"roles={list(self.roles)} name both '{fused}' and some of its slices "
                                       f"{[r for r, on in zip(layout.spec.fused[fused], enabled) if on]}; "
                                       f"'{fused}' already includes them. Name one or the other.")
                sites.append(SlicedSite(**{f.name: getattr(site, f.name) for f in dataclasses.fields(site)},
                                        enabled=enabled))
        return sites

    def build(self, site: Site) -> nn.Module:
        cfg = self.for_site(site.place_id)
        kind = host_kind(site.host)
        largest = kind.max_rank(site.host)
        if isinstance(site, SlicedSite) and site.enabled:
            largest = min(site.in_features, site.out_features // len(site.enabled))
        if cfg.r > largest:
            raise AdapterError(
                f"LoRA rank r={cfg.r} exceeds the size of '{site.place_id}' ({type(site.host).__name__}, "
                f"{site.in_features} -> {site.out_features}); choose r <= {largest}."
            )
        if cfg.resolved_strategy == "channel_gate" and not kind.channels_last:
            raise AdapterError(f"strategy='channel_gate' gates the last dimension, but '{site.place_id}' is a "
                               "convolution (channels in dimension 1); use 'gate', 'add' or 'scaled_add' there.")
        if cfg.init_weights != "lora":
            if cfg.use_gating:
                raise AdapterError(f"use_gating goes with init_weights='lora' (AdapterHub's gated LoRA), not "
                                   f"{cfg.init_weights!r}; drop one of them.")
            if kind is not HOSTS[0] or isinstance(site, SlicedSite) and site.enabled:
                raise AdapterError(f"init_weights={cfg.init_weights!r} initialises LoRA from a Linear layer's weight; "
                                   f"'{site.place_id}' is not a whole Linear layer. Use init_weights='lora' there.")
            return ResidualLoRA(cfg, site.in_features, site.out_features, linear_features(site.host)[2],
                                float_weight(site.host))  # a quantized base's: dequantized
        unit = kind.build(cfg, site)
        if cfg.use_gating:
            if type(unit) is not LoRA:
                raise AdapterError(f"use_gating reads a Linear layer's input (AdapterHub's gated LoRA); '{site.place_id}' "
                                   "is not a whole Linear layer. Choose Linear roles, or use_gating=False.")
            unit.gate = gate_for(site, site.in_features)
        return unit


def _sliced_roles(layout, roles, stacks) -> list[str]:
    """The roles that name a slice of a fused projection in this layout (GPT-2's ``q`` / ``v``)."""
    if layout.spec is None or not layout.spec.fused:
        return []
    parts = {p for slices in layout.spec.fused.values() for p in slices}
    have = {r for s in layout.select_stacks(stacks) for r in s.roles}
    return [r for r in roles if r in parts and r not in have]


def _slices(layout, sliced: list[str]) -> dict[str, tuple[bool, ...]]:
    """Fused role -> which of its slices are adapted."""
    return {fused: tuple(p in sliced for p in parts) for fused, parts in layout.spec.fused.items()
            if any(p in sliced for p in parts)}


def pattern_value(patterns: Optional[dict], place_id: str, default):
    """PEFT's rule (``get_pattern_key``): the first pattern matching the end of the name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", place_id):
            return value
    return default


register_preset("lora", LoRAConfig())
