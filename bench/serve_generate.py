"""Load benchmark of generation serving: continuous batching with mixed adapters against static
batching, on SmolLM2-135M (``adapterkit.loader`` alias "smollm2").

    python bench/serve_generate.py                                   # 64 requests, max_tokens 8-128
    python bench/serve_generate.py --requests 24 --max-tokens 32 --rate 8   # a short run (a few minutes)
    python bench/serve_generate.py --model tiny --requests 16        # a tiny random Llama: a smoke run

It adds 8 adapters of mixed methods (LoRA, bottleneck, IA3, prefix tuning, prompt tuning, in turn)
to the base and draws ``--requests`` requests (seeded): an adapter in turn, a prompt of 5-200
random tokens, ``max_tokens`` uniform in 8..``--max-tokens``, arriving as a Poisson process of
``--rate`` requests per second. The same workload then runs in this process, on the model, under
three schedulers (no HTTP: what is compared is the scheduling, and the load generator costs the
shared cores nothing):

* **(a) continuous**: ``serve/decode_loop.DecodeBatch`` as the server runs it: a request is
  prefilled when it arrives and joins the running batch (at most 64 rows) at the next step, a row
  leaves when it ends, every row with its own adapter;
* **(b) static**: today's ``/v1/generate`` batching, made generous: the waiting requests (any
  adapters, up to 32) run as one ``generate`` with per-example routing until the longest
  ``max_tokens`` of the batch (today's server also splits batches by ``max_new_tokens``, and
  answers only at the end; here every token counts when it is produced, as if it streamed);
* **(c) one adapter per batch**: the same, but a batch holds the oldest waiting request's adapter
  only (a server without per-example routing).

Printed per scheduler: output tokens/s (tokens within each request's ``max_tokens`` / the time
from the first arrival to the last token), time to first token p50 / p99 (from arrival) and
inter-token latency p50 / p99. Before that, the step profile re-measured here: one decode step of
the bare model with a 64-token cache for 1 / 8 / 16 / 32 / 64 rows, and a step of the
``AdapterModel`` at 64 rows bare and routed over the 8 adapters (the routing overhead; target
<= 1.10 x). The
ceiling of (a) against (c) is ``8 * step(8) / step(64)`` (the same tokens in one batch of 64 instead
of eight of 8), shown beside the result. On a shared machine only the ratios mean something.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

METHODS = [("lora", {"r": 8}), ("pfeiffer", {}), ("ia3", {}), ("prefix_tuning", {"prefix_length": 10}),
           ("prompt_tuning", {"prompt_length": 10}), ("lora", {"r": 8}), ("pfeiffer", {}), ("ia3", {})]


@dataclass
class Request:
    arrival: float
    adapter: Optional[str]
    prompt: list[int]
    max_tokens: int
    times: list[float] = field(default_factory=list)  # when each of its tokens was produced


def load(name: str):
    import transformers

    from adapterkit import AdapterModel
    from adapterkit.loader import load_model, load_tokenizer

    if name == "tiny":
        torch.manual_seed(0)
        model = AdapterModel(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, max_position_embeddings=1024)))
        tokenizer = load_tokenizer("minilm")
    else:
        model, tokenizer = load_model(name), load_tokenizer(name)
    names = []
    for i, (method, options) in enumerate(METHODS):
        names.append(f"a{i}")
        model.add_adapter(names[-1], method, **options)
    torch.manual_seed(1)
    for p in model.adapters.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval(), tokenizer, names


def workload(names: list[str], count: int, max_tokens: int, rate: float, vocab: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(count):
        prompt = [rng.randrange(100, vocab - 100) for _ in range(rng.randint(5, 200))]
        out.append(Request(t, names[i % len(names)], prompt, rng.randint(8, max_tokens)))
        t += rng.expovariate(rate)
    return out


# -- the step profile ---------------------------------------------------------------------------------
@torch.inference_mode()
def bare_step(model, rows: int, cache_len: int = 64, repeats: int = 3) -> float:
    from transformers import DynamicCache

    inner = model.model
    ids = torch.randint(100, 1000, (rows, cache_len))
    cache = DynamicCache(config=inner.config)
    inner(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    best = float("inf")
    for _ in range(repeats):
        if cache.get_seq_length() > cache_len:
            cache.crop(cache_len - cache.get_seq_length())  # back to 64 (a negative count removes)
        start = time.perf_counter()
        inner(input_ids=ids[:, :1], cache=cache, use_cache=True, logits_to_keep=1)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def routed_step(model, names: list[str], rows: int = 64, cache_len: int = 64, repeats: int = 3) -> tuple[float, float]:
    """One decode step of the ``AdapterModel`` at ``rows`` rows with a ``cache_len``-token cache:
    bare (no adapter), and routed over ``names`` in turn (explicit mask and positions, as the
    decode loop calls it)."""
    from transformers import DynamicCache

    ids = torch.randint(100, 1000, (rows, cache_len))
    cache = DynamicCache(config=model.model.config)
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    step = {"input_ids": ids[:, :1], "attention_mask": torch.ones(rows, cache_len + 1, dtype=torch.long),
            "position_ids": torch.full((rows, 1), cache_len), "cache": cache, "use_cache": True, "logits_to_keep": 1}
    best = {None: float("inf"), "routed": float("inf")}
    for _ in range(repeats):
        for key in best:
            start = time.perf_counter()
            model(**step, adapter_names=[names[i % len(names)] for i in range(rows)] if key else None)
            best[key] = min(best[key], time.perf_counter() - start)
            cache.crop(cache_len - cache.get_seq_length())
    return best[None], best["routed"]


# -- the schedulers ---------------------------------------------------------------------------------
def run_continuous(model, tokenizer, requests: list[Request], max_rows: int = 64) -> None:
    from adapterkit.serve.decode_loop import DecodeBatch, Row
    from adapterkit.serve.sampling import SamplingParams

    batch = DecodeBatch(model, tokenizer, max_rows=max_rows, max_prefill_tokens=512)
    waiting, start = list(requests), time.perf_counter()
    of: dict[int, Request] = {}
    while waiting or batch.busy:
        now = time.perf_counter() - start
        due = [r for r in waiting if r.arrival <= now]
        if due:
            rows = [Row(r.prompt, r.adapter, SamplingParams(max_tokens=r.max_tokens)) for r in due]
            of.update({id(row): r for row, r in zip(rows, due)})
            batch.submit(rows, 10 ** 6)
            waiting = waiting[len(due):]
        if not batch.busy:
            time.sleep(max(0.0, waiting[0].arrival - now))
            continue
        updates = batch.tick()
        now = time.perf_counter() - start
        for row, update in updates:
            of[id(row)].times.extend(now for _ in update.tokens)


class _Clock:
    """A stopping criterion that never stops: it notes when each step's tokens were produced."""

    def __init__(self, steps: list[float], start: float):
        self.steps, self.start = steps, start

    def __call__(self, input_ids, scores, **kwargs):
        self.steps.append(time.perf_counter() - self.start)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@torch.inference_mode()
def run_static(model, tokenizer, requests: list[Request], one_adapter: bool, max_batch: int) -> None:
    from transformers import StoppingCriteriaList

    waiting, queue, start = list(requests), [], time.perf_counter()
    eos = model.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    while waiting or queue:
        now = time.perf_counter() - start
        queue += [r for r in waiting if r.arrival <= now]
        waiting = [r for r in waiting if r.arrival > now]
        if not queue:
            time.sleep(max(0.0, waiting[0].arrival - now))
            continue
        chosen = [r for r in queue if not one_adapter or r.adapter == queue[0].adapter][:max_batch]
        queue = [r for r in queue if all(r is not c for c in chosen)]
        steps: list[float] = []

        longest = max(len(r.prompt) for r in chosen)
        ids = torch.tensor([[0] * (longest - len(r.prompt)) + r.prompt for r in chosen])
        mask = torch.tensor([[0] * (longest - len(r.prompt)) + [1] * len(r.prompt) for r in chosen])
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=[r.adapter for r in chosen],
                             max_new_tokens=max(r.max_tokens for r in chosen), do_sample=False, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList([_Clock(steps, start)]))[:, longest:]
        for r, row in zip(chosen, out.tolist()):
            count = r.max_tokens
            for i, token in enumerate(row[:r.max_tokens]):
                if token in eos:
                    count = i + 1
                    break
            r.times = steps[:count]


def report(label: str, requests: list[Request]) -> dict[str, float]:
    tokens = sum(len(r.times) for r in requests)
    span = max(t for r in requests for t in r.times) - min(r.arrival for r in requests)
    ttft = sorted(r.times[0] - r.arrival for r in requests)
    itl = sorted(b - a for r in requests for a, b in zip(r.times, r.times[1:]))
    pick = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1000  # noqa: E731
    row = {"tok/s": tokens / span, "ttft50": pick(ttft, 0.5), "ttft99": pick(ttft, 0.99), "itl50": pick(itl, 0.5),
           "itl99": pick(itl, 0.99)}
    print(f"{label:<24} {tokens:>6} {row['tok/s']:>8.1f} {row['ttft50']:>8.0f} {row['ttft99']:>8.0f} "
          f"{row['itl50']:>7.0f} {row['itl99']:>7.0f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rate", type=float, default=16.0, help="arrivals per second (Poisson)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer, names = load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.0f} s; {args.threads} thread(s)", flush=True)

    profile = {b: bare_step(model, b) for b in (1, 8, 16, 32, 64)}
    print("bare step, 64-token cache: " + " / ".join(f"{b}: {t * 1000:.0f} ms" for b, t in profile.items()))
    plain, routed = routed_step(model, names)
    print(f"AdapterModel step, 64 rows: bare {plain * 1000:.0f} ms, routed over 8 adapters {routed * 1000:.0f} ms "
          f"= {routed / plain:.2f} x (target <= 1.10)")
    ceiling = 8 * profile[8] / profile[64]
    print(f"ceiling of (a) / (c), 64 rows against eight batches of 8: 8 x {profile[8] * 1000:.0f} / "
          f"{profile[64] * 1000:.0f} = {ceiling:.2f} x", flush=True)

    print(f"\n{args.requests} requests, prompts 5-200 tokens, max_tokens 8-{args.max_tokens}, {args.rate:g}/s")
    print(f"{'scheduler':<24} {'tokens':>6} {'tok/s':>8} {'ttft50':>8} {'ttft99':>8} {'itl50':>7} {'itl99':>7}  (ms)")
    vocab = model.config.vocab_size
    results = {}
    for label, run in (("(a) continuous", lambda rs: run_continuous(model, tokenizer, rs)),
                       ("(b) static, mixed", lambda rs: run_static(model, tokenizer, rs, False, 32)),
                       ("(c) one adapter/batch", lambda rs: run_static(model, tokenizer, rs, True, 8))):
        requests = workload(names, args.requests, args.max_tokens, args.rate, vocab)
        run(requests)
        results[label[:3]] = report(label, requests)
    a, b, c = results["(a)"], results["(b)"], results["(c)"]
    print(f"\n(a)/(c) tokens/s {a['tok/s'] / c['tok/s']:.2f} x (target >= 2.5, ceiling {ceiling:.2f}); "
          f"(a)/(b) {a['tok/s'] / b['tok/s']:.2f} x (target >= 1.5); TTFT p99 (a) {a['ttft99']:.0f} ms vs "
          f"(b) {b['ttft99']:.0f} ms, (c) {c['ttft99']:.0f} ms; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
