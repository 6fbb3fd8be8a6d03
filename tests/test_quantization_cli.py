"""``--quantize`` on ``adapterkit train / eval / predict`` and ``serve`` (its engine), on a tiny BERT."""

from __future__ import annotations

import json

import pytest
from trainkit import sentiment_rows, tiny_bert, write_tsv

from adapterkit.cli import main

pytest.importorskip("torchao")

FAST = ["--epochs", "4", "--batch-size", "16", "--lr", "1e-2", "--progress", "none"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    tiny_bert(d / "bert")
    write_tsv(d / "train.tsv", sentiment_rows(160, seed=0))
    write_tsv(d / "dev.tsv", sentiment_rows(40, seed=1))
    return d


def _train(ws, out: str, *extra: str) -> dict:
    assert main(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--test", str(ws / "dev.tsv"),
                 "--out", str(ws / out), *FAST, *extra]) == 0
    return json.loads((ws / out / "results.json").read_text())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_train_eval_predict_on_a_quantized_base(ws, scheme, capsys):
    float_acc = _train(ws, f"float-{scheme}")["test"]["accuracy"]
    results = _train(ws, scheme, "--method", "lora", "--quantize", scheme) if scheme == "int4" else \
        _train(ws, scheme, "--quantize", scheme)
    assert results["test"]["accuracy"] >= min(0.9, float_acc - 0.1)  # it learns through the quantized layers
    assert json.loads((ws / scheme / "run.json").read_text())["config"]["quantize"] == scheme
    capsys.readouterr()
    # eval on the same quantized base reproduces the run's own test score
    assert main(["eval", "--adapter", str(ws / scheme), "--data", str(ws / "dev.tsv"), "--quantize", scheme,
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(results["test"]["accuracy"])
    # the adapter trained on the quantized base runs on the float base (with a note) and predicts
    with pytest.warns(UserWarning, match=f"trained on this base in {scheme}"):
        assert main(["predict", "--adapter", str(ws / scheme), "--json", "good film", "bad film"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    # and the float one on the quantized base
    with pytest.warns(UserWarning, match=f"runs here on the {scheme} copy"):
        assert main(["eval", "--adapter", str(ws / f"float-{scheme}"), "--data", str(ws / "dev.tsv"),
                     "--quantize", scheme, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] >= float_acc - 0.1


def test_eval_refuses_an_unknown_scheme(ws, capsys):
    code = main(["eval", "--model", str(ws / "bert"), "--data", str(ws / "dev.tsv"), "--quantize", "int3"])
    assert code == 2 and "argument --quantize: invalid choice: 'int3' (choose from 'int8', 'int4')" in \
        capsys.readouterr().err


def test_serve_on_a_quantized_base_answers_as_the_routed_model(ws):
    """Over HTTP on the int8 base, each text gets the probabilities its adapter gives it on the same
    quantized base in this process (both adapters loaded in one server)."""
    import httpx
    import torch
    from serve_helpers import Running

    from adapterkit import AdapterModel
    from adapterkit.loader import load_tokenizer
    from adapterkit.serve.config import ServeConfig

    _train(ws, "served-lora", "--method", "lora")
    _train(ws, "served-pfeiffer")
    adapters = {"l": str(ws / "served-lora" / "adapter"), "p": str(ws / "served-pfeiffer" / "adapter")}
    config = ServeConfig(model=str(ws / "bert"), adapters=adapters, quantize="int8", batch_window=0.05)
    texts = ["good film", "bad film", "a dull plot"]
    with Running(config) as server:
        with httpx.Client(timeout=30) as client:
            answers = {name: client.post(server.url + "/v1/classify", json={"adapter": name, "texts": texts}).json()
                       for name in adapters}
    tok = load_tokenizer(str(ws / "bert"))
    for name, directory in adapters.items():
        served = torch.tensor([[r["probabilities"][k] for k in sorted(r["probabilities"])]
                               for r in answers[name]["results"]])
        probs = {}
        for quantize in ("int8", None):
            model = AdapterModel.from_pretrained(str(ws / "bert"), quantize=quantize)
            model.load_adapter(directory, set_active=True)
            model.eval()
            with torch.no_grad():
                probs[quantize] = model(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
        assert torch.allclose(served, probs["int8"], atol=1e-5)
        assert (served - probs[None]).abs().max() > 1e-4  # the server ran the int8 base, not the float one
