"""UniPELT (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model
Tuning", sec. 3.2): prefix tuning, a bottleneck adapter and LoRA in every layer, each behind its
own learned gate, so that the model learns which to use.

AdapterHub's ``UniPELTConfig`` is a ``ConfigUnion`` of ``PrefixTuningConfig(prefix_length=10)``,
``SeqBnConfig(reduction_factor=16)`` and ``LoRAConfig(r=8, alpha=2)``, each with
``use_gating=True``; the preset ``unipelt`` is the same union on adapterkit's (``union.py``), the
gates being the methods' own ``use_gating`` (``gating.py``). Options apply as in any union:
``add_adapter("u", "unipelt", reduction_factor=8)`` changes the bottleneck part only. Gated
prefixes are for encoder stacks (``gating.py`` says why), so UniPELT runs on encoders (BERT,
RoBERTa, DistilBERT; ``stacks=["encoder"]`` on T5 / BART); it is not mergeable.
"""

from __future__ import annotations

from ..config import register_preset
from .bottleneck import BottleneckConfig
from .lora import LoRAConfig
from .prefix_tuning import PrefixTuningConfig
from .union import ConfigUnion

UNIPELT = ConfigUnion(parts=(PrefixTuningConfig(prefix_length=10, use_gating=True),
                             BottleneckConfig(reduction_factor=16, use_gating=True),
                             LoRAConfig(r=8, alpha=2.0, use_gating=True)))
register_preset("unipelt", UNIPELT)
