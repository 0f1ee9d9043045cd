"""The HF exports traced at real shapes on every fake rank: `checkpoint.save_model` of an FSDP2 model (full
fine-tuning's `final/`: parameters gathered one at a time in the output dtype, file i written by rank i % world)
and `parallel.full_state_dict` (what LoRA's export and the evaluation snapshots gather: fp32, offloaded to rank
0's host).

Nothing is written: safetensors' `save_file` is a null sink that records each rank's files and bytes; a
device→host copy (`.to("cpu")` / `.cpu()` of a tensor on the fake GPU) becomes a real, untouched host buffer of
the copy's size whose lifetime is followed, so host memory (what rank i holds at once) and device memory (torch's
MemTracker) are measured apart. `save_model`'s broadcast of rank 0's staging directory (a pickled object the fake
process group cannot carry) returns rank 0's value. Every rank's collectives are recorded and compared
(`collectives.check_sequences`).
"""
from __future__ import annotations

import contextlib
import tempfile
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import _disable_current_modes

from qforge.engine.checkpoint import save as checkpoint
from qforge.engine.train.parallel import Dist

from .collectives import Collectives, check_sequences
from .fake_cuda import FakeDeviceFunctions, target_device, mark_sharding_propagation, on_device
from .load import device_memory_tracker, host_shard_arithmetic
from .models import resolve_config


class HostCopies(FakeDeviceFunctions):
    """FakeDeviceFunctions, plus: a device→host copy is a real host buffer (never touched), its bytes followed
    until freed (`peak_host_bytes`)."""

    def __init__(self, fake_mode: FakeTensorMode):
        super().__init__(fake_mode)
        self.live_host_bytes = self.peak_host_bytes = 0

    def _freed(self, nbytes: int):
        self.live_host_bytes -= nbytes

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_host = func is torch.Tensor.cpu or func is torch.Tensor.to and str(target_device(args, kwargs)) == "cpu"
        if to_host and on_device(args[0]) and not isinstance(args[0], DTensor):  # a DTensor's .to(its mesh's
            source = args[0]                                                       # device) stays on the GPU
            dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), source.dtype)
            with _disable_current_modes():
                host = torch.empty(source.shape, dtype=dtype)
            nbytes = host.numel() * dtype.itemsize
            self.live_host_bytes += nbytes
            self.peak_host_bytes = max(self.peak_host_bytes, self.live_host_bytes)
            weakref.finalize(host, self._freed, nbytes)
            return host
        return super().__torch_function__(func, types_, args, kwargs)


@contextlib.contextmanager
def _null_sink(written: list, staging: dict):
    """save_model's safetensors writes recorded ({file, bytes, tensors}), not written; `Dist.from_main` answers
    rank 0's staging directory (kept in `staging` from rank 0's run)."""
    originals = checkpoint.save_file, Dist.from_main

    def save_file(tensors, filename, metadata=None):
        written.append({"file": Path(filename).name, "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                        "tensors": len(tensors)})

    def from_main(self, value):
        if dist.get_rank() == 0:
            staging["dir"] = value
        return staging.get("dir", value)

    checkpoint.save_file, Dist.from_main = save_file, from_main
    try:
        yield
    finally:
        checkpoint.save_file, Dist.from_main = originals


def trace_export(model: str, gpus: int, precision: str = "bf16-mixed", dtype: torch.dtype | None = None,
                 what: str = "save_model") -> dict:
    """`what` = "save_model" (full fine-tuning's final/, in `dtype`, default the source checkpoint's bf16) or
    "full_state_dict" (LoRA / snapshots) of `model` sharded over `gpus` fake ranks, traced on each rank."""
    from qforge.engine.train.build import meta_model
    from qforge.engine.train.loop import precision_policy
    from qforge.engine.train.parallel import full_state_dict, shard_model

    from .run import local_bytes, twin_mesh

    config = resolve_config(model)
    device = torch.device("cpu")
    ranks, sequences, staging = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="twin-export-") as out:
        for rank in range(gpus):
            dist_ = Dist(rank, gpus, device)
            param_dtype, compute_dtype, _ = precision_policy(precision, dist_)
            mesh = twin_mesh(gpus, rank)
            net = meta_model(config, param_dtype)
            fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
            functions, tracker, collectives, written = HostCopies(fake_mode), device_memory_tracker(), Collectives(), []
            with fake_mode, functions, mark_sharding_propagation(), _null_sink(written, staging):
                shard_model(net, compute_dtype, mesh=mesh)
                net.to_empty(device=device)
                net.reset_buffers()
                shard_bytes = local_bytes(net)
                collectives.region = what
                with tracker, collectives:
                    if what == "save_model":
                        checkpoint.save_model(net, Path(out) / "final", dtype=dtype or torch.bfloat16, dist_=dist_)
                    else:  # rank 0 keeps the fp32 state on its host while the other ranks gather
                        full_state_dict(net)
            peak = tracker.get_tracker_snapshot("peak")
            ranks.append({"rank": rank, "shard_bytes": shard_bytes,
                          "device_peak_bytes": sum(s["Total"] for d, s in peak.items() if d.type == "cpu"),
                          "peak_host_bytes": functions.peak_host_bytes,
                          "written_bytes": sum(w["bytes"] for w in written), "files": len(written)})
            sequences[rank] = collectives.calls
        dist.destroy_process_group()
    check_sequences(sequences)
    return {"model": model, "gpus": gpus, "what": what, "precision": precision,
            "dtype": str(dtype or torch.bfloat16)[6:], "ranks": ranks, "collectives_per_rank": len(sequences[0])}


def _null_writer(written: list):
    """A DCP StorageWriter that records each write item's bytes (tensor shards, pickled objects) and writes none."""
    import io

    from torch.distributed.checkpoint import StorageWriter
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    class NullWriter(StorageWriter):
        def reset(self, checkpoint_id=None):
            pass

        def validate_checkpoint_id(self, checkpoint_id):
            return True

        def set_up_storage_writer(self, is_coordinator, *args, **kwargs):
            pass

        def prepare_local_plan(self, plan):
            return plan

        def prepare_global_plan(self, plans):
            return plans

        def write_data(self, plan, planner):
            results = []
            for item in plan.items:
                data = planner.resolve_data(item)
                nbytes = len(data.getbuffer()) if isinstance(data, io.BytesIO) else data.numel() * data.element_size()
                written.append({"file": item.index.fqn, "bytes": nbytes, "tensors": 1})
                results.append(WriteResult(index=item.index, size_in_bytes=nbytes, storage_data=None))
            future = Future()
            future.set_result(results)
            return future

        def finish(self, metadata, results):
            pass

    return NullWriter()


def trace_checkpoint_state(model: str, gpus: int, precision: str = "bf16-mixed", optim_state_dtype: str = "fp32") -> dict:
    """What `save_checkpoint` hands DCP on each rank: `get_state_dict(model, optimizer)` of the FSDP2 model with
    AdamW's state, then `dcp.save` into a null writer. DCP's planning (pickled plans gathered to rank 0 and
    scattered back) cannot cross the fake process group, so each rank plans alone (`no_dist`): every item of an
    FSDP2 state is a rank's own shard, so the bytes per rank are what the real save writes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from qforge.engine.train.build import meta_model
    from qforge.engine.train.config import OptimSettings
    from qforge.engine.train.loop import precision_policy
    from qforge.engine.train.optim import build_optimizer
    from qforge.engine.train.parallel import Dist, shard_model
    from qforge.engine.train.resume import single_process_is_intended, state_bytes

    from .run import create_optimizer_state, local_bytes, twin_mesh

    config = resolve_config(model)
    device = torch.device("cpu")
    ranks = []
    for rank in range(gpus):
        param_dtype, compute_dtype, _ = precision_policy(precision, Dist(rank, gpus, device))
        mesh = twin_mesh(gpus, rank)
        net = meta_model(config, param_dtype)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        functions, tracker, written = HostCopies(fake_mode), device_memory_tracker(), []
        with fake_mode, functions, mark_sharding_propagation(), host_shard_arithmetic():
            shard_model(net, compute_dtype, mesh=mesh)
            net.to_empty(device=device)
            net.reset_buffers()
            optimizer = build_optimizer(net, OptimSettings(state_dtype=optim_state_dtype))
            create_optimizer_state(net, optimizer)
            shard_bytes = local_bytes(net)
            with tracker:
                model_state, optim_state = get_state_dict(net, optimizer)
                checkpoint_bytes = state_bytes(model_state) + state_bytes(optim_state)
                with single_process_is_intended():  # no_dist: DCP warns that it saves in one process
                    dcp.save({"model": model_state, "optim": optim_state}, storage_writer=_null_writer(written),
                             no_dist=True)
            before = sum(s["Total"] for d, s in tracker.get_tracker_snapshot("current").items() if d.type == "cpu")
        peak = tracker.get_tracker_snapshot("peak")
        ranks.append({"rank": rank, "shard_bytes": shard_bytes, "state_bytes": checkpoint_bytes,
                      "device_peak_bytes": sum(s["Total"] for d, s in peak.items() if d.type == "cpu"),
                      "device_after_bytes": before, "peak_host_bytes": functions.peak_host_bytes,
                      "written_bytes": sum(w["bytes"] for w in written), "items": len(written)})
    dist.destroy_process_group()
    return {"model": model, "gpus": gpus, "what": "checkpoint", "precision": precision, "ranks": ranks}
