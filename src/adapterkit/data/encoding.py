"""Encoding: rows of a ``Table`` to token ids and training targets, as a ``TaskSpec`` says.

Nothing is padded here (batches pad to their own longest row). Tagging labels the first word
piece of each word (-100 elsewhere); causal-LM rows put the loss on the completion (and EOS) only;
``lm-classification`` rows on the label's answer tokens only (``verbalizer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .files import DataError, Table, _where
from .task import TaskSpec, _inputs, row_labels
from .verbalizer import encode_verbalized

# -- examples and encoding -----------------------------------------------------------------------
@dataclass
class Encoded:
    """Token ids of a data set, one list per example (padding happens per batch)."""

    input_ids: list[list[int]]
    labels: list[Any]  # int, float, list[float] (multilabel), list[int] (tagging / causal-lm)
    token_type_ids: Optional[list[list[int]]] = None
    lines: list[int] = field(default_factory=list)
    texts: list[Any] = field(default_factory=list)
    dropped: int = 0
    choices: Optional[list[list[int]]] = None  # lm-classification: each label's answer tokens


    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def subset(self, index: Sequence[int]) -> "Encoded":
        pick = lambda xs: [xs[i] for i in index] if xs else xs  # noqa: E731
        return Encoded(pick(self.input_ids), pick(self.labels), pick(self.token_type_ids), pick(self.lines), pick(self.texts),
                       choices=self.choices)


def encode(spec: TaskSpec, table: Table, tokenizer: Any, *, with_labels: bool = True) -> Encoded:
    """Tokenise every row of ``table`` (no padding) and map its labels to targets."""
    cols = spec.columns
    if with_labels and cols.label and spec.task != "causal-lm":
        missing = [c for c in cols.used() if c not in table.columns]
    else:
        missing = [c for c in cols.used() if c not in table.columns and c != cols.label]
    if missing:
        raise DataError(
            f"{table.path}: no column(s) {missing}, which the adapter was trained on; its columns are "
            f"{', '.join(table.columns)}. Rename them, or pass the matching --text-column / --label-column."
        )
    inputs = [_inputs(spec, row, table.path, line) for row, line in zip(table.rows, table.lines)]
    if spec.task == "causal-lm":
        return _encode_causal(spec, table, tokenizer, inputs)
    if spec.task == "tagging":
        return _encode_tagging(spec, table, tokenizer, inputs, with_labels)
    if spec.task == "lm-classification":
        targets = _targets(spec, table) if with_labels else None
        return Encoded(**encode_verbalized(spec, table, tokenizer, inputs, _bos(tokenizer), with_labels, targets))
    firsts = [a for a, _ in inputs]
    pairs = [b for _, b in inputs] if cols.text_pair else None
    enc = tokenizer(firsts, pairs, truncation=True, max_length=spec.max_length)
    token_types = enc.get("token_type_ids") if cols.text_pair else None
    labels = _targets(spec, table) if with_labels else []
    texts = [a if b is None else f"{a}\t{b}" for a, b in inputs]
    return Encoded(list(enc["input_ids"]), labels, token_types, list(table.lines), texts)


def _targets(spec: TaskSpec, table: Table) -> list[Any]:
    return [target(spec, row.get(spec.columns.label), _where(table.path, line)) for row, line in zip(table.rows, table.lines)]


def _bos(tokenizer: Any) -> list[int]:
    """``[BOS]`` when the tokenizer would add one (prompts are tokenised without special tokens)."""
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id]
    return []


def target(spec: TaskSpec, value: Any, where: str) -> Any:
    """The training target of one label value."""
    labels = row_labels(spec, value, where)
    if spec.task == "regression":
        return (float(labels[0]) - spec.target_mean) / spec.target_std
    index = {name: i for i, name in enumerate(spec.labels)}
    unknown = [l for l in labels if l not in index]
    if unknown:
        raise DataError(f"{where}: label '{unknown[0]}' never occurs in the training data; fix it or add it to training.")
    if spec.task == "multilabel":
        vec = [0.0] * len(spec.labels)
        for l in labels:
            vec[index[l]] = 1.0
        return vec
    return index[labels[0]]


def _encode_tagging(spec: TaskSpec, table: Table, tokenizer: Any, inputs: list, with_labels: bool) -> Encoded:
    words = [a for a, _ in inputs]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=spec.max_length)
    index = {name: i for i, name in enumerate(spec.labels)}
    labels: list[Any] = []
    for n, (row, line) in enumerate(zip(table.rows, table.lines)):
        where = _where(table.path, line)
        tags = row_labels(spec, row.get(spec.columns.label), where) if with_labels else None
        if tags is not None and len(tags) != len(words[n]):
            raise DataError(
                f"{where}: {len(words[n])} tokens but {len(tags)} tags; give exactly one tag per token."
            )
        word_ids = enc.word_ids(n)
        out, previous = [], None
        for w in word_ids:
            if w is None or w == previous:
                out.append(-100)  # special tokens and continuation pieces carry no label
            elif tags is None:
                out.append(w)  # keep the word index for prediction
            else:
                if tags[w] not in index:
                    raise DataError(f"{where}: tag '{tags[w]}' never occurs in the training data; fix it or add it to training.")
                out.append(index[tags[w]])
            previous = w
        labels.append(out)
    return Encoded(list(enc["input_ids"]), labels, None, list(table.lines), words)


def _encode_causal(spec: TaskSpec, table: Table, tokenizer: Any, inputs: list) -> Encoded:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = _bos(tokenizer)
    ids_out, labels, lines, texts = [], [], [], []
    dropped = 0
    if spec.columns.prompt:
        prompts = [spec.prompt_template.format(prompt=p) for p, _ in inputs]
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer([c for _, c in inputs], add_special_tokens=False)["input_ids"]
        for n, (p, c) in enumerate(zip(p_ids, c_ids)):
            ids = (bos + p + c + eos)[: spec.max_length]
            lab = ([-100] * len(bos + p) + c + eos)[: spec.max_length]
            if all(x == -100 for x in lab[1:]):
                dropped += 1
                continue
            ids_out.append(ids)
            labels.append(lab)
            lines.append(table.lines[n])
            texts.append(inputs[n])
    else:
        t_ids = tokenizer([a for a, _ in inputs], add_special_tokens=False)["input_ids"]
        for n, t in enumerate(t_ids):
            ids = (bos + t + eos)[: spec.max_length]
            if len(ids) < 2:
                dropped += 1
                continue
            ids_out.append(ids)
            labels.append(list(ids))
            lines.append(table.lines[n])
            texts.append(inputs[n][0])
    if not ids_out:
        raise DataError(
            f"{table.path}: no row has a completion token left after truncation to --max-length {spec.max_length}; "
            "raise --max-length or shorten the prompts."
        )
    return Encoded(ids_out, labels, None, lines, texts, dropped)
