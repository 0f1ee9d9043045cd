"""What an HF checkpoint directory holds, read once when loading and handed to the export (`save_model`): the
export writes back the format, dtype and generation settings it came with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Qwen3Config, is_vl_config, read_json
from ..model import hf_key
from . import qwen3_vl
from .layout import GENERATION_CONFIG
from .moe import PER_EXPERT, ExpertLayout, fused_expert, stored_layout
from .tensors import open_tensors, stored_dtype, tensor_files


@dataclass(frozen=True)
class Source:
    """An HF checkpoint directory: its decoder config, on-disk format and stored dtype, and which file holds
    each tensor qforge loads (a Qwen3-VL checkpoint's vision tower stays on disk until its export copies it)."""
    path: Path
    config: Qwen3Config
    vl: bool                          # the language model of a Qwen3-VL checkpoint (`checkpoint/qwen3_vl.py`)
    dtype: torch.dtype                # the tensors' stored dtype: what the export writes back by default
    key_files: dict[str, Path]        # checkpoint key → safetensors file, for the tensors qforge loads
    generation_config: dict           # generation_config.json ({} without one)
    experts: ExpertLayout = PER_EXPERT  # how a MoE checkpoint stores its expert weights (`checkpoint/moe.py`)

    def key(self, name: str) -> str:
        """qforge parameter name → its key in this checkpoint's safetensors files."""
        return qwen3_vl.checkpoint_key(name) if self.vl else hf_key(name)


def read_source(path: str | Path) -> Source:
    """Reads config.json, the safetensors index or headers and generation_config.json of `path` (no weights)."""
    path = Path(path)
    config = Qwen3Config.from_json(path / "config.json")
    vl = is_vl_config(read_json(path / "config.json"))
    key_files = tensor_files(path)
    if vl:
        key_files = {key: file for key, file in key_files.items() if qwen3_vl.is_language_key(key)}
    generation = read_json(path / GENERATION_CONFIG) if (path / GENERATION_CONFIG).is_file() else {}
    experts = PER_EXPERT
    if config.num_experts:
        experts = stored_layout(_fused_shapes(key_files), config.num_experts, config.hidden_size,
                                config.moe_intermediate_size)
    return Source(path, config, vl, stored_dtype(key_files), key_files, generation, experts)


def _fused_shapes(key_files: dict[str, Path]) -> dict[str, list[int]]:
    """The header shapes of the fused expert tensors (none in a per-expert checkpoint)."""
    shapes = {}
    for file in sorted({file for key, file in key_files.items() if fused_expert(key)}):
        with open_tensors(file) as tensors:
            shapes.update({key: tensors.get_slice(key).get_shape() for key in tensors.keys() if fused_expert(key)})
    return shapes
