"""Same weights, same outputs on encoder-decoders: adapterkit against AdapterHub ``adapters`` 1.3
on tiny T5, T5 v1.1, BART and mBART, both stacks (issue 9).

Run in the bench environment (``bash bench/make_env.sh``):

    .venv-bench/bin/python bench/parity_seq2seq.py

As ``parity_adapterhub.py`` (whose weight randomisation and key mapping it reuses): the adapter
is added in both libraries, AdapterHub's weights are randomised and copied into adapterkit's
modules, and both models run the same batch (encoder ids with padding, decoder ids) in eval mode;
the largest absolute difference of the encoder's and of the decoder's last hidden states must be
<= 1e-5, and the adapter must move the output. AdapterHub's bottleneck places map to adapterkit's
``{encoder,decoder}.layers.<i>.{attn_out,cross_attn_out,ffn_out}``; its LoRA / IA3 layers sit at
the same module paths as adapterkit's layout-relative place ids. Exits non-zero on any failure.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapters as ah  # noqa: E402
from adapters.methods.bottleneck import BottleneckLayer  # noqa: E402
from adapters.methods.lora import LoRALayer  # noqa: E402
from parity_adapterhub import TOLERANCE, bottleneck_tensors, lora_tensors, paired_models  # noqa: E402

from adapterkit import AdapterModel  # noqa: E402

_SEQ2SEQ = dict(vocab_size=100, d_model=32)
_BART = dict(_SEQ2SEQ, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64)
_T5 = dict(_SEQ2SEQ, d_kv=6, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0)
MODELS: dict[str, Callable[[], nn.Module]] = {
    "t5": lambda: transformers.T5Model(transformers.T5Config(**_T5)),
    "t5-v1_1": lambda: transformers.T5Model(transformers.T5Config(**_T5, feed_forward_proj="gated-gelu")),
    "bart": lambda: transformers.BartModel(transformers.BartConfig(**_BART)),
    "mbart": lambda: transformers.MBartModel(transformers.MBartConfig(**_BART)),
}
ALL_QKV = ["q", "k", "v", "cross_q", "cross_k", "cross_v"]
# (name, AdapterHub config, adapterkit preset, adapterkit options)
CASES: list[tuple[str, Callable[[], object], str, dict]] = [
    ("pfeiffer", lambda: ah.SeqBnConfig(), "pfeiffer", {}),
    ("houlsby", lambda: ah.DoubleSeqBnConfig(), "houlsby", {}),
    ("pfeiffer + cross_adapter", lambda: ah.SeqBnConfig(cross_adapter=True), "pfeiffer", {"cross_adapter": True}),
    ("houlsby + cross_adapter", lambda: ah.DoubleSeqBnConfig(cross_adapter=True), "houlsby", {"cross_adapter": True}),
    ("parallel", lambda: ah.ParBnConfig(), "parallel", {}),
    ("pfeiffer ln_before", lambda: ah.SeqBnConfig(ln_before=True), "pfeiffer", {"norm_position": "pre"}),
    ("lora q/v (defaults)", lambda: ah.LoRAConfig(), "lora", {}),
    ("lora r=4 alpha=16 q/k/v", lambda: ah.LoRAConfig(r=4, alpha=16, attn_matrices=["q", "k", "v"]), "lora",
     {"r": 4, "alpha": 16, "roles": ALL_QKV}),
    ("ia3 (defaults)", lambda: ah.IA3Config(), "ia3", {}),
]
PLACES = {"mh_adapter": "attn_out", "cross_adapter": "cross_attn_out", "output_adapter": "ffn_out"}


def ah_to_ak(ah_model: nn.Module, ak_model: AdapterModel, name: str = "a") -> dict[str, torch.Tensor]:
    """AdapterHub's parameters of adapter ``name`` under adapterkit ``state_dict`` keys."""
    out: dict[str, torch.Tensor] = {}
    for mname, module in ah_model.named_modules():
        if isinstance(module, BottleneckLayer) and name in module.adapters:
            stack, layer = re.match(r"(encoder|decoder)\.(?:block|layers)\.(\d+)\.", mname).groups()
            place = f"{stack}-layers-{layer}-{PLACES[module.location_key]}"
            out.update(bottleneck_tensors(f"adapters.{name}.{place}.", module.adapters[name]))
        elif isinstance(module, LoRALayer) and name in module.loras:
            place = ak_model.layout.place_id_for(mname).replace(".", "-")
            out.update(lora_tensors(f"adapters.{name}.{place}.", module.loras[name]))
    return out


def compare(kind: str, label: str, ah_config, preset: str, options: dict) -> dict:
    torch.manual_seed(0)
    base = MODELS[kind]().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    decoder_ids = torch.randint(5, 100, (3, 6), generator=gen)
    batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
    with torch.no_grad():
        reference = base(**batch).last_hidden_state

    ah_model, ak_model, mapped = paired_models(base, ah_config(), preset, options, ah_to_ak, f"{kind}/{label}")
    with torch.no_grad():
        theirs, ours = ah_model(**batch), ak_model(**batch)
    encoder = (theirs.encoder_last_hidden_state - ours.encoder_last_hidden_state)[mask.bool()].abs().max().item()
    decoder = (theirs.last_hidden_state - ours.last_hidden_state).abs().max().item()
    moved = (ours.last_hidden_state - reference).abs().max().item()
    return {"model": kind, "preset": label, "tensors": len(mapped), "encoder": encoder, "decoder": decoder,
            "moved": moved, "pass": max(encoder, decoder) <= TOLERANCE and moved > 1e-3}


def main() -> int:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, adapters {ah.__version__}\n")
    print("| model | preset | tensors | max abs diff encoder | max abs diff decoder | adapter moved output by | pass |")
    print("|---|---|---|---|---|---|---|")
    rows = [compare(kind, *case) for kind in MODELS for case in CASES]
    for r in rows:
        print(f"| {r['model']} | {r['preset']} | {r['tensors']} | {r['encoder']:.1e} | {r['decoder']:.1e} | "
              f"{r['moved']:.2f} | {'pass' if r['pass'] else '**FAIL**'} |")
    failed = [r for r in rows if not r["pass"]]
    print("\nall passed" if not failed else f"\n{len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
