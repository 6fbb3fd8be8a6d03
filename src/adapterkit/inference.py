"""Predictions for raw text lines, as ``adapterkit predict`` prints them.

One input is one example: a text (for a pair task a tab separates the two texts, or pass a
``(text, pair)`` tuple), for tagging a token list or a text split on whitespace, for a causal LM
a prompt. Results are dicts (printed as TSV or JSON lines):

* classification: ``label``, ``probability`` and every label's probability;
* multilabel: the ``labels`` whose sigmoid is >= the threshold (0.5) and every probability;
* regression: ``value`` in the label's units;
* tagging: ``tokens`` and one ``tags`` entry per token (the first word piece decides);
* causal-lm: the greedy continuation (``generated``), ``max_new_tokens`` long at most;
* lm-classification: as classification (probabilities are the LM's answer scores renormalised
  over the labels), plus the ``answer`` word;
* ctc (audio clips, ``predict_audio``): the greedy CTC transcript (``text``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .data import Table, TaskSpec, encode
from .data.ctc import Vocabulary, greedy_ids
from .train.choices import choice_scores

Input = Union[str, tuple[str, str], list[str]]


def _pair(item: Input, paired: bool) -> tuple[str, Optional[str]]:
    if isinstance(item, tuple):
        return item[0], item[1]
    if paired:
        first, _, second = str(item).partition("\t")
        return first, second
    return str(item), None


def _shown(item: Input) -> str:
    """How an input is printed beside its prediction."""
    if isinstance(item, tuple):
        return "\t".join(item)
    return " ".join(item) if isinstance(item, list) else item


@torch.inference_mode()
def predict_texts(model: Any, tokenizer: Any, spec: TaskSpec, lines: Sequence[Input], *, batch_size: int = 32,
                  max_new_tokens: int = 64) -> list[dict[str, Any]]:
    model.eval()
    if spec.task == "causal-lm":
        return _generate(model, tokenizer, spec, lines, batch_size, max_new_tokens)
    if spec.task == "lm-classification":
        return _choose(model, tokenizer, spec, lines, batch_size)
    out: list[dict[str, Any]] = []
    for start in range(0, len(lines), batch_size):
        chunk = list(lines[start : start + batch_size])
        if spec.task == "tagging":
            out += _tag(model, tokenizer, spec, chunk)
            continue
        pairs = [_pair(item, bool(spec.columns.text_pair)) for item in chunk]
        firsts = [a for a, _ in pairs]
        seconds = [b or "" for _, b in pairs] if spec.columns.text_pair else None
        batch = tokenizer(firsts, seconds, truncation=True, max_length=spec.max_length, padding=True, return_tensors="pt")
        if not spec.columns.text_pair:
            batch.pop("token_type_ids", None)
        logits = model(**batch).logits.float()
        for item, row in zip(chunk, logits):
            out.append({"text": _shown(item), **_read(spec, row)})
    return out


@torch.inference_mode()
def predict_audio(model: Any, clips: Any, spec: TaskSpec, *, batch_size: int = 32) -> list[dict[str, Any]]:
    """Labels of audio clips (a ``data.audio.AudioSet``), in their order, each with its ``path``;
    batches hold clips of similar length (little padding), as evaluation runs them. For ``ctc``
    each clip's ``text`` is its greedy transcript (``data.ctc``)."""
    model.eval()
    order = sorted(range(len(clips)), key=lambda i: clips.lengths()[i])
    found: dict[int, dict[str, Any]] = {}
    vocab = Vocabulary(tuple(spec.labels)) if spec.task == "ctc" else None
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = clips.collate(chunk, with_labels=False)
        logits = model(**batch).logits.float()  # (B, labels), or (B, frames, vocabulary) for ctc
        if vocab is not None:
            frames = model.layout.hidden_mask(batch["attention_mask"], logits)
            for i, ids in zip(chunk, greedy_ids(logits, frames)):
                found[i] = {"path": clips.paths[i], "text": vocab.decode(ids)}
            continue
        for i, row in zip(chunk, logits):
            found[i] = {"path": clips.paths[i], **_read(spec, row)}
    return [found[i] for i in range(len(clips))]


def _read(spec: TaskSpec, row: torch.Tensor) -> dict[str, Any]:
    if spec.task == "regression":
        return {"value": row[0].item() * spec.target_std + spec.target_mean}
    if spec.task == "multilabel":
        probs = torch.sigmoid(row)
        chosen = [spec.labels[i] for i in range(len(spec.labels)) if probs[i] >= spec.threshold]
        return {"labels": chosen, "probabilities": {l: round(p, 6) for l, p in zip(spec.labels, probs.tolist())}}
    probs = torch.softmax(row, -1)
    best = int(probs.argmax())
    return {"label": spec.labels[best], "probability": probs[best].item(),
            "probabilities": {l: round(p, 6) for l, p in zip(spec.labels, probs.tolist())}}


def _choose(model: Any, tokenizer: Any, spec: TaskSpec, lines: Sequence[Input], batch_size: int) -> list[dict[str, Any]]:
    """Score every label's answer after each prompt (``train.choices``) and read them as logits."""

    text, pair = spec.columns.text or "text", spec.columns.text_pair
    pairs = [_pair(item, bool(pair)) for item in lines]
    rows = [{text: a, **({pair: b or ""} if pair else {})} for a, b in pairs]
    table = Table(Path("<input>"), "tsv", [text] + ([pair] if pair else []), rows, list(range(1, len(rows) + 1)))
    enc = encode(spec, table, tokenizer, with_labels=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = choice_scores(model, enc.input_ids, enc.choices or [], batch_size=batch_size, pad_id=pad)
    out = []
    for item, row in zip(lines, scores.float()):
        read = _read(spec, row)
        out.append({"text": _shown(item), **read, "answer": spec.verbalizer[spec.labels.index(read["label"])]})
    return out


def _tag(model: Any, tokenizer: Any, spec: TaskSpec, chunk: list[Input]) -> list[dict[str, Any]]:
    words = [list(item) if isinstance(item, list) else str(item).split() for item in chunk]
    batch = tokenizer(words, is_split_into_words=True, truncation=True, max_length=spec.max_length,
                      padding=True, return_tensors="pt")
    word_ids = [batch.word_ids(i) for i in range(len(words))]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    out = []
    for i, ws in enumerate(words):
        tags: list[str] = ["O" if "O" in spec.labels else ""] * len(ws)  # words cut off by max_length
        seen = set()
        for t, w in enumerate(word_ids[i]):
            if w is not None and w not in seen:
                seen.add(w)
                tags[w] = spec.labels[int(logits[i, t].argmax())]
        out.append({"text": _shown(chunk[i]), "tokens": ws, "tags": tags})
    return out


def _generate(model: Any, tokenizer: Any, spec: TaskSpec, lines: Sequence[Input], batch_size: int,
              max_new_tokens: int) -> list[dict[str, Any]]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last real token
    try:
        out = []
        for start in range(0, len(lines), batch_size):
            chunk = [_shown(item) for item in lines[start : start + batch_size]]
            prompts = [spec.prompt_template.format(prompt=p) for p in chunk] if spec.columns.prompt else chunk
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            ids = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = ids[:, batch["input_ids"].shape[1]:]
            for line, seq in zip(chunk, new):
                out.append({"text": line, "generated": tokenizer.decode(seq, skip_special_tokens=True)})
        return out
    finally:
        tokenizer.padding_side = side
