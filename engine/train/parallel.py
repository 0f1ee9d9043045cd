"""Process-group setup and FSDP2 sharding (one unit per transformer block) for `torchrun` launches.

Nothing home-made: `fully_shard` shards parameters, gradients and optimizer state; the root unit holds the
embedding, final norm and output head (tied weights stay in one unit). A single process runs unsharded.
`load_sharded` fills a sharded model from an HF checkpoint, each rank reading only its own rows.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..checkpoint import Source, read_source
from ..checkpoint.moe import fused_expert, hf_tensors, read_experts
from ..checkpoint.tensors import check_tensors, open_tensors
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
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to(torch.float64).clone()
        else:
            tensor = torch.tensor(value, dtype=torch.float64).to(self.device)
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def from_main(self, value):
        """Rank 0's `value` (a picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str = "auto", timeout_s: float = 7200.0) -> Dist:
    """Reads torchrun's environment; NCCL on CUDA, gloo on CPU.

    `timeout_s` bounds every collective, including the barrier other ranks wait in while rank 0 tokenises a
    large dataset on a first run (NCCL's 10-minute default would kill them)."""
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
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Dist(rank, world, target)


def _device(name: str) -> torch.device:
    """train.device as a device this machine has (the config allows auto, cpu, cuda), else a ConfigError."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ConfigError(f"train.device={name!r} but {why}; use train.device=auto or cpu")
    return torch.device(name)


def shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None, device: torch.device | None = None,
                mesh=None) -> torch.nn.Module:
    """FSDP2: each block its own unit, then the root; `loss` becomes an FSDP forward method.

    Works on a meta-device model (then materialise each rank's shards, see `load_sharded`).
    - `cast_forward_inputs=False`: the inputs are token ids plus `loss_weight`, which must stay fp32 (a bf16
      1/3 is 0.333984); the embedding's bf16 output already starts the bf16 compute.
    - Only `loss` (and `forward`) are FSDP entry points: `hidden` runs inside them, and registering it too made
      its post-forward reshard the root unit (embedding + head) that the loss and backward gather again.
    - Gradients are reduce-scattered after every micro-batch (no `set_requires_gradient_sync(False)`): with
      `reduce_dtype=float32` skipping the sync keeps every block's unsharded fp32 gradient (see README, twin)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if mesh is None and device is not None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "loss")
    return model


def load_sharded(model: torch.nn.Module, source: Source | str | Path, device: str | torch.device,
                 skip=()) -> torch.nn.Module:
    """Fills a model sharded on the meta device (`shard_model`) from an HF checkpoint directory: each rank
    allocates only its own shards on `device` and reads only their rows from the memory-mapped safetensors.
    Parameters named in `skip` (e.g. LoRA adapters) are not in the checkpoint: allocated, left for the caller."""
    source = source if isinstance(source, Source) else read_source(source)
    params = {name: p for name, p in model.named_parameters() if name not in skip}
    shapes = {source.key(name): torch.empty(p.shape, dtype=p.dtype, device="meta") for name, p in params.items()}
    expected = {key: part for name, meta in shapes.items()
                for key, part in hf_tensors(name, meta, source.experts).items()}
    check_tensors(source.path, source.config, expected, source.key_files)
    model.to_empty(device=device)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        files = {file: stack.enter_context(open_tensors(file)) for file in {source.key_files[k] for k in expected}}

        def stored(key):
            return files[source.key_files[key]].get_slice(key)

        for name, param in params.items():
            local = param.to_local() if isinstance(param, DTensor) else param
            if not local.numel():
                continue
            key, index = source.key(name), local_index(param)
            if fused_expert(key):  # stored per expert or transposed: read this shard's experts (FSDP2 shards dim 0)
                experts = range(param.shape[0])[index[0]]
                local.copy_(read_experts(key, experts, lambda k: stored(k)[:], source.experts)[
                    (slice(None), *index[1:])])
            else:
                local.copy_(stored(key)[index])
    model.reset_buffers()
    return model


def local_index(param: torch.Tensor) -> tuple[slice, ...]:
    """The rows (a slice per dimension) of the full tensor that this rank's shard of `param` holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return tuple(slice(None) for _ in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) parameters on CPU, on every rank that asks; what the HF export writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
