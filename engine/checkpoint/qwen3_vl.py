"""Qwen3-VL dense checkpoints (`Qwen3VLForConditionalGeneration`) as a text-only Qwen3 and back.

The language model of Qwen3-VL is a Qwen3 decoder (q/k norms, GQA, SwiGLU) stored under
`model.language_model.*` with `lm_head.*` at the top and its config nested in `text_config` (read by
`config.language_config`). Its RoPE is "interleaved mrope": three position streams (time, height, width) share the
rotary dimensions. For text-only input transformers sets all three streams to the same 0..S-1 positions, so every
dimension rotates by the one text position and the table is exactly the default RoPE table
(`tests/engine/checkpoint/test_qwen3_vl.py` checks logits against `Qwen3VLForConditionalGeneration`). qforge
therefore loads the language model into `Qwen3` and trains it on text; the export rewrites only the language
tensors and copies every other tensor (the vision tower, its mergers) bitwise, plus every processor /
preprocessor / chat-template file.

Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`, model_type `qwen3_vl_moe`) is the same with a Qwen3-MoE
language model: same keys, same RoPE, its experts stored fused (`mlp.experts.gate_up_proj`, not one tensor per
expert), as [E, 2I, H] / [E, H, I] when transformers 5 saved them and transposed ([E, H, 2I] / [E, I, H]) in the
hub's files; `checkpoint/moe.py` reads either and the export writes the layout it found. Its router always
renormalises the top-k weights (`config.language_config`).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import read_json
from ..errors import CheckpointError
from ..files import staged_dir, write_json
from .layout import GENERATION_CONFIG, copy_tokenizer, with_suppressed
from .moe import PER_EXPERT, ExpertLayout, hf_tensors
from .tensors import INDEX_FILE, SINGLE_FILE, open_tensors, tensor_files

LANGUAGE_PREFIX = "model.language_model."


def checkpoint_key(name: str) -> str:
    """qforge parameter name → its key in a Qwen3-VL safetensors file."""
    return name if name.startswith("lm_head.") else LANGUAGE_PREFIX + name


def is_language_key(key: str) -> bool:
    return key.startswith((LANGUAGE_PREFIX, "lm_head."))


def save_vl(state: dict[str, torch.Tensor], source: Path, generation: dict, path: Path, tie_word_embeddings: bool,
            tokenizer_dir: str | Path | None = None, vocab=None, experts: ExpertLayout = PER_EXPERT) -> Path:
    """Writes the Qwen3-VL checkpoint `source` into `path` with its language tensors replaced by `state`
    (qforge names → tensors). Every other tensor is copied bitwise, in the source's shard layout; language
    tensors are written in the dtype the source stored them in. Built in a staging directory, moved into place.
    `vocab` (the kept vocabulary the head was trained on) is saved as in `save_model`; `generation` is the source's
    generation_config.json, rewritten only to suppress the unkept ids. `experts`: how the source stores a MoE
    language model's experts (`Source.experts`)."""
    key_files = tensor_files(source)
    new = _language_tensors(state, source, key_files, tie_word_embeddings, experts)
    with staged_dir(path) as tmp:
        rewritten = (SINGLE_FILE, INDEX_FILE) + ((GENERATION_CONFIG,) if vocab is not None else ())
        for item in source.iterdir():  # processor, preprocessor, chat template, generation config, ...
            if item.is_file() and item.name not in rewritten and item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
        if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != source.resolve():
            copy_tokenizer(tokenizer_dir, tmp)
        total = sum(_write_shard(file, new, tmp) for file in sorted(set(key_files.values())))
        if (source / INDEX_FILE).is_file():
            data = read_json(source / INDEX_FILE)
            data.setdefault("metadata", {})["total_size"] = total
            write_json(tmp / INDEX_FILE, data)
        if vocab is not None:
            vocab.save_with_model(tmp)
            write_json(tmp / GENERATION_CONFIG, with_suppressed(generation, vocab))
    return path


def _language_tensors(state: dict[str, torch.Tensor], source: Path, key_files: dict[str, Path],
                      tie_word_embeddings: bool, experts: ExpertLayout) -> dict[str, torch.Tensor]:
    """The trained tensors under their Qwen3-VL keys, after checking they are exactly the source's language model."""
    new = {key: part for name, t in state.items()
           for key, part in hf_tensors(checkpoint_key(name), t.detach().to("cpu"), experts).items()}
    if tie_word_embeddings and "lm_head.weight" in key_files:  # a redundant stored copy stays consistent
        new["lm_head.weight"] = new[checkpoint_key("embed_tokens.weight")]
    stored_language = {key for key in key_files if is_language_key(key)}
    if tie_word_embeddings:
        stored_language.discard("lm_head.weight")
    missing = sorted(stored_language - set(new))
    extra = sorted(set(new) - set(key_files))
    if missing or extra:
        raise CheckpointError(f"{source}: the trained model does not match the Qwen3-VL checkpoint it came from "
                              f"(not trained: {missing[:5]}, not in the checkpoint: {extra[:5]})")
    return new


def _write_shard(file: Path, new: dict[str, torch.Tensor], tmp: Path) -> int:
    """Copies one source shard into `tmp` with the trained tensors in the stored dtype; returns its tensor bytes."""
    total = 0
    with open_tensors(file) as reader:  # a damaged source shard is a CheckpointError naming it
        metadata = reader.metadata() or {"format": "pt"}
        tensors = {}
        for key in reader.keys():
            original = reader.get_tensor(key)
            if key in new:
                if tuple(new[key].shape) != tuple(original.shape):
                    raise CheckpointError(f"{file}: {key} has shape {list(original.shape)} but the trained "
                                          f"tensor is {list(new[key].shape)}")
                tensors[key] = new[key].to(original.dtype).contiguous()
            else:
                tensors[key] = original
            total += original.numel() * original.element_size()
    save_file(tensors, str(tmp / file.name), metadata=metadata)
    return total
