"""Run AdapterHub ``adapters`` 1.3 itself (the bench environment, ``/work/main/.venv-bench`` or
``$ADAPTERKIT_BENCH_PYTHON``) on an adapter folder adapterkit wrote: its logits for a batch, so a
test can check that AdapterHub loads our exports and computes what we compute."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

BENCH_PYTHON = Path(os.environ.get("ADAPTERKIT_BENCH_PYTHON",
                                   Path(__file__).resolve().parents[1] / ".venv-bench" / "bin" / "python"))  # bench/make_env.sh
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "interop"

_SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch, transformers as T, adapters as ah
from safetensors.torch import load_file, save_file
base, folder, batch_file, out_file, causal = sys.argv[1:6]
cls = T.AutoModelForCausalLM if causal == "1" else T.AutoModel
model = cls.from_pretrained(base).eval()
ah.init(model)
name = model.load_adapter(folder, use_safetensors=True)
model.set_active_adapters(name)
model.eval()  # after loading: AdapterHub's new layers start in training mode (dropout)
batch = load_file(batch_file)
with torch.no_grad():
    out = model(**batch)
out = out.logits if causal == "1" else out.last_hidden_state
save_file({"out": out.contiguous()}, out_file)
"""


def adapterhub_output(folder: Path, base: str, batch: dict[str, torch.Tensor], tmp: Path,
                      causal_lm: bool) -> torch.Tensor:
    """AdapterHub's logits (causal LM) or last hidden state for ``batch`` with the adapter in
    ``folder`` on the interop fixture base ``base`` ("bert", "llama", ...)."""
    if not BENCH_PYTHON.exists():
        pytest.skip(f"AdapterHub's environment is not at {BENCH_PYTHON} (bash bench/make_env.sh)")
    save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp / "batch.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(BENCH_PYTHON), "-c", _SCRIPT, str(FIXTURES / "bases" / base), str(folder),
                           str(tmp / "batch.safetensors"), str(tmp / "out.safetensors"), "1" if causal_lm else "0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(str(tmp / "out.safetensors"))["out"]


def fixture_base(base: str, causal_lm: bool):
    import transformers as T

    cls = T.AutoModelForCausalLM if causal_lm else T.AutoModel
    return cls.from_pretrained(FIXTURES / "bases" / base, local_files_only=True).eval()


__all__ = ["adapterhub_output", "fixture_base"]


def assert_adapterhub_computes_ours(model, name: str, tmp: Path, *, padding: bool = False) -> None:
    """Save adapter ``name`` of ``model`` (over ``fixture_base("bert")``) in AdapterHub's format and
    check that AdapterHub, loading it, computes our hidden states to 1e-5 (on the real tokens, or
    on every position with ``padding=True``, for methods whose AdapterHub formula reads padding)."""
    batch = {"input_ids": torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(2)),
             "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3])}
    model.eval()
    with torch.no_grad():
        ours = model.model(**batch).last_hidden_state
        with model.disable_adapters():
            assert (model.model(**batch).last_hidden_state - ours).abs().max() > 1e-3  # the adapter acts
    model.save_adapter(tmp / "ah", name, format="adapterhub")
    theirs = adapterhub_output(tmp / "ah", "bert", batch, tmp, causal_lm=False)
    real = torch.ones_like(batch["attention_mask"]).bool() if padding else batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-5
