"""`checkpoint.load_sharded` traced at real shapes: what each rank reads from the safetensors files.

No multi-GB checkpoint is needed: `header_only_checkpoint` writes an HF checkpoint directory (config.json, the
5 GB-shard index) whose safetensors files hold only their header (names, dtypes, shapes, offsets), and
`HeaderOnlyFiles` stands in for `safetensors.safe_open` inside qforge's checkpoint module, answering shapes and
dtypes from the header and each slice read with an (untouched) host buffer of the stored dtype, while recording
it. The model is the trainer's: `meta_model` + `shard_model` on the fake process group, then `load_sharded` on
the fake device, once per rank. Checked: each rank reads only its rows (the ranks' reads tile every tensor
exactly once; no rank reads a whole tensor), host buffers one tensor slice at a time, reads in the stored dtype.
"""
from __future__ import annotations

import contextlib
import json
import math
import struct
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes

from qforge.engine.checkpoint import tensors as checkpoint
from qforge.engine.model import hf_key

from .contracts import ContractError
from .fake_cuda import FakeDeviceFunctions, in_sharding_propagation, mark_sharding_propagation
from .models import resolve_config

_CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def header_only_checkpoint(config, directory: Path, dtype: torch.dtype = torch.bfloat16,
                           max_shard_size: str = "5GB") -> Path:
    """An HF checkpoint directory of `config`'s shapes in `dtype` (files split as `save_model` splits them), each
    safetensors file only its 8-byte length and JSON header: a 16 GB checkpoint in a few kB."""
    from qforge.engine.train.build import meta_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = meta_model(config, dtype)
    shapes = {hf_key(name): list(p.shape) for name, p in model.named_parameters()}
    sizes = {key: math.prod(shape) * dtype.itemsize for key, shape in shapes.items()}
    shards = checkpoint.split_shards(sizes, checkpoint.parse_size(max_shard_size))
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for keys, name in zip(shards, names):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            header[key] = {"dtype": _CODES[dtype], "shape": shapes[key], "data_offsets": [offset, offset + sizes[key]]}
            offset += sizes[key]
        text = json.dumps(header).encode()
        (directory / name).write_bytes(struct.pack("<Q", len(text)) + text)
    (directory / "config.json").write_text(json.dumps(config.to_hf() | {"torch_dtype": str(dtype)[6:]}))
    (directory / checkpoint.INDEX_FILE).write_text(json.dumps({
        "metadata": {"total_size": sum(sizes.values())},
        "weight_map": {key: name for keys, name in zip(shards, names) for key in keys}}))
    return directory


class _Slice:
    def __init__(self, files: "HeaderOnlyFiles", key: str, entry: dict):
        self.files, self.key, self.entry = files, key, entry

    def get_shape(self):
        return list(self.entry["shape"])

    def get_dtype(self):
        return self.entry["dtype"]

    def __getitem__(self, index):
        shape = self.entry["shape"]
        index = index if isinstance(index, tuple) else (index,)
        bounds = [s.indices(n)[:2] for s, n in zip(index, shape)] + [(0, n) for n in shape[len(index):]]
        return self.files.read(self.key, self.entry, bounds)


class HeaderOnlyFiles:
    """Stands in for `safe_open` (patched into qforge.engine.checkpoint by `installed`): reads the header, and
    records every slice read: {key, bounds, bytes, dtype}; `peak_host_bytes` is the most read-buffer bytes alive
    at once."""

    def __init__(self):
        self.reads: list[dict] = []
        self.live_host_bytes = self.peak_host_bytes = 0

    def read(self, key: str, entry: dict, bounds: list[tuple[int, int]]):
        dtype = _DTYPES[entry["dtype"]]
        shape = [stop - start for start, stop in bounds]
        with _disable_current_modes():  # a real host buffer, as safetensors returns (never touched here)
            rows = torch.empty(shape, dtype=dtype)
        nbytes = rows.numel() * dtype.itemsize
        self.reads.append({"key": key, "shape": list(entry["shape"]), "bounds": bounds, "bytes": nbytes,
                           "dtype": entry["dtype"]})
        self.live_host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.live_host_bytes)
        weakref.finalize(rows, self._freed, nbytes)
        return rows

    def _freed(self, nbytes: int):
        self.live_host_bytes -= nbytes

    @contextlib.contextmanager
    def open(self, file, framework="pt", device="cpu"):
        data = Path(file).read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        header.pop("__metadata__", None)

        class Opened:
            def keys(self):
                return list(header)

            def get_slice(opened, key):
                return _Slice(self, key, header[key])

            def get_tensor(opened, key):
                return _Slice(self, key, header[key])[:]

        yield Opened()

    @contextlib.contextmanager
    def installed(self):
        original = checkpoint.safe_open
        checkpoint.safe_open = self.open
        try:
            with host_shard_arithmetic():
                yield self
        finally:
            checkpoint.safe_open = original


@contextlib.contextmanager
def host_shard_arithmetic():
    """DTensor's local shape/offset arithmetic runs on the host, as on a GPU host (under the fake mode its index
    tensors would be fake); patched where it is used (DCP's planner imports it by name)."""
    from torch.distributed.checkpoint import planner_helpers
    from torch.distributed.tensor import _utils

    name = "compute_local_shape_and_global_offset"
    original = getattr(_utils, name)

    def on_host(*args, **kwargs):
        with _disable_current_modes():
            return original(*args, **kwargs)

    users = [module for module in (_utils, planner_helpers) if getattr(module, name, None) is original]
    for module in users:
        setattr(module, name, on_host)
    try:
        yield
    finally:
        for module in users:
            setattr(module, name, original)


def device_memory_tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    class DeviceMemory(MemTracker):
        """torch's MemTracker, without DTensor's metadata runs on global-shape fake tensors (not memory)."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if in_sharding_propagation():
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    return DeviceMemory()


def trace_load(model: str, gpus: int, precision: str = "bf16-mixed", stored: torch.dtype = torch.bfloat16,
               directory: Path | None = None) -> dict:
    """`load_sharded` of a header-only checkpoint of `model` traced on each of `gpus` fake ranks; raises a
    ContractError when the reads break the contract. Returns bytes per rank, peaks and the dtypes."""
    import tempfile

    import torch.distributed as dist
    from qforge.engine.train.build import meta_model
    from qforge.engine.train.loop import precision_policy
    from qforge.engine.train.parallel import Dist, load_sharded, shard_model

    from .run import local_bytes, twin_mesh

    config = resolve_config(model)
    device = torch.device("cpu")
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="twin-load-")))
        header_only_checkpoint(config, directory, stored)
        total = json.loads((directory / checkpoint.INDEX_FILE).read_text())["metadata"]["total_size"]
        ranks = []
        for rank in range(gpus):
            param_dtype, compute_dtype, _ = precision_policy(precision, Dist(rank, gpus, device))
            files = HeaderOnlyFiles()
            fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
            net = meta_model(config, param_dtype)
            mesh = twin_mesh(gpus, rank) if gpus > 1 else None
            tracker = device_memory_tracker()
            with fake_mode, FakeDeviceFunctions(fake_mode), files.installed(), mark_sharding_propagation():
                if gpus > 1:
                    shard_model(net, compute_dtype, mesh=mesh)
                with tracker:
                    load_sharded(net, directory, device)
                shard_bytes = local_bytes(net)
                dtypes = sorted({str(p.dtype)[6:] for p in net.parameters()})
            device_peak = sum(snap["Total"] for dev, snap in tracker.get_tracker_snapshot("peak").items()
                              if dev.type == "cpu")
            ranks.append({"rank": rank, "read_bytes": sum(r["bytes"] for r in files.reads),
                          "largest_read_bytes": max(r["bytes"] for r in files.reads),
                          "peak_host_buffer_bytes": files.peak_host_bytes, "device_peak_bytes": device_peak,
                          "shard_bytes": shard_bytes, "param_dtypes": dtypes, "reads": files.reads})
        if gpus > 1:
            dist.destroy_process_group()
    _check_reads(ranks, gpus, stored)
    return {"model": model, "gpus": gpus, "precision": precision, "stored_dtype": _CODES[stored],
            "checkpoint_bytes": total, "ranks": [{k: v for k, v in r.items() if k != "reads"} for r in ranks],
            "reads_per_rank": len(ranks[0]["reads"])}


def _check_reads(ranks: list[dict], gpus: int, stored: torch.dtype):
    """Every tensor's rows are read exactly once over the ranks (whole columns), none whole by one rank of
    several, in the stored dtype; a rank holds one read buffer at a time."""
    covered: dict[str, list] = {}
    for rank in ranks:
        for read in rank["reads"]:
            if read["dtype"] != _CODES[stored]:
                raise ContractError(f"rank {rank['rank']} read {read['key']} as {read['dtype']}, stored {_CODES[stored]}")
            covered.setdefault(read["key"], []).append((rank["rank"], read))
        if rank["peak_host_buffer_bytes"] > rank["largest_read_bytes"]:
            raise ContractError(f"rank {rank['rank']} held {rank['peak_host_buffer_bytes']} bytes of read buffers at "
                                f"once (largest single read {rank['largest_read_bytes']}): buffers are kept alive")
    for key, reads in covered.items():
        shape = reads[0][1]["shape"]
        for rank, read in reads:
            whole_rows = read["bounds"][0] == (0, shape[0])
            if gpus > 1 and whole_rows or read["bounds"][1:] != [(0, n) for n in shape[1:]]:
                raise ContractError(f"{key} {shape}: rank {rank} reads {read['bounds']}: a full copy, or a split "
                                    f"other than by rows")
        stop = 0
        for start, end in sorted(read["bounds"][0] for _, read in reads):
            if start != stop:
                raise ContractError(f"{key} {shape}: rows {min(start, stop)}..{max(start, stop)} read by no rank or "
                                    f"by two")
            stop = end
        if stop != shape[0]:
            raise ContractError(f"{key} {shape}: rows {stop}..{shape[0]} read by no rank")
