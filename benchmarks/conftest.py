"""Benchmarks are not part of the test suite: run them with `python -m pytest benchmarks --benchmark-enable`.
Cases marked `large` (tens of GB, minutes each) run only when asked for with `-m large`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

LOSS_CASE = Path(__file__).with_name("loss_case.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: needs tens of GB of RAM or several minutes; -m large to run")


def pytest_collection_modifyitems(config, items):
    if "large" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="large case: select it with -m large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


def run_loss_case(impl: str, tokens: int, hidden: int, vocab: int, *, device: str = "cpu", dtype: str = "float32",
                  repeats: int = 1, chunk_bytes: int | None = None) -> dict:
    """One case of loss_case.py in a fresh process; its JSON line as a dict."""
    command = [sys.executable, str(LOSS_CASE), "--impl", impl, "--tokens", str(tokens), "--hidden", str(hidden),
               "--vocab", str(vocab), "--device", device, "--dtype", dtype, "--repeats", str(repeats)]
    command += [] if chunk_bytes is None else ["--chunk-bytes", str(chunk_bytes)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])
