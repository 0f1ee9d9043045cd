"""Atomic writes: a reader (or a resumed run after a crash) sees the old file or the new one, never half of one.

Files are written to a temporary name in the same directory and renamed over the target (`os.replace` is atomic
on one filesystem); directories are built under a temporary name and moved into place the same way.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import ConfigError, StorageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls `write(temp_path)` next to `path`, then renames it to `path`; on any failure `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp creates 0600; the file gets the mode a plain open would give
        write(Path(temp))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def replace_dir(src: Path, dst: Path) -> None:
    """Moves a finished directory into place; an existing `dst` is only removed once `src` is there."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yields an empty temporary directory next to `path`; on success its files get the umask's mode and it
    becomes `path`, on failure it is removed.

    replace=False: when another writer put `path` in place first (a lost race), the staged copy is dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        yield tmp
        for file in tmp.rglob("*"):  # some writers (safetensors) create 0600 files: give them a plain open's mode
            if file.is_file():
                os.chmod(file, 0o666 & ~_umask())
        if replace:
            replace_dir(tmp, path)
        else:
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable_dir(path: str | Path, key: str) -> None:
    """A ConfigError naming `key` unless `path` is (or can be created as) a directory this process can write in:
    a path that is a file, lies under a regular file, or whose nearest existing directory refuses a new file.
    Checked by creating (and removing) a probe file, since permission bits do not tell for root or read-only
    mounts. Creates nothing else."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a directory; choose another {key} or move the file away")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={path} lies under {existing}, which is a file; choose another {key}")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".qforge-write-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"{key}={path}: cannot write in {existing} ({error.strerror}); make it writable or "
                          f"choose another {key}") from None


def check_free_space(path: str | Path, needed: int, what: str) -> None:
    """A StorageError before writing `what` (about `needed` bytes) under `path` when its filesystem has less free."""
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise StorageError(errno.ENOSPC, f"not enough free space for {what}: needs {needed:,} bytes in {path}, "
                                         f"{free:,} free; free some space or choose another output.dir")


def storage_error(error: BaseException, what: str, path: str | Path, advice: str) -> StorageError:
    """A write that failed midway (disk full, a directory no longer writable) as one line naming the path."""
    cause = error.strerror if isinstance(error, OSError) and error.strerror else \
        (str(error).strip().splitlines() or [type(error).__name__])[0]
    return StorageError(getattr(error, "errno", None) or errno.EIO, f"writing {what} to {path} failed ({cause}); "
                                                                     f"{advice}")


class HashingWriter:
    """A binary file that hashes (SHA-256) and counts what is written through it, so a manifest needs no second
    read of the file; `fsync()` before close makes the bytes durable."""

    def __init__(self, path: str | Path):
        self.file = open(path, "wb")
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = self.file.write(view)
        self.digest.update(view[:written])
        self.size += written
        return written

    def tell(self) -> int:
        return self.size

    def flush(self):
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    def fsync(self):
        self.file.flush()
        os.fsync(self.file.fileno())

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self):
        self.file.close()

    @property
    def closed(self) -> bool:
        return self.file.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def record(self) -> dict:
        return {"size": self.size, "sha256": self.digest.hexdigest()}
