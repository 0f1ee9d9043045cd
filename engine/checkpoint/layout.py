"""The files of an exported model directory besides its weights: tokenizer files copied from the run's tokenizer,
and generation_config.json, written once by the export with everything it must hold."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..config import Qwen3Config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"


def copy_tokenizer(tokenizer_dir: str | Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, target / name)


def with_suppressed(generation: dict, vocab) -> dict:
    """`generation` with every id outside the kept vocabulary `vocab` (a VocabMap) in `suppress_tokens`, so
    generation from the export never emits a token the head was not trained on."""
    return {**generation, "suppress_tokens": sorted({*(generation.get("suppress_tokens") or []),
                                                     *vocab.suppress_tokens})}


def generation_config(config: Qwen3Config, source_generation: dict, vocab=None) -> dict:
    """A dense export's generation_config.json: the source checkpoint's, with the special ids of `config` where it
    has none, and the unkept ids of `vocab` suppressed."""
    generation = dict(source_generation)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if generation.get(key) is None and getattr(config, key) is not None:
            generation[key] = getattr(config, key)
    return with_suppressed(generation, vocab) if vocab is not None else generation
