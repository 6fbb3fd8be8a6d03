"""A content fingerprint of a base model, so an adapter never loads silently into another base.

Shapes alone cannot tell two bases apart: an adapter trained on one BERT-small loads into any
other BERT-small, and gives wrong answers without a word. ``base_fingerprint`` hashes a fixed,
deterministic sample of the base weights: ``SAMPLES`` values at evenly strided positions of every
parameter of the transformer blocks (named relative to the blocks, so ``BertModel`` and
``BertForSequenceClassification`` of the same weights agree), or of the whole model on the
generic path. The values are rounded to bfloat16 and hashed as float32 bytes with their names
and shapes (sha256, first 16 hex digits). So the fingerprint is:

* the same after saving and loading the base, on every device, and for the base loaded in
  float32 or bfloat16 (float16 loses range and rounds differently: it gives another fingerprint);
* different for a base with other weights of the same shapes (fine-tuned, re-initialised, ...);
* computed on the original weights when adapters are merged into them;
* the float base's for a base quantized by ``quantization.quantize_base`` (computed before
  quantizing and kept on the model), so adapters move between a base and its quantized copy;
  ``base_identity`` records the ``precision`` too, and loading across precisions says so.

``save_adapter`` records it with the base's name (``base_identity``); ``load_adapter`` refuses
a mismatch (``check_same_base``) unless ``strict_base=False`` (CLI ``--allow-other-base``).
Checkpoints written before fingerprints existed load as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .errors import CheckpointError

SAMPLES = 256
DIGITS = 16
#: set on a base by ``quantization.quantize_base``: the float base's fingerprint, and the precision
FINGERPRINT_ATTR = "adapterkit_float_fingerprint"
PRECISION_ATTR = "adapterkit_precision"


def _named_weights(model: nn.Module, layout: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The sampled tensors, with names that do not depend on the wrapper class."""
    if layout is not None and getattr(layout, "blocks", None):
        for i, block in enumerate(layout.blocks):
            for name, p in block.named_parameters():
                yield f"{i}.{name}", p
        return
    for name, p in getattr(model, "base_model", model).named_parameters():
        yield name, p


@torch.no_grad()
def _sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    n = flat.numel()
    index = torch.arange(min(SAMPLES, n), device=flat.device) * (n // min(SAMPLES, n)) if n else None
    values = flat[index] if index is not None else flat
    return values.to(torch.bfloat16).to(torch.float32).cpu()


def base_fingerprint(model: nn.Module, layout: Any = None) -> str:
    """The content fingerprint of ``model``'s weights (see the module docstring)."""
    kept = getattr(model, FINGERPRINT_ATTR, None)  # a quantized base: its float weights' (quantization.py)
    if kept:
        return kept
    digest = hashlib.sha256()
    for name, p in sorted(_named_weights(model, layout), key=lambda item: item[0]):
        if not p.is_floating_point():
            continue
        digest.update(f"{name}:{tuple(p.shape)};".encode())
        digest.update(_sample(p).numpy().tobytes())
    return digest.hexdigest()[:DIGITS]


def base_name(model: nn.Module) -> Optional[str]:
    """Where the base came from, as ``transformers`` recorded it (a folder or a hub name)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def precision(model: nn.Module) -> str:
    """``"int8"`` / ``"int4"`` for a base quantized by ``quantization.quantize_base``, else its
    parameters' dtype (``"float32"``)."""
    mark = getattr(model, PRECISION_ATTR, None)
    if mark:
        return mark
    p = next(iter(model.parameters()), None)
    return str(p.dtype).replace("torch.", "") if p is not None else "float32"


def base_identity(handle: Any) -> dict[str, Any]:
    """What ``save_adapter`` records about the base of an ``AdapterModel``: ``fingerprint`` and
    ``name``; merged adapters are taken out while the original weights are sampled."""
    merged = bool(handle.merged_adapters)
    with handle.disable_adapters() if merged else contextlib.nullcontext():
        fingerprint = base_fingerprint(handle.model, handle.layout)
    return {"fingerprint": fingerprint, "name": base_name(handle.model), "precision": precision(handle.model)}


def check_same_base(saved: dict[str, Any], handle: Any, directory: Any, *, strict: bool = True) -> None:
    """Refuse an adapter whose recorded base fingerprint differs from ``handle``'s base."""
    want = saved.get("fingerprint")
    if not strict or not want:
        return
    mine = base_identity(handle)
    if mine["fingerprint"] == want:
        saved_precision = saved.get("precision") or "float32"
        if saved_precision != mine["precision"]:
            warnings.warn(f"{directory} was trained on this base in {saved_precision}; it runs here on the "
                          f"{mine['precision']} copy of it (outputs differ by the quantization error).", stacklevel=3)
        return
    raise CheckpointError(
        f"{directory} was trained on another base model ({saved.get('name') or 'unnamed'}, fingerprint {want}) than "
        f"this one ({mine['name'] or 'unnamed'}, fingerprint {mine['fingerprint']}): its outputs would be wrong. "
        "Load it into the base it was trained on, or pass strict_base=False (CLI --allow-other-base) to use it anyway."
    )


__all__ = ["base_fingerprint", "base_name", "base_identity", "check_same_base", "precision", "FINGERPRINT_ATTR",
           "PRECISION_ATTR"]
