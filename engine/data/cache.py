"""From data files to tokenised examples, tokenising once: the result is stored as memory-mapped arrays under a
key that hashes the data files' bytes, the tokenizer + chat template and every encoding option, so a second
or resumed run with the same inputs loads it instead of tokenising again."""
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..files import staged_dir
from .example import LOSS_WEIGHTINGS, Example
from .formats import DataError, RowError, SkippedRow, read_conversations
from .template import ChatTemplate

CACHE_VERSION = 2  # bump when the cached arrays' meaning changes (2: stricter row checks)
MULTI_TURN = ("all", "last", "split")
ON_ERROR = ("raise", "skip")
ENCODE_CHUNK = 512  # conversations per tokenizer batch call
log = logging.getLogger("qforge.data")


@dataclass
class LoadSummary:
    num_rows: int = 0  # good rows read
    num_examples: int = 0
    num_tokens: int = 0
    num_loss_tokens: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    cache_path: str | None = None
    from_cache: bool = False

    def __str__(self):
        text = (f"{self.num_rows} rows → {self.num_examples} examples, {self.num_tokens} tokens "
                f"({self.num_loss_tokens} supervised); {len(self.skipped)} rows skipped")
        if self.skipped:
            text += "".join(f"\n  {row}" for row in self.skipped[:10])
            text += f"\n  … and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
        return text


def split_turns(messages: list[dict]) -> list[list[dict]]:
    """One conversation per assistant turn, ending at that turn (to be trained with supervise="last")."""
    return [messages[:i + 1] for i, m in enumerate(messages) if m["role"] == "assistant"]


def cache_key(paths: list[Path], template: ChatTemplate, options: dict) -> str:
    digest = hashlib.sha256(f"qforge-data-v{CACHE_VERSION}\0{template.fingerprint}\0".encode())
    digest.update(json.dumps(options, sort_keys=True).encode())
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0file\0")
    return digest.hexdigest()[:32]


def _examples_from_arrays(input_ids, labels, loss_weight, offsets) -> list[Example]:
    return [Example(input_ids[a:b], labels[a:b], loss_weight[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def _tokenise(paths, template, options, on_error, progress, summary) -> list[Example]:
    encode_options = {k: options[k] for k in ("train_on_reasoning", "loss_weighting")}
    supervise = "last" if options["multi_turn"] != "all" else "all"
    examples, pending = [], []

    def flush():
        examples.extend(template.encode_batch(pending, options["enable_thinking"], supervise=supervise,
                                              **encode_options))
        pending.clear()

    with tqdm(desc="tokenising", unit=" rows", disable=not progress) as bar:
        for path in paths:
            for line, row in read_conversations(path, options["format"]):
                bar.update()
                if isinstance(row, RowError):
                    if on_error == "raise":
                        raise DataError(f"{path}:{line}: {row} (pass on_error='skip' to skip and count bad rows)")
                    summary.skipped.append(SkippedRow(str(path), line, row.field, row.reason))
                    continue
                summary.num_rows += 1
                pending.extend(split_turns(row) if options["multi_turn"] == "split" else [row])
                if len(pending) >= ENCODE_CHUNK:
                    flush()
        flush()
    return examples


def _write_cache(directory: Path, examples: list[Example], summary: LoadSummary) -> None:
    """Writes arrays + summary into a temporary directory, then renames it into place (atomic; a concurrent
    writer that finished first wins)."""
    with staged_dir(directory, replace=False) as tmp:
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in examples], out=offsets[1:])
        for name in ("input_ids", "labels", "loss_weight"):
            parts = [getattr(e, name) for e in examples]
            np.save(tmp / f"{name}.npy", np.concatenate(parts) if parts else np.zeros(0, np.int32))
        np.save(tmp / "offsets.npy", offsets)
        skipped = [vars(row) for row in summary.skipped]
        (tmp / "summary.json").write_text(json.dumps({"num_rows": summary.num_rows, "skipped": skipped}))


def _read_cache(directory: Path, summary: LoadSummary) -> list[Example]:
    """The cached examples; ValueError when a file is truncated or does not fit the others."""
    arrays = [np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("input_ids", "labels", "loss_weight")]
    offsets = np.load(directory / "offsets.npy")
    meta = json.loads((directory / "summary.json").read_text())
    if not (offsets.ndim == 1 and len(offsets) and offsets[0] == 0 and np.all(offsets[1:] >= offsets[:-1])
            and all(a.ndim == 1 and len(a) == offsets[-1] for a in arrays)):
        raise ValueError("cached arrays do not match their offsets")
    summary.num_rows = meta["num_rows"]
    summary.skipped = [SkippedRow(**row) for row in meta["skipped"]]
    return _examples_from_arrays(*arrays, offsets)


def load_examples(paths, template: ChatTemplate, *, cache_dir=None, format: str = "auto", on_error: str = "raise",
                  enable_thinking: bool = True, multi_turn: str = "all", train_on_reasoning: bool = True,
                  loss_weighting: str = "token", progress: bool = True) -> tuple[list[Example], LoadSummary]:
    """Reads, validates, renders and tokenises data files into examples (see `ChatTemplate.encode_batch`).

    multi_turn: "all" assistant turns of a conversation in one example, only the "last", or "split" into one
    example per assistant turn, each keeping its own reasoning (the faithful choice for multi-turn reasoning
    data, at the cost of repeating the history). on_error: "raise" a DataError at the first bad row (file, line,
    field), or "skip" bad rows and list them in the summary. With `cache_dir`, the result is cached there.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; expected one of {', '.join(ON_ERROR)}")
    if multi_turn not in MULTI_TURN:
        raise ValueError(f"unknown multi_turn {multi_turn!r}; expected one of {', '.join(MULTI_TURN)}")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss_weighting {loss_weighting!r}; expected one of {', '.join(LOSS_WEIGHTINGS)}")
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
    options = dict(format=format, on_error=on_error, enable_thinking=enable_thinking, multi_turn=multi_turn,
                   train_on_reasoning=train_on_reasoning, loss_weighting=loss_weighting)
    summary = LoadSummary()
    directory = Path(cache_dir) / cache_key(paths, template, options) if cache_dir is not None else None
    summary.from_cache = directory is not None and (directory / "summary.json").is_file()
    examples = None
    if summary.from_cache:
        try:
            examples = _read_cache(directory, summary)
        except (OSError, ValueError, KeyError, TypeError, EOFError) as error:  # e.g. a copy cut short
            log.warning("%s: damaged tokenised-data cache (%s); rebuilding it", directory, error)
            shutil.rmtree(directory, ignore_errors=True)
            summary = LoadSummary()
    if examples is None:
        examples = _tokenise(paths, template, options, on_error, progress, summary)
        if directory is not None:  # serve the memory-mapped copy, so the OS can page it
            _write_cache(directory, examples, summary)
            examples = _read_cache(directory, summary)
    summary.cache_path = str(directory) if directory is not None else None
    summary.num_examples = len(examples)
    summary.num_tokens = sum(len(e) for e in examples)
    summary.num_loss_tokens = sum(e.num_loss_tokens for e in examples)
    return examples, summary
