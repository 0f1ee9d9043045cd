"""Reading safetensors checkpoint files: which file holds each tensor, their stored dtype and shapes, and a damaged
file named in a `CheckpointError` rather than a bare safetensors exception."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from ..config import Qwen3Config, read_json
from ..errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def tensor_files(path: Path) -> dict[str, Path]:
    """Maps every tensor key to the safetensors file that holds it."""
    if (path / INDEX_FILE).is_file():
        index = read_json(path / INDEX_FILE)
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{path / INDEX_FILE}: field 'weight_map' is missing or not an object")
        files = {key: path / name for key, name in index["weight_map"].items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{path / INDEX_FILE} names shard files that do not exist: {absent}")
        return files
    if (path / SINGLE_FILE).is_file():
        with open_tensors(path / SINGLE_FILE) as tensors:
            return dict.fromkeys(tensors.keys(), path / SINGLE_FILE)
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


@contextlib.contextmanager
def open_tensors(file: Path, device: str = "cpu"):
    """safe_open, with a damaged file (truncated copy, not safetensors at all) named in a CheckpointError."""
    try:
        with safe_open(str(file), framework="pt", device=device) as tensors:
            yield tensors
    except SafetensorError as error:
        raise CheckpointError(f"{file}: not a readable safetensors file ({error}); it is truncated or damaged: "
                              f"copy or export it again") from None


def stored_dtype(key_files: dict[str, Path]) -> torch.dtype:
    """The dtype the checkpoint's tensors are stored in (what the export writes back by default)."""
    with open_tensors(next(iter(key_files.values()))) as tensors:
        stored = tensors.get_slice(next(iter(tensors.keys()))).get_dtype()
    return _SAFETENSORS_DTYPES.get(stored, torch.float32)


def check_tensors(path: Path, config: Qwen3Config, expected: dict[str, nn.Parameter], key_files: dict[str, Path]):
    """One error that lists every missing, unexpected and wrong-shaped tensor."""
    present = set(key_files)
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied exports carry a redundant copy; the embedding wins
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    shapes = {}
    for file in set(key_files.values()):
        with open_tensors(file) as tensors:
            shapes.update({key: list(tensors.get_slice(key).get_shape()) for key in tensors.keys()})
    wrong_shape = [f"{key}: checkpoint {shapes[key]}, config expects {list(expected[key].shape)}"
                   for key in sorted(present & set(expected)) if shapes.get(key) != list(expected[key].shape)]
    problems = []
    if missing:
        hint = " (config.json says tie_word_embeddings=false, so lm_head.weight is required)" if (
            "lm_head.weight" in missing) else ""
        problems.append(f"missing tensors{hint}: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if wrong_shape:
        problems.append("wrong shapes: " + "; ".join(wrong_shape))
    if problems:
        raise CheckpointError(f"{path} does not match its config.json: " + "; ".join(problems))


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '10KiB' / 1024 → bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def split_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Keys grouped in order into files of at most `limit` bytes (a larger tensor gets a file of its own)."""
    shards, current, size = [], [], 0
    for key, nbytes in sizes.items():
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    return shards
