"""CJK-free export of a Qwen3 checkpoint: a smaller HF-format model directory and a rewritten tokenizer.

    python recipes/prune.py --config recipes/configs/prune.yaml model.path=DIR output.dir=OUT [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qforge.engine.config_io import ConfigKeyError, load_config
from qforge.engine.vocab import VocabMap
from qforge.engine.vocab_prune import padded_size, prune_checkpoint
from qforge.recipes.cli import OutputSettings


@dataclass
class ModelSettings:
    path: str | None = None


@dataclass
class TokenizerSettings:
    path: str | None = None  # default: model.path


@dataclass
class VocabSettings:
    pad_to_multiple: int | None = 128


@dataclass
class PruneConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    vocab: VocabSettings = field(default_factory=VocabSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    def __post_init__(self):
        for key, value in (("model.path", self.model.path), ("output.dir", self.output.dir)):
            if not value:
                raise ValueError(f"'{key}' is required (set it in the file or as {key}=...)")


def prune(config: PruneConfig) -> dict:
    """Prunes the checkpoint and returns a summary (rows and bytes before and after)."""
    model_dir = Path(config.model.path)
    tokenizer_dir = Path(config.tokenizer.path or model_dir)
    rows = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    vocab = VocabMap.from_tokenizer(tokenizer_dir, rows)
    out = prune_checkpoint(model_dir, config.output.dir, vocab, tokenizer_dir, config.vocab.pad_to_multiple)
    size = lambda directory: sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))  # noqa: E731
    return {"rows_before": rows, "kept_tokens": vocab.new_size,
            "rows_after": padded_size(vocab.new_size, config.vocab.pad_to_multiple),
            "weight_bytes_before": size(model_dir), "weight_bytes_after": size(out), "output": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see recipes/configs/prune.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.path=runs/demo/final")
    args = parser.parse_args(argv)
    try:
        config = load_config(PruneConfig, args.config, args.overrides)
    except ConfigKeyError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    try:
        summary = prune(config)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
