"""Qwen3-MoE expert weights on disk. `engine/moe.py` holds each layer's experts fused (`experts.gate_up_proj`
[E, 2I, H] with the gate rows first, `experts.down_proj` [E, H, I]) for the grouped GEMMs; checkpoints store them
in one of three layouts (`ExpertLayout`):

- PER_EXPERT: one tensor per expert and projection, `experts.{e}.{gate,up,down}_proj.weight` (the Qwen3-MoE hub
  files, and what transformers' `save_pretrained` writes for `qwen3_moe`);
- FUSED: the in-memory tensors as they are (transformers ≥ 5 saving a `qwen3_vl_moe` model);
- FUSED_TRANSPOSED: fused, in and out swapped, [E, H, 2I] and [E, I, H] (the Qwen3-VL-MoE hub files, written by
  transformers 4.x; transformers 5 transposes them on load).

`hf_tensors` / `from_hf_tensors` convert between a parameter and its stored tensors; `read_experts` reads some
experts only (a rank's FSDP shard of the fused weights: FSDP2 shards the expert dim); `stored_layout` tells
which layout a checkpoint uses from its tensor shapes."""
from __future__ import annotations

from typing import Literal

import torch

EXPERT_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
PER_EXPERT, FUSED, FUSED_TRANSPOSED = "per_expert", "fused", "fused_transposed"
ExpertLayout = Literal["per_expert", "fused", "fused_transposed"]


def fused_expert(key: str) -> str | None:
    """The projection name if `key` is a fused expert weight (`...mlp.experts.gate_up_proj`), else None."""
    base, _, leaf = key.rpartition(".")
    return leaf if base.endswith("mlp.experts") and leaf in EXPERT_PROJECTIONS else None


def hf_tensors(key: str, tensor: torch.Tensor, layout: ExpertLayout = PER_EXPERT) -> dict[str, torch.Tensor]:
    """A parameter stored under HF `key` as the checkpoint tensors it is saved as (views): fused expert weights in
    `layout`, anything else as is."""
    leaf = fused_expert(key)
    if leaf is None or layout == FUSED:
        return {key: tensor}
    if layout == FUSED_TRANSPOSED:
        return {key: tensor.transpose(1, 2)}
    projections = EXPERT_PROJECTIONS[leaf]
    parts = tensor.unflatten(1, (len(projections), -1))  # [E, 2, I, H] for gate_up, [E, 1, H, I] for down
    base = key.rpartition(".")[0]
    return {f"{base}.{e}.{projection}.weight": parts[e, i]
            for e in range(tensor.shape[0]) for i, projection in enumerate(projections)}


def from_hf_tensors(key: str, tensors: list[torch.Tensor], layout: ExpertLayout = PER_EXPERT) -> torch.Tensor:
    """Inverse of `hf_tensors`: the checkpoint tensors (in `hf_tensors`' key order) as the parameter."""
    leaf = fused_expert(key)
    if leaf is None or layout == FUSED:
        return tensors[0]
    if layout == FUSED_TRANSPOSED:
        return tensors[0].transpose(1, 2).contiguous()
    n = len(EXPERT_PROJECTIONS[leaf])
    return torch.stack([torch.cat(tensors[i:i + n]) for i in range(0, len(tensors), n)])


def read_experts(key: str, experts: range, read, layout: ExpertLayout = PER_EXPERT) -> torch.Tensor:
    """The fused expert parameter `key` restricted to `experts` ([len(experts), ...]), from the checkpoint's
    tensors; `read(hf_key)` returns one of them."""
    if layout != PER_EXPERT:
        return from_hf_tensors(key, [read(key)[experts.start:experts.stop]], layout)
    base, projections = key.rpartition(".")[0], EXPERT_PROJECTIONS[fused_expert(key)]
    return from_hf_tensors(key, [read(f"{base}.{e}.{projection}.weight")
                                 for e in experts for projection in projections])


def stored_layout(shapes: dict[str, list[int]], experts: int, hidden: int, width: int) -> ExpertLayout:
    """The layout of a checkpoint's expert weights from its tensor shapes (key → shape): PER_EXPERT without fused
    keys, else FUSED or FUSED_TRANSPOSED as the fused shapes say. A square gate_up (H = 2I) fits both, so every
    fused tensor votes and the first unambiguous one decides (as transformers' check_dims compares shapes)."""
    for key, shape in shapes.items():
        leaf = fused_expert(key)
        if leaf is None:
            continue
        out, inner = (2 * width, hidden) if leaf == "gate_up_proj" else (hidden, width)
        if out != inner:
            return FUSED if list(shape) == [experts, out, inner] else FUSED_TRANSPOSED
    return FUSED if any(fused_expert(key) for key in shapes) else PER_EXPERT
