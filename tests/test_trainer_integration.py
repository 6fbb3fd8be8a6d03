"""An ``AdapterModel`` trains unchanged under ``transformers.Trainer``: only adapter and head
parameters change, and Trainer's checkpoints hold the adapter and head only."""

from __future__ import annotations

import torch
import transformers as T
from safetensors.torch import load_file

from adapterkit import AdapterModel
from trainkit import sentiment_rows, tiny_bert


class Rows(torch.utils.data.Dataset):
    def __init__(self, tokenizer, rows):
        self.items = [{**tokenizer(text), "labels": label} for text, label in rows]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_trainer_trains_adapter_and_saves_adapter_only(tmp_path):
    folder = tiny_bert(tmp_path / "bert")
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    model = AdapterModel.from_pretrained(str(folder))
    model.add_adapter("sst", "pfeiffer", reduction_factor=4)
    model.add_classification_head("sst", num_labels=2)
    model.train_adapter("sst")
    base_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    mine_before = {k: v.clone() for k, v in model.state_dict().items()}

    args = T.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_train_epochs=2, learning_rate=1e-2,
        save_strategy="steps", save_steps=10, logging_steps=5, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = T.Trainer(model=model, args=args, train_dataset=Rows(tokenizer, sentiment_rows(160)),
                        data_collator=T.DataCollatorWithPadding(tokenizer))
    result = trainer.train()
    assert result.global_step == 20
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]

    base_after = model.model.state_dict()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)  # frozen base untouched
    mine_after = model.state_dict()
    assert any(not torch.equal(mine_before[k], mine_after[k]) for k in mine_before if k.startswith("adapters."))
    assert any(not torch.equal(mine_before[k], mine_after[k]) for k in mine_before if k.startswith("heads."))

    checkpoint = tmp_path / "out" / "checkpoint-10"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert saved and all(k.startswith(("adapters.", "heads.")) for k in saved)
    assert set(saved) == set(model.state_dict())
    n_saved = sum(v.numel() for v in saved.values())
    assert n_saved == sum(p.numel() for p in model.adapters.parameters()) + sum(p.numel() for p in model.heads.parameters())
    assert (checkpoint / "model.safetensors").stat().st_size < 100_000  # the base (~100k params) is not in it

    # the final weights load back into a fresh handle through save_adapter / load_adapter
    trainer.save_model(str(tmp_path / "final"))
    assert set(load_file(str(tmp_path / "final" / "model.safetensors"))) == set(model.state_dict())
    model.save_adapter(tmp_path / "adapter", "sst")
    fresh = AdapterModel.from_pretrained(str(folder))
    fresh.load_adapter(tmp_path / "adapter", set_active=True)
    model.eval()
    fresh.eval()
    batch = tokenizer(["good fun film", "dull weak plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, fresh(**batch).logits, atol=1e-6)


def test_gradient_accumulation_gives_the_full_batch_step(tmp_path):
    """Two micro-batches of 8 with ``gradient_accumulation_steps=2`` make the same SGD step as
    one batch of 16: Trainer divides the heads' mean losses by the accumulation steps (it would
    not if it took AdapterModel for a model that normalises by ``num_items_in_batch``)."""
    folder = tiny_bert(tmp_path / "bert")
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    rows = Rows(tokenizer, sentiment_rows(16))

    def one_step(batch_size: int, accumulation: int) -> dict:
        torch.manual_seed(0)
        model = AdapterModel.from_pretrained(str(folder))
        model.add_adapter("sst", "pfeiffer", reduction_factor=4, init_weights="bert")
        model.add_classification_head("sst", num_labels=2)
        for module in model.heads.modules():  # no random masks: the two runs must see the same function
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.train_adapter("sst")
        args = T.TrainingArguments(
            output_dir=str(tmp_path / f"out{batch_size}"), per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd",
            lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True, seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        collator = T.DataCollatorWithPadding(tokenizer)
        T.Trainer(model=model, args=args, train_dataset=rows, data_collator=collator).train()
        return {k: v.clone() for k, v in model.state_dict().items()}

    whole, accumulated = one_step(16, 1), one_step(8, 2)
    assert max((whole[k] - accumulated[k]).abs().max().item() for k in whole) <= 1e-5
