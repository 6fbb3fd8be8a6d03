"""Reading data files, detecting columns and tasks, label maps, encoding, and file:line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers as T

from adapterkit.data import (
    Columns,
    DataError,
    TaskSpec,
    build_task,
    check_eval_labels,
    default_name,
    detect_columns,
    encode,
    read_table,
)
from trainkit import tiny_bert, tiny_llama, write_jsonl


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    return T.AutoTokenizer.from_pretrained(tiny_bert(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    return T.AutoTokenizer.from_pretrained(tiny_llama(tmp_path_factory.mktemp("llama")))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- reading -----------------------------------------------------------------------------------------
def test_tsv_keeps_quotes_and_line_numbers(tmp_path):
    f = write(tmp_path / "d.tsv", 'sentence\tlabel\n"it \'s" good\t1\n\nbad "movie\t0\n')
    t = read_table(f)
    assert t.format == "tsv" and t.columns == ["sentence", "label"]
    assert [r["sentence"] for r in t.rows] == ['"it \'s" good', 'bad "movie']
    assert t.lines == [2, 4]


def test_csv_quoting_and_jsonl(tmp_path):
    t = read_table(write(tmp_path / "d.csv", 'text,label\n"fine, really",pos\nbad,neg\n'))
    assert t.rows[0] == {"text": "fine, really", "label": "pos"}
    j = read_table(write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}]))
    assert j.format == "jsonl" and j.rows[1]["label"] == 0 and j.lines == [1, 2]


def test_format_sniffed_from_content(tmp_path):
    assert read_table(write(tmp_path / "d.txt", "text\tlabel\na\t1\n")).format == "tsv"
    assert read_table(write(tmp_path / "e.data", '{"text": "a", "label": 1}\n')).format == "jsonl"


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.tsv", None, r"missing\.tsv: no such file"),
        ("empty.tsv", "", r"empty\.tsv: the file is empty"),
        ("header.tsv", "text\tlabel\n", r"header\.tsv: has a header but no rows"),
        ("fields.tsv", "text\tlabel\na\t1\nb\t0\textra\n", r"fields\.tsv:3: has 3 fields but the header has 2"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', r"bad\.jsonl:2: not valid JSON"),
        ("list.jsonl", '["a", 1]\n', r"list\.jsonl:1: expected a JSON object"),
        ("dupe.csv", "text,text\na,b\n", r"dupe\.csv:1: the header names column\(s\) \['text'\] twice"),
    ],
)
def test_read_errors_name_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=expected):
        read_table(path)


def test_non_utf8_names_line_and_fix(tmp_path):
    path = tmp_path / "latin.tsv"
    path.write_bytes("sentence\tlabel\ngood\t1\ncaf\xe9 bad\t0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.tsv:3: not valid UTF-8 \(byte 0xe9 at column 4\).*iconv"):
        read_table(path)


# -- columns and tasks ---------------------------------------------------------------------------------
def table(tmp_path, rows, name="d.jsonl"):
    return read_table(write_jsonl(tmp_path / name, rows))


def test_columns_detected_from_names(tmp_path):
    t = table(tmp_path, [{"id": 1, "sentence1": "a", "sentence2": "b", "label": 0}])
    assert detect_columns(t) == Columns(text="sentence1", text_pair="sentence2", label="label")
    t = table(tmp_path, [{"review": "a", "stars": 3}], "r.jsonl")
    assert detect_columns(t) == Columns(text="review", label="stars")
    t = table(tmp_path, [{"prompt": "a", "completion": "b"}], "p.jsonl")
    assert detect_columns(t) == Columns(prompt="prompt", completion="completion")


def test_misnamed_column_suggests(tmp_path):
    t = table(tmp_path, [{"text": "a", "label": 1}])
    with pytest.raises(DataError, match=r"no column 'lable' \(given by --label-column\).*Did you mean 'label'"):
        detect_columns(t, label="lable")


def test_ambiguous_text_column_asks_for_flag(tmp_path):
    t = table(tmp_path, [{"a": "x", "b": "y", "label": 1}])
    with pytest.raises(DataError, match="--text-column"):
        detect_columns(t)
    assert detect_columns(t, text="b") == Columns(text="b", label="label")


@pytest.mark.parametrize(
    "rows, decoder, task",
    [
        ([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}], False, "classification"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": 3}], False, "classification"),
        ([{"text": "a", "score": 0.5}, {"text": "b", "score": 3}], False, "regression"),
        ([{"text": "a", "labels": ["x", "y"]}, {"text": "b", "labels": []}], False, "multilabel"),
        ([{"tokens": ["a", "b"], "tags": ["O", "B-X"]}], False, "tagging"),
        ([{"text": "some text"}], True, "causal-lm"),
        ([{"prompt": "q", "completion": "a"}], True, "causal-lm"),
    ],
)
def test_task_detection(tmp_path, rows, decoder, task):
    t = table(tmp_path, rows)
    spec = build_task(t, detect_columns(t), None, decoder=decoder)
    assert spec.task == task


def test_label_map_sorts_numbers_numerically(tmp_path):
    t = table(tmp_path, [{"text": "a", "label": v} for v in (10, 2, 1, 2)])
    assert build_task(t, detect_columns(t), None, decoder=False).labels == ["1", "2", "10"]


def test_encoder_without_labels_is_an_error(tmp_path):
    t = table(tmp_path, [{"text": "a"}])
    with pytest.raises(DataError, match="no label column.*decoder model"):
        build_task(t, detect_columns(t), None, decoder=False)


def test_single_class_and_empty_label_are_errors(tmp_path):
    t = table(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    with pytest.raises(DataError, match="at least two labels"):
        build_task(t, detect_columns(t), None, decoder=False)
    f = write(tmp_path / "e.tsv", "text\tlabel\na\t1\nb\t\n")
    t = read_table(f)
    with pytest.raises(DataError, match=r"e\.tsv:3: the label .* is empty"):
        build_task(t, detect_columns(t), None, decoder=False)


def test_unseen_eval_label_names_file_and_line(tmp_path):
    train = table(tmp_path, [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}], "train.jsonl")
    spec = build_task(train, detect_columns(train), None, decoder=False)
    dev = read_table(write(tmp_path / "dev.tsv", "text\tlabel\nc\tpos\nd\tneutral\n"))
    with pytest.raises(DataError, match=r"dev\.tsv:3: label 'neutral' never occurs in the training data"):
        check_eval_labels(spec, dev)


def test_tagging_length_mismatch_in_tsv(tmp_path, bert_tok):
    t = read_table(write(tmp_path / "tags.tsv", "tokens\ttags\nalice met bob\tB-P O B-P\nparis\tB-L O\n"))
    spec = build_task(t, detect_columns(t), "tagging", decoder=False)
    with pytest.raises(DataError, match=r"tags\.tsv:3: 1 tokens but 2 tags"):
        encode(spec, t, bert_tok)


# -- encoding ------------------------------------------------------------------------------------------
def test_encode_classification_and_pairs(tmp_path, bert_tok):
    t = table(tmp_path, [{"premise": "good film", "hypothesis": "bad", "label": "yes"},
                         {"premise": "dull", "hypothesis": "fine plot", "label": "no"}])
    spec = build_task(t, detect_columns(t), None, decoder=False)
    enc = encode(spec, t, bert_tok)
    assert enc.labels == [1, 0]  # labels sorted: no, yes
    assert enc.token_type_ids is not None and enc.token_type_ids[0][-1] == 1
    assert enc.input_ids[0][0] == bert_tok.cls_token_id


def test_encode_tagging_labels_first_piece_only(tmp_path, bert_tok):
    t = table(tmp_path, [{"tokens": ["alice", "films"], "tags": ["B-PER", "O"]}])  # films -> film ##s
    spec = build_task(t, detect_columns(t), None, decoder=False)
    enc = encode(spec, t, bert_tok)
    assert spec.labels == ["B-PER", "O"]
    assert enc.labels[0] == [-100, 0, 1, -100, -100]  # [CLS] alice film ##s [SEP]


def test_encode_regression_standardises(tmp_path, bert_tok):
    t = table(tmp_path, [{"text": "a", "score": 1.5}, {"text": "b", "score": 3.5}])
    spec = build_task(t, detect_columns(t), None, decoder=False)
    assert spec.target_mean == 2.5 and spec.target_std == 1.0
    assert encode(spec, t, bert_tok).labels == [-1.0, 1.0]


def test_encode_prompt_completion_masks_prompt(tmp_path, llama_tok):
    t = table(tmp_path, [{"prompt": "alice met", "completion": "bob ."}])
    spec = build_task(t, detect_columns(t), None, decoder=True)
    enc = encode(spec, t, llama_tok)
    ids, labels = enc.input_ids[0], enc.labels[0]
    n_prompt = len(llama_tok("alice met", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == llama_tok.eos_token_id


def test_task_spec_round_trip(tmp_path):
    spec = TaskSpec("classification", Columns(text="t", label="l"), labels=["a", "b"], max_length=64)
    spec.save(tmp_path)
    assert TaskSpec.load(tmp_path) == spec
    assert json.loads((tmp_path / "adapterkit_task.json").read_text())["labels"] == ["a", "b"]


def test_default_name(tmp_path):
    assert default_name("../shared/data/sst2/train.tsv") == "sst2"
    assert default_name("reviews.v2.tsv") == "reviews_v2"


def test_whole_number_labels_written_as_decimals_are_one_class(tmp_path):
    """A TSV with labels ``1`` and ``1.0`` (and ``0`` / ``0.0``) is binary, not a 4-class task."""
    t = read_table(write(tmp_path / "mixed.tsv", "text\tlabel\na\t1\nb\t1.0\nc\t0\nd\t0.0\ne\t1e0\n"))
    spec = build_task(t, detect_columns(t), None, decoder=False)
    assert (spec.task, spec.labels) == ("classification", ["0", "1"])
    check_eval_labels(spec, read_table(write(tmp_path / "dev.tsv", "text\tlabel\nf\t1.0\ng\t0\n")))
    codes = read_table(write(tmp_path / "codes.tsv", "text\tlabel\na\t007\nb\t7\n"))  # codes stay as written
    assert build_task(codes, detect_columns(codes), None, decoder=False).labels == ["007", "7"]
    multi = read_table(write(tmp_path / "multi.tsv", "text\tlabels\na\t1,2.0\nb\t2\n"))
    spec = build_task(multi, detect_columns(multi), "multilabel", decoder=False)
    assert spec.labels == ["1", "2"]


@pytest.mark.parametrize("name", ["deep.jsonl", "deep.json"])
def test_deeply_nested_json_is_a_data_error(tmp_path, name):
    deep = "[" * 100_000 + "]" * 100_000
    body = f'{{"text": "a", "label": 1}}\n{{"text": {deep}, "label": 0}}\n' if name.endswith("l") else deep
    with pytest.raises(DataError, match=r"nested too deeply"):
        read_table(write(tmp_path / name, body))
