"""load_pairs: tokenised preference pairs cached like SFT data (engine/data/cache.py): read back without
tokenising, rebuilt when the data, the options or the entry itself change."""
import json
import logging

import numpy as np
import pytest

from data_fixtures import qwen_template  # noqa: F401 (pytest fixtures)
from qforge.engine.data import TokenizeSettings, load_examples
from qforge.engine.data.preference import load_pairs

ROWS = [{"messages": [{"role": "user", "content": f"{i} + {i} = ?"}],
         "chosen": {"role": "assistant", "content": str(2 * i), "reasoning_content": f"{i} cộng {i}"},
         "rejected": f"{2 * i + 1}"} for i in range(6)]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS), encoding="utf-8")
    return path


def same_pairs(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.labels, y.labels)
        for p, q in zip(a, b) for x, y in ((p.chosen, q.chosen), (p.rejected, q.rejected)))


def no_tokenising(*args, **kwargs):
    raise AssertionError("tokenised again although the cache is valid")


def test_second_load_reads_the_cache_without_tokenising(pairs_file, tmp_path, qwen_template, monkeypatch):
    cache = tmp_path / "cache"
    fresh, summary = load_pairs([pairs_file], qwen_template, cache_dir=cache)
    assert not summary.from_cache and summary.num_rows == len(ROWS) == len(fresh) and summary.num_examples == 12
    assert same_pairs(fresh, load_pairs([pairs_file], qwen_template)[0])  # = tokenised without a cache
    monkeypatch.setattr(qwen_template, "encode_batch", no_tokenising)
    cached, again = load_pairs([pairs_file], qwen_template, cache_dir=cache, first_index=10)
    assert again.from_cache and again.cache_path == summary.cache_path and same_pairs(fresh, cached)
    assert [p.index for p in cached] == list(range(10, 16))
    assert [p.name for p in cache.iterdir()] == [again.cache_path.rsplit("/", 1)[1]]  # no temporary leftovers


def test_changed_data_or_options_tokenise_again(pairs_file, tmp_path, qwen_template):
    cache = tmp_path / "cache"
    _, first = load_pairs([pairs_file], qwen_template, cache_dir=cache)
    no_reasoning, other = load_pairs([pairs_file], qwen_template, cache_dir=cache, train_on_reasoning=False)
    assert not other.from_cache and other.cache_path != first.cache_path
    with open(pairs_file, "a", encoding="utf-8") as f:
        f.write(json.dumps({**ROWS[0], "rejected": "không biết"}, ensure_ascii=False) + "\n")
    pairs, changed = load_pairs([pairs_file], qwen_template, cache_dir=cache)
    assert not changed.from_cache and changed.cache_path not in (first.cache_path, other.cache_path)
    assert len(pairs) == len(ROWS) + 1
    # the same file read as SFT data gets its own entry (the preference options name the row kind)
    _, sft = load_examples(pairs_file, qwen_template, TokenizeSettings(on_error="skip"), cache_dir=cache,
                           progress=False)
    assert sft.cache_path != changed.cache_path and load_pairs([pairs_file], qwen_template, cache_dir=cache)[1].from_cache


@pytest.mark.parametrize("damage", ["truncated", "odd"])
def test_a_damaged_entry_is_rebuilt(pairs_file, tmp_path, qwen_template, caplog, damage):
    cache = tmp_path / "cache"
    _, summary = load_pairs([pairs_file], qwen_template, cache_dir=cache)
    fresh, _ = load_pairs([pairs_file], qwen_template)  # not memory-mapped from the entry damaged below
    entry = tmp_path / "cache" / summary.cache_path.rsplit("/", 1)[1]
    if damage == "truncated":  # a copy cut short
        (entry / "labels.npy").write_bytes((entry / "labels.npy").read_bytes()[:100])
    else:  # consistent arrays, but not whole pairs for the rows it claims
        meta = json.loads((entry / "summary.json").read_text())
        (entry / "summary.json").write_text(json.dumps({**meta, "num_rows": meta["num_rows"] + 1}))
    with caplog.at_level(logging.WARNING):
        rebuilt, again = load_pairs([pairs_file], qwen_template, cache_dir=cache)
    assert "damaged tokenised-data cache" in caplog.text and not again.from_cache
    assert same_pairs(fresh, rebuilt)


def test_auto_thinking_is_decided_per_pair_for_both_sides(tmp_path, qwen_template):
    plain = {"messages": [{"role": "user", "content": "2 + 2 = ?"}], "chosen": "4", "rejected": "5"}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(ROWS[1], ensure_ascii=False) + "\n" + json.dumps(plain) + "\n", encoding="utf-8")
    # empty_think=train: a plain pair's empty think block is supervised with thinking on only, so the modes differ
    auto, on, off = (load_pairs([path], qwen_template, enable_thinking=mode, empty_think="train")[0]
                     for mode in ("auto", True, False))
    assert same_pairs(auto[:1], on[:1]) and same_pairs(auto[1:], off[1:]) and not same_pairs(auto[1:], on[1:])
    assert np.array_equal(auto[1].chosen.input_ids[:-4], auto[1].rejected.input_ids[:-4])  # one prompt rendering
