"""Parallel of 4 Pfeiffer adapters in the top half of MiniLM, adapterkit beside AdapterHub, in CPU time.

    .venv-bench/bin/python bench/bench_parallel.py               # batch 8 x 128, 3 rounds
    .venv-bench/bin/python bench/bench_parallel.py --batch 32 --rounds 2

The row of ``bench_speed.py --only parallel4`` (``layers=[3, 4, 5]`` / AdapterHub's
``SeqBnConfig(leave_out=[0, 1, 2])``, ``Parallel("p0", ..., "p3")`` against the same adapters one
forward each), timed in the process's CPU time (``time.process_time``, one thread) instead of
wall-clock time: on a shared, loaded machine the wall clock of one forward varied 2.5-8 s between
rounds, while the CPU time a single-threaded forward consumes barely moves. Each round runs
adapterkit's Parallel, AdapterHub's Parallel, both libraries' four passes and the bare model,
alternated; the minimum over rounds is reported (after one warm-up round). Needs AdapterHub
``adapters`` (``bench/make_env.sh``); the model is MiniLM's shape from ``from_config``.
"""

from __future__ import annotations

import argparse
import copy
import time

import adapters  # AdapterHub (.venv-bench)
import torch
import transformers as T
from adapters.composition import Parallel as AHParallel

from adapterkit import AdapterModel, Parallel

NAMES = [f"p{i}" for i in range(4)]


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = T.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                       vocab_size=30522)
    torch.manual_seed(0)
    base = T.BertModel(cfg).eval()
    ours = AdapterModel(copy.deepcopy(base)).eval()
    for name in NAMES:
        ours.add_adapter(name, "pfeiffer", layers=[3, 4, 5])
    hub = copy.deepcopy(base)
    adapters.init(hub)
    for name in NAMES:
        hub.add_adapter(name, config=adapters.SeqBnConfig(leave_out=[0, 1, 2]))
    hub.eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def parallel(model, setup):
        def run():
            model.set_active_adapters(setup)
            model(**batch)
        return run

    def each(model):
        def run():
            for name in NAMES:
                model.set_active_adapters(name)
                model(**batch)
        return run

    cases = {"adapterkit Parallel": parallel(ours, Parallel(*NAMES)), "AdapterHub Parallel": parallel(hub, AHParallel(*NAMES)),
             "adapterkit 4 passes": each(ours), "AdapterHub 4 passes": each(hub), "bare": lambda: base(**batch)}
    samples: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for r in range(args.rounds + 1):
            for label, fn in cases.items():
                seconds = cpu_seconds(fn)
                if r:  # round 0 warms up
                    samples[label].append(seconds)
    best = {k: min(v) for k, v in samples.items()}
    print(f"batch {args.batch} x {args.tokens}, 1 thread, CPU seconds, min of {args.rounds} rounds")
    for label, seconds in best.items():
        print(f"  {label:<22}{seconds:8.3f}")
    print(f"Parallel / its own 4 passes: adapterkit {best['adapterkit Parallel'] / best['adapterkit 4 passes']:.3f}, "
          f"AdapterHub {best['AdapterHub Parallel'] / best['AdapterHub 4 passes']:.3f}; "
          f"adapterkit Parallel / AdapterHub Parallel {best['adapterkit Parallel'] / best['AdapterHub Parallel']:.3f}")


if __name__ == "__main__":
    main()
