"""CJK-free export of a Qwen3 checkpoint: a smaller HF-format model directory and a rewritten tokenizer.

The kept set is the one saved with the model (`kept_ids.json` in a trainer's `final/`), else the CJK-free set of
its tokenizer.

    python recipes/prune.py --config recipes/configs/prune.yaml model.path=DIR output.dir=OUT [key=value ...]
"""
from __future__ import annotations

import json
import sys
from dataclasses import field
from pathlib import Path
from typing import Annotated

from pydantic import Field

from qforge.engine.config import read_json
from qforge.engine.config_io import settings
from qforge.engine.vocab import VocabMap
from qforge.engine.vocab_prune import padded_size, prune_checkpoint
from qforge.recipes.common.cli import OutputDirSettings, run_recipe


@settings
class PathSettings:
    path: str | None = None


@settings
class PadSettings:
    pad_to_multiple: Annotated[int, Field(ge=1)] | None = 128  # output rows padded to a multiple (null: not padded)


@settings
class PruneConfig:
    model: PathSettings = field(default_factory=PathSettings)
    tokenizer: PathSettings = field(default_factory=PathSettings)  # default: model.path
    vocab: PadSettings = field(default_factory=PadSettings)
    output: OutputDirSettings = field(default_factory=OutputDirSettings)

    def __post_init__(self):
        for key, value in (("model.path", self.model.path), ("output.dir", self.output.dir)):
            if not value:
                raise ValueError(f"'{key}' is required (set it in the file or as {key}=...)")


def kept_vocabulary(model_dir: Path, tokenizer_dir: Path) -> VocabMap:
    """The set the model was trained on (`kept_ids.json` saved with it by the trainer), else the CJK-free set
    of its tokenizer."""
    rows = read_json(model_dir / "config.json").get("vocab_size")
    return VocabMap.of_model(model_dir) or VocabMap.from_tokenizer(tokenizer_dir, rows)


def prune(config: PruneConfig) -> dict:
    """Prunes the checkpoint and returns a summary (rows and bytes before and after)."""
    model_dir = Path(config.model.path)
    tokenizer_dir = Path(config.tokenizer.path or model_dir)
    vocab = kept_vocabulary(model_dir, tokenizer_dir)
    out = prune_checkpoint(model_dir, config.output.dir, vocab, tokenizer_dir, config.vocab.pad_to_multiple)
    size = lambda directory: sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))  # noqa: E731
    return {"rows_before": vocab.original_size, "kept_tokens": vocab.new_size,
            "rows_after": padded_size(vocab.new_size, config.vocab.pad_to_multiple),
            "weight_bytes_before": size(model_dir), "weight_bytes_after": size(out), "output": str(out)}


def main(argv: list[str] | None = None) -> int:
    return run_recipe(PruneConfig, prune, argv, __doc__, "model.path=runs/demo/final",
                      report=lambda _, summary: print(json.dumps(summary, indent=2)))


if __name__ == "__main__":
    sys.exit(main())
