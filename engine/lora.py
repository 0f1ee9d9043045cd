"""LoRA (low-rank adapters) on the block linears of `Qwen3`: the baseline full fine-tuning has to beat.

Each targeted `nn.Linear` becomes a `LoRALinear` that keeps the frozen base weight under its own name (so
checkpoints, FSDP units and the HF export see the same `…q_proj.weight`) and adds `lora_A` [r, in] and `lora_B`
[out, r]: y = x Wᵀ + (α/r) · B A dropout(x). A is initialised like PEFT (Kaiming-uniform), B at zero, so training
starts from the base model exactly. Everything else (packing, fused loss, checkpoints, resume) is the trainer's.

Exports: `merged_state_dict` folds W + (α/r)·B A into plain Qwen3 weights (the HF export of `save_model`), and
`save_peft_adapter` writes the adapter alone in PEFT's layout (`adapter_config.json` +
`adapter_model.safetensors`), which `peft.PeftModel.from_pretrained` loads onto the HF model.
"""
from __future__ import annotations

import json
import math
from dataclasses import field
from pathlib import Path
from typing import Annotated, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from pydantic import Field
from torch import nn

from .config_io import settings
from .files import staged_dir
from .model import hf_key

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@settings
class LoRASettings:
    rank: Annotated[int, Field(ge=1)] = 16
    alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))  # default: every block linear
    save_adapter: bool = True          # also write output.dir/final-adapter in PEFT's format

    def __post_init__(self):
        unknown = sorted(set(self.target_modules) - set(BLOCK_LINEARS))
        if unknown or not self.target_modules:
            raise ValueError(f"train.lora.target_modules {unknown or '[]'} are not block linears of Qwen3; choose "
                             f"from {list(BLOCK_LINEARS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """A frozen linear plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return F.linear(x, self.weight) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """(α/r)·B A, the update merged into the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def apply_lora(model: nn.Module, settings: LoRASettings, seed: int | None = None) -> nn.Module:
    """Freezes every parameter of `model` and wraps the targeted linears of each block in place."""
    for param in model.parameters():
        param.requires_grad_(False)
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for block in model.layers:
            for parent in (block.self_attn, block.mlp):
                for name in settings.target_modules:
                    base = getattr(parent, name, None)
                    if isinstance(base, nn.Linear) and not isinstance(base, LoRALinear):
                        setattr(parent, name, LoRALinear(base, settings.rank, settings.scaling, settings.dropout))
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    model.lora = settings
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Plain Qwen3 parameters (qforge names) with every adapter folded in: W + (α/r)·B A, in W's dtype.

    `state` (e.g. the gathered full state dict of an FSDP model) overrides the model's own tensors."""
    state = dict(state) if state is not None else {n: p.detach() for n, p in model.named_parameters()}
    for name, module in lora_modules(model).items():
        a, b = state.pop(f"{name}.lora_A.weight"), state.pop(f"{name}.lora_B.weight")
        weight = state[f"{name}.weight"]
        delta = (b.float().to(weight.device) @ a.float().to(weight.device)) * module.scaling
        state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return state


def save_peft_adapter(model: nn.Module, path: str | Path, key_of, base_model: str | None = None,
                      state: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes the adapters alone in PEFT's format. `key_of` maps a qforge name to the checkpoint key of the HF
    model the adapter belongs to (Qwen3 or Qwen3-VL layout); PEFT prefixes it with `base_model.model.`."""
    settings: LoRASettings = model.lora
    state = state if state is not None else {n: p.detach() for n, p in model.named_parameters()}
    tensors = {}
    for name in lora_modules(model):
        for part in ("lora_A", "lora_B"):
            key = key_of(f"{name}.{part}.weight")
            tensors[f"base_model.model.{key}"] = state[f"{name}.{part}.weight"].detach().to("cpu").contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
              "target_modules": sorted(settings.target_modules), "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
              "inference_mode": True}
    with staged_dir(path) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def export_lora(model: nn.Module, output_dir: Path, base_model: str | None, state: dict | None = None,
                key_of: Callable[[str], str] | None = None) -> dict:
    """The merged state dict for the HF export, after writing `output_dir/final-adapter` (PEFT format) when
    `train.lora.save_adapter` is on. `state`: the gathered full state dict of an FSDP model, if any; `key_of`:
    qforge name → the base checkpoint's key (`checkpoint.Source.key`; default: dense Qwen3's `hf_key`)."""
    if model.lora.save_adapter:
        save_peft_adapter(model, Path(output_dir) / "final-adapter", key_of or hf_key, base_model, state)
    return merged_state_dict(model, state)
