"""Per-example routing: stacked (batched) and grouped paths, threads, generate, input kinds.

The contract: ``model(batch, adapter_names=names)`` equals running each example alone with its
adapter, whichever path a slot takes, whichever thread calls, for every input kind.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapterkit import AdapterError, AdapterModel
from adapterkit.methods.bottleneck import Bottleneck
from adapterkit.methods.ia3 import IA3
from adapterkit.methods.lora import LoRA
from helpers import ARCHS, make_base, make_batch, perturb, run, total_hooks

SAME_KIND = {
    "lora": ([("lora", {"r": 2}), ("lora", {"r": 4}), ("lora", {"r": 4, "alpha": 2.0})], LoRA),
    "pfeiffer": ([("pfeiffer", {})] * 3, Bottleneck),
    "houlsby": ([("houlsby", {})] * 3, Bottleneck),
    "parallel": ([("parallel", {})] * 3, Bottleneck),
    "ia3": ([("ia3", {})] * 3, IA3),
}


def many(arch: str, configs, seed: int = 0) -> AdapterModel:
    model = AdapterModel(make_base(ARCHS[arch]))
    for i, (preset, options) in enumerate(configs):
        model.add_adapter(f"a{i}", preset, **options)
    perturb(model.adapters, scale=0.2, seed=seed)
    return model.eval()


def alone(model: AdapterModel, name, batch: dict, row: int) -> torch.Tensor:
    model.set_active_adapters(name)
    out = run(model, {k: v[row : row + 1] for k, v in batch.items()})
    model.set_active_adapters(None)
    return out


def spy(monkeypatch, cls) -> list[int]:
    calls: list[int] = []
    original = cls.run_stacked.__func__

    def counted(klass, units, which, io):
        calls.append(len(units))
        return original(klass, units, which, io)

    monkeypatch.setattr(cls, "run_stacked", classmethod(counted))
    return calls


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("kind", list(SAME_KIND))
def test_stacked_routing_equals_each_example_alone(kind, arch, monkeypatch):
    configs, cls = SAME_KIND[kind]
    model = many(arch, configs)
    batch = make_batch(batch_size=5)
    names = ["a2", None, "a0", "a1", "a0"]
    calls = spy(monkeypatch, cls)
    routed = run(model, batch, adapter_names=names)
    assert calls, "the stacked path ran"
    for i, name in enumerate(names):
        assert (routed[i : i + 1] - alone(model, name, batch, i)).abs().max() <= 1e-5
    assert total_hooks(model) == 0, "no active setup: the routed call's hooks are gone again"


def test_mixed_methods_take_the_grouped_path_and_still_equal_each_alone(monkeypatch):
    model = many("bert", [("pfeiffer", {}), ("lora", {"r": 2}), ("houlsby", {"reduction_factor": 8})])
    batch = make_batch(batch_size=4)
    names = ["a1", "a2", "a0", None]
    routed = run(model, batch, adapter_names=names)
    for i, name in enumerate(names):
        assert (routed[i : i + 1] - alone(model, name, batch, i)).abs().max() <= 1e-5


def test_routing_under_training_keeps_gradients_per_example():
    model = many("bert", SAME_KIND["lora"][0])
    model.add_classification_head("h", num_labels=2)
    model.train_adapter(["a0", "a1"])
    model.heads["h"].requires_grad_(True)
    batch = make_batch(batch_size=4)
    out = model(**batch, labels=torch.tensor([0, 1, 1, 0]), adapter_names=["a0", "a0", None, "a0"], head="h")
    out.loss.backward()
    assert all(p.grad is not None for p in model.adapters["a0"].parameters())
    assert all(p.grad is None for p in model.adapters["a1"].parameters())  # routed to no example
    assert all(p.grad is None for p in model.model.parameters())


def test_eight_threads_with_eight_adapters_each_get_what_they_get_alone():
    model = many("bert", [("lora", {"r": 2}) if i % 2 else ("pfeiffer", {}) for i in range(8)])
    batch = make_batch(batch_size=8, seed=5)
    orders = [[f"a{(i + k) % 8}" for i in range(8)] for k in range(8)]
    expected = {}
    for row in range(8):
        for k in range(8):
            name = orders[k][row]
            if name not in expected.get(row, {}):
                expected.setdefault(row, {})[name] = alone(model, name, batch, row)
    start = threading.Barrier(8)

    def work(k: int) -> list[bool]:
        start.wait()
        results = []
        for _ in range(3):
            out = run(model, batch, adapter_names=orders[k])
            results.append(all((out[r : r + 1] - expected[r][orders[k][r]]).abs().max() <= 1e-5 for r in range(8)))
        return results

    with ThreadPoolExecutor(8) as pool:
        assert all(all(r) for r in pool.map(work, range(8)))
    assert total_hooks(model) == 0


def test_routing_works_from_inputs_embeds():
    model = many("bert", SAME_KIND["pfeiffer"][0])
    batch = make_batch(batch_size=3)
    embeds = model.model.get_input_embeddings()(batch["input_ids"])
    names = ["a1", "a0", None]
    with torch.no_grad():
        routed = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], adapter_names=names)[0]
        for i, name in enumerate(names):
            model.set_active_adapters(name)
            one = model(inputs_embeds=embeds[i : i + 1], attention_mask=batch["attention_mask"][i : i + 1])[0]
            assert (routed[i : i + 1] - one).abs().max() <= 1e-5


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_routes_each_prompt_and_its_beams(beams):
    model = many("gpt2", [("lora", {"r": 2}), ("pfeiffer", {})], seed=3)
    perturb(model.adapters, scale=2.0, seed=4)  # large enough to change the greedy tokens
    ids = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(6))
    names = ["a1", None, "a0"]
    options = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0)
    routed = model.generate(input_ids=ids, adapter_names=names, **options)
    for i, name in enumerate(names):
        model.set_active_adapters(name)
        assert torch.equal(routed[i], model.generate(input_ids=ids[i : i + 1], **options)[0])
    model.set_active_adapters(None)
    assert not torch.equal(routed[0], routed[1]) or not torch.equal(routed[2], routed[1])


@pytest.mark.parametrize("names,match", [(["a0"], "2 examples"), (["a0", "zz"], "No adapter named"),
                                         ("a0", "one adapter name")])
def test_bad_adapter_names_are_refused(names, match):
    model = many("bert", [("lora", {"r": 2})])
    with pytest.raises(AdapterError, match=match):
        run(model, make_batch(batch_size=2), adapter_names=names)
    assert total_hooks(model) == 0


def _vit():
    import transformers as T

    torch.manual_seed(0)
    return T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                  image_size=16, patch_size=8, num_channels=3)).eval()


def _wav2vec2():
    import transformers as T

    torch.manual_seed(0)
    config = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                              num_conv_pos_embedding_groups=2, vocab_size=10)
    return T.Wav2Vec2Model(config).eval()


@pytest.mark.parametrize("factory,key,shape", [(_vit, "pixel_values", (3, 3, 16, 16)),
                                               (_wav2vec2, "input_values", (3, 400))])
def test_routing_works_from_pixel_values_and_input_values(factory, key, shape):
    """Vision and speech inputs route like token ids (modules chosen by name: no layout needed)."""
    model = AdapterModel(factory())
    for name in ("a", "b"):
        # ViT names them query / value under transformers 4.57, q_proj / v_proj under 5.x
        model.add_adapter(name, "lora", r=2, target_modules=r".*\.(q_proj|v_proj|query|value)")
    perturb(model.adapters, scale=0.5)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(8))
    names = ["b", None, "a"]
    with torch.no_grad():
        routed = model(**{key: x}, adapter_names=names)[0]
        for i, name in enumerate(names):
            model.set_active_adapters(name)
            one = model(**{key: x[i : i + 1]})[0]
            assert (routed[i : i + 1] - one).abs().max() <= 1e-5
        model.set_active_adapters(None)
        assert not torch.allclose(routed[0], model(**{key: x[:1]})[0][0])


@pytest.mark.parametrize("kind", ["pfeiffer", "houlsby"])
def test_stacked_bottleneck_weights_are_kept_at_inference_and_follow_weight_changes(kind):
    """``Bottleneck._stacked``: the same stacks across calls while the weights stay; an in-place
    update (an optimizer step, a load) or new storage rebuilds them; training re-stacks in the
    graph, so gradients reach every routed adapter."""
    model = many("bert", SAME_KIND[kind][0])
    batch = make_batch(batch_size=4)
    names = ["a0", "a1", "a2", "a1"]
    first = model.adapters["a0"][next(iter(model.adapters["a0"].keys()))]
    run(model, batch, adapter_names=names)
    kept = {k: v[2] for k, v in first._stacks.items()}
    assert kept, "routed inference kept its stacks"
    run(model, batch, adapter_names=names)
    assert all(first._stacks[k][2] is v for k, v in kept.items()), "the second call reused them"
    with torch.no_grad():
        for p in model.adapters["a1"].parameters():
            p.mul_(1.5)  # in place, as an optimizer step
    routed = run(model, batch, adapter_names=names)
    assert all(first._stacks[k][2] is not v for k, v in kept.items())
    for i, name in enumerate(names):
        assert (routed[i : i + 1] - alone(model, name, batch, i)).abs().max() <= 1e-5
    model.adapters["a2"].load_state_dict({k: v * 0.5 for k, v in model.adapters["a2"].state_dict().items()})
    routed = run(model, batch, adapter_names=names)
    for i, name in enumerate(names):
        assert (routed[i : i + 1] - alone(model, name, batch, i)).abs().max() <= 1e-5
    model.add_classification_head("h", num_labels=2)
    model.train_adapter(["a0", "a1", "a2"])
    model.model.eval()
    out = model(**batch, labels=torch.tensor([0, 1, 1, 0]), adapter_names=names, head="h")
    out.loss.backward()
    for name in ("a0", "a1", "a2"):  # (a unit's narrow ReLU bottleneck may be dead on its one example)
        assert all(p.grad is not None for p in model.adapters[name].parameters())
        assert sum(p.grad.abs().sum() for p in model.adapters[name].parameters()) > 0
