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
from .moe import from_hf_tensors, hf_tensors

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
    parts = {name: hf_tensors(key_of(name), param) for name, param in model.named_parameters()}  # MoE: per expert
    expected = {key: part for split in parts.values() for key, part in split.items()}
    _check_tensors(path, config, expected, key_files)

    with contextlib.ExitStack() as stack:
        files = {file: stack.enter_context(_open_tensors(file, device="cpu"))
                 for file in {key_files[key] for key in expected}}
        for name, split in parts.items():
            tensors = [files[key_files[key]].get_tensor(key).to(device=device, dtype=dtype) for key in split]
            _assign(model, name, from_hf_tensors(key_of(name), tensors))
    model.reset_buffers()
    model.source_checkpoint = path  # a Qwen3-VL export rewrites this checkpoint (see save_model)
    model.checkpoint_format = qwen3_vl.MODEL_TYPE if is_vl else "qwen3"
    model.source_dtype = _source_dtype(path, key_files)
    model.generation_config = read_json(path / "generation_config.json") if (
        path / "generation_config.json").is_file() else {}
    return model


def load_sharded(model: Qwen3, path: str | Path, device: str | torch.device, skip=()) -> Qwen3:
    """Fills a model sharded on the meta device (FSDP2 `fully_shard`) from an HF checkpoint directory: each rank
    allocates only its own shards on `device` and reads only their rows from the memory-mapped safetensors.
    Parameters named in `skip` (e.g. LoRA adapters) are not in the checkpoint: allocated, left for the caller."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    path = Path(path)
    config = Qwen3Config.from_json(path / "config.json")
    if config.num_experts:
        raise CheckpointError(f"{path}: sharded (FSDP) loading of a Qwen3-MoE checkpoint is not implemented yet; "
                              f"train it in one process")
    key_files = _tensor_files(path)
    params = {name: p for name, p in model.named_parameters() if name not in skip}
    _check_tensors(path, config, {hf_key(name): p for name, p in params.items()}, key_files)
    model.to_empty(device=device)
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(key_files[hf_key(name)], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as tensors:
                for name in names:
                    param = params[name]
                    local = param.to_local() if isinstance(param, DTensor) else param
                    if local.numel() == 0:
                        continue
                    rows = tensors.get_slice(hf_key(name))
                    if isinstance(param, DTensor):
                        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                                              param.placements)
                        index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
                        local.copy_(rows[index])
                    else:
                        local.copy_(rows[:])
    model.reset_buffers()
    model.generation_config = read_json(path / "generation_config.json") if (
        path / "generation_config.json").is_file() else {}
    model.source_dtype = _source_dtype(path, key_files)
    return model


def _source_dtype(path: Path, key_files: dict[str, Path]) -> torch.dtype:
    """The dtype the checkpoint's tensors are stored in (what the export writes back by default)."""
    file = next(iter(key_files.values()))
    with safe_open(str(file), framework="pt") as tensors:
        stored = tensors.get_slice(next(iter(tensors.keys()))).get_dtype()
    return _SAFETENSORS_DTYPES.get(stored, torch.float32)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def save_model(model: Qwen3, path: str | Path, max_shard_size: int | str = "5GB",
               tokenizer_dir: str | Path | None = None, state_dict: dict[str, torch.Tensor] | None = None,
               vocab=None, dtype: torch.dtype | None = None, dist_=None) -> Path:
    """Writes config.json, generation_config.json and (sharded) safetensors that transformers loads.

    Tensors are written in `dtype`, by default the dtype the checkpoint was loaded from (`source_dtype`, bf16
    for Qwen3), else the parameters' own. `state_dict` (qforge names → full tensors, e.g. LoRA's merged
    weights) replaces the model's parameters. An FSDP2-sharded model is exported by every rank of `dist_`
    together: parameters are gathered one at a time in the output dtype and file i is written by rank
    i % world, so no rank holds more than one file's tensors in host memory. `vocab` (a VocabMap: the kept
    vocabulary the head was trained on) is saved with the weights: kept_ids.json, and the unkept ids as
    generation_config.json `suppress_tokens`. Tokenizer files are copied from `tokenizer_dir`.
    """
    path = Path(path)
    limit = parse_size(max_shard_size)
    rank, world = (dist_.rank, dist_.world) if dist_ is not None and dist_.enabled else (0, 1)
    source = state_dict if state_dict is not None else {n: p for n, p in model.named_parameters()}
    params = {key: part for name, t in source.items() for key, part in hf_tensors(hf_key(name), t).items()}
    dtype = dtype or getattr(model, "source_dtype", None) or next(iter(params.values())).dtype
    if getattr(model, "checkpoint_format", "qwen3") == qwen3_vl.MODEL_TYPE:  # rewrites the source checkpoint
        state = {name: _gathered(t.detach(), dtype).to("cpu") for name, t in source.items()}
        if rank == 0:
            qwen3_vl.save_vl(state, model.source_checkpoint, path, model.config.tie_word_embeddings, tokenizer_dir,
                             vocab)
        _barrier(world)
        return path
    shards = _split_shards({key: (p.numel() * dtype.itemsize) for key, p in params.items()}, limit)

    with staged_dir(path) if rank == 0 else contextlib.nullcontext() as tmp:
        tmp = Path(_from_rank0(str(tmp) if rank == 0 else None, world))  # one staging directory for all ranks
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        for i, (keys, name) in enumerate(zip(shards, names)):
            mine = i % world == rank
            tensors = {}
            for key in keys:
                full = _gathered(params[key].detach(), dtype)  # a collective: every rank takes part
                if mine:
                    full = full.to("cpu").contiguous()
                    # one expert's view of a fused MoE weight: safetensors refuses tensors sharing storage
                    tensors[key] = full.clone() if full.untyped_storage().nbytes() != full.nbytes else full
                del full
            if mine:
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            del tensors
        if rank == 0:
            config = model.config.to_hf() | {"torch_dtype": str(dtype).replace("torch.", "")}
            write_json(tmp / "config.json", config)
            write_json(tmp / "generation_config.json", _generation_config(model))
            if len(shards) > 1:
                weight_map = {key: name for keys, name in zip(shards, names) for key in keys}
                total = sum(p.numel() * dtype.itemsize for p in params.values())
                write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
            if vocab is not None:
                vocab.save_with_model(tmp)
            if tokenizer_dir is not None:
                for name in TOKENIZER_FILES:
                    if (Path(tokenizer_dir) / name).is_file():
                        shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        _barrier(world)  # every file is written before rank 0 moves the directory into place
    _barrier(world)
    return path


def _gathered(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The full tensor in `dtype` (cast before an FSDP all-gather, so it moves the smaller dtype)."""
    from torch.distributed.tensor import DTensor

    param = param.to(dtype)
    return param.full_tensor() if isinstance(param, DTensor) else param


def _from_rank0(value, world: int):
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


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


def _split_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
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


def _generation_config(model: Qwen3) -> dict:
    config = dict(getattr(model, "generation_config", {}) or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is None and getattr(model.config, key) is not None:
            config[key] = getattr(model.config, key)
    return config


__all__ = ["CheckpointError", "ConfigError", "load_model", "save_model"]
