"""An absurd row (a 31 MB JSONL line) is a bad row named by its line, found without reading it whole: memory stays
bounded by data.max_row_bytes (twice it at most) however long the line is."""
import json
import tracemalloc

import pytest

from data_fixtures import qwen_template  # noqa: F401 (pytest fixtures)
from qforge.engine.data import DataError, TokenizeSettings, load_examples, read_conversations
from qforge.engine.data.formats import MAX_ROW_BYTES

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
LINE_BYTES = 31 * 10**6


@pytest.fixture(scope="module")
def huge_file(tmp_path_factory):
    """good row, a 31 MB row (a reply of space-separated digits), good row."""
    path = tmp_path_factory.mktemp("huge") / "data.jsonl"
    digits = " ".join("1234567" for _ in range(LINE_BYTES // 8))
    huge = {"messages": [{"role": "user", "content": "count"}, {"role": "assistant", "content": digits}]}
    with open(path, "w") as f:
        f.write(json.dumps(GOOD) + "\n" + json.dumps(huge) + "\n" + json.dumps(GOOD) + "\n")
    return path


def _peak(read) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = read()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("limit", [MAX_ROW_BYTES, 1 << 20])
def test_a_row_beyond_the_byte_limit_is_a_bad_row_read_in_bounded_memory(huge_file, limit):
    rows, peak = _peak(lambda: list(read_conversations(huge_file, max_row_bytes=limit)))
    assert [line for line, _ in rows] == [1, 2, 3]
    assert isinstance(rows[0][1], list) and isinstance(rows[2][1], list)
    error = rows[1][1]
    assert error.field == "row" and error.reason.startswith(f"{huge_file.stat().st_size - 2 * (len(json.dumps(GOOD)) + 1):,} bytes, more than data.max_row_bytes={limit:,}")
    assert peak < 2 * limit + (4 << 20), f"peak {peak:,} bytes while reading a {LINE_BYTES:,}-byte line"


def test_the_limit_is_a_setting_and_the_row_is_named_by_line(huge_file, qwen_template):
    with pytest.raises(DataError, match=r"data.jsonl:2: row: [\d,]+ bytes, more than data.max_row_bytes=8,388,608; "
                                        r"split or shorten the row, or raise data.max_row_bytes"):
        load_examples(huge_file, qwen_template, progress=False)
    settings = TokenizeSettings(on_error="skip", max_row_bytes=1 << 20)
    (examples, summary), peak = _peak(lambda: load_examples(huge_file, qwen_template, settings, progress=False))
    assert summary.num_rows == 2 and [(s.line, s.field) for s in summary.skipped] == [(2, "row")]
    assert peak < 16 << 20
