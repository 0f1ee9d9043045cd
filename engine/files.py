"""Atomic writes: a reader (or a resumed run after a crash) sees the old file or the new one, never half of one.

Files are written to a temporary name in the same directory and renamed over the target (`os.replace` is atomic
on one filesystem); directories are built under a temporary name and moved into place the same way.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator


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
    """Yields an empty temporary directory next to `path`; on success it becomes `path`, on failure it is removed.

    replace=False: when another writer put `path` in place first (a lost race), the staged copy is dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        yield tmp
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
