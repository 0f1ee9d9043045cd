"""The memory estimator against measured peaks: small Qwen3s trained for a few steps on CPU, each in its own
process (RSS high-water mark), with and without activation checkpointing and vocabulary pruning."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qforge.engine.config import Qwen3Config
from qforge.tools.estimate import MODELS, Plan, estimate_memory, main, parameter_counts, resolve_config

MEASURE = Path(__file__).resolve().parents[2] / "benchmarks" / "measure_train_memory.py"
SMALL = dict(vocab_size=16_000, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, tie_word_embeddings=True)
CASES = {
    "baseline": dict(model=SMALL, tokens=1024, sequences=2),
    "activation_checkpointing": dict(model=SMALL, tokens=1024, sequences=2, activation_checkpointing=True),
    "untied_kept_vocab": dict(model=SMALL | {"tie_word_embeddings": False}, tokens=1024, sequences=4, kept_vocab=4000),
}
# glibc's dynamic mmap threshold would otherwise move multi-MB tensors onto the heap once one is freed, and the
# RSS mark would grow with every step from fragmentation: a fixed threshold makes RSS follow live tensors.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}


TINY = dict(model=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True),
            tokens=32, sequences=2)


def measured_training_bytes(case: dict) -> int:
    spec = {"grad_accum": 2} | case
    done = subprocess.run([sys.executable, str(MEASURE), json.dumps(spec)], capture_output=True, text=True,
                          timeout=300, env=os.environ | ALLOCATOR)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["training_bytes"]


@pytest.fixture(scope="module")
def fixed_overhead() -> int:
    """What a first training step costs beyond its tensors (BLAS/OpenMP buffers, autograd engine), measured
    with a model too small to matter."""
    return measured_training_bytes(TINY)


@pytest.mark.parametrize("name", CASES)
def test_memory_estimate_matches_measured_cpu_peak(name, fixed_overhead):
    case = CASES[name]
    plan = Plan(tokens=case["tokens"], device="cpu", precision="fp32", seq_len=case["tokens"] // case["sequences"],
                activation_checkpointing=case.get("activation_checkpointing", False),
                kept_vocab=case.get("kept_vocab"), grad_accum=2)
    estimate = estimate_memory(Qwen3Config(**case["model"], torch_dtype="float32"), plan)["training"]
    measured = measured_training_bytes(case) - fixed_overhead
    assert abs(estimate - measured) <= 0.12 * measured, (name, estimate / 2**20, measured / 2**20)


def test_builtin_models_have_their_published_sizes():
    billions = {name: parameter_counts(resolve_config(name))["total"] / 1e9 for name in MODELS}
    expected = {"qwen3-0.6b": 0.60, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02, "qwen3-8b": 8.19, "qwen3-14b": 14.77,
                "qwen3-32b": 32.76}
    assert billions == pytest.approx(expected, abs=0.01)


def test_sharding_and_checkpointing_lower_the_estimate():
    config = resolve_config("qwen3-8b")
    single = estimate_memory(config, Plan(tokens=8192, gpus=1))
    sharded = estimate_memory(config, Plan(tokens=8192, gpus=8))
    checkpointed = estimate_memory(config, Plan(tokens=8192, gpus=8, activation_checkpointing=True))
    assert sharded["adamw_moments"] == pytest.approx(single["adamw_moments"] / 8)
    assert checkpointed["activations"] < sharded["activations"] / 5
    assert checkpointed["peak"] < sharded["peak"] < single["peak"]


def test_cli_reads_a_config_json_and_reports(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(SMALL | {"model_type": "qwen3"}))
    assert main(["--model", str(tmp_path), "--tokens", "1024", "--gpu", "h100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["precision"] == "bf16-mixed" and report["memory_bytes"]["peak"] > 0
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "missing"), "--tokens", "1024", "--gpu", "h100"])


def test_bf16_optimizer_states_halve_the_moments_only():
    """optim.state_dtype: bf16 — 2 × 2 B per parameter instead of 2 × 4 B; weights and gradients stay fp32.
    (The twin's measured figures at tiny shapes: test_twin.py::test_estimate_agrees_with_the_twin.)"""
    config = resolve_config("qwen3-32b")
    fp32 = estimate_memory(config, Plan(tokens=16384, gpus=8, activation_checkpointing=True))
    bf16 = estimate_memory(config, Plan(tokens=16384, gpus=8, activation_checkpointing=True, optim_state_dtype="bf16"))
    params = parameter_counts(config)["total"]
    assert (fp32["adamw_moments"], bf16["adamw_moments"]) == (8 * params / 8, 4 * params / 8)
    assert bf16["weights"] == fp32["weights"] and bf16["gradients"] == fp32["gradients"]
    assert fp32["peak"] - bf16["peak"] == pytest.approx(4 * params / 8)
    with pytest.raises(ValueError, match="optim_state_dtype"):
        Plan(tokens=16, optim_state_dtype="fp16")
