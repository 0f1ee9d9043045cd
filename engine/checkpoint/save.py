"""Saving a `Qwen3` as an HF checkpoint transformers loads: config.json, generation_config.json, (sharded)
safetensors, the kept vocabulary and the tokenizer files. Written to a staging directory next to the target and
renamed into place, so a crash never leaves half a checkpoint."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from ..files import staged_dir, write_json
from ..model import Qwen3, hf_key
from .layout import GENERATION_CONFIG, copy_tokenizer, generation_config
from .moe import hf_tensors
from .qwen3_vl import save_vl
from .source import Source
from .tensors import INDEX_FILE, SINGLE_FILE, parse_size, split_shards


def save_model(model: Qwen3, path: str | Path, source: Source | None = None, max_shard_size: int | str = "5GB",
               tokenizer_dir: str | Path | None = None, state_dict: dict[str, torch.Tensor] | None = None,
               vocab=None, dtype: torch.dtype | None = None, dist_=None) -> Path:
    """Writes config.json, generation_config.json and (sharded) safetensors that transformers loads.

    `source` (what `read_source` learned about the checkpoint the model was loaded from; None for a model built
    from a config) sets the format (a Qwen3-VL source is rewritten with its language tensors replaced), the
    default dtype (the stored one, bf16 for Qwen3; else the parameters' own) and the generation settings carried
    over. `state_dict` (qforge names → full tensors, e.g. LoRA's merged weights) replaces the model's parameters.
    An FSDP2-sharded model is exported by every rank of `dist_` (a `train.parallel.Dist`) together: parameters are
    gathered one at a time in the output dtype and file i is written by rank i % world, so no rank holds more than
    one file's tensors in host memory. `vocab` (a VocabMap: the kept vocabulary the head was trained on) is saved
    with the weights: kept_ids.json, and the unkept ids as generation_config.json `suppress_tokens`. Tokenizer
    files are copied from `tokenizer_dir`.
    """
    path = Path(path)
    rank, world = (dist_.rank, dist_.world) if dist_ is not None and dist_.enabled else (0, 1)
    tensors = state_dict if state_dict is not None else {n: p for n, p in model.named_parameters()}
    params = {key: part for name, t in tensors.items() for key, part in hf_tensors(hf_key(name), t).items()}
    dtype = dtype or (source.dtype if source is not None else None) or next(iter(params.values())).dtype
    if source is not None and source.vl:  # rewrites the source checkpoint
        state = {name: gathered(t.detach(), dtype).to("cpu") for name, t in tensors.items()}
        if rank == 0:
            save_vl(state, source.path, source.generation_config, path, model.config.tie_word_embeddings,
                    tokenizer_dir, vocab, source.experts)
        if world > 1:
            dist_.barrier()
        return path
    shards = split_shards({key: (p.numel() * dtype.itemsize) for key, p in params.items()}, parse_size(max_shard_size))
    with staged_dir(path) if rank == 0 else contextlib.nullcontext() as tmp:
        tmp = Path(dist_.from_main(str(tmp) if rank == 0 else None) if world > 1 else tmp)  # one staging directory
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        for i, (keys, name) in enumerate(zip(shards, names)):
            _write_file(params, keys, dtype, tmp / name if i % world == rank else None)
        if rank == 0:
            hf = model.config.to_hf() | {"torch_dtype": str(dtype).replace("torch.", "")}
            write_json(tmp / "config.json", hf)
            write_json(tmp / GENERATION_CONFIG, generation_config(
                model.config, source.generation_config if source is not None else {}, vocab))
            if len(shards) > 1:
                weight_map = {key: name for keys, name in zip(shards, names) for key in keys}
                total = sum(p.numel() * dtype.itemsize for p in params.values())
                write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
            if vocab is not None:
                vocab.save_with_model(tmp)
            if tokenizer_dir is not None:
                copy_tokenizer(tokenizer_dir, tmp)
        if world > 1:
            dist_.barrier()  # every file is written before rank 0 moves the directory into place
    if world > 1:
        dist_.barrier()
    return path


def _write_file(params: dict[str, torch.Tensor], keys: list[str], dtype: torch.dtype, file: Path | None) -> None:
    """Gathers `keys` (a collective: every rank takes part) and writes them to `file` on the rank that owns it
    (`file` None on the others)."""
    tensors = {}
    for key in keys:
        full = gathered(params[key].detach(), dtype)
        if file is not None:
            full = full.to("cpu").contiguous()
            # one expert's view of a fused MoE weight: safetensors refuses tensors sharing storage
            tensors[key] = full.clone() if full.untyped_storage().nbytes() != full.nbytes else full
        del full
    if file is not None:
        save_file(tensors, str(file), metadata={"format": "pt"})


def gathered(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The full tensor in `dtype` (cast before an FSDP all-gather, so it moves the smaller dtype)."""
    param = param.to(dtype)
    return param.full_tensor() if isinstance(param, DTensor) else param
