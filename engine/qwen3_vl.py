"""Qwen3-VL dense checkpoints (`Qwen3VLForConditionalGeneration`) as a text-only Qwen3 and back.

The language model of Qwen3-VL is a Qwen3 decoder (q/k norms, GQA, SwiGLU) stored under
`model.language_model.*` with `lm_head.*` at the top and its config nested in `text_config`. Its RoPE is
"interleaved mrope": three position streams (time, height, width) share the rotary dimensions. For text-only
input transformers sets all three streams to the same 0..S-1 positions, so every dimension rotates by the one
text position and the table is exactly the default RoPE table (`tests/engine/test_qwen3_vl.py` checks logits
against `Qwen3VLForConditionalGeneration`). qforge therefore loads the language model into `Qwen3` and trains it
on text; the export rewrites only the language tensors and copies every other tensor (the vision tower, its
mergers) bitwise, plus every processor / preprocessor / chat-template file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MODEL_TYPE = "qwen3_vl"
LANGUAGE_PREFIX = "model.language_model."
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Token ids in a Qwen3-VL config.json besides the usual bos/eos/pad (the vocabulary prune remaps them too).
VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def is_vl_config(hf: dict) -> bool:
    return hf.get("model_type") == MODEL_TYPE


def language_config(hf: dict, source: str = "config.json") -> dict:
    """The Qwen3 text config inside a Qwen3-VL config.json, as a `qwen3` config dict.

    Tying is a property of the whole model (top-level `tie_word_embeddings`; transformers 4.x also copies it into
    text_config); dtype and special ids may sit at either level."""
    from .config import ConfigError

    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: field 'text_config' is missing; a qwen3_vl config.json nests the language "
                          f"model's config there")
    if "moe_intermediate_size" in text or "num_experts" in text:
        raise ConfigError(f"{source}: field 'text_config' describes a Qwen3-VL MoE language model; qforge trains "
                          f"the dense Qwen3-VL models only")
    merged = dict(text)
    for key in ("tie_word_embeddings", "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id"):
        if hf.get(key) is not None and (key == "tie_word_embeddings" or merged.get(key) is None):
            merged[key] = hf[key]
    merged["model_type"] = "qwen3"
    return merged


def checkpoint_key(name: str) -> str:
    """qforge parameter name → its key in a Qwen3-VL safetensors file."""
    return name if name.startswith("lm_head.") else LANGUAGE_PREFIX + name


def is_language_key(key: str) -> bool:
    return key.startswith((LANGUAGE_PREFIX, "lm_head."))


def save_vl(state: dict[str, torch.Tensor], source: str | Path, path: str | Path, tie_word_embeddings: bool,
            tokenizer_dir: str | Path | None = None, vocab=None) -> Path:
    """Writes the Qwen3-VL checkpoint `source` into `path` with its language tensors replaced by `state`
    (qforge names → tensors). Every other tensor is copied bitwise, in the source's shard layout; language
    tensors are written in the dtype the source stored them in. Built in a staging directory, moved into place.
    `vocab` (the kept vocabulary the head was trained on) is saved as in `checkpoint.save_model`."""
    from .checkpoint import TOKENIZER_FILES, CheckpointError, _normal_modes, _tensor_files
    from .config import read_json
    from .files import staged_dir, write_json

    source, path = Path(source), Path(path)
    key_files = _tensor_files(source)
    new = {checkpoint_key(name): t.detach().to("cpu") for name, t in state.items()}
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

    with staged_dir(path) as tmp:
        for item in source.iterdir():  # processor, preprocessor, chat template, generation config, ...
            if item.is_file() and item.name not in WEIGHT_FILES and item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
        if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != source.resolve():
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        total = 0
        for file in sorted(set(key_files.values())):
            with safe_open(str(file), framework="pt") as reader:
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
        index = source / "model.safetensors.index.json"
        if index.is_file():
            data = read_json(index)
            data.setdefault("metadata", {})["total_size"] = total
            write_json(tmp / index.name, data)
        if vocab is not None:
            vocab.save_with_model(tmp)
        _normal_modes(tmp)
    return path
