"""Cold loads of ``adapterkit serve --adapter-source``: time to the first answer for an adapter not
yet loaded (fetched from S3), and what loads cost the requests in flight.

    python bench/serve_cold_load.py                       # tiny BERT, 12 + 24 cold adapters, 4 clients
    python bench/serve_cold_load.py --model minilm        # all-MiniLM-L6-v2 and MiniLM-sized adapters

Everything runs on 127.0.0.1 in this process: moto's S3 API (``ThreadedMotoServer``), the server
(uvicorn in a thread, ``--max-loaded-adapters`` 64, so nothing is evicted) and the clients (threads
with ``urllib``). It publishes ``--cold`` + 1 LoRA adapters with a head, then:

1. *cold*: for each cold adapter in turn, the first request (fetch from S3 into an empty cache,
   verify, load) and a second one (loaded): time to answer, median and max;
2. *in flight*: ``--clients`` threads send one-text requests to the one warm adapter -- while
   another thread requests ``--loads`` further cold adapters one after another, and, before and
   after, as long again without loads; p50 / p99 of the warm requests in each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def post(url: str, adapter: str, text: str = "a fine film") -> float:
    body = json.dumps({"adapter": adapter, "texts": [text]}).encode()
    start = time.perf_counter()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (a random 2-layer BERT) or a model folder / alias")
    parser.add_argument("--cold", type=int, default=12, help="cold adapters per phase")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--loads", type=int, default=24, help="cold loads during the in-flight phase")
    args = parser.parse_args()

    import torch
    import transformers
    from serve_helpers import Running, save_base
    from sharing_helpers import s3_server

    from adapterkit import AdapterModel
    from adapterkit.serve.config import ServeConfig

    root = Path(tempfile.mkdtemp(prefix="cold-load-"))
    os.environ["ADAPTERKIT_CACHE"] = str(root / "cache")
    if args.model == "tiny":
        base = str(save_base(root / "bert", transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=30522),
            transformers.BertModel))
    else:
        base = args.model
    model = AdapterModel.from_pretrained(base)
    names = ["warm"] + [f"c{i}" for i in range(args.cold + args.loads)]
    torch.manual_seed(0)
    with s3_server():
        for name in names:
            model.add_adapter(name, "lora", r=8)
            model.add_classification_head(name, 2)
            size = model.push_adapter(name, f"s3://adapters/pool/{name}")["size"]
            model.delete_adapter(name)
        config = ServeConfig(model=base, adapter_sources=("s3://adapters/pool",), max_loaded_adapters=64,
                             torch_threads=1, batch_window=0.002)
        with Running(config) as server:
            url = f"{server.url}/v1/classify"
            post(url, "warm")
            cold, warm = [], []
            for name in names[1:args.cold + 1]:
                cold.append(post(url, name))
                warm.append(post(url, name))
            print(f"model {args.model}; each adapter publishes {size / 1e3:.1f} kB (weights, config, card)")
            print(f"cold first answer (S3 fetch + verify + load): median {statistics.median(cold) * 1000:.1f} ms, "
                  f"max {max(cold) * 1000:.1f} ms over {len(cold)} adapters; the next answer: median "
                  f"{statistics.median(warm) * 1000:.1f} ms")

            def phase(with_loads: bool, seconds: float = 0.0) -> tuple[list[float], float]:
                stop, times, loads = threading.Event(), [], []

                def client() -> None:
                    while not stop.is_set():
                        times.append(post(url, "warm"))

                def loader() -> None:
                    for name in names[args.cold + 1:]:
                        if stop.is_set():
                            break
                        post(url, name)
                        loads.append(name)

                threads = [threading.Thread(target=client) for _ in range(args.clients)]
                threads += [threading.Thread(target=loader)] if with_loads else []
                start = time.perf_counter()
                for t in threads:
                    t.start()
                if with_loads:
                    threads[-1].join()
                else:
                    time.sleep(seconds)
                stop.set()
                for t in threads:
                    t.join()
                return times, time.perf_counter() - start

            mixed, seconds = phase(True)
            for label, times in (("during loads", mixed), ("alone, after", phase(False, seconds)[0]),
                                 ("alone, again", phase(False, seconds)[0])):
                print(f"in flight, {label:<13} {len(times):>5} requests in {seconds:.1f} s: p50 {pct(times, 0.5):.1f} "
                      f"ms, p99 {pct(times, 0.99):.1f} ms" + (f" ({args.loads} cold loads)" if times is mixed else ""))


if __name__ == "__main__":
    main()
