"""Byte and FLOP account of every qforge kernel at a Qwen3 shape, read against the H100 roofline.

For each kernel launch (or, for the fused loss, each matmul and row pass of its schedule) the account gives
FLOPs, the minimum bytes any implementation must move (read each input once, write each output once), the
bytes qforge's schedule moves, and the roofline time max(FLOPs / peak, bytes / bandwidth). These are bounds
computed from the code's schedule, not GPU measurements: "bytes efficiency" = minimum / moved is the share of
the HBM roofline the kernel can reach if it streams at full bandwidth; whether it does needs a GPU
(benchmarks/gpu_smoke.sh). The fused loss is also compared with an ideal fused kernel (its FLOPs alone) and
with Liger-Kernel's schedule (bf16 logits, bf16 grad_weight accumulator, rows = T / ⌈V / H⌉).

    python -m qforge.tools.kernel_roofline --model 8B --tokens 16384
"""
import argparse
import math
from dataclasses import dataclass

from qforge.kernels.dispatch import ModelShape
from qforge.kernels.fused_linear_cross_entropy import GPU_GRAD_ROWS, GPU_LOGIT_ROWS
from qforge.kernels.moe_grouped_gemm import MoeShape
from qforge.tools.aot_check import MOE_SHAPES, QWEN3_SHAPES

PEAK_FLOPS = 989e12   # H100 SXM dense bf16
PEAK_BYTES = 3.35e12  # H100 SXM HBM3
BF16, FP32 = 2, 4


@dataclass
class Cost:
    name: str
    flops: float
    min_bytes: float
    bytes: float
    count: int = 1   # launches of this kernel per step

    @property
    def seconds(self) -> float:
        return self.count * max(self.flops / PEAK_FLOPS, self.bytes / PEAK_BYTES)

    @property
    def ideal_seconds(self) -> float:
        return self.count * max(self.flops / PEAK_FLOPS, self.min_bytes / PEAK_BYTES)

    @property
    def bytes_efficiency(self) -> float:
        return self.min_bytes / self.bytes


def rms_norm_costs(shape: ModelShape, sm_count: int = 132) -> list[Cost]:
    """Forward and backward of the hidden norm (2 per layer + final) and of q_norm / k_norm (1 each per layer)."""
    costs = []
    for what, H, rows in (("hidden", shape.hidden, shape.tokens), ("q_norm", shape.head_dim,
                                                                   shape.tokens * shape.q_heads),
                          ("k_norm", shape.head_dim, shape.tokens * shape.kv_heads)):
        n = rows * H
        programs = 2 * sm_count
        costs.append(Cost(f"rms_norm fwd {what}", 4 * n, 2 * n * BF16 + H * BF16,
                          2 * n * BF16 + H * BF16 + rows * FP32))
        # backward: dy, x, rstd in; dx out; fp32 grad_w partials written, then summed by torch
        partials = programs * H * FP32
        costs.append(Cost(f"rms_norm bwd {what}", 8 * n, 3 * n * BF16 + 2 * H * BF16,
                          3 * n * BF16 + rows * FP32 + H * BF16 + 2 * partials + H * BF16))
    return costs


def swiglu_costs(shape: ModelShape) -> list[Cost]:
    n = shape.tokens * shape.intermediate
    return [Cost("swiglu fwd", 5 * n, 3 * n * BF16, 3 * n * BF16),
            Cost("swiglu bwd", 12 * n, 5 * n * BF16, 5 * n * BF16)]


def rope_costs(shape: ModelShape) -> list[Cost]:
    """q and k launches each read the token's cos/sin row (the minimum reads it once for both)."""
    q = shape.tokens * shape.q_heads * shape.head_dim
    k = shape.tokens * shape.kv_heads * shape.head_dim
    table = 2 * shape.tokens * shape.head_dim * BF16
    flops = 3 * (q + k)
    return [Cost(f"rope {direction}", flops, 2 * (q + k) * BF16 + table, 2 * (q + k) * BF16 + 2 * table)
            for direction in ("fwd", "bwd")]


def loss_costs(T: int, H: int, V: int, logit_rows: int = GPU_LOGIT_ROWS, grad_rows: int = GPU_GRAD_ROWS) -> list[Cost]:
    """qforge's CUDA bf16 schedule of the fused loss (forward + backward) for T scored tokens."""
    R, G = min(logit_rows, T), min(grad_rows, T)
    chunks, groups = math.ceil(T / R), math.ceil(T / G)
    weight, matmul = V * H * BF16, 2 * V * H
    return [
        Cost("loss: zero fp32 grad_weight", 0, 0, V * H * FP32),
        Cost("loss: logits = x @ W.T (fp32 out)", matmul * R, 0, weight + R * H * BF16 + R * V * FP32, chunks),
        Cost("loss: row pass (fp32 in, bf16 grad out)", 10 * R * V, 0, R * V * (FP32 + BF16), chunks),
        Cost("loss: grad_hidden = g @ W (fp32 out)", matmul * G, 0, weight + G * V * BF16 + G * H * FP32, groups),
        Cost("loss: grad_weight += g.T @ x (fp32 acc)", matmul * G, 0,
             G * V * BF16 + G * H * BF16 + 2 * V * H * FP32, groups),
        Cost("loss: backward scale + round (W, x)", V * H + T * H, 0, (V * H + T * H) * (FP32 + BF16)),
    ]


def kl_loss_costs(T: int, H: int, V: int, teacher_hidden: int | None = None, reverse: bool = True,
                  logit_rows: int = GPU_LOGIT_ROWS, grad_rows: int = GPU_GRAD_ROWS) -> list[Cost]:
    """`fused_linear_kl`'s CUDA bf16 schedule (forward + backward), on the cross-entropy kernel's plan: the top-k
    teacher (off-policy; K ≪ V columns gathered, not counted) or, with `teacher_hidden` = H', the full teacher's
    logits per chunk (on-policy; forward or reverse KL). The row pass writes fp32 gradients over the logits, then
    one copy rounds them into the bf16 group buffer (the CE kernel writes bf16 rows directly)."""
    R, G = min(logit_rows, T), min(grad_rows, T)
    chunks, groups = math.ceil(T / R), math.ceil(T / G)
    weight, matmul = V * H * BF16, 2 * V * H
    costs = [Cost("kl: zero fp32 grad_weight", 0, 0, V * H * FP32),
             Cost("kl: logits = x @ W.T (fp32 out)", matmul * R, 0, weight + R * H * BF16 + R * V * FP32, chunks)]
    if teacher_hidden is None:
        costs.append(Cost("kl: top-k row pass (fp32 in place)", 6 * R * V, 0, 3 * R * V * FP32, chunks))
    else:
        costs.append(Cost("kl: teacher logits = t @ W_t.T (fp32 out)", 2 * V * teacher_hidden * R, 0,
                          V * teacher_hidden * BF16 + R * teacher_hidden * BF16 + R * V * FP32, chunks))
        passes = 8 if reverse else 5  # fp32 rows read or written: lse pass (s, t), loss/grad pass(es)
        costs.append(Cost(f"kl: full-teacher {'reverse' if reverse else 'forward'} row pass", 12 * R * V, 0,
                          passes * R * V * FP32, chunks))
    return costs + [
        Cost("kl: gradient rows fp32 → bf16 group buffer", R * V, 0, R * V * (FP32 + BF16), chunks),
        Cost("kl: grad_hidden = g @ W (fp32 out)", matmul * G, 0, weight + G * V * BF16 + G * H * FP32, groups),
        Cost("kl: grad_weight += g.T @ x (fp32 acc)", matmul * G, 0,
             G * V * BF16 + G * H * BF16 + 2 * V * H * FP32, groups),
        Cost("kl: backward scale + round (W, x)", V * H + T * H, 0, (V * H + T * H) * (FP32 + BF16)),
    ]


def liger_loss_costs(T: int, H: int, V: int) -> list[Cost]:
    """Liger-Kernel's FusedLinearCrossEntropy schedule: bf16 logits and bf16 grad_weight accumulator."""
    R = min(T, 2 ** math.ceil(math.log2(math.ceil(T / math.ceil(V / H)))))
    chunks = math.ceil(T / R)
    weight, matmul = V * H * BF16, 2 * V * H * R
    return [
        Cost("liger: logits (bf16)", matmul, 0, weight + R * H * BF16 + R * V * BF16, chunks),
        Cost("liger: row pass (bf16 in place)", 10 * R * V, 0, 2 * R * V * BF16, chunks),
        Cost("liger: grad_input", matmul, 0, weight + R * V * BF16 + R * H * BF16, chunks),
        Cost("liger: grad_weight (bf16 acc)", matmul, 0, R * V * BF16 + R * H * BF16 + 2 * weight, chunks),
    ]


def loss_memory(T: int, H: int, V: int, logit_rows: int = GPU_LOGIT_ROWS, grad_rows: int = GPU_GRAD_ROWS) -> dict:
    """Peak bytes the loss holds beyond its inputs, and beyond the bf16 gradients it must return."""
    held = V * H * FP32 + T * H * FP32 + min(logit_rows, T) * V * FP32 + min(grad_rows, T) * V * BF16
    at_backward = V * H * FP32 + T * H * FP32 + (V * H + T * H) * BF16  # fp32 grads + their bf16 roundings
    returned = (V * H + T * H) * BF16
    peak = max(held, at_backward)
    return {"peak_bytes": peak, "peak_beyond_returned_grads": peak - returned}


def moe_costs(shape: MoeShape) -> list[Cost]:
    """One MoE layer's expert path, forward + backward, over M = tokens · top_k expert-sorted rows. Bytes are
    each operand once per launch (the grouped GEMMs re-read tiles from L2, which this bound assumes holds them:
    at 30B-A3B an expert's [2I, H] weight is 6 MB, its average 1,024 rows 4 MB)."""
    T, H, I, E, M = shape.tokens, shape.hidden, shape.width, shape.experts, shape.tokens * shape.top_k
    gemm = 2 * M * H * I  # one [M, H] × [H, I] product summed over experts
    rows, hidden = M * H * BF16, T * H * BF16
    up_weights, down_weights = E * 2 * I * H * BF16, E * H * I * BF16
    moved = [
        ("moe permute fwd", 0, hidden + rows),
        ("moe grouped gemm gate/up fwd + SwiGLU", 2 * gemm + 5 * M * I, rows + up_weights + 3 * M * I * BF16),
        ("moe grouped gemm down fwd", gemm, M * I * BF16 + down_weights + rows),
        ("moe unpermute fwd", 2 * M * H, rows + hidden),
        ("moe unpermute bwd (+ weight grad)", 3 * M * H, hidden + 2 * rows),
        ("moe grouped gemm down dgrad + SwiGLU bwd", gemm + 12 * M * I, rows + down_weights + 5 * M * I * BF16),
        ("moe grouped gemm down wgrad", gemm, rows + M * I * BF16 + down_weights),
        ("moe grouped gemm gate/up dgrad", 2 * gemm, 2 * M * I * BF16 + up_weights + rows),
        ("moe grouped gemm gate/up wgrad", 2 * gemm, 2 * M * I * BF16 + rows + up_weights),
        ("moe permute bwd", M * H, rows + hidden),
    ]
    return [Cost(name, flops, nbytes, nbytes) for name, flops, nbytes in moved]


def moe_shape(name: str, tokens: int) -> MoeShape:
    moe = next(s for s in MOE_SHAPES if s.name == name)
    return MoeShape(moe.name, moe.hidden, moe.experts, moe.width, moe.top_k, tokens)


def moe_summary(moe: MoeShape) -> str:
    """One line: the layer's grouped GEMMs (fwd+bwd) and its whole expert path at the H100 roofline."""
    costs = moe_costs(moe)
    gemms = [c for c in costs if "grouped gemm" in c.name]
    return (f"Qwen3-{moe.name} grouped GEMMs fwd+bwd per layer: {sum(c.flops for c in gemms) / 1e12:.2f} TFLOP, "
            f"roofline {sum(c.seconds for c in gemms) * 1e3:.2f} ms; whole expert path "
            f"{sum(c.seconds for c in costs) * 1e3:.2f} ms")


def model_costs(shape: ModelShape) -> list[Cost]:
    return rms_norm_costs(shape) + swiglu_costs(shape) + rope_costs(shape)


def format_costs(costs: list[Cost]) -> str:
    lines = [f"{'kernel':44s} {'GFLOP':>9s} {'min GB':>8s} {'moved GB':>9s} {'bytes eff':>9s} {'roofline ms':>11s}"]
    for c in costs:
        efficiency = f"{c.bytes_efficiency:.1%}" if c.min_bytes else "-"
        lines.append(f"{c.name:44s} {c.count * c.flops / 1e9:9.1f} {c.count * c.min_bytes / 1e9:8.3f} "
                     f"{c.count * c.bytes / 1e9:9.3f} {efficiency:>9s} {c.seconds * 1e3:11.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="8B", choices=[s.name for s in QWEN3_SHAPES])
    parser.add_argument("--tokens", type=int, default=16_384, help="tokens per micro-batch (scored by the loss)")
    parser.add_argument("--moe", choices=[s.name for s in MOE_SHAPES],
                        help="print the MoE expert path (grouped GEMMs) of this Qwen3-MoE model instead")
    args = parser.parse_args(argv)
    if args.moe:
        moe = moe_shape(args.moe, args.tokens)
        costs = moe_costs(moe)
        print(f"Qwen3-{moe.name} MoE layer ({moe.experts} experts of width {moe.width}, top-{moe.top_k}, hidden "
              f"{moe.hidden}), T = {moe.tokens}, H100 roofline (bounds, not measurements)\n")
        print(format_costs(costs))
        print("\n" + moe_summary(moe))
        return 0
    shape = next(s for s in QWEN3_SHAPES if s.name == args.model)
    shape = ModelShape(shape.name, shape.hidden, shape.intermediate, shape.q_heads, shape.kv_heads,
                       shape.head_dim, shape.vocab, args.tokens)
    print(f"Qwen3-{shape.name}, T = {shape.tokens}, H100 roofline: {PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16, "
          f"{PEAK_BYTES / 1e12:.2f} TB/s (bounds from the schedule, not measurements)\n")
    print(format_costs(model_costs(shape)))
    T, H, V = shape.tokens, shape.hidden, shape.vocab
    ours, liger = loss_costs(T, H, V), liger_loss_costs(T, H, V)
    print("\n" + format_costs(ours + liger))
    ideal = 6 * T * H * V / PEAK_FLOPS
    memory = loss_memory(T, H, V)
    print(f"\nfused loss (fwd+bwd): qforge {sum(c.seconds for c in ours) * 1e3:.1f} ms, Liger's schedule "
          f"{sum(c.seconds for c in liger) * 1e3:.1f} ms, ideal fused kernel (FLOPs only) {ideal * 1e3:.1f} ms; "
          f"extra memory {memory['peak_bytes'] / 1e9:.2f} GB held, {memory['peak_beyond_returned_grads'] / 1e9:.2f} GB "
          f"beyond the bf16 gradients it returns")
    top_k = kl_loss_costs(T, H, V)
    teacher = next((s.hidden for s in QWEN3_SHAPES if s.name == "32B"), H)
    full = kl_loss_costs(T, H, V, teacher_hidden=teacher)
    print("\n" + format_costs(top_k + full))
    print(f"\nfused KL (fwd+bwd): top-k teacher {sum(c.seconds for c in top_k) * 1e3:.1f} ms, full teacher (H' = "
          f"{teacher}, reverse KL) {sum(c.seconds for c in full) * 1e3:.1f} ms, against the fused CE's "
          f"{sum(c.seconds for c in ours) * 1e3:.1f} ms")
    print(f"\nMoE expert path per layer at T = {args.tokens} (details: --moe NAME)")
    for moe in MOE_SHAPES:
        print(moe_summary(moe_shape(moe.name, args.tokens)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
