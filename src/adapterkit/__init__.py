"""adapterkit: parameter-efficient fine-tuning of frozen PyTorch models with small adapters.

An adapter is a functional form (bottleneck, LoRA, IA3, ...) placed at sites of a frozen model
(sub-layer outputs, Linear layers) and composed with its output (residual add, scaled add,
multiplication). Named methods are presets of these choices. Start with ``AdapterModel``::

    model = AdapterModel.from_pretrained("minilm")
    model.add_adapter("sst2", "pfeiffer")
    model.add_classification_head("sst2", num_labels=2)
    model.train_adapter("sst2")
"""

import importlib  # noqa: E402
import logging as _logging

# torchao (the `quant` extra), once installed, is imported by transformers at start-up; on a CPU build
# it logs that its CUDA kernels cannot load, and torch warns about torchao's enums. Neither concerns
# a user of adapterkit, and on every command they would bury the one-line answers, so those two
# loggers are quieted to errors unless the application set a level for them itself.
for _name in ("torchao", "torch.utils._pytree"):
    if _logging.getLogger(_name).level == _logging.NOTSET:
        _logging.getLogger(_name).setLevel(_logging.ERROR)

from ._version import __version__  # noqa: E402,F401

from .aux_loss import collect_aux_loss  # noqa: E402
from .composition.blocks import Average, BatchSplit, Fuse, Parallel, Stack  # noqa: E402
from .config import (  # noqa: E402
    AdapterConfig,
    available_methods,
    available_presets,
    config_from_dict,
    register_method,
    register_preset,
    resolve_config,
)
from .errors import AdapterError, CheckpointError  # noqa: E402
from .heads import HeadConfig  # noqa: E402
from .methods.base import AdapterModule  # noqa: E402,F401 - the base class of a user's own method
from .methods import BottleneckConfig, IA3Config, LoRAConfig, PrefixTuningConfig, PromptTuningConfig  # noqa: E402
from .model import AdapterModel  # noqa: E402
from .strategies import Strategy, available_strategies, register_strategy  # noqa: E402
from .adapterhub_api import (  # noqa: E402  AdapterHub's entry points: `import adapterkit as adapters`
    AutoAdapterModel,
    DoubleSeqBnConfig,
    ParBnConfig,
    SeqBnConfig,
    init,
)
from . import _moved  # noqa: E402

_moved.install()


def __getattr__(name: str):
    """``AdapterTrainer`` (``train/adapterhub.py``) is imported on first use: importing adapterkit
    does not import ``transformers.Trainer``."""
    if name == "AdapterTrainer":
        return importlib.import_module("adapterkit.train.adapterhub").AdapterTrainer
    raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")

__all__ = [
    "AdapterModel",
    "AdapterConfig",
    "BottleneckConfig",
    "LoRAConfig",
    "IA3Config",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "HeadConfig",
    "Stack",
    "Average",
    "Parallel",
    "Fuse",
    "BatchSplit",
    "AdapterError",
    "collect_aux_loss",
    "CheckpointError",
    "register_method",
    "register_preset",
    "register_strategy",
    "available_strategies",
    "Strategy",
    "resolve_config",
    "config_from_dict",
    "available_methods",
    "available_presets",
    "AutoAdapterModel",
    "init",
    "SeqBnConfig",
    "DoubleSeqBnConfig",
    "ParBnConfig",
    "__version__",
]
