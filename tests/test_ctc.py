"""Speech recognition (``--task ctc``, issue 21): vocabulary, greedy decoding, WER, and the CLI.

* greedy decoding equals ``transformers``' ``Wav2Vec2CTCTokenizer.decode`` on our ``vocab.json``;
* WER / CER on hand-counted cases (corpus-level, as jiwer);
* a tiny random wav2vec2 learns synthetic spoken digits (tones, ``speech_digits.py``) through
  ``adapterkit train --task ctc``; ``eval`` of the saved adapter reproduces the run's test scores
  (save -> load identical), and ``predict`` on the folder gives the transcripts those scores
  came from;
* the bad input of this task is in ``test_bad_input_table.py`` (``docs/bad-input.md``).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from adapterkit import AdapterModel
from adapterkit.cli import main
from adapterkit.data.ctc import Vocabulary, ctc_frames_needed, read_transcripts
from adapterkit.data.files import DataError
from adapterkit.train.wer import char_error_rate, edit_distance, word_error_rate
from speech_digits import TARGETS, speech_base, write_digits

#: the WER the fast test must reach on held-out clips (no output at all is 1.0; see docs/training.md
#: for the larger run's figure)
FAST_WER = 0.6


def test_vocabulary_layout_and_round_trip():
    vocab = Vocabulary.from_texts(["3 1 4", "hello world", "1  5"])
    assert vocab.tokens[:3] == ("<pad>", "<unk>", "|") and vocab.blank == 0
    assert list(vocab.tokens[3:]) == sorted(set("314helowrd5"))
    ids = vocab.encode("  hello   world ")
    assert ids.count(2) == 1  # one delimiter for the run of spaces
    with_blanks = [0, *sum(([i, i, 0] for i in ids), [])]  # every token twice, blanks between
    assert vocab.decode(with_blanks) == "hello world"
    assert vocab.unknown("héllo, world!") == ["é", ",", "!"]
    assert ctc_frames_needed(vocab.encode("hello")) == 6  # "ll" needs a blank between


def test_greedy_decoding_equals_wav2vec2_ctc_tokenizer(tmp_path):
    vocab = Vocabulary.from_texts(["one two three", "four 4 5"])
    (tmp_path / "vocab.json").write_text(json.dumps(vocab.to_vocab_json()))
    theirs = T.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                    word_delimiter_token="|")
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = torch.randint(0, len(vocab), (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        ids = [i for i in ids if i != 1]  # <unk> is never a target; the tokenizer prints it, we do not
        # the same characters; ours also makes runs of word delimiters one space (WER splits on them anyway)
        assert vocab.decode(ids) == " ".join(theirs.decode(ids).split()), ids


def test_wer_and_cer_on_hand_counted_cases():
    assert edit_distance("a b c".split(), "a c".split()) == 1
    assert edit_distance("kitten", "sitting") == 3
    assert word_error_rate(["1 2 3"], ["1 3"]) == pytest.approx(1 / 3)
    # corpus-level: errors summed over the set, divided by all reference words (1 + 0) / (2 + 4)
    assert word_error_rate(["a b", "c d e f"], ["a", "c d e f"]) == pytest.approx(1 / 6)
    assert word_error_rate(["a"], ["x y z"]) == pytest.approx(3.0)  # insertions can exceed 1
    assert char_error_rate(["abc"], ["abd"]) == pytest.approx(1 / 3)
    assert char_error_rate(["ab  cd"], ["ab cd"]) == 0.0  # whitespace runs are one space


def test_transcript_paths_are_relative_to_the_tsv_and_a_header_is_optional(tmp_path):
    (tmp_path / "sub" / "clips").mkdir(parents=True)
    (tmp_path / "sub" / "clips" / "a.wav").write_bytes(b"")
    (tmp_path / "sub" / "with.tsv").write_text("path\ttext\nclips/a.wav\tone  two\n")
    (tmp_path / "sub" / "without.tsv").write_text("clips/a.wav\tone two\n\n")
    for name in ("with.tsv", "without.tsv"):
        [item] = read_transcripts(tmp_path / "sub" / name)
        assert item.path == tmp_path / "sub" / "clips" / "a.wav" and item.text == "one two"
    (tmp_path / "sub" / "bad.tsv").write_text("clips/a.wav\tone\tx\n")
    with pytest.raises(DataError, match=r"bad.tsv:1: has 3 tab-separated"):
        read_transcripts(tmp_path / "sub" / "bad.tsv")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Spoken digits (tones) and a LoRA + CTC head trained on them with ``adapterkit train``."""
    d = tmp_path_factory.mktemp("digits")
    speech_base(d / "model")
    write_digits(d, "train", 120, seed=0)
    write_digits(d, "dev", 24, seed=1)
    write_digits(d, "test", 32, seed=2)
    argv = ["train", "--model", str(d / "model"), "--task", "ctc", "--train", str(d / "train.tsv"),
            "--eval", str(d / "dev.tsv"), "--test", str(d / "test.tsv"), "--method", "lora",
            "-o", f"target_modules={TARGETS}", "--lora-r", "8", "--epochs", "8", "--batch-size", "4",
            "--lr", "1e-2", "--schedule", "constant", "--warmup", "0", "--no-base-dropout",
            "--progress", "none", "--out", str(d / "run")]
    assert main(argv) == 0
    return d


def test_a_tiny_wav2vec2_learns_spoken_digits_through_the_cli(digits):
    results = json.loads((digits / "run" / "results.json").read_text())
    assert results["task"] == "ctc" and results["metric"] == "wer"
    assert results["test"]["wer"] < FAST_WER, results["test"]
    task = json.loads((digits / "run" / "adapter" / "adapterkit_task.json").read_text())
    assert task["labels"] == ["<pad>", "<unk>", "|", *"0123456789"]
    head = json.loads((digits / "run" / "adapter" / "adapter_config.json").read_text())["head"]
    assert head["type"] == "ctc" and head["blank"] == 0 and head["id2label"]["2"] == "|"


def test_eval_reproduces_the_runs_test_scores_and_predict_gives_the_transcripts(digits, capsys):
    capsys.readouterr()
    assert main(["eval", "--adapter", str(digits / "run"), "--data", str(digits / "test.tsv"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    results = json.loads((digits / "run" / "results.json").read_text())
    for name in ("wer", "cer", "sentence_accuracy"):
        assert scores[name] == pytest.approx(results["test"][name], abs=1e-9)

    assert main(["predict", "--adapter", str(digits / "run"), "--batch-size", "5", str(digits / "test")]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    gold = dict(line.split("\t") for line in (digits / "test.tsv").read_text().splitlines()[1:])
    refs = [gold[f"test/{path.rsplit('/', 1)[1]}"] for _, path in lines]
    assert len(lines) == 32
    assert word_error_rate(refs, [text for text, _ in lines]) == pytest.approx(scores["wer"], abs=1e-9)

    # each clip alone (no padding) gets the transcript it got in a padded batch
    assert main(["predict", "--adapter", str(digits / "run"), "--batch-size", "1", str(digits / "test")]) == 0
    assert [line.split("\t") for line in capsys.readouterr().out.splitlines()] == lines


def test_an_adapter_saved_from_python_is_scored_as_ctc_from_its_head(digits, tmp_path, capsys):
    """No adapterkit_task.json beside it: the CTC head's id2label is the vocabulary."""
    model = AdapterModel.from_pretrained(str(digits / "model"))
    name = model.load_adapter(digits / "run" / "adapter", set_active=True)
    model.save_adapter(tmp_path / "saved", name)
    assert not (tmp_path / "saved" / "adapterkit_task.json").exists()
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "saved"), "--model", str(digits / "model"),
                 "--data", str(digits / "test.tsv"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    results = json.loads((digits / "run" / "results.json").read_text())
    assert scores["task"] == "ctc" and scores["wer"] == pytest.approx(results["test"]["wer"], abs=1e-9)
