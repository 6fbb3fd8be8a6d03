"""One file per functional form; importing this package registers them all."""

from .bottleneck import BottleneckConfig
from .ia3 import IA3Config
from .l_adapter import LAdapterConfig
from .layer_norms import TrainLayerNorms
from .lora import LoRAConfig
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig
from .union import ConfigUnion

__all__ = ["BottleneckConfig", "LoRAConfig", "IA3Config", "LAdapterConfig", "PrefixTuningConfig", "PromptTuningConfig",
           "ConfigUnion", "TrainLayerNorms"]
