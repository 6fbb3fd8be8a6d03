"""The task contract: which columns hold what, which task a file implies, and the ``TaskSpec``
saved beside an adapter so that ``eval`` and ``predict`` read files and print labels as training did.

Columns are taken from flags, else detected from well-known names (``text``, ``sentence``,
``sentence1`` + ``sentence2``, ``question`` + ``sentence``, ``premise`` + ``hypothesis``,
``prompt`` + ``completion``, ``label``, ``labels``, ``score``, ``tags`` ...), else, when a file
has exactly two columns, the first is the text and the second the label.

Tasks: ``classification`` (one label per row), ``multilabel``, ``regression`` (numeric labels
that are not all integers; integers mean classes unless ``--task regression``), ``tagging``
(one label per token), ``causal-lm`` (decoder models: a text column without labels, or
prompt + completion where the loss covers the completion only) and ``lm-classification``
(decoder models: the LM answers ``--template`` with one ``--verbalizer`` word per label; chosen
whenever ``--template`` is given; see ``verbalizer``); ``ctc`` (speech recognition: a TSV
of clip paths and transcripts, never detected; see ``ctc``). Only JSON can hold lists, so
tagging and multi-label rows are detected from JSON lists; in TSV / CSV, ``--task tagging``
splits both columns on whitespace and ``--task multilabel`` splits the label on ``--label-sep``.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .files import DataError, Table, _is_number, _where
from .verbalizer import check_template, parse_verbalizer

TASKS = ("classification", "multilabel", "regression", "tagging", "causal-lm", "lm-classification", "ctc")
#: tasks whose data is not a table but audio clips with transcripts (``ctc.py``)
SPEECH_TASKS = ("ctc",)
#: tasks trained by the language model's own next-token loss (no head): labels are token ids
LM_TASKS = ("causal-lm", "lm-classification")
TASK_FILE = "adapterkit_task.json"

TEXT_NAMES = ("text", "sentence", "sentence1", "question1", "premise", "question", "content", "review",
              "document", "input", "tokens", "words", "query", "utterance", "tweet")
PAIRS = (("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
         ("question", "sentence"), ("question", "passage"), ("query", "document"), ("text_a", "text_b"),
         ("text", "text_pair"))
LABEL_NAMES = ("label", "labels", "target", "targets", "class", "category", "score", "tags", "ner_tags",
               "pos_tags", "sentiment", "y", "output")
PROMPT_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("instruction", "response"),
                ("input", "output"), ("question", "answer"))


# -- columns and task ------------------------------------------------------------------------------
@dataclass
class Columns:
    """Which columns hold the inputs and the label."""

    text: Optional[str] = None
    text_pair: Optional[str] = None
    label: Optional[str] = None
    prompt: Optional[str] = None
    completion: Optional[str] = None

    def used(self) -> list[str]:
        return [c for c in (self.text, self.text_pair, self.label, self.prompt, self.completion) if c]


def _check_column(table: Table, name: str, flag: str) -> None:
    if name not in table.columns:
        close = difflib.get_close_matches(name, table.columns, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DataError(
            f"{table.path}: no column '{name}' (given by {flag}); its columns are: {', '.join(table.columns)}.{hint}"
        )


def detect_columns(
    table: Table,
    *,
    text: Optional[str] = None,
    text_pair: Optional[str] = None,
    label: Optional[str] = None,
    prompt: Optional[str] = None,
    completion: Optional[str] = None,
    task: Optional[str] = None,
) -> Columns:
    """Columns from flags, else from well-known names (see module docstring)."""
    given = {"--text-column": text, "--text-pair-column": text_pair, "--label-column": label,
             "--prompt-column": prompt, "--completion-column": completion}
    for flag, name in given.items():
        if name:
            _check_column(table, name, flag)
    cols = table.columns
    lower = {c.lower(): c for c in cols}
    if (prompt or completion) and not (prompt and completion):
        raise DataError("Pass both --prompt-column and --completion-column (or neither).")
    if prompt and completion:
        return Columns(prompt=prompt, completion=completion)
    if task in (None, "causal-lm") and not text and not label:
        for p, c in PROMPT_PAIRS:
            if p in lower and c in lower and not any(n in lower for n in ("label", "labels")):
                if task == "causal-lm" or (p, c) in (("prompt", "completion"), ("prompt", "response"), ("instruction", "response")):
                    return Columns(prompt=lower[p], completion=lower[c])
    if label is None:
        label = next((lower[n] for n in LABEL_NAMES if n in lower and lower[n] not in (text, text_pair)), None)
    if text is None:
        for a, b in PAIRS:
            if a in lower and b in lower and label not in (lower[a], lower[b]):
                text, text_pair = lower[a], text_pair or lower[b]
                break
    if text is None:
        text = next((lower[n] for n in TEXT_NAMES if n in lower and lower[n] != label), None)
    if text is None:
        rest = [c for c in cols if c not in (label, text_pair)]
        if len(rest) == 1:
            text = rest[0]
        elif label is None and len(cols) == 2:
            text, label = cols
    if text is None:
        raise DataError(
            f"{table.path}: cannot tell which column holds the text (columns: {', '.join(cols)}); "
            "pass --text-column NAME (and --label-column NAME)."
        )
    if label is None and task != "causal-lm":
        rest = [c for c in cols if c not in (text, text_pair)]
        if len(rest) == 1:
            label = rest[0]
    return Columns(text=text, text_pair=text_pair, label=label)


def _is_integer(value: Any) -> bool:
    return _is_number(value) and float(value) == int(float(value))


def detect_task(table: Table, columns: Columns, *, decoder: bool) -> str:
    """The task implied by the columns and the label values (see module docstring)."""
    if columns.prompt:
        return "causal-lm"
    if columns.label is None:
        if decoder:
            return "causal-lm"
        raise DataError(
            f"{table.path}: no label column (columns: {', '.join(table.columns)}); pass --label-column NAME. "
            "Label-free causal-LM fine-tuning needs a decoder model (e.g. --model smollm2)."
        )
    values = [r.get(columns.label) for r in table.rows[:2000]]
    if any(isinstance(v, list) for v in values):
        texts = [r.get(columns.text) for r in table.rows[:2000]]
        if any(isinstance(t, list) for t in texts):
            return "tagging"
        return "multilabel"
    present = [v for v in values if v not in (None, "")]
    if present and all(_is_number(v) for v in present) and not all(_is_integer(v) for v in present):
        return "regression"
    return "classification"


# -- the task spec: everything needed to encode rows and read predictions ---------------------------
@dataclass
class TaskSpec:
    """The task of a run, saved beside the adapter (``adapterkit_task.json``) so that ``eval`` and
    ``predict`` read files and print labels exactly as training did."""

    task: str
    columns: Columns
    labels: list[str] = field(default_factory=list)
    label_sep: str = ","
    max_length: int = 128
    target_mean: float = 0.0
    target_std: float = 1.0
    threshold: float = 0.5
    prompt_template: str = "{prompt}"
    template: str = ""  # lm-classification: the prompt, with {text}
    verbalizer: list[str] = field(default_factory=list)  # lm-classification: the answer word of each label

    @property
    def num_labels(self) -> int:
        if self.task == "regression":
            return 1
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskSpec":
        data = dict(data)
        data["columns"] = Columns(**data.get("columns", {}))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: "str | Path") -> None:
        Path(directory, TASK_FILE).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")

    @classmethod
    def load(cls, directory: "str | Path") -> Optional["TaskSpec"]:
        path = Path(directory, TASK_FILE)
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: corrupt task file ({err}); train the adapter again.") from None


def _label_key(value: str) -> tuple:
    """Numeric labels sort as numbers ("2" < "10"), others as strings."""
    return (0, float(value), value) if _is_number(value) else (1, 0.0, value)


def _as_label(value: Any) -> str:
    """One label as text; a whole number written as a decimal (``1.0``, ``1e0``, JSON ``1.0``) is the
    label ``1``, so that ``1`` and ``1.0`` in one file are one class, not two."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if _is_number(text) and not _is_integer_text(text) and float(text).is_integer():
        return str(int(float(text)))
    return text


def _is_integer_text(text: str) -> bool:
    """``1``, ``-3``, ``007``: kept as written (``007`` may be a code, not the number 7)."""
    return text.lstrip("+-").isdigit()


def row_labels(spec: TaskSpec, value: Any, where: str) -> list[str]:
    """The label(s) of one row as strings (a list for multilabel and tagging)."""
    if spec.task == "multilabel":
        if isinstance(value, list):
            return [_as_label(v) for v in value]
        if value is None or str(value).strip() == "":
            return []
        return [_as_label(p) for p in str(value).split(spec.label_sep) if p.strip()]
    if spec.task == "tagging":
        if isinstance(value, list):
            return [_as_label(v) for v in value]
        return [_as_label(p) for p in str(value).split()]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: the label (column '{spec.columns.label}') is empty; give every row a label or remove it.")
    if isinstance(value, (list, dict)):
        raise DataError(f"{where}: the label is a {type(value).__name__}; for {spec.task} it must be a single value.")
    return [_as_label(value)]


def build_task(
    table: Table, columns: Columns, task: Optional[str], *, decoder: bool, label_sep: str = ",", max_length: int = 128,
    template: Optional[str] = None, verbalizer: Optional[str] = None,
) -> TaskSpec:
    """Detect the task (unless given), collect the label set and check the training rows.
    ``template`` / ``verbalizer`` (``--template`` / ``--verbalizer``) define ``lm-classification``."""
    if task is not None and task not in TASKS:
        raise DataError(f"Unknown task '{task}'; use one of {', '.join(TASKS)}.")
    task = task or ("lm-classification" if template is not None else detect_task(table, columns, decoder=decoder))
    if task == "causal-lm" and not decoder:
        raise DataError("Causal-LM fine-tuning needs a decoder model (e.g. --model smollm2); this model is an encoder.")
    if task == "lm-classification" and not decoder:
        raise DataError("--task lm-classification scores answers with a causal language model's own next-token "
                        "probabilities; this model is not a causal LM (decoder). Pass a decoder (e.g. --model smollm2), "
                        "or train a classification head on this one: drop --template / --verbalizer.")
    if task != "lm-classification" and (template is not None or verbalizer is not None):
        raise DataError(f"--template and --verbalizer define --task lm-classification, not {task}; drop them or "
                        "pass --task lm-classification.")
    if task == "lm-classification" and template is None:
        raise DataError('--task lm-classification needs --template with {text}, e.g. --template "Review: {text} '
                        'Sentiment:" (and --verbalizer with one answer word per label).')
    if task != "causal-lm" and columns.label is None:
        raise DataError(f"{table.path}: task '{task}' needs a label column; pass --label-column NAME.")
    spec = TaskSpec(task=task, columns=columns, label_sep=label_sep, max_length=max_length)
    if task == "causal-lm":
        for row, line in zip(table.rows, table.lines):
            _inputs(spec, row, table.path, line)
        return spec
    values: list[str] = []
    seen: dict[str, None] = {}
    for row, line in zip(table.rows, table.lines):
        where = _where(table.path, line)
        _inputs(spec, row, table.path, line)
        labels = row_labels(spec, row.get(columns.label), where)
        if task == "regression":
            if not _is_number(labels[0]):
                raise DataError(f"{where}: regression label '{labels[0]}' is not a number; fix it or drop --task regression.")
            values.append(labels[0])
        else:
            seen.update(dict.fromkeys(labels))
    if task == "regression":
        nums = [float(v) for v in values]
        mean = sum(nums) / len(nums)
        std = math.sqrt(sum((x - mean) ** 2 for x in nums) / len(nums)) or 1.0
        spec.target_mean, spec.target_std = mean, std
        return spec
    spec.labels = sorted(seen, key=_label_key)
    if task == "lm-classification":
        assert template is not None
        check_template(template, pair=bool(columns.text_pair))
        spec.template = template
        spec.labels, spec.verbalizer = parse_verbalizer(verbalizer, spec.labels)
    if task in ("classification", "lm-classification") and len(spec.labels) < 2:
        raise DataError(
            f"{table.path}: every row has the label '{spec.labels[0]}'; classification needs at least two labels."
        )
    if not spec.labels:
        raise DataError(f"{table.path}: no labels at all in column '{columns.label}'; check --label-column.")
    return spec


def _text(value: Any, column: str, path: Path, line: int, *, words: bool = False) -> Any:
    where = _where(path, line)
    if value is None:
        raise DataError(f"{where}: the row has no '{column}' field; give every row a value for it.")
    if words:
        if isinstance(value, list):
            if not value:
                raise DataError(f"{where}: '{column}' is an empty token list; remove the row.")
            return [str(v) for v in value]
        tokens = str(value).split()
        if not tokens:
            raise DataError(f"{where}: '{column}' is empty; remove the row or fill it in.")
        return tokens
    if isinstance(value, (list, dict)):
        raise DataError(f"{where}: '{column}' is a {type(value).__name__}, expected text.")
    text = str(value)
    if not text.strip():
        raise DataError(f"{where}: '{column}' is empty; remove the row or fill it in.")
    return text


def _inputs(spec: TaskSpec, row: dict[str, Any], path: Path, line: int) -> tuple:
    cols = spec.columns
    if cols.prompt:
        return (_text(row.get(cols.prompt), cols.prompt, path, line),
                _text(row.get(cols.completion), cols.completion, path, line))
    text = _text(row.get(cols.text), cols.text, path, line, words=spec.task == "tagging")
    pair = _text(row.get(cols.text_pair), cols.text_pair, path, line) if cols.text_pair else None
    return text, pair


def check_same_columns(spec: TaskSpec, table: Table, train: Table) -> None:
    """An evaluation file must have the columns the task was read from in the training file."""
    missing = [c for c in spec.columns.used() if c not in table.columns]
    if missing:
        raise DataError(
            f"{table.path}: no column(s) {', '.join(repr(c) for c in missing)}, which the task was read from in the "
            f"training file {train.path} (columns there: {', '.join(train.columns)}; here: {', '.join(table.columns)}); "
            "give both files the same header."
        )


def check_eval_labels(spec: TaskSpec, table: Table) -> None:
    """Every label in an evaluation file must be one the model was trained on."""
    if spec.task in ("causal-lm", "regression"):
        return
    known = set(spec.labels)
    for row, line in zip(table.rows, table.lines):
        where = _where(table.path, line)
        if spec.columns.label not in row:
            raise DataError(f"{where}: the row has no '{spec.columns.label}' field; give every row a label.")
        for label in row_labels(spec, row.get(spec.columns.label), where):
            if label not in known:
                shown = ", ".join(spec.labels[:20]) + (" ..." if len(spec.labels) > 20 else "")
                raise DataError(
                    f"{where}: label '{label}' never occurs in the training data (labels: {shown}); fix the label "
                    "or add examples of it to the training file."
                )


def prediction_inputs(spec: TaskSpec, table: Table, text_column: Optional[str] = None) -> list[Any]:
    """The inputs of every row of a file to predict on, read from the columns the task was trained
    on: a text, a ``(text, pair)`` tuple for pair tasks, a token list for tagging, a prompt for
    causal LMs. ``text_column`` overrides the column; a file with one column needs none."""
    cols = spec.columns
    wanted = text_column or cols.prompt or cols.text
    candidates = [wanted] if wanted else []
    if not text_column:
        candidates += [n for n in TEXT_NAMES if n in table.columns]
    column = next((c for c in candidates if c in table.columns), None)
    if column is None and len(table.columns) == 1 and not text_column:
        column = table.columns[0]
    if column is None:
        flag = f"no column '{wanted}' (the adapter's text column)" if wanted else "cannot tell which column holds the text"
        raise DataError(f"{table.path}: {flag}; its columns are {', '.join(table.columns)}. Pass --text-column NAME.")
    pair = cols.text_pair if cols.text_pair and not cols.prompt else None
    if pair and pair not in table.columns:
        raise DataError(f"{table.path}: no column '{pair}', the second text of this pair task; its columns are "
                        f"{', '.join(table.columns)}.")
    out: list[Any] = []
    for row, line in zip(table.rows, table.lines):
        text = _text(row.get(column), column, table.path, line, words=spec.task == "tagging")
        out.append((text, _text(row.get(pair), pair, table.path, line)) if pair else text)
    return out

