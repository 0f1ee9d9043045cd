"""The sequence of collectives each fake rank issues, and the first place two ranks differ.

On a real cluster a collective that one rank issues and another does not (or issues with other shapes, dtypes
or group) is a hang until the NCCL timeout, not an error. The twin runs the same traced code once per rank
(the fake process group's `rank` set to each one), records every c10d / functional collective at the dispatcher
(op, shapes, dtypes, group; the qforge call site for the message), and compares the sequences: the first
divergence is a one-line `CollectiveDivergence`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .contracts import call_site
from .fake_cuda import in_sharding_propagation

_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
_NOT_COLLECTIVES = {"wait_tensor", "wait", "monitored_barrier_"}  # completion waits, not collectives


class CollectiveDivergence(RuntimeError):
    """Two ranks would issue different collectives at the same point: a hang on a real cluster."""


def _group(args) -> str:
    for arg in tree_flatten(args)[0]:
        if isinstance(arg, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(arg).group_name
            except (RuntimeError, AttributeError):
                return str(arg)
    strings = [a for a in args if isinstance(a, str)]  # functional collectives name their group
    return strings[-1] if strings else "?"


class Collectives(TorchDispatchMode):
    """Records (op, shapes, dtypes, group) of every collective this rank issues, with its call site."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []
        self.region = "step"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        name = func._overloadpacket.__name__
        if func.namespace in _NAMESPACES and name not in _NOT_COLLECTIVES and not in_sharding_propagation():
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            self.calls.append({"op": name, "shapes": [list(t.shape) for t in tensors],
                               "dtypes": [str(t.dtype).replace("torch.", "") for t in tensors],
                               "group": _group(args), "region": self.region, "site": call_site()})
        return func(*args, **kwargs)


_KINDS = {"_allgather_base_": "all-gather", "all_gather_into_tensor": "all-gather", "allgather_": "all-gather",
          "_reduce_scatter_base_": "reduce-scatter", "reduce_scatter_tensor": "reduce-scatter",
          "allreduce_": "all-reduce", "all_reduce": "all-reduce", "alltoall_base_": "all-to-all",
          "all_to_all_single": "all-to-all", "broadcast_": "broadcast"}


def volume(calls: list[dict]) -> dict:
    """Per kind of collective: calls and bytes of the full (gathered / unreduced) tensor of each call, the size
    a ring moves (n−1)/n of per rank (the roofline's "communication" bytes, split by kind)."""
    out: dict = {}
    for call in calls:
        size = max((_numel(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
                    for shape, dtype in zip(call["shapes"], call["dtypes"])), default=0)
        row = out.setdefault(_KINDS.get(call["op"], call["op"]), {"calls": 0, "bytes": 0})
        row["calls"] += 1
        row["bytes"] += size
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def signature(call: dict) -> tuple:
    """What every rank must agree on (the call site may differ: it is only named in the message)."""
    return call["op"], str(call["shapes"]), str(call["dtypes"]), call["group"]


def _describe(call: dict) -> str:
    shapes = ", ".join(f"{d}{s}" for s, d in zip(call["shapes"], call["dtypes"]))
    return f"{call['op']}({shapes}; group {call['group']}) at {call['site']} [{call['region']}]"


def first_divergence(sequences: dict[int, list[dict]]) -> str | None:
    """The first collective where a rank's sequence differs from the lowest rank's, as one line; None if none."""
    base_rank = min(sequences)
    base = sequences[base_rank]
    for rank, calls in sorted(sequences.items()):
        for i in range(max(len(base), len(calls))):
            mine = calls[i] if i < len(calls) else None
            theirs = base[i] if i < len(base) else None
            if mine is not None and theirs is not None and signature(mine) == signature(theirs):
                continue
            if mine is None:
                return (f"collective #{i + 1}: rank {base_rank} issues {_describe(theirs)}, rank {rank} issues none "
                        f"(it has finished its {len(calls)}): a hang on a real cluster")
            if theirs is None:
                return (f"collective #{i + 1}: rank {rank} issues {_describe(mine)}, rank {base_rank} issues none "
                        f"(it has finished its {len(base)}): a hang on a real cluster")
            return (f"collective #{i + 1}: rank {base_rank} issues {_describe(theirs)}, rank {rank} issues "
                    f"{_describe(mine)}: a hang (or a wrong result) on a real cluster")
    return None


def check_sequences(sequences: dict[int, list[dict]]):
    problem = first_divergence(sequences)
    if problem:
        raise CollectiveDivergence(problem)
