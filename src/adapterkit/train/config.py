"""``TrainConfig``: every setting of a training run, with the defaults users get without flags.

One source of truth for the CLI (``adapterkit train``), the Python API (``adapterkit.train.fit``)
and the run folder (``run.json`` stores the config so that ``--resume`` continues the same run).

Why these defaults (measured on SST-2 with all-MiniLM-L6-v2 on a 2-core CPU; see
``docs/training.md``): a Pfeiffer bottleneck adapter (reduction factor 16) with an adapter
learning rate of 2e-3 (``bench/accuracy.py --sweep``: on dev, 2e-3 beat AdapterHub's usual 1e-3
for Pfeiffer, Houlsby and LoRA alike; 4e-3 was no better over three seeds), linear warm-up over
the first 6 % of steps then linear decay, the frozen base model's dropout kept on as AdapterHub
and PEFT do (``base_dropout=False`` runs the base as at inference: steps about 25 % shorter at
the same dev accuracy, but test accuracy varied more between seeds), batches of 32 grouped by
length (short SST-2 phrases are not padded to the longest sentence of the set), a two-layer
head over mean pooling (``pooling="auto"``; MiniLM is a mean-pooling sentence encoder). Full
fine-tuning (``full_finetune=True``) uses 1e-4 unless ``lr`` is given: of 5e-5, 1e-4 and 2e-4 it
was the best on dev in ``bench/accuracy.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import AdapterConfig, resolve_config
from ..errors import AdapterError
from ..typecheck import check_field_types

ADAPTER_LR = 2e-3
FULL_FINETUNE_LR = 1e-4
SCHEDULES = ("linear", "cosine", "constant")
PROGRESS = ("auto", "bar", "log", "none")
MAX_SEED = 2**32 - 1  # the generators take seed * 100_003 + epoch, which must stay below 2**64


@dataclass
class TrainConfig:
    """Settings of one run. ``None`` means "decide from the data or the method"."""

    model: str = "minilm"
    train: str = ""
    eval: Optional[str] = None
    test: Optional[str] = None
    format: Optional[str] = None
    # columns and task
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    prompt_column: Optional[str] = None
    completion_column: Optional[str] = None
    task: Optional[str] = None
    label_sep: str = ","
    template: Optional[str] = None  # lm-classification: the prompt, e.g. "Review: {text} Sentiment:"
    verbalizer: Optional[str] = None  # lm-classification: one answer word per label, e.g. "negative,positive"
    # what to train
    method: str = "pfeiffer"
    options: dict[str, Any] = field(default_factory=dict)
    full_finetune: bool = False
    name: Optional[str] = None
    pooling: str = "auto"
    head_layers: int = 2
    head_dropout: float = 0.1
    base_dropout: bool = True
    adapter_drop: int = 0
    # optimisation
    epochs: int = 3
    lr: Optional[float] = None
    loraplus_lr_ratio: Optional[float] = None
    batch_size: int = 32
    micro_batch_size: Optional[int] = None
    max_length: int = 128
    seed: int = 42
    warmup: float = 0.06
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: Optional[int] = None
    group_by_length: bool = True
    fixed_batches: bool = False  # epoch 1's batches in every epoch, only their order shuffled
    cache_activations: bool = False  # keep the frozen lower layers' output per batch (train/activation_cache.py)
    cache_memory_mb: float = 1024.0  # beyond this the cached activations go to a file in the run folder
    # data subsets
    max_train_rows: Optional[int] = None
    max_eval_rows: Optional[int] = None
    val_fraction: float = 0.0
    # evaluation, checkpoints, feedback
    metric: Optional[str] = None
    early_stopping: int = 0
    eval_every: Optional[int] = None
    eval_batch_size: Optional[int] = None
    quantize: Optional[str] = None  # "int8" / "int4": the frozen base quantized (quantization.py)
    save_every: int = 200
    log_every: int = 20
    progress: str = "auto"

    @property
    def same_batches_every_epoch(self) -> bool:
        """``fixed_batches``, which ``cache_activations`` implies."""
        return self.fixed_batches or self.cache_activations

    @property
    def learning_rate(self) -> float:
        """``lr``; else 1e-4 for full fine-tuning; else the method's own ``training_lr`` (2e-3 for most)."""
        if self.lr is not None:
            return self.lr
        if self.full_finetune:
            return FULL_FINETUNE_LR
        try:
            return type(resolve_config(self.method)).training_lr
        except AdapterError:  # an unknown method: validate() names it
            return ADAPTER_LR

    def adapter_config(self) -> "AdapterConfig":
        """The adapter ``--method`` and ``-o`` give, plus the method's own training defaults
        (``AdapterConfig.training_defaults``) where ``--method`` is the method's name."""
        base = resolve_config(self.method)
        extra = type(base).training_defaults(self.options) if self.method.lower() == base.method else {}
        return resolve_config(self.method, **{**extra, **self.options})

    def validate(self) -> None:
        """Checks that need neither files nor the model (``AdapterError`` naming the flag)."""
        try:
            check_field_types(self)
        except TypeError as err:  # TrainConfig(epochs="3") from Python or an edited run.json
            raise AdapterError(f"Invalid training setting: {err}.") from None
        self._check_finite()
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}."),
            (0 <= self.seed <= MAX_SEED, f"--seed must be a whole number from 0 to {MAX_SEED}, got {self.seed}."),
            (self.eval_batch_size is None or self.eval_batch_size >= 1,
             f"--eval-batch-size must be >= 1, got {self.eval_batch_size}; leave it out for the default "
             "(max(64, 2 x --batch-size))."),
            (self.label_sep != "", "--label-sep must not be empty; pass the character between labels, e.g. ',' or ';'."),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}."),
            (self.micro_batch_size is None or self.micro_batch_size >= 1, "--micro-batch-size must be >= 1."),
            (self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}."),
            (self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}."),
            (self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0,
             f"--loraplus-lr-ratio must be > 0, got {self.loraplus_lr_ratio}."),
            (0 <= self.warmup, f"--warmup must be >= 0 (a fraction of the steps below 1, else steps), got {self.warmup}."),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'."),
            (self.weight_decay >= 0, "--weight-decay must be >= 0."),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 turns clipping off)."),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1."),
            (self.max_train_rows is None or self.max_train_rows >= 1, "--max-train-rows must be >= 1."),
            (self.max_eval_rows is None or self.max_eval_rows >= 1, "--max-eval-rows must be >= 1."),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)."),
            (self.early_stopping >= 0, "--early-stopping must be >= 0 (evaluations without improvement)."),
            (self.eval_every is None or self.eval_every >= 1, "--eval-every must be >= 1 step."),
            (self.save_every >= 1, "--save-every must be >= 1 step."),
            (self.log_every >= 1, "--log-every must be >= 1 step."),
            (self.progress in PROGRESS, f"--progress must be one of {', '.join(PROGRESS)}."),
            (self.head_layers >= 1, "--head-layers must be >= 1."),
            (self.adapter_drop >= 0, f"--adapter-drop must be >= 0 layers (0 = off), got {self.adapter_drop}."),
            (not (self.full_finetune and self.adapter_drop),
             "--adapter-drop drops adapters from lower layers; full fine-tuning has none. Drop the flag."),
            (0 <= self.head_dropout < 1, "--head-dropout must be in [0, 1)."),
            (self.quantize in (None, "int8", "int4"), f"--quantize must be int8 or int4, got '{self.quantize}'."),
            (not (self.full_finetune and self.quantize),
             "--quantize freezes the base in low precision; --full-finetune trains it. Drop one of them."),
            (bool(self.train), "--train FILE is required."),
            (not (self.eval and self.val_fraction), "Pass --eval FILE or --val-fraction, not both."),
            (not (self.full_finetune and self.options), "--full-finetune trains all weights; drop the method options."),
            (self.cache_memory_mb >= 0, f"--cache-memory must be >= 0 MiB (0 = all on disk), got {self.cache_memory_mb}."),
            (not (self.cache_activations and self.full_finetune),
             "--cache-activations keeps the output of frozen layers; --full-finetune trains them all. Drop one."),
            (not (self.cache_activations and self.base_dropout),
             "--cache-activations needs the frozen layers to compute the same output in every epoch: add "
             "--no-base-dropout (the base's dropout draws new masks each time), or drop --cache-activations."),
            (not (self.cache_activations and self.adapter_drop),
             "--cache-activations needs the same adapted layers in every step; --adapter-drop changes them. "
             "Drop one of the two flags."),
            (not (self.full_finetune and not self.base_dropout),
             "--no-base-dropout is for adapter training; full fine-tuning trains the base with its dropout. "
             "Drop the flag."),
        ]
        for ok, message in checks:
            if not ok:
                raise AdapterError(message)

    def _check_finite(self) -> None:
        """``--lr inf`` or ``--warmup nan`` would train to NaN (or fail mid-run): refuse them first."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                flag = "--" + f.name.replace("_", "-")
                raise AdapterError(f"{flag} must be a finite number, got {value}; pass a finite value, or leave "
                                   "the flag out for its default.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(f"Unknown training settings {unknown}; known: {', '.join(sorted(known))}.")
        return cls(**data)
