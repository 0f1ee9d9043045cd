"""LoRA (low-rank adapters) on the block linears of `Qwen3`: the baseline full fine-tuning has to beat.

Each targeted `nn.Linear` becomes a `LoRALinear` that keeps the frozen base weight under its own name (so
checkpoints, FSDP units and the HF export see the same `…q_proj.weight`) and adds `lora_A` [r, in] and `lora_B`
[out, r]: y = x Wᵀ + (α/r) · B A dropout(x). A is initialised like PEFT (Kaiming-uniform), B at zero, so training
starts from the base model exactly. Everything else (packing, fused loss, checkpoints, resume) is the trainer's.

Qwen3-MoE experts (`engine/moe.py`: fused `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) are targeted by
PEFT's parameter names, `experts.gate_up_proj` / `experts.down_proj`: `LoRAExperts` adds a rank-r update per expert,
W_e + (α/r)·B_e A_e as PEFT's `target_parameters` LoRA (ParamWrapper) does, but never forms W + BA: the low-rank
path runs on the expert-sorted rows through the grouped GEMM, (x A_eᵀ) B_eᵀ.

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

from qforge.kernels import moe_grouped_gemm, swiglu

from .config_io import settings
from .files import staged_dir
from .model import hf_key
from .moe import Experts
from .precision import autocast_weight

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT's `target_parameters` for the fused expert weights, in the experts' parameter order (PEFT nests its wrappers
# in that order: the first is the innermost, `experts.base_layer.lora_A` when both are targeted)
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")


@settings
class LoRASettings:
    rank: Annotated[int, Field(ge=1)] = 16
    alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # default: every block linear; a MoE model's experts only when listed (EXPERT_TARGETS)
    target_modules: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))
    save_adapter: bool = True          # also write output.dir/final-adapter in PEFT's format

    def __post_init__(self):
        unknown = sorted(set(self.target_modules) - set(BLOCK_LINEARS) - set(EXPERT_TARGETS))
        if unknown or not self.target_modules:
            raise ValueError(f"train.lora.target_modules {unknown or '[]'} are not block linears or expert weights of "
                             f"Qwen3; choose from {list(BLOCK_LINEARS + EXPERT_TARGETS)}")
        if self.expert_targets and self.dropout:
            raise ValueError(f"train.lora.dropout is {self.dropout} but LoRA on {list(self.expert_targets)} has no "
                             f"dropout (PEFT's expert LoRA refuses it too); set train.lora.dropout: 0")

    @property
    def linear_targets(self) -> list[str]:
        return sorted(set(self.target_modules) & set(BLOCK_LINEARS))

    @property
    def expert_targets(self) -> tuple[str, ...]:
        """The targeted expert weights, in EXPERT_TARGETS' (PEFT's nesting) order."""
        return tuple(t for t in EXPERT_TARGETS if t in self.target_modules)

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


class LoRAExperts(Experts):
    """Frozen fused experts plus a trainable rank-r update of each targeted projection, per expert:
    `lora_A.<projection>` [E, r, in] and `lora_B.<projection>` [E, out, r], y_e = x W_eᵀ + (α/r)·(x A_eᵀ) B_eᵀ.
    The base weights keep their names (`experts.gate_up_proj`), so loading, FSDP and the export see them as before.
    The fused expert MLP has no room for the adapters: this runs gate/up → SwiGLU → down as grouped GEMMs."""

    def __init__(self, base: Experts, projections: tuple[str, ...], rank: int, scaling: float):
        nn.Module.__init__(self)
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.scaling = scaling
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for projection in projections:
            weight = getattr(self, projection)
            weight.requires_grad_(False)
            experts, out_features, in_features = weight.shape
            factory = dict(device=weight.device, dtype=weight.dtype)
            self.lora_A[projection] = nn.Parameter(torch.empty(experts, rank, in_features, **factory))
            self.lora_B[projection] = nn.Parameter(torch.empty(experts, out_features, rank, **factory))
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self):
        """PEFT's init: Kaiming-uniform on A viewed as its [E·r, in] `lora_A.weight` (fan-in `in`), B zero."""
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a.view(-1, a.shape[-1]), a=math.sqrt(5))
        for b in self.lora_B.values():
            nn.init.zeros_(b)

    def forward(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        gate, up = self._project("gate_up_proj", rows, offsets).chunk(2, dim=-1)
        return self._project("down_proj", swiglu(gate, up), offsets)

    def _project(self, projection: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        out = moe_grouped_gemm(x, autocast_weight(getattr(self, projection), x), offsets)
        if projection not in self.lora_A:
            return out
        a, b = (autocast_weight(w, x) for w in (self.lora_A[projection], self.lora_B[projection]))
        pad = -a.shape[1] % (16 // x.element_size())  # torch._grouped_mm wants 16-byte rows: zero rank slots
        if pad:
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        return out + moe_grouped_gemm(moe_grouped_gemm(x, a, offsets), b, offsets) * self.scaling


def apply_lora(model: nn.Module, settings: LoRASettings, seed: int | None = None) -> nn.Module:
    """Freezes every parameter of `model` and wraps the targeted linears (and experts) of each block in place."""
    for param in model.parameters():
        param.requires_grad_(False)
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for block in model.layers:
            for parent in (block.self_attn, block.mlp):
                for name in settings.linear_targets:
                    base = getattr(parent, name, None)
                    if isinstance(base, nn.Linear) and not isinstance(base, LoRALinear):
                        setattr(parent, name, LoRALinear(base, settings.rank, settings.scaling, settings.dropout))
            experts = getattr(block.mlp, "experts", None)
            if settings.expert_targets and isinstance(experts, Experts) and not isinstance(experts, LoRAExperts):
                projections = tuple(t.rpartition(".")[2] for t in settings.expert_targets)
                block.mlp.experts = LoRAExperts(experts, projections, settings.rank, settings.scaling)
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    model.lora = settings
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_experts(model: nn.Module) -> dict[str, LoRAExperts]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRAExperts)}


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
    for name, module in lora_experts(model).items():
        for projection in list(module.lora_A):
            a, b = state.pop(f"{name}.lora_A.{projection}"), state.pop(f"{name}.lora_B.{projection}")
            weight = state[f"{name}.{projection}"]
            merged = torch.empty_like(weight)
            for e in range(weight.shape[0]):  # one expert at a time: no fp32 copy of the whole stack
                delta = (b[e].float().to(weight.device) @ a[e].float().to(weight.device)) * module.scaling
                merged[e] = (weight[e].float() + delta).to(weight.dtype)
            state[f"{name}.{projection}"] = merged
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
    for name, module in lora_experts(model).items():
        tensors.update(_peft_expert_tensors(name, list(module.lora_A), key_of, state))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
              "target_modules": settings.linear_targets, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
              "inference_mode": True}
    if settings.expert_targets:
        config["target_parameters"] = list(settings.expert_targets)
    with staged_dir(path) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def _peft_expert_tensors(name: str, projections: list[str], key_of, state: dict) -> dict[str, torch.Tensor]:
    """One experts module's adapters as PEFT's ParamWrapper stores them: `lora_A.weight` [E·r, in] (expert-major
    rows) and `lora_B.weight` [out, r·E] (column k·E + e is expert e's column k). PEFT wraps the targeted weights one
    inside the other in the experts' parameter order, so all but the last sit under `base_layer.` prefixes."""
    tensors = {}
    for depth, projection in enumerate(projections):
        module_key = key_of(f"{name}.{projection}").rpartition(".")[0]
        prefix = f"base_model.model.{module_key}." + "base_layer." * (len(projections) - 1 - depth)
        a, b = (state[f"{name}.{part}.{projection}"].detach().to("cpu") for part in ("lora_A", "lora_B"))
        tensors[prefix + "lora_A.weight"] = a.reshape(-1, a.shape[-1]).contiguous()
        tensors[prefix + "lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], -1).contiguous()
    return tensors


def export_lora(model: nn.Module, output_dir: Path, base_model: str | None, state: dict | None = None,
                key_of: Callable[[str], str] | None = None) -> dict:
    """The merged state dict for the HF export, after writing `output_dir/final-adapter` (PEFT format) when
    `train.lora.save_adapter` is on. `state`: the gathered full state dict of an FSDP model, if any; `key_of`:
    qforge name → the base checkpoint's key (`checkpoint.Source.key`; default: dense Qwen3's `hf_key`)."""
    if model.lora.save_adapter:
        save_peft_adapter(model, Path(output_dir) / "final-adapter", key_of or hf_key, base_model, state)
    return merged_state_dict(model, state)
