"""Export adapterkit adapters to PEFT and AdapterHub, load them with the peer, compare (issue 11).

Run in the bench environment (``bash bench/make_env.sh``: ``peft``, ``adapters`` 1.3 and the
``transformers`` 4.57.6 it pins):

    .venv-bench/bin/python bench/interop_roundtrip.py            # the table below, exit 1 on a failure
    .venv-bench/bin/python bench/interop_roundtrip.py --quick    # without all-MiniLM-L6-v2

For every base (the tiny BERT, RoBERTa, GPT-2 and Llama models of ``tests/fixtures/interop/bases``
and all-MiniLM-L6-v2) and every method the peer has, an adapterkit adapter (and, where the peer
has one like it, a task head) gets random non-trivial weights, is saved with
``save_adapter(..., format="peft" | "adapterhub")``, loaded by the peer itself
(``PeftModel.from_pretrained`` / ``model.load_adapter``), and both run the same batch in eval
mode: the largest absolute difference of the logits (or last hidden states) must be <= 1e-5.
Combinations the peer cannot express must be refused by adapterkit with an error, nothing
written (rows "refused"). The ``Fuse`` rows (issue 13) export two adapters, a head and their
AdapterFusion layers, and AdapterHub runs ``Fuse("a", "b")`` with them (in float64, see
``fusion_run``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import transformers as T

import adapters as ah
import peft

from adapterkit import AdapterModel
from adapterkit.errors import AdapterError
from adapterkit.packaged import resolve_model

warnings.filterwarnings("ignore")
T.logging.set_verbosity_error()
logging.getLogger("adapters").setLevel(logging.ERROR)
BASES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "interop" / "bases"
TOLERANCE = 1e-5
NUM_LABELS = 3
DECODERS = ("gpt2", "llama")


def base_dir(arch: str) -> Path:
    return resolve_model("minilm")[0] if arch == "minilm" else BASES / arch


def load(arch: str, cls=None, **options: Any) -> torch.nn.Module:
    cls = cls or (T.AutoModelForCausalLM if arch in DECODERS else T.AutoModel)
    model = cls.from_pretrained(base_dir(arch), local_files_only=True, **options)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    return model.eval()


def batch(arch: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    shape, high = ((4, 16), 5000) if arch == "minilm" else ((3, 10), 100)
    ids = torch.randint(5, high, shape, generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    ids[mask == 0] = 0 if arch in DECODERS else ids[mask == 0]
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def randomise(model: AdapterModel, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in list(model.adapters.named_parameters()) + list(model.heads.named_parameters()):
        noise = torch.randn(p.shape, generator=gen) * 0.2
        scale_like = any(s in name for s in ("ia3_l", "scaling", "norm")) and not name.endswith("bias")
        p.copy_(1.0 + noise if scale_like else noise)
    for name, p in model.heads.named_parameters():  # GPT-2 / Llama's score layer has no bias
        if name.endswith("bias") and model.layout.is_decoder:
            p.zero_()


def head_options(arch: str, peer: str) -> dict[str, Any]:
    if arch in DECODERS:
        return {"layers": 1 if peer == "peft" else 2, "pooling": "last"}
    return {"layers": 2 if peer == "peft" else 1, "pooling": "cls"}


def ffn_proj(arch: str) -> str:
    return {"gpt2": "mlp.c_proj", "llama": "mlp.down_proj"}.get(arch, "output.dense")


# (label, method, options: arch -> dict, with head)
PEFT_CASES = [
    ("lora q/v", "lora", lambda a: {"r": 4, "alpha": 8}, False),
    ("lora all-linear, rsLoRA, rank/alpha patterns", "lora", lambda a: {
        "r": 4, "alpha": 6, "roles": "all-linear", "use_rslora": True,
        "rank_pattern": {r"layers\.1\..*": 2}, "alpha_pattern": {r"layers\.0\..*": 3.0}}, False),
    ("ia3, FFN projection input-scaled", "ia3", lambda a: {
        "roles": ("qkv" if a == "gpt2" else "k,v") + ",ffn_proj",
        "input_modules": r"layers\.\d+\." + re.escape(ffn_proj(a))}, False),
    ("lora q/v + head", "lora", lambda a: {"r": 4, "alpha": 8}, True),
    ("ia3 + head", "ia3", lambda a: {}, True),
]
AH_CASES = [
    ("pfeiffer (SeqBn)", "pfeiffer", lambda a: {}, False),
    ("houlsby (DoubleSeqBn)", "houlsby", lambda a: {}, False),
    ("parallel (ParBn)", "parallel", lambda a: {}, False),
    ("pfeiffer, pre norm, learned scaling, leave_out", "pfeiffer", lambda a: {
        "norm_position": "pre", "scaling": "learned", "leave_out": [0]}, False),
    ("lora", "lora", lambda a: {"r": 4, "alpha": 16} if a != "gpt2" else {"roles": "ffn_in,ffn_proj"}, False),
    ("lora, rsLoRA (as alpha * sqrt(r))", "lora", lambda a: {"r": 4, "alpha": 3, "use_rslora": True,
                                                            **({"roles": "ffn_in"} if a == "gpt2" else {})}, False),
    ("ia3", "ia3", lambda a: {} if a != "gpt2" else {"roles": "ffn_in"}, False),
    ("pfeiffer + head", "pfeiffer", lambda a: {}, True),
    ("lora + head", "lora", lambda a: {} if a != "gpt2" else {"roles": "ffn_in"}, True),
]
# what must be refused (nothing written)
REFUSALS = [
    ("peft", "gpt2", "pfeiffer", {}, "PEFT has no bottleneck adapter"),
    ("peft", "bert", "ia3", {"strategy": "scaled_add"}, "an option PEFT lacks"),
    ("adapterhub", "gpt2", "lora", {}, "AdapterHub adapts slices of GPT-2's fused c_attn"),
    ("adapterhub", "bert", "ia3", {"roles": "k,v,ffn_proj", "input_modules": r"layers\.\d+\.output\.dense"},
     "AdapterHub's IA3 scales outputs only"),
    ("adapterhub", "bert", "lora", {"rank_pattern": {"query": 2}}, "AdapterHub has one rank per adapter"),
]


def ours(arch: str, method: str, options: dict, head: Optional[dict]) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(load(arch))
    model.add_adapter("a", method, **options)
    if head is not None:
        model.add_classification_head("a", num_labels=NUM_LABELS, **head)
    model.set_active_adapters("a")
    randomise(model)
    return model.eval()


def peft_output(arch: str, folder: Path, data: dict, has_head: bool) -> torch.Tensor:
    if has_head:
        base = load(arch, T.AutoModelForSequenceClassification, num_labels=NUM_LABELS)
    else:
        base = load(arch)
    model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    out = model(**data)
    return out.logits if (has_head or arch in DECODERS) else out.last_hidden_state


def ah_output(arch: str, folder: Path, data: dict, has_head: bool) -> torch.Tensor:
    if has_head:
        model = ah.AutoAdapterModel.from_pretrained(base_dir(arch), local_files_only=True)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = 0
    else:
        model = load(arch)
        ah.init(model)
    name = model.load_adapter(str(folder), set_active=True, use_safetensors=True)
    if has_head:
        model.active_head = name
    model.eval()
    out = model(**data)
    return out.logits if (has_head or arch in DECODERS) else out[0]


def run(peer: str, arch: str, label: str, method: str, options: dict, with_head: bool) -> dict:
    data = batch(arch)
    model = ours(arch, method, options, head_options(arch, peer) if with_head else None)
    with torch.no_grad():
        out = model(**data)
        mine = out.logits if (with_head or arch in DECODERS) else out[0]
        with model.disable_adapters():
            base = model(**data)
            base = base.logits if (with_head or arch in DECODERS) else base[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        model.save_adapter(folder, "a", format=peer)
        with torch.no_grad():
            theirs = (peft_output if peer == "peft" else ah_output)(arch, folder, data, with_head)
    mask = data["attention_mask"].bool()
    if mine.dim() == 3:
        mine, theirs, base = mine[mask], theirs[mask], base[mask]
    diff = (mine - theirs).abs().max().item()
    moved = (mine - base).abs().max().item()
    return {"diff": diff, "moved": moved, "pass": diff <= TOLERANCE and moved > 1e-3}


def fusion_run(arch: str, residual_before: bool) -> dict:
    """Two Pfeiffer adapters (b with a head) and ``Fuse(a, b)``, all random, exported with
    ``save_adapter(..., format="adapterhub")`` / ``save_adapter_fusion(..., format="adapterhub")``
    and run by AdapterHub with ``Fuse("a", "b")`` and b's head (issue 13). Both run in float64:
    with random weights of this size, float32 rounding through MiniLM's six layers reaches 1e-4
    either way (float64: 5e-13); ``tests/test_compose_fuse_interop.py`` checks float32 on the tiny BERT."""
    from adapterkit import Fuse

    data = batch(arch)
    torch.manual_seed(0)
    model = AdapterModel(load(arch).double())
    for name in "ab":
        model.add_adapter(name, "pfeiffer")
    model.add_classification_head("b", num_labels=NUM_LABELS, **head_options(arch, "adapterhub"))
    model.add_adapter_fusion(Fuse("a", "b"), {"residual_before": residual_before})
    randomise(model)
    gen = torch.Generator().manual_seed(4)
    scale = 0.2 * (32 / model.layout.hidden_size) ** 0.5  # attention logits of the same size on every width
    with torch.no_grad():
        for name, p in model.fusions.named_parameters():
            eye = torch.eye(p.shape[0]) if name.endswith("value.weight") else 0.0
            p.copy_(eye + torch.randn(p.shape, generator=gen) * scale)
    model.set_active_adapters(Fuse("a", "b"))
    model.eval()
    with torch.no_grad():
        mine = model(**data).logits
        model.set_active_adapters("b")
        alone = model(**data).logits
    with tempfile.TemporaryDirectory() as tmp:
        for name in "ab":
            model.save_adapter(Path(tmp) / name, name, format="adapterhub")
        model.save_adapter_fusion(Path(tmp) / "fusion", Fuse("a", "b"), format="adapterhub")
        peer = ah.AutoAdapterModel.from_pretrained(base_dir(arch), local_files_only=True)
        for name in "ab":
            peer.load_adapter(str(Path(tmp) / name), use_safetensors=True)
        peer.load_adapter_fusion(str(Path(tmp) / "fusion"), use_safetensors=True)
        peer.set_active_adapters(ah.composition.Fuse("a", "b"))
        peer.active_head = "b"
        peer.double().eval()
        with torch.no_grad():
            theirs = peer(**data).logits
    diff = (mine - theirs).abs().max().item()
    moved = (mine - alone).abs().max().item()
    return {"diff": diff, "moved": moved, "pass": diff <= TOLERANCE and moved > 1e-3}


def run_reported(peer: str, arch: str, label: str, *args: Any) -> dict:
    """``run``, with its table row printed; an exception is a failed row (the table shows every case)."""
    try:
        r = run(peer, arch, label, *args)
        shown = f"{r['diff']:.1e} | {r['moved']:.2e} | {'pass' if r['pass'] else '**FAIL**'}"
    except Exception as err:
        r = {"diff": float("nan"), "pass": False}
        shown = f"**error** {type(err).__name__}: {str(err)[:160]} | — | **FAIL**"
    print(f"| {peer} | {arch} | {label} | {shown} |")
    return r


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models only (no MiniLM)")
    args = p.parse_args(argv)
    archs = ["bert", "roberta", "gpt2", "llama"] + ([] if args.quick else ["minilm"])
    print(f"torch {torch.__version__}, transformers {T.__version__}, peft {peft.__version__}, "
          f"adapters {ah.__version__}\n")
    print("| peer | model | adapterkit adapter | max abs diff | adapter changes output by | pass |")
    print("|---|---|---|---|---|---|")
    failures = 0
    summary: dict[tuple[str, str], list] = {}
    for peer, cases in (("peft", PEFT_CASES), ("adapterhub", AH_CASES)):
        for arch in archs:
            for label, method, options, with_head in cases:
                r = run_reported(peer, arch, label, method, options(arch), with_head)
                failures += not r["pass"]
                row = summary.setdefault((peer, label), [[], 0.0, True])
                row[0].append(arch)
                row[1], row[2] = max(row[1], r["diff"]), row[2] and r["pass"]
    for arch in ("bert",) + (() if args.quick else ("minilm",)):
        for residual_before in (False, True):
            label = f"Fuse(pfeiffer a, pfeiffer b) + head{', residual_before' if residual_before else ''}"
            try:
                r = fusion_run(arch, residual_before)
                shown = f"{r['diff']:.1e} | {r['moved']:.2e} (vs b alone) | {'pass' if r['pass'] else '**FAIL**'}"
            except Exception as err:
                r, shown = {"pass": False}, f"**error** {type(err).__name__}: {str(err)[:160]} | — | **FAIL**"
            failures += not r["pass"]
            print(f"| adapterhub | {arch} | {label} | {shown} |")
    for peer, arch, method, options, why in REFUSALS:
        model = ours(arch, method, options, None)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                model.save_adapter(Path(tmp) / "out", "a", format=peer)
                ok, shown = False, "written"
            except AdapterError as err:
                ok, shown = not (Path(tmp) / "out").exists(), str(err).split(";")[0][:110]
        failures += not ok
        print(f"| {peer} | {arch} | {method} {options or ''}: {why} | refused: {shown} | — "
              f"| {'pass' if ok else '**FAIL**'} |")
    print("\nSummary (README):\n\n| exported to | adapterkit adapter | models | worst max abs diff | pass |")
    print("|---|---|---|---|---|")
    for (peer, label), (models, worst, ok) in summary.items():
        print(f"| {peer} | {label} | {', '.join(models)} | {worst:.1e} | {'pass' if ok else '**FAIL**'} |")
    print(f"\n{'all passed' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
