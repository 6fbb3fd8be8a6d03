"""The ``adapterkit`` command on tiny local models: train, eval, predict, inspect, merge, full
fine-tuning, causal LM, and bad input (one line on stderr, exit code 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from adapterkit import AdapterModel
from adapterkit.cli import main
from trainkit import run_cli, sentiment_rows, tiny_bert, tiny_llama, train_and_merge_lora, write_jsonl, write_tsv

FAST = ["--epochs", "4", "--batch-size", "16", "--lr", "1e-2", "--progress", "none"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: tiny BERT, SST-like data, and one trained run shared by the read-only tests."""
    d = tmp_path_factory.mktemp("ws")
    tiny_bert(d / "bert")
    write_tsv(d / "train.tsv", sentiment_rows(160, seed=0))
    write_tsv(d / "dev.tsv", sentiment_rows(40, seed=1))
    return d


@pytest.fixture(scope="module")
def trained(ws):
    out = ws / "run"
    code = main(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--eval", str(ws / "dev.tsv"),
                 "--test", str(ws / "dev.tsv"), "--out", str(out), *FAST])
    assert code == 0
    return out


def test_train_prints_share_size_and_test_metric(ws, capsys):
    out = ws / "run2"
    assert main(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--eval", str(ws / "dev.tsv"),
                 "--test", str(ws / "dev.tsv"), "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "trainable share:" in text and "adapter size on disk:" in text and "test accuracy:" in text
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "training.png").is_file()
    assert json.loads((out / "run.json").read_text())["config"]["method"] == "pfeiffer"


def test_eval_predict_inspect(trained, ws, capsys):
    capsys.readouterr()
    assert main(["eval", "--adapter", str(trained), "--data", str(ws / "dev.tsv"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    results = json.loads((trained / "results.json").read_text())
    assert scores["accuracy"] == pytest.approx(results["test"]["accuracy"]) and scores["rows"] == 40

    # predict agrees with eval: its accuracy over the dev texts is the eval accuracy
    dev = [l.split("\t") for l in (ws / "dev.tsv").read_text().splitlines()[1:]]
    (ws / "texts.txt").write_text("\n\n".join(t for t, _ in dev) + "\n", encoding="utf-8")  # blank lines skipped
    assert main(["predict", "--adapter", str(trained / "adapter"), "--model", str(ws / "bert"),
                 "--input", str(ws / "texts.txt"), "--json"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 40 and set(rows[0]["probabilities"]) == {"0", "1"}
    assert sum(r["label"] == y for r, (_, y) in zip(rows, dev)) / 40 == pytest.approx(scores["accuracy"])

    assert main(["predict", "--adapter", str(trained), dev[0][0], dev[1][0]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split("\t")[0] for l in lines] == [rows[0]["label"], rows[1]["label"]]
    assert lines[0].split("\t")[2] == dev[0][0] and 0.5 <= float(lines[0].split("\t")[1]) <= 1.0

    assert main(["inspect", str(trained)]) == 0
    text = capsys.readouterr().out
    assert "reduction_factor" in text and "layers.0.ffn_out" in text and "head" in text and "total" in text
    assert main(["inspect", str(trained / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = AdapterModel.from_pretrained(str(ws / "bert"))
    model.load_adapter(trained / "adapter")
    assert info["total_parameters"] == sum(p.numel() for p in model.adapters.parameters()) + sum(
        p.numel() for p in model.heads.parameters())


def test_predict_reads_stdin_as_a_subprocess(trained, ws):
    dev = [l.split("\t") for l in (ws / "dev.tsv").read_text().splitlines()[1:4]]
    res = run_cli(["predict", "--adapter", str(trained)], input="".join(t + "\n" for t, _ in dev))
    assert res.returncode == 0, res.stderr
    out = [l.split("\t") for l in res.stdout.strip().splitlines()]
    assert [o[2] for o in out] == [t for t, _ in dev] and all(o[0] in ("0", "1") for o in out)


def test_merge_lora_loads_without_adapterkit(ws, tmp_path, capsys):
    merged = train_and_merge_lora(ws, tmp_path, 4, FAST)
    run = tmp_path / "lora"  # the run folder train_and_merge_lora trained into
    assert "AutoModel" in capsys.readouterr().out
    plain = T.AutoModel.from_pretrained(merged).eval()
    adapted = AdapterModel.from_pretrained(str(ws / "bert"))
    adapted.load_adapter(run / "adapter", set_active=True, with_head=False)
    adapted.eval()
    batch = {"input_ids": torch.tensor([[2, 5, 9, 30, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        want = adapted(**batch).last_hidden_state
        got = plain(**batch).last_hidden_state
    assert (want - got).abs().max().item() < 1e-5
    # the merged folder (with its head) works with eval like any adapter
    assert main(["eval", "--adapter", str(merged), "--data", str(ws / "dev.tsv"), "--json"]) == 0


def test_full_finetune_run(ws, tmp_path, capsys):
    run = tmp_path / "full"
    assert main(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--eval", str(ws / "dev.tsv"),
                 "--full-finetune", "--out", str(run), "--epochs", "1", "--progress", "none"]) == 0
    assert "model size on disk" in capsys.readouterr().out
    assert (run / "model" / "config.json").is_file()
    assert main(["eval", "--adapter", str(run), "--data", str(ws / "dev.tsv")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_causal_lm_text_and_generation(tmp_path, capsys):
    llama = tiny_llama(tmp_path / "llama")
    write_jsonl(tmp_path / "lm.jsonl", [{"text": "alice met bob in paris ."}] * 24)
    run = tmp_path / "lm"
    assert main(["train", "--model", str(llama), "--train", str(tmp_path / "lm.jsonl"), "--method", "parallel",
                 "--val-fraction", "0.25", "--out", str(run), "--epochs", "6", "--lr", "2e-2", "--batch-size", "6",
                 "--progress", "none"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "causal-lm" and results["eval"]["perplexity"] < 3.0
    capsys.readouterr()
    assert main(["predict", "--adapter", str(run), "--max-new-tokens", "4", "alice met"]) == 0
    assert capsys.readouterr().out.strip().startswith("bob in paris")


# -- bad input -------------------------------------------------------------------------------------------
def bad(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err, err  # one line
    for needle in needles:
        assert needle in err, err
    return err


def train_args(ws, out, **override):
    args = {"--model": str(ws / "bert"), "--train": str(ws / "train.tsv"), "--out": str(out)}
    args.update(override)
    return ["train", *[x for kv in args.items() for x in kv if kv[1] is not None], "--progress", "none"]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(ws, tmp_path, capsys):
    out = tmp_path / "out"
    bad(capsys, train_args(ws, out, **{"--train": str(tmp_path / "nope.tsv")}), "nope.tsv: no such file")
    bad(capsys, train_args(ws, out, **{"--label-column": "lable"}), "train.tsv", "no column 'lable'", "Did you mean 'label'")
    (tmp_path / "empty.tsv").write_text("")
    bad(capsys, train_args(ws, out, **{"--train": str(tmp_path / "empty.tsv")}), "empty.tsv: the file is empty")
    write_tsv(tmp_path / "dev.tsv", [("good film", 1), ("meh", 2)])
    bad(capsys, train_args(ws, out, **{"--eval": str(tmp_path / "dev.tsv")}),
        "dev.tsv:3: label '2' never occurs in the training data")
    (tmp_path / "latin.tsv").write_bytes("sentence\tlabel\nna\xefve film\t1\n".encode("latin-1"))
    bad(capsys, train_args(ws, out, **{"--train": str(tmp_path / "latin.tsv")}), "latin.tsv:2: not valid UTF-8", "iconv")
    bad(capsys, train_args(ws, out, **{"--model": str(tmp_path)}), "is not a model", "config.json")
    bad(capsys, train_args(ws, out, **{"--method": "pfeifer"}), "Unknown method or preset 'pfeifer'", "Did you mean 'pfeiffer'")
    bad(capsys, train_args(ws, out) + ["-o", "reduction_facter=8"], "Unknown option 'reduction_facter'",
        "Did you mean 'reduction_factor'")
    bad(capsys, train_args(ws, out) + ["--lora-r", "8"], "Unknown option 'r' for method 'bottleneck'")
    bad(capsys, ["train", "--resume", str(ws)], "holds no run", "run.json")
    bad(capsys, train_args(ws, out, **{"--epochs": "0"}), "--epochs must be >= 1")
    bad(capsys, train_args(ws, out) + ["--full-finetune", "--no-base-dropout"], "--no-base-dropout is for adapter training")
    bad(capsys, ["train", "--model", str(ws / "bert"), "--train"], "expected one argument")
    bad(capsys, ["eval", "--adapter", str(tmp_path / "none"), "--data", str(ws / "dev.tsv")], "no such folder")
    assert not out.exists()


def test_existing_run_folder_is_not_overwritten(trained, ws, capsys):
    before = (trained / "adapter" / "adapter_model.safetensors").read_bytes()
    bad(capsys, train_args(ws, trained), "is not empty", "a finished run", "--overwrite")
    bad(capsys, ["train", "--resume", str(trained)], "has finished already")
    assert (trained / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_overwrite_replaces_a_run(ws, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(train_args(ws, out, **{"--epochs": "1"})) == 0
    (out / "stale.txt").write_text("old")  # a file inside a run folder goes with the run
    assert main(train_args(ws, out, **{"--epochs": "1"}) + ["--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "adapter").is_dir()


def test_merge_refuses_bottleneck(trained, tmp_path, capsys):
    bad(capsys, ["merge", "--adapter", str(trained), "--out", str(tmp_path / "m")], "cannot be folded", "lora and ia3")
    assert not (tmp_path / "m").exists()


def test_console_entry_point_exit_code(tmp_path):
    res = run_cli(["train", "--train", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "missing.tsv" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_minilm_alias_on_real_sst2_rows(sst2_dir, tmp_path, capsys):
    """The packaged all-MiniLM-L6-v2 through the alias, on 480 real SST-2 rows (about 30 s)."""
    out = tmp_path / "sst2"
    assert main(["train", "--model", "minilm", "--train", str(sst2_dir / "train.tsv"), "--eval",
                 str(sst2_dir / "dev.tsv"), "--max-train-rows", "480", "--max-eval-rows", "200", "--epochs", "1",
                 "--out", str(out), "--progress", "none"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["eval"]["accuracy"] > 0.7 and results["parameters"]["trainable"] == 261_650
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out), "a gripping , beautifully acted film", "dull and lifeless"]) == 0
    assert [l.split("\t")[0] for l in capsys.readouterr().out.strip().splitlines()] == ["1", "0"]
