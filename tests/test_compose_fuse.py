"""``Fuse`` (AdapterFusion, ``fusion.py``): the fusion layer's formula, training only the fusion
(and head), the value regulariser, scores, save / load, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from adapterkit import AdapterError, AdapterModel, Average, Fuse, Parallel, Stack
from adapterkit.composition.fuse import FusionConfig, FusionUnit

IDS = torch.tensor([[1, 5, 7, 9, 2, 4], [3, 4, 8, 2, 6, 1]])


def model_ab(layers: int = 2) -> AdapterModel:
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
                       vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = AdapterModel(T.BertModel(cfg).eval())
    model.add_adapter("a", "pfeiffer")
    model.add_adapter("b", "pfeiffer")
    model.add_adapter("l", "lora")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def run(model: AdapterModel) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


@pytest.mark.parametrize("residual_before", [False, True])
def test_fusion_unit_formula(residual_before):
    torch.manual_seed(1)
    unit = FusionUnit(8, FusionConfig(temperature=2.0, residual_before=residual_before))
    with torch.no_grad():
        unit.value.weight.add_(torch.randn(8, 8) * 0.1)
    q, base, o1, o2, o3 = (torch.randn(2, 3, 8) for _ in range(5))
    out = unit(q, base, [o1, o2, o3])
    qq = unit.query(q)
    vs = (o1, o2, o3) if residual_before else (o1 - base, o2 - base, o3 - base)
    logits = torch.stack([(unit.key(v) * qq).sum(-1) for v in vs], -1) / 2.0
    s = F.softmax(logits, -1)
    expected = sum(s[..., i:i + 1] * unit.value(v) for i, v in enumerate(vs))
    torch.testing.assert_close(out, expected if residual_before else base + expected)
    torch.testing.assert_close(unit.scores, s)


def test_inference_folds_query_and_key_once_and_follows_their_changes():
    """Without gradients the fusion projects the query once, through ``W_k^T W_q`` folded per
    change of those weights: the same function as the two projections of training."""
    torch.manual_seed(2)
    unit = FusionUnit(8, FusionConfig(temperature=0.5))
    with torch.no_grad():
        for lin in (unit.query, unit.key):
            lin.weight.normal_()
            lin.bias.normal_()
    q, base, o1, o2 = (torch.randn(2, 3, 8) for _ in range(4))
    trained = unit(q, base, [o1, o2])  # weights that train: two projections
    assert unit._folded is None
    with torch.no_grad():
        folded = unit(q, base, [o1, o2])
    assert unit._folded is not None
    torch.testing.assert_close(folded, trained)
    with torch.no_grad():
        unit.query.weight.mul_(-1.0)  # an optimizer step or a load: the fold must not go stale
        changed = unit(q, base, [o1, o2])
    expected = unit(q, base, [o1, o2])
    torch.testing.assert_close(changed, expected)
    assert not torch.allclose(changed, folded, atol=1e-3)
    with torch.inference_mode():
        torch.testing.assert_close(unit(q, base, [o1, o2]), expected)
    unit.requires_grad_(False)  # frozen fusion under a trained adapter: the fold, and gradients reach q
    q.requires_grad_(True)
    out = unit(q, base, [o1, o2])
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected.detach())
    assert q.grad is not None and q.grad.abs().sum() > 0


@pytest.mark.parametrize("pair", [("a", "b"), ("l", "i")])
def test_uniform_attention_with_identity_values_is_the_average(pair):
    """Every method can be fused: with the query at zero the scores are uniform and, ``W_v``
    being the identity, the fusion is ``Average`` (a child absent at a slot counts as the
    passthrough in both)."""
    model = model_ab()
    model.add_adapter("i", "ia3")
    with torch.no_grad():
        for p in model.adapters["i"].parameters():
            p.add_(0.2)
    model.add_adapter_fusion(Fuse(*pair))
    key = ",".join(pair)
    with torch.no_grad():
        for unit in model.fusions[key].values():
            unit.query.weight.zero_()
            unit.query.bias.zero_()
    model.set_active_adapters(Average(*pair))
    ref = run(model)
    model.set_active_adapters(Fuse(*pair))
    torch.testing.assert_close(run(model), ref, rtol=1e-5, atol=1e-6)
    scores = model.fusion_scores(list(pair))
    assert set(scores) == {s.place_id for n in pair for s in model.records[n].sites}
    for s in scores.values():
        assert s.shape == (2, 6, 2)
        torch.testing.assert_close(s, torch.full_like(s, 0.5))


def test_train_adapter_fusion_trains_fusion_and_head_only_and_regularises_values():
    model = model_ab()
    model.add_adapter_fusion(Fuse("a", "b"))
    model.add_classification_head("task", 2)
    model.add_classification_head("a", 2)
    model.train_adapter_fusion(Fuse("a", "b"), head="task")
    assert model.active_head == "task"
    with torch.no_grad():
        for unit in model.fusions["a,b"].values():
            unit.value.weight.add_(0.1)
    out = model(input_ids=IDS, labels=torch.tensor([0, 1]))
    expected = sum(0.01 * (u.value.weight - torch.eye(32)).pow(2).sum() for u in model.fusions["a,b"].values())
    torch.testing.assert_close(out.aux_loss, expected)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith(("fusions.a,b.", "heads.task.")) for n in grads)
    assert any(n.startswith("heads.task.") for n in grads)
    model.zero_grad(set_to_none=True)
    model.train_adapter_fusion(Fuse("a", "b"), unfreeze_adapters=True, head="task")
    model(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None for p in model.adapters["a"].parameters())
    assert all(p.grad is None for p in model.adapters["l"].parameters())


def test_fuse_in_a_stack_and_the_fusion_round_trip(tmp_path):
    model = model_ab()
    model.add_adapter_fusion(Fuse("a", "b"), {"temperature": 0.5})
    with torch.no_grad():
        for p in model.fusions.parameters():
            p.add_(0.05)
    model.set_active_adapters(Stack("l", Fuse("a", "b")))
    ref = run(model)
    model.save_adapter_fusion(tmp_path / "fusion", Fuse("a", "b"))
    for name in "abl":
        model.save_adapter(tmp_path / name, name)
    fresh = model_ab()
    for name in "abl":
        fresh.delete_adapter(name)
        fresh.load_adapter(tmp_path / name)
    fuse = fresh.load_adapter_fusion(tmp_path / "fusion")
    assert fuse == Fuse("a", "b") and fresh.fusions["a,b"]["layers-0-ffn_out"].config.temperature == 0.5
    fresh.set_active_adapters(Stack("l", fuse))
    torch.testing.assert_close(run(fresh), ref, rtol=0, atol=0)
    assert any(k.startswith("fusions.") for k in fresh.state_dict())


def test_bad_fusion_input_changes_nothing(tmp_path):
    model = model_ab()
    model.set_active_adapters("a")
    with pytest.raises(AdapterError, match="add_adapter_fusion"):
        model.set_active_adapters(Fuse("a", "b"))
    with pytest.raises(AdapterError, match="No adapter named"):
        model.add_adapter_fusion(Fuse("a", "nope"))
    with pytest.raises(AdapterError, match="two or more"):
        model.add_adapter_fusion(Fuse("a"))
    with pytest.raises(AdapterError, match="Fuse cannot be nested in Parallel"):
        Parallel(Fuse("a", "b"), "l")
    with pytest.raises(AdapterError, match="temperature"):
        model.add_adapter_fusion(Fuse("a", "b"), {"temperature": 0})
    with pytest.raises(AdapterError, match="Unknown fusion option"):
        model.add_adapter_fusion(Fuse("a", "b"), {"temprature": 1})
    assert len(model.fusions) == 0 and model.active_adapters == Stack("a")
    model.add_adapter_fusion(Fuse("a", "b"))
    with pytest.raises(AdapterError, match="already has fusion layers"):
        model.add_adapter_fusion(Fuse("a", "b"))
    with pytest.raises(Exception, match="not a fusion checkpoint"):
        model.save_adapter(tmp_path / "a", "a")
        model.load_adapter_fusion(tmp_path / "a")
    model.delete_adapter("b")  # its fusion goes with it
    assert "a,b" not in model.fusions


def _train(model: AdapterModel, head: str, labels_of, steps: int = 15, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        ids = torch.randint(1, 100, (8, 6), generator=g)
        loss = model(input_ids=ids, labels=labels_of(ids)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_multi_task_without_forgetting():
    """A trained, then B on another task, then Fuse(A, B) on a third: A's predictions stay bit
    for bit what they were (the base and A are frozen throughout)."""
    model = model_ab()
    task_a = lambda ids: (ids == 5).any(1).long()  # noqa: E731
    task_b = lambda ids: (ids < 50).sum(1).gt(3).long()  # noqa: E731
    for name in ("A", "B"):
        model.add_adapter(name, "pfeiffer")
        model.add_classification_head(name, 2)
    model.add_classification_head("C", 2)
    model.train_adapter("A")
    _train(model, "A", task_a)

    def predictions() -> torch.Tensor:
        model.eval()
        model.set_active_adapters("A")
        with torch.no_grad():
            return model(input_ids=torch.arange(1, 61).view(10, 6)).logits

    before = predictions()
    model.train_adapter("B")
    _train(model, "B", task_b, seed=1)
    assert torch.equal(predictions(), before)
    model.add_adapter_fusion(Fuse("A", "B"))
    fusion_before = {k: v.clone() for k, v in model.fusions.state_dict().items()}
    adapters_before = {k: v.clone() for k, v in model.adapters.state_dict().items()}
    model.train_adapter_fusion(Fuse("A", "B"), head="C")
    _train(model, "C", lambda ids: task_a(ids) | task_b(ids), steps=10, seed=2)
    assert torch.equal(predictions(), before)
    assert all(torch.equal(v, adapters_before[k]) for k, v in model.adapters.state_dict().items())
    assert any(not torch.equal(v, fusion_before[k]) for k, v in model.fusions.state_dict().items())


def test_routing_still_works_with_fusion_layers_present():
    model = model_ab()
    model.add_adapter_fusion(Fuse("a", "b"), set_active=True)
    refs = []
    for name in "ab":
        model.set_active_adapters(name)
        refs.append(run(model)[:1])
    model.set_active_adapters(Fuse("a", "b"))
    with torch.no_grad():
        routed = model(input_ids=IDS[:1].repeat(2, 1), adapter_names=["a", "b"]).last_hidden_state
    torch.testing.assert_close(routed[0:1], refs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[1:2], refs[1], rtol=1e-5, atol=1e-5)


def test_fuse_over_adapters_meeting_a_site_differently_is_refused():
    model = model_ab()
    model.add_adapter("p", "pfeiffer", place="pre")  # same sites as "a", but rewriting their input
    with pytest.raises(AdapterError, match="fuse adapters placed alike"):
        model.add_adapter_fusion(Fuse("a", "p"))
    assert len(model.fusions) == 0
