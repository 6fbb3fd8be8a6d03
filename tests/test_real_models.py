"""The packaged real models: all-MiniLM-L6-v2 (BERT family) and SmolLM2-135M (Llama family).

* MiniLM: 30 AdamW steps of a Pfeiffer adapter + classification head on 512 SST-2 training rows
  lower the loss (on a fixed held-out batch, and over the training steps), with the base weights
  bit for bit unchanged; adapters off reproduce the base model.
* SmolLM2: loads from its GGUF package; a fresh LoRA adapter is an identity; forward + backward
  on a short causal-LM batch gives gradients to the adapter only.

SST-2 is read from ``../shared/data/sst2`` (see ``helpers.SST2_DIR``), never copied into the repo.
"""

from __future__ import annotations

import pytest
import torch

from adapterkit import AdapterModel
from adapterkit.loader import load_tokenizer
from helpers import assert_state_equal, clone_state, read_sst2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return AdapterModel.from_pretrained("minilm"), load_tokenizer("minilm")


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return AdapterModel.from_pretrained("smollm2"), load_tokenizer("smollm2")


def encode(tokenizer, sentences: list[str], max_length: int = 48) -> dict[str, torch.Tensor]:
    return dict(tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.no_grad()
def eval_loss(model: AdapterModel, batch: dict, labels: torch.Tensor) -> float:
    model.eval()
    return model(**batch, labels=labels).loss.item()


def test_minilm_pfeiffer_training_lowers_the_loss(minilm, sst2_dir):
    model, tokenizer = minilm
    assert model.layout.model_type == "bert" and model.layout.num_layers == 6 and model.layout.hidden_size == 384
    sentences, labels = read_sst2("train", limit=512)
    dev_sentences, dev_labels = read_sst2("dev", limit=64)
    dev_batch, dev_y = encode(tokenizer, dev_sentences), torch.tensor(dev_labels)

    model.add_adapter("sst2", "pfeiffer")
    model.add_classification_head("sst2", num_labels=2)
    model.train_adapter("sst2")
    base_before = clone_state(model.model)
    before = eval_loss(model, dev_batch, dev_y)

    torch.manual_seed(0)
    order = torch.randperm(len(sentences))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    model.train()
    for step in range(30):
        rows = order[(step * 16) % 512 :][:16].tolist()
        batch = encode(tokenizer, [sentences[i] for i in rows])
        loss = model(**batch, labels=torch.tensor([labels[i] for i in rows])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    after = eval_loss(model, dev_batch, dev_y)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert after < before, (before, after)
    assert_state_equal(model.model, base_before)


def test_minilm_disabled_is_the_base_model(minilm):
    model, tokenizer = minilm
    batch = encode(tokenizer, ["a gripping , funny film", "dull"])
    model.set_active_adapters(None)
    model.active_head = None  # the bare encoder's hidden states
    with torch.no_grad():
        base = model.eval()(**batch).last_hidden_state
        model.add_adapter("p", "parallel", set_active=True)
        with torch.no_grad():
            for p in model.adapters["p"].parameters():
                p.add_(0.05 * torch.randn_like(p))
        adapted = model(**batch).last_hidden_state
        with model.disable_adapters():
            disabled = model(**batch).last_hidden_state
    model.delete_adapter("p")
    assert not torch.allclose(adapted, base, atol=1e-4)
    assert torch.equal(disabled, base)


def test_smollm2_lora_identity_then_forward_backward(smollm2):
    model, tokenizer = smollm2
    assert model.layout.model_type == "llama" and model.layout.num_layers == 30
    batch = encode(tokenizer, ["The capital of France is Paris.", "Adapters are small."], max_length=16)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        base = model.eval()(**batch).logits
    model.add_adapter("lm", "lora", r=8, alpha=16.0, set_active=True)
    with torch.no_grad():
        fresh = model(**batch).logits
    assert (fresh - base).abs().max() <= 1e-5

    model.train_adapter("lm")
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.adapters["lm"].parameters())
    assert all(p.grad is None for p in model.model.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 30 * 8 * ((576 + 576) + (576 + 192))
