"""PEFT's prefix tuning beside ours, in the same budget: SST-2 scored by SmolLM2-135M.

The rows, tokenisation, batches, learning-rate schedule, optimizer, gradient clipping, dev
evaluations and verbalizer scoring are adapterkit's own (``adapterkit.train``: ``prepare`` reads
and encodes the data exactly as ``adapterkit train`` does, ``epoch_batches`` / ``lr_at`` /
``make_optimizer`` / ``evaluate`` are the loop's pieces); only the adapter differs: PEFT's
``PrefixTuningConfig`` (``num_virtual_tokens`` 20, no projection, lr 1e-2 by default) on the
frozen base. The best of the dev evaluations (every ``--eval-every`` steps and at the end) is
scored on the test set, as ``adapterkit train`` does.

    python bench/prefix_peft.py                       # SmolLM2, 2,000 rows, 1 epoch, batch 16
    python bench/prefix_peft.py --lr 3e-3 --tokens 10 --projection

Prints one JSON line (test and best dev accuracy, steps, trainable parameters, times) and writes
it to ``--json`` when given.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see adapterkit.cli._passive_openmp

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402

from adapterkit.train import TrainConfig, prepare  # noqa: E402
from adapterkit.train.batches import collate, epoch_batches  # noqa: E402
from adapterkit.train.evaluate import evaluate  # noqa: E402
from adapterkit.train.optim import lr_at, make_optimizer, set_lr, warmup_steps  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", type=Path, default=DATA if DATA.is_dir() else Path("/work/shared/data/sst2"))
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--tokens", type=int, default=20, help="PEFT's num_virtual_tokens")
    p.add_argument("--projection", action="store_true", help="PEFT's prefix_projection (its MLP)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--template", default="Review: {text} Sentiment:")
    p.add_argument("--verbalizer", default="negative,positive")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    started, cpu0 = time.perf_counter(), cpu_seconds()

    config = TrainConfig(
        model=args.model, train=str(args.data / "train.tsv"), eval=str(args.data / "dev.tsv"),
        test=str(args.data / "test.tsv"), template=args.template, verbalizer=args.verbalizer,
        max_train_rows=args.rows, max_eval_rows=args.eval_rows, epochs=args.epochs, batch_size=args.batch_size,
        max_length=args.max_length, lr=args.lr, seed=args.seed, max_steps=args.max_steps,
        method="prefix_tuning", options={"prefix_length": 1, "flat": True},  # removed below: PEFT's adapter instead
    )
    prep = prepare(config)
    prep.model.delete_adapter(prep.name)  # the bare base again (adapterkit's hooks vanish with it)
    base = prep.model.model
    torch.manual_seed(config.seed)
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=args.tokens, prefix_projection=args.projection))
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    lengths = prep.train.lengths()
    batches = epoch_batches(lengths, config.batch_size, config.seed, 1, group_by_length=config.group_by_length)
    steps = len(batches) * config.epochs
    steps = min(steps, config.max_steps) if config.max_steps else steps
    warm = warmup_steps(config.warmup, steps)
    optimizer = make_optimizer(model, config.learning_rate, config.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    score = lambda enc: evaluate(model, enc, prep.spec, batch_size=64, pad_id=prep.pad_id)  # noqa: E731
    best, best_state, best_step, history, step = -1.0, None, 0, [], 0
    for epoch in range(1, config.epochs + 1):
        for batch in epoch_batches(lengths, config.batch_size, config.seed, epoch, group_by_length=config.group_by_length):
            if step >= steps:
                break
            set_lr(optimizer, lr_at(step, steps, warm, config.learning_rate, config.schedule))
            loss = model(**collate(prep.train, batch, prep.spec.task, prep.pad_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 20 == 0:
                print(f"step {step}/{steps} loss {loss.item():.4f}", file=sys.stderr, flush=True)
            if step % args.eval_every == 0 or step == steps:
                acc = score(prep.eval)["accuracy"]
                history.append({"step": step, "dev_accuracy": acc})
                print(f"dev after step {step}: {acc:.4f}", file=sys.stderr, flush=True)
                if acc > best:
                    best, best_step = acc, step
                    best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        named = dict(model.named_parameters())
        for n, v in (best_state or {}).items():
            named[n].copy_(v)
    test = score(prep.test)
    result = {
        "adapter": f"PEFT prefix tuning, {args.tokens} virtual tokens" + (", projection" if args.projection else ""),
        "model": args.model, "lr": config.learning_rate, "rows": prep.data["rows"]["train"], "steps": step,
        "trainable": trainable, "trainable_share": round(trainable / total, 6),
        "test_accuracy": round(test["accuracy"], 4), "best_dev": best, "best_step": best_step, "dev": history,
        "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(cpu_seconds() - cpu0, 1),
        "peft": peft.__version__,
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
