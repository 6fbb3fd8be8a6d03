"""The ``adapterkit`` command: ``train``, ``eval``, ``predict``, ``inspect``, ``merge``.

Bad input of any kind (a missing file or column, an unknown method or option, a folder that is not
a model or a run, ...) prints one line, ``adapterkit <command>: error: <what and the fix>``, on
stderr and exits with code 2, before anything is written. Ctrl-C during training exits with
130 and leaves the last checkpoint for ``--resume``. ``python -m adapterkit`` and
``torchrun -m adapterkit`` run the same command.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from safetensors import SafetensorError
from transformers.utils import logging as hf_logging

from . import cli_sharing
from ._version import __version__
from .checkpoint_format import CONFIG_NAME, read_meta
from .config import config_from_dict
from .convert import convert, heads_left_behind
from .data import (
    SUFFIXES,
    Table,
    TaskSpec,
    check_eval_labels,
    detect_columns,
    encode,
    prediction_inputs,
    read_prediction_input,
    read_table,
)
from .data.audio import is_audio_file, is_audio_folder, prediction_clips, read_split
from .data.ctc import Vocabulary, clip_frames, read_ctc_split
from .errors import AdapterError
from .inference import predict_audio, predict_texts
from .inspection import describe
from .layouts.inputs import min_samples
from .loader import check_max_length
from .serve import command as serve_command
from .train import distributed as D
from .train import loop
from .train.artifacts import load_bare, load_trained, locate, saved_task
from .train.checkpoint import save_head, write_dir_atomic
from .train.config import TrainConfig
from .train.evaluate import evaluate
from .train.metrics import metric_names
from .train.runlock import LOCK_NAME, RunLock

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument parsing ------------------------------------------------------------------------------
_S = argparse.SUPPRESS


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, true, null, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"method option '{text}' must look like key=value, e.g. reduction_factor=8")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = {"True": True, "False": False, "None": None}.get(value, value)
    return key, parsed


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 0,1,2, got '{text}'") from None


# (flag, config field, type, help) for training flags whose default lives in TrainConfig
_TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "a transformers model folder or an alias: minilm, smollm2 (default: minilm)"),
    ("--train", "train", str, "training data: .tsv, .csv or .jsonl"),
    ("--eval", "eval", str, "evaluation data, scored after every epoch; selects the best adapter"),
    ("--test", "test", str, "test data, scored once with the best adapter at the end"),
    ("--format", "format", str, "tsv, csv, jsonl or json (default: from the file name)"),
    ("--text-column", "text_column", str, "column with the text (default: detected)"),
    ("--text-pair-column", "text_pair_column", str, "column with the second text of a pair"),
    ("--label-column", "label_column", str, "column with the label(s) (default: detected)"),
    ("--prompt-column", "prompt_column", str, "causal LM: column with the prompt (no loss on it)"),
    ("--completion-column", "completion_column", str, "causal LM: column with the completion"),
    ("--task", "task", str, "classification, multilabel, regression, tagging, causal-lm, lm-classification "
                            "(default: detected) or ctc (speech recognition: --train is a TSV of path<TAB>transcript)"),
    ("--template", "template", str, "lm-classification (implied): the prompt, e.g. \"Review: {text} Sentiment:\""),
    ("--verbalizer", "verbalizer", str, "lm-classification: the answer word of each label, e.g. negative,positive "
                                        "or 0=negative,1=positive (default: the label names)"),
    ("--label-sep", "label_sep", str, "separator of multi-label labels in TSV/CSV (default: ',')"),
    ("--method", "method", str, "pfeiffer (default), houlsby, parallel, lora, ia3, prompt_tuning, p_adapter, bottleneck, ..."),
    ("--name", "name", str, "adapter name (default: from the training file, e.g. sst2)"),
    ("--pooling", "pooling", str, "head pooling: auto (mean for encoders, last token for decoders), mean, cls, last"),
    ("--head-layers", "head_layers", int, "layers of the prediction head (default: 2)"),
    ("--head-dropout", "head_dropout", float, "dropout in the head (default: 0.1)"),
    ("--adapter-drop", "adapter_drop", int, "AdapterDrop: each step, drop the adapters of the first n layers, n drawn "
                                            "from 0..N (default: 0 = off)"),
    ("--epochs", "epochs", int, "passes over the training data (default: 3)"),
    ("--lr", "lr", float, "peak learning rate (default: the method's own, 2e-3 for most adapters; 1e-4 with --full-finetune)"),
    ("--loraplus-lr-ratio", "loraplus_lr_ratio", float,
     "LoRA+: LoRA's B matrices learn this many times faster than the rest (default: off)"),
    ("--batch-size", "batch_size", int, "examples per optimizer step, over all processes (default: 32)"),
    ("--micro-batch-size", "micro_batch_size", int, "split each batch into micro-batches (gradient accumulation)"),
    ("--max-length", "max_length", int, "truncate inputs to this many tokens (default: 128)"),
    ("--seed", "seed", int, "seed of initialisation, data order and dropout (default: 42)"),
    ("--warmup", "warmup", float, "warm-up: a fraction of all steps if < 1, else steps (default: 0.06)"),
    ("--schedule", "schedule", str, "after warm-up: linear (default), cosine or constant"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay on matrices (default: 0)"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm, 0 = off (default: 1.0)"),
    ("--max-steps", "max_steps", int, "stop after this many optimizer steps"),
    ("--max-train-rows", "max_train_rows", int, "train on this many rows (a fixed random subset)"),
    ("--max-eval-rows", "max_eval_rows", int, "evaluate on this many rows of --eval (a fixed random subset)"),
    ("--val-fraction", "val_fraction", float, "hold out this fraction of --train for evaluation (without --eval)"),
    ("--metric", "metric", str, "metric that selects the best adapter (default: the task's, e.g. accuracy)"),
    ("--early-stopping", "early_stopping", int, "stop after N evaluations without improvement (default: 0 = off)"),
    ("--eval-every", "eval_every", int, "also evaluate every N steps (default: after each epoch only)"),
    ("--quantize", "quantize", str, "freeze the base in int8 or int4 (torchao; adapters stay float32; docs/quantization.md)"),
    ("--eval-batch-size", "eval_batch_size", int, "batch size for evaluation (default: max(64, 2 x batch))"),
    ("--save-every", "save_every", int, "save a resumable checkpoint every N steps (default: 200)"),
    ("--log-every", "log_every", int, "write a training record to metrics.jsonl every N steps (default: 20)"),
    ("--progress", "progress", str, "auto (bar on a terminal, log lines otherwise), bar, log, none"),
]

# shortcuts for common method options: flag -> option name
_METHOD_SHORTCUTS = [
    ("--reduction-factor", "reduction_factor", float, "bottleneck: hidden size / bottleneck width"),
    ("--bottleneck-dim", "bottleneck_dim", int, "bottleneck: width (overrides --reduction-factor)"),
    ("--non-linearity", "non_linearity", str, "bottleneck: relu, gelu, swish, tanh"),
    ("--lora-r", "r", int, "LoRA rank"),
    ("--lora-alpha", "alpha", float, "LoRA alpha (the update is scaled by alpha / r)"),
    ("--roles", "roles", str, "LoRA / IA3: projections to adapt, e.g. q,v or all-linear (default: all-linear for LoRA "
                              "and DoRA, the architecture's for IA3)"),
    ("--adapter-dropout", "dropout", float, "dropout inside the adapter"),
    ("--layers", "layers", _int_list, "only these layers, e.g. 6,7,8,9,10,11"),
    ("--leave-out", "leave_out", _int_list, "no adapter in these layers"),
]


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train an adapter (or the whole model) on a data file",
                       description="Train an adapter on a TSV/CSV/JSONL file and write DIR/adapter/, "
                                   "DIR/metrics.jsonl, DIR/training.png and DIR/results.json.")
    for flag, dest, typ, help_ in _TRAIN_FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=_S, help=help_)
    group = p.add_argument_group("method options")
    group.add_argument("-o", "--option", dest="method_options", action="append", type=_option, default=_S,
                       metavar="KEY=VALUE", help="any option of the method, e.g. -o reduction_factor=8 -o non_linearity=gelu")
    for flag, opt, typ, help_ in _METHOD_SHORTCUTS:
        group.add_argument(flag, dest=f"opt__{opt}", type=typ, default=_S, help=help_)
    p.add_argument("--full-finetune", dest="full_finetune", action="store_true", default=_S,
                   help="train all weights instead of an adapter (the baseline)")
    p.add_argument("--no-base-dropout", dest="base_dropout", action="store_false", default=_S,
                   help="run the frozen base model as at inference (no dropout inside it) while the adapter trains: "
                        "steps about 25 %% faster; default: its dropout stays on, as in AdapterHub and PEFT")
    p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false", default=_S,
                   help="plain random batches instead of length-grouped ones")
    p.add_argument("--fixed-batches", dest="fixed_batches", action="store_true", default=_S,
                   help="the same batches (examples together) in every epoch, only their order shuffled")
    p.add_argument("--cache-activations", dest="cache_activations", action="store_true", default=_S,
                   help="with the adapter in the upper layers only (--layers) and --no-base-dropout: run the frozen "
                        "layers below it once per batch, not once per epoch (implies --fixed-batches; the adapter "
                        "is the same bit for bit; docs/training.md)")
    p.add_argument("--cache-memory", dest="cache_memory_mb", type=float, default=_S, metavar="MIB",
                   help="--cache-activations: keep up to MIB of them in memory, the rest in a file in the run "
                        "folder, deleted when the run ends (default: 1024)")
    p.add_argument("--out", help="run folder to create (must be new or empty)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")


def _add_common_model(p: argparse.ArgumentParser, adapter_required: bool = True) -> None:
    p.add_argument("--model", help="base model folder or alias (default: the one the adapter was trained on)")
    p.add_argument("--adapter", required=adapter_required,
                   help="a run folder, an adapter folder, or a full model folder (--full-finetune, merge)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="use the adapter with a --model other than the base it was trained on (refused by default)")


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8", "int4"], help="freeze the base in int8 or int4 (torchao; adapters stay float32; docs/quantization.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adapterkit", description="Train, evaluate and use small adapters on frozen models.")

    parser.add_argument("--version", action="version", version=f"adapterkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_train(sub)

    p = sub.add_parser("eval", help="score a trained adapter (or a bare causal LM) on a labelled data file")
    _add_common_model(p, adapter_required=False)
    _add_quantize(p)
    p.add_argument("--data", required=True, help="labelled data file (.tsv, .csv, .jsonl)")
    p.add_argument("--task", help="without --adapter: causal-lm or lm-classification (the bare model's zero-shot score)")
    p.add_argument("--template", help="without --adapter: lm-classification prompt, e.g. \"Review: {text} Sentiment:\"")
    p.add_argument("--verbalizer", help="without --adapter: lm-classification answer words, e.g. negative,positive")
    p.add_argument("--format")
    p.add_argument("--text-column")
    p.add_argument("--text-pair-column")
    p.add_argument("--label-column")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, help="default: as in training")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")

    p = sub.add_parser("predict", help="predict labels (or generate text) for text lines")
    _add_common_model(p)
    _add_quantize(p)
    p.add_argument("texts", nargs="*", help="texts to predict (default: --input, else stdin: one text per line, or "
                   "JSON lines such as {\"text\": ...} for texts with line breaks)")
    p.add_argument("--input", help="a .tsv/.csv/.jsonl/.json file read like --eval (the adapter's text column), or "
                                   "a text file: one text per line (a tab separates a pair), or JSON lines")
    p.add_argument("--text-column", help="column of --input that holds the text (default: the adapter's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64, help="causal LM: tokens to generate")
    p.add_argument("--json", action="store_true", help="JSON lines with every probability")

    p = sub.add_parser("inspect", help="show an adapter's config and parameter table")
    p.add_argument("path", help="a run folder, an adapter folder or a full model folder")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("merge", help="fold a LoRA / IA3 adapter into the base and save a plain transformers model")
    _add_common_model(p)
    p.add_argument("--out", required=True, help="folder for the merged model (must be new or empty)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("convert", help="convert an adapter between the adapterkit, PEFT and AdapterHub formats")
    p.add_argument("src", help="adapter folder (adapterkit, PEFT or AdapterHub; recognised by its files)")
    p.add_argument("dst", help="folder to write (new, empty, or an adapter of the target format)")
    p.add_argument("--to", required=True, choices=["adapterkit", "peft", "adapterhub"], help="target format")
    p.add_argument("--model", help="base model folder or alias (default: the one recorded beside SRC)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled *.bin weights (torch.load with weights_only=True); refused otherwise")
    p.add_argument("--without-head", action="store_true",
                   help="convert the adapter alone, leaving its task head behind (e.g. a mean-pooling head, which "
                        "neither PEFT nor AdapterHub can hold)")
    serve_command.add_parser(sub)
    cli_sharing.add_parsers(sub)
    return parser


# -- train -----------------------------------------------------------------------------------------
def _config_from_args(args: argparse.Namespace, base: Optional[dict[str, Any]] = None):
    given = {dest: getattr(args, dest) for _, dest, _, _ in _TRAIN_FLAGS if hasattr(args, dest)}
    for flag in ("full_finetune", "group_by_length", "base_dropout", "fixed_batches", "cache_activations",
                 "cache_memory_mb"):
        if hasattr(args, flag):
            given[flag] = getattr(args, flag)
    options = dict(getattr(args, "method_options", []))
    for _, opt, _, _ in _METHOD_SHORTCUTS:
        if hasattr(args, f"opt__{opt}"):
            options[opt] = getattr(args, f"opt__{opt}")
    if options:
        given["options"] = options
    if base is None:
        return TrainConfig(**given), given
    merged = TrainConfig.from_dict(base)
    for key in ("progress", "eval_batch_size"):  # how the run reports, not what it computes
        if key in given:
            setattr(merged, key, given.pop(key))
    changed = [k for k, v in given.items() if getattr(merged, k) != v]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise AdapterError(f"--resume continues the run with its own settings; {flags} differ from them. Drop those "
                           "flags, or start a new run with --out.")
    return merged, given


def cmd_train(args: argparse.Namespace) -> int:
    env = D.init_from_env()
    out = Path(args.resume or args.out or "")
    prep = None
    lock = RunLock(out)
    error: Optional[str] = None
    try:
        if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise AdapterError("--resume DIR continues the run in DIR; drop --out (or pass the same folder).")
        if not args.resume and not args.out:
            raise AdapterError("--out DIR is required: the folder to write the adapter, metrics and plot to.")
        run = loop.read_run(out) if args.resume else None
        config, given = _config_from_args(args, run["config"] if run else None)
        loop.check_out_dir(out, resume=bool(args.resume), overwrite=args.overwrite)
        if not config.train:
            raise AdapterError("--train FILE is required: a .tsv, .csv or .jsonl file with a text and a label column.")
        if env.is_main:  # one run per folder: a second one stops here, before loading anything
            lock.acquire()
            loop.check_out_dir(out, resume=bool(args.resume), overwrite=args.overwrite)
            if args.resume:
                loop.read_run(out)  # it may have finished while this process waited to start
        prep = loop.prepare(config, env, echo=_note if env.is_main else None)
        if run:
            loop.check_same_data(run, prep, out)
    except AdapterError as err:
        error = str(err)
        lock.release(discard=True)
    if not D.all_ok(env, error is None):
        lock.release(discard=True)
        if error and env.is_main or (error and not env.enabled):
            _fail("train", error)
        D.shutdown(env)
        return EXIT_BAD_INPUT
    assert prep is not None
    counts = loop.parameter_counts(prep.model)
    started = time.perf_counter()
    if env.is_main:
        what = "all weights (full fine-tuning)" if config.full_finetune else f"a {config.method} adapter"
        print(f"adapterkit train: {what} on {config.model}, task {prep.spec.task} "
              f"({len(prep.train):,} training rows{_rows_note(prep)}), {env.world_size} process(es)")
        print(f"trainable parameters: {counts['trainable']:,} of {counts['total']:,} "
              f"({100 * counts['trainable'] / counts['total']:.2f} %), head {counts['head']:,}", flush=True)
        _head_note(prep)
    try:
        results = loop.fit(prep, out, resume=bool(args.resume), overwrite=args.overwrite, echo=_note,
                           lock=lock if env.is_main else None)
    except KeyboardInterrupt:
        if env.is_main:
            print(f"\nadapterkit train: interrupted; continue with: adapterkit train --resume {out}", file=sys.stderr)
        return 130
    except AdapterError as err:  # e.g. a loss that became NaN
        if env.is_main:
            _fail("train", str(err))
        return EXIT_BAD_INPUT
    finally:
        lock.release()
        D.shutdown(env)
    if env.is_main:
        _print_results(results, out, time.perf_counter() - started)
    return 0


def _head_note(prep: Any) -> None:
    """Say now, not at ``convert`` time, when the head chosen will not go to PEFT / AdapterHub."""
    if prep.config.full_finetune:
        return
    formats = heads_left_behind(prep.model, prep.name)
    if formats:
        head = prep.model.heads[prep.name].config
        names = " or ".join({"peft": "PEFT", "adapterhub": "AdapterHub"}[f] for f in formats)
        if head.type == "ctc":
            _note(f"note: a CTC head cannot be converted to {names}; adapterkit convert --without-head converts the "
                  "adapter alone.")
            return
        _note(f"note: this head ({head.layers} layer(s), pooling {head.pooling}) cannot be converted to {names}; "
              "adapterkit convert --without-head converts the adapter alone. Their heads read one token: train with "
              "--pooling cls (encoders) or last (decoders) to convert the head too.")


def _rows_note(prep: Any) -> str:
    parts = []
    if prep.eval is not None:
        parts.append(f"{len(prep.eval):,} eval")
    if prep.test is not None:
        parts.append(f"{len(prep.test):,} test")
    return ", " + ", ".join(parts) if parts else ""


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _fmt(scores: Optional[dict[str, float]]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in (scores or {}).items())


def _print_results(results: dict[str, Any], out: Path, seconds: float) -> None:
    counts = results["parameters"]
    print(f"trainable share: {100 * counts['trainable'] / counts['total']:.2f} % "
          f"({counts['trainable']:,} of {counts['total']:,} parameters)")
    if results.get("eval"):
        print(f"best eval {results['metric']}: {results['best_eval']:.4f} (step {results['best_step']})   "
              f"{_fmt(results['eval'])}")
    if results.get("test"):
        test = results["test"]
        first = next(iter(test))
        print(f"test {first}: {100 * test[first]:.2f} %   {_fmt(test)}" if first in ("accuracy", "micro_f1", "span_f1",
              "macro_f1") else f"test: {_fmt(test)}")
    kind = "model" if results["artifact"].endswith("model") else "adapter"
    print(f"{kind} size on disk: {_human_bytes(results['size_bytes'])} ({results['size_bytes']:,} bytes) in {results['artifact']}")
    print(f"wall-clock: {seconds / 60:.1f} min; metrics: {out / 'metrics.jsonl'}, plot: {out / 'training.png'}")


# -- eval / predict / inspect / merge -------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    _check_sizes(args)
    if args.adapter is not None and saved_task(args.adapter) == "ctc":  # a TSV of clip paths and transcripts
        return _eval_ctc(args)
    if is_audio_folder(args.data):  # a folder of WAV files, one subfolder per label, as for train
        return _eval_audio(args)
    table = read_table(args.data, args.format)  # before loading the model: fail fast

    if args.adapter is None:
        loaded = load_bare(args.model, table, task=args.task, template=args.template, verbalizer=args.verbalizer,
                           quantize=args.quantize,
                           text=args.text_column, text_pair=args.text_pair_column, label=args.label_column)
    elif args.task or args.template or args.verbalizer:
        raise AdapterError("--task, --template and --verbalizer are for the bare model (without --adapter); an "
                           "adapter is scored on the task it was trained on. Drop them.")
    else:
        loaded = load_trained(args.adapter, args.model, allow_other_base=args.allow_other_base, quantize=args.quantize)
    if loaded.audio:
        raise AdapterError(f"--adapter {args.adapter} classifies audio, but --data {args.data} is a data file; pass a "
                           "folder of WAV files with one subfolder per label, as for adapterkit train.")
    spec = loaded.spec
    if spec.task != "causal-lm" and args.adapter is not None:
        flags = {"text": args.text_column, "text_pair": args.text_pair_column, "label": args.label_column}
        cols = spec.columns
        if any(flags.values()) or not cols.text or cols.text not in table.columns:
            cols = detect_columns(table, text=args.text_column or (cols.text if cols.text in table.columns else None),
                                  text_pair=args.text_pair_column, label=args.label_column, task=spec.task)
        spec.columns = cols
        if spec.columns.label is None or spec.columns.label not in table.columns:
            raise AdapterError(f"{table.path}: no label column to score against (columns: {', '.join(table.columns)}); "
                               "pass --label-column NAME.")
    if args.max_length is not None:
        check_max_length(loaded.base, args.max_length, loaded.model.config)
        spec.max_length = args.max_length
    check_eval_labels(spec, table)
    enc = encode(spec, table, loaded.tokenizer)
    pad = loaded.tokenizer.pad_token_id or 0
    scores = evaluate(loaded.model, enc, spec, batch_size=args.batch_size, pad_id=pad)
    _print_scores(args, spec, len(enc), scores)
    return 0


def _print_scores(args: argparse.Namespace, spec: Any, rows: int, scores: dict[str, float]) -> None:
    if args.json:
        print(json.dumps({"data": str(args.data), "rows": rows, "task": spec.task, **scores}))
        return
    print(f"{args.data}: {rows:,} rows, task {spec.task}")
    for name in metric_names(spec):
        if name in scores:
            print(f"  {name:<16}{scores[name]:.4f}")


def _eval_audio(args: argparse.Namespace) -> int:
    """``eval --data DIR`` of a speech adapter: the clips of DIR/LABEL/*.wav, read as training did."""
    if args.adapter is None:
        raise AdapterError(f"--data {args.data} is a folder of audio clips, which only a trained speech adapter can "
                           "score; pass --adapter.")
    unused = [f"--{k.replace('_', '-')}" for k in ("format", "text_column", "text_pair_column", "label_column",
                                                   "max_length", "task", "template", "verbalizer") if getattr(args, k)]
    if unused:
        raise AdapterError(f"{', '.join(unused)}: not used for audio data (the labels are the subfolder names); "
                           "drop them.")
    loaded = load_trained(args.adapter, args.model, allow_other_base=args.allow_other_base)
    if not loaded.audio:
        raise AdapterError(f"--data {args.data} is a folder of audio clips, but the adapter in {args.adapter} reads "
                           "text; pass a .tsv, .csv or .jsonl file.")
    clips, _ = read_split(args.data, loaded.spec.labels, loaded.tokenizer, min_samples(loaded.model.model))
    scores = evaluate(loaded.model, clips, loaded.spec, batch_size=args.batch_size, pad_id=0)
    _print_scores(args, loaded.spec, len(clips), scores)
    return 0


def _eval_ctc(args: argparse.Namespace) -> int:
    """``eval --data FILE.tsv`` of a speech recognition adapter: WER / CER of greedy decoding."""
    unused = [f"--{k.replace('_', '-')}" for k in ("format", "text_column", "text_pair_column", "label_column",
                                                   "max_length", "task", "template", "verbalizer") if getattr(args, k)]
    if unused:
        raise AdapterError(f"{', '.join(unused)}: not used for speech recognition (--data is a TSV of "
                           "path<TAB>transcript lines); drop them.")
    loaded = load_trained(args.adapter, args.model, allow_other_base=args.allow_other_base, quantize=args.quantize)
    net = loaded.model.model
    clips, _ = read_ctc_split(args.data, Vocabulary(tuple(loaded.spec.labels)), loaded.tokenizer, min_samples(net),
                              clip_frames(net))
    scores = evaluate(loaded.model, clips, loaded.spec, batch_size=args.batch_size, pad_id=0)
    _print_scores(args, loaded.spec, len(clips), scores)
    return 0


def _check_sizes(args: argparse.Namespace) -> None:
    """``--batch-size`` / ``--max-length`` of ``eval`` and ``predict``, as ``train`` checks them."""
    if args.batch_size < 1:
        raise AdapterError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if getattr(args, "max_length", None) is not None and args.max_length < 2:
        raise AdapterError(f"--max-length must be >= 2 tokens, got {args.max_length}.")
    if getattr(args, "max_new_tokens", None) is not None and args.max_new_tokens < 1:
        raise AdapterError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")


def _check_text(texts: list[Any]) -> None:
    """A lone surrogate (bytes that were not UTF-8 in an argument, or ``\\udc80`` in JSON) is no text a
    tokenizer can take: name it instead of failing inside the tokenizer."""
    for i, text in enumerate(texts, start=1):
        for part in text if isinstance(text, (list, tuple)) else [text]:
            if not isinstance(part, str):
                continue
            try:
                part.encode("utf-8")
            except UnicodeEncodeError as err:
                raise AdapterError(f"text {i} holds {part[err.start:err.end]!r} at character {err.start + 1}, which is "
                                   "not valid Unicode text (a lone surrogate: bytes that were not UTF-8?); convert the "
                                   "input to UTF-8, e.g. with iconv -f latin1 -t utf-8.") from None


def _predict_source(args: argparse.Namespace) -> "list[str] | Any":
    """Texts from the arguments, ``--input`` (a table in the train / eval formats, else one text
    per line or JSON lines) or stdin (one text per line, or JSON lines); read before the model loads."""
    if args.texts:
        return list(args.texts)
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise AdapterError(f"--input {path}: no such file.")
        if path.suffix.lower() in SUFFIXES:
            return read_table(path)
        return read_prediction_input(path.read_bytes(), str(path))
    if sys.stdin.isatty():
        print("reading texts from stdin, one per line or JSON lines (Ctrl-D to finish)", file=sys.stderr)
    return read_prediction_input(sys.stdin.buffer.read())


def _audio_sources(args: argparse.Namespace) -> Optional[list[str]]:
    """The audio files and folders ``predict`` was given (as texts or ``--input``), or None for text."""
    given = list(args.texts) + ([args.input] if args.input else [])
    audio = [g for g in given if (is_audio_file(g) and Path(g).is_file())
             or (Path(g).is_dir() and any(is_audio_file(f) for f in Path(g).rglob("*")))]
    if not audio:
        return None
    if len(audio) != len(given):
        others = [g for g in given if g not in audio]
        raise AdapterError(f"predict got audio ({audio[0]}) and text ({others[0][:40]!r}) together; pass only audio "
                           "files and folders for a speech adapter, or only texts.")
    return audio


def _predict_audio(args: argparse.Namespace, sources: list[str]) -> int:
    loaded = load_trained(args.adapter, args.model, allow_other_base=args.allow_other_base)
    if not loaded.audio:
        raise AdapterError(f"{sources[0]}: audio, but the adapter in {args.adapter} reads text; pass texts, --input "
                           "FILE or lines on stdin.")
    clips = prediction_clips(sources, loaded.tokenizer, min_samples(loaded.model.model))
    for r in predict_audio(loaded.model, clips, loaded.spec, batch_size=args.batch_size):
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        elif "text" in r:  # speech recognition: the transcript, then the clip
            print(f"{r['text']}\t{r['path']}")
        else:
            print(f"{r['label']}\t{r['probability']:.4f}\t{r['path']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    _check_sizes(args)
    audio = _audio_sources(args)
    if audio is not None:  # WAV files or folders of them, for a speech adapter
        return _predict_audio(args, audio)
    source = _predict_source(args)
    if not (source.rows if isinstance(source, Table) else source):
        raise AdapterError("No text to predict: pass texts as arguments, --input FILE, or lines on stdin.")

    loaded = load_trained(args.adapter, args.model, allow_other_base=args.allow_other_base, quantize=args.quantize)
    if loaded.audio:
        what = "transcribes" if loaded.spec.task == "ctc" else "classifies"
        raise AdapterError(f"--adapter {args.adapter} {what} audio; pass WAV files or folders of them (as "
                           "arguments or --input), not text.")
    texts = prediction_inputs(loaded.spec, source, args.text_column) if isinstance(source, Table) else source
    _check_text(texts)
    results = predict_texts(loaded.model, loaded.tokenizer, loaded.spec, texts, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens)
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        elif "label" in r:
            print(f"{r['label']}\t{r['probability']:.4f}\t{r['text']}")
        elif "labels" in r:
            print(f"{','.join(r['labels'])}\t{r['text']}")
        elif "value" in r:
            print(f"{r['value']:.4f}\t{r['text']}")
        elif "tags" in r:
            print(" ".join(f"{t}/{g}" for t, g in zip(r["tokens"], r["tags"])))
        else:
            print(r["generated"].replace("\n", "\\n"))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    info, text = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else text)
    return 0


def _check_merge_out(out: Path, overwrite: bool) -> None:
    """``merge --out``: new or empty; ``--overwrite`` replaces only a model folder (``config.json``)."""
    if out.exists() and not out.is_dir():
        raise AdapterError(f"--out {out} is a file; pass a folder path.")
    if not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return
    if not (out / "config.json").is_file():
        raise AdapterError(f"--out {out} is not empty and holds no model (no config.json); choose a new or empty "
                           "folder. --overwrite replaces only an earlier merged model, never other files.")
    if not overwrite:
        raise AdapterError(f"--out {out} holds a model already; choose a new folder or pass --overwrite to replace it.")


def cmd_merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_merge_out(out, args.overwrite)
    artifact = locate(args.adapter)
    if artifact.kind != "adapter":
        raise AdapterError(f"--adapter {args.adapter}: is a full model already (nothing to merge); use it as --model.")
    config = read_meta(artifact.path / CONFIG_NAME)["config"]  # a damaged file: one line naming it
    method = config_from_dict(config)
    if not method.supports_merge:
        raise AdapterError(f"--adapter {args.adapter}: a {config['method']} adapter adds modules and cannot be folded "
                           "into the weights; only lora and ia3 adapters can be merged.")
    why = method.merge_refusal()  # e.g. a gated LoRA (use_gating)
    if why is not None:
        raise AdapterError(f"--adapter {args.adapter}: this {config['method']} adapter cannot be folded into the weights: "
                           f"{why}.")
    # one merge per --out: a second one stops at the lock (or, once the first is done, at the check
    # under it) instead of both printing "saved" while one result is lost
    lock = RunLock(out, "merge").acquire()
    try:
        _check_merge_out(out, args.overwrite)
        message = _merge_into(args, out)
    except BaseException:
        lock.release(discard=True)
        raise
    lock.release()
    print(message)
    return 0


def _merge_into(args: argparse.Namespace, out: Path) -> str:
    loaded = load_trained(args.adapter, args.model, allow_other_base=args.allow_other_base)
    loaded.model.merge_adapter(loaded.name)
    head = loaded.model.heads[loaded.name] if loaded.name in loaded.model.heads else None
    spec = loaded.spec

    def fill(tmp: Path) -> None:
        loaded.model.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        if head is not None:
            save_head(tmp, head)
        TaskSpec.save(spec, tmp)

    write_dir_atomic(out, fill)  # swaps the new folder in: a failed merge leaves the old one whole
    cls = type(loaded.model.model).__name__
    lines = [f"merged adapter '{loaded.name}' into {loaded.base}; saved a plain transformers model ({cls}) to {out}",
             f"load it without adapterkit: transformers.AutoModel{'ForCausalLM' if 'CausalLM' in cls else ''}"
             f".from_pretrained('{out}')"]
    if head is not None:
        lines.append(f"its task head is in {out}/adapterkit_head.*: adapterkit eval/predict --adapter {out}")
    return "\n".join(lines)


# -- entry point ----------------------------------------------------------------------------------------
def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fail(command: str, message: str) -> None:
    print(f"adapterkit {command}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def cmd_convert(args: argparse.Namespace) -> int:
    # one convert per destination, as merge: a second one stops at the lock instead of both
    # printing their summary while one folder is lost
    lock = RunLock(Path(args.dst), "convert").acquire()
    try:
        message = convert(args.src, args.dst, args.to, model=args.model, allow_pickle=args.allow_pickle,
                          with_head=not args.without_head)
    except BaseException:
        lock.release(discard=True)
        raise
    lock.release()
    print(message)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "inspect": cmd_inspect, "merge": cmd_merge,
            "convert": cmd_convert, "serve": serve_command.cmd_serve, **cli_sharing.COMMANDS}


def _quiet_libraries() -> None:
    """No "Loading weights" bars or hub warnings from transformers in our output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.formatwarning = lambda message, *args, **kwargs: f"note: {message}\n"  # one line, no source
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _passive_openmp(argv: Optional[Sequence[str]]) -> None:
    """Re-run ``train`` / ``eval`` with ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it.

    PyTorch's OpenMP threads spin while they wait for each other. On a machine whose cores are
    busy with other work, a spinning thread keeps the one doing the work off its core: on the
    shared 2-core machine this was written on, a MiniLM training step took 5-20x longer with two
    spinning threads than with one. Passive waiting removes that (and costs ~nothing when the
    machine is idle). libgomp reads the variable when torch is loaded, which has happened by the
    time this runs, hence the re-exec; it only happens from the command line (``argv is None``).
    """
    if argv is not None or "OMP_WAIT_POLICY" in os.environ or os.environ.get("ADAPTERKIT_NO_REEXEC"):
        return
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "eval"):
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "adapterkit", *sys.argv[1:]])


def main(argv: Optional[Sequence[str]] = None) -> int:
    _passive_openmp(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # usage errors (exit 2), --help and --version (exit 0)
        return int(stop.code or 0)
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except AdapterError as err:
        _fail(args.command, str(err))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"adapterkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. adapterkit predict ... | head
        return 0
    except OSError as err:  # a read-only or full disk, a file that vanished: one line, not a traceback
        _fail(args.command, _os_error(err))
        return EXIT_BAD_INPUT
    except SafetensorError as err:  # safetensors reports a full disk as its own error type
        _fail(args.command, f"{err}; {_KEPT}")
        return EXIT_BAD_INPUT
    except RecursionError:  # a file nested thousands deep that a reader did not name
        _fail(args.command, "an input file is nested too deeply to read (thousands of levels of [ or {); check the "
                            "files you passed.")
        return EXIT_BAD_INPUT


_KEPT = ("free some space (or check the path and that you may write there) and run the command again; folders are "
         "written to a temporary name and swapped in whole, so nothing earlier was replaced (a train run continues "
         "with adapterkit train --resume DIR).")


def _os_error(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return f"{err.filename + ': ' if err.filename else ''}no space left on device; {_KEPT}"
    if err.filename is None:
        return f"{err.strerror or err}; {_KEPT}"
    return (f"{err.filename}: {err.strerror or err}; check that the path exists and that you may read and write there "
            "(and that the disk has room).")


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
