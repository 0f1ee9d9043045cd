"""qforge engine: the Qwen3 model, its HF-format checkpoints, data, training and generation."""
from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, Qwen3Config
from .generate import generate
from .model import Qwen3

__all__ = ["CheckpointError", "ConfigError", "Qwen3", "Qwen3Config", "generate", "load_model", "save_model"]
