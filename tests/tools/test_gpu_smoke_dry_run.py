"""benchmarks/gpu_smoke.py --cpu: the stages that can run without a GPU pass through the same script the GPU run
uses, and its verdict can fail."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]  # (not under tests/kernels: the smoke runs that directory)
SMOKE = REPO / "benchmarks/gpu_smoke.py"


def smoke(out, *argv):
    proc = subprocess.run([sys.executable, str(SMOKE), "--cpu", "--out", str(out), *argv], capture_output=True,
                          text=True, timeout=3600)
    return proc, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_cpu_dry_run_passes_kernel_tests_train_resume_export_dpo_and_distillation(tmp_path):
    """~10 minutes on a loaded 2-core machine; the kernel tests narrowed to the two small kernels (the whole
    directory is what the GPU run takes)."""
    proc, report = smoke(tmp_path, "--kernel-tests", "test_swiglu or test_rope")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("GPU SMOKE (CPU dry run): PASS")
    stages = report["stages"]
    assert {name: stages[name]["status"] for name in stages} == {
        "kernel_tests": "passed", "train": "passed", "dpo": "passed", "distill": "passed", "fsdp_nccl": "skipped",
        "throughput": "reported", "liger": "skipped"}
    assert stages["kernel_tests"]["passed"] > 0 and "failed" not in stages["kernel_tests"]
    train = stages["train"]
    assert train["resume_bitwise"] and train["resumed_losses"] == train["losses"][2:]
    assert train["export_logits_relative_error"] < 1e-4
    assert abs(stages["dpo"]["loss"] - 0.6931471805599453) < 1e-3 and stages["distill"]["loss"] > 0
    throughput = stages["throughput"]
    assert throughput["tokens_per_s"] > 0 and 0 < throughput["twin_mfu_bound"] <= 1


def test_a_failing_stage_makes_the_verdict_fail(tmp_path):
    """A kernel test selection that runs nothing is a failure, not a pass (pytest exits 5)."""
    proc, report = smoke(tmp_path, "--stages", "kernel_tests", "--kernel-tests", "no_such_test")
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1].startswith("GPU SMOKE (CPU dry run): FAIL — failed: kernel_tests")
    assert report["verdict"] == "FAIL" and report["stages"]["kernel_tests"]["status"] == "failed"
