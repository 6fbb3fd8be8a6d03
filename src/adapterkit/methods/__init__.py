"""One file per functional form; importing this package registers them all."""

from .bottleneck import BottleneckConfig
from .compacter import CompacterConfig
from .dora import DoRAConfig
from .ia3 import IA3Config
from .l_adapter import LAdapterConfig
from .layer_norms import TrainLayerNorms
from .lora import LoRAConfig
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig
from .reft import ReftConfig
from .union import ConfigUnion
from .unipelt import UNIPELT
from .vera import VeRAConfig

__all__ = ["BottleneckConfig", "LoRAConfig", "DoRAConfig", "IA3Config", "LAdapterConfig", "PrefixTuningConfig", "PromptTuningConfig",
           "ConfigUnion", "TrainLayerNorms", "VeRAConfig", "ReftConfig", "CompacterConfig", "UNIPELT"]
