"""HF-format Qwen3 checkpoints: load straight from safetensors, save what transformers loads.

Loading builds the module on the meta device and fills each parameter from the memory-mapped safetensors
file one tensor at a time, so peak RAM is about one copy of the weights. Saving writes to a temporary
directory next to the target and renames it into place, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import qwen3_vl
from .config import ConfigError, Qwen3Config, read_json
from .errors import CheckpointError
from .files import staged_dir, write_json
from .model import Qwen3, hf_key

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> Qwen3:
    """Loads an HF Qwen3 checkpoint directory (single-file or sharded safetensors) into a `Qwen3`."""
    path = Path(path)
    config = Qwen3Config.from_json(path / "config.json")
    key_files = _tensor_files(path)
    is_vl = qwen3_vl.is_vl_config(read_json(path / "config.json"))
    key_of = qwen3_vl.checkpoint_key if is_vl else hf_key
    if is_vl:  # the language model only; the vision tower stays on disk until export copies it
        key_files = {key: file for key, file in key_files.items() if qwen3_vl.is_language_key(key)}
    with torch.device("meta"):
        model = Qwen3(config)
    expected = {key_of(name): param for name, param in model.named_parameters()}
    _check_tensors(path, config, expected, key_files)

    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(key_files[key], []).append(key)
    names = {key_of(name): name for name, _ in model.named_parameters()}
    for file, keys in by_file.items():
        with _open_tensors(file, device="cpu") as tensors:
            for key in keys:
                tensor = tensors.get_tensor(key).to(device=device, dtype=dtype)
                _assign(model, names[key], tensor)
    model.reset_buffers()
    model.source_checkpoint = path  # a Qwen3-VL export rewrites this checkpoint (see save_model)
    model.checkpoint_format = qwen3_vl.MODEL_TYPE if is_vl else "qwen3"
    model.generation_config = read_json(path / "generation_config.json") if (
        path / "generation_config.json").is_file() else {}
    return model


def save_model(model: Qwen3, path: str | Path, max_shard_size: int | str = "5GB",
               tokenizer_dir: str | Path | None = None, state_dict: dict[str, torch.Tensor] | None = None,
               vocab=None) -> Path:
    """Writes config.json, generation_config.json and (sharded) safetensors that transformers loads.

    `vocab` (a VocabMap: the kept vocabulary the head was trained on) is saved with the weights: kept_ids.json,
    and the unkept ids as generation_config.json `suppress_tokens`.

    `state_dict` (qforge names → full tensors) overrides the model's own parameters, e.g. the gathered
    weights of an FSDP-sharded model. Tokenizer files are copied from `tokenizer_dir` when given.
    """
    path = Path(path)
    limit = parse_size(max_shard_size)
    state = state_dict if state_dict is not None else {n: p.detach() for n, p in model.named_parameters()}
    if getattr(model, "checkpoint_format", "qwen3") == qwen3_vl.MODEL_TYPE:
        return qwen3_vl.save_vl(state, model.source_checkpoint, path, model.config.tie_word_embeddings, tokenizer_dir,
                                vocab)
    tensors = {hf_key(name): t.detach().to("cpu").contiguous() for name, t in state.items()}
    shards = _split_shards(tensors, limit)

    with staged_dir(path) as tmp:
        dtype = next(iter(tensors.values())).dtype
        config = model.config.to_hf() | {"torch_dtype": str(dtype).replace("torch.", "")}
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", _generation_config(model))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if vocab is not None:
            vocab.save_with_model(tmp)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    return path


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


def _tensor_files(path: Path) -> dict[str, Path]:
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
        with _open_tensors(path / SINGLE_FILE) as tensors:
            return dict.fromkeys(tensors.keys(), path / SINGLE_FILE)
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _check_tensors(path: Path, config: Qwen3Config, expected: dict[str, nn.Parameter], key_files: dict[str, Path]):
    """One error that lists every missing, unexpected and wrong-shaped tensor."""
    present = set(key_files)
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied exports carry a redundant copy; the embedding wins
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    shapes = {}
    for file in set(key_files.values()):
        with _open_tensors(file) as tensors:
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


@contextlib.contextmanager
def _open_tensors(file: Path, device: str = "cpu"):
    """safe_open, with a damaged file (truncated copy, not safetensors at all) named in a CheckpointError."""
    try:
        with safe_open(str(file), framework="pt", device=device) as tensors:
            yield tensors
    except SafetensorError as error:
        raise CheckpointError(f"{file}: not a readable safetensors file ({error}); it is truncated or damaged: "
                              f"copy or export it again") from None


def _assign(model: nn.Module, name: str, tensor: torch.Tensor):
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


def _split_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    return shards


def _generation_config(model: Qwen3) -> dict:
    config = dict(getattr(model, "generation_config", {}) or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is None and getattr(model.config, key) is not None:
            config[key] = getattr(model.config, key)
    return config


__all__ = ["CheckpointError", "ConfigError", "load_model", "save_model"]
