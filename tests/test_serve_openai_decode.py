"""Continuous batching (serve/decode_loop.py): every greedy row of a running batch, joining and
leaving at different steps, with its own adapter of any method, equals ``generate`` alone."""

from __future__ import annotations

import pytest
import torch
import transformers

from adapterkit import AdapterModel
from adapterkit.loader import load_tokenizer
from adapterkit.serve.decode_loop import DecodeBatch, QueueFull, Row
from adapterkit.serve.sampling import SamplingParams

METHODS = {"lora": ("lora", {"r": 4}), "bn": ("pfeiffer", {}), "ia3": ("ia3", {}),
           "prefix": ("prefix_tuning", {"prefix_length": 4, "bottleneck_size": 16}),
           "prompt5": ("prompt_tuning", {"prompt_length": 5}), "prompt3": ("prompt_tuning", {"prompt_length": 3}),
           "union": ("lora+prefix_tuning", {})}

CONFIGS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=30522, max_position_embeddings=512)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=30522, n_positions=512)),
}


def _model(kind: str) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(CONFIGS[kind]())
    for name, (method, options) in METHODS.items():
        model.add_adapter(name, method, **options)
    torch.manual_seed(1)
    for p in model.adapters.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def _alone(model: AdapterModel, ids: list[int], name, max_tokens: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=[name],
                         max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_rows_joining_and_leaving_equal_generate_alone(kind, tokenizer):
    model = _model(kind)
    g = torch.Generator().manual_seed(3)
    names = [None, *METHODS]
    requests = []
    for i in range(18):
        length, max_tokens = int(torch.randint(2, 40, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        requests.append((torch.randint(1000, 30000, (length,), generator=g).tolist(), names[i % len(names)],
                         max_tokens))
    batch = DecodeBatch(model, tokenizer, max_rows=64)
    rows = [Row(ids, name, SamplingParams(max_tokens=n)) for ids, name, n in requests]
    batch.submit(rows[:5], 100)  # three waves: rows join a batch that is mid-way
    batch.tick(), batch.tick()
    batch.submit(rows[5:11], 100)
    batch.tick()
    batch.submit(rows[11:], 100)
    widths = []
    while batch.busy:
        batch.tick()
        widths.append(batch.P + batch.U)
    for row, (ids, name, n) in zip(rows, requests):
        assert row.output == _alone(model, ids, name, n), (name, len(ids), n)
        assert row.finish_reason in ("length", "stop")
    assert batch.cache is None and batch.rows == []  # every row left


def test_cancelled_rows_leave_and_the_rest_stay_exact(tokenizer):
    model = _model("llama")
    prompts = [[2000 + i for i in range(k)] for k in (7, 30, 12)]
    rows = [Row(p, name, SamplingParams(max_tokens=12)) for p, name in zip(prompts, ["prompt5", "lora", "prompt3"])]
    batch = DecodeBatch(model, tokenizer)
    batch.submit(rows, 10)
    batch.tick(), batch.tick()
    rows[0].cancelled = rows[1].cancelled = True  # the row with the longest prompt and the longest text go
    batch.tick()
    assert batch.rows == [rows[2]] and batch.P == 3 and batch.U == len(prompts[2]) + 3
    while batch.busy:
        batch.tick()
    assert rows[2].output == _alone(model, prompts[2], "prompt3", 12)


def test_limits_stop_strings_and_logprobs(tokenizer):
    model = _model("llama")
    ids = [2000 + i for i in range(6)]
    want = _alone(model, ids, "lora", 10)
    text = tokenizer.decode(want, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    stop = next(w for w in text.split() if text.find(w) > 0)  # a word that first appears after the start
    batch = DecodeBatch(model, tokenizer, max_rows=1)
    rows = [Row(ids, "lora", SamplingParams(max_tokens=10, stop=(stop,), logprobs=2)),
            Row(ids, "lora", SamplingParams(max_tokens=10))]
    updates: dict[int, list] = {0: [], 1: []}
    for i, row in enumerate(rows):
        row.sink = updates[i].append
    batch.submit(rows, 10)
    for row, update in batch.tick():
        row.sink(update)
    assert batch.rows == [rows[0]] and len(batch.pending) == 1  # max_rows=1: the second waits
    while batch.busy:
        for row, update in batch.tick():
            row.sink(update)
    assert rows[0].finish_reason == "stop" and rows[0].text == text[:text.find(stop)]
    assert "".join(u.text for u in updates[0]) == rows[0].text  # what streams is the answer
    info = [t for u in updates[0] for t in u.tokens]
    assert [t.token for t in info] == want[:len(info)] and all(t.top[0][1] >= t.logprob for t in info)
    assert all(t.top[0][0] == t.text for t in info)  # greedy: the chosen token is the most likely
    assert rows[1].output == want and rows[1].finish_reason == "length"
    assert "".join(u.text for u in updates[1]) == text


def test_the_queue_refuses_rows_past_its_size_and_forgets_cancelled_ones(tokenizer):
    batch = DecodeBatch(_model("llama"), tokenizer)
    rows = [Row([2000, 2001], None, SamplingParams(max_tokens=2)) for _ in range(3)]
    batch.submit(rows[:2], 2)
    with pytest.raises(QueueFull):
        batch.submit(rows[2:], 2)
    rows[0].cancelled = True  # its client left: its place is free
    batch.submit(rows[2:], 2)
    assert list(batch.pending) == rows[1:]
