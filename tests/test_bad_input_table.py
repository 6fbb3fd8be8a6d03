"""Every bad input in the table of ``docs/bad-input.md`` gets its one-line answer, exit code 2,
and leaves nothing behind. The cases run in this process (``adapterkit.cli.main``) from inside a
workspace, so the messages show the relative paths a user typed; ``ADAPTERKIT_DUMP_TABLE=1``
prints the table rows for the docs."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from adapterkit.cli import main
from trainkit import sentiment_rows, tiny_bert, write_jsonl, write_tsv

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
FAST = ["--epochs", "1", "--batch-size", "16", "--progress", "none"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("table")
    tiny_bert(d / "bert")
    other = tiny_bert(d / "other")
    torch.manual_seed(7)
    T.BertModel(T.BertConfig.from_pretrained(other)).save_pretrained(other)
    write_tsv(d / "train.tsv", sentiment_rows(48, seed=0))
    write_tsv(d / "dev.tsv", sentiment_rows(16, seed=1))
    write_tsv(d / "unseen.tsv", [("good film", 1), ("meh", 2)])
    write_tsv(d / "renamed.tsv", sentiment_rows(4, seed=2), header=("text", "label"))
    write_tsv(d / "nolabel.tsv", [(t,) for t, _ in sentiment_rows(4, seed=2)], header=("sentence",))
    write_tsv(d / "one-class.tsv", [("good film", 1), ("great film", 1)])
    (d / "empty.tsv").write_text("")
    (d / "header-only.tsv").write_text("sentence\tlabel\n")
    (d / "fields.tsv").write_text("sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n")
    (d / "broken.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0\n')
    (d / "latin.tsv").write_bytes("sentence\tlabel\nna\xefve film\t1\n".encode("latin-1"))
    (d / "headless.tsv").write_text("".join(f"{t}\t{y}\n" for t, y in sentiment_rows(8, seed=3)))
    write_jsonl(d / "ask.jsonl", [{"id": 1, "q": "good film?"}, {"id": 2, "q": "dull?"}])
    (d / "notes").mkdir()
    (d / "notes" / "todo.txt").write_text("mine")
    (d / "a-file").write_text("x")
    _audio(d)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main(["train", "--model", "bert", "--train", "train.tsv", "--out", "run", *FAST]) == 0
        assert main(["train", "--model", "bert", "--train", "train.tsv", "--out", "lora", "--method", "lora",
                     "--lora-r", "2", *FAST]) == 0
        assert main(["merge", "--adapter", "lora", "--out", "merged"]) == 0
        assert main(["train", "--model", "bert", "--train", "train.tsv", "--out", "gated", "--method", "lora",
                     "--lora-r", "2", "-o", "use_gating=true", *FAST]) == 0
        assert main(["train", "--model", "speech", "--task", "ctc", "--train", "ctc-train.tsv", "--out", "ctc-run",
                     *FAST]) == 0
        assert main(["train", "--model", "bert", "--train", "train.tsv", "--out", "stopped", "--max-steps", "1",
                     *FAST]) == 0
        run = json.loads((d / "stopped" / "run.json").read_text())
        run["status"] = "running"  # as if it had been stopped after its first step
        (d / "stopped" / "run.json").write_text(json.dumps(run))
    finally:
        os.chdir(cwd)
    _damaged_adapters(d)
    (d / "deep.jsonl").write_text('{"sentence": ' + "[" * 100_000 + "]" * 100_000 + ', "label": 1}\n')
    write_tsv(d / "multi.tsv", [("good film", "a,b"), ("bad film", "b")], header=("sentence", "labels"))
    return d


def _damaged_adapters(d: Path) -> None:
    """Copies of the run's adapter whose adapter_config.json was damaged or edited by hand."""
    edits = {
        "deep-config": lambda m: '{"config": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "version-text": lambda m: {**m, "format_version": "1"},
        "version-list": lambda m: {**m, "format_version": [2]},
        "base-list": lambda m: {**m, "base_model": ["bert"]},
        "huge-head": lambda m: {**m, "head": {**m["head"], "num_labels": 10**12}},
        "float-head": lambda m: {**m, "head": {**m["head"], "num_labels": 1e12}},
    }
    for name, edit in edits.items():
        shutil.copytree(d / "run" / "adapter", d / name)
        meta = json.loads((d / name / "adapter_config.json").read_text())
        new = edit(meta)
        (d / name / "adapter_config.json").write_text(new if isinstance(new, str) else json.dumps(new))


def _audio(d: Path) -> None:
    """A tiny wav2vec2 (8 kHz feature extractor; ``speech-bare`` without it) and WAV folders."""
    import numpy as np
    import soundfile

    from helpers import ARCHS

    torch.manual_seed(0)
    speech = T.Wav2Vec2Model(ARCHS["wav2vec2"].config())
    speech.save_pretrained(d / "speech-bare")
    speech.save_pretrained(d / "speech")
    T.Wav2Vec2FeatureExtractor(sampling_rate=8000).save_pretrained(d / "speech")
    rng = np.random.default_rng(0)
    for folder, labels, rate in (("clips", ("yes", "no"), 8000), ("clips-16k", ("yes", "no"), 16000),
                                 ("clips-other", ("yes", "maybe"), 8000)):
        for label in labels:
            (d / folder / label).mkdir(parents=True)
            soundfile.write(str(d / folder / label / "0.wav"), rng.normal(0, 0.1, 800).astype("float32"), rate)
    # speech recognition (--task ctc): TSVs of path<TAB>transcript, paths relative to the TSV
    for name, text in (("ctc-train", "path\ttext\nclips/yes/0.wav\tyes\nclips/no/0.wav\tno\n"),
                       ("ctc-missing", "clips/yes/0.wav\tyes\nclips/maybe.wav\tmaybe\n"),
                       ("ctc-empty", "clips/yes/0.wav\tyes\nclips/no/0.wav\t  \n"),
                       ("ctc-unknown", "clips/yes/0.wav\tyés!\n"),
                       ("ctc-16k", "clips-16k/yes/0.wav\tyes\n"),
                       ("ctc-long", "clips/yes/0.wav\t" + "yes " * 30 + "\n"),
                       ("ctc-notab", "clips/yes/0.wav yes\n")):
        (d / f"{name}.tsv").write_text(text, encoding="utf-8")


TRAIN = ["train", "--model", "bert", "--train", "train.tsv", "--out", "new", *FAST]
AUDIO = ["train", "--model", "speech", "--train", "clips", "--out", "new", *FAST]
CTC = ["train", "--model", "speech", "--task", "ctc", "--train", "ctc-train.tsv", "--out", "new", *FAST]


def _ctc(train: str) -> list[str]:
    args = list(CTC)
    args[args.index("--train") + 1] = train
    return args


def _with(flag: str, value: str) -> list[str]:
    args = list(TRAIN)
    args[args.index(flag) + 1] = value
    return args


# (what the user did, argv, a fragment of the answer; stdin bytes for predict)
CASES: list[tuple[str, list[str], str]] = [
    ("training file missing", _with("--train", "nope.tsv"), "nope.tsv: no such file"),
    ("training file empty", _with("--train", "empty.tsv"), "the file is empty"),
    ("a header and no rows", _with("--train", "header-only.tsv"), "has a header but no rows"),
    ("a row with too many fields", _with("--train", "fields.tsv"), "fields.tsv:3: has 3 fields"),
    ("a line of invalid JSON", _with("--train", "broken.jsonl"), "broken.jsonl:2: not valid JSON"),
    ("text not in UTF-8", _with("--train", "latin.tsv"), "latin.tsv:2: not valid UTF-8"),
    ("a TSV without a header line", _with("--train", "headless.tsv"), "the first line looks like data"),
    ("a misspelt column flag", TRAIN + ["--label-column", "lable"], "Did you mean 'label'?"),
    ("an eval label never seen in training", TRAIN + ["--eval", "unseen.tsv"], "label '2' never occurs"),
    ("an eval file with other columns", TRAIN + ["--eval", "renamed.tsv"], "give both files the same header"),
    ("one label only", _with("--train", "one-class.tsv"), "needs at least two labels"),
    ("a model path that is not a model", _with("--model", "notes"), "is not a model"),
    ("an unknown method", TRAIN + ["--method", "pfeifer"], "Did you mean 'pfeiffer'?"),
    ("an unknown method option", TRAIN + ["-o", "reduction_facter=8"], "Did you mean 'reduction_factor'?"),
    ("a method option of the wrong type", TRAIN + ["-o", "layers=all"], "layers='all' should be a list of integers"),
    ("an option of another method", TRAIN + ["--lora-r", "8"], "Unknown option 'r' for method 'bottleneck'"),
    ("prefix tuning with a prefix of no positions", TRAIN + ["--method", "prefix_tuning", "-o", "prefix_length=0"],
     "prefix_length must be a positive number of positions"),
    ("a bottleneck narrower than 1", TRAIN + ["--reduction-factor", "64"], "larger than the hidden size 32"),
    ("--max-length above the model's positions", TRAIN + ["--max-length", "4096"], "position embeddings hold 128"),
    ("a prompt as long as the model's positions", TRAIN + ["--method", "prompt_tuning", "-o", "prompt_length=128"],
     "prompt_length=128 leaves no room for the input"),
    ("--max-length and the prompt beyond the positions", TRAIN + ["--method", "prompt_tuning"],
     "plus the prompt's 10 positions is more than 'bert' can take"),
    ("a prompt from a string without the text", TRAIN + ["--method", "prompt_tuning", "--max-length", "64", "-o",
                                                         "prompt_init=from_string"], "needs prompt_init_text"),
    ("--epochs 0", _with("--epochs", "0"), "--epochs must be >= 1"),
    ("--eval together with --val-fraction", TRAIN + ["--eval", "dev.tsv", "--val-fraction", "0.1"], "not both"),
    ("LoRA+ on a bottleneck adapter", TRAIN + ["--loraplus-lr-ratio", "16"], "drop the flag or use --method lora"),
    ("--no-base-dropout with --full-finetune", TRAIN + ["--full-finetune", "--no-base-dropout"], "for adapter training"),
    ("--out is a file", _with("--out", "a-file"), "is a file; pass a folder path"),
    ("--out holds other files", _with("--out", "notes"), "is not a run folder"),
    ("--overwrite on a folder of other files", _with("--out", "notes") + ["--overwrite"], "never other files"),
    ("--out holds a finished run", _with("--out", "run"), "holds a finished run"),
    ("--out in use by a running train", _with("--out", "stopped") + ["--overwrite"], "in use by another adapterkit"),
    ("--resume a folder without a run", ["train", "--resume", "notes"], "holds no run"),
    ("--resume a finished run", ["train", "--resume", "run"], "has finished already"),
    ("--resume with other settings", ["train", "--resume", "stopped", "--lr", "0.1"], "--lr differ"),
    ("a flag without its value", ["train", "--model", "bert", "--train"], "expected one argument"),
    ("eval: --adapter does not exist", ["eval", "--adapter", "nope", "--data", "dev.tsv"], "no such folder"),
    ("eval: --adapter is not an adapter", ["eval", "--adapter", "notes", "--data", "dev.tsv"], "not an adapter"),
    ("eval: --model is another base", ["eval", "--adapter", "run", "--model", "other", "--data", "dev.tsv"],
     "--allow-other-base"),
    ("eval: data without labels", ["eval", "--adapter", "run", "--data", "nolabel.tsv"], "no label column"),
    ("eval: --max-length too long", ["eval", "--adapter", "run", "--data", "dev.tsv", "--max-length", "999"],
     "--max-length 999"),
    ("predict: nothing on stdin", ["predict", "--adapter", "run"], "No text to predict"),
    ("predict: stdin not in UTF-8", ["predict", "--adapter", "run"], "<stdin>:1: not valid UTF-8"),
    ("predict: --input missing", ["predict", "--adapter", "run", "--input", "nope.jsonl"], "no such file"),
    ("predict: --input without the text column", ["predict", "--adapter", "run", "--input", "ask.jsonl"],
     "no column 'sentence'"),
    ("merge: a bottleneck adapter", ["merge", "--adapter", "run", "--out", "m"], "cannot be folded"),
    ("merge: --out holds other files", ["merge", "--adapter", "lora", "--out", "notes", "--overwrite"],
     "holds no model"),
    ("merge: --out holds a model", ["merge", "--adapter", "lora", "--out", "merged"], "pass --overwrite"),
    ("inspect: not an adapter", ["inspect", "notes"], "not an adapter"),
    ("LoRA on a module it cannot adapt", [*TRAIN, "--method", "lora", "-o", r"target_modules=.*0\.output\.LayerNorm"],
     "it takes nn.Linear / transformers' Conv1D, nn.Embedding, nn.Conv1d / Conv2d / Conv3d"),
    ("train_layer_norms outside the layers", [*TRAIN, "--method", "lora", "--roles", "embeddings", "-o",
                                              "train_layer_norms=true"], "covers no layer"),
    ("audio at another sampling rate", ["train", "--model", "speech", "--train", "clips-16k", "--out", "new", *FAST],
     "expects 8000 Hz"),
    ("an audio folder without clips", ["train", "--model", "speech", "--train", "notes", "--out", "new", *FAST],
     "no audio files found"),
    ("an audio eval label never seen in training", AUDIO + ["--eval", "clips-other"], "do not occur in the training"),
    ("audio for a speech model without its feature extractor",
     ["train", "--model", "speech-bare", "--train", "clips", "--out", "new", *FAST], "preprocessor_config.json"),
    ("audio clips for a text model", ["train", "--model", "bert", "--train", "clips", "--out", "new", *FAST],
     "reads text"),
    ("push: not an adapter", ["push", "notes", "pub"], "not an adapter folder"),
    ("push: into a folder of other files", ["push", "run", "notes"], "holds other files"),
    ("push: to a static web server", ["push", "run", "http://127.0.0.1:9/pub"], "read only"),
    ("pull: a local folder", ["pull", "notes"], "is local already"),
    ("ls: no such folder", ["ls", "nope"], "no such folder"),
    ("cache rm: not in the cache", ["cache", "rm", "nope"], "adapterkit cache ls"),
    ("eval: an AdapterHub hub name", ["eval", "--adapter", "nli/multinli@ukp", "--data", "dev.tsv"],
     "hf://nli/multinli"),
    ("an infinite learning rate", _with("--epochs", "1") + ["--lr", "inf"], "--lr must be a finite number"),
    ("an infinite weight decay", TRAIN + ["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    ("an infinite warm-up", TRAIN + ["--warmup", "inf"], "--warmup must be a finite number"),
    ("a seed beyond 64 bits", TRAIN + ["--seed", str(2**64)], "--seed must be a whole number from 0 to 4294967295"),
    ("an empty multi-label separator", _with("--train", "multi.tsv") + ["--task", "multilabel", "--label-sep", ""],
     "--label-sep must not be empty"),
    ("a JSONL row nested 100,000 deep", _with("--train", "deep.jsonl"), "deep.jsonl:1: JSON nested too deeply"),
    ("--eval-batch-size -1", TRAIN + ["--eval", "dev.tsv", "--eval-batch-size", "-1"],
     "--eval-batch-size must be >= 1, got -1"),
    ("--eval-batch-size 0", TRAIN + ["--eval", "dev.tsv", "--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    ("a metric the task does not compute", TRAIN + ["--metric", "bogus"], "--metric bogus is not computed"),
    ("eval: --batch-size 0", ["eval", "--adapter", "run", "--data", "dev.tsv", "--batch-size", "0"],
     "--batch-size must be >= 1, got 0"),
    ("eval: --batch-size -1", ["eval", "--adapter", "run", "--data", "dev.tsv", "--batch-size", "-1"],
     "--batch-size must be >= 1, got -1"),
    ("eval: --max-length -5", ["eval", "--adapter", "run", "--data", "dev.tsv", "--max-length", "-5"],
     "--max-length must be >= 2 tokens, got -5"),
    ("eval: --max-length 1", ["eval", "--adapter", "run", "--data", "dev.tsv", "--max-length", "1"],
     "--max-length must be >= 2 tokens, got 1"),
    ("predict: --batch-size 0", ["predict", "--adapter", "run", "--batch-size", "0", "good film"],
     "--batch-size must be >= 1, got 0"),
    ("predict: --batch-size -1", ["predict", "--adapter", "run", "--batch-size", "-1", "good film"],
     "--batch-size must be >= 1, got -1"),
    ("predict: a lone surrogate", ["predict", "--adapter", "run", "good \udc80 film"], "not valid Unicode text"),
    ("inspect: adapter_config.json nested 100,000 deep", ["inspect", "deep-config"], "nested too deeply"),
    ("eval: adapter_config.json nested 100,000 deep", ["eval", "--adapter", "deep-config", "--data", "dev.tsv"],
     "nested too deeply"),
    ('inspect: "format_version": "1"', ["inspect", "version-text"], "'format_version' must be a whole number, got '1'"),
    ('eval: "format_version": [2]', ["eval", "--adapter", "version-list", "--data", "dev.tsv"],
     "'format_version' must be a whole number, got [2]"),
    ('inspect: "base_model": [...]', ["inspect", "base-list"], "'base_model' must be an object, got ['bert']"),
    ('eval: "base_model": [...]', ["eval", "--adapter", "base-list", "--data", "dev.tsv"], "'base_model' must be an object"),
    ("eval: num_labels 10**12", ["eval", "--adapter", "huge-head", "--data", "dev.tsv"],
     "num_labels is 1000000000000, which its saved weights"),
    ("inspect: num_labels 1e12", ["inspect", "float-head"], "num_labels is 1000000000000.0, which its saved weights"),
    ("merge: adapter_config.json nested 100,000 deep", ["merge", "--adapter", "deep-config", "--out", "m"],
     "nested too deeply"),
    ("serve: --max-length above the model's positions", ["serve", "--model", "bert", "--max-length", "4096"],
     "position embeddings hold 128"),
    ("train: --quantize of no scheme", TRAIN + ["--quantize", "int3"], "--quantize must be int8 or int4, got 'int3'."),
    ("train: --quantize with --full-finetune", TRAIN + ["--full-finetune", "--quantize", "int8"],
     "--quantize freezes the base in low precision; --full-finetune trains it. Drop one of them."),
    ("merge: a gated LoRA (use_gating)", ["merge", "--adapter", "gated", "--out", "m"],
     "it has use_gating=True: its gate depends on the input"),
    ("ctc: a clip the TSV lists is missing", _ctc("ctc-missing.tsv"), "ctc-missing.tsv:2: no such audio file"),
    ("ctc: an empty transcript", _ctc("ctc-empty.tsv"), "ctc-empty.tsv:2: the transcript of clips/no/0.wav is empty"),
    ("ctc: a line without a tab", _ctc("ctc-notab.tsv"), "has 1 tab-separated field(s)"),
    ("ctc: eval characters never in training", CTC + ["--eval", "ctc-unknown.tsv"],
     "character(s) 'é' '!' that never occur in the training transcripts"),
    ("ctc: audio at another sampling rate", _ctc("ctc-16k.tsv"), "expects 8000 Hz"),
    ("ctc: a clip too short for its transcript", _ctc("ctc-long.tsv"), "clips/yes/0.wav lasts 0.10 s, 79 frames of the model, but its transcript needs 119"),
    ("ctc: --train is a folder", _ctc("clips"), "--task ctc reads a TSV of path<TAB>transcript lines"),
    ("ctc: a text model", ["train", "--model", "bert", "--task", "ctc", "--train", "ctc-train.tsv", "--out", "new",
                           *FAST], "model that reads text"),
    ("a transcript TSV for a speech model without --task ctc",
     ["train", "--model", "speech", "--train", "ctc-train.tsv", "--out", "new", *FAST], "or --task ctc with a TSV"),
    ("eval: ctc characters never in training", ["eval", "--adapter", "ctc-run", "--data", "ctc-unknown.tsv"],
     "ctc-unknown.tsv:1: the transcript has character(s) 'é' '!'"),
    ("eval: a folder for a speech recognition adapter", ["eval", "--adapter", "ctc-run", "--data", "clips"],
     "clips: is a folder"),
    ("predict: text for a speech recognition adapter", ["predict", "--adapter", "ctc-run", "good film"],
     "transcribes audio"),
    ("train: --cache-activations with the base's dropout on", TRAIN + ["--cache-activations", "--layers", "1"],
     "add --no-base-dropout"),
    ("train: --cache-activations with the adapter in layer 0", TRAIN + ["--cache-activations", "--no-base-dropout"],
     "starts at layer 0; put it in the upper layers only (e.g. --layers 1)"),
    ("train: --cache-memory below 0", TRAIN + ["--cache-activations", "--no-base-dropout", "--layers", "1",
                                          "--cache-memory", "-1"], "--cache-memory must be >= 0 MiB"),
]
STDIN = {"predict: nothing on stdin": b"\n\n", "predict: stdin not in UTF-8": "na\xefve\n".encode("latin-1")}


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".adapterkit.lock" not in p.name)


@pytest.mark.parametrize("what,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(ws, what, argv, fragment, capsys, monkeypatch):
    from adapterkit.train.runlock import RunLock

    monkeypatch.chdir(ws)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(STDIN.get(what, b"")), encoding="utf-8"))
    before = _listing(ws)
    lock = RunLock(ws / "stopped").acquire() if "in use" in what else None
    try:
        capsys.readouterr()
        code = main(argv)
    finally:
        if lock is not None:
            lock.release(discard=True)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and fragment in err, err
    assert _listing(ws) == before  # nothing written, nothing deleted
    if os.environ.get("ADAPTERKIT_DUMP_TABLE"):
        shown = " ".join(argv).replace(" " + " ".join(FAST), "").replace(str(ws), ".")
        print(f"\n| {what} | `adapterkit {shown}` | {err.replace(str(ws), '.').replace('|', '/')} |", file=sys.__stdout__)


def test_every_case_is_in_the_docs():
    text = DOC.read_text(encoding="utf-8")
    missing = [what for what, _, _ in CASES if f"| {what} |" not in text]
    assert not missing, f"docs/bad-input.md lacks rows for {missing}"


def test_workspace_left_clean(ws):
    shutil.rmtree(ws / "new", ignore_errors=True)
    assert not (ws / "new").exists()
