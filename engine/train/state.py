"""Training checkpoints for exact resume: `output.dir/checkpoints/step-<N>/`.

A checkpoint holds the model and optimizer (torch.distributed.checkpoint: each rank writes its own shards,
and a later run may load them on another world size), plus `meta.json` (step, scheduler, data cursor,
counters) and every rank's RNG states. It is written into a hidden temp directory and renamed when
complete, so a kill during a save leaves the previous checkpoints as they were; only complete `step-<N>`
directories are ever resumed from.
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..files import replace_dir
from .parallel import Dist

STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_dir(output_dir)
    steps = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.fullmatch(p.name))
             and (p / "meta.json").is_file()] if root.is_dir() else []
    return max(steps)[1] if steps else None


def save_checkpoint(output_dir, step: int, model, optimizer, scheduler, loader_state: dict, counters: dict,
                    dist_: Dist, keep_last: int) -> Path:
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if dist_.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist_.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_is_intended():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "state"))
    torch.save(_rng_state(), tmp / f"rng-rank{dist_.rank}.pt")
    dist_.barrier()
    if dist_.is_main:
        meta = {"step": step, "scheduler": scheduler.state_dict(), "loader": loader_state, "counters": counters,
                "world": dist_.world}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        replace_dir(tmp, final)
        _prune(root, keep_last)
    dist_.barrier()
    return final


def load_checkpoint(path: str | Path, model, optimizer, scheduler, dist_: Dist) -> dict:
    """Restores model, optimizer, scheduler and this rank's RNG; returns meta (step, loader, counters)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete qforge checkpoint (no meta.json); "
                                f"point train.resume at an output.dir/checkpoints/step-<N> directory or 'auto'")
    meta = json.loads((path / "meta.json").read_text())
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng-rank{dist_.rank}.pt"
    if meta.get("world") == dist_.world and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return meta


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns on every save/load without a process group; a single-process run is one on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _prune(root: Path, keep_last: int):
    steps = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.fullmatch(p.name)))
    for _, path in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
