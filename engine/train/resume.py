"""Training checkpoints for exact resume: `output.dir/checkpoints/step-<N>/`, and the lock on `output.dir`.

A checkpoint holds the model and optimizer (torch.distributed.checkpoint: each rank writes its own shards,
and a later run may load them on another world size), plus `meta.json` (step, scheduler, data cursor,
counters, data fingerprint, the settings that define what is trained), every rank's RNG states (and objective
state, for an objective that keeps one between steps: GRPO's rollouts) and
`manifest.json` (size and SHA-256 of every file, hashed while it is written, then fsynced). It is written into a hidden temp directory and renamed when
complete, so a kill during a save leaves the previous checkpoints as they were. Older checkpoints are pruned
only after the new one verifies; a resume takes the newest checkpoint that verifies, and sets a damaged one
aside as `step-<N>.damaged`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import CheckpointError, StorageError
from ..files import HashingWriter, check_free_space, storage_error
from .parallel import Dist

STEP_DIR = re.compile(r"step-(\d+)")
MANIFEST = "manifest.json"
log = logging.getLogger("qforge.train")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_dir(output_dir)
    steps = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.fullmatch(p.name))
             and (p / "meta.json").is_file()] if root.is_dir() else []
    return max(steps)[1] if steps else None


def save_checkpoint(output_dir, step: int, model, optimizer, scheduler, loader_state: dict, counters: dict,
                    dist_: Dist, keep_last: int, data: dict | None = None, trained: dict | None = None,
                    objective_state: dict | None = None) -> Path:
    """Writes checkpoint step-<N> (see the module docstring). Free space for it is checked first; a write that
    fails midway (disk full, a directory no longer writable) removes the temp directory and raises a
    StorageError, leaving the earlier checkpoints as they were. `trained`: the settings that define what is
    trained (see loop.trained_settings), compared by a resume. `objective_state`: this rank's objective state
    (objective.py's optional `state_dict`), saved as objective-rank<r>.pt."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    model_state, optim_state = get_state_dict(model, optimizer)
    needed = int(dist_.all_reduce_sum(float(state_bytes(model_state) + state_bytes(optim_state)))) + (1 << 20)
    check_space(root, needed, f"checkpoint {final.name}", dist_)
    try:
        manifest = _write_checkpoint(tmp, step, model_state, optim_state, scheduler, loader_state, counters,
                                     dist_, data, trained, type(optimizer).__name__, objective_state)
    except (OSError, RuntimeError, CheckpointException) as error:  # torch.save's zip writer reports a short write
        if dist_.is_main:                                             # as a RuntimeError, DCP wraps it
            shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(_dcp_cause(error), f"checkpoint {final.name}", root,
                            "free some space (or make the directory writable), then resume with "
                            "train.resume=auto; the earlier checkpoints are kept") from error
    if dist_.is_main:
        old = root / f".step-{step}.old"
        if final.exists():  # re-saving a step: the complete old copy goes only once the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(root)
        problem = _check_files(final, manifest, hashed=())
        if problem:
            shutil.rmtree(final.with_name(final.name + ".damaged"), ignore_errors=True)
            final.rename(final.with_name(final.name + ".damaged"))
            if old.exists():
                old.rename(final)
            raise CheckpointError(f"{final} did not verify after writing ({problem}); the older checkpoints are "
                                  f"kept; check the disk (space, errors) and resume with train.resume=auto")
        shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep_last)
    dist_.barrier()
    return final


def check_space(path: Path, needed: int, what: str, dist_: Dist):
    """files.check_free_space on rank 0, raised on every rank (so no rank enters the write's collectives alone)."""
    short = None
    if dist_.is_main:
        try:
            check_free_space(path, needed, what)
        except StorageError as error:
            short = error
    if float(dist_.all_reduce_sum(1.0 if short else 0.0)):
        raise short or StorageError(errno.ENOSPC, f"not enough free space for {what} (see rank 0)")


def check_trained_settings(path: Path, trained: dict, override: list[str], dist_: Dist):
    """Refuses to resume from checkpoint `path` when it recorded other values for the settings that define what is
    trained (model shape, method, LoRA rank/alpha/targets, precision, kept vocabulary, objective and its
    reference or teacher), naming the key; keys listed in `train.resume_override` may differ (logged).
    Checkpoints of earlier versions recorded none: nothing to compare."""
    try:
        recorded = json.loads((Path(path) / "meta.json").read_text()).get("trained")
    except (OSError, ValueError, AttributeError):
        return  # load_checkpoint reports an unreadable meta.json
    if not isinstance(recorded, dict):
        return
    keys = list(trained) + [key for key in recorded if key not in trained]  # the most basic setting first
    changed = [key for key in keys if recorded.get(key) != trained.get(key)]
    refused = [key for key in changed if key not in override]
    if refused:
        key = refused[0]
        raise CheckpointError(f"{path} was trained with {key}={json.dumps(recorded.get(key))}, this run sets "
                              f"{json.dumps(trained.get(key))}"
                              + (f" (also changed: {', '.join(refused[1:])})" if refused[1:] else "")
                              + f"; resuming would silently change what is trained: restore {key}, start fresh in "
                                f"another output.dir, or accept the change with train.resume_override=[{key}]")
    if changed and dist_.is_main:
        log.warning("resuming from %s with changed settings accepted by train.resume_override: %s", path,
                    "; ".join(f"{key}: {json.dumps(recorded.get(key))} → {json.dumps(trained.get(key))}"
                              for key in changed))


def _write_checkpoint(tmp: Path, step, model_state, optim_state, scheduler, loader_state, counters, dist_: Dist,
                      data, trained, optimizer_name: str, objective_state: dict | None = None) -> dict:
    """Writes every file of a checkpoint into `tmp`, each hashed on its way to disk and fsynced; returns the
    manifest ({file: size, sha256}) on rank 0 (each rank records its own files in a manifest part)."""
    if dist_.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist_.barrier()
    writer = dcp.FileSystemWriter(str(tmp / "state"))
    writer.fs = fs = _HashingFileSystem(tmp)
    with single_process_is_intended():
        dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer)
    records = fs.records
    with HashingWriter(tmp / f"rng-rank{dist_.rank}.pt") as rng:
        torch.save(_rng_state(), rng)
        rng.fsync()
    records[rng.file.name.rpartition("/")[2]] = rng.record()
    if objective_state is not None:
        with HashingWriter(tmp / f"objective-rank{dist_.rank}.pt") as file:
            torch.save(objective_state, file)
            file.fsync()
        records[file.file.name.rpartition("/")[2]] = file.record()
    if dist_.is_main:
        meta = {"step": step, "scheduler": scheduler.state_dict(), "loader": loader_state, "counters": counters,
                "world": dist_.world, "data": data, "optimizer": optimizer_name, "trained": trained}
        with HashingWriter(tmp / "meta.json") as file:
            file.write(json.dumps(meta, indent=2).encode())
            file.fsync()
        records["meta.json"] = file.record()
    _write_synced(tmp / f".manifest-part{dist_.rank}.json", json.dumps(records))
    dist_.barrier()
    manifest = {}
    if dist_.is_main:
        for rank in range(dist_.world):
            part = tmp / f".manifest-part{rank}.json"
            manifest.update(json.loads(part.read_text()))
            part.unlink()
        _write_synced(tmp / MANIFEST, json.dumps({"files": dict(sorted(manifest.items()))}, indent=1))
    return manifest


def state_bytes(state) -> int:
    """Bytes of the tensors in a (nested) state dict on this rank (a DTensor counts its local shard)."""
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


class _HashingFileSystem(FileSystem):
    """DCP's local file system, with every file it writes hashed on the way to disk (HashingWriter): the manifest
    needs no second read of a checkpoint that may be hundreds of GB. `records`: {path relative to root: size,
    sha256}, following DCP's rename of its metadata file."""

    def __init__(self, root: Path):
        super().__init__()
        self.root, self.records, self.lock = Path(root), {}, threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with HashingWriter(path) as stream:
            yield stream
            if not stream.closed:
                stream.fsync()
        with self.lock:
            self.records[str(Path(path).relative_to(self.root))] = stream.record()

    def rename(self, path, new_path):
        super().rename(path, new_path)
        with self.lock:
            record = self.records.pop(str(Path(path).relative_to(self.root)), None)
            if record is not None:
                self.records[str(Path(new_path).relative_to(self.root))] = record

    def rm_file(self, path):
        super().rm_file(path)
        with self.lock:
            self.records.pop(str(Path(path).relative_to(self.root)), None)


def verify_checkpoint(path: str | Path, dist_: Dist | None = None) -> str | None:
    """None when the checkpoint is complete and every file has the size and SHA-256 its manifest records (each
    rank hashes a share of the files), else what is wrong. A checkpoint without a manifest (written by an
    older qforge) only needs a readable meta.json and DCP metadata."""
    path, dist_ = Path(path), dist_ or Dist()
    try:
        if not (path / MANIFEST).is_file():
            if not (path / "meta.json").is_file():
                return "no meta.json (the save did not finish)"
            _read_meta(path)
            return None if (path / "state" / ".metadata").is_file() else "no state/.metadata"
        manifest = json.loads((path / MANIFEST).read_text())["files"]
        problem = _check_files(path, manifest, hashed=sorted(manifest)[dist_.rank::dist_.world])
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"{type(error).__name__}: {error}"
    failed = float(dist_.all_reduce_sum(1.0 if problem else 0.0))
    return problem or ("a file failed verification on another rank" if failed else None)


def resume_checkpoint(output_dir: str | Path, resume: str | None, dist_: Dist) -> Path | None:
    """The checkpoint to resume from: `train.resume` itself (which must verify), or for "auto" the newest
    one under output.dir that verifies; a newer damaged one is set aside (renamed `step-<N>.damaged`) and
    the fallback is logged. None when "auto" finds no checkpoint at all; without train.resume, output.dir
    must not hold checkpoints already."""
    if resume is None:
        existing = latest_checkpoint(output_dir)
        if existing is not None:  # its higher step numbers would outlive (and prune) this run's checkpoints
            raise CheckpointError(f"output.dir {output_dir} already holds checkpoints of an earlier run "
                                  f"({existing.name}); set train.resume=auto to continue it, or choose another "
                                  f"output.dir")
        return None
    if resume != "auto":
        if not Path(resume).is_dir():
            raise CheckpointError(f"train.resume={resume}: no such directory; use train.resume=auto or an "
                                  f"output.dir/checkpoints/step-<N> directory")
        problem = verify_checkpoint(resume, dist_)
        if problem:
            raise CheckpointError(f"train.resume={resume}: damaged checkpoint ({problem}); use train.resume=auto "
                                  f"to take the newest checkpoint that verifies, or name another step-<N> directory")
        newest, match = latest_checkpoint(output_dir), STEP_DIR.fullmatch(Path(resume).name)
        if newest is not None and match and int(STEP_DIR.fullmatch(newest.name).group(1)) > int(match.group(1)):
            raise CheckpointError(f"train.resume={resume}, but output.dir {output_dir} holds a later checkpoint "
                                  f"({newest.name}) that would outlive (and prune) this run's; resume into another "
                                  f"output.dir, or use train.resume=auto")
        return Path(resume)
    root = checkpoint_dir(output_dir)
    candidates = sorted(((int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.fullmatch(p.name))),
                        reverse=True) if root.is_dir() else []
    for _, path in candidates:
        problem = verify_checkpoint(path, dist_)
        if problem is None:
            return path
        dist_.barrier()
        if dist_.is_main:
            log.warning("checkpoint %s is damaged (%s): set aside as %s.damaged; falling back to the previous one",
                        path, problem, path.name)
            shutil.rmtree(path.with_name(path.name + ".damaged"), ignore_errors=True)
            path.rename(path.with_name(path.name + ".damaged"))
        dist_.barrier()
    if candidates:
        raise CheckpointError(f"train.resume=auto: no checkpoint under {root} verifies (all set aside as "
                              f"*.damaged); unset train.resume to start over, or use another output.dir")
    return None


def clean_stale_temporaries(output_dir: str | Path):
    """Removes what a killed run left half-written (checkpoint and export temp dirs); a complete copy moved aside
    for a re-save that never landed goes back in place. Call with the lock held."""
    out = Path(output_dir)
    moved_aside = [(old, old.with_name(old.name[1:-len(".old")])) for old in out.glob("checkpoints/.step-*.old")]
    moved_aside += [(old, out / "final") for old in out.glob(".final.old-*")]
    for old, target in moved_aside:
        if not target.exists():
            old.rename(target)
    for pattern in ("checkpoints/.step-*.tmp", "checkpoints/.step-*.old", ".final.tmp-*", ".final.old-*"):
        for path in out.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


class OutputLock:
    """An exclusive lock on output.dir (flock on `output.dir/.lock`, held by rank 0 for the whole run), so a
    second run on the same directory stops with a message instead of interleaving checkpoints and metrics.
    The kernel drops the lock when the process dies, however it dies."""

    def __init__(self, output_dir: str | Path, dist_: Dist):
        self.path, self.dist, self.fd = Path(output_dir) / ".lock", dist_, None

    def __enter__(self):
        holder = None
        if self.dist.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or "another process"
                os.close(self.fd)
                self.fd = None
            except OSError as error:  # a filesystem without locks: run unprotected rather than not at all
                log.warning("cannot lock %s (%s); make sure no other run writes to this output.dir", self.path, error)
            else:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        if float(self.dist.all_reduce_sum(1.0 if holder else 0.0)):
            raise CheckpointError(f"output.dir {self.path.parent} is in use by another run ({holder or 'see rank 0'}); "
                                  f"wait for it to finish or stop it, or choose another output.dir")
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def load_checkpoint(path: str | Path, model, optimizer, scheduler, dist_: Dist) -> dict:
    """Restores model, optimizer, scheduler and this rank's RNG; returns meta (step, loader, counters, and this
    rank's `objective_state` when the checkpoint has one)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a complete qforge checkpoint (no meta.json); "
                              f"point train.resume at an output.dir/checkpoints/step-<N> directory or 'auto'")
    try:
        meta = _read_meta(path)
        saved_by = meta.get("optimizer", type(optimizer).__name__)  # absent in checkpoints of earlier versions
        if saved_by != type(optimizer).__name__:
            raise CheckpointError(f"{path}: written by {saved_by}, this run builds {type(optimizer).__name__}; "
                                  f"optim.state_dtype must be what it was when the checkpoint was written")
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        with single_process_is_intended():
            dcp.load(state, checkpoint_id=str(path / "state"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(meta["scheduler"])
        rng_file = path / f"rng-rank{dist_.rank}.pt"
        if meta.get("world") == dist_.world and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        objective_file = path / f"objective-rank{dist_.rank}.pt"
        if objective_file.is_file():
            meta["objective_state"] = torch.load(objective_file, weights_only=False)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, CheckpointException) as error:
        cause = _dcp_cause(error)
        first_line = (str(cause).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: cannot be resumed from ({type(cause).__name__}: {first_line}); it does "
                              f"not match this run's model/optimizer or is damaged; resume from another "
                              f"checkpoint or unset train.resume") from error
    return meta


def _dcp_cause(error: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException (a BaseException whose text is a traceback)."""
    if isinstance(error, CheckpointException) and error.failures:
        return next(iter(error.failures.values()))[0]
    return error


def _read_meta(path: Path) -> dict:
    meta = json.loads((path / "meta.json").read_text())
    if not isinstance(meta, dict) or not {"step", "scheduler", "loader", "counters"} <= meta.keys():
        raise ValueError("meta.json lacks step/scheduler/loader/counters")
    return meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_files(directory: Path, manifest: dict, hashed) -> str | None:
    """What does not match the manifest: a missing file, a wrong size, or (for files in `hashed`) a wrong hash."""
    if not manifest:
        return "empty manifest"
    for name, entry in manifest.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['size']}"
    for name in hashed:
        if _sha256(directory / name) != manifest[name]["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def _write_synced(path: Path, text: str):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def single_process_is_intended():
    """DCP warns on every save/load without a process group; a single-process run is one on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _prune(root: Path, keep_last: int):
    """Keeps the newest `keep_last` checkpoints; called only once the newest has verified."""
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
