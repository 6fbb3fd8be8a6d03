"""``Parallel(a, b, ...)``: one forward pass, one output per adapter, equal to each adapter alone;
the layers below the lowest adapter run once (``parallel.py``); the nesting table."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from adapterkit import AdapterError, AdapterModel, Average, BatchSplit, Parallel, Stack
from adapterkit.composition import ALLOWED_NESTINGS, setup_from_dict
from helpers import ARCHS, AUDIO_SAMPLES, make_base

IDS = torch.tensor([[1, 5, 7, 9, 2, 4], [3, 4, 8, 2, 6, 1], [9, 9, 3, 1, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])


def perturb(model: AdapterModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def bert(layers: int = 4) -> AdapterModel:
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
                       vocab_size=100)
    return AdapterModel(T.BertModel(cfg).eval())


def three(model: AdapterModel) -> AdapterModel:
    """Three adapters of different methods and layers, each with its own head."""
    model.add_adapter("a", "pfeiffer", layers=[2, 3])
    model.add_adapter("b", "lora", layers=[1, 3])
    model.add_adapter("c", "houlsby")
    for name, labels in (("a", 3), ("b", 2), ("c", 4)):
        model.add_classification_head(name, labels)
    perturb(model)
    return model.eval()


def alone(model: AdapterModel, setup, **kw):
    model.set_active_adapters(setup)
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, **kw)


def test_parallel_equals_each_adapter_alone_with_its_head():
    model = three(bert())
    refs = [alone(model, n).logits for n in "abc"]
    outs = alone(model, Parallel("a", "b", "c"))
    assert len(outs) == 3
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-6)


def test_parallel_inside_a_stack_and_stacks_inside_parallel():
    model = three(bert())
    model.add_adapter("lang", "pfeiffer")
    perturb(model, seed=1)
    refs = [alone(model, Stack("lang", n)).logits for n in "ab"]
    outs = alone(model, Stack("lang", Parallel("a", "b")))
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-6)
    outs = alone(model, Parallel(Stack("lang", "a"), "b"))
    torch.testing.assert_close(outs[0].logits, refs[0], rtol=0, atol=1e-6)


def test_layers_below_the_lowest_adapter_run_once():
    model = three(bert(4))
    rows: dict[int, list[int]] = {}  # the rows each block's output has
    for i, block in enumerate(model.layout.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: rows.setdefault(i, []).append(
            (o[0] if isinstance(o, tuple) else o).shape[0]))
    alone(model, Parallel("a", "b"))  # lowest adapter: b in layer 1
    assert rows == {0: [3], 1: [6], 2: [6], 3: [6]}
    rows.clear()
    alone(model, Parallel("a", Stack("a")))  # both in layers 2, 3
    assert rows == {0: [3], 1: [3], 2: [6], 3: [6]}


def test_parallel_without_heads_gives_each_adapters_model_output():
    model = bert()
    model.add_adapter("a", "pfeiffer", layers=[3])
    model.add_adapter("b", "ia3")
    perturb(model)
    refs = [alone(model, n).last_hidden_state for n in "ab"]
    outs = alone(model, Parallel("a", "b"))
    for out, ref in zip(outs, refs):
        assert out.last_hidden_state.shape == ref.shape
        torch.testing.assert_close(out.last_hidden_state, ref, rtol=0, atol=1e-6)


def test_parallel_on_a_decoder_with_rotary_embeddings():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=100)
    model = AdapterModel(T.LlamaForCausalLM(cfg).eval())
    model.add_adapter("a", "lora", layers=[1, 2])
    model.add_adapter("b", "pfeiffer", layers=[2])
    perturb(model)
    refs = [alone(model, n).logits for n in "ab"]
    outs = alone(model, Parallel("a", "b"))
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)
    gen = dict(input_ids=IDS[:2, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.set_active_adapters(Parallel("a", "b"))
    both = model.generate(**gen)
    for name, seq in zip("ab", both):
        model.set_active_adapters(name)
        assert torch.equal(seq, model.generate(**gen))
    model.set_active_adapters(Parallel("a", "b"))
    with pytest.raises(AdapterError, match="adapter_names"):
        model.generate(**gen, adapter_names=["a", "b"])


def test_training_a_parallel_setup_reaches_every_adapter_and_head():
    model = three(bert())
    model.train_adapter(Parallel("a", "b"))
    out = model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([1, 0, 1]))
    assert out.loss is not None
    torch.testing.assert_close(out.loss, out[0].loss + out[1].loss)
    out.loss.backward()
    for name in "ab":
        assert all(p.grad is not None for p in model.adapters[name].parameters())
        assert all(p.grad is not None for p in model.heads[name].parameters())
    assert all(p.grad is None for p in model.adapters["c"].parameters())


def test_parallel_adds_the_adapters_auxiliary_loss():
    model = bert()
    for name in "ab":
        model.add_adapter(name, "pfeiffer", layers=[3], l2_lambda=0.5)
        model.add_classification_head(name, 2)
    perturb(model)
    model.train_adapter(Parallel("a", "b"))
    model.model.eval()  # no dropout: the same function as each adapter alone
    out = model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([1, 0, 1]))
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out[0].loss + out[1].loss + out.aux_loss)


def test_the_nesting_table():
    assert Parallel in ALLOWED_NESTINGS[Stack] and Parallel not in ALLOWED_NESTINGS[Parallel]
    for outer in ALLOWED_NESTINGS:
        for inner in ALLOWED_NESTINGS:
            extra = {"weights": None} if outer is Average else {"batch_sizes": [1, 2]} if outer is BatchSplit else {}
            child = inner("x", "y", **({"batch_sizes": [1, 1]} if inner is BatchSplit else {}))
            if inner in ALLOWED_NESTINGS[outer]:
                block = outer(child, "z", **extra)
                assert setup_from_dict(block.to_dict()) == block
            else:
                with pytest.raises(AdapterError, match=f"{inner.__name__} cannot be nested in {outer.__name__}"):
                    outer(child, "z", **extra)


@pytest.mark.parametrize("setup, match", [
    (Stack(Stack("a", Parallel("a", "b"))), "one Parallel block"),
    (Stack(Parallel("a", "b"), Parallel("a", "c")), "one Parallel block"),
    (Parallel("a", "nope"), "No adapter named"),
    (Parallel("a", "g"), "outside the model's blocks"),
])
def test_bad_parallel_setups_change_nothing(setup, match):
    model = three(bert())
    model.add_adapter("g", "bottleneck", target_modules=["pooler.dense"])
    model.set_active_adapters("a")
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.model.modules())
    with pytest.raises(AdapterError, match=match):
        model.set_active_adapters(setup)
    assert model.active_adapters == Stack("a")
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.model.modules()) == hooks


def test_parallel_refusals_at_call_time():
    model = three(bert())
    model.set_active_adapters(Parallel("a", "b"))
    with pytest.raises(AdapterError, match="adapter_names"):
        model(input_ids=IDS, adapter_names=["a", "b", "a"])
    with pytest.raises(AdapterError, match="not 2 copies of a batch; call the AdapterModel"):
        model.model(input_ids=IDS)  # the wrapped model takes its batch as already replicated
    model.delete_head("a")
    model.delete_head("b")
    with pytest.raises(AdapterError, match="labels with a Parallel setup"):
        model(input_ids=IDS, labels=torch.tensor([0, 1, 0]))


# -- encoder-decoders ------------------------------------------------------------------------------------
def t5(layers: int = 3) -> AdapterModel:
    torch.manual_seed(0)
    cfg = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=layers, num_heads=4,
                     decoder_start_token_id=0, pad_token_id=0)
    return AdapterModel(T.T5ForConditionalGeneration(cfg)).eval()


def rows_seen(model: AdapterModel) -> dict[tuple[str, int], list[int]]:
    """The rows each block's output has, by (stack, layer), filled by every forward."""
    rows: dict = {}
    for name, stack in model.layout.stacks.items():
        for i, block in enumerate(stack.blocks):
            block.register_forward_hook(lambda m, a, o, k=(name, i): rows.setdefault(k, []).append(
                (o[0] if isinstance(o, tuple) else o).shape[0]))
    return rows


def test_parallel_on_t5_gives_each_adapters_lm_output_loss_and_generation():
    """One output per adapter through the shared LM head, equal to each alone (logits and the
    per-copy loss); encoder layers below the lowest adapter run once; generate gives each
    adapter's own sequences."""
    model = t5()
    model.add_adapter("a", "pfeiffer", layers=[1, 2])  # both stacks, from encoder layer 1
    model.add_adapter("b", "lora", stacks=["decoder"])
    perturb(model)
    labels = torch.tensor([[5, 6, 7, 1], [8, 9, -100, -100], [4, 4, 4, 1]])
    refs = [alone(model, n, labels=labels) for n in "ab"]
    rows = rows_seen(model)
    outs = alone(model, Parallel("a", "b"), labels=labels)
    assert rows[("encoder", 0)] == [3] and rows[("encoder", 1)] == [6] and rows[("decoder", 0)] == [6]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(outs.loss, outs[0].loss + outs[1].loss)
    gen = dict(input_ids=IDS[:2], attention_mask=MASK[:2], max_new_tokens=4, do_sample=False)
    model.set_active_adapters(Parallel("a", "b"))
    both = model.generate(**gen)
    assert len(both) == 2
    for name, seq in zip("ab", both):
        model.set_active_adapters(name)
        assert torch.equal(seq, model.generate(**gen))


def test_parallel_with_decoder_adapters_runs_the_encoder_once_and_trains():
    model = t5()
    model.add_adapter("a", "pfeiffer", stacks=["decoder"], layers=[1, 2])
    model.add_adapter("b", "ia3", stacks=["decoder"])
    perturb(model)
    labels = torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100], [4, 4, 4, 1]])
    refs = [alone(model, n, labels=labels) for n in "ab"]
    rows = rows_seen(model)
    model.train_adapter(Parallel("a", "b"))
    model.model.eval()  # no dropout: the same function as each adapter alone
    outs = model(input_ids=IDS, attention_mask=MASK, labels=labels)
    assert all(rows[("encoder", i)] == [3] for i in range(3))
    assert rows[("decoder", 0)] == [6] and rows[("decoder", 2)] == [6]  # b (IA3) sits in every decoder layer
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    outs.loss.backward()
    for name in "ab":
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters[name].parameters())
    assert all(p.grad is None for p in model.model.parameters())


def test_parallel_on_bart_with_a_classification_head_per_adapter():
    torch.manual_seed(0)
    cfg = T.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=32)
    model = AdapterModel(T.BartModel(cfg).eval())
    model.add_adapter("a", "houlsby", cross_adapter=True, stacks=["decoder"])
    model.add_adapter("b", "lora", layers=[1])
    model.add_classification_head("a", 3)
    model.add_classification_head("b", 2)
    perturb(model)
    model.eval()
    refs = [alone(model, n).logits for n in "ab"]
    outs = alone(model, Parallel("a", "b"))
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)



def test_parallel_with_heads_and_a_mask_on_wav2vec2_equals_each_adapter_alone():
    """Speech heads read the frame-level mask, under Parallel as alone (the Parallel copy of
    "run the body, then the heads" once gave them the mask over samples: a shape error)."""
    model = AdapterModel(make_base(ARCHS["wav2vec2"]))
    model.add_adapter("a", "pfeiffer")
    model.add_adapter("b", "lora")
    model.add_classification_head("a", 3)
    model.add_classification_head("b", 2)
    perturb(model)
    model.eval()
    torch.manual_seed(1)
    values = torch.randn(2, AUDIO_SAMPLES)
    mask = torch.ones(2, AUDIO_SAMPLES, dtype=torch.long)
    mask[1, 250:] = 0
    refs = []
    for name in "ab":
        model.set_active_adapters(name)
        with torch.no_grad():
            refs.append(model(input_values=values, attention_mask=mask).logits)
    model.set_active_adapters(Parallel("a", "b"))
    with torch.no_grad():
        outs = model(input_values=values, attention_mask=mask)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)
