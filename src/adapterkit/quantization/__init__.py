"""A quantized frozen base: int8 or 4-bit weights under float32 adapters (QLoRA's idea, on a CPU).

The base is frozen, so it does not need full precision. ``quantize_base(model, "int8" | "int4")``
rewrites a ``transformers`` model (before it is wrapped in an ``AdapterModel``) with
``torchao``'s CPU schemes, ``SCHEMES``:

* ``int8``: every ``nn.Linear`` with int8 weights (one scale per output channel) and int8
  activations quantized per token at run time (``Int8DynamicActivationInt8WeightConfig``): the
  product runs in int8, the fastest path on a CPU;
* ``int4``: every ``nn.Linear`` with 4-bit weights in groups of 32 input channels (asymmetric,
  scales and zero points chosen by HQQ, ``torchao``'s CPU tinygemm layout,
  ``PrototypeInt4WeightOnlyConfig``), run on bfloat16 activations (its only fast CPU path; float32
  activations take ~70x longer);
* the embedding tables (untied ones) as a ``QuantizedEmbedding`` that dequantizes only the rows
  it looks up (in small encoders the token table is half the weights): int8 rows
  (``IntxWeightOnlyConfig``), except the token table under ``int4``: packed 4-bit rows in groups
  of 32 with HQQ scales (``int4_rows.Int4Rows``; torchao has no packed 4-bit CPU embedding).

A quantized Linear becomes a ``QuantizedLinear`` (an ``nn.Linear``, so layouts, LoRA and IA3 find
it as before) whose forward takes and returns the caller's float dtype: hooks, and therefore every
adapter, see a float output. Weight-level adapters (LoRA, IA3) run beside the quantized weight,
as they always run beside the weight (``places/slots.py``); nothing is added into it. Its backward
passes the gradient to the input through the dequantized weight (a straight-through product, as
bitsandbytes' ``MatMul4Bit`` does), so adapters below a quantized layer train; the weight itself
gets none. Merging into a quantized weight is refused (``check_mergeable``).

The fingerprint's sample of each float weight is taken before quantizing and kept on its module
(``fingerprint.keep_float_sample``; ``fingerprint.base_fingerprint`` reads it in place of the
quantized weight, whatever the fingerprint version covers), with the precision on the base
(``PRECISION_ATTR``): an adapter trained on the float base loads on its quantized copy and the
reverse, while a different base is still refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from ..fingerprint import PRECISION_ATTR, keep_float_sample, precision

#: the ``quantize=`` values (``None`` = the float base)
CHOICES = ("int8", "int4")


@dataclass(frozen=True)
class Rows:
    """How an embedding table's rows are stored: ``bits`` per value (8: torchao's int8 rows, one
    scale per row; 4: ``int4_rows.Int4Rows``, packed, a scale and zero point per ``group_size``)."""

    bits: int
    group_size: Optional[int] = None


@dataclass(frozen=True)
class Scheme:
    """One way to quantize the base: a torchao config per Linear, the dtype the quantized product
    runs in, and the rows of untied embedding tables: ``token_rows`` for the model's input (token)
    embeddings, ``rows`` for the others (positions, token types); ``None`` keeps them float."""

    name: str
    linear_config: Callable[[], Any]
    compute_dtype: torch.dtype
    group_size: Optional[int] = None  # Linears whose input width it does not divide stay float
    rows: Optional[Rows] = Rows(8)
    token_rows: Optional[Rows] = Rows(8)


def _int8_config() -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig  # noqa: PLC0415 - optional dependency: quant

    return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


def _int4_config() -> Any:
    from torchao.prototype.quantization.int4.inference_workflow import (  # noqa: PLC0415 - optional dependency: quant
        PrototypeInt4WeightOnlyConfig,
    )
    from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm  # noqa: PLC0415 - optional dependency: quant

    return PrototypeInt4WeightOnlyConfig(group_size=32, int4_choose_qparams_algorithm=Int4ChooseQParamsAlgorithm.HQQ,
                                         set_inductor_config=False)


def _embedding_config() -> Any:
    from torchao.quantization import IntxWeightOnlyConfig  # noqa: PLC0415 - optional dependency: quant
    from torchao.quantization.granularity import PerAxis  # noqa: PLC0415 - optional dependency: quant

    return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


SCHEMES: dict[str, Scheme] = {
    "int8": Scheme("int8", _int8_config, torch.float32),
    # 4-bit token rows: docs/design.md (groups of 32, HQQ; position tables stay int8, by measurement)
    "int4": Scheme("int4", _int4_config, torch.bfloat16, group_size=32, token_rows=Rows(4, group_size=32)),
}


def _torchao():
    """``torchao.quantization``, or an error saying how to install it (its import-time log lines are
    quieted by ``adapterkit/__init__.py``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization  # noqa: PLC0415 - optional dependency: quant
    except ImportError:
        raise AdapterError("quantize= needs torchao: pip install 'adapterkit[quant]' (or pip install torchao "
                           "--no-deps).") from None
    return torchao.quantization


def dequantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight (out, in) a quantized weight stands for. Schemes without a
    ``dequantize`` kernel (4-bit CPU) are read through their own product with the identity."""
    try:
        return weight.dequantize().to(dtype)
    except (NotImplementedError, RuntimeError, AttributeError):
        eye = torch.eye(weight.shape[1], dtype=dtype, device=weight.device)
        return F.linear(eye, weight).T  # (in, in) @ W^T -> (in, out), transposed: (out, in)


def float_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as a float tensor: the weight itself, or the float weight a quantized one
    stands for (dequantized in the layer's compute dtype, returned in float32; built per call, never
    kept). For methods that read the host's weight: DoRA's norm, PiSSA / OLoRA's decomposition."""
    weight = module.weight
    if not is_quantized(module):
        return weight
    return dequantized(weight, getattr(module, "compute_dtype", torch.float32)).to(torch.float32)


class _FrozenProduct(torch.autograd.Function):
    """``x @ W^T`` with a frozen quantized ``W``; the input's gradient goes through ``W``
    dequantized (straight through the quantization), ``W`` gets none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        ctx.weight, ctx.compute_dtype = weight, compute_dtype
        return F.linear(x.to(compute_dtype), weight).to(x.dtype)  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = dequantized(ctx.weight, ctx.compute_dtype)  # (out, in), built per backward: never kept
        return (grad.to(ctx.compute_dtype) @ w).to(grad.dtype), None, None


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` with a ``torchao`` quantized weight; input and output in the
    caller's dtype, the product in ``compute_dtype``. Built by ``quantize_base``."""

    def __init__(self, source: nn.Linear, scheme: Scheme):
        nn.Module.__init__(self)  # no float weight allocated: it comes quantized from ``source``
        self.in_features, self.out_features = source.in_features, source.out_features
        self.scheme, self.compute_dtype = scheme.name, scheme.compute_dtype
        work = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        work.weight = nn.Parameter(source.weight.detach().to(scheme.compute_dtype), requires_grad=False)
        _torchao().quantize_(work, scheme.linear_config())
        self.weight = work.weight  # a Parameter holding the torchao tensor, requires_grad=False
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenProduct.apply(x, self.weight, self.compute_dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def _int8_rows(table: torch.Tensor, rows: Rows) -> torch.Tensor:
    """torchao's int8 rows (``IntxWeightOnlyConfig``, one scale per row)."""
    work = nn.Embedding(*table.shape, device="meta")
    work.weight = nn.Parameter(table.detach(), requires_grad=False)
    _torchao().quantize_(work, _embedding_config(), filter_fn=lambda module, fqn: True)
    return work.weight  # IntxUnpackedToInt8Tensor: qdata (num, dim) int8, scale / zero_point (num, 1)


def _int8_lookup(w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    rows = w.qdata[ids].to(w.scale.dtype) - w.zero_point[ids].to(w.scale.dtype)  # (B, T, dim)
    return rows * w.scale[ids]  # (B, T, dim) * (B, T, 1)


def _int4_rows(table: torch.Tensor, rows: Rows) -> torch.Tensor:
    _torchao()  # the error saying how to install it
    from .int4_rows import Int4Rows  # noqa: PLC0415 - optional dependency: quant (it subclasses a torchao tensor)

    return nn.Parameter(Int4Rows.from_float(table, rows.group_size), requires_grad=False)


def _int4_lookup(w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return w.rows(ids)


#: bits -> (quantize a float table, look rows up without dequantizing the table)
ROW_FORMATS: dict[int, tuple[Callable[[torch.Tensor, Rows], torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    8: (_int8_rows, _int8_lookup),
    4: (_int4_rows, _int4_lookup),
}


class QuantizedEmbedding(nn.Embedding):
    """A frozen ``nn.Embedding`` with quantized rows (``Rows``: int8, one scale per row, torchao's
    ``IntxWeightOnlyConfig``; or packed 4-bit in groups, ``int4_rows.Int4Rows``) that dequantizes
    only the rows it looks up: torchao's own embedding dequantizes the whole table on every call
    (45 ms per forward for MiniLM's 30,522 rows, more than the rest of a short batch). Built by
    ``quantize_base``."""

    def __init__(self, source: nn.Embedding, rows: Rows = Rows(8)):
        nn.Module.__init__(self)  # no float table allocated
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(source, attr))
        quantize, self._lookup = ROW_FORMATS[rows.bits]  # chosen once, not per call
        self.bits = rows.bits
        self.weight = quantize(source.weight, rows)
        self.weight.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._lookup(self.weight, ids)  # (B, T) -> (B, T, dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s own weight is quantized (a ``QuantizedLinear`` or ``QuantizedEmbedding``)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, (QuantizedLinear, QuantizedEmbedding)) or (
        isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter))


def check_scheme(quantize: Optional[str]) -> Optional[Scheme]:
    """The scheme for a ``quantize=`` value (``None`` -> ``None``); anything else is refused."""
    if quantize is None:
        return None
    if quantize not in SCHEMES:
        raise AdapterError(f"quantize={quantize!r} is not a scheme; use one of {', '.join(CHOICES)} (or None for "
                           "the float base).")
    return SCHEMES[quantize]


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied embeddings / LM head)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _token_embedding(model: nn.Module) -> Optional[nn.Module]:
    """The model's input (token) embeddings, if ``transformers`` names them."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        return getter() if getter is not None else None
    except (NotImplementedError, AttributeError):  # models without token embeddings (speech encoders)
        return None


def _rows(scheme: Scheme, table: nn.Embedding, token: bool) -> Optional[Rows]:
    """The rows ``scheme`` gives ``table``: its token rows for the token table, when their group
    divides the width (else the other tables' rows)."""
    rows = scheme.token_rows if token else scheme.rows
    if rows is not None and rows.group_size and table.embedding_dim % rows.group_size:
        return scheme.rows
    return rows


@torch.no_grad()
def quantize_base(model: nn.Module, quantize: Optional[str]) -> nn.Module:
    """Quantize ``model``'s Linear layers (and untied embeddings) in place with ``SCHEMES[quantize]``
    and return it, with the float weights' fingerprint samples and the precision kept on it. Weights shared between
    modules (tied embeddings) stay float. Call it before wrapping the model in an ``AdapterModel``."""
    scheme = check_scheme(quantize)
    if scheme is None:
        return model
    if type(model).__name__ == "AdapterModel":
        raise AdapterError("quantize_base takes the base model, before it is wrapped: "
                           "AdapterModel(quantize_base(model, ...)) or AdapterModel.from_pretrained(..., quantize=...).")
    if getattr(model, PRECISION_ATTR, None):
        raise AdapterError(f"This model is already quantized ({getattr(model, PRECISION_ATTR)}); load the float "
                           "model to quantize it another way.")
    if any(p.requires_grad for p in model.parameters()) and any(p.grad is not None for p in model.parameters()):
        raise AdapterError("The model has gradients on its weights: quantize a frozen base, not one being trained.")
    _torchao()
    tied, token = _tied(model), _token_embedding(model)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if type(child) is nn.Linear and id(child.weight) not in tied and child.weight.is_floating_point():
                if scheme.group_size and child.in_features % scheme.group_size:
                    continue
                swaps.append((parent, child_name, QuantizedLinear(child, scheme)))
            elif (type(child) is nn.Embedding and id(child.weight) not in tied
                  and child.weight.dtype == torch.float32 and child.max_norm is None):
                rows = _rows(scheme, child, child is token)
                if rows is not None:
                    swaps.append((parent, child_name, QuantizedEmbedding(child, rows)))
    for parent, child_name, new in swaps:
        keep_float_sample(new, getattr(parent, child_name).weight)  # the fingerprint reads the float weight's
        setattr(parent, child_name, new)
    setattr(model, PRECISION_ATTR, scheme.name)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's weights, counting a quantized tensor's inner data and scales."""

    def size(t: torch.Tensor) -> int:
        if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
            return t.numel() * t.element_size()
        names, _ = t.__tensor_flatten__()
        return sum(size(getattr(t, n)) for n in names if getattr(t, n, None) is not None)

    return sum(size(p.data if type(p) is nn.Parameter else p) for p in model.parameters())


def check_mergeable(name: str, sites: Any) -> None:
    """Refuse merging adapter ``name`` into quantized weights (called by ``folding.Merges.merge``)."""
    host = next((s for s in sites if is_quantized(s.host)), None)
    if host is not None:
        raise AdapterError(
            f"Adapter '{name}' cannot be merged: the base is quantized ('{host.place_id}' holds "
            f"{getattr(host.host, 'scheme', 'int8')} weights), and folding a float update into them would add the "
            "quantization error to it. Keep the adapter unmerged (it runs beside the quantized weight), or load the "
            "float base (without quantize=) to merge, then quantize the merged model.")


__all__ = ["SCHEMES", "CHOICES", "Scheme", "Rows", "QuantizedLinear", "QuantizedEmbedding", "quantize_base", "is_quantized", "precision",
           "check_scheme", "weight_bytes", "dequantized", "float_weight", "check_mergeable", "PRECISION_ATTR"]
