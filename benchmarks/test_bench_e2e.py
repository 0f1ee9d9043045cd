"""End-to-end fine-tuning benchmark (qforge vs HF transformers) under pytest-benchmark; see e2e.py.

    python -m pytest benchmarks/test_bench_e2e.py --benchmark-enable            # the quick run (a few minutes)
    python -m pytest benchmarks/test_bench_e2e.py --benchmark-enable -m large   # the full run and its CPU targets

The figures (tokens/s, peak memory, MFU per system, qforge's ratios) go to the benchmark's extra_info; the
tests assert what must hold on any machine: every baseline trained the same thing (loss curves agree) and
the padding-free baseline really kept packed sequences apart.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

E2E = Path(__file__).with_name("e2e.py")


def run_e2e(out: Path, quick: bool) -> dict:
    command = [sys.executable, str(E2E), "--out", str(out)] + (["--quick"] if quick else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads((out / "e2e.json").read_text())


def check_same_training(summary: dict) -> None:
    for name, check in summary["loss_agreement"].items():
        assert check["agree"], f"{name}'s loss curve differs from qforge's: {check}"
    padding_free = summary["systems"].get("hf_padding_free")
    if padding_free:
        isolation = padding_free["runs"][0]["packed_attention_check"]
        assert isolation["sdpa_use_cache_false"] < 1e-4, isolation


def record(benchmark, summary: dict) -> None:
    benchmark.extra_info["ratios"] = summary["ratios"]
    benchmark.extra_info["systems"] = {name: {k: s[k] for k in ("tokens_per_s", "peak_mem_bytes", "mfu")}
                                       for name, s in summary["systems"].items()}


def test_e2e_quick(benchmark, tmp_path):
    summary = benchmark.pedantic(run_e2e, args=(tmp_path, True), rounds=1, iterations=1)
    record(benchmark, summary)
    check_same_training(summary)
    assert (tmp_path / "e2e.png").stat().st_size > 0


@pytest.mark.large
def test_e2e_full_meets_the_cpu_targets(benchmark, tmp_path):
    summary = benchmark.pedantic(run_e2e, args=(tmp_path, False), rounds=1, iterations=1)
    record(benchmark, summary)
    check_same_training(summary)
    missed = {key: target for key, target in summary["targets"].items() if not target["met"]}
    assert not missed, missed


def test_e2e_moe_tiny_trains_the_same_in_every_system(tmp_path, capsys):
    """benchmarks/e2e_moe.py at a tiny shape: every system (qforge's train_step; HF Qwen3MoeForCausalLM padded and
    padding-free, eager and grouped_mm experts) trains the same steps from the same weights, so the per-round
    losses agree, and the summary carries each system's tokens/s and qforge's ratio to it."""
    sys.path.insert(0, str(E2E.parent))
    import e2e_moe

    out = tmp_path / "moe.json"
    code = e2e_moe.main(["--layers", "1", "--hidden", "64", "--experts", "4", "--top-k", "2", "--width", "32",
                         "--vocab", "256", "--step-tokens", "1024", "--pack-tokens", "2048", "--rounds", "1",
                         "--out", str(out)])
    summary = json.loads(out.read_text())
    assert code == 0 and summary["losses_agree"] and summary["max_abs_loss_diff"] < 1e-4
    hf = {f"hf_{layout}_{experts}" for layout in ("padded", "padding_free") for experts in ("eager", "grouped_mm")}
    assert set(summary["speedup_vs"]) == hf and set(summary["tokens_per_s"]) == hf | {"qforge"}
    assert all(len(r["loss"]) == 5 for r in summary["rounds"]) and len(summary["rounds"]) == 2
