"""Export a checkpoint and tokenizer restricted to a `VocabMap`'s kept tokens, loadable by transformers.

Weights are rewritten shard by shard with safetensors (only the embedding and output-head rows change),
so a 32B checkpoint never has to fit in memory at once. Everything is written into a temporary sibling
directory that is renamed into place at the end.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from qforge.engine.checkpoint.qwen3_vl import checkpoint_key
from qforge.engine.config import VISION_TOKEN_FIELDS, is_vl_config
from qforge.engine.files import staged_dir, write_json
from qforge.engine.vocab import VocabMap

VOCAB_ROW_TENSORS = ("model.embed_tokens.weight", "lm_head.weight",
                     checkpoint_key("embed_tokens.weight"))  # Qwen3-VL's embedding
COPIED_TOKENIZER_FILES = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")
TOKENIZER_OR_INDEX_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                            "model.safetensors.index.json")  # written pruned (or rebuilt), never copied as they are
SPECIAL_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def padded_size(size: int, multiple: int | None) -> int:
    return size if not multiple else -(-size // multiple) * multiple


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None


def _remap_ids(value, old_to_new: list[int], where: str):
    """An id or list of ids (or None) in kept ids; a removed id is an error, never a silent drop."""
    if value is None:
        return None
    ids = [value] if isinstance(value, int) else list(value)
    new = [old_to_new[i] if 0 <= i < len(old_to_new) else -1 for i in ids]
    if -1 in new:
        raise ValueError(f"{where}: token id {ids[new.index(-1)]} is not in the kept vocabulary")
    return new[0] if isinstance(value, int) else new


def prune_tokenizer(src_dir: str | Path, dst_dir: str | Path, vocab: VocabMap) -> None:
    """Writes the tokenizer files of `src_dir` into the existing `dst_dir` (prune_checkpoint passes its
    temporary directory) with only the kept tokens, densely renumbered.

    Merges that use or produce a removed token are dropped; a kept token that loses the merge producing
    it would become unreachable, which is reported as an error rather than written.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    old_to_new = vocab.old_to_new.tolist()
    spec = _read_json(src / "tokenizer.json")
    if (spec.get("post_processor") or {}).get("type") not in (None, "ByteLevel"):
        raise ValueError(f"{src / 'tokenizer.json'}: post_processor type "
                         f"{spec['post_processor']['type']!r} may hold token ids; only ByteLevel is supported")
    model = spec["model"]
    vocab_items = {token: old_to_new[i] for token, i in model["vocab"].items() if old_to_new[i] >= 0}
    pairs = [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in model["merges"]]
    kept = [left in vocab_items and right in vocab_items and left + right in vocab_items for left, right in pairs]
    kept_merges = [merge for merge, keep in zip(model["merges"], kept) if keep]
    produced = {"".join(pair) for pair, keep in zip(pairs, kept) if keep}
    orphans = [t for t in {"".join(pair) for pair in pairs} if t in vocab_items and t not in produced]
    if orphans:
        raise ValueError(f"{len(orphans)} kept tokens (e.g. {orphans[:5]}) are only produced by merges through "
                         "removed tokens; the classification and the merges disagree")
    model["vocab"] = dict(sorted(vocab_items.items(), key=lambda item: item[1]))
    model["merges"] = kept_merges
    for entry in spec.get("added_tokens", []):
        entry["id"] = _remap_ids(entry["id"], old_to_new, f"{src / 'tokenizer.json'}: added_tokens")
    write_json(dst / "tokenizer.json", spec)

    config_path = src / "tokenizer_config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        if "added_tokens_decoder" in config:
            config["added_tokens_decoder"] = {
                str(_remap_ids(int(i), old_to_new, f"{config_path}: added_tokens_decoder")): entry
                for i, entry in config["added_tokens_decoder"].items()}
        write_json(dst / "tokenizer_config.json", config)
    if (src / "added_tokens.json").is_file():
        added = _read_json(src / "added_tokens.json")
        write_json(dst / "added_tokens.json",
                    {t: _remap_ids(i, old_to_new, f"{src / 'added_tokens.json'}") for t, i in added.items()})
    if (src / "vocab.json").is_file():
        write_json(dst / "vocab.json", model["vocab"])
    if (src / "merges.txt").is_file():
        lines = [m if isinstance(m, str) else " ".join(m) for m in kept_merges]
        (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    for name in COPIED_TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _prune_configs(src: Path, dst: Path, vocab: VocabMap, rows: int) -> None:
    """config.json gets the new row count; special ids are remapped; padding rows are suppressed too.

    A Qwen3-VL config keeps vocab_size in `text_config` and its image/video token ids at the top level."""
    old_to_new = vocab.old_to_new.tolist()
    config = _read_json(src / "config.json")
    is_vl = is_vl_config(config)
    sections = [(config, SPECIAL_ID_FIELDS + (VISION_TOKEN_FIELDS if is_vl else ()), "")]
    if is_vl:
        sections.append((config.get("text_config") or {}, SPECIAL_ID_FIELDS, "text_config."))
    sized = sections[-1][0]
    if sized.get("vocab_size") != vocab.original_size:
        raise ValueError(f"{src / 'config.json'}: {sections[-1][2]}vocab_size={sized.get('vocab_size')} but the "
                         f"vocabulary map was built for {vocab.original_size} rows; pass the model's vocab_size "
                         f"to VocabMap")
    sized["vocab_size"] = rows
    for section, id_fields, prefix in sections:
        for field in id_fields:
            if section.get(field) is not None:
                section[field] = _remap_ids(section[field], old_to_new, f"{src / 'config.json'}: {prefix}{field}")
    write_json(dst / "config.json", config)

    generation_path = src / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.is_file() else {
        field: config[field] for field in SPECIAL_ID_FIELDS if config.get(field) is not None}
    for field in SPECIAL_ID_FIELDS:
        if generation.get(field) is not None:
            generation[field] = _remap_ids(generation[field], old_to_new, f"{generation_path}: {field}")
    previous = [old_to_new[i] for i in generation.get("suppress_tokens") or [] if old_to_new[i] >= 0]
    padding = range(vocab.new_size, rows)
    generation["suppress_tokens"] = sorted({*previous, *vocab.to_new(vocab.suppress_ids).tolist(), *padding})
    generation["_from_model_config"] = False  # else transformers may rebuild it from config.json, losing the list
    write_json(dst / "generation_config.json", generation)


def _weight_shards(src: Path) -> tuple[list[str], dict | None]:
    index_path = src / "model.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        return sorted(set(index["weight_map"].values())), index
    if (src / "model.safetensors").is_file():
        return ["model.safetensors"], None
    raise FileNotFoundError(f"{src}: no model.safetensors or model.safetensors.index.json")


def _prune_rows(weight: torch.Tensor, vocab: VocabMap, rows: int, where: str) -> torch.Tensor:
    if weight.shape[0] != vocab.original_size:
        raise ValueError(f"{where}: {weight.shape[0]} rows but the vocabulary map expects "
                         f"{vocab.original_size}; the tokenizer does not belong to this model")
    pruned = weight.new_zeros(rows, *weight.shape[1:])  # filled in place: one extra copy at most
    torch.index_select(weight, 0, vocab.kept_ids, out=pruned[:vocab.new_size])
    return pruned


def prune_checkpoint(src_dir: str | Path, dst_dir: str | Path, vocab: VocabMap,
                     tokenizer_dir: str | Path | None = None, pad_to_multiple: int | None = 128) -> Path:
    """Writes `dst_dir`: the HF checkpoint of `src_dir` with removed tokens' embedding and output rows
    deleted (padded with zero rows to `pad_to_multiple`), its configs and the pruned tokenizer.

    Tied checkpoints store only the embedding, so they stay tied. Returns `dst_dir`.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new output directory or remove it")
    rows = padded_size(vocab.new_size, pad_to_multiple)
    shards, index = _weight_shards(src)
    with staged_dir(dst) as work:
        _prune_configs(src, work, vocab, rows)
        prune_tokenizer(tokenizer_dir or src, work, vocab)
        for item in src.iterdir():  # e.g. a Qwen3-VL checkpoint's processor / preprocessor configs, unchanged
            if item.is_file() and item.suffix != ".safetensors" and not (work / item.name).exists() and (
                    item.name not in TOKENIZER_OR_INDEX_FILES):
                shutil.copy2(item, work / item.name)
        total_bytes = 0
        for shard in tqdm(shards, desc="pruning shards", unit="shard"):
            with safe_open(src / shard, framework="pt") as reader:
                metadata = reader.metadata() or {"format": "pt"}
                tensors = {}
                for name in reader.keys():
                    tensor = reader.get_tensor(name)
                    if name in VOCAB_ROW_TENSORS:
                        tensor = _prune_rows(tensor, vocab, rows, f"{src / shard}: {name}")
                    tensors[name] = tensor
                    total_bytes += tensor.numel() * tensor.element_size()
            save_file(tensors, work / shard, metadata=metadata)
            del tensors
        if index is not None:
            index.setdefault("metadata", {})["total_size"] = total_bytes
            write_json(work / "model.safetensors.index.json", index)
    return dst
