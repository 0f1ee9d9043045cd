"""Counts a tokenizer's tokens per CJK class and writes the kept-id list.

    python -m qforge.tools.vocab_report TOKENIZER_DIR [--out kept_ids.json] [--vocab-size ROWS]

The JSON written by --out is what `VocabMap.load` reads (training with a restricted output head).
"""
from __future__ import annotations

import argparse
import sys

from qforge.engine.vocab import CLASSES, VocabMap, scan_tokenizer

DESCRIPTIONS = {
    "cjk": "decode to text containing a CJK character",
    "cjk_bytes": "partial UTF-8 that can only belong to CJK characters",
    "special": "added/special tokens, always kept",
    "other": "everything else, kept (includes all 256 single-byte tokens)",
}


def report(tokenizer_dir: str, out: str | None = None, vocab_size: int | None = None) -> str:
    scan = scan_tokenizer(tokenizer_dir)
    removed = len(scan.classes["cjk"]) + len(scan.classes["cjk_bytes"])
    lines = [f"tokenizer: {tokenizer_dir} ({scan.size} tokens)"]
    lines += [f"  {name:<10} {len(scan.classes[name]):>7}  {DESCRIPTIONS[name]}" for name in CLASSES]
    lines += [
        f"removed: {removed} ({100 * removed / scan.size:.2f}%), kept: {scan.size - removed}",
        f"suppressed when sampling: {len(scan.suppress)} kept tokens that can start a CJK character "
        f"({len(scan.single_byte_cjk)} of them single bytes that can only start one)",
    ]
    if out:
        vocab = VocabMap.from_tokenizer(tokenizer_dir, vocab_size)
        vocab.save(out, tokenizer=str(tokenizer_dir), counts={n: len(scan.classes[n]) for n in CLASSES})
        lines.append(f"wrote {vocab.new_size} kept ids to {out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer_dir", help="directory holding tokenizer.json")
    parser.add_argument("--out", help='write the kept ids here ({"kept_ids": [...], "suppress_ids": [...], ...})')
    parser.add_argument("--vocab-size", type=int, help="rows of the model's output head (default: tokenizer size)")
    args = parser.parse_args(argv)
    try:
        print(report(args.tokenizer_dir, args.out, args.vocab_size))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
