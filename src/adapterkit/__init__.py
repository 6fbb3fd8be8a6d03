"""adapterkit: parameter-efficient fine-tuning of frozen PyTorch models with small adapters.

An adapter is a functional form (bottleneck, LoRA, IA3, ...) placed at sites of a frozen model
(sub-layer outputs, Linear layers) and composed with its output (residual add, scaled add,
multiplication). Named methods are presets of these choices. Start with ``AdapterModel``::

    model = AdapterModel.from_pretrained("minilm")
    model.add_adapter("sst2", "pfeiffer")
    model.add_classification_head("sst2", num_labels=2)
    model.train_adapter("sst2")
"""

__version__ = "0.1.0"

from .composition import Average, BatchSplit, Fuse, Parallel, Stack  # noqa: E402
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
from .methods import BottleneckConfig, IA3Config, LoRAConfig, PrefixTuningConfig, PromptTuningConfig  # noqa: E402
from .model import AdapterModel  # noqa: E402
from .strategies import Strategy, available_strategies, register_strategy  # noqa: E402

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
    "__version__",
]
