"""load_examples: tokenise once, reuse from the memory-mapped cache, re-tokenise when anything changes."""
import json
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import qwen_template  # noqa: F401 (pytest fixtures)
from qforge.engine.data import IGNORE_INDEX, TokenizeSettings, load_examples
from qforge.engine.train.config import DataSettings

ROWS = [
    {"messages": [{"role": "user", "content": f"question {i}"},
                  {"role": "assistant", "content": f"answer {i}", "reasoning_content": f"thinking {i}"}]}
    for i in range(20)
] + [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r1</think>b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>r2</think>d"}]}]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def same_examples(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.labels, y.labels) for x, y in zip(a, b))


def test_a_first_load_serves_what_it_wrote_without_reading_it_back(data_file, tmp_path, qwen_template, monkeypatch):
    """The examples of a cache miss are read-only views of the memory-mapped arrays just written: pageable by the
    OS like a cached load's, and the entry is not read back."""
    import qforge.engine.data.cache as cache_module

    def no_reading(*args, **kwargs):
        raise AssertionError("the entry just written was read back")

    monkeypatch.setattr(cache_module, "_read_cache", no_reading)
    fresh, summary = load_examples(data_file, qwen_template, cache_dir=tmp_path / "cache", progress=False)
    assert not summary.from_cache and summary.num_examples == len(ROWS)
    assert all(isinstance(e.input_ids.base, np.memmap) and not e.labels.flags.writeable for e in fresh)
    monkeypatch.undo()
    cached, again = load_examples(data_file, qwen_template, cache_dir=tmp_path / "cache", progress=False)
    assert again.from_cache and same_examples(fresh, cached) and again.kinds == summary.kinds


def test_second_load_comes_from_the_cache_without_tokenising(data_file, tmp_path, qwen_template, monkeypatch):
    cache = tmp_path / "cache"
    fresh, summary = load_examples(data_file, qwen_template, cache_dir=cache, progress=False)
    assert not summary.from_cache and summary.num_examples == len(ROWS)
    assert same_examples(fresh, load_examples(data_file, qwen_template, progress=False)[0])

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again although the cache is valid")

    monkeypatch.setattr(qwen_template, "encode_batch", no_tokenising)
    cached, again = load_examples(data_file, qwen_template, cache_dir=cache, progress=False)
    assert again.from_cache and again.cache_path == summary.cache_path
    assert same_examples(fresh, cached)
    assert isinstance(cached[0].input_ids.base, np.memmap) or isinstance(cached[0].input_ids, np.memmap)
    assert [p.name for p in cache.iterdir()] == [again.cache_path.rsplit("/", 1)[1]]  # no temporary leftovers


def test_cache_key_changes_with_data_and_options(data_file, tmp_path, qwen_template):
    cache = tmp_path / "cache"
    _, first = load_examples(data_file, qwen_template, cache_dir=cache, progress=False)
    _, no_think = load_examples(data_file, qwen_template, TokenizeSettings(enable_thinking=False), cache_dir=cache,
                                progress=False)
    # loss weights are computed when packing: the training settings' loss_weighting does not re-tokenise
    reweighted = DataSettings(train=[str(data_file)], loss_weighting="sqrt")
    _, weighted = load_examples(data_file, qwen_template, reweighted, cache_dir=cache, progress=False)
    assert weighted.from_cache and weighted.cache_path == first.cache_path
    with open(data_file, "a") as f:
        f.write(json.dumps(ROWS[0]) + "\n")
    _, changed = load_examples(data_file, qwen_template, cache_dir=cache, progress=False)
    assert not no_think.from_cache and not changed.from_cache
    assert len({first.cache_path, no_think.cache_path, changed.cache_path}) == 3
    assert changed.num_examples == len(ROWS) + 1


@pytest.mark.parametrize("damage", ["truncate", "empty", "offsets", "summary"])
def test_a_damaged_cache_is_rebuilt(data_file, tmp_path, qwen_template, damage, caplog):
    cache = tmp_path / "cache"
    directory = Path(load_examples(data_file, qwen_template, cache_dir=cache, progress=False)[1].cache_path)
    reference = load_examples(data_file, qwen_template, progress=False)[0]  # not memory-mapped from the cache
    ids = directory / "input_ids.npy"
    if damage == "truncate":  # a copy or write cut short: mmap would fail (or worse, read garbage)
        ids.write_bytes(ids.read_bytes()[:-40])
    elif damage == "empty":
        ids.write_bytes(b"")
    elif damage == "offsets":  # arrays intact but not covering each other
        np.save(directory / "offsets.npy", np.load(directory / "offsets.npy")[:-1])
        np.save(ids, np.load(ids)[:-3])
    else:
        (directory / "summary.json").write_text('{"num_rows": 2')
    with caplog.at_level("WARNING", logger="qforge.data"):
        rebuilt, again = load_examples(data_file, qwen_template, cache_dir=cache, progress=False)
    assert "damaged tokenised-data cache" in caplog.text and "rebuilding it" in caplog.text
    assert not again.from_cache and same_examples(reference, rebuilt)
    assert load_examples(data_file, qwen_template, cache_dir=cache, progress=False)[1].from_cache


def test_multi_turn_split_trains_each_turn_with_its_own_reasoning(data_file, qwen_template):
    examples, summary = load_examples(data_file, qwen_template, TokenizeSettings(multi_turn="split"), progress=False)
    assert summary.num_rows == len(ROWS) and summary.num_examples == len(ROWS) + 1
    decode = lambda e: qwen_template.tokenizer.decode(  # noqa: E731
        e.input_ids[e.labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)
    assert [decode(e) for e in examples[-2:]] == ["<think>\nr1\n</think>\n\nb<|im_end|>",
                                                  "<think>\nr2\n</think>\n\nd<|im_end|>"]
    last, _ = load_examples(data_file, qwen_template, TokenizeSettings(multi_turn="last"), progress=False)
    assert decode(last[-1]) == decode(examples[-1]) and len(last) == len(ROWS)
    with pytest.raises(ValueError, match="multi_turn"):
        TokenizeSettings(multi_turn="every")


def test_tokenising_shows_a_bar_with_the_row_count(data_file, tmp_path, qwen_template, capsys):
    """The bar knows how many rows a JSONL file holds (blank lines aside), so it shows an ETA."""
    data_file.write_text(data_file.read_text() + "\n\n")
    load_examples(data_file, qwen_template, progress=True)
    err = capsys.readouterr().err
    assert "tokenising: 100%|" in err and f"| {len(ROWS)}/{len(ROWS)} [" in err, err
    load_examples(data_file, qwen_template, progress=False)
    assert "tokenising" not in capsys.readouterr().err


def test_a_bad_row_names_the_override_that_skips_it(data_file, qwen_template):
    from qforge.engine.data.formats import DataError

    data_file.write_text(data_file.read_text() + '{"messages": []}\n')
    with pytest.raises(DataError, match=rf":{len(ROWS) + 1}: .*\(data\.on_error=skip skips and counts bad rows\)$"):
        load_examples(data_file, qwen_template, progress=False)
