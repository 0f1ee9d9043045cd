"""The benchmark's measuring script on a small case: it runs, and its RSS-based peak sees what it should."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

LOSS_CASE = Path(__file__).parents[2] / "benchmarks" / "loss_case.py"
TOKENS, HIDDEN, VOCAB = 2048, 64, 16384  # 128 MiB of fp32 logits


def measure(impl, *extra):
    command = [sys.executable, str(LOSS_CASE), "--impl", impl, "--tokens", str(TOKENS), "--hidden", str(HIDDEN),
               "--vocab", str(VOCAB), "--repeats", "1", *extra]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


@pytest.mark.slow
def test_measured_peaks_separate_naive_from_chunked_loss():
    naive = measure("naive")
    qforge = measure("qforge", "--chunk-bytes", str(4 * 2**20))
    logits = TOKENS * VOCAB * 4
    assert naive["logits_bytes"] == qforge["logits_bytes"] == logits
    assert naive["peak_extra_bytes"] >= logits  # it holds the logits and their gradient
    assert qforge["peak_extra_bytes"] <= logits / 4
    assert qforge["seconds_median"] > 0 and naive["seconds_median"] > 0
