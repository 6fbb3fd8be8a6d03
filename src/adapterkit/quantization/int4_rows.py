"""Packed 4-bit embedding rows: ``Int4Rows``, a tensor standing for a float (num, dim) table.

Each row is cut into groups of ``group_size`` values along the hidden dim; a group keeps a
float16 scale and zero point from its minimum and maximum (asymmetric, levels 0..15, the zero
point rounded: ``torchao``'s ``_choose_qparams_and_quantize_affine_hqq`` without HQQ's
optimisation, which measured no better on the table and took 23 s for MiniLM's: docs/design.md),
and its values as 4-bit codes, two per byte (even column in the low nibble, odd in the high one)::

    value = (code - zero_point) * scale          # per group of group_size values

``rows(ids)`` gathers the packed rows of ``ids`` only, then unpacks and scales them: a lookup
never dequantizes the table (torchao 0.18 has no packed 4-bit embedding on CPU; its unpacked
``IntxUnpackedToInt8Tensor`` keeps one byte per value). ``dequantize()`` gives the whole table
(what ``F.embedding`` on this tensor uses). Built by ``QuantizedEmbedding`` for
``quantize="int4"``; this module imports ``torchao`` (the ``quant`` extra) and is imported only
when a table is quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq
from torchao.utils import TorchAOBaseTensor

__all__ = ["Int4Rows"]

#: dtype of the per-group scales and zero points (float32 measured no better: docs/design.md)
PARAM_DTYPE = torch.float16


class Int4Rows(TorchAOBaseTensor):
    """``qdata`` (num, dim / 2) uint8, two codes a byte; ``scale``, ``zero_point`` (num, dim /
    group_size) float16; shape (num, dim) and the dtype of the table it stands for."""

    tensor_data_names = ["qdata", "scale", "zero_point"]
    tensor_attribute_names = ["group_size", "shape", "dtype"]

    def __new__(cls, qdata, scale, zero_point, group_size, shape, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device,  # type: ignore[attr-defined]
                                                   requires_grad=False)

    def __init__(self, qdata, scale, zero_point, group_size, shape, dtype):
        super().__init__()
        self.qdata, self.scale, self.zero_point, self.group_size = qdata, scale, zero_point, group_size

    @classmethod
    def from_float(cls, table: torch.Tensor, group_size: int) -> "Int4Rows":
        num, dim = table.shape
        codes, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
            table.detach().float(), nbits=4, group_size=group_size, optimize=False, axis=1, compute_dtype=PARAM_DTYPE,
            device=str(table.device), raw_output=True)  # codes (num * dim / g, g) in 0..15; scale, zero (num, dim / g)
        codes = codes.reshape(num, dim // 2, 2)
        packed = (codes[..., 0] | (codes[..., 1] << 4)).contiguous()  # (num, dim / 2)
        return cls(packed, scale.reshape(num, -1).contiguous(), zero.reshape(num, -1).contiguous(), group_size,
                   table.shape, table.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The float rows of ``ids`` (..., ) -> (..., dim), dequantizing those rows only."""
        packed = self.qdata[ids]  # (..., dim / 2)
        codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).to(self.dtype)  # (..., dim / 2, 2)
        groups = codes.reshape(*ids.shape, -1, self.group_size)  # (..., dim / g, g)
        zero = self.zero_point[ids].unsqueeze(-1).to(self.dtype)  # (..., dim / g, 1)
        scale = self.scale[ids].unsqueeze(-1).to(self.dtype)  # in the table's dtype: float16 math is slower on a CPU
        return ((groups - zero) * scale).reshape(*ids.shape, self.shape[1])

    def dequantize(self, output_dtype=None) -> torch.Tensor:
        table = self.rows(torch.arange(self.shape[0], device=self.qdata.device))  # (num, dim)
        return table if output_dtype is None else table.to(output_dtype)

    def _quantization_type(self) -> str:
        return f"shape={tuple(self.shape)}, group_size={self.group_size}, 4-bit rows"


implements = Int4Rows.implements
implements_torch_function = Int4Rows.implements_torch_function


@implements(torch.ops.aten.embedding.default)
@implements_torch_function(F.embedding)
def _embedding(func, types, args, kwargs):
    ids, weight = args[0], args[1]
    return F.embedding(ids, weight.dequantize(), **(kwargs or {}))


@implements([torch.ops.aten.new_zeros.default, torch.ops.aten.new_empty.default])
def _new_plain(func, types, args, kwargs):
    kwargs = dict(kwargs or {})
    kwargs.setdefault("dtype", args[0].dtype)
    kwargs.setdefault("device", args[0].device)
    return func(torch.empty(0, dtype=args[0].dtype, device=args[0].device), *args[1:], **kwargs)  # a plain tensor
