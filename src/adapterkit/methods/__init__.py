"""One file per functional form; importing this package registers them all."""

from .bottleneck import BottleneckConfig
from .ia3 import IA3Config
from .lora import LoRAConfig
from .prefix_tuning import PrefixTuningConfig

__all__ = ["BottleneckConfig", "LoRAConfig", "IA3Config", "PrefixTuningConfig"]
