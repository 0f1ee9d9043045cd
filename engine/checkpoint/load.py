"""Loading an HF checkpoint straight from safetensors into a `Qwen3`.

The module is built on the meta device and each parameter filled from the memory-mapped safetensors file one
tensor at a time, so peak RAM is about one copy of the weights.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from ..model import Qwen3
from .moe import from_hf_tensors, hf_tensors
from .source import Source, read_source
from .tensors import check_tensors, open_tensors


def load_model(source: Source | str | Path, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu") -> Qwen3:
    """Loads an HF Qwen3 checkpoint directory (single-file or sharded safetensors; dense, MoE, or the language
    model of a Qwen3-VL or Qwen3-VL-MoE checkpoint) into a `Qwen3`. Pass the `Source` (`read_source`) to export it
    back later."""
    source = source if isinstance(source, Source) else read_source(source)
    with torch.device("meta"):
        model = Qwen3(source.config)
    # MoE experts: in the checkpoint's layout (per expert, or fused and maybe transposed)
    parts = {name: hf_tensors(source.key(name), param, source.experts) for name, param in model.named_parameters()}
    expected = {key: part for split in parts.values() for key, part in split.items()}
    check_tensors(source.path, source.config, expected, source.key_files)

    key_files = source.key_files
    with contextlib.ExitStack() as stack:
        files = {file: stack.enter_context(open_tensors(file, device="cpu"))
                 for file in {key_files[key] for key in expected}}
        for name, split in parts.items():
            tensors = [files[key_files[key]].get_tensor(key).to(device=device, dtype=dtype) for key in split]
            _assign(model, name, from_hf_tensors(source.key(name), tensors, source.experts))
    model.reset_buffers()
    return model


def _assign(model: nn.Module, name: str, tensor: torch.Tensor):
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
