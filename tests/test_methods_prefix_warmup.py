"""Prefix tuning's MLP warm-up (``methods/prefix_tuning.py``, ``mlp_warmup``): the prefix trains
through the MLP for the first steps, then the MLP is folded and the prefix trains flat. The fold
leaves the function unchanged bit for bit, each phase trains only its own parameters (never the
base's), the saved adapter is flat and loads with the same outputs, and ``adapterkit train``
tells the modules the step."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
import transformers as T
from helpers import make_batch, output_of, run

from adapterkit import AdapterError, AdapterModel
from adapterkit.methods.base import tell_step
from adapterkit.config import resolve_config
from adapterkit.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from adapterkit.train import TrainConfig, fit, prepare
from adapterkit.train import distributed as D
from trainkit import sentiment_rows, tiny_llama as save_tiny_llama, write_tsv

TEXT = "the movie was wonderful"


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(T.LlamaConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, pad_token_id=0)).eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_warmup(**options) -> AdapterModel:
    model = AdapterModel(tiny_llama())
    model.add_adapter("p", "prefix_tuning", prefix_length=3, bottleneck_size=8, set_active=True,
                      **{"mlp_warmup": 2, **options})
    model.train_adapter("p")
    return model


def logits(model: AdapterModel, batch: dict) -> torch.Tensor:
    """The output with gradients (``helpers.run`` runs without)."""
    return output_of(model(**batch))


def units(model: AdapterModel) -> list[PrefixTuning]:
    return [m for m in model.adapters["p"].modules() if isinstance(m, PrefixTuning)]


def mlp_params(model: AdapterModel) -> list[torch.nn.Parameter]:
    return [p for u in units(model) for p in [u.wte.weight, *u.control_trans.parameters()]]


def test_folding_mid_training_leaves_the_function_unchanged_bit_for_bit():
    model = with_warmup()
    batch = make_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):  # two steps through the MLP: its output and the prefix both non-trivial
        tell_step(model, step, 6)
        logits(model, batch).square().mean().backward()
        opt.step()
        opt.zero_grad()
    before, folded = logits(model, batch), units(model)[0].folded().clone()
    tell_step(model, 2, 6)
    assert all(u.mlp_frozen for u in units(model))
    assert torch.equal(logits(model, batch), before)  # training mode, through the gradient path
    assert torch.equal(units(model)[0].folded(), folded)
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(model, batch), before)  # the folded inference path


def test_each_phase_trains_only_its_own_parameters_and_never_the_base():
    model = with_warmup()
    base = {n: p.detach().clone() for n, p in model.model.named_parameters() if "adapters" not in n}
    flat = [u.prefix for u in units(model)]
    batch = make_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = []
    for step in range(4):
        tell_step(model, step, 4)
        logits(model, batch).square().mean().backward()
        got = {"mlp": all(p.grad is not None and p.grad.abs().max() > 0 for p in mlp_params(model)),
               "flat": all(p.grad is not None and p.grad.abs().max() > 0 for p in flat)}
        assert got["mlp"] != got["flat"], (step, got)
        mlp_before = [p.detach().clone() for p in mlp_params(model)]
        flat_before = [p.detach().clone() for p in flat]
        opt.step()
        opt.zero_grad()
        changed = lambda old, new: any(not torch.equal(a, b) for a, b in zip(old, new))  # noqa: E731
        seen.append((changed(mlp_before, mlp_params(model)), changed(flat_before, flat)))
    assert seen == [(True, False), (True, False), (False, True), (False, True)]
    for n, p in model.model.named_parameters():
        if n in base:
            assert p.grad is None and torch.equal(p, base[n]), n


def test_a_fraction_of_the_steps_and_before_any_step():
    model = with_warmup(mlp_warmup=0.25)
    tell_step(model, 1, 8)
    assert not units(model)[0].mlp_frozen
    tell_step(model, 2, 8)
    assert units(model)[0].mlp_frozen
    tell_step(model, 0, 8)  # a new run (or a resumed one at step 0) starts with the MLP again
    assert not units(model)[0].mlp_frozen


def test_saved_flat_after_the_fold_and_loaded_with_the_same_outputs(tmp_path):
    model = with_warmup(prefix_init="from_string", prefix_init_text=TEXT, tokenizer_name_or_path="minilm")
    batch = make_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(4):
        tell_step(model, step, 4)
        logits(model, batch).square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        out = run(model, batch)
    model.save_adapter(tmp_path / "p", "p")
    again = AdapterModel(tiny_llama())
    name = again.load_adapter(tmp_path / "p", set_active=True)
    config = again.records[name].config
    assert config.flat and config.mlp_warmup == 0 and config.prefix_init == "random"
    with torch.no_grad():
        assert torch.equal(run(again, batch), out)


def test_from_string_with_the_warm_up_starts_at_the_texts_keys_and_values():
    flat = AdapterModel(tiny_llama())
    flat.add_adapter("p", "prefix_tuning", prefix_length=3, flat=True, prefix_init="from_string",
                     prefix_init_text=TEXT, tokenizer_name_or_path="minilm")
    warm = with_warmup(prefix_init="from_string", prefix_init_text=TEXT, tokenizer_name_or_path="minilm")
    want = next(m for m in flat.adapters["p"].modules() if isinstance(m, PrefixTuning)).folded()
    assert torch.equal(units(warm)[0].folded(), want)  # the MLP's output starts at zero


@pytest.mark.parametrize("options, match", [
    ({"mlp_warmup": 5, "flat": True}, "flat=True has no MLP"),
    ({"mlp_warmup": -1}, "mlp_warmup must be"),
    ({"mlp_warmup": 2.5}, "mlp_warmup must be"),
])
def test_bad_warm_ups_are_refused(options, match):
    model = AdapterModel(tiny_llama())
    with pytest.raises(AdapterError, match=match):
        model.add_adapter("p", "prefix_tuning", **options)
    assert "p" not in model.adapters


def test_adapterkit_train_folds_at_the_warm_up(tmp_path):
    """A run of 4 steps with the MLP folded after 2: both phases trained (the flat part starts at
    zero and trains only after the fold), and the saved adapter is flat."""
    save_tiny_llama(tmp_path / "llama")
    write_tsv(tmp_path / "train.tsv", sentiment_rows(64, seed=0))
    config = TrainConfig(model=str(tmp_path / "llama"), train=str(tmp_path / "train.tsv"), template="{text} it was",
                         verbalizer="bad,good", method="prefix_tuning", batch_size=16, epochs=1, progress="none",
                         options={"prefix_length": 2, "bottleneck_size": 8, "mlp_warmup": 2})
    prep = prepare(config)
    unit = next(m for m in prep.model.adapters[prep.name].modules() if isinstance(m, PrefixTuning))
    mlp_start = unit.control_trans[2].weight.detach().clone()
    assert not unit.mlp_frozen and not unit.prefix.abs().max() > 0
    results = fit(prep, tmp_path / "run", echo=lambda _m: None)
    assert results["steps"] == 4 and unit.mlp_frozen
    assert unit.prefix.abs().max() > 0 and not torch.equal(unit.control_trans[2].weight, mlp_start)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["flat"] is True and saved["config"]["mlp_warmup"] == 0


@pytest.mark.parametrize("method, options, flat, positions", [
    ("prefix_tuning", {}, True, 20),                        # the measured defaults: flat, 20 positions, zero
    ("prefix_tuning", {"prefix_length": 10}, True, 10),     # the user's options win
    ("prefix_tuning", {"mlp_warmup": 0.3}, False, 20),      # an MLP option keeps the MLP
    ("prefix_tuning", {"flat": False}, False, 20),
    ("prefix_tuning_flat", {}, True, 30),                   # a preset gets no training defaults
])
def test_adapterkit_train_defaults_for_prefix_tuning(method, options, flat, positions):
    config = TrainConfig(method=method, options=options)
    adapter = config.adapter_config()
    assert (adapter.flat, adapter.prefix_length) == (flat, positions)
    assert adapter.prefix_init == ("zero" if method == "prefix_tuning" else "random")
    assert config.learning_rate == 1e-2 and TrainConfig(method=method, options=options, lr=3e-3).learning_rate == 3e-3
    assert PrefixTuningConfig() == PrefixTuningConfig(prefix_length=30, flat=False)  # the Python API: AdapterHub's
    assert TrainConfig(method="pfeiffer").adapter_config() == resolve_config("pfeiffer")


def test_ddp_looks_for_unused_parameters_only_with_a_warm_up():
    """Under DDP the warm-up's idle half gets no gradient: DDP must be told (and only then)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    ddp = None
    try:
        model = with_warmup()
        ddp = D.wrap(model, D.DistEnv(rank=0, world_size=2))  # as rank 0 of two
        assert ddp.find_unused_parameters
        for step in (0, 2):  # a step in each phase runs backward without DDP's unused-parameter error
            tell_step(model, step, 4)
            output_of(ddp(**make_batch())).square().mean().backward()
        flat = AdapterModel(tiny_llama())
        flat.add_adapter("p", "prefix_tuning", prefix_length=3, flat=True, set_active=True)
        flat.train_adapter("p")
        assert not D.wrap(flat, D.DistEnv(rank=0, world_size=2)).find_unused_parameters
    finally:
        ddp = None
        D.shutdown(D.DistEnv(rank=0, world_size=2))
