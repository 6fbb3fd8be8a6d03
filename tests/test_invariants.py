"""The core's invariants, checked for every (architecture x method configuration) in ``CASES``.

* a fresh adapter leaves the outputs unchanged; a trained (perturbed) one changes them;
* adapters off (``disable_adapters()`` or no active setup) reproduce the base model bit for bit;
* training moves adapter and head weights only, and only they receive gradients;
* the trainable-parameter count equals each method's formula;
* merged outputs equal unmerged ones and unmerging restores the weights bit for bit;
* forward and backward run with and without a head on every layout;
* the handle's ``state_dict`` holds adapters and heads only and round-trips.
"""

from __future__ import annotations

import pytest
import torch

from adapterkit import AdapterError, Stack
from helpers import (
    CASE_IDS,
    CASES,
    MERGEABLE,
    assert_state_equal,
    clone_state,
    expected_adapter_params,
    expected_head_params,
    expected_saved_params,
    make_base,
    make_model,
    perturb,
    run,
    total_hooks,
)

cases = pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
mergeable = pytest.mark.parametrize("case", MERGEABLE, ids=[c.id for c in MERGEABLE])


def base_output(case, batch):
    return run(make_base(case.arch), batch)


@pytest.mark.parametrize("case", [c for c in CASES if c.identity_at_init], ids=lambda c: c.id)
def test_fresh_adapter_is_identity(case, batch):
    model = make_model(case)
    assert (run(model, batch) - base_output(case, batch)).abs().max() <= 1e-6


@cases
def test_trained_adapter_changes_output(case, batch):
    """Guards the other tests against vacuity: the hooks are live and the adapter matters."""
    model = make_model(case)
    perturb(model.adapters["a"])
    assert (run(model, batch) - base_output(case, batch)).abs().max() > 1e-4


@cases
def test_disable_adapters_is_base_bitwise(case, batch):
    model = make_model(case)
    perturb(model.adapters["a"])
    with model.disable_adapters():
        assert torch.equal(run(model, batch), base_output(case, batch))
        assert total_hooks(model) == 0
    assert not torch.equal(run(model, batch), base_output(case, batch))  # active again afterwards


@cases
def test_no_active_setup_is_base_bitwise(case, batch):
    model = make_model(case)
    perturb(model.adapters["a"])
    model.set_active_adapters(None)
    assert torch.equal(run(model, batch), base_output(case, batch))
    assert total_hooks(model) == 0


@cases
def test_training_changes_only_adapter_and_head(case, batch):
    model = make_model(case, head=True)
    model.add_adapter("other", case.preset, **case.adapter_options())  # not trained
    base_before, other_before = clone_state(model.model), clone_state(model.adapters["other"])
    trained_before = clone_state(model.adapters["a"])
    model.train_adapter("a")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    labels = torch.tensor([0, 1, 2, 1])
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {n for n, _ in model.named_parameters() if n.startswith(("adapters.a.", "heads.a."))}
        optimizer.step()
    assert_state_equal(model.model, base_before)
    assert_state_equal(model.adapters["other"], other_before)
    after = model.adapters["a"].state_dict()
    assert any(not torch.equal(after[k], v) for k, v in trained_before.items()), "training did not move the adapter"


@cases
def test_trainable_parameters_match_formula(case):
    model = make_model(case, head=True)
    model.train_adapter("a")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected_adapter_params(case) + expected_head_params(num_labels=3)
    summary = {row["name"]: row for row in model.adapter_summary(as_dict=True)}
    assert summary["a"]["parameters"] == expected_adapter_params(case)
    assert summary["a"]["head_parameters"] == expected_head_params(num_labels=3)


@cases
def test_forward_backward_with_head(case, batch):
    model = make_model(case, head=True)
    model.train_adapter("a")
    out = model(**batch, labels=torch.tensor([0, 1, 2, 0]))
    assert out.logits.shape == (4, 3)
    out.loss.backward()
    assert all(p.grad is not None for p in model.adapters["a"].parameters())
    assert all(p.grad is not None for p in model.heads["a"].parameters())
    assert all(p.grad is None for p in model.model.parameters())


@cases
def test_forward_backward_without_head(case, batch):
    model = make_model(case)
    model.train_adapter("a")
    if case.arch.causal_lm:  # the model keeps its LM head; the loss comes from the labels
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(**batch, labels=labels)
        assert out.logits.shape[-1] == model.config.vocab_size
        loss = out.loss
    else:
        loss = model(**batch).last_hidden_state.pow(2).mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.adapters["a"].parameters())
    assert all(p.grad is None for p in model.model.parameters())


@mergeable
def test_merge_keeps_outputs_and_unmerge_restores_weights(case, batch):
    model = make_model(case)
    perturb(model.adapters["a"], scale=0.1)  # changes the outputs by ~0.5; float32 rounding stays < 1e-5
    weights = clone_state(model.model)
    unmerged = run(model, batch)
    model.merge_adapter("a")
    assert total_hooks(model) == 0, "a merged adapter runs through the weights, not hooks"
    assert (run(model, batch) - unmerged).abs().max() <= 1e-5
    model.unmerge_adapter("a")
    assert_state_equal(model.model, weights)
    assert torch.equal(run(model, batch), unmerged)


@mergeable
def test_merge_is_exact_in_float64(case, batch):
    """Merging is the same function, not an approximation: only rounding separates the two."""
    model = make_model(case).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}  # pixels / audio
    perturb(model.adapters["a"], scale=0.5)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}  # pixels, audio
    unmerged = run(model, batch)
    model.merge_adapter("a")
    assert (run(model, batch) - unmerged).abs().max() <= 1e-10


@mergeable
def test_merge_changes_weights(case):
    model = make_model(case)
    perturb(model.adapters["a"])
    weights = clone_state(model.model)
    model.merge_adapter("a")
    changed = [k for k, v in clone_state(model.model).items() if not torch.equal(v, weights[k])]
    assert len(changed) >= len(model.records["a"].sites)


@mergeable
def test_disabled_after_merge_is_base_bitwise(case, batch):
    model = make_model(case)
    perturb(model.adapters["a"])
    model.merge_adapter("a")
    with model.disable_adapters():
        assert torch.equal(run(model, batch), base_output(case, batch))
    model.unmerge_adapter("a")
    model.set_active_adapters(None)
    assert torch.equal(run(model, batch), base_output(case, batch))


@pytest.mark.parametrize("case", [c for c in CASES if not c.mergeable][:6], ids=lambda c: c.id)
def test_merging_a_non_mergeable_method_raises(case, batch):
    model = make_model(case)
    with pytest.raises(AdapterError, match="cannot be merged"):
        model.merge_adapter("a")


@cases
def test_state_dict_holds_adapters_and_heads_only(case):
    model = make_model(case, head=True)
    keys = list(model.state_dict())
    assert keys and all(k.startswith(("adapters.a.", "heads.a.")) for k in keys)
    n = sum(v.numel() for v in model.state_dict().values())
    assert n == expected_saved_params(case) + expected_head_params(num_labels=3)


@cases
def test_state_dict_round_trip(case, batch):
    source = make_model(case, head=True)
    perturb(source.adapters)
    perturb(source.heads)
    target = make_model(case, head=True)  # same base weights, fresh adapter and head
    assert not torch.equal(run(target, batch), run(source, batch))
    target.load_state_dict(source.state_dict())
    assert torch.equal(run(target, batch), run(source, batch))


@pytest.mark.parametrize("case", [c for c in MERGEABLE if c.stack_merges], ids=lambda c: c.id)
def test_merging_two_adapters_and_unmerging_in_any_order(case, batch):
    model = make_model(case)
    model.add_adapter("b", case.preset, **case.adapter_options())
    perturb(model.adapters, scale=0.05)
    weights = clone_state(model.model)
    model.set_active_adapters(Stack("a", "b"))
    both = run(model, batch)
    model.set_active_adapters("b")
    only_b = run(model, batch)
    model.merge_adapter("a")
    model.merge_adapter("b")
    assert (run(model, batch) - both).abs().max() <= 1e-5
    model.unmerge_adapter("a")
    assert (run(model, batch) - only_b).abs().max() <= 1e-5
    model.delete_adapter("b")  # unmerges first
    assert_state_equal(model.model, weights)
    assert total_hooks(model) == 0


@cases
def test_deleting_every_adapter_removes_every_hook(case, batch):
    model = make_model(case, head=True)
    if case.arch.weight_places:
        model.add_adapter("b", "lora", r=2)
    else:  # WavLM: no weight places
        model.add_adapter("b", "pfeiffer")
    model.add_adapter("a", case.preset, overwrite=True, **case.adapter_options())  # replaces, no duplicates
    model.set_active_adapters(Stack("a", "b"))
    perturb(model.adapters)
    assert total_hooks(model) > 0
    model.delete_adapter("a")
    model.delete_adapter("b")
    assert total_hooks(model) == 0 and list(model.adapters) == [] and list(model.heads) == []
    assert torch.equal(run(model, batch), base_output(case, batch))


def test_overwrite_keeps_one_hook_per_slot():
    case = CASES[0]
    model = make_model(case)
    hooks = total_hooks(model)
    for _ in range(3):
        model.add_adapter("a", case.preset, overwrite=True, set_active=True)
    assert total_hooks(model) == hooks


HEADS = {
    # kind -> (add it, expected parameters from the head's formula)
    "classification": (lambda m: m.add_classification_head("a", num_labels=3), expected_head_params(3, layers=2)),
    "classification-1-layer": (lambda m: m.add_classification_head("a", num_labels=5, layers=1),
                               expected_head_params(5, layers=1)),
    "regression": (lambda m: m.add_regression_head("a"), expected_head_params(1, layers=2)),
    "tagging": (lambda m: m.add_tagging_head("a", num_labels=4), expected_head_params(4, layers=1)),
}


@pytest.mark.parametrize("kind", HEADS)
def test_head_parameters_match_formula(kind):
    model = make_model(CASES[0])
    add, expected = HEADS[kind]
    add(model)
    assert sum(p.numel() for p in model.heads["a"].parameters()) == expected


@pytest.mark.parametrize("case", [c for c in CASES if c.method == "pfeiffer" and c.arch.inputs != "image"],
                         ids=lambda c: c.id)
def test_head_output_ignores_right_padding(case, batch):
    """Mean pooling (encoders) and last-token pooling (decoders) read real tokens only."""
    model = make_model(case, head=True)
    perturb(model.adapters)
    padded = run(model, batch)
    length = int(batch["attention_mask"][1].sum())
    alone = run(model, {k: v[1:2, :length] for k, v in batch.items()})
    assert (padded[1] - alone[0]).abs().max() <= 1e-5


def test_tagging_head_labels_every_token_and_ignores_minus_100(batch):
    model = make_model(CASES[0])
    model.add_tagging_head("a", num_labels=4)
    labels = torch.randint(0, 4, batch["input_ids"].shape).masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (4, 7, 4)
    expected = torch.nn.functional.cross_entropy(out.logits[labels != -100], labels[labels != -100])
    assert torch.allclose(out.loss, expected)
