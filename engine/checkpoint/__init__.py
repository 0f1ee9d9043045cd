"""HF-format Qwen3 checkpoints: load straight from safetensors, save what transformers loads.

`read_source` learns what a checkpoint directory holds (a `Source`), `load_model` fills a `Qwen3` from it and
`save_model` writes a model back in the source's format and dtype. Modules: `source` (the description), `load`,
`save` (the dense / MoE writer), `qwen3_vl` (the Qwen3-VL format), `moe` (per-expert tensors on disk), `tensors`
(safetensors reading), `layout` (tokenizer and generation_config.json files). Training checkpoints (exact resume)
are another thing: engine/train/resume.py.
"""
from ..errors import CheckpointError, ConfigError
from .layout import TOKENIZER_FILES
from .load import load_model
from .save import save_model
from .source import Source, read_source
from .tensors import parse_size

__all__ = ["TOKENIZER_FILES", "CheckpointError", "ConfigError", "Source", "load_model", "parse_size", "read_source",
           "save_model"]
