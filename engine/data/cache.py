"""From data files to tokenised examples (SFT conversations; preference pairs, see preference.py), tokenising
once: the result is stored as memory-mapped arrays under a key that hashes the data files' bytes, the
tokenizer + chat template and every encoding option, so a second or resumed run with the same inputs loads it
instead of tokenising again."""
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field
from tqdm import tqdm

from ..config_io import settings
from ..files import staged_dir
from .example import Example
from .formats import (MAX_ROW_BYTES, Conversation, DataError, RowError, SkippedRow, read_conversations,
                      undeclared_tool_calls)
from ..thinking import has_reasoning
from .template import ChatTemplate

CACHE_VERSION = 4  # bump when the cached arrays' meaning changes (2: stricter row checks, 3: no loss weights,
# 4: the kinds count undeclared tool calls and dropped reasoning)
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
    kinds: dict[str, int] = field(default_factory=dict)  # good rows per kind (see `row_kinds`)

    def __str__(self):
        text = (f"{self.num_rows} rows → {self.num_examples} examples, {self.num_tokens} tokens "
                f"({self.num_loss_tokens} supervised); {len(self.skipped)} rows skipped")
        if self.kinds:
            text += "; rows by kind: " + ", ".join(f"{kind} {n}" for kind, n in sorted(self.kinds.items()))
        if self.skipped:
            text += "".join(f"\n  {row}" for row in self.skipped[:10])
            text += f"\n  … and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
        return text


def split_turns(row: Conversation) -> list[Conversation]:
    """One conversation per assistant turn, ending at that turn (to be trained with supervise="last")."""
    return [row.upto(i + 1) for i, m in enumerate(row.messages) if m["role"] == "assistant"]


def row_kinds(row: Conversation) -> list[str]:
    """The kinds a row is counted under when loading: "reasoning" (thinking on, with reasoning), "plain"
    (thinking on, no reasoning: its final turn renders an empty think block), "no-think" (thinking off), and
    additionally "tools" (a tool schema or tool calls)."""
    if not row.enable_thinking:
        kinds = ["no-think"]
    else:
        kinds = ["reasoning" if has_reasoning(row.messages) else "plain"]
    if row.tools or any(m.get("tool_calls") for m in row.messages):
        kinds.append("tools")
    kinds += [kind for kind, found in ROW_WARNINGS.items() if found(row)]
    return kinds


# kinds of rows that train something other than they seem to: a warning with counts, an error with data.strict
ROW_WARNINGS = {
    "undeclared-tool-call": lambda row: bool(undeclared_tool_calls(row)),
    "reasoning-dropped": lambda row: row.enable_thinking is False and has_reasoning(row.messages),
}


def cache_key(paths: list[Path], template: ChatTemplate, options: dict) -> str:
    digest = hashlib.sha256(f"qforge-data-v{CACHE_VERSION}\0{template.fingerprint}\0".encode())
    digest.update(json.dumps(options, sort_keys=True).encode())
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0file\0")
    return digest.hexdigest()[:32]


def _examples_from_arrays(input_ids, labels, offsets) -> list[Example]:
    return [Example(input_ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def _row_count(paths) -> int | None:
    """The number of rows in JSONL files (a quick pass over the bytes), so the tokenising bar shows an ETA;
    None when another format is among them (its row count would cost a full parse)."""
    if any(Path(p).suffix.lower() not in (".jsonl", ".ndjson") for p in paths):
        return None
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += sum(1 for line in f if line.strip())
    return total


def _tokenise(paths, template, options, on_error, progress, summary) -> list[Example]:
    supervise = "last" if options["multi_turn"] != "all" else "all"
    examples, pending = [], []

    def flush():
        examples.extend(template.encode_batch(pending, supervise=supervise,  # thinking: fixed per row when read
                                              train_on_reasoning=options["train_on_reasoning"],
                                              empty_think=options["empty_think"]))
        pending.clear()

    total = _row_count(paths) if progress else None
    with tqdm(total=total, desc="tokenising", unit=" rows", disable=not progress) as bar:
        for path in paths:
            for line, row in read_conversations(path, options["format"], options["max_row_bytes"],
                                                options["enable_thinking"]):
                bar.update()
                if isinstance(row, RowError):
                    if on_error == "raise":
                        raise DataError(f"{path}:{line}: {row} (data.on_error=skip skips and counts bad rows)")
                    summary.skipped.append(SkippedRow(str(path), line, row.field, row.reason))
                    continue
                summary.num_rows += 1
                for kind in row_kinds(row):
                    summary.kinds[kind] = summary.kinds.get(kind, 0) + 1
                pending.extend(split_turns(row) if options["multi_turn"] == "split" else [row])
                if len(pending) >= ENCODE_CHUNK:
                    flush()
        flush()
    return examples


def _write_cache(directory: Path, examples: list[Example], summary: LoadSummary) -> list[Example]:
    """Writes arrays + summary into a temporary directory, then renames it into place (atomic; a concurrent
    writer that finished first wins). Returns the examples as read-only views of the arrays just written through
    memory maps: the OS can page them, and nothing is read back."""
    with staged_dir(directory, replace=False) as tmp:
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in examples], out=offsets[1:])
        arrays = []
        for name in ("input_ids", "labels"):
            parts = [getattr(e, name) for e in examples]
            array = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", shape=(int(offsets[-1]),),
                                              dtype=parts[0].dtype if parts else np.int32)
            if parts:
                np.concatenate(parts, out=array)
            array.flush()
            array.flags.writeable = False
            arrays.append(array)
        np.save(tmp / "offsets.npy", offsets)
        skipped = [vars(row) for row in summary.skipped]
        (tmp / "summary.json").write_text(json.dumps({"num_rows": summary.num_rows, "skipped": skipped,
                                                      "kinds": summary.kinds}))
    return _examples_from_arrays(*arrays, offsets)


def _read_cache(directory: Path, summary: LoadSummary) -> list[Example]:
    """The cached examples; ValueError when a file is truncated or does not fit the others."""
    arrays = [np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("input_ids", "labels")]
    offsets = np.load(directory / "offsets.npy")
    meta = json.loads((directory / "summary.json").read_text())
    if not (offsets.ndim == 1 and len(offsets) and offsets[0] == 0 and np.all(offsets[1:] >= offsets[:-1])
            and all(a.ndim == 1 and len(a) == offsets[-1] for a in arrays)):
        raise ValueError("cached arrays do not match their offsets")
    summary.num_rows = meta["num_rows"]
    summary.skipped = [SkippedRow(**row) for row in meta["skipped"]]
    summary.kinds = meta.get("kinds", {})
    return _examples_from_arrays(*arrays, offsets)


@settings
class TokenizeSettings:
    """How data files become examples; every field is part of the cache key (loss weights are not: packing
    computes them)."""
    format: Literal["auto", "messages", "sharegpt"] = "auto"
    # true | false | "auto": per row, thinking on iff the row has reasoning (`Conversation.with_thinking`, decided
    # when the row is read); a row's own `enable_thinking` field always wins
    enable_thinking: bool | Literal["auto"] = True
    # the empty <think></think> block of reasoning-free turns rendered with thinking on: "mask" keeps it out of
    # the loss (plain rows in a thinking mix do not learn to skip thinking), "train" supervises it
    empty_think: Literal["train", "mask"] = "mask"
    # "all" assistant turns of a conversation in one example, only the "last", or "split" into one example per
    # assistant turn, each keeping its own reasoning (the faithful choice for multi-turn reasoning data, at the
    # cost of repeating the history)
    multi_turn: Literal["all", "last", "split"] = "all"
    train_on_reasoning: bool = True
    # "raise" a DataError at the first bad row (file, line, field), or "skip" bad rows and list them
    on_error: Literal["raise", "skip"] = "raise"
    max_row_bytes: Annotated[int, Field(ge=1024)] = MAX_ROW_BYTES  # a longer JSONL line is a bad row, never read whole


def load_examples(paths, template: ChatTemplate, settings: TokenizeSettings | None = None, *, cache_dir=None,
                  progress: bool = True) -> tuple[list[Example], LoadSummary]:
    """Reads, validates, renders and tokenises data files into examples (see `ChatTemplate.encode_batch`).

    `settings` may be any TokenizeSettings subclass (the trainer passes its `data` section). With `cache_dir`,
    the result is cached there.
    """
    settings = settings if settings is not None else TokenizeSettings()
    paths = data_paths(paths)
    options = {f.name: getattr(settings, f.name) for f in dataclasses.fields(TokenizeSettings)}
    return load_cached(paths, template, options, cache_dir,
                       lambda summary: _tokenise(paths, template, options, settings.on_error, progress, summary))


def data_paths(paths) -> list[Path]:
    """One path or several, each an existing file (else a DataError naming it)."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
    return paths


def load_cached(paths: list[Path], template: ChatTemplate, options: dict, cache_dir, tokenise, check=None
                ) -> tuple[list[Example], LoadSummary]:
    """The examples `tokenise(summary)` makes of `paths`, read from `cache_dir` when a run with the same file
    contents, template and `options` stored them; an entry that is damaged, or that `check(examples, summary)`
    rejects with a ValueError, is rebuilt. Every kind of tokenised data (SFT examples, preference pairs) goes
    through here; `options` must tell the kinds apart."""
    summary = LoadSummary()
    directory = Path(cache_dir) / cache_key(paths, template, options) if cache_dir is not None else None
    summary.from_cache = directory is not None and (directory / "summary.json").is_file()
    examples = None
    if summary.from_cache:
        try:
            examples = _read_cache(directory, summary)
            if check is not None:
                check(examples, summary)
        except (OSError, ValueError, KeyError, TypeError, EOFError) as error:  # e.g. a copy cut short
            log.warning("%s: damaged tokenised-data cache (%s); rebuilding it", directory, error)
            shutil.rmtree(directory, ignore_errors=True)
            summary = LoadSummary()
    if examples is None:
        examples = tokenise(summary)
        if directory is not None:  # serve the memory-mapped copy, so the OS can page it
            examples = _write_cache(directory, examples, summary)
    summary.cache_path = str(directory) if directory is not None else None
    summary.num_examples = len(examples)
    summary.num_tokens = sum(len(e) for e in examples)
    summary.num_loss_tokens = sum(e.num_loss_tokens for e in examples)
    return examples, summary
