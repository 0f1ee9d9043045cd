"""Qwen3-MoE on disk: the hub (and `save_pretrained`) keeps one tensor per expert and projection, while
`engine/moe.py` holds each layer's experts fused (`experts.gate_up_proj` [E, 2I, H] with the gate rows first,
`experts.down_proj` [E, H, I]) for the grouped GEMMs. `hf_tensors` / `from_hf_tensors` convert between the two;
`read_experts` reads some experts only (a rank's FSDP shard of the fused weights: FSDP2 shards the expert dim)."""
from __future__ import annotations

import torch

EXPERT_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def fused_expert(key: str) -> str | None:
    """The projection name if `key` is a fused expert weight (`...mlp.experts.gate_up_proj`), else None."""
    base, _, leaf = key.rpartition(".")
    return leaf if base.endswith("mlp.experts") and leaf in EXPERT_PROJECTIONS else None


def hf_tensors(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A parameter stored under HF `key` as the checkpoint tensors it is saved as: fused expert weights split
    into HF's per-expert `experts.{e}.{gate,up,down}_proj.weight` views, anything else as is."""
    leaf = fused_expert(key)
    if leaf is None:
        return {key: tensor}
    projections = EXPERT_PROJECTIONS[leaf]
    parts = tensor.unflatten(1, (len(projections), -1))  # [E, 2, I, H] for gate_up, [E, 1, H, I] for down
    base = key.rpartition(".")[0]
    return {f"{base}.{e}.{projection}.weight": parts[e, i]
            for e in range(tensor.shape[0]) for i, projection in enumerate(projections)}


def from_hf_tensors(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `hf_tensors`: the checkpoint tensors (in `hf_tensors`' key order) as the parameter."""
    leaf = fused_expert(key)
    if leaf is None:
        return tensors[0]
    n = len(EXPERT_PROJECTIONS[leaf])
    return torch.stack([torch.cat(tensors[i:i + n]) for i in range(0, len(tensors), n)])


def read_experts(key: str, experts: range, read) -> torch.Tensor:
    """The fused expert parameter `key` restricted to `experts` ([len(experts), ...]), from HF's per-expert
    tensors; `read(hf_key)` returns one of them."""
    base, projections = key.rpartition(".")[0], EXPERT_PROJECTIONS[fused_expert(key)]
    return from_hf_tensors(key, [read(f"{base}.{e}.{projection}.weight") for e in experts for projection in projections])
