"""Process-group setup and FSDP2 sharding (one unit per transformer block) for `torchrun` launches.

Nothing home-made: `fully_shard` shards parameters, gradients and optimizer state; the root unit holds the
embedding, final norm and output head (tied weights stay in one unit). A single process runs unsharded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, value: float | torch.Tensor) -> torch.Tensor:
        """Sum over ranks in fp64 (token and weight counts must not lose integers)."""
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self):
        if self.enabled:
            dist.barrier()


def init_distributed(device: str = "auto") -> Dist:
    """Reads torchrun's environment; NCCL on CUDA, gloo on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    target = _device(device)
    if target.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Dist(rank, world, target)


def _device(name: str) -> torch.device:
    """train.device as a device this machine has (the config allows auto, cpu, cuda), else a ConfigError."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ConfigError(f"train.device={name!r} but {why}; use train.device=auto or cpu")
    return torch.device(name)


def shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None) -> torch.nn.Module:
    """FSDP2: each block its own unit, then the root; `loss` becomes an FSDP forward method."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    register_fsdp_forward_method(model, "loss")
    register_fsdp_forward_method(model, "hidden")
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) parameters on CPU, on every rank that asks; what the HF export writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
