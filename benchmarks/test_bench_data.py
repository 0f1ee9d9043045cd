"""Throughput of the data pipeline: tokenise (render + label + weight) and pack a generated 10k-conversation file.

Run: python -m pytest benchmarks/test_bench_data.py --benchmark-only
"""
import importlib.util
import json
import random
import time
from pathlib import Path

import pytest

from qforge.engine.data import ChatTemplate, load_examples, pack


def load_tests_conftest():
    """tests/conftest.py loaded under its own name (`conftest` here is benchmarks/conftest.py)."""
    spec = importlib.util.spec_from_file_location("qforge_tests_conftest",
                                                  Path(__file__).resolve().parents[1] / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NUM_CONVERSATIONS = 10_000
WORDS = "the model learns to reason about numbers code proofs 数学 and answers briefly".split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(0, 0.8) * (low + high) / 4) % high + low))


def conversation(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": sentence(rng, 5, 40)}] if rng.random() < 0.3 else []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        messages.append({"role": "user", "content": sentence(rng, 5, 150)})
        messages.append({"role": "assistant", "content": sentence(rng, 10, 400),
                         "reasoning_content": sentence(rng, 10, 800) if rng.random() < 0.6 else None})
    return {"messages": messages}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("bench") / "train.jsonl"
    path.write_text("".join(json.dumps(conversation(rng), ensure_ascii=False) + "\n" for _ in range(NUM_CONVERSATIONS)))
    return path


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate.from_pretrained(load_tests_conftest().qwen3_tokenizer_dir())


def timed(function):
    """Wall time of one call, also when pytest-benchmark is disabled (the project's pytest.ini disables it)."""
    def run():
        start = time.perf_counter()
        return function(), time.perf_counter() - start
    return run


def test_tokenise_and_pack_throughput(benchmark, data_file, template, tmp_path):
    @timed
    def tokenise_and_pack():
        examples, summary = load_examples(data_file, template, cache_dir=tmp_path / f"cache-{time.time_ns()}",
                                          progress=False)
        batches = pack(examples, max_tokens=16384)
        return summary, [batch.num_tokens for batch in batches], batches.report

    (summary, _, report), seconds = benchmark.pedantic(tokenise_and_pack, rounds=1, iterations=1)
    rows_per_s, tokens_per_s = summary.num_rows / seconds, summary.num_tokens / seconds
    benchmark.extra_info.update(rows_per_s=round(rows_per_s), tokens_per_s=round(tokens_per_s),
                                packing_efficiency=round(report.efficiency, 4))
    print(f"\n{summary}\n{report}\ntokenise+pack: {rows_per_s:,.0f} rows/s, {tokens_per_s:,.0f} tokens/s")
    assert summary.num_rows == NUM_CONVERSATIONS and report.efficiency >= 0.97


def test_cached_reload_and_pack_throughput(benchmark, data_file, template, tmp_path):
    load_examples(data_file, template, cache_dir=tmp_path, progress=False)

    @timed
    def reload_and_pack():
        examples, summary = load_examples(data_file, template, cache_dir=tmp_path, progress=False)
        return summary, [batch.num_tokens for batch in pack(examples, max_tokens=16384)]

    (summary, _), seconds = benchmark.pedantic(reload_and_pack, rounds=1, iterations=1)
    benchmark.extra_info.update(rows_per_s=round(summary.num_rows / seconds))
    print(f"\ncached reload+pack: {summary.num_rows / seconds:,.0f} rows/s")
    assert summary.from_cache
