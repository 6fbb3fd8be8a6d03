"""``--cache-activations``: the frozen blocks below the adapter run once per batch, and the trained
adapter is the same bit for bit as without the cache (train/activation_cache.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from adapterkit import AdapterModel
from adapterkit.errors import AdapterError
from adapterkit.train import TrainConfig, fit, prepare, train
from adapterkit.train.activation_cache import CACHE_PREFIX, ActivationCache
from adapterkit.train.batches import epoch_batches, fixed_epoch_batches
from trainkit import sentiment_rows, tiny_bert, write_tsv


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    # dropout in the base: --no-base-dropout must switch it off for the cache to be exact
    return tiny_bert(tmp_path_factory.mktemp("bert"), dropout=0.1, layers=4)


@pytest.fixture(scope="module")
def sst(tmp_path_factory):
    d = tmp_path_factory.mktemp("sst")
    write_tsv(d / "train.tsv", sentiment_rows(120, seed=0))
    write_tsv(d / "dev.tsv", sentiment_rows(32, seed=1))
    return d


def cfg(model, data, **kw):
    base = dict(model=str(model), train=str(data / "train.tsv"), eval=str(data / "dev.tsv"), epochs=3, batch_size=16,
                lr=1e-2, progress="none", base_dropout=False, options={"layers": [2, 3]}, save_every=5)
    return TrainConfig(**{**base, **kw})


def adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("method, options, memory_mb", [
    ("pfeiffer", {"layers": [2, 3]}, 0.0),  # every batch spilled to the file
    ("lora", {"layers": [2, 3], "r": 4}, 1024.0),  # every batch in memory
    ("pfeiffer", {"layers": [1, 3], "stochastic_depth": 0.3, "dropout": 0.1}, 0.01),  # random above the cut: exact too
])
def test_cached_run_trains_the_same_adapter_bit_for_bit(bert, sst, tmp_path, method, options, memory_mb):
    ref = train(cfg(bert, sst, method=method, options=options, fixed_batches=True), tmp_path / "ref")
    got = train(cfg(bert, sst, method=method, options=options, cache_activations=True, cache_memory_mb=memory_mb),
                tmp_path / "cached")
    cache = got["activation_cache"]
    batches = 120 // 16 + 1
    assert cache["used"] and cache["misses"] == batches and cache["hits"] == 2 * batches, cache
    assert cache["cut_layer"] == options["layers"][0]
    assert (cache["disk_mib"] > 0) == (memory_mb < 1)
    a, b = adapter(tmp_path / "ref"), adapter(tmp_path / "cached")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ref["best_eval"] == got["best_eval"]
    assert not list((tmp_path / "cached").glob(CACHE_PREFIX + "*"))  # its own folder is gone


def test_fixed_batches_keep_each_batch_and_shuffle_their_order():
    lengths = [(i * 7) % 23 + 1 for i in range(100)]
    first, ids1 = fixed_epoch_batches(lengths, 8, 3, 1)
    assert first == epoch_batches(lengths, 8, 3, 1) and ids1 == list(range(len(first)))
    second, ids2 = fixed_epoch_batches(lengths, 8, 3, 2)
    assert sorted(map(tuple, second)) == sorted(map(tuple, first)) and second != first
    assert all(second[j] == first[i] for j, i in enumerate(ids2))
    assert fixed_epoch_batches(lengths, 8, 3, 2) == (second, ids2)


def test_a_cache_that_would_change_the_output_turns_itself_off(bert):
    model = AdapterModel.from_pretrained(str(bert))
    model.add_adapter("a", "pfeiffer", layers=[2, 3])
    model.train_adapter("a", base_dropout=False)
    torch.nn.init.normal_(model.adapters["a"]["layers-3-ffn_out"].up.weight)  # a non-zero adapter
    ids = torch.randint(5, 40, (4, 9))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    notes = []
    cache = ActivationCache(model, "a", bert, 2**20, echo=notes.append)
    first = cache.run(model, inputs, "k")[0]
    assert torch.equal(cache.run(model, inputs, "k")[0], first) and cache.enabled  # served: the same bits
    cache.verified = False
    cache.memory["k"] += 1e-3  # what a block that depends on its position in the list would do
    out = cache.run(model, inputs, "k")[0]
    assert not cache.enabled and torch.equal(out, first) and "without the cache" in notes[0]


@pytest.mark.parametrize("change, message", [
    (dict(base_dropout=True), "--no-base-dropout"),
    (dict(options={}), "starts at layer 0"),
    (dict(method="prompt_tuning", options={}, max_length=64), "prompt tuning"),
    (dict(method="prefix_tuning", options={}), "prefix tuning"),
    (dict(adapter_drop=1), "--adapter-drop"),
    (dict(full_finetune=True, options={}), "--full-finetune"),
])
def test_a_cache_that_cannot_be_exact_is_refused_before_anything_is_written(bert, sst, tmp_path, change, message):
    with pytest.raises(AdapterError, match=message) as err:
        train(cfg(bert, sst, cache_activations=True, **change), tmp_path / "run")
    assert "--cache-activations" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_resumed_cached_run_trains_the_same_adapter_and_cleans_up(bert, sst, tmp_path, monkeypatch):
    from adapterkit.train import loop

    train(cfg(bert, sst, fixed_batches=True), tmp_path / "ref")
    out = tmp_path / "run"
    saved = loop._Runner.save_checkpoint

    def save_then_die(self):
        saved(self)
        if self.state["step"] == 10:  # in epoch 2, with batches served from the cache
            raise KeyboardInterrupt

    monkeypatch.setattr(loop._Runner, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(prepare(cfg(bert, sst, cache_activations=True, cache_memory_mb=0.0)), out)
    monkeypatch.setattr(loop._Runner, "save_checkpoint", saved)
    assert not list(out.glob(CACHE_PREFIX + "*"))  # closed on the way out
    (out / (CACHE_PREFIX + "left-by-kill-9")).mkdir()  # what a killed run leaves
    mine = out / "notes.txt"
    mine.write_text("mine")
    results = fit(prepare(cfg(bert, sst, cache_activations=True, cache_memory_mb=0.0)), out, resume=True)
    a, b = adapter(tmp_path / "ref"), adapter(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results["activation_cache"]["misses"] > 0 and results["activation_cache"]["hits"] > 0
    assert not list(out.glob(CACHE_PREFIX + "*")) and mine.read_text() == "mine"


def test_the_command_line_flags_reach_the_run(bert, sst, tmp_path):
    import json

    from adapterkit.cli import main

    out = tmp_path / "cli"
    assert main(["train", "--model", str(bert), "--train", str(sst / "train.tsv"), "--out", str(out), "--epochs", "2",
                 "--batch-size", "16", "--progress", "none", "--layers", "2,3", "--no-base-dropout",
                 "--cache-activations", "--cache-memory", "0"]) == 0
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["cache_activations"] and config["cache_memory_mb"] == 0 and not config["fixed_batches"]
    cache = json.loads((out / "results.json").read_text())["activation_cache"]
    assert cache["hits"] == cache["misses"] == 8 and cache["disk_mib"] > 0
