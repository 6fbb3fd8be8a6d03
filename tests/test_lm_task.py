"""``lm-classification``: a causal LM scored as a classifier through a template and a verbalizer.

A tiny random Llama learns a sentiment task through ``adapterkit train --template --verbalizer``
(the LM's loss on the answer token only), the scorer equals a hand computation of the answers'
log-probabilities (multi-token answers included), the labels mask everything but the answer,
the bare model is scored with ``adapterkit eval`` without ``--adapter``, and bad input is refused
with one line naming the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T

from adapterkit.cli import main
from adapterkit.data import Columns, DataError, Table, TaskSpec, build_task, encode, read_table
from adapterkit.data.verbalizer import answer_ids, gold_class, prompt_of
from adapterkit.train.choices import choice_scores
from test_cli import bad
from trainkit import sentiment_rows, tiny_bert, tiny_llama, write_tsv

TEMPLATE = "{text} it was"
FLAGS = ["--template", TEMPLATE, "--verbalizer", "bad,good"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmtask")
    tiny_llama(d / "llama")
    for seed, (split, rows) in enumerate((("train", 192), ("dev", 48), ("test", 48))):
        write_tsv(d / f"{split}.tsv", sentiment_rows(rows, seed=seed))
    return d


@pytest.fixture(scope="module")
def tok(ws):
    return T.AutoTokenizer.from_pretrained(ws / "llama")


def _spec(ws: Path, **kw) -> TaskSpec:
    table = read_table(ws / "train.tsv")
    return build_task(table, Columns(text="sentence", label="label"), None, decoder=True, template=kw.pop("template", TEMPLATE),
                      verbalizer=kw.pop("verbalizer", "bad,good"), **kw)


# -- training and evaluation through the CLI ---------------------------------------------------------------
def test_cli_learns_verbalizer_task_and_beats_the_bare_model(ws, tmp_path, capsys):
    assert main(["eval", "--model", str(ws / "llama"), "--data", str(ws / "test.tsv"), *FLAGS, "--json"]) == 0
    bare = json.loads(capsys.readouterr().out)
    assert bare["task"] == "lm-classification" and set(bare) >= {"accuracy", "macro_f1", "loss"}

    run = tmp_path / "run"
    assert main(["train", "--model", str(ws / "llama"), "--train", str(ws / "train.tsv"), "--eval", str(ws / "dev.tsv"),
                 "--test", str(ws / "test.tsv"), *FLAGS, "--method", "lora",
                 "--roles", "all-linear", "--epochs", "6", "--batch-size", "16", "--lr", "2e-2", "--out", str(run), "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "task lm-classification" in out and "trainable parameters" in out
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "lm-classification" and results["metric"] == "accuracy"
    assert results["test"]["accuracy"] >= 0.85 > bare["accuracy"], (results["test"], bare)
    assert (run / "training.png").is_file() and not (run / "checkpoint").exists()
    saved = json.loads((run / "adapter" / "adapterkit_task.json").read_text())
    assert saved["template"] == TEMPLATE and saved["verbalizer"] == ["bad", "good"] and saved["labels"] == ["0", "1"]
    assert not (run / "adapter" / "head_config.json").exists()  # the LM's own output layer answers: no head

    # eval of the saved adapter reproduces the run's test score; predict prints the label and its answer
    assert main(["eval", "--adapter", str(run), "--data", str(ws / "test.tsv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert main(["predict", "--adapter", str(run), "--json", "the film was great fun", "a dull and boring plot"]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["label"], p["answer"]) for p in preds] == [("1", "good"), ("0", "bad")]
    assert sum(preds[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_resume_continues_a_verbalizer_run(ws, tmp_path, capsys, monkeypatch):
    """Checkpoints and --resume work for the task: a run interrupted (Ctrl-C) at step 7 and resumed
    from its step-6 checkpoint ends with the adapter of an uninterrupted run."""
    from safetensors.torch import load_file

    from adapterkit.train import loop

    common = ["--model", str(ws / "llama"), "--train", str(ws / "train.tsv"), *FLAGS, "--method", "lora",
              "--epochs", "2", "--batch-size", "32", "--lr", "1e-2", "--save-every", "3", "--progress", "none"]
    assert main(["train", *common, "--out", str(tmp_path / "full")]) == 0
    step = loop._Runner.step

    def interrupted(self, ddp, batch, *rest):
        if self.state["step"] == 7:
            raise KeyboardInterrupt
        return step(self, ddp, batch, *rest)

    monkeypatch.setattr(loop._Runner, "step", interrupted)
    assert main(["train", *common, "--out", str(tmp_path / "part")]) == 130
    monkeypatch.setattr(loop._Runner, "step", step)
    assert json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())["step"] == 6
    assert main(["train", "--resume", str(tmp_path / "part")]) == 0
    capsys.readouterr()
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# -- the scorer and the labels ---------------------------------------------------------------------------
def test_scorer_equals_hand_computed_log_probabilities(ws):
    model = T.AutoModelForCausalLM.from_pretrained(ws / "llama").eval()
    prompts = [[4, 9, 12, 30], [7, 8], [20, 21, 22, 23, 24, 25]]
    choices = [[5], [6, 7], [6, 8, 9]]  # one-token and multi-token answers, two sharing their first token
    got = choice_scores(model, prompts, choices, batch_size=2, pad_id=0)
    for n, prompt in enumerate(prompts):
        for k, answer in enumerate(choices):
            with torch.no_grad():
                logp = model(torch.tensor([prompt + answer])).logits[0].double().log_softmax(-1)
            want = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(answer))
            assert got[n, k].item() == pytest.approx(want, abs=1e-4), (n, k)


def test_labels_cover_the_answer_only(ws, tok):
    spec = _spec(ws)
    table = read_table(ws / "dev.tsv")
    enc = encode(spec, table, tok)
    assert enc.choices == [tok(" bad", add_special_tokens=False)["input_ids"], tok(" good", add_special_tokens=False)["input_ids"]]
    for row, ids, labels in zip(table.rows, enc.input_ids, enc.labels):
        prompt = tok(TEMPLATE.format(text=row["sentence"]), add_special_tokens=False)["input_ids"]
        answer = enc.choices[int(row["label"])]
        assert ids == prompt + answer
        assert labels == [-100] * len(prompt) + answer
        assert prompt_of(ids, labels) == prompt and gold_class(labels, enc.choices) == int(row["label"])
    # without labels (predict) the rows are the prompts alone
    bare = encode(spec, table, tok, with_labels=False)
    assert bare.labels == [] and bare.input_ids[0] == prompt_of(enc.input_ids[0], enc.labels[0])


def test_long_rows_lose_text_not_template_or_answer(ws, tok):
    spec = _spec(ws, max_length=8)
    long = "the film was good and the story was fun and the cast was great"
    table = Table(Path("x.tsv"), "tsv", ["sentence", "label"], [{"sentence": long, "label": "1"}], [2])
    enc = encode(spec, table, tok)
    words = tok.convert_ids_to_tokens(enc.input_ids[0])
    assert len(words) == 8 and words[-3:] == ["it", "was", "good"] and words[:5] == long.split()[:5]
    assert enc.labels[0] == [-100] * 7 + enc.choices[1]


def test_label_word_mapping_sets_the_label_order(ws):
    spec = _spec(ws, verbalizer="1=good,0=bad")
    assert spec.labels == ["1", "0"] and spec.verbalizer == ["good", "bad"]


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template, verbalizer, needle", [
    ("Review: sentiment:", "bad,good", "has no {text}"),
    ("{text} {label}", "bad,good", "may name {text} only"),
    ("{text} it was ", "bad,good", "ends with a space"),
    ("{text", "bad,good", "malformed"),
    (TEMPLATE, "bad,good,fine", "3 word(s) (bad,good,fine) for 2 labels (0, 1)"),
    (TEMPLATE, "0=bad,2=good", "no word for label '1'"),
    (TEMPLATE, "good,good", "the same word"),
    (TEMPLATE, "0=bad,good", "mixes label=word"),
    (TEMPLATE, None, "are not words"),
])
def test_bad_template_or_verbalizer(ws, template, verbalizer, needle):
    with pytest.raises(DataError, match=None) as err:
        _spec(ws, template=template, verbalizer=verbalizer)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_verbalizer_words_the_tokenizer_cannot_spell(tok):
    class Empty:
        unk_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [] if "zzz" in text else [5]}

    with pytest.raises(DataError, match="'zzz' tokenises to nothing"):
        answer_ids(Empty(), ["good", "zzz"])
    with pytest.raises(DataError, match="'splendid' is not in the model's vocabulary"):
        answer_ids(tok, ["good", "splendid"])


def test_cli_bad_input(ws, tmp_path, capsys):
    bert = tiny_bert(tmp_path / "bert")
    out = tmp_path / "never"
    train = ["train", "--train", str(ws / "train.tsv"), "--out", str(out), "--progress", "none"]
    bad(capsys, [*train, "--model", str(bert), *FLAGS], "not a causal LM", "--model smollm2")
    bad(capsys, [*train, "--model", str(ws / "llama"), "--task", "lm-classification"], "needs --template")
    bad(capsys, [*train, "--model", str(ws / "llama"), "--task", "classification", *FLAGS], "drop them")
    bad(capsys, [*train, "--model", str(ws / "llama"), "--template", "{text} it was", "--verbalizer", "bad"],
        "1 word(s)", "one word per label")
    bad(capsys, [*train, "--model", str(ws / "llama"), "--template", "{text} it was", "--verbalizer", "bad,splendid"],
        "'splendid' is not in the model's vocabulary")
    assert not out.exists()
    data = ["--data", str(ws / "dev.tsv")]
    bad(capsys, ["eval", *data, *FLAGS], "pass --model")
    bad(capsys, ["eval", "--model", str(bert), *data], "needs a trained head", "--template")
    bad(capsys, ["eval", "--model", str(bert), *data, *FLAGS], "not a causal LM")
