"""Training adapters on data files: the loop behind ``adapterkit train``.

>>> from adapterkit.train import TrainConfig, train
>>> cfg = TrainConfig(model="minilm", train="data/train.tsv", eval="data/dev.tsv")  # doctest: +SKIP
>>> results = train(cfg, "runs/sst2")                                                # doctest: +SKIP

Modules: ``config`` (settings and defaults), ``batches`` (order, sharding, padding), ``optim``
(AdamW, schedule, optimizer state as safetensors), ``checkpoint`` (run folder, atomic writes,
resumable state), ``evaluate`` / ``metrics`` (per-task metrics, ``metrics.jsonl``), ``plots``
(``training.png``), ``distributed`` (torchrun / DDP), ``progress`` (tqdm bar or log lines),
``loop`` (``prepare`` validates everything before anything is written, ``fit`` trains),
``activation_cache`` (``--cache-activations``: the frozen layers below the adapter once per batch).
"""

from .config import TrainConfig
from .loop import Prepared, fit, prepare, train

__all__ = ["TrainConfig", "Prepared", "prepare", "fit", "train"]
