"""Quantized embedding tables (``quantization.QuantizedEmbedding``): packed 4-bit token rows under
``quantize="int4"`` (``quantization.int4_rows.Int4Rows``), int8 rows elsewhere.

* the packed rows stand for the float table within half a quantization step per group (a zero
  padding row stays exactly zero), two codes a byte, with float16 scales and zero points: 0.625
  bytes a value (int8 rows: 1 + a row scale);
* a lookup dequantizes the looked-up rows only, and equals the whole table dequantized, then indexed;
* under ``int4`` only the token table is 4-bit; position tables keep int8 rows, and a token table
  whose width the group does not divide keeps int8 rows too; the module survives ``deepcopy``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from torch import nn

from adapterkit import AdapterModel
from adapterkit.quantization import QuantizedEmbedding, Rows, quantize_base, weight_bytes

pytest.importorskip("torchao")
from adapterkit.quantization.int4_rows import Int4Rows  # noqa: E402 - needs torchao


def _table(num: int = 50, dim: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn(num, dim, generator=g)


def test_packed_rows_stand_for_the_table_within_half_a_step():
    table = _table()
    w = Int4Rows.from_float(table, 32)
    assert w.shape == table.shape and w.dtype == torch.float32
    assert w.qdata.shape == (50, 32) and w.qdata.dtype == torch.uint8  # two codes a byte
    assert w.scale.shape == w.zero_point.shape == (50, 2) and w.scale.dtype == torch.float16
    deq = w.dequantize()
    groups = table.reshape(50, 2, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # (num, groups): one level
    err = (deq - table).abs().reshape(50, 2, 32).amax(-1)
    assert (err <= 0.5 * step * 1.01 + 1e-6).all()  # round to nearest level (float16 scales: 1 % slack)
    assert 0.01 < ((deq - table).norm() / table.norm()).item() < 0.12  # quantized, not stored float
    codes = torch.stack((w.qdata & 0xF, w.qdata >> 4), -1).reshape(50, 64)
    assert codes.min() == 0 and codes.max() == 15  # every group spans the 16 levels
    table[7] = 0.0  # a padding row (BERT's is zero), and a constant row
    table[8] = 0.25
    deq = Int4Rows.from_float(table, 32).dequantize()
    assert torch.equal(deq[7], table[7]) and torch.allclose(deq[8], table[8], rtol=1e-3)


def test_lookup_dequantizes_only_the_rows_it_reads(monkeypatch):
    emb = nn.Embedding(50, 64)
    with torch.no_grad():
        emb.weight.copy_(_table())
    q = QuantizedEmbedding(emb, Rows(4, group_size=32))
    ids = torch.tensor([[3, 7, 49], [0, 0, 12]])
    whole = q.weight.dequantize()[ids]
    assert torch.equal(nn.functional.embedding(ids, q.weight), whole)  # a whole-table user gets the same

    def whole_table(*args, **kwargs):
        raise AssertionError("the lookup dequantized the whole table")

    monkeypatch.setattr(Int4Rows, "dequantize", whole_table)
    assert torch.equal(q(ids), whole)  # (B, T, dim), bit for bit
    assert not q.weight.requires_grad


def _bert(hidden: int = 64, heads: int = 4) -> nn.Module:
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                       intermediate_size=2 * hidden, vocab_size=96, max_position_embeddings=64)
    return T.BertModel(cfg).eval()


def test_int4_packs_the_token_table_only():
    float_base = _bert()
    q = quantize_base(copy.deepcopy(float_base), "int4")
    emb = q.embeddings
    assert isinstance(emb.word_embeddings.weight, Int4Rows)
    for table in (emb.position_embeddings, emb.token_type_embeddings):  # used by every input: int8 rows
        assert isinstance(table, QuantizedEmbedding) and table.bits == 8
    int8 = quantize_base(copy.deepcopy(float_base), "int8")
    assert int8.embeddings.word_embeddings.bits == 8
    # packed token rows: 4 bits + (2 x 16 bits) / 32 a value, against 8 bits + 5 bytes a row
    table_bytes = {k: weight_bytes(m.embeddings.word_embeddings) for k, m in (("int4", q), ("int8", int8))}
    assert table_bytes["int4"] == 96 * (32 + 2 * 2 * 2)
    assert table_bytes["int4"] < 0.6 * table_bytes["int8"]  # 0.625 bytes a value against 1.08
    ids = torch.randint(1, 96, (3, 8))
    f_out, q_out = float_base(input_ids=ids).last_hidden_state, q(input_ids=ids).last_hidden_state
    assert 1e-4 < ((q_out - f_out).norm() / f_out.norm()).item() < 0.1
    copied = copy.deepcopy(AdapterModel(q))  # the packed tensor survives deepcopy (the server's copies)
    assert torch.equal(copied.model(input_ids=ids).last_hidden_state, q_out)


def test_a_width_the_group_does_not_divide_keeps_int8_rows():
    q = quantize_base(_bert(hidden=48), "int4")  # 48 % 32: no 4-bit groups
    assert q.embeddings.word_embeddings.bits == 8
    assert type(q.encoder.layer[0].attention.self.query) is nn.Linear  # int4 Linears need it too
