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
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_measured_peaks_separate_naive_from_chunked_loss():
    naive = measure("naive")
    qforge = measure("qforge", "--chunk-bytes", str(16 * 2**20))  # 8 chunks
    logits = TOKENS * VOCAB * 4
    assert naive["logits_bytes"] == qforge["logits_bytes"] == logits
    # naive holds the logits, their log-softmax and gradient (~3× logits when measured on a quiet machine);
    # the bounds leave room for the kernel dropping clean library pages from RSS under memory pressure
    assert naive["peak_extra_bytes"] >= logits / 2
    assert qforge["peak_extra_bytes"] <= logits / 2  # one 16 MiB chunk plus allocator and thread-pool slack
    assert naive["peak_extra_bytes"] >= 2 * qforge["peak_extra_bytes"]
    assert qforge["seconds_median"] > 0 and naive["seconds_median"] > 0
