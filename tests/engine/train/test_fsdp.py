"""FSDP2 under torchrun (gloo, 2 CPU processes) trains like one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import REPO, tiny_overrides, tiny_run_files  # noqa: F401 (fixture)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_two_rank_fsdp2_matches_single_process(tiny_run_files, tmp_path):
    common = {"train.max_steps": 3, "evaluate.data": "null", "data.eval": "[]", "data.max_tokens": 160}
    config = ["--config", str(REPO / "recipes/configs/demo.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(REPO / "recipes/fft.py"), *config,
                    *tiny_overrides(tiny_run_files, single, **common, **{"train.grad_accum": 8})],
                   check=True, capture_output=True, env=env, timeout=600)
    sharded = tmp_path / "fsdp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "recipes/fft.py"), *config,
                           *tiny_overrides(tiny_run_files, sharded, **common, **{"train.grad_accum": 4})],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = _losses(single), _losses(sharded)
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        assert abs(a - b) <= 1e-5 * abs(b), (got, expected)
    # 8 micro-batches a step: 1 process × 8 vs 2 ranks × 4 give the same parameters (fp32)
    single_weights = load_file(single / "final" / "model.safetensors")
    sharded_weights = load_file(sharded / "final" / "model.safetensors")
    assert single_weights.keys() == sharded_weights.keys()
    for key in single_weights:
        torch.testing.assert_close(sharded_weights[key], single_weights[key], atol=1e-6, rtol=0, msg=key)
