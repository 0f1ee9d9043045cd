"""Host-device synchronisations: every op whose result the host must wait for (`.item()`, `bool(t)`,
`float(t)`, `torch.equal`, `nonzero`, `unique`, ...) on a fake CUDA tensor is recorded with its qforge
call site and phase, then answered with a stand-in value so the step can go on.

Stand-in answers: a bool is False (so "any bad label?" checks pass and "all tokens take part?" takes the
realistic branch), a number is 1, `nonzero` returns `labelled_rows` rows (the only `nonzero` in a step picks the
labelled tokens for the fused loss), `repeat_interleave` without `output_size` returns `packed_tokens` elements
(it only ever expands a micro-batch's sequence lengths to its tokens: DPO's per-sequence sums), `unique` keeps
every element.
"""
from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from .contracts import call_site
from .fake_cuda import on_device

aten = torch.ops.aten
_SCALAR_OPS = {aten._local_scalar_dense, aten.equal, aten.is_nonzero}
_DYNAMIC_OPS = {aten.nonzero, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.masked_select,
                aten.repeat_interleave}


def where() -> str:
    """"backward" while the autograd engine runs, "forward" inside `Qwen3.loss`/`forward` (or DPO's
    `sequence_logps`, distillation's `student_kl_loss` / the teacher's `score`), else "between"
    (the trainer's own code between micro-batches or around the step)."""
    if torch._C._current_graph_task_id() != -1:
        return "backward"
    for frame in traceback.extract_stack():
        if frame.filename.endswith("engine/model.py") and frame.name in ("loss", "forward", "hidden") or \
                frame.filename.endswith("engine/train/dpo.py") and frame.name == "sequence_logps" or \
                frame.filename.endswith("engine/train/distill.py") and frame.name in ("student_kl_loss",
                                                                                      "_teacher_score"):
            return "forward"
    return "between"


class HostSyncs(TorchDispatchMode):
    def __init__(self, labelled_rows: int, packed_tokens: int = 0):
        super().__init__()
        self.labelled_rows, self.packed_tokens = labelled_rows, packed_tokens
        self.sites: Counter = Counter()
        self.region = "step"  # set by the runner: "micro-batch" while train_step runs, else "step"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        packet = func._overloadpacket
        if packet not in _SCALAR_OPS | _DYNAMIC_OPS or not any(on_device(a) for a in args) or \
                (packet is aten.repeat_interleave and (func is not aten.repeat_interleave.Tensor or
                                                       kwargs.get("output_size") is not None)):
            return func(*args, **kwargs)
        self.sites[(call_site(), packet.__name__, self.region, where())] += 1
        source = args[0]
        if packet is aten._local_scalar_dense:
            return False if source.dtype == torch.bool else (1.0 if source.dtype.is_floating_point else 1)
        if packet in (aten.equal, aten.is_nonzero):
            return False
        if packet is aten.nonzero:
            rows = min(source.numel(), self.labelled_rows)
            return torch.empty(rows, source.dim(), dtype=torch.long, device=source.device)
        if packet is aten.repeat_interleave:
            return torch.empty(self.packed_tokens, dtype=source.dtype, device=source.device)
        if packet is aten.masked_select:
            return torch.empty(source.numel(), dtype=source.dtype, device=source.device)
        flat = source.reshape(-1)
        out = torch.empty_like(flat)
        inverse = torch.empty(source.shape, dtype=torch.long, device=source.device)
        counts = torch.empty(flat.shape, dtype=torch.long, device=source.device)
        return out, inverse, counts

    def records(self) -> list[dict]:
        return [{"site": site, "op": op, "region": region, "where": ph, "count": n}
                for (site, op, region, ph), n in sorted(self.sites.items())]
