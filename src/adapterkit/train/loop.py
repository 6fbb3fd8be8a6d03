"""The training loop: from a ``TrainConfig`` to a run folder with the best adapter.

``prepare(config)`` does everything that can fail on bad input (files, columns, labels, model,
method options, tokenisation) and writes nothing. ``fit(prepared, out)`` then trains:

* AdamW over the trainable parameters, linear warm-up then decay (``optim.lr_at``), gradient
  clipping, optional gradient accumulation (``micro_batch_size``);
* global batches in a seeded order (``batches``), split over ``torchrun`` processes with DDP;
* evaluation after every epoch (and every ``eval_every`` steps), the best adapter kept by the
  task's metric, optional early stopping;
* a resumable checkpoint every ``save_every`` steps and after every evaluation; resuming replays
  the remaining steps exactly (same order, same RNG, same optimizer state), so the adapter equals
  that of an uninterrupted run;
* ``metrics.jsonl``, ``training.png``, ``results.json``; only rank 0 writes;
* with ``cache_activations``, the frozen blocks below the adapter run once per batch
  (``activation_cache``), over the same batches every epoch (``fixed_batches``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .._version import __version__
from ..checkpoint_format import adapter_size_bytes, temp_dir
from ..composition.adapterdrop import AdapterDrop
from ..config import AdapterConfig
from ..data import (
    LM_TASKS,
    Encoded,
    Table,
    TaskSpec,
    build_task,
    check_eval_labels,
    check_same_columns,
    default_name,
    detect_columns,
    encode,
    read_table,
)
from ..data.audio import folder_fingerprint, is_audio_folder, load_feature_extractor, read_split
from ..data.ctc import clip_frames, read_ctc_split, transcripts_fingerprint
from ..data.task import Columns
from ..errors import AdapterError, CheckpointError
from ..fingerprint import base_identity
from ..layouts import spec_for
from ..layouts.inputs import min_samples
from ..methods.base import step_listeners, tell_step
from ..loader import check_max_length, load_config, load_tokenizer, max_positions, model_is_decoder
from ..model import AdapterModel
from . import checkpoint as ckpt
from . import distributed as D
from .activation_cache import CACHE_PREFIX, ActivationCache, cache_cut
from .artifacts import reads_audio, write_base_ref
from .batches import collate, epoch_batches, fixed_epoch_batches, micro_batches, shard, units
from .config import TrainConfig
from .evaluate import evaluate
from .metrics import LOWER_IS_BETTER, MetricsLog, better, metric_names, primary_metric
from .optim import loraplus, lr_at, make_optimizer, set_lr, trainable, warmup_steps
from .plots import plot_training
from .progress import Progress
from .runlock import LOCK_NAME, RunLock

Echo = Callable[[str], None]


@dataclass
class Prepared:
    """Everything a run needs, validated; nothing written yet."""

    config: TrainConfig
    spec: TaskSpec
    name: str
    model: AdapterModel
    tokenizer: Any
    train: Encoded
    eval: Optional[Encoded]
    test: Optional[Encoded]
    env: D.DistEnv
    adapter_config: Optional[AdapterConfig]
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)  # a feature extractor (audio) has none
        return int(pad) if pad is not None else 0


# -- preparing ---------------------------------------------------------------------------------------
def _subset(table: Table, n: Optional[int], seed: int) -> Table:
    """``n`` rows picked by a permutation with a fixed seed (the same rows whatever ``--seed``)."""
    if n is None or n >= len(table):
        return table
    keep = sorted(torch.randperm(len(table), generator=torch.Generator().manual_seed(seed)).tolist()[:n])
    return Table(table.path, table.format, table.columns, [table.rows[i] for i in keep], [table.lines[i] for i in keep])


def _split(table: Table, fraction: float) -> tuple[Table, Table]:
    perm = torch.randperm(len(table), generator=torch.Generator().manual_seed(1)).tolist()
    n_val = max(1, int(round(fraction * len(table))))
    if n_val >= len(table):
        raise AdapterError(f"{table.path}: --val-fraction {fraction} leaves no training rows; lower it.")
    val, keep = sorted(perm[:n_val]), sorted(perm[n_val:])
    pick = lambda idx: Table(table.path, table.format, table.columns, [table.rows[i] for i in idx],  # noqa: E731
                             [table.lines[i] for i in idx])
    return pick(keep), pick(val)


def prepare(config: TrainConfig, env: Optional[D.DistEnv] = None, echo: Optional[Echo] = None) -> Prepared:
    """Validate and load everything; raises ``AdapterError`` (bad input) before writing anything."""
    env = env or D.DistEnv()
    echo = echo or (lambda _msg: None)
    config.validate()
    if config.task == "ctc":  # speech recognition: a TSV of clip paths and transcripts (data/ctc.py)
        return _prepare_ctc(config, env)
    if is_audio_folder(config.train):  # a folder of WAV files, one subfolder per label (data/audio.py)
        return _prepare_audio(config, env)
    if reads_audio(config.model):
        raise AdapterError(f"'{config.model}' is a speech model, and --train {config.train} is a file: pass a folder of "
                           "WAV files with one subfolder per label (classification), or --task ctc with a TSV of "
                           "path<TAB>transcript lines (speech recognition).")
    train_table = read_table(config.train, config.format)
    eval_table = read_table(config.eval, config.format) if config.eval else None
    test_table = read_table(config.test, config.format) if config.test else None
    decoder = model_is_decoder(config.model)
    columns = detect_columns(
        train_table, text=config.text_column, text_pair=config.text_pair_column, label=config.label_column,
        prompt=config.prompt_column, completion=config.completion_column, task=config.task,
    )
    spec = build_task(train_table, columns, config.task, decoder=decoder, label_sep=config.label_sep,
                      max_length=config.max_length, template=config.template, verbalizer=config.verbalizer)
    check_metric(config, spec)
    for table in (eval_table, test_table):
        if table is not None:
            check_same_columns(spec, table, train_table)
            check_eval_labels(spec, table)
    check_max_length(config.model, config.max_length)
    adapter_config = None if config.full_finetune else config.adapter_config()
    if config.loraplus_lr_ratio is not None and getattr(adapter_config, "method", None) != "lora":
        raise AdapterError(f"--loraplus-lr-ratio applies to LoRA's B matrices, and this run trains "
                           f"{'all weights' if adapter_config is None else adapter_config.method}; "
                           "drop the flag or use --method lora.")
    name = config.name or default_name(config.train)
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise AdapterError(f"--name '{name}' is invalid: use letters, digits, '_' and '-' only.")
    data = {"train": _fingerprint(train_table), "eval": _fingerprint(eval_table), "test": _fingerprint(test_table)}
    train_table = _subset(train_table, config.max_train_rows, 0)
    if config.val_fraction:
        train_table, eval_table = _split(train_table, config.val_fraction)
    if eval_table is not None:
        eval_table = _subset(eval_table, config.max_eval_rows, 0)
    tokenizer = load_tokenizer(config.model)
    train_enc = encode(spec, train_table, tokenizer)
    eval_enc = encode(spec, eval_table, tokenizer) if eval_table is not None else None
    test_enc = encode(spec, test_table, tokenizer) if test_table is not None else None
    if train_enc.dropped:
        echo(f"note: {train_enc.dropped} training rows have no target token within --max-length {config.max_length}; skipped.")
    torch.manual_seed(config.seed)
    model = AdapterModel.from_pretrained(config.model, quantize=config.quantize)
    _check_bottleneck_width(adapter_config, model.layout.hidden_size)
    _check_prompt_room(adapter_config, config.max_length, config.model, model.config)
    setup_model(model, spec, name, config, adapter_config)
    if config.cache_activations:
        cache_cut(model, name)  # refused here, before the run folder is written
    torch.manual_seed(config.seed + 1000 * env.rank)  # dropout differs per process, as with a larger batch
    data["rows"] = {"train": len(train_enc), "eval": len(eval_enc) if eval_enc else 0, "test": len(test_enc) if test_enc else 0}
    return Prepared(config, spec, name, model, tokenizer, train_enc, eval_enc, test_enc, env, adapter_config, data)


def _speech_start(config: TrainConfig, what: str) -> tuple[Any, str, Any, AdapterModel, int]:
    """What both speech tasks begin with: the adapter config, the run name, a check that the model
    reads speech (``what`` names the data in the message), its feature extractor, the model (seeded
    for the head's initialisation) and the shortest clip it accepts, in samples."""
    adapter_config = None if config.full_finetune else config.adapter_config()
    name = _run_name(config)
    _check_speech_model(config, what)
    extractor = load_feature_extractor(config.model)
    torch.manual_seed(config.seed)
    model = AdapterModel.from_pretrained(config.model, quantize=config.quantize)
    return adapter_config, name, extractor, model, min_samples(model.model)


def _speech_finish(config: TrainConfig, env: D.DistEnv, spec: TaskSpec, name: str, model: AdapterModel, extractor: Any,
                   adapter_config: Any, train: Any, splits: dict, fingerprint: Callable[[str], Any]) -> Prepared:
    """What both speech tasks end with: the metric and width checks, the adapter and head, the
    activation cache's cut, the data's fingerprints (``fingerprint`` of each split's path) and row counts."""
    check_metric(config, spec)
    _check_bottleneck_width(adapter_config, model.layout.hidden_size)
    setup_model(model, spec, name, config, adapter_config)
    if config.cache_activations:
        cache_cut(model, name)
    torch.manual_seed(config.seed + 1000 * env.rank)
    data = {k: fingerprint(getattr(config, k)) if getattr(config, k) else None for k in ("train", "eval", "test")}
    data["rows"] = {"train": len(train), "eval": len(splits["eval"] or []), "test": len(splits["test"] or [])}
    return Prepared(config, spec, name, model, extractor, train, splits["eval"], splits["test"], env, adapter_config,
                    data)


def _prepare_audio(config: TrainConfig, env: D.DistEnv) -> Prepared:
    """``prepare`` for audio classification folders: the clips of each split, read and
    normalised by the model's feature extractor, the labels from the subfolder names."""

    adapter_config, name, extractor, model, shortest = _speech_start(config, "a folder of audio clips")
    train, labels = read_split(config.train, None, extractor, shortest)
    splits = {k: read_split(getattr(config, k), labels, extractor, shortest)[0] if getattr(config, k) else None
              for k in ("eval", "test")}
    train, splits["eval"] = _hold_out(train.subset(_subset_rows(len(train), config.max_train_rows)),
                                      config.val_fraction, splits["eval"])
    spec = TaskSpec("classification", Columns(text="audio", label="label"), labels=labels)
    return _speech_finish(config, env, spec, name, model, extractor, adapter_config, train, splits, folder_fingerprint)


def _prepare_ctc(config: TrainConfig, env: D.DistEnv) -> Prepared:
    """``prepare`` for speech recognition (``--task ctc``): TSVs of ``path<TAB>transcript``
    (``data/ctc.py``), the character vocabulary of the training transcripts, a CTC head."""
    if is_audio_folder(config.train):
        raise AdapterError(f"--task ctc reads a TSV of path<TAB>transcript lines, and --train {config.train} is a "
                           "folder; pass the TSV, or drop --task ctc to classify the folder's label subfolders.")
    adapter_config, name, extractor, model, shortest = _speech_start(config, "speech for --task ctc")
    frames = clip_frames(model.model)
    train, vocab = read_ctc_split(config.train, None, extractor, shortest, frames)
    splits = {k: read_ctc_split(getattr(config, k), vocab, extractor, shortest, frames)[0] if getattr(config, k) else None
              for k in ("eval", "test")}
    train, splits["eval"] = _hold_out(train.subset(_subset_rows(len(train), config.max_train_rows)),
                                      config.val_fraction, splits["eval"])
    spec = TaskSpec("ctc", Columns(text="path", label="text"), labels=list(vocab.tokens))
    return _speech_finish(config, env, spec, name, model, extractor, adapter_config, train, splits,
                          transcripts_fingerprint)


def _run_name(config: TrainConfig) -> str:
    name = config.name or default_name(Path(config.train).resolve())  # data/speech/train -> speech
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise AdapterError(f"--name '{name}' is invalid: use letters, digits, '_' and '-' only.")
    return name


def _check_speech_model(config: TrainConfig, what: str) -> None:
    model_config = load_config(config.model)
    spec = spec_for(model_config)
    if spec is None or spec.modality != "audio":
        raise AdapterError(f"--train {config.train} is {what}, but '{config.model}' is a "
                           f"{model_config.model_type} model that reads {spec.modality if spec else 'text'}; pass a "
                           "speech model folder (wav2vec2, HuBERT, WavLM) with its preprocessor_config.json.")


def _hold_out(train: Any, fraction: Optional[float], eval_set: Any) -> tuple[Any, Any]:
    """``--val-fraction`` of audio data: that share of the training clips becomes the eval split."""
    if not fraction:
        return train, eval_set
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(1)).tolist()
    n_val = max(1, int(round(fraction * len(train))))
    return train.subset(sorted(perm[n_val:])), train.subset(sorted(perm[:n_val]))


def check_metric(config: TrainConfig, spec: TaskSpec) -> None:
    """``--metric`` must be one the task computes (checked before the run folder exists)."""
    known = metric_names(spec)
    if config.metric is not None and config.metric not in known:
        raise AdapterError(f"--metric {config.metric} is not computed for {spec.task}; choose one of {', '.join(known)}.")


def _subset_rows(n: int, limit: Optional[int]) -> list[int]:
    """The rows ``_subset`` keeps of ``n`` (all without a limit)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()[:limit])


def _check_bottleneck_width(adapter_config: Optional[AdapterConfig], hidden: Optional[int]) -> None:
    """``--reduction-factor`` above the hidden size would leave a bottleneck of width 0, which the
    method clamps to 1 (so that presets work on toy models): a user who asked for it is told."""
    factor = getattr(adapter_config, "reduction_factor", None)
    if factor is None or getattr(adapter_config, "bottleneck_dim", None) is not None or not hidden:
        return
    if hidden // factor < 1:
        raise AdapterError(f"--reduction-factor {factor:g} is larger than the hidden size {hidden}: the bottleneck "
                           f"would be empty; use --reduction-factor {hidden} or less, or --bottleneck-dim.")


def _check_prompt_room(adapter_config: Optional[AdapterConfig], max_length: int, name: str, base_config: Any) -> None:
    """A prompt (prompt tuning, the P-adapter) takes positions from the input: refuse a
    ``--max-length`` that would not fit beside it before anything runs."""
    prompt = getattr(adapter_config, "prompt_length", None)
    limit = max_positions(base_config)
    if prompt is None or limit is None or prompt + max_length <= limit or prompt >= limit:
        return  # prompt >= limit: add_adapter names the problem itself
    raise AdapterError(f"--max-length {max_length} plus the prompt's {prompt} positions is more than '{name}' can take "
                       f"({limit} positions); pass --max-length {limit - prompt} or less, or a shorter prompt_length.")


def _fingerprint(table: Optional[Table]) -> Optional[dict[str, Any]]:
    if table is None:
        return None
    return {"path": str(Path(table.path).resolve()), "sha256": ckpt.file_sha256(table.path), "rows": len(table)}


def add_head(model: AdapterModel, name: str, spec: TaskSpec, *, pooling: str = "auto", layers: int = 2,
             dropout: float = 0.1) -> None:
    """The task's head, named like the adapter (``add_*_head``, with its dropout);
    none for the tasks the LM's own output layer learns (``LM_TASKS``)."""
    if spec.task in LM_TASKS:
        return
    id2label = dict(enumerate(spec.labels))
    if spec.task == "ctc":  # the vocabulary's blank is <pad>, id 0 (data/ctc.py)
        model.add_ctc_head(name, len(spec.labels), blank=0, layers=1 if layers == 2 else layers, dropout=dropout,
                           id2label=id2label, overwrite=True)
    elif spec.task == "tagging":
        model.add_tagging_head(name, len(spec.labels), layers=1 if layers == 2 else layers, dropout=dropout,
                               id2label=id2label, overwrite=True)
    elif spec.task == "regression":
        model.add_regression_head(name, 1, layers=layers, pooling=pooling, dropout=dropout, overwrite=True)
    else:
        model.add_classification_head(name, len(spec.labels), layers=layers, pooling=pooling,
                                      multilabel=spec.task == "multilabel", id2label=id2label, dropout=dropout,
                                      overwrite=True)


def setup_model(model: AdapterModel, spec: TaskSpec, name: str, config: TrainConfig,
                adapter_config: Optional[AdapterConfig]) -> None:
    if config.full_finetune:
        add_head(model, name, spec, pooling=config.pooling, layers=config.head_layers, dropout=config.head_dropout)
        model.model.requires_grad_(False)
        # the backbone only: a causal LM's output layer gets no gradient from a task head
        target = model.model if spec.task in LM_TASKS else getattr(model.model, "base_model", model.model)
        target.requires_grad_(True)
        model.heads.requires_grad_(True)
        model.train()
        return
    assert adapter_config is not None
    model.add_adapter(name, adapter_config)
    add_head(model, name, spec, pooling=config.pooling, layers=config.head_layers, dropout=config.head_dropout)
    model.train_adapter(name, base_dropout=config.base_dropout)


def parameter_counts(model: AdapterModel) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.heads.parameters())
    return {"total": total, "trainable": train, "head": head, "base": sum(p.numel() for p in model.model.parameters())}


# -- the run folder ----------------------------------------------------------------------------------
def _entries(out: Path) -> list[Path]:
    """What a folder holds, apart from the run lock."""
    return [p for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """``--out`` must be new or empty; ``--overwrite`` replaces only a run folder (one with
    ``run.json``), never a folder of other files (checked before anything is written)."""
    if out.exists() and not out.is_dir():
        raise AdapterError(f"--out {out} is a file; pass a folder path.")
    if resume or not _entries(out):
        return
    if (out / ckpt.RUN_FILE).is_file():
        if not overwrite:
            finished = '"status": "finished"' in (out / ckpt.RUN_FILE).read_text(encoding="utf-8", errors="replace")
            what = "a finished run" if finished else f"a run (continue it with --resume {out})"
            raise AdapterError(f"--out {out} is not empty: it holds {what}; choose a new folder or pass --overwrite to "
                               "replace the run.")
        return
    shown = ", ".join(sorted(p.name for p in _entries(out))[:4])
    raise AdapterError(f"--out {out} is not empty and is not a run folder (it holds {shown}, no {ckpt.RUN_FILE}); "
                       "choose a new or empty folder. --overwrite replaces only an earlier run, never other files.")


def read_run(out: Path) -> dict[str, Any]:
    """``run.json`` of a run folder, for ``--resume`` (``AdapterError`` when there is no run)."""
    path = out / ckpt.RUN_FILE
    if not out.is_dir():
        raise AdapterError(f"--resume {out}: no such folder; pass the --out folder of the run to continue.")
    if not path.is_file():
        raise AdapterError(f"--resume {out}: the folder holds no run (no {ckpt.RUN_FILE}); pass the --out folder of "
                           "an adapterkit train run, or start a new run with --out.")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt ({err}); the run cannot be resumed, start it again.") from None
    if run.get("status") == "finished":
        raise AdapterError(f"--resume {out}: that run has finished already (see {out / 'results.json'}); "
                           "start a new run with --out to train more.")
    return run


def check_same_data(run: dict[str, Any], prep: Prepared, out: Path) -> None:
    for split in ("train", "eval", "test"):
        old, new = run.get("data", {}).get(split), prep.data.get(split)
        if old and new and old["sha256"] != new["sha256"]:
            raise AdapterError(f"--resume {out}: {new['path']} changed since the run started; a resumed run needs the "
                               "same data. Restore the file or start a new run.")


# -- training ------------------------------------------------------------------------------------------
class _Runner:
    def __init__(self, prep: Prepared, out: Path, echo: Echo, progress: Progress):
        self.prep, self.out, self.echo, self.progress = prep, out, echo, progress
        self.cfg, self.spec, self.env = prep.config, prep.spec, prep.env
        self.model = prep.model
        self.listeners = step_listeners(self.model)  # e.g. prefix tuning's MLP warm-up; the setup is fixed now
        self.device = torch.device("cuda", self.env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        self.model.to(self.device)
        self.names = [n for n, _ in trainable(self.model)]
        self.params = [p for _, p in trainable(self.model)]
        self.optimizer = make_optimizer(self.model, self.cfg.learning_rate, self.cfg.weight_decay,
                                        loraplus(self.cfg.loraplus_lr_ratio))
        self.metric = self.cfg.metric or primary_metric(self.spec)
        known = metric_names(self.spec)
        if self.metric not in known:
            raise AdapterError(f"--metric {self.metric} is not computed for {self.spec.task}; choose one of {', '.join(known)}.")
        self.lengths = prep.train.lengths()
        self.steps_per_epoch = len(epoch_batches(self.lengths, self.cfg.batch_size, self.cfg.seed, 1,
                                                 group_by_length=self.cfg.group_by_length))
        total = self.cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, self.cfg.max_steps) if self.cfg.max_steps else total
        self.warmup = warmup_steps(self.cfg.warmup, self.total_steps)
        self.log = MetricsLog(out / "metrics.jsonl", enabled=self.env.is_main)
        # window_loss / window_n: the training losses since the last metrics.jsonl record, kept in the
        # checkpoint so that a run resumed between two records writes the same records
        self.state: dict[str, Any] = {"step": 0, "epoch": 1, "batch": 0, "best": None, "best_step": None,
                                      "window_loss": 0.0, "window_n": 0,
                                      "bad_evals": 0, "stopped_early": False, "elapsed": 0.0, "last_eval_step": None}
        self.best: Optional[dict[str, torch.Tensor]] = None
        self.saved_step: Optional[int] = None  # the step of the checkpoint on disk
        self.eval_batch = self.cfg.eval_batch_size or max(64, 2 * self.cfg.batch_size)
        self.drop = AdapterDrop(self.cfg.adapter_drop, self.cfg.seed) if self.cfg.adapter_drop else None
        self.cache: Optional[ActivationCache] = None  # made by run(), in the run folder

    def epoch_plan(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """This epoch's global batches and their ids (the cache's keys)."""
        cfg = self.cfg
        if cfg.same_batches_every_epoch:
            return fixed_epoch_batches(self.lengths, cfg.batch_size, cfg.seed, epoch, group_by_length=cfg.group_by_length)
        batches = epoch_batches(self.lengths, cfg.batch_size, cfg.seed, epoch, group_by_length=cfg.group_by_length)
        return batches, list(range(len(batches)))

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.env.is_main:
            state = {**self.state, "log_offset": self.log.offset(), "log_count": self.log.count(),
                     "elapsed": self.elapsed()}
            ckpt.save_state(self.out / "checkpoint", self.model, self.optimizer, state, self.best)
        self.saved_step = self.state["step"]

    def restore(self) -> bool:
        if self.env.is_main:
            for name in ("checkpoint", "adapter", "model", ckpt.RUN_FILE, "results.json", "training.png"):
                ckpt.clean_leftovers(self.out / name)
            for name in ("checkpoint", "adapter", "model"):
                found = ckpt.existing_dir(self.out / name)
                if found is not None and found != self.out / name:  # died between the two renames
                    os.replace(found, self.out / name)
            for path in [*self.out.glob(".adapter.staging-*"), *self.out.glob(CACHE_PREFIX + "*")]:
                shutil.rmtree(path, ignore_errors=True)
        D.barrier(self.env)
        if ckpt.existing_dir(self.out / "checkpoint") is None:
            self.log.truncate(0, 0)
            return False
        state, best = ckpt.load_state(self.out / "checkpoint", self.model, self.optimizer)
        self.log.truncate(state.pop("log_offset"), state.pop("log_count"))
        self.state.update(state)
        self.best = best
        self.started = time.perf_counter() - self.state["elapsed"]
        self.saved_step = self.state["step"]
        return True

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # -- one optimizer step ----------------------------------------------------------------------------
    def step(self, ddp: nn.Module, batch: list[int], batch_id: int = 0) -> float:
        if self.drop is None:
            return self._step(ddp, batch, batch_id)
        self.drop.before_step(self.model, self.state["step"])
        try:
            return self._step(ddp, batch, batch_id)
        finally:
            self.drop.after_step(self.model)

    def _step(self, ddp: nn.Module, batch: list[int], batch_id: int) -> float:
        task, enc, env = self.spec.task, self.prep.train, self.env
        n_global = units(enc, batch, task)
        mine = shard(batch, env.rank, env.world_size)
        parts = micro_batches(mine, self.cfg.micro_batch_size) if mine else [[batch[0]]]
        local = 0.0
        for j, part in enumerate(parts):
            sync = j == len(parts) - 1
            ctx = ddp.no_sync() if env.enabled and not sync else contextlib.nullcontext()
            with ctx:
                inputs = {k: v.to(self.device) for k, v in collate(enc, part, task, self.prep.pad_id).items()}
                out = ddp(**inputs) if self.cache is None else self.cache.run(ddp, inputs, (batch_id, j))
                u = units(enc, part, task) if mine else 0
                if u > 0 and n_global > 0:
                    weight = u / n_global
                    (out.loss * (weight * env.world_size)).backward()
                    local += out.loss.item() * weight
                else:  # nothing to learn from here, but DDP needs every process to take part
                    (out.logits.float().sum() * 0.0).backward()
        loss = D.sum_scalar(env, local)
        if not math.isfinite(loss):  # every process sees the same sum, so all stop together
            raise self._diverged(f"the training loss became {loss}")
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not all(bool(torch.isfinite(p).all()) for p in self.params):  # DDP keeps them equal on all processes
            raise self._diverged("the weights became infinite or NaN after the update")
        return loss

    def _diverged(self, what: str) -> AdapterError:
        """Stop a diverged run; nothing after the last good checkpoint is saved (the raise skips it)."""
        step = self.state["step"] + 1
        kept = (f"the last good checkpoint (step {self.saved_step}) stays in {self.out / 'checkpoint'}"
                if self.saved_step is not None else "no checkpoint had been saved yet")
        return AdapterError(f"Training stopped at step {step}: {what} (learning rate {self.cfg.learning_rate:g}); "
                            f"{kept}. Start a new run with a lower --lr, or check the labels and the data.")

    # -- evaluation and the best adapter -----------------------------------------------------------------
    def evaluate(self, split: str, enc: Encoded) -> dict[str, float]:
        return evaluate(self.model, enc, self.spec, batch_size=self.eval_batch, pad_id=self.prep.pad_id,
                        env=self.env, device=self.device)

    def eval_and_keep(self, epoch: float) -> bool:
        """Evaluate, keep the best weights, update early stopping; True = stop training."""
        step = self.state["step"]
        self.state["last_eval_step"] = step
        if self.prep.eval is None:
            self.best = {k: v.detach().clone().cpu() for k, v in ckpt.trainable_state(self.model).items()}
            self.save_best()
            return False
        scores = self.evaluate("eval", self.prep.eval)
        value = scores[self.metric]
        improved = better(self.metric, value, self.state["best"])
        self.log.write({"type": "eval", "split": "eval", "step": step, "epoch": round(epoch, 4), **scores,
                        "best": improved, "elapsed_s": round(self.elapsed(), 2)})
        shown = "  ".join(f"{k} {v:.4f}" for k, v in scores.items())
        self.progress.write(f"eval after epoch {epoch:g} (step {step}): {shown}{'  (best so far)' if improved else ''}")
        if improved:
            self.state.update(best=value, best_step=step, best_scores=scores, bad_evals=0)
            self.best = {k: v.detach().clone().cpu() for k, v in ckpt.trainable_state(self.model).items()}
            self.save_best()
            return False
        self.state["bad_evals"] += 1
        if self.cfg.early_stopping and self.state["bad_evals"] >= self.cfg.early_stopping:
            self.state["stopped_early"] = True
            self.progress.write(f"early stopping: no better {self.metric} in {self.state['bad_evals']} evaluations.")
            return True
        return False

    def save_best(self) -> None:
        if not self.env.is_main:
            return
        prep = self.prep
        meta_spec = TaskSpec.from_dict(prep.spec.to_dict())
        if self.cfg.full_finetune:
            def fill(tmp: Path) -> None:
                prep.model.model.save_pretrained(tmp)
                prep.tokenizer.save_pretrained(tmp)
                if prep.name in prep.model.heads:
                    ckpt.save_head(tmp, prep.model.heads[prep.name])
                meta_spec.save(tmp)
            ckpt.write_dir_atomic(self.out / "model", fill)
            return

        def fill_adapter(tmp: Path) -> None:
            prep.model.save_adapter(tmp / "a", prep.name)
            meta_spec.save(tmp / "a")
            write_base_ref(tmp / "a", self.cfg.model, base_identity(prep.model))
        staging = temp_dir(".adapter.staging-", self.out)
        try:
            fill_adapter(staging)
            ckpt.write_dir_atomic(self.out / "adapter", lambda tmp: _move_contents(staging / "a", tmp))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def load_best(self) -> None:
        if self.best is None:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in self.best.items():
                params[k].copy_(v)

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, resume: bool) -> dict[str, Any]:
        try:
            return self._run(resume)
        finally:
            if self.cache is not None:
                self.cache.close()

    def _run(self, resume: bool) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        self.started = time.perf_counter()
        if resume and self.restore():
            self.progress.write(f"resuming at step {self.state['step']} (epoch {self.state['epoch']}, "
                                f"batch {self.state['batch']} of {self.steps_per_epoch})")
        elif env.is_main:
            self.log.truncate(0, 0)
        ddp = D.wrap(self.model, env)
        if cfg.cache_activations:
            self.cache = ActivationCache(self.model, self.prep.name, self.out, int(cfg.cache_memory_mb * 2**20),
                                         echo=self.progress.write)
        stop = self.state["stopped_early"] or self.state["step"] >= self.total_steps
        window_t, window_ex = time.perf_counter(), 0  # examples per second, since the last record
        while not stop and self.state["epoch"] <= cfg.epochs:
            epoch = self.state["epoch"]
            batches, batch_ids = self.epoch_plan(epoch)
            steps_left_total = self.total_steps - self.state["step"]
            epoch_total = min(len(batches), self.state["batch"] + steps_left_total)
            self.progress.start_epoch(epoch, cfg.epochs, epoch_total, self.state["batch"])
            while self.state["batch"] < len(batches) and self.state["step"] < self.total_steps:
                batch = batches[self.state["batch"]]
                lr = lr_at(self.state["step"], self.total_steps, self.warmup, cfg.learning_rate, cfg.schedule)
                set_lr(self.optimizer, lr)
                tell_step(self.listeners, self.state["step"], self.total_steps)
                loss = self.step(ddp, batch, batch_ids[self.state["batch"]])
                self.state["step"] += 1
                self.state["batch"] += 1
                step = self.state["step"]
                self.state["window_loss"] += loss
                self.state["window_n"] += 1
                window_ex += len(batch)
                window_loss = self.state["window_loss"] / self.state["window_n"]
                now = time.perf_counter()
                speed = window_ex / max(now - window_t, 1e-9)
                log_now = step % cfg.log_every == 0
                self.progress.update(step, window_loss, lr, speed, log_now)
                if log_now:
                    self.log.write({"type": "train", "step": step, "epoch": round(step / self.steps_per_epoch, 4),
                                    "loss": window_loss, "lr": lr, "examples_per_s": round(speed, 1),
                                    "elapsed_s": round(self.elapsed(), 2)})
                    self.state.update(window_loss=0.0, window_n=0)
                    window_t, window_ex = now, 0
                end_of_epoch = self.state["batch"] == len(batches)
                if cfg.eval_every and step % cfg.eval_every == 0 and not end_of_epoch and step < self.total_steps:
                    stop = self.eval_and_keep(step / self.steps_per_epoch)
                    self.save_checkpoint()
                    if stop:
                        break
                elif step % cfg.save_every == 0 and not end_of_epoch:
                    self.save_checkpoint()
            self.progress.end_epoch()
            if stop:
                break
            finished_epoch = self.state["batch"] == len(batches)
            if finished_epoch:
                self.state["epoch"] += 1
                self.state["batch"] = 0
            stop = self.eval_and_keep(float(epoch) if finished_epoch else self.state["step"] / self.steps_per_epoch)
            stop = stop or self.state["step"] >= self.total_steps
            self.save_checkpoint()
            if env.is_main:
                plot_training(self.log.records, self.out / "training.png", self.metric, title=self._title())
        if self.state["last_eval_step"] != self.state["step"]:
            self.eval_and_keep(self.state["step"] / self.steps_per_epoch)
        if self.cache is not None:
            self.cache.close()  # before the test set is scored: its memory and file are not needed any more
        return self.finish()

    def _title(self) -> str:
        what = "full fine-tuning" if self.cfg.full_finetune else f"{self.cfg.method} adapter"
        train = Path(self.cfg.train)
        return f"{what} '{self.prep.name}' on {train.parent.name}/{train.name} ({self.cfg.model})"

    def finish(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        self.load_best()
        if self.best is not None:
            self.save_best()  # again: a resumed run may have lost the folder in an interrupted swap
        results: dict[str, Any] = {
            "name": self.prep.name, "task": self.spec.task, "metric": self.metric,
            "best_eval": self.state["best"], "best_step": self.state["best_step"], "steps": self.state["step"],
            "stopped_early": self.state["stopped_early"], "parameters": parameter_counts(self.model),
        }
        if self.prep.eval is not None:
            results["eval"] = self.state.get("best_scores")
        if self.cache is not None:
            results["activation_cache"] = self.cache.summary()
        if self.prep.test is not None:
            results["test"] = self.evaluate("test", self.prep.test)
            self.log.write({"type": "eval", "split": "test", "step": self.state["step"], **results["test"]})
        results["train_seconds"] = round(self.elapsed(), 1)
        artifact = self.out / ("model" if cfg.full_finetune else "adapter")
        results["artifact"] = str(artifact)
        if env.is_main:
            results["size_bytes"] = ckpt.folder_size(artifact)
            if not cfg.full_finetune:
                results["adapter_files_bytes"] = adapter_size_bytes(artifact)
            plot_training(self.log.records, self.out / "training.png", self.metric, title=self._title())
            ckpt.write_json_atomic(self.out / "results.json", results)
            run = _read_json(self.out / ckpt.RUN_FILE)
            run["status"] = "finished"
            ckpt.write_json_atomic(self.out / ckpt.RUN_FILE, run)
            shutil.rmtree(self.out / "checkpoint", ignore_errors=True)
            for old in self.out.glob(".checkpoint.old-*"):
                shutil.rmtree(old, ignore_errors=True)
        D.barrier(env)
        return results


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _move_contents(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        shutil.move(str(item), dst / item.name)


def start_run(prep: Prepared, out: Path, *, overwrite: bool = False) -> None:
    """Create the run folder and ``run.json`` (rank 0), replacing an earlier run with ``overwrite``
    (only a folder that ``check_out_dir`` accepts: a run folder or an empty one)."""
    if not prep.env.is_main:
        return
    check_out_dir(out, resume=False, overwrite=overwrite)
    for item in _entries(out):
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json_atomic(out / ckpt.RUN_FILE, {
        "adapterkit_version": __version__, "status": "running", "name": prep.name,
        "config": prep.config.to_dict(), "task": prep.spec.to_dict(), "data": prep.data,
        "world_size": prep.env.world_size, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    })


def fit(prep: Prepared, out: "str | Path", *, resume: bool = False, overwrite: bool = False,
        echo: Optional[Echo] = None, lock: Optional[RunLock] = None) -> dict[str, Any]:
    """Train ``prep`` into the run folder ``out`` (see module docstring); returns the results.

    Rank 0 holds ``out``'s run lock for the whole run (``lock`` if the caller took it already):
    a second run into the same folder stops with an ``AdapterError`` naming this process."""
    out = Path(out)
    echo = echo or print
    own = lock is None and prep.env.is_main
    if own:
        lock = RunLock(out).acquire()
    try:
        if prep.env.is_main:
            _check_writable(out)
            if not resume:
                start_run(prep, out, overwrite=overwrite)
        D.barrier(prep.env)
        progress = Progress(prep.config.progress, enabled=prep.env.is_main)
        results = _Runner(prep, out, echo, progress).run(resume)
    except BaseException:
        if own:
            lock.release(discard=True)
        raise
    if own:
        lock.release()
    return results


def _check_writable(out: Path) -> None:
    """``--out`` on a read-only folder: one line now, not a PermissionError at the first save."""
    if not os.access(out, os.W_OK | os.X_OK):
        raise AdapterError(f"--out {out}: cannot write there (permission denied); choose a folder you can write to.")


def train(config: TrainConfig, out: "str | Path", *, overwrite: bool = False, echo: Optional[Echo] = None) -> dict[str, Any]:
    """Python API: validate, train, and return the results (``AdapterError`` on bad input)."""
    out = Path(out)
    check_out_dir(out, resume=False, overwrite=overwrite)
    with RunLock(out) as lock:
        check_out_dir(out, resume=False, overwrite=overwrite)
        prep = prepare(config, echo=echo)
        return fit(prep, out, overwrite=overwrite, echo=echo, lock=lock)


__all__ = ["Prepared", "prepare", "fit", "train", "setup_model", "add_head", "check_out_dir",
           "read_run", "check_same_data", "start_run", "parameter_counts", "LOWER_IS_BETTER"]
