"""GPT-1 pre-training and fine-tuning on fused Triton kernels, trained through DeepSpeed."""

from .config import PRESETS, GPT1Config, get_config
from .model import GPT1, GPT1Output

__all__ = ["GPT1", "PRESETS", "GPT1Config", "GPT1Output", "get_config"]
