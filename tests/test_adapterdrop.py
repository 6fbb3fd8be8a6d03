"""AdapterDrop (``adapterdrop.py``): ``skip_layers`` at run time, no autograd graph below the
lowest active adapter, the training callback and the ``--adapter-drop`` flag.

The no-graph tests force the embeddings' output to ask for a gradient (what the speed
benchmark's floor and ``enable_input_require_grads`` do): without the trick every block would
then record a graph and the backward pass would run down to the embeddings.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as T

from adapterkit import AdapterError, AdapterModel
from adapterkit.composition.adapterdrop import AdapterDrop
from adapterkit.train.adapterdrop import AdapterDropCallback
from adapterkit.train import TrainConfig, fit, prepare
from trainkit import sentiment_rows, tiny_bert, write_tsv

IDS = torch.tensor([[1, 5, 7, 9, 2, 4], [3, 4, 8, 2, 6, 1]])


def tiny(layers: int = 4) -> AdapterModel:
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
                       vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return AdapterModel(T.BertModel(cfg))


def perturb(model: AdapterModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def out(model: AdapterModel) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


@pytest.mark.parametrize("preset", ["pfeiffer", "lora", "houlsby"])
def test_skip_layers_equals_the_adapter_without_those_layers(preset):
    model = tiny()
    model.add_adapter("a", preset)
    model.add_adapter("top", preset, layers=[2, 3])
    perturb(model)
    for key, unit in model.records["top"].modules.items():
        unit.load_state_dict(model.records["a"].modules[key].state_dict())
    model.set_active_adapters("top")
    ref = out(model)
    model.set_active_adapters("a", skip_layers=[0, 1])
    assert model.skip_layers == [0, 1]
    torch.testing.assert_close(out(model), ref, rtol=0, atol=0)
    model.set_active_adapters("a")  # a new setup without skip_layers uses every layer
    assert model.skip_layers == [] and not torch.equal(out(model), ref)
    model.skip_layers = [0, 1]  # the setter: the active setup stays
    torch.testing.assert_close(out(model), ref, rtol=0, atol=0)


@pytest.mark.parametrize("skip", [[4], [-1], [0, 7], 2, ["0"]])
def test_skip_layers_outside_the_model_is_refused_and_changes_nothing(skip):
    model = tiny()
    model.add_adapter("a", "pfeiffer")
    model.add_adapter("b", "pfeiffer")
    model.set_active_adapters("a", skip_layers=[1])
    with pytest.raises(AdapterError, match="skip_layers"):
        model.set_active_adapters("b", skip_layers=skip)
    with pytest.raises(AdapterError, match="skip_layers"):
        model.skip_layers = skip
    assert model.active_adapters.names() == ["a"] and model.skip_layers == [1]


def grad_run(model: AdapterModel, trick: bool):
    """Block outputs' ``grad_fn``, the gradient reaching the embeddings' output, the output and
    the adapters' gradients of one training step; ``trick=False`` removes the no-grad hooks."""
    if not trick:
        model._grad_free.update(model.layout, {}, [])
    fns, emb = {}, {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: fns.__setitem__(i, o[0].grad_fn if isinstance(o, tuple)
                                                                          else o.grad_fn))
               for i, b in enumerate(model.layout.blocks)]

    def keep(module, args, o):
        o.requires_grad_(True)
        o.retain_grad()
        emb["out"] = o

    handles.append(model.model.embeddings.register_forward_hook(keep))
    model.zero_grad(set_to_none=True)
    hidden = model(input_ids=IDS).last_hidden_state
    hidden.pow(2).mean().backward()
    for h in handles:
        h.remove()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.adapters.named_parameters()}
    return fns, emb["out"].grad, hidden.detach(), grads


@pytest.mark.parametrize("preset", ["pfeiffer", "lora"])
def test_no_graph_below_the_lowest_adapter_same_outputs_and_gradients(preset):
    model = tiny(6)
    model.add_adapter("a", preset, layers=[3, 4, 5])
    perturb(model)
    model.train_adapter("a")
    fns, emb_grad, hidden, grads = grad_run(model, trick=True)
    assert [fns[i] is None for i in range(6)] == [True, True, True, False, False, False]
    assert emb_grad is None  # the backward pass stopped at layer 3
    model.train_adapter("a")  # places the hooks again
    ref_fns, ref_emb_grad, ref_hidden, ref_grads = grad_run(model, trick=False)
    assert all(f is not None for f in ref_fns.values()) and ref_emb_grad is not None
    torch.testing.assert_close(hidden, ref_hidden, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert grads[k] is not None
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0)


def test_skip_layers_moves_the_no_graph_boundary_up():
    model = tiny(6)
    model.add_adapter("a", "pfeiffer")
    model.train_adapter("a")
    model.skip_layers = [0, 1, 2, 3]
    fns, emb_grad, _, grads = grad_run(model, trick=True)
    assert [fns[i] is None for i in range(6)] == [True] * 4 + [False] * 2
    assert emb_grad is None
    skipped = [k for k in grads if any(k.startswith(f"a.layers-{i}-") for i in range(4))]
    assert skipped and all(grads[k] is None for k in skipped)
    assert all(grads[k] is not None for k in grads if k not in skipped)


def test_no_trick_where_gradients_are_needed_below():
    # a trainable block below the adapter: its weights get gradients
    model = tiny()
    model.add_adapter("a", "pfeiffer", layers=[3])
    model.train_adapter("a")
    block0 = model.layout.blocks[0]
    block0.requires_grad_(True)
    model(input_ids=IDS).last_hidden_state.pow(2).mean().backward()
    assert all(p.grad is not None for p in block0.parameters() if p.requires_grad)
    # a routed call through an adapter in a lower layer trains it
    model = tiny()
    model.add_adapter("top", "pfeiffer", layers=[3])
    model.add_adapter("all", "pfeiffer")
    model.train_adapter(["top"])
    model.adapters["all"].requires_grad_(True)
    model(input_ids=IDS, adapter_names=["all", "top"]).last_hidden_state.pow(2).mean().backward()
    low = [p for k, p in model.adapters["all"].named_parameters() if k.startswith("layers-0-")]
    assert low and all(p.grad is not None for p in low) and any(p.grad.abs().sum() > 0 for p in low)
    # no active adapter: no hook anywhere
    model.set_active_adapters(None)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.layout.blocks)


def test_encoder_decoder_decoder_only_adapters_free_the_whole_encoder():
    torch.manual_seed(0)
    cfg = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4)
    model = AdapterModel(T.T5Model(cfg))
    model.add_adapter("decoder:d", "pfeiffer", layers=[1])
    model.set_active_adapters("d")
    enc, dec = model.layout.stacks["encoder"].blocks, model.layout.stacks["decoder"].blocks
    assert model._grad_free.blocks == [*enc, dec[0]]
    model.add_adapter("e", "pfeiffer", layers=[1])  # both stacks
    model.set_active_adapters("e")
    assert model._grad_free.blocks == [enc[0]]  # the decoder reads the encoder's output everywhere


def test_adapterdrop_draws_from_seed_and_step():
    model = tiny(6)
    drop = AdapterDrop(seed=3)
    draws = [drop.layers(model, step) for step in range(200)]
    assert draws == [AdapterDrop(seed=3).layers(model, step) for step in range(200)]
    assert {len(d) for d in draws} == set(range(6))  # 0 .. 5 layers: never the top one
    assert all(d == list(range(len(d))) for d in draws)
    assert {len(AdapterDrop(max_dropped=2).layers(model, s)) for s in range(100)} == {0, 1, 2}
    with pytest.raises(AdapterError, match="max_dropped"):
        AdapterDrop(max_dropped=-1)


def test_callback_drops_during_steps_and_restores():
    model = tiny(6)
    model.add_adapter("a", "pfeiffer")
    model.train_adapter("a")
    cb = AdapterDropCallback(max_dropped=4, seed=1)
    seen = []
    for step in range(30):
        cb.on_step_begin(None, SimpleNamespace(global_step=step), None, model=model)
        seen.append(model.skip_layers)
        assert model.active_adapters.names() == ["a"]
        cb.on_step_end(None, SimpleNamespace(global_step=step), None, model=model)
        assert model.skip_layers == []
    assert {len(s) for s in seen} == {0, 1, 2, 3, 4}
    with pytest.raises(AdapterError, match="AdapterModel"):
        cb.on_step_begin(None, SimpleNamespace(global_step=0), None, model=torch.nn.Linear(2, 2))


def test_training_loop_flag(tmp_path):
    bert = tiny_bert(tmp_path / "bert")
    write_tsv(tmp_path / "train.tsv", sentiment_rows(96, seed=0))
    cfg = TrainConfig(model=str(bert), train=str(tmp_path / "train.tsv"), epochs=1, batch_size=8, progress="none",
                      adapter_drop=1, val_fraction=0.25)
    prep = prepare(cfg)
    seen = []
    block1 = prep.model.layout.blocks[1]
    block1.register_forward_pre_hook(lambda m, a: seen.append(prep.model.skip_layers) if torch.is_grad_enabled()
                                     else None)
    fit(prep, tmp_path / "run")
    assert {tuple(s) for s in seen} == {(), (0,)}
    assert prep.model.skip_layers == []
    with pytest.raises(AdapterError, match="--adapter-drop"):
        TrainConfig(train="x", adapter_drop=-1).validate()


def test_the_old_import_path_of_the_callback_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="adapterkit.train.adapterdrop"):
        from adapterkit.adapterdrop import AdapterDropCallback as Old
    assert Old is AdapterDropCallback
