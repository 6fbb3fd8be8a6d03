"""A quick A/B of two source trees: one adapter's inference ratio and its training step, alternated.

    python bench/ab_trees.py OLD_SRC NEW_SRC --rounds 3

Each round runs, for each tree in turn (``PYTHONPATH=<tree>``, one subprocess per measurement,
1 thread): all-MiniLM-L6-v2 with a Pfeiffer and with a LoRA adapter, (a) batch 32 x 128
inference, the adapter model's median forward over the bare model's, the two timed alternately in
the same process; (b) one training step (forward + backward, batch 32 x 64, ``train_adapter``),
median seconds. The table gives each tree's median over the rounds and new / old. It is the small
sibling of ``compare_trees.py`` (which runs whole ``bench_speed.py`` tables), for a machine whose
noise swamps those: the inference ratio is taken within one process and cancels most of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import statistics, sys, time, warnings
import torch
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
from adapterkit import AdapterModel
try:
    from adapterkit.loader import load_base_model
except ImportError:  # trees before the loader owned model loading
    from adapterkit.packaged import load_base_model
what, preset = sys.argv[1], sys.argv[2]
model = AdapterModel(load_base_model("minilm"))
model.add_adapter("a", preset, set_active=True)
if what == "infer":
    base = load_base_model("minilm").eval()
    model.eval()
    ids = torch.randint(1000, 20000, (32, 128))
    b, a = [], []
    with torch.inference_mode():
        for _ in range(7):
            t = time.perf_counter(); base(input_ids=ids, attention_mask=torch.ones_like(ids)); b.append(time.perf_counter() - t)
            t = time.perf_counter(); model(input_ids=ids, attention_mask=torch.ones_like(ids)); a.append(time.perf_counter() - t)
    print(statistics.median(a[1:]) / statistics.median(b[1:]))
else:
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    ids, y = torch.randint(1000, 20000, (32, 64)), torch.randint(0, 2, (32,))
    ts = []
    for _ in range(6):
        t = time.perf_counter()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y).loss.backward()
        ts.append(time.perf_counter() - t)
    print(statistics.median(ts[1:]))
"""


def measure(src: str, what: str, preset: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    out = subprocess.run([sys.executable, "-c", CHILD, what, preset], env=env, check=True, capture_output=True,
                         text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    rows = [(what, preset) for what in ("infer", "train") for preset in ("pfeiffer", "lora")]
    got: dict[tuple[str, str, str], list[float]] = {}
    for i in range(args.rounds):
        trees = [("old", args.old), ("new", args.new)]
        for tag, src in trees if i % 2 == 0 else trees[::-1]:
            for what, preset in rows:
                got.setdefault((tag, what, preset), []).append(measure(src, what, preset))
    print(f"| measurement | old (median of {args.rounds}) | new | new / old |")
    print("|---|---:|---:|---:|")
    for what, preset in rows:
        old = statistics.median(got["old", what, preset])
        new = statistics.median(got["new", what, preset])
        title = f"{preset} inference / bare" if what == "infer" else f"{preset} training step, s"
        print(f"| {title} | {old:.3f} | {new:.3f} | {new / old:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
