"""The training loop on tiny models: every task, best-adapter selection, early stopping, gradient
accumulation, full fine-tuning, the schedule, and the optimizer state as safetensors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as T
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from adapterkit import AdapterModel
from adapterkit.train import TrainConfig, fit, prepare, train
from adapterkit.train.batches import epoch_batches, micro_batches, shard
from adapterkit.train.optim import load_optimizer_state, lr_at, make_optimizer, optimizer_state
from trainkit import sentiment_rows, tiny_bert, tiny_llama, write_jsonl, write_tsv


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def sst(tmp_path_factory):
    d = tmp_path_factory.mktemp("sst")
    write_tsv(d / "train.tsv", sentiment_rows(192, seed=0))
    write_tsv(d / "dev.tsv", sentiment_rows(48, seed=1))
    return d


def cfg(model, data, **kw):
    base = dict(model=str(model), train=str(data / "train.tsv"), eval=str(data / "dev.tsv"), epochs=4, batch_size=16,
                lr=1e-2, progress="none", head_dropout=0.0, log_every=2)
    return TrainConfig(**{**base, **kw})


def base_weights(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def test_adapter_learns_and_writes_the_run_folder(bert, sst, tmp_path):
    prep = prepare(cfg(bert, sst, test=str(sst / "dev.tsv")))
    before = base_weights(prep.model)
    results = fit(prep, tmp_path / "run")
    out = tmp_path / "run"
    assert results["test"]["accuracy"] >= 0.85, results
    assert results["best_eval"] == pytest.approx(max(r["accuracy"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                                       if r["type"] == "eval" and r["split"] == "eval"))
    for name in ("run.json", "metrics.jsonl", "training.png", "results.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/adapterkit_task.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint").exists()  # removed once the run has finished
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["type"] == "train"]
    assert {"loss", "lr", "examples_per_s", "step", "epoch"} <= set(train_recs[0])
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    assert [r["epoch"] for r in records if r["type"] == "eval" and r["split"] == "eval"] == [1, 2, 3, 4]
    # only adapter and head parameters changed
    after = base_weights(prep.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors")).keys()
    assert all(k.startswith(("adapter.", "head.")) for k in keys)


def test_saved_adapter_is_the_best_one(bert, sst, tmp_path):
    results = train(cfg(bert, sst, epochs=2), tmp_path / "run")
    model = AdapterModel.from_pretrained(str(bert))
    model.load_adapter(tmp_path / "run" / "adapter", set_active=True)
    from adapterkit.train.artifacts import load_trained
    from adapterkit.data import encode, read_table
    from adapterkit.train.evaluate import evaluate

    loaded = load_trained(tmp_path / "run")
    enc = encode(loaded.spec, read_table(sst / "dev.tsv"), loaded.tokenizer)
    scores = evaluate(loaded.model, enc, loaded.spec, batch_size=8, pad_id=0)
    assert scores["accuracy"] == pytest.approx(results["best_eval"])


def test_early_stopping(bert, sst, tmp_path):
    # every eval row is the same text with both labels: accuracy cannot improve after the first eval
    write_tsv(tmp_path / "dev.tsv", [("the film", i % 2) for i in range(8)])
    c = cfg(bert, sst, eval=str(tmp_path / "dev.tsv"), epochs=6, early_stopping=2)
    results = train(c, tmp_path / "run")
    evals = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["type"] == "eval"]
    assert results["stopped_early"] and len(evals) == 3


def test_micro_batches_give_the_same_adapter(bert, sst, tmp_path):
    # Micro-batches (5 + 5 + 5 + 1 rows of each 16-row batch) sum the same gradient in another order.
    # In float32 that order alone moves the result: a gradient element that is a sum of per-row terms
    # of both signs carries a relative error of up to ~n·u / |cancellation| (u = 2^-24 ≈ 6e-8), Adam
    # turns it into an update error of up to ~2·lr·(relative error) per step, and 12 steps at lr 1e-2
    # add up (transformers 5.25 gave 1.31e-6 where older releases gave < 1e-6: kernel summation
    # order, not a bug). So both runs train in float64 (u = 2^-53 ≈ 1.1e-16, 2^-29 ≈ 1.9e-9 times
    # smaller): the same rounding drift is ~1e-15, and 1e-10 leaves four orders of magnitude for it
    # while any real accumulation mistake (a micro-batch weighted wrongly, a step taken per
    # micro-batch) moves the weights by ~lr = 1e-2.
    a = prepare(cfg(bert, sst, epochs=1, eval=None))
    a.model.to(torch.float64)
    fit(a, tmp_path / "a")
    b = prepare(cfg(bert, sst, epochs=1, eval=None, micro_batch_size=5))
    b.model.to(torch.float64)
    fit(b, tmp_path / "b")
    wa = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert all(w.dtype == torch.float64 for w in wa.values())
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-10


@pytest.mark.parametrize("method, options", [("houlsby", {}), ("lora", {"r": 4}), ("parallel", {}), ("ia3", {})])
def test_other_methods_train(bert, sst, tmp_path, method, options):
    results = train(cfg(bert, sst, epochs=1, method=method, options=options), tmp_path / "run")
    assert results["parameters"]["trainable"] < results["parameters"]["total"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_regression_multilabel_tagging(bert, tmp_path):
    rows = sentiment_rows(64, seed=3)
    write_jsonl(tmp_path / "reg.jsonl", [{"text": t, "score": 1.5 + 2 * y + 0.1 * (i % 3)} for i, (t, y) in enumerate(rows)])
    r = train(TrainConfig(model=str(bert), train=str(tmp_path / "reg.jsonl"), val_fraction=0.25, epochs=2, lr=1e-2,
                          progress="none"), tmp_path / "reg")
    assert r["task"] == "regression" and set(r["eval"]) == {"pearson", "spearman", "mse", "rmse"}

    write_jsonl(tmp_path / "ml.jsonl", [{"text": t, "labels": ["pos"] if y else ["neg", "x"]} for t, y in rows])
    r = train(TrainConfig(model=str(bert), train=str(tmp_path / "ml.jsonl"), val_fraction=0.25, epochs=2, lr=1e-2,
                          progress="none"), tmp_path / "ml")
    assert r["task"] == "multilabel" and r["metric"] == "micro_f1"

    tag_rows = [{"tokens": ["alice", "visited", "paris"], "tags": ["B-PER", "O", "B-LOC"]},
                {"tokens": ["bob", "met", "alice", "in", "london"], "tags": ["B-PER", "O", "B-PER", "O", "B-LOC"]}] * 16
    write_jsonl(tmp_path / "tags.jsonl", tag_rows)
    r = train(TrainConfig(model=str(bert), train=str(tmp_path / "tags.jsonl"), eval=str(tmp_path / "tags.jsonl"),
                          epochs=4, lr=2e-2, batch_size=8, progress="none"), tmp_path / "tags")
    assert r["task"] == "tagging" and r["metric"] == "span_f1" and r["eval"]["span_f1"] > 0.9


def test_causal_lm_prompt_completion(llama, tmp_path):
    rows = [{"prompt": f"{a} met", "completion": f"{b} ."} for a, b in [("alice", "bob"), ("bob", "alice")] * 16]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    c = TrainConfig(model=str(llama), train=str(tmp_path / "qa.jsonl"), eval=str(tmp_path / "qa.jsonl"), method="lora",
                    epochs=3, lr=3e-2, batch_size=8, progress="none")
    r = train(c, tmp_path / "run")
    assert r["task"] == "causal-lm" and r["metric"] == "loss"
    assert r["eval"]["perplexity"] == pytest.approx(math.exp(r["eval"]["loss"]), rel=1e-4)
    first_eval = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert r["best_eval"] <= first_eval.get("loss", float("inf"))


def test_full_finetune_saves_a_plain_model(bert, sst, tmp_path):
    prep = prepare(cfg(bert, sst, epochs=1, full_finetune=True, lr=1e-3))
    before = base_weights(prep.model)
    fit(prep, tmp_path / "run")
    after = base_weights(prep.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    folder = tmp_path / "run" / "model"
    plain = T.AutoModel.from_pretrained(folder)
    best = {k: v for k, v in plain.state_dict().items()}
    assert all(torch.allclose(best[k], after[k]) for k in ("encoder.layer.0.output.dense.weight",))
    assert (folder / "adapterkit_head.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()


# -- pieces ----------------------------------------------------------------------------------------
def test_epoch_batches_are_deterministic_and_complete():
    lengths = [i % 17 + 1 for i in range(1000)]
    a = epoch_batches(lengths, 32, seed=7, epoch=2)
    assert a == epoch_batches(lengths, 32, seed=7, epoch=2)
    assert a != epoch_batches(lengths, 32, seed=7, epoch=3)
    assert sorted(i for b in a for i in b) == list(range(1000))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a]
    assert sum(spread) / len(spread) < 2  # grouped by length: little padding
    batch = a[0]
    assert sorted(shard(batch, 0, 2) + shard(batch, 1, 2)) == sorted(batch)
    assert sum(micro_batches(batch, 5), []) == batch


def test_schedule_warmup_then_linear_decay():
    lrs = [lr_at(s, 100, 10, 1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[55] == pytest.approx(5e-4) and lrs[-1] < 2e-5
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(50, 100, 0, 1e-3, "cosine") == pytest.approx(5e-4)
    assert lr_at(99, 100, 10, 1e-3, "constant") == 1e-3


def test_optimizer_state_round_trips_without_pickle():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = make_optimizer(net, 1e-2, 0.01)
    for _ in range(3):
        net(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = optimizer_state(opt, [n for n, _ in net.named_parameters()])
    tensors = safetensors_load(safetensors_save(tensors))  # through the file format, as in a checkpoint
    clone = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    clone.load_state_dict(net.state_dict())
    opt2 = make_optimizer(clone, 1e-2, 0.01)
    load_optimizer_state(opt2, [n for n, _ in clone.named_parameters()], tensors, json.loads(json.dumps(meta)), "x")
    x = torch.randn(5, 4)
    for o, m in ((opt, net), (opt2, clone)):
        m(x).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), clone.parameters()))


def test_loraplus_gives_lora_b_its_ratio_through_the_schedule(bert, sst, tmp_path):
    prep = prepare(cfg(bert, sst, epochs=1, method="lora", loraplus_lr_ratio=8.0))
    from adapterkit.train.optim import loraplus, set_lr

    opt = make_optimizer(prep.model, 1e-3, 0.0, loraplus(8.0))
    names = {id(p): n for n, p in prep.model.named_parameters()}
    rates = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rates and all(lr == pytest.approx(8e-3 if n.endswith("lora_B") else 1e-3) for n, lr in rates.items())
    assert any(n.endswith("lora_B") for n in rates) and any(n.endswith("lora_A") for n in rates)
    set_lr(opt, 5e-4)  # the schedule keeps the ratio
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == [5e-4, 4e-3]
    results = fit(prep, tmp_path / "run")  # and a run with it trains and saves
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file() and results["parameters"]["trainable"]


def test_loraplus_on_another_method_is_refused_before_anything_is_written(bert, sst, tmp_path):
    from adapterkit.errors import AdapterError

    with pytest.raises(AdapterError, match="--loraplus-lr-ratio applies to LoRA"):
        train(cfg(bert, sst, epochs=1, method="pfeiffer", loraplus_lr_ratio=16.0), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("base_dropout", [False, True])
def test_no_base_dropout_keeps_the_frozen_base_in_eval_mode_through_training(tmp_path, sst, base_dropout):
    """``--no-base-dropout``: the base runs as at inference through every training step
    (evaluations put the model in eval mode and back); by default its dropout acts."""
    bert = tiny_bert(tmp_path / "bert", dropout=0.1)
    prep = prepare(cfg(bert, sst, epochs=2, base_dropout=base_dropout))
    dropout = next(m for m in prep.model.model.modules() if isinstance(m, torch.nn.Dropout))
    seen: list[bool] = []
    dropout.register_forward_pre_hook(lambda module, args: seen.append(module.training) if torch.is_grad_enabled() else None)
    fit(prep, tmp_path / "run")
    assert len(seen) > 2 and set(seen) == {base_dropout}
    assert prep.model.heads[prep.name].training  # the head's own dropout acts either way


def test_no_base_dropout_with_full_finetune_is_refused(bert, sst, tmp_path):
    from adapterkit.errors import AdapterError

    with pytest.raises(AdapterError, match="--no-base-dropout is for adapter training"):
        train(cfg(bert, sst, full_finetune=True, base_dropout=False), tmp_path / "run")
    assert not (tmp_path / "run").exists()
