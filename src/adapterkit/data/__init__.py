"""Training data: from a user's file to token ids, with one error type, ``DataError``, whose
message names the file (and line) and the fix. Nothing here imports torch.

Three small modules, one job each:

* ``files``: reading TSV / CSV / JSONL / JSON files (formats, UTF-8 decoding, header checks);
* ``task``: the task contract: columns, task detection, labels, ``TaskSpec``;
* ``encoding``: tokenisation of rows into ``Encoded`` examples and targets;
* ``verbalizer``: the ``lm-classification`` task (template, verbalizer words, answer tokens).

``from adapterkit.data import X`` keeps working for every name below.
"""

from .encoding import Encoded, encode, target
from .files import FORMATS, SUFFIXES, DataError, Table, default_name, detect_format, read_lines, read_prediction_input, read_table
from .task import (
    LABEL_NAMES,
    LM_TASKS,
    PAIRS,
    PROMPT_PAIRS,
    TASK_FILE,
    TASKS,
    TEXT_NAMES,
    Columns,
    TaskSpec,
    build_task,
    check_eval_labels,
    check_same_columns,
    detect_columns,
    detect_task,
    prediction_inputs,
    row_labels,
)

__all__ = [
    "FORMATS", "SUFFIXES", "TASKS", "LM_TASKS", "TASK_FILE", "TEXT_NAMES", "PAIRS", "LABEL_NAMES", "PROMPT_PAIRS", "DataError", "Table",
    "Columns", "TaskSpec", "Encoded", "read_table", "detect_format", "read_lines", "read_prediction_input", "default_name", "detect_columns",
    "detect_task", "build_task", "row_labels", "check_eval_labels", "check_same_columns", "prediction_inputs", "encode", "target",
]
