"""Same weights, same outputs: adapterkit against AdapterHub ``adapters`` 1.3 (issue 2).

Run in the bench environment (``bash bench/make_env.sh``; it has ``adapters`` 1.3 and the
``transformers`` 4.57.6 it pins):

    .venv-bench/bin/python bench/parity_adapterhub.py           # parity table + invariants
    .venv-bench/bin/python bench/parity_adapterhub.py --quick   # tiny models only

For every model (tiny BERT, DistilBERT, GPT-2, Llama, and all-MiniLM-L6-v2) and every preset
(Pfeiffer = ``SeqBnConfig``, Houlsby = ``DoubleSeqBnConfig``, Parallel = ``ParBnConfig``, LoRA
q/v = ``LoRAConfig``, IA3 = ``IA3Config``, plus variants of the bottleneck options), the adapter
is added in both libraries, AdapterHub's weights are randomised (non-zero up-projections and
LoRA ``B``) and copied into adapterkit's modules by ``ah_to_ak``, and both models run the same
batch in eval mode: the largest absolute difference of the last hidden states must be
<= 1e-5. A second section checks adapterkit's own invariants under this ``transformers``: a
fresh adapter is identity, and ``disable_adapters()`` gives the base model bit for bit.
Exits non-zero when anything fails.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import transformers
from torch import nn

import adapters as ah

from adapterkit import AdapterModel
from adapterkit.interop.adapterhub import from_adapterhub
from adapterkit.packaged import resolve_model

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore")
logging.getLogger("adapters").setLevel(logging.ERROR)  # "adapters available but none activated"
TOLERANCE = 1e-5


# -- models ---------------------------------------------------------------------------------------------
def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100)
        return transformers.BertModel(cfg)
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100)
        return transformers.DistilBertModel(cfg)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
        return transformers.GPT2Model(cfg)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
        return transformers.LlamaModel(cfg)
    if kind == "minilm":
        return transformers.AutoModel.from_pretrained(resolve_model("minilm")[0], local_files_only=True)
    raise ValueError(kind)


def batch_for(kind: str, model: nn.Module) -> dict:
    gen = torch.Generator().manual_seed(1)
    shape = (4, 32) if kind == "minilm" else (3, 10)
    ids = torch.randint(5, min(model.config.vocab_size, 5000), shape, generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask}


# -- the presets in both vocabularies ------------------------------------------------------------
# (name, AdapterHub config, adapterkit preset, adapterkit options)
CASES: list[tuple[str, Callable[[], object], str, dict]] = [
    ("pfeiffer", lambda: ah.SeqBnConfig(), "pfeiffer", {}),
    ("houlsby", lambda: ah.DoubleSeqBnConfig(), "houlsby", {}),
    ("parallel", lambda: ah.ParBnConfig(), "parallel", {}),
    ("lora q/v", lambda: ah.LoRAConfig(), "lora", {}),
    ("ia3", lambda: ah.IA3Config(), "ia3", {}),
    # the bottleneck options one at a time
    ("pfeiffer ln_before", lambda: ah.SeqBnConfig(ln_before=True), "pfeiffer", {"norm_position": "pre"}),
    ("pfeiffer ln_after", lambda: ah.SeqBnConfig(ln_after=True), "pfeiffer", {"norm_position": "post"}),
    ("pfeiffer ln_after, adapter_residual_before_ln",
     lambda: ah.SeqBnConfig(ln_after=True, adapter_residual_before_ln=True), "pfeiffer",
     {"norm_position": "post", "adapter_residual_before_ln": True}),
    ("pfeiffer residual_before_ln=False", lambda: ah.SeqBnConfig(residual_before_ln=False), "pfeiffer",
     {"residual_before_ln": False}),
    ("pfeiffer residual_before_ln=post_add", lambda: ah.SeqBnConfig(residual_before_ln="post_add"), "pfeiffer",
     {"residual_before_ln": "post_add"}),
    ("pfeiffer gelu, r=8, learned scaling",
     lambda: ah.SeqBnConfig(non_linearity="gelu", reduction_factor=8, scaling="learned"), "pfeiffer",
     {"non_linearity": "gelu", "reduction_factor": 8, "scaling": "learned"}),
    ("houlsby + mh only", lambda: ah.SeqBnConfig(mh_adapter=True, output_adapter=False), "pfeiffer",
     {"mh_adapter": True, "output_adapter": False}),
    ("parallel ln_after, channel scaling", lambda: ah.ParBnConfig(ln_after=True, scaling="channel"), "parallel",
     {"norm_position": "post", "scaling": "channel"}),
    ("lora r=4 alpha=16 q/k/v", lambda: ah.LoRAConfig(r=4, alpha=16, attn_matrices=["q", "k", "v"]), "lora",
     {"r": 4, "alpha": 16, "roles": ["q", "k", "v"]}),
    ("lora ffn (intermediate + output)",
     lambda: ah.LoRAConfig(selfattn_lora=False, intermediate_lora=True, output_lora=True), "lora",
     {"roles": ["ffn_in", "ffn_proj"]}),
]
SKIP = {
    # GPT-2 fuses q, k, v into one Conv1D: AdapterHub adapts slices of it (LoRAMergedLinear),
    # adapterkit the whole ``c_attn`` (role ``qkv``), so the parameters do not correspond 1:1.
    ("gpt2", "lora q/v"): "fused c_attn: AdapterHub adapts q/v slices, adapterkit the whole qkv",
    ("gpt2", "lora r=4 alpha=16 q/k/v"): "fused c_attn (as above)",
    ("gpt2", "ia3"): "fused c_attn: AdapterHub scales k/v slices, adapterkit the whole qkv",
    # AdapterHub's own pre_forward leaves `residual` unset when there is no layer norm after
    # the sub-layer (pre-LN models) and raises UnboundLocalError; adapterkit uses h + residual.
    ("gpt2", "pfeiffer residual_before_ln=post_add"): "AdapterHub raises UnboundLocalError on pre-LN models",
    ("llama", "pfeiffer residual_before_ln=post_add"): "AdapterHub raises UnboundLocalError on pre-LN models",
}
# Where the defaults of the two libraries differ on purpose, adapterkit is told AdapterHub's
# placement so that the functional forms are compared: AdapterHub's Llama mixin wraps
# ``mlp.down_proj`` as "intermediate" (so its IA3 scales the FFN *output*), adapterkit's IA3
# scales ``mlp.up_proj`` (the intermediate activations, as in the IA3 paper).
OVERRIDES = {("llama", "ia3"): {"roles": ["k", "v", "ffn_proj"]}}


# -- the key mapping ------------------------------------------------------------------------------------
def ah_to_ak(ah_model: nn.Module, ak_model: AdapterModel, name: str = "a") -> dict[str, torch.Tensor]:
    """AdapterHub's parameters of adapter ``name`` under adapterkit ``state_dict`` keys, by the
    library's own AdapterHub reader (``adapterkit.interop.adapterhub.from_adapterhub``, the one
    that loads AdapterHub checkpoints)."""
    ah_config = ah_model.adapters_config.get(name).to_dict()
    marks = (f".adapters.{name}.", f".loras.{name}.")
    state = {k: v.detach() for k, v in ah_model.state_dict().items() if any(m in k for m in marks)}
    _, sites, _ = from_adapterhub(ah_config, state, name, ak_model, Path("<AdapterHub model>") / "adapter.safetensors")
    return {f"adapters.{name}.{place.replace('.', '-')}.{param}": value
            for place, params in sites.items() for param, value in params.items()}


def bottleneck_tensors(prefix: str, adapter: nn.Module) -> dict[str, torch.Tensor]:
    """An AdapterHub bottleneck's parameters under adapterkit keys starting with ``prefix``."""
    return {prefix + _bottleneck_key(key, adapter): value for key, value in adapter.state_dict().items()}


def lora_tensors(prefix: str, lora: nn.Module) -> dict[str, torch.Tensor]:
    """An AdapterHub LoRA's (or IA3's) parameters under adapterkit keys starting with ``prefix``."""
    if type(lora).__name__ == "IA3":
        return {prefix + "ia3_l": lora.lora_B.detach().reshape(-1)}
    return {prefix + "lora_A": lora.lora_A.detach(), prefix + "lora_B": lora.lora_B.detach()}


def _bottleneck_key(key: str, adapter: nn.Module) -> str:
    # ``adapter_norm_before`` is also ``adapter_down.0``: both names appear in the state dict.
    shift = 1 if hasattr(adapter, "adapter_norm_before") else 0
    m = re.fullmatch(r"adapter_down\.(\d+)\.(weight|bias)", key)
    if m:
        return f"{'norm_before' if int(m.group(1)) < shift else 'down'}.{m.group(2)}"
    m = re.fullmatch(r"(adapter_up|adapter_norm_before|adapter_norm_after)\.(weight|bias)", key)
    if m:
        mine = {"adapter_up": "up", "adapter_norm_before": "norm_before", "adapter_norm_after": "norm_after"}
        return f"{mine[m.group(1)]}.{m.group(2)}"
    if key == "scaling":
        return "scaling"
    raise KeyError(f"AdapterHub parameter {key!r} has no adapterkit counterpart")


@torch.no_grad()
def randomise(ah_model: nn.Module, name: str = "a", seed: int = 0) -> None:
    """Non-zero weights everywhere in adapter ``name``: noise for projections and LoRA's A and B,
    one plus noise for multiplicative parameters (norm weights, scalings, IA3 vectors)."""
    gen = torch.Generator().manual_seed(seed)
    for mname, module in ah_model.named_modules():
        if name not in mname.split("."):
            continue
        multiplicative = isinstance(module, nn.LayerNorm) or type(module).__name__ == "IA3"
        for pname, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=gen) * 0.2
            scale_like = (multiplicative and pname != "bias") or pname == "scaling"
            p.copy_(1.0 + noise if scale_like else noise)


# -- one comparison -------------------------------------------------------------------------------------
def paired_models(base: nn.Module, ah_config, preset: str, options: dict,
                  to_ak: Callable[[nn.Module, AdapterModel], dict], where: str):
    """Copies of ``base`` with adapter ``"a"`` in AdapterHub (weights randomised) and in adapterkit
    (AdapterHub's weights mapped by ``to_ak``, every key required), both active and in eval mode;
    also returns the mapped tensors."""
    ah_model = copy.deepcopy(base)
    ah.init(ah_model)
    ah_model.add_adapter("a", config=ah_config)
    ah_model.set_active_adapters("a")
    randomise(ah_model)
    ah_model.eval()

    ak_model = AdapterModel(copy.deepcopy(base))
    ak_model.add_adapter("a", preset, set_active=True, **options)
    mapped, mine = to_ak(ah_model, ak_model), ak_model.state_dict()
    missing, extra = sorted(set(mine) - set(mapped)), sorted(set(mapped) - set(mine))
    if missing or extra:
        raise AssertionError(f"{where}: key mapping incomplete: missing {missing[:4]}, extra {extra[:4]}")
    ak_model.load_state_dict({k: v.reshape(mine[k].shape) for k, v in mapped.items()})
    return ah_model, ak_model.eval(), mapped


def compare(kind: str, label: str, ah_config, preset: str, options: dict) -> dict:
    base = tiny(kind)
    base.eval()
    batch = batch_for(kind, base)
    with torch.no_grad():
        reference = base(**batch)[0]

    ah_model, ak_model, mapped = paired_models(base, ah_config, preset, options, ah_to_ak, f"{kind}/{label}")
    with torch.no_grad():
        out_ah = ah_model(**batch)[0]
        out_ak = ak_model(**batch)[0]
        exact = copy.deepcopy(ah_model).double()(**batch)[0]  # the same function in float64
    mask = batch["attention_mask"].bool()
    diff = (out_ah - out_ak)[mask].abs().max().item()
    moved = (out_ak - reference)[mask].abs().max().item()
    return {"model": kind, "preset": label, "tensors": len(mapped), "max_abs_diff": diff,
            "ah_rounding": (out_ah.double() - exact)[mask].abs().max().item(),
            "ak_rounding": (out_ak.double() - exact)[mask].abs().max().item(),
            "changed_by_adapter": moved, "pass": diff <= TOLERANCE and moved > 1e-3}


# -- adapterkit's own invariants under this transformers ---------------------------------------------------
def invariants(kind: str, preset: str) -> dict:
    base = tiny(kind)
    base.eval()
    batch = batch_for(kind, base)
    with torch.no_grad():
        reference = base(**batch)[0]
    model = AdapterModel(base)
    model.add_adapter("a", preset, set_active=True)
    model.eval()
    with torch.no_grad():
        fresh = model(**batch)[0]
        for p in model.adapters.parameters():  # make the adapter do something
            p.add_(0.1 * torch.randn_like(p))
        changed = model(**batch)[0]
        with model.disable_adapters():
            disabled = model(**batch)[0]
    mask = batch["attention_mask"].bool()
    identity = (fresh - reference)[mask].abs().max().item()
    return {"model": kind, "preset": preset, "identity_at_init": identity,
            "disabled_bit_for_bit": torch.equal(disabled, reference),
            "changed": (changed - reference)[mask].abs().max().item() > 1e-4,
            "pass": identity == 0.0 and torch.equal(disabled, reference)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models only (no MiniLM)")
    args = p.parse_args(argv)
    kinds = ["bert", "distilbert", "gpt2", "llama"] + ([] if args.quick else ["minilm"])
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, adapters {ah.__version__}\n")

    failures = 0
    print("| model | preset | tensors | max abs diff | AdapterHub / adapterkit vs float64 | adapter changes output by "
          "| pass |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        for label, make_config, preset, options in CASES:
            if kind == "minilm" and label not in ("pfeiffer", "houlsby", "parallel", "lora q/v", "ia3"):
                continue
            skip = SKIP.get((kind, label))
            options = {**options, **OVERRIDES.get((kind, label), {})}
            if skip:
                print(f"| {kind} | {label} | — | skipped: {skip} | — | — | — |")
                continue
            try:
                r = compare(kind, label, make_config(), preset, options)
            except Exception as err:  # report and go on: the table shows every case
                failures += 1
                print(f"| {kind} | {label} | — | **error**: {type(err).__name__}: {str(err)[:150]} "
                      "| — | — | **FAIL** |")
                continue
            failures += not r["pass"]
            print(f"| {kind} | {label} | {r['tensors']} | {r['max_abs_diff']:.2e} | {r['ah_rounding']:.1e} / "
                  f"{r['ak_rounding']:.1e} | {r['changed_by_adapter']:.2e} "
                  f"| {'pass' if r['pass'] else '**FAIL**'} |")

    print("\n| model | preset | fresh adapter: max abs diff | disabled == base bit for bit | pass |")
    print("|---|---|---|---|---|")
    for kind in ["bert", "distilbert", "gpt2", "llama"]:
        for preset in ("pfeiffer", "houlsby", "parallel", "lora", "ia3"):
            try:
                r = invariants(kind, preset)
            except Exception as err:
                failures += 1
                print(f"| {kind} | {preset} | **error**: {type(err).__name__}: {str(err)[:150]} | — | **FAIL** |")
                continue
            failures += not r["pass"]
            print(f"| {kind} | {preset} | {r['identity_at_init']:.1e} | {r['disabled_bit_for_bit']} "
                  f"| {'pass' if r['pass'] else '**FAIL**'} |")
    print(f"\n{'all passed' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
