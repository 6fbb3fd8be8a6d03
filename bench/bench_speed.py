"""Speed and memory of adapters on all-MiniLM-L6-v2: one process, one table (issue 2).

    python bench/bench_speed.py                       # batch 32 x 128 tokens, 7 quiet samples each
    python bench/bench_speed.py --quick               # smoke run: batch 4 x 32, 3 samples each
    python bench/bench_speed.py --json results.jsonl  # also write the rows as JSON lines

Every configuration is built once (its own copy of the model), then all are timed in rounds,
A B C A B C ..., and the median of each is quoted, because the machine is shared and noisy:
each sample records how much CPU other processes used meanwhile, rounds go on until every
configuration has ``--repeats`` quiet samples (or ``--max-rounds``), and the median is taken
over the quiet samples of each configuration (over its ``--repeats`` quietest samples when
fewer than 3 were quiet).
Training rows are judged against the *floor* (the frozen model with the backward pass forced
through every layer: what any adapter in layer 0 must pay), inference rows against the bare
model. Like the floor and AdapterHub, adapterkit's training rows keep the base model's dropout
(``train_adapter``'s default); the "base in eval mode" rows show ``base_dropout=False``, which
runs the frozen base as at inference. Where ``adapters`` (AdapterHub) or ``peft`` is
importable, their rows are measured in the same rounds. Peak memory of a training step is the
peak of the tensor memory it allocates (``step_peak_mb``); see bench/README.md for what each row
measures.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import transformers

from adapterkit import AdapterModel, Fuse, Parallel
from adapterkit.packaged import resolve_model
from adapterkit.train.activation_cache import ActivationCache

try:
    import adapters as adapterhub
except ImportError:  # pragma: no cover - depends on the environment
    adapterhub = None
try:
    import peft
except ImportError:  # pragma: no cover
    peft = None

# AdapterHub config names of our presets (our bottleneck.py docstring gives the mapping).
AH_CONFIGS = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel": "par_bn", "lora": "lora", "ia3": "ia3"}
PRESET_TITLES = {"pfeiffer": "Pfeiffer", "houlsby": "Houlsby", "parallel": "Parallel", "lora": "LoRA q/v", "ia3": "IA3"}

# The targets: training vs the floor, inference vs the bare model.
TRAIN_TARGETS = {"pfeiffer": 1.03, "houlsby": 1.03, "lora": 1.05}
INFER_TARGETS = {"pfeiffer": 1.02, "houlsby": 1.02, "lora": 1.03, "lora-merged": 1.005}
# Per-example routing (issue 9): 8 adapters over the 32 rows in random order, against the same
# batch through one adapter.
ROUTED_ADAPTERS = 8
ROUTING_TARGET = 1.03
# AdapterDrop (issue 13): adapters in the top 3 of MiniLM's 6 layers only; the blocks below run
# without an autograd graph, so the backward pass stops at layer 3.
TOP_LAYERS = [3, 4, 5]
TOP3_TARGET = 0.72  # issue 24 (was 0.70): the forward of all six layers, dropout masks included, stays
# Issue 24: the same, base in eval mode, from the second epoch on with --cache-activations (the
# input of layer 3 read from the cache, so only layers 3-5 run).
TOP3_CACHED_TARGET = 0.40
# Parallel (issue 13): 4 Pfeiffer adapters in the top half, one pass against four separate ones.
PARALLEL_ADAPTERS = 4
PARALLEL_TARGET = 0.65
# Fuse (issue 13): AdapterFusion over 3 Pfeiffer adapters at inference, against the bare model.
FUSE_TARGET = 1.35


# -- one configuration ----------------------------------------------------------------------------
@dataclass
class Case:
    """A row of the table: how to build it and what it is judged by."""

    key: str  # stable id, also the JSON name
    title: str
    mode: str  # "train" or "infer"
    library: str  # "torch", "adapterkit", "adapters", "peft"
    preset: Optional[str] = None
    target: Optional[float] = None
    yard: Optional[str] = None  # another row to be judged against (default: floor / bare model)

    @property
    def yardstick(self) -> Optional[str]:
        if self.key in ("floor", "bare"):
            return None
        if self.yard is not None:
            return self.yard
        return "floor" if self.mode == "train" else "bare"


@dataclass
class Built:
    """A built configuration: ``step()`` runs one timed step; ``model`` is what gets saved."""

    step: Callable[[], None]
    model: torch.nn.Module
    trainable: int
    base_params: int
    save: Optional[Callable[[str], None]] = None


def all_cases() -> list[Case]:
    cases = [
        Case("bare", "bare model", "infer", "torch"),
        # the same model loaded again: how far apart two copies of identical code land in this
        # run, i.e. the resolution of every inference ratio in the table
        Case("bare-copy", "bare model, second copy", "infer", "torch"),
        Case("floor", "floor (frozen, backward through all layers)", "train", "torch"),
        Case("full", "full fine-tuning", "train", "torch"),
    ]
    for preset in ("pfeiffer", "houlsby", "parallel", "lora", "ia3"):
        cases.append(Case(f"ak-{preset}-train", f"adapterkit {PRESET_TITLES[preset]}", "train", "adapterkit", preset,
                          TRAIN_TARGETS.get(preset)))
    for preset in ("pfeiffer", "lora"):
        cases.append(Case(f"ak-{preset}-top3-train", f"adapterkit {PRESET_TITLES[preset]}, top 3 layers only "
                          "(AdapterDrop)", "train", "adapterkit", preset, TOP3_TARGET))
    for preset in ("pfeiffer", "lora"):
        cases.append(Case(f"ak-{preset}-top3-train-evalbase", f"adapterkit {PRESET_TITLES[preset]}, top 3 layers only, "
                          "base in eval mode", "train", "adapterkit", preset))
        cases.append(Case(f"ak-{preset}-top3-cached-train", f"adapterkit {PRESET_TITLES[preset]}, top 3 layers only, "
                          "base in eval mode, layers 0-2 cached (epoch 2 on)", "train", "adapterkit", preset,
                          TOP3_CACHED_TARGET))
    for preset in ("pfeiffer", "houlsby", "lora"):  # train_adapter(..., base_dropout=False)
        cases.append(Case(f"ak-{preset}-train-evalbase", f"adapterkit {PRESET_TITLES[preset]}, base in eval mode",
                          "train", "adapterkit", preset))
    for preset in ("pfeiffer", "houlsby", "parallel", "lora", "lora-merged", "ia3"):
        title = "LoRA q/v merged" if preset == "lora-merged" else PRESET_TITLES[preset]
        cases.append(Case(f"ak-{preset}-infer", f"adapterkit {title}", "infer", "adapterkit", preset,
                          INFER_TARGETS.get(preset)))
    for preset in ("lora", "pfeiffer"):
        cases.append(Case(f"ak-{preset}-routed-infer", f"adapterkit {PRESET_TITLES[preset]}, {ROUTED_ADAPTERS} adapters "
                          "routed per example", "infer", "adapterkit", preset, ROUTING_TARGET, yard=f"ak-{preset}-infer"))
    cases.append(Case("ak-top-4x-infer", f"adapterkit {PARALLEL_ADAPTERS} Pfeiffer adapters in the top half, "
                      "one pass each", "infer", "adapterkit", "pfeiffer"))
    cases.append(Case("ak-parallel4-infer", f"adapterkit Parallel of {PARALLEL_ADAPTERS} Pfeiffer adapters in the top half",
                      "infer", "adapterkit", "pfeiffer", PARALLEL_TARGET, yard="ak-top-4x-infer"))
    cases.append(Case("ak-fuse3-infer", "adapterkit Fuse of 3 Pfeiffer adapters", "infer", "adapterkit", "pfeiffer",
                      FUSE_TARGET))
    if adapterhub is not None:
        for preset in ("pfeiffer", "houlsby", "parallel", "lora"):
            cases.append(Case(f"ah-{preset}-train", f"AdapterHub {PRESET_TITLES[preset]}", "train", "adapters", preset))
        for preset in ("pfeiffer", "houlsby", "parallel", "lora"):
            cases.append(Case(f"ah-{preset}-infer", f"AdapterHub {PRESET_TITLES[preset]}", "infer", "adapters", preset))
        # issue 13's blocks in AdapterHub, judged like ours (PEFT has no Fuse or Parallel)
        cases.append(Case("ah-pfeiffer-top3-train", "AdapterHub Pfeiffer, top 3 layers only (leave_out)", "train",
                          "adapters", "pfeiffer"))
        cases.append(Case("ah-top-4x-infer", f"AdapterHub {PARALLEL_ADAPTERS} Pfeiffer adapters in the top half, "
                          "one pass each", "infer", "adapters", "pfeiffer"))
        cases.append(Case("ah-parallel4-infer", f"AdapterHub Parallel of {PARALLEL_ADAPTERS} Pfeiffer adapters in the "
                          "top half", "infer", "adapters", "pfeiffer", yard="ah-top-4x-infer"))
        cases.append(Case("ah-fuse3-infer", "AdapterHub Fuse of 3 Pfeiffer adapters", "infer", "adapters", "pfeiffer"))
    if peft is not None:
        cases.append(Case("peft-lora-train", "PEFT LoRA q/v", "train", "peft", "lora"))
        cases.append(Case("peft-lora-infer", "PEFT LoRA q/v", "infer", "peft", "lora"))
        cases.append(Case("peft-lora-routed-infer", f"PEFT LoRA q/v, {ROUTED_ADAPTERS} adapters routed per example",
                          "infer", "peft", "lora", yard="peft-lora-infer"))
    return cases


# -- building ---------------------------------------------------------------------------------------
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)


def load_minilm() -> torch.nn.Module:
    folder, _ = resolve_model("minilm")
    return transformers.AutoModel.from_pretrained(folder, local_files_only=True)


def make_batch(batch: int, seq_len: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _hidden(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]  # (B, T, d)


def _train_step(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        loss = _hidden(model(**batch)).float().pow(2).mean()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _infer_step(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            model(**batch)

    return step


def routed_names(rows: int) -> list[str]:
    """``ROUTED_ADAPTERS`` adapter names spread over ``rows`` examples in a fixed random order."""
    names = [f"a{i % ROUTED_ADAPTERS}" for i in range(rows)]
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(1)).tolist()
    return [names[i] for i in order]


def _finish(case: Case, model: torch.nn.Module, batch: dict, base_params: int, save=None) -> Built:
    if case.mode == "train":
        model.train()
        step = _train_step(model, batch)
    else:
        model.eval()
        step = _infer_step(model, batch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if case.mode == "train" else 0
    return Built(step, model, trainable, base_params, save)


def build(case: Case, batch: dict) -> Built:
    base = load_minilm()
    n_base = sum(p.numel() for p in base.parameters())
    if case.library == "torch":
        if case.key in ("bare", "bare-copy"):
            return _finish(case, base, batch, n_base)
        if case.key == "full":
            return _finish(case, base, batch, n_base, save=base.save_pretrained)
        # floor: every weight frozen, but the embeddings' output asks for a gradient, so the
        # backward pass runs through all layers (input gradients only, no weight gradients).
        base.requires_grad_(False)
        base.embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        return _finish(case, base, batch, n_base)

    if case.library == "adapterkit" and case.key.endswith("-routed-infer"):
        model = AdapterModel(base)
        for i in range(ROUTED_ADAPTERS):
            model.add_adapter(f"a{i}", case.preset)
        return _finish(case, model, {**batch, "adapter_names": routed_names(batch["input_ids"].shape[0])}, n_base)

    if case.library == "peft" and case.key.endswith("-routed-infer"):
        cfg = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
        model = peft.get_peft_model(base, cfg, adapter_name="a0")
        for i in range(1, ROUTED_ADAPTERS):
            model.add_adapter(f"a{i}", cfg)
        return _finish(case, model, {**batch, "adapter_names": routed_names(batch["input_ids"].shape[0])}, n_base)

    if case.library == "adapterkit" and case.key == "ak-fuse3-infer":
        model = AdapterModel(base)
        for name in ("f0", "f1", "f2"):
            model.add_adapter(name, case.preset)
        model.add_adapter_fusion(Fuse("f0", "f1", "f2"), set_active=True)
        return _finish(case, model, batch, n_base)

    if case.library == "adapterkit" and case.key.endswith("-top3-cached-train"):
        model = AdapterModel(base)
        model.add_adapter("a", case.preset, layers=TOP_LAYERS)
        model.train_adapter("a", base_dropout=False)
        cache = ActivationCache(model, "a", tempfile.gettempdir(), budget_bytes=2**30)  # in memory: never spills
        built = _finish(case, CachedForward(model, cache), batch, n_base, save=lambda d: model.save_adapter(d, "a"))
        built.step()  # epoch 1: the whole model runs, layer 3's input is kept
        built.step()  # the first cached step is checked against the whole model once
        return built

    if case.library == "adapterkit" and case.key in ("ak-top-4x-infer", "ak-parallel4-infer"):
        model = AdapterModel(base)
        names = [f"p{i}" for i in range(PARALLEL_ADAPTERS)]
        for name in names:
            model.add_adapter(name, case.preset, layers=TOP_LAYERS)
        return _parallel_or_each(case, model, batch, n_base, model.set_active_adapters, names, Parallel(*names))

    if case.library == "adapterkit":
        model = AdapterModel(base)
        preset = "lora" if case.preset == "lora-merged" else case.preset
        model.add_adapter("a", preset, **({"layers": TOP_LAYERS} if "-top3-" in case.key else {}))
        if case.mode == "train":
            # base dropout on, like the floor and AdapterHub, except in the "-evalbase" rows
            # (``base_dropout=False``: the frozen base run as at inference)
            model.train_adapter("a", base_dropout=not case.key.endswith("-evalbase"))
        else:
            model.set_active_adapters("a")
            if case.preset == "lora-merged":
                model.merge_adapter("a")
        return _finish(case, model, batch, n_base, save=lambda d: model.save_adapter(d, "a"))

    if case.library == "adapters" and case.key in ("ah-fuse3-infer", "ah-top-4x-infer", "ah-parallel4-infer"):
        return _build_adapterhub_block(case, base, batch, n_base)

    if case.library == "adapters":
        adapterhub.init(base)
        if case.key.endswith("-top3-train"):
            base.add_adapter("a", config=adapterhub.SeqBnConfig(
                leave_out=[i for i in range(base.config.num_hidden_layers) if i not in TOP_LAYERS]))
            base.train_adapter("a")
            return _finish(case, base, batch, n_base)
        base.add_adapter("a", config=AH_CONFIGS[case.preset])
        if case.mode == "train":
            base.train_adapter("a")
        else:
            base.set_active_adapters("a")
        return _finish(case, base, batch, n_base, save=lambda d: base.save_adapter(d, "a", use_safetensors=True))

    if case.library == "peft":
        cfg = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
        model = peft.get_peft_model(base, cfg)
        return _finish(case, model, batch, n_base, save=model.save_pretrained)
    raise ValueError(case.library)


class CachedForward(torch.nn.Module):
    """``model(**batch)`` with layers 0-2 served from an ``ActivationCache`` (one batch, key 0),
    as every step of ``--cache-activations`` training after the first epoch."""

    def __init__(self, model: AdapterModel, cache: ActivationCache):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, **batch):
        return self.cache.run(self.model, batch, 0)


def _build_adapterhub_block(case: Case, base: torch.nn.Module, batch: dict, n_base: int) -> Built:
    """AdapterHub's ``Fuse`` of 3 Pfeiffer adapters, and ``Parallel`` of 4 in the top half against
    the same 4 adapters one pass each (``leave_out`` the lower half)."""
    from adapters.composition import Fuse as AHFuse, Parallel as AHParallel

    adapterhub.init(base)
    if case.key == "ah-fuse3-infer":
        names = ["f0", "f1", "f2"]
        for name in names:
            base.add_adapter(name, config=AH_CONFIGS[case.preset])
        base.add_adapter_fusion(AHFuse(*names))
        base.set_active_adapters(AHFuse(*names))
        return _finish(case, base, batch, n_base)
    names = [f"p{i}" for i in range(PARALLEL_ADAPTERS)]
    lower = [i for i in range(base.config.num_hidden_layers) if i not in TOP_LAYERS]
    for name in names:
        base.add_adapter(name, config=adapterhub.SeqBnConfig(leave_out=lower))
    return _parallel_or_each(case, base, batch, n_base, base.set_active_adapters, names, AHParallel(*names))


def _parallel_or_each(case: Case, model: torch.nn.Module, batch: dict, n_base: int,
                      activate: Callable[[object], None], names: list[str], parallel: object) -> Built:
    """The ``Parallel`` row (``parallel`` active), or its yardstick: the same adapters, one
    forward pass each."""
    if case.key.endswith("parallel4-infer"):
        activate(parallel)
        return _finish(case, model, batch, n_base)
    built = _finish(case, model, batch, n_base)
    one = built.step

    def each() -> None:
        for name in names:
            activate(name)
            one()

    built.step = each
    return built


def saved_size(built: Built) -> Optional[int]:
    """Bytes on disk of what the library's own save writes (adapter-only for adapters)."""
    if built.save is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        built.save(tmp)
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


# -- memory -------------------------------------------------------------------------------------------
def step_peak_mb(step: Callable[[], None]) -> float:
    """Peak of the tensor memory a step allocates on top of what exists before it, in MiB.

    torch's profiler records every CPU tensor allocation and free (``profile_memory=True``);
    summed in time order they give the live bytes of the step, and the largest value is its peak:
    activations kept for the backward pass, gradients, optimizer temporaries. Weights and the
    optimizer state that outlive the step (created by the warm-up step) are not counted. It is
    exact and repeatable, unlike the process's resident set, which moves by +-5 % from run to run
    with malloc's caching and would drown the differences between libraries.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak / 2**20


# -- timing -------------------------------------------------------------------------------------------
@dataclass
class Sample:
    wall: float  # seconds
    cpu: float  # CPU seconds of this process (all its threads)
    others: float  # CPU the rest of the machine used meanwhile, as a share of all cores

    def quiet(self, threshold: float) -> bool:
        return self.others <= threshold


class CpuMonitor:
    """Times a step and tells how busy the rest of the machine was meanwhile, from the kernel's
    CPU counters (``/proc/stat``: busy = everything but idle and iowait, steal included) minus
    this process's own CPU time. Where /proc/stat is missing, every sample counts as quiet."""

    def __init__(self):
        self.cores = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy(self) -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / self.tick

    def time(self, step: Callable[[], None]) -> Sample:
        busy0, cpu0, wall0 = self._busy(), time.process_time(), time.perf_counter()
        step()
        wall, cpu, busy1 = time.perf_counter() - wall0, time.process_time() - cpu0, self._busy()
        others = 0.0 if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - cpu) / (wall * self.cores)
        return Sample(wall, cpu, others)


def summarise(samples: list[Sample], args) -> dict:
    """Medians over the quiet samples; when fewer than 3 were quiet, over the ``repeats``
    quietest ones (``worst_used`` then says how busy the machine was in the worst of them)."""
    quiet = [s for s in samples if s.quiet(args.quiet_limit)]
    use = quiet if len(quiet) >= min(3, args.repeats) else sorted(samples, key=lambda s: s.others)[: args.repeats]
    return {"wall": statistics.median(s.wall for s in use), "cpu": statistics.median(s.cpu for s in use),
            "quiet": len(quiet), "worst_used": max(s.others for s in use)}


# -- the run --------------------------------------------------------------------------------------
def environment() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    if adapterhub is not None:
        info["adapters"] = adapterhub.__version__
    if peft is not None:
        info["peft"] = peft.__version__
    return info


def run(args) -> list[dict]:
    cases = all_cases()
    if args.only:
        keep = re.compile(args.only)
        wanted = {c.key for c in cases if c.key in ("bare", "bare-copy", "floor") or keep.search(c.key)}
        wanted |= {c.yard for c in cases if c.key in wanted and c.yard}
        cases = [c for c in cases if c.key in wanted]
    print(f"# {len(cases)} configurations, batch {args.batch} x {args.seq_len}, {args.repeats} quiet samples each "
          f"(at most {args.max_rounds} rounds); {environment()}", file=sys.stderr)

    torch.manual_seed(0)
    vocab = load_minilm().config.vocab_size
    batch = make_batch(args.batch, args.seq_len, vocab)
    built = {}
    for case in cases:
        built[case.key] = build(case, batch)
    sizes = {key: saved_size(b) for key, b in built.items()}
    memory = {}
    if not args.no_memory:
        for case in cases:
            if case.mode == "train":
                built[case.key].step()  # warm-up: the optimizer state exists before the measured step
                memory[case.key] = step_peak_mb(built[case.key].step)

    samples: dict[str, list[Sample]] = {c.key: [] for c in cases}
    train = [c for c in cases if c.mode == "train"]
    infer = [c for c in cases if c.mode == "infer"]
    monitor = CpuMonitor()
    rounds = 0
    try:
        while rounds < args.warmup + args.max_rounds:
            # one round: every training configuration once, then every inference configuration
            # ``infer_per_round`` times (they are short), always in the same alternating order
            for case in train + infer * args.infer_per_round:
                gc.collect()
                sample = monitor.time(built[case.key].step)
                if rounds >= args.warmup:
                    samples[case.key].append(sample)
            rounds += 1
            if rounds > args.warmup:
                quiet = {k: sum(s.quiet(args.quiet_limit) for s in v) for k, v in samples.items()}
                print(f"  round {rounds - args.warmup}: quiet samples "
                      + ", ".join(f"{k} {n}" for k, n in quiet.items()) + " | last: "
                      + ", ".join(f"{k} {v[-1].wall:.3f}{'' if v[-1].quiet(args.quiet_limit) else '*'}"
                                  for k, v in samples.items()), file=sys.stderr)
                if rounds - args.warmup >= args.repeats and min(quiet.values()) >= args.repeats:
                    break
    except KeyboardInterrupt:  # Ctrl-C (or kill -INT): summarise the complete rounds so far
        print(f"  interrupted: using the {rounds - args.warmup} complete rounds", file=sys.stderr)
        done = max(0, rounds - args.warmup)
        samples = {k: v[: done * (args.infer_per_round if k in {c.key for c in infer} else 1)]
                   for k, v in samples.items()}
        if done == 0:
            raise

    stats = {key: summarise(v, args) for key, v in samples.items()}
    medians = {key: st["wall"] for key, st in stats.items()}
    rows = []
    for case in cases:
        b = built[case.key]
        yard = case.yardstick
        ratio = medians[case.key] / medians[yard] if yard else None
        cpu_ratio = stats[case.key]["cpu"] / stats[yard]["cpu"] if yard else None
        ok = None if case.target is None or ratio is None else ratio <= case.target
        ref_mem = memory.get(f"ah-{case.preset}-train") if case.library == "adapterkit" else None
        mem = memory.get(case.key)
        rows.append({
            "name": case.key,
            "title": case.title,
            "mode": case.mode,
            "value": medians[case.key],
            "unit": "s",
            "ratio": ratio,
            "yardstick": yard,
            "target": case.target,
            "pass": ok,
            "peak_mb": mem,
            "memory_target_mb": ref_mem,
            "memory_pass": None if mem is None or ref_mem is None else mem <= ref_mem,
            "trainable": b.trainable,
            "trainable_pct": 100.0 * b.trainable / b.base_params,
            "file_bytes": sizes[case.key],
            "cpu_s": stats[case.key]["cpu"],
            "cpu_ratio": cpu_ratio,
            "quiet_samples": stats[case.key]["quiet"],
            "busiest_sample_used": stats[case.key]["worst_used"],
            "samples": [round(x.wall, 4) for x in samples[case.key]],
            "others_busy": [round(x.others, 3) for x in samples[case.key]],
        })
    return rows


def markdown(rows: list[dict]) -> str:
    """The table: ratios are to the floor for training rows and to the bare model for inference."""
    head = ("| configuration | step | median s | ratio | target | pass | peak step MiB (AdapterHub) "
            "| trainable % | file KiB | quiet samples |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.3f} × {r['yardstick']}"
        target = "—" if r["target"] is None else f"≤ {r['target']:.3f}"
        verdict = "—" if r["pass"] is None else ("pass" if r["pass"] else "**FAIL**")
        memory = "—" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        if r["memory_pass"] is not None:
            memory += f" ({'≤' if r['memory_pass'] else '**>**'} {r['memory_target_mb']:.1f})"
        train = r["mode"] == "train"
        share = f"{r['trainable_pct']:.3f}" if train else "—"
        size = f"{r['file_bytes'] / 1024:.1f}" if train and r["file_bytes"] is not None else "—"
        lines.append(f"| {r['title']} | {r['mode']} | {r['value']:.3f} | {ratio} | {target} | {verdict} | {memory} "
                     f"| {share} | {size} | {r['quiet_samples']}/{len(r['samples'])} |")
    return "\n".join(lines)


LOAD_JOB = """
import torch, transformers
from adapterkit.packaged import resolve_model
torch.set_num_threads(1)
folder, _ = resolve_model("minilm")
model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
ids = torch.randint(1000, model.config.vocab_size, (16, 128))
while True:
    model(input_ids=ids)[0].pow(2).mean().backward()
    opt.step(); opt.zero_grad()
"""


def start_load():
    """Another training job on the machine, as a separate process (killed when the bench ends)."""
    import subprocess

    return subprocess.Popen([sys.executable, "-c", LOAD_JOB], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7,
                   help="quiet samples wanted per configuration (a round runs every configuration once)")
    p.add_argument("--max-rounds", type=int, help="stop after this many rounds even if too few were quiet "
                   "(default: 3 x repeats)")
    p.add_argument("--quiet", type=float, default=0.05, metavar="SHARE",
                   help="a sample is quiet when other processes used at most this share of all cores meanwhile "
                   "(plus the cores that --threads leaves free)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    p.add_argument("--infer-per-round", type=int, default=3,
                   help="inference configurations run this many times per round (A B C A B C ...)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON lines to FILE")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 4 x 32 tokens, 3 rounds")
    p.add_argument("--only", metavar="REGEX", help="only configurations whose key matches (plus bare and floor)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--load", action="store_true",
                   help="run another training job (MiniLM forward + backward, 1 thread) beside the bench for the "
                   "whole run, and count every sample: the 'under load' measurement")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.repeats = 4, 32, 3
    if args.max_rounds is None:
        args.max_rounds = 3 * args.repeats

    if args.threads:
        torch.set_num_threads(args.threads)
    # cores that torch's threads leave free may be busy without slowing the step down
    cores = os.cpu_count() or 1
    args.quiet_limit = args.quiet + max(0, cores - torch.get_num_threads()) / cores
    started = datetime.datetime.now().astimezone()
    load = start_load() if args.load else None
    if load is not None:
        args.quiet_limit = 1.0
    try:
        rows = run(args)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    env = environment()
    what = ("under load (another training job running), medians of all samples" if args.load
            else f"medians of the quiet samples (others <= {args.quiet_limit:.0%} of the cores)")
    print(f"all-MiniLM-L6-v2, batch {args.batch} x {args.seq_len} tokens; {what}; {started:%Y-%m-%d %H:%M %Z}; " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print()
    print(markdown(rows))
    failed = [r["name"] for r in rows if r["pass"] is False or r["memory_pass"] is False]
    print()
    print("targets missed: " + (", ".join(failed) if failed else "none"))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "batch": args.batch, "seq_len": args.seq_len, "quiet_limit": args.quiet_limit,
                                    "date": started.isoformat(timespec="seconds"), **env}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
