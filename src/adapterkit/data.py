"""Training data: read TSV / CSV / JSONL files, pick the columns, detect the task, encode.

The whole path from a user's file to token ids, with one error type, ``DataError``, whose
message names the file (and line) and the fix. Nothing here imports torch.

Files (chosen by suffix; an unknown suffix is sniffed from the first line):

* ``.tsv`` / ``.tab``: tab-separated with a header line; quotes are literal characters (GLUE
  files contain unbalanced quotes), so a field cannot contain a tab or a newline.
* ``.csv``: comma-separated with a header line, RFC 4180 quoting.
* ``.jsonl`` / ``.ndjson``: one JSON object per line; ``.json``: one JSON array of objects.
  Only JSON can hold lists, so token tagging (``{"tokens": [...], "tags": [...]}``) and
  multi-label rows (``{"text": ..., "labels": ["a", "b"]}``) are detected from JSON lists. In
  TSV / CSV, ``--task tagging`` splits both columns on whitespace and ``--task multilabel``
  splits the label on ``--label-sep`` (default ``,``).

Columns are taken from flags, else detected from well-known names (``text``, ``sentence``,
``sentence1`` + ``sentence2``, ``question`` + ``sentence``, ``premise`` + ``hypothesis``,
``prompt`` + ``completion``, ``label``, ``labels``, ``score``, ``tags`` ...), else, when a file
has exactly two columns, the first is the text and the second the label.

Tasks: ``classification`` (one label per row), ``multilabel``, ``regression`` (numeric labels
that are not all integers; integers mean classes unless ``--task regression``), ``tagging``
(one label per token) and ``causal-lm`` (decoder models: a text column without labels, or
prompt + completion where the loss covers the completion only).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .errors import AdapterError

TASKS = ("classification", "multilabel", "regression", "tagging", "causal-lm")
FORMATS = ("tsv", "csv", "jsonl", "json")
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


class DataError(AdapterError):
    """A problem with a data file; the message names the file, the line and the fix."""


def _where(path: Path, line: Optional[int] = None) -> str:
    return f"{path}:{line}" if line else f"{path}"


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class Table:
    """Rows of one file: ``rows[i]`` is a dict keyed by column, read from line ``lines[i]``."""

    path: Path
    format: str
    columns: list[str]
    rows: list[dict[str, Any]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.rows)


def detect_format(path: Path, head: str) -> str:
    suffix = path.suffix.lower()
    by_suffix = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    first = head.lstrip()[:1]
    if first == "{":
        return "jsonl"
    if first == "[":
        return "json"
    line = head.splitlines()[0] if head else ""
    if "\t" in line:
        return "tsv"
    if "," in line:
        return "csv"
    raise DataError(
        f"{path}: cannot tell the file format from the name or the first line; name it .tsv, .csv or .jsonl "
        "(or pass --format)."
    )


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); re-save the file "
            f"as UTF-8, e.g. iconv -f latin1 -t utf-8 '{path}' > fixed{path.suffix}"
        ) from None


def read_table(path: "str | Path", fmt: Optional[str] = None) -> Table:
    """Read a TSV / CSV / JSONL / JSON file into a ``Table`` (``DataError`` on any problem)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path (relative paths start from {Path.cwd()}).")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file; pass a .tsv, .csv or .jsonl file.")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}); check its permissions.") from None
    text = _decode(path, raw)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs a header line and at least one row.")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"Unknown format '{fmt}'; use one of {', '.join(FORMATS)}.")
    fmt = fmt or detect_format(path, text[:4096])
    if fmt in ("tsv", "csv"):
        table = _read_delimited(path, text, fmt)
    elif fmt == "jsonl":
        table = _read_jsonl(path, text)
    else:
        table = _read_json(path, text)
    if not table.rows:
        raise DataError(f"{path}: has a header but no rows; add at least one example.")
    return table


def _read_delimited(path: Path, text: str, fmt: str) -> Table:
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
    else:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    header: Optional[list[str]] = None
    try:
        line_start = 1
        for record in reader:
            line = line_start
            line_start = reader.line_num + 1
            if not record or all(not cell.strip() for cell in record):
                continue
            if header is None:
                header = [cell.strip() for cell in record]
                _check_header(path, line, header)
                continue
            if len(record) != len(header):
                raise DataError(
                    f"{path}:{line}: has {len(record)} fields but the header has {len(header)} "
                    f"({', '.join(header)}); fix the row"
                    + (" (a field with a tab or newline?)." if fmt == "tsv" else " (quote fields that hold commas).")
                )
            rows.append(dict(zip(header, record)))
            lines.append(line)
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({err}); fix the quoting of that row.") from None
    assert header is not None
    return Table(path, fmt, header, rows, lines)


def _check_header(path: Path, line: int, header: list[str]) -> None:
    if any(not h for h in header):
        raise DataError(f"{path}:{line}: the header has an empty column name; name every column (e.g. text, label).")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{path}:{line}: the header names column(s) {dupes} twice; give every column its own name.")


def _read_jsonl(path: Path, text: str) -> Table:
    rows, lines, columns = [], [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); fix that line.") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object like {{\"text\": ..., \"label\": ...}}, got {type(obj).__name__}.")
        rows.append(obj)
        lines.append(number)
        columns.update(dict.fromkeys(obj))
    return Table(path, "jsonl", list(columns), rows, lines)


def _read_json(path: Path, text: str) -> Table:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix the file or use JSONL.") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: a .json data file must hold one array of objects; use JSONL for one object per line.")
    columns: dict[str, None] = {}
    for r in data:
        columns.update(dict.fromkeys(r))
    return Table(path, "json", list(columns), list(data), [0] * len(data))


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


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


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
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def row_labels(spec: TaskSpec, value: Any, where: str) -> list[str]:
    """The label(s) of one row as strings (a list for multilabel and tagging)."""
    if spec.task == "multilabel":
        if isinstance(value, list):
            return [_as_label(v) for v in value]
        if value is None or str(value).strip() == "":
            return []
        return [p.strip() for p in str(value).split(spec.label_sep) if p.strip()]
    if spec.task == "tagging":
        if isinstance(value, list):
            return [_as_label(v) for v in value]
        return str(value).split()
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: the label (column '{spec.columns.label}') is empty; give every row a label or remove it.")
    if isinstance(value, (list, dict)):
        raise DataError(f"{where}: the label is a {type(value).__name__}; for {spec.task} it must be a single value.")
    return [_as_label(value)]


def build_task(
    table: Table, columns: Columns, task: Optional[str], *, decoder: bool, label_sep: str = ",", max_length: int = 128
) -> TaskSpec:
    """Detect the task (unless given), collect the label set and check the training rows."""
    if task is not None and task not in TASKS:
        raise DataError(f"Unknown task '{task}'; use one of {', '.join(TASKS)}.")
    task = task or detect_task(table, columns, decoder=decoder)
    if task == "causal-lm" and not decoder:
        raise DataError("Causal-LM fine-tuning needs a decoder model (e.g. --model smollm2); this model is an encoder.")
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
    if task == "classification" and len(spec.labels) < 2:
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

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def subset(self, index: Sequence[int]) -> "Encoded":
        pick = lambda xs: [xs[i] for i in index] if xs else xs  # noqa: E731
        return Encoded(pick(self.input_ids), pick(self.labels), pick(self.token_type_ids), pick(self.lines), pick(self.texts))


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
    firsts = [a for a, _ in inputs]
    pairs = [b for _, b in inputs] if cols.text_pair else None
    enc = tokenizer(firsts, pairs, truncation=True, max_length=spec.max_length)
    token_types = enc.get("token_type_ids") if cols.text_pair else None
    labels: list[Any] = []
    if with_labels:
        labels = [
            target(spec, row.get(cols.label), _where(table.path, line))
            for row, line in zip(table.rows, table.lines)
        ]
    texts = [a if b is None else f"{a}\t{b}" for a, b in inputs]
    return Encoded(list(enc["input_ids"]), labels, token_types, list(table.lines), texts)


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
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
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


def read_lines(stream: Iterable[str]) -> list[str]:
    """Non-blank input lines for ``predict`` (a tab separates a text pair)."""
    return [line.rstrip("\r\n") for line in stream if line.strip()]


_SAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def default_name(train_file: "str | Path") -> str:
    """An adapter name from the training file: ``data/sst2/train.tsv`` -> ``sst2``."""
    path = Path(train_file)
    stem = path.stem
    if stem.lower() in ("train", "training", "data", "dataset") and path.resolve().parent.name:
        stem = path.resolve().parent.name
    name = _SAFE.sub("_", stem).strip("_")
    return name or "adapter"
