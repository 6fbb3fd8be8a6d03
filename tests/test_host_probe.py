"""Weight-level adapters are never silently bypassed (issue 9, item 4).

WavLM's attention hands ``q_proj.weight`` (and ``out_proj.weight``) straight to
``F.multi_head_attention_forward``, so hooks on those Linear modules never fire: a LoRA there
would train nothing and change nothing. ``Layout.check_hosts_run`` runs one probe forward per
model and refuses such hosts, naming them and the fix; the probe leaves the model as it was.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

from adapterkit import AdapterError, AdapterModel
from helpers import ARCHS, make_base, total_hooks


def tiny_wavlm() -> nn.Module:
    torch.manual_seed(0)
    config = T.WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=2, num_buckets=32)
    return T.WavLMModel(config).eval()


class DirectWeight(nn.Module):
    """A model that reads ``proj.weight`` itself instead of calling ``proj``."""

    main_input_name = "input_ids"

    def __init__(self, with_config: bool = True):
        super().__init__()
        if with_config:
            self.config = T.PretrainedConfig(vocab_size=10)
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.other = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.embed(input_ids)
        return F.linear(h, self.proj.weight, self.proj.bias) + self.other(h)


def test_wavlm_still_bypasses_q_proj():
    """The premise: in the installed transformers a hook on q_proj does not fire."""
    model = tiny_wavlm()
    fired = []
    model.encoder.layers[0].attention.q_proj.register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad():
        model(torch.randn(1, 4000))
    assert fired == []


@pytest.mark.parametrize("method,target", [("lora", ["q_proj"]), ("ia3", ["out_proj"]), ("pfeiffer", ["k_proj"])])
def test_wavlm_adapter_on_a_bypassed_linear_is_refused(method, target):
    model = AdapterModel(tiny_wavlm())
    with pytest.raises(AdapterError) as err:
        model.add_adapter("a", method, target_modules=target)
    message = str(err.value)
    assert f"encoder.layers.0.attention.{target[0]}, encoder.layers.1.attention.{target[0]}" in message
    assert "never calls 2 module(s)" in message and "train nothing and change nothing" in message
    assert "feed_forward.intermediate_dense" in message  # a Linear nearby that does run
    assert not model.adapters and total_hooks(model) == 0


def test_wavlm_adapter_on_linears_that_run_is_accepted_and_acts():
    model = AdapterModel(tiny_wavlm())
    model.add_adapter("a", "lora", target_modules=["intermediate_dense", "output_dense"], set_active=True)
    assert model.layout.probe.skipped is None
    x = torch.randn(1, 4000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model.model(x).last_hidden_state
        for p in model.adapters["a"].parameters():
            p.add_(0.5)
        assert (model(input_values=x).last_hidden_state - base).abs().max() > 1e-4


def test_direct_weight_read_is_refused_by_check_hosts_run():
    net = DirectWeight()
    model = AdapterModel(net)
    sites = model.layout.generic_sites(["proj", "other"], place="weight")
    with pytest.raises(AdapterError, match=r"never calls 1 module\(s\) this adapter would sit on: proj\."):
        model.layout.check_hosts_run(sites)
    model.layout.check_hosts_run([s for s in sites if s.place_id == "other"])  # runs: accepted
    with pytest.raises(AdapterError, match="proj"):
        model.add_adapter("a", "lora", r=2, target_modules=["proj"])
    model.add_adapter("b", "lora", r=2, target_modules=["other"])
    assert net.calls == 1, "one probe forward per model, kept for later checks"


def test_probe_leaves_the_model_as_it_was():
    net = make_base(ARCHS["bert"])
    net.train()
    net.encoder.layer[0].eval()  # mixed modes, as a frozen base with eval BatchNorm has
    modes = {n: m.training for n, m in net.named_modules()}
    model = AdapterModel(net)
    rng = torch.get_rng_state()
    model.layout.check_hosts_run(model.layout.sublayer_sites(["attn_out", "ffn_out"]))
    assert model.layout.probe.skipped is None and len(model.layout.probe.modules_that_run()) > 10
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks for m in net.modules())


def test_plain_module_without_config_is_not_probed():
    """Its inputs are unknown: the check is skipped (documented), nothing is refused."""
    net = DirectWeight(with_config=False)
    model = AdapterModel(net)
    model.add_adapter("a", "lora", r=2, target_modules=["proj"])
    assert net.calls == 0 and "no transformers config" in model.layout.probe.skipped


def test_failing_probe_forward_warns_and_does_not_block():
    class Picky(DirectWeight):
        def forward(self, input_ids, needed):  # the probe cannot supply `needed`
            return super().forward(input_ids)

    net = Picky()
    net.train()
    model = AdapterModel(net)
    with pytest.warns(RuntimeWarning, match="could not check that adapter hosts run"):
        model.add_adapter("a", "lora", r=2, target_modules=["proj"])
    assert "probe forward failed (TypeError" in model.layout.probe.skipped
    assert net.training and all(m.training for m in net.modules())
    assert all(not m._forward_hooks for m in net.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.add_adapter("b", "lora", r=2, target_modules=["other"])  # warned once per model


@pytest.mark.parametrize("arch", ["t5", "bart", "gpt2", "llama"])
def test_every_built_in_site_runs_in_the_probe(arch):
    model = AdapterModel(make_base(ARCHS[arch]))
    model.add_adapter("a", "houlsby", cross_adapter=ARCHS[arch].encoder_decoder)
    model.add_adapter("b", "lora", roles="all-linear", r=2)
    assert model.layout.probe.skipped is None


def test_vision_model_is_probed_with_pixel_values():
    torch.manual_seed(0)
    vit = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                 image_size=16, patch_size=8))
    model = AdapterModel(vit)
    model.add_adapter("a", "lora", r=2, target_modules=["q_proj"])
    assert model.layout.probe.skipped is None
    q_proj = next(m for n, m in vit.named_modules() if n.endswith("0.attention.q_proj"))
    assert q_proj in model.layout.probe.modules_that_run()
