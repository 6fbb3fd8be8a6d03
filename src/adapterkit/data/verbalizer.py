"""The ``lm-classification`` task: a causal LM answers a prompt with one word per label.

Each row becomes a prompt, the ``--template`` filled with the row's text (``"Review: {text}
Sentiment:"``), and the label becomes its *verbalizer* word (``--verbalizer negative,positive``:
one word per label, in the order of the sorted labels, or ``0=negative,1=positive``). The answer
is the word with one leading space (`` positive``), tokenised on its own and appended to the
prompt's tokens, so training and scoring see exactly the same ids:

* training: ``input_ids = [BOS] + prompt + answer``, ``labels`` -100 everywhere but on the
  answer's tokens (the LM's own next-token loss, through the normal model forward);
* scoring (``train/choices.py``): log P(answer | prompt) summed over the answer's tokens, for
  every label's answer; the largest wins.

A row too long for ``--max-length`` (with room for the longest answer) has its text shortened
(the template's words are kept). Nothing here imports torch.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .files import DataError, Table, _is_number, _where

if TYPE_CHECKING:  # pragma: no cover
    from .task import TaskSpec

TEMPLATE_FIELDS = ("text", "text_pair")


def check_template(template: str, *, pair: bool) -> None:
    """A template names ``{text}`` (and may name ``{text_pair}`` for pair data), nothing else."""
    example = '--template "Review: {text} Sentiment:"'
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise DataError(f"--template '{template}' is malformed ({err}); write literal braces as {{{{ and }}}}, e.g. "
                        f"{example}.") from None
    unknown = [f for f in fields if f not in TEMPLATE_FIELDS or (f == "text_pair" and not pair)]
    if unknown:
        allowed = "{text} and {text_pair}" if pair else "{text}"
        raise DataError(f"--template names {{{unknown[0]}}}; it may name {allowed} only, e.g. {example}.")
    if "text" not in fields:
        raise DataError(f"--template '{template}' has no {{text}}, where each row's text goes; e.g. {example}.")
    if template != template.rstrip():
        raise DataError(f"--template '{template}' ends with a space; drop it: the answer brings its own leading "
                        "space (' positive'), as the model's vocabulary spells words after a space.")


def parse_verbalizer(text: Optional[str], labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(labels, words)`` from ``--verbalizer``: ``a,b`` (one word per label of ``labels``, in
    that order) or ``0=a,1=b`` (the labels are the keys, in the given order). Without the flag the
    label names themselves are the words, unless they are numbers."""
    shown = ", ".join(labels)
    if text is None:
        if any(_is_number(l) for l in labels):
            raise DataError(f"The labels ({shown}) are not words the model could answer with; pass --verbalizer with "
                            f"one word per label in this order, e.g. --verbalizer negative,positive.")
        return list(labels), list(labels)
    items = [item.strip() for item in text.split(",")]
    mapping = all("=" in item for item in items)
    if mapping:
        pairs = [(k.strip(), w.strip()) for k, w in (item.split("=", 1) for item in items)]
        keys, words = [k for k, _ in pairs], [w for _, w in pairs]
        missing = [l for l in labels if l not in keys]
        if missing:
            raise DataError(f"--verbalizer gives no word for label '{missing[0]}' (labels in the data: {shown}); add "
                            f"{missing[0]}=WORD.")
        if len(set(keys)) != len(keys):
            raise DataError(f"--verbalizer names a label twice ({', '.join(keys)}); give each label one word.")
    else:
        if any("=" in item for item in items):
            raise DataError(f"--verbalizer '{text}' mixes label=word and plain words; use one form, e.g. "
                            "0=negative,1=positive or negative,positive.")
        keys, words = list(labels), items
        if len(words) != len(keys):
            raise DataError(f"--verbalizer gives {len(words)} word(s) ({text}) for {len(keys)} labels ({shown}); give "
                            f"exactly one word per label, in this order, or write label=word pairs.")
    empty = [k for k, w in zip(keys, words) if not w]
    if empty:
        raise DataError(f"--verbalizer gives label '{empty[0]}' an empty word; give every label a word.")
    if len(set(words)) != len(words):
        raise DataError(f"--verbalizer gives two labels the same word ({', '.join(words)}); the model could not tell "
                        "them apart. Give each label its own word.")
    return keys, words


def answer_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """The token ids of every label's answer (its word after one space), checked to be usable."""
    out: list[list[int]] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for word in words:
        ids = list(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        if not ids:
            raise DataError(f"--verbalizer word '{word}' tokenises to nothing; choose a word the model's vocabulary "
                            "spells, e.g. positive / negative.")
        if unk is not None and unk in ids:
            raise DataError(f"--verbalizer word '{word}' is not in the model's vocabulary (it becomes the unknown "
                            "token); choose another word.")
        out.append(ids)
    seen: dict[tuple[int, ...], str] = {}
    for word, ids in zip(words, out):
        if tuple(ids) in seen:
            raise DataError(f"--verbalizer words '{seen[tuple(ids)]}' and '{word}' tokenise to the same tokens; "
                            "choose words the model can tell apart.")
        seen[tuple(ids)] = word
    return out


def _fill(template: str, text: str, pair: Optional[str]) -> str:
    return template.format(text=text, text_pair=pair or "")


def prompt_ids(tokenizer: Any, template: str, text: str, pair: Optional[str], room: int, where: str) -> list[int]:
    """The filled template's tokens, at most ``room`` long: the text (or the longer of a pair)
    is shortened token by token until the prompt fits."""
    ids = list(tokenizer(_fill(template, text, pair), add_special_tokens=False)["input_ids"])
    while len(ids) > room:
        longer_is_pair = pair is not None and len(pair) > len(text)
        piece = pair if longer_is_pair else text
        pieces = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if not pieces:
            raise DataError(f"{where}: the prompt is longer than --max-length allows even without its text; raise "
                            "--max-length or shorten the --template.")
        cut = tokenizer.decode(pieces[: max(0, len(pieces) - (len(ids) - room))])
        text, pair = (text, cut) if longer_is_pair else (cut, pair)
        ids = list(tokenizer(_fill(template, text, pair), add_special_tokens=False)["input_ids"])
    return ids


def encode_verbalized(spec: "TaskSpec", table: Table, tokenizer: Any, inputs: list, bos: list[int], with_labels: bool,
                      targets: Optional[list[int]]) -> dict[str, Any]:
    """Fields of an ``Encoded`` for ``lm-classification`` (see module docstring); ``targets``
    are the label indices of the rows (``None`` without labels)."""
    choices = answer_ids(tokenizer, spec.verbalizer)
    longest = max(len(c) for c in choices)
    room = spec.max_length - len(bos) - longest
    ids_out, labels = [], []
    for n, ((text, pair), line) in enumerate(zip(inputs, table.lines)):
        prompt = bos + prompt_ids(tokenizer, spec.template, text, pair, room, _where(table.path, line))
        if targets is None:
            ids_out.append(prompt)
            continue
        answer = choices[targets[n]]
        ids_out.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    texts = [a if b is None else f"{a}\t{b}" for a, b in inputs]
    return {"input_ids": ids_out, "labels": labels if with_labels else [], "lines": list(table.lines), "texts": texts,
            "choices": choices}


def prompt_of(input_ids: Sequence[int], labels: Optional[Sequence[int]]) -> list[int]:
    """The prompt part of an encoded row (everything before the first labelled token)."""
    if not labels:
        return list(input_ids)
    start = next(t for t, x in enumerate(labels) if x != -100)
    return list(input_ids[:start])


def gold_class(labels: Sequence[int], choices: Sequence[Sequence[int]]) -> int:
    """The label index whose answer the row's labelled tokens spell."""
    answer = [x for x in labels if x != -100]
    return [list(c) for c in choices].index(answer)
