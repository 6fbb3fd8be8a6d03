"""Reading data files: TSV / CSV / JSONL / JSON into a ``Table``, with one error type.

``DataError`` messages name the file (and line) and the fix. Files are chosen by suffix; an
unknown suffix is sniffed from the first line:

* ``.tsv`` / ``.tab``: tab-separated with a header line; quotes are literal characters (GLUE
  files contain unbalanced quotes), so a field cannot contain a tab or a newline.
* ``.csv``: comma-separated with a header line, RFC 4180 quoting.
* ``.jsonl`` / ``.ndjson``: one JSON object per line; ``.json``: one JSON array of objects.

Text must be UTF-8 (a byte-order mark is allowed). A TSV / CSV whose first line looks like data
(a number, or a value that also occurs in that column's rows) is refused: it has no header, and
taking its first row as column names would silently drop it and misname the columns.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import AdapterError

FORMATS = ("tsv", "csv", "jsonl", "json")
SUFFIXES = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}

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
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
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
        fix = (f"re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 '{path}' > fixed{path.suffix}"
               if path.name != "<stdin>" else "convert the input to UTF-8 first, e.g. with iconv -f latin1 -t utf-8")
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); {fix}"
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
    _check_header_is_not_data(path, fmt, header, rows)
    return Table(path, fmt, header, rows, lines)


def _is_number(value: Any) -> bool:
    """A finite number, or text that reads as one (booleans are not numbers)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _check_header_is_not_data(path: Path, fmt: str, header: list[str], rows: list[dict[str, Any]]) -> None:
    """A file without a header would lose its first row and name its columns after it (a label
    column called "1"): refuse a first line with a number in it, or with a value that also occurs
    in the same column below."""
    sample = rows[:1000]
    for i, name in enumerate(header):
        why = ""
        if _is_number(name):
            why = f"'{name}' is a number"
        elif any(row.get(name) == name for row in sample):
            why = f"'{name}' also occurs as a value in that column"
        if why:
            sep = "<TAB>" if fmt == "tsv" else ","
            raise DataError(
                f"{path}:1: the first line looks like data, not a header ({why}, column {i + 1}); add a header line "
                f"naming the columns, e.g. 'sentence{sep}label', so the first row is read as an example."
            )


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
        except RecursionError:
            raise _too_deep(path, number) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object like {{\"text\": ..., \"label\": ...}}, got {type(obj).__name__}.")
        rows.append(obj)
        lines.append(number)
        columns.update(dict.fromkeys(obj))
    return Table(path, "jsonl", list(columns), rows, lines)


def _too_deep(path: Path, line: Optional[int]) -> DataError:
    """Python's JSON reader recurses once per level: a row nested thousands deep is refused."""
    return DataError(f"{_where(path, line)}: JSON nested too deeply to read (thousands of levels of [ or {{); "
                     "a data row holds a text and a label, fix that line.")


def _read_json(path: Path, text: str) -> Table:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix the file or use JSONL.") from None
    except RecursionError:
        raise _too_deep(path, None) from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: a .json data file must hold one array of objects; use JSONL for one object per line.")
    columns: dict[str, None] = {}
    for r in data:
        columns.update(dict.fromkeys(r))
    return Table(path, "json", list(columns), list(data), [0] * len(data))


def read_lines(stream: Iterable[str]) -> list[str]:
    """Non-blank input lines for ``predict`` (a tab separates a text pair)."""
    return [line.rstrip("\r\n") for line in stream if line.strip()]


def read_prediction_input(raw: bytes, source: str = "<stdin>") -> "Table | list[str]":
    """What ``predict`` reads from stdin or a file without a table suffix: JSON lines (a ``Table``)
    when the first non-blank line is a JSON object, so that texts may hold line breaks
    (``{"text": "Review: ...\\nSentiment:"}``); else one text per non-blank line."""
    path = Path(source)
    text = _decode(path, raw)
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        try:
            is_object = isinstance(json.loads(first), dict)
        except json.JSONDecodeError:
            is_object = False
        except RecursionError:
            is_object = True  # _read_jsonl names the problem and the line
        if is_object:
            return _read_jsonl(path, text)
    return read_lines(text.splitlines())


_SAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def default_name(train_file: "str | Path") -> str:
    """An adapter name from the training file: ``data/sst2/train.tsv`` -> ``sst2``."""
    path = Path(train_file)
    stem = path.stem
    if stem.lower() in ("train", "training", "data", "dataset") and path.resolve().parent.name:
        stem = path.resolve().parent.name
    name = _SAFE.sub("_", stem).strip("_")
    return name or "adapter"
