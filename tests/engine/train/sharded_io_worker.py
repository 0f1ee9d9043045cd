"""One rank of the 2-rank gloo tests in test_sharded_io.py (run under torchrun).

    sharded_io_worker.py load_export <checkpoint dir> <export dir> <result dir>
    sharded_io_worker.py timeout <seconds> <rank-0 delay> <result dir>
"""
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist


class AnonPeak:
    """High-water mark of this process's anonymous resident memory (heap, not the mmapped checkpoint file)."""

    def __init__(self):
        self.start = self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def read() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.0005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def load_export(checkpoint: str, export: str, results: str):
    from torch.distributed.tensor import DTensor

    from qforge.engine.checkpoint import load_model, read_source, save_model
    from qforge.engine.config import Qwen3Config
    from qforge.engine.train.build import build_model, meta_model
    from qforge.engine.train.config import ModelSettings
    from qforge.engine.train.parallel import init_distributed, shard_model

    import safetensors.torch  # noqa: F401  (imports allocate; only the load itself is measured)
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor._utils  # noqa: F401

    dist_ = init_distributed("cpu")
    # the first model build costs ~26 MB of Python-side state (imports, Triton): not what is measured
    meta_model(Qwen3Config.from_json(Path(checkpoint) / "config.json"), torch.float32)
    shard = lambda m: shard_model(m, torch.bfloat16, dist_.device)  # noqa: E731
    with AnonPeak() as load_peak:
        model = build_model(ModelSettings(path=checkpoint), torch.float32, dist_.device, shard=shard)
    local = {name: p.to_local().clone() for name, p in model.named_parameters() if isinstance(p, DTensor)}
    torch.save(local, Path(results) / f"local-{dist_.rank}.pt")
    with AnonPeak() as export_peak:
        source = read_source(checkpoint)
        save_model(model, export, source, max_shard_size="10MB", dist_=dist_)
    inv_freq_dtype, source_dtype = str(model.inv_freq.dtype), str(source.dtype)
    del model, local
    with AnonPeak() as full_load_peak:  # the old path, for comparison: every rank loads the whole model
        full = load_model(checkpoint, dtype=torch.float32)
    (Path(results) / f"rank-{dist_.rank}.json").write_text(json.dumps({
        "load_peak": load_peak.delta, "export_peak": export_peak.delta, "full_load_peak": full_load_peak.delta,
        "inv_freq_dtype": inv_freq_dtype, "source_dtype": source_dtype, "full_params": len(list(full.parameters()))}))
    dist.destroy_process_group()


def timeout(seconds: str, delay: str, results: str):
    from qforge.engine.train.parallel import init_distributed

    dist_ = init_distributed("cpu", timeout_s=float(seconds))
    if dist_.rank == 0:
        time.sleep(float(delay))  # rank 0 tokenising a large first run while rank 1 waits
    try:
        dist_.barrier()
        outcome = "ok"
    except RuntimeError as error:
        outcome = f"timeout: {error}"[:200]
    (Path(results) / f"rank-{dist_.rank}.json").write_text(json.dumps({"outcome": outcome}))
    os._exit(0)  # a timed-out gloo group cannot be destroyed cleanly


if __name__ == "__main__":
    {"load_export": load_export, "timeout": timeout}[sys.argv[1]](*sys.argv[2:])
