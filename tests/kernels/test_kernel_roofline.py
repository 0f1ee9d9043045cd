"""The byte/FLOP account (tools/kernel_roofline.py): its FLOPs agree with torch's FLOP counter running the loss's
own schedule at the real shape (fake tensors), and the issue's roofline targets hold for the schedule."""
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from qforge.tools import kernel_roofline as account
from qforge.tools.aot_check import QWEN3_SHAPES

FLCE = importlib.import_module("qforge.kernels.fused_linear_cross_entropy")
T, H, V = 16_384, 4_096, 151_936


def test_loss_flops_match_the_flop_counter_on_the_real_schedule():
    """The CUDA bf16 schedule (fp32 logits chunks, bf16 gradient groups) on fake CPU tensors."""
    with FakeTensorMode():
        hidden = torch.empty(T, H, dtype=torch.bfloat16, device="cpu")
        weight = torch.empty(V, H, dtype=torch.bfloat16, device="cpu")
        targets = torch.zeros(T, dtype=torch.long, device="cpu")
        scale = torch.ones(T, device="cpu")
        plan = FLCE.chunk_plan(T, V, torch.bfloat16, cuda_layout=True)
        assert (plan.logit_rows, plan.grad_rows) == (FLCE.GPU_LOGIT_ROWS, FLCE.GPU_GRAD_ROWS)
        with FlopCounterMode(display=False) as counter:
            FLCE._chunked_loss_and_grads(hidden, weight, targets, scale, 0.0, None, plan, FLCE._rows_torch, True, True)
    matmuls = [c for c in account.loss_costs(T, H, V) if c.flops >= 2 * H * V]
    assert counter.get_total_flops() == sum(c.count * c.flops for c in matmuls) == 6 * T * H * V


@pytest.mark.parametrize("teacher", ["top_k", "full"])
def test_kl_flops_match_the_flop_counter_on_the_real_schedule(teacher):
    """fused_linear_kl's CUDA bf16 schedule at the 8B shape (fake tensors): the account's matmuls are the ones it
    runs (top-k: the CE kernel's 6·T·H·V; full teacher: + 2·T·H'·V for the teacher's logits)."""
    FLKL = importlib.import_module("qforge.kernels.fused_linear_kl")
    teacher_hidden = 5120
    with FakeTensorMode():
        hidden = torch.empty(T, H, dtype=torch.bfloat16, device="cpu")
        weight = torch.empty(V, H, dtype=torch.bfloat16, device="cpu")
        scale = torch.ones(T, device="cpu")
        if teacher == "top_k":
            spec = ("sparse", torch.zeros(T, 21, dtype=torch.long, device="cpu"), torch.zeros(T, 21, device="cpu"))
            rows_fn = FLKL._sparse_rows_torch
        else:
            spec = ("dense", torch.empty(T, teacher_hidden, dtype=torch.bfloat16, device="cpu"),
                    torch.empty(V, teacher_hidden, dtype=torch.bfloat16, device="cpu"), True)
            rows_fn = FLKL._dense_rows_torch
        plan = FLCE.chunk_plan(T, V, torch.bfloat16, cuda_layout=True)
        with FlopCounterMode(display=False) as counter:
            FLKL._chunked_kl_and_grads(hidden, weight, scale, spec, plan, rows_fn, True, True)
    costs = account.kl_loss_costs(T, H, V, teacher_hidden=None if teacher == "top_k" else teacher_hidden)
    matmuls = [c for c in costs if c.flops >= 2 * H * V]
    expected = 6 * T * H * V + (0 if teacher == "top_k" else 2 * T * teacher_hidden * V)
    assert counter.get_total_flops() == sum(c.count * c.flops for c in matmuls) == expected


def test_loss_meets_the_issue_targets_at_8b():
    ours = sum(c.seconds for c in account.loss_costs(T, H, V))
    liger = sum(c.seconds for c in account.liger_loss_costs(T, H, V))
    ideal = 6 * T * H * V / account.PEAK_FLOPS
    assert ideal < ours <= 0.080 and ours <= 1.12 * liger
    assert account.loss_memory(T, H, V)["peak_beyond_returned_grads"] <= 3e9


@pytest.mark.parametrize("shape", QWEN3_SHAPES, ids=lambda s: s.name)
def test_elementwise_kernels_move_at_most_15_percent_more_than_the_minimum(shape):
    for cost in account.model_costs(shape):
        assert cost.bytes_efficiency >= 0.85, (cost.name, cost.bytes_efficiency)


def test_cli_prints_the_account(capsys):
    assert account.main(["--model", "0.6B", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "rms_norm bwd q_norm" in out and "Liger's schedule" in out and "not measurements" in out
    assert "kl: top-k row pass" in out and "fused KL (fwd+bwd): top-k teacher" in out


def test_moe_grouped_gemm_account_at_30b_a3b(capsys):
    """Gate, up and down are three [H, I] products per routed row, each run forward, as input gradient and as
    weight gradient: 18·M·H·I FLOPs over M = T·top_k rows, plus the SwiGLU's 5 + 12 per activation."""
    shape = next(s for s in account.MOE_SHAPES if s.name == "30B-A3B")
    assert (shape.hidden, shape.experts, shape.width, shape.top_k) == (2048, 128, 768, 8)
    M = shape.tokens * shape.top_k
    gemms = [c for c in account.moe_costs(shape) if "grouped gemm" in c.name]
    assert len(gemms) == 6
    assert sum(c.flops for c in gemms) == 18 * M * shape.hidden * shape.width + 17 * M * shape.width
    # gate/up (2I wide) is compute-bound on H100; down's dgrad with the SwiGLU backward's [M, 2I] reads is not
    bound = {c.name: c.flops / c.min_bytes > account.PEAK_FLOPS / account.PEAK_BYTES for c in gemms}
    assert bound["moe grouped gemm gate/up fwd + SwiGLU"] and not bound["moe grouped gemm down dgrad + SwiGLU bwd"]
    assert account.main(["--moe", "30B-A3B"]) == 0
    assert "moe grouped gemm gate/up fwd + SwiGLU" in capsys.readouterr().out


@pytest.mark.parametrize("name, sizes", [("30B-A3B", (2048, 128, 768, 8)), ("235B-A22B", (4096, 128, 1536, 8))])
def test_default_account_reports_each_moe_models_grouped_gemm_roofline(capsys, name, sizes):
    """The plain account (no --moe) ends with one grouped-GEMM line per Qwen3-MoE model: its TFLOP are the
    18·M·H·I + 17·M·I of the six GEMMs, and no roofline time is below FLOPs / peak."""
    shape = account.moe_shape(name, 16_384)
    H, E, I, k = sizes
    assert (shape.hidden, shape.experts, shape.width, shape.top_k) == sizes
    M = 16_384 * k
    flops = 18 * M * H * I + 17 * M * I
    assert account.main(["--model", "0.6B", "--tokens", "16384"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith(f"Qwen3-{name} grouped GEMMs"))
    assert f"{flops / 1e12:.2f} TFLOP" in line
    roofline_ms = float(line.split("roofline ")[1].split(" ms")[0])
    assert roofline_ms + 0.005 >= 1e3 * flops / account.PEAK_FLOPS  # printed to 0.01 ms
