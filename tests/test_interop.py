"""Adapters made by PEFT and AdapterHub load into adapterkit with the peers' own logits (issue 11).

The fixtures (``tests/fixtures/interop/``, written by ``tests/fixtures/make_interop_fixtures.py``
in the bench environment) hold each peer's checkpoint, the batch and the logits the peer
computed. Here, under ``transformers`` 5.x, adapterkit loads the same base and the adapter and
must reproduce those logits to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from adapterkit import AdapterModel
from adapterkit.packaged import resolve_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "interop"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "case.json").is_file())


def load_base(case: dict) -> torch.nn.Module:
    folder = resolve_model("minilm")[0] if case["base"] == "minilm" else FIXTURES / "bases" / case["base"]
    cls = T.AutoModelForCausalLM if case["causal_lm"] else T.AutoModel
    return cls.from_pretrained(folder, local_files_only=True).eval()


def fixture(name: str) -> tuple[dict, dict, Path]:
    folder = FIXTURES / name
    return json.loads((folder / "case.json").read_text()), load_file(str(folder / "expected.safetensors")), folder


@pytest.mark.parametrize("name", CASES)
def test_peer_fixture_gives_the_peer_logits(name):
    case, expected, folder = fixture(name)
    model = AdapterModel(load_base(case))
    loaded = model.load_adapter(folder / "adapter", set_active=True, allow_pickle=case["allow_pickle"])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    want = expected["logits"]
    assert logits.shape == want.shape
    if want.dim() == 3:  # per token: compare the real tokens (padding rows carry no meaning)
        mask = expected["attention_mask"].bool()
        logits, want = logits[mask], want[mask]
    assert (logits - want).abs().max().item() <= 1e-5
    with model.disable_adapters():  # the adapter matters: without it the logits differ
        base = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    assert loaded in model.adapters
    if base.shape == expected["logits"].shape:
        assert (base - expected["logits"]).abs().max().item() > 1e-3
