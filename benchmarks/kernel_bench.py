"""Every qforge kernel against Liger-Kernel and HF eager on the same inputs: forward+backward time, peak memory,
and the outputs and gradients checked against HF eager.

    python benchmarks/kernel_bench.py --device cuda --model 8B --tokens 8192    # one table, one JSON line per case

On CUDA, times are the median of CUDA-event timed forward+backward runs after warm-up and peak memory is
torch.cuda.max_memory_allocated above the inputs. `--device cpu` runs the same cases with qforge's reference
path and HF only (Liger needs a GPU): a dry run of this script, not a benchmark.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from qforge.kernels import apply_rope, fused_linear_cross_entropy, rms_norm, swiglu
from qforge.kernels.dispatch import ModelShape
from qforge.tools.aot_check import QWEN3_SHAPES

IMPLS = ("qforge", "liger", "hf")


@dataclass
class Case:
    name: str
    inputs: Callable[[], tuple]         # fresh leaf tensors (requires_grad where the op has a gradient)
    impls: dict[str, Callable]          # impl → fn(*inputs) -> tensor or tuple of tensors
    tolerance: float                    # relative L2 error vs HF eager allowed on outputs and gradients


def _liger():
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    return functional


def cases(shape: ModelShape, device: str, dtype=torch.bfloat16) -> list[Case]:
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    liger = _liger() if device == "cuda" else None
    T, H, I, D = shape.tokens, shape.hidden, shape.intermediate, shape.head_dim
    def randn(*size, scale=1.0, grad=True):
        return (scale * torch.randn(*size, device=device, dtype=torch.float32)).to(dtype).requires_grad_(grad)

    def hf_rms(x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def rope_inputs():
        positions = torch.arange(T, device=device).float()
        inv_freq = 1.0 / 1e6 ** (torch.arange(0, D, 2, device=device).float() / D)
        emb = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)[None]
        return randn(1, T, shape.q_heads, D), randn(1, T, shape.kv_heads, D), emb.cos().to(dtype), emb.sin().to(dtype)

    def rows(x):
        return x.transpose(1, 2).contiguous()

    out = []
    for label, width, n_rows in (("rms_norm hidden", H, T), ("rms_norm q_norm", D, T * shape.q_heads)):
        impls = {"qforge": lambda x, w: rms_norm(x, w, 1e-6), "hf": hf_rms}
        if liger:
            impls["liger"] = lambda x, w: liger.liger_rms_norm(x, w, 1e-6, casting_mode="llama", in_place=False)
        out.append(Case(label, lambda width=width, n_rows=n_rows: (randn(n_rows, width), randn(width, scale=0.1)
                                                                     .detach().add_(1).requires_grad_()),
                        impls, 1e-2))
    impls = {"qforge": swiglu, "hf": lambda g, u: F.silu(g) * u}
    if liger:
        impls["liger"] = liger.liger_swiglu
    out.append(Case("swiglu", lambda: (randn(T, I), randn(T, I)), impls, 1e-2))
    # RoPE: qforge takes [B, T, heads, D]; HF and Liger take [B, heads, T, D] (their native layout, prepared
    # outside the timed region and compared after transposing back)
    impls = {"qforge": lambda q, k, cos, sin: apply_rope(q, k, cos, sin),
             "hf": lambda q, k, cos, sin: tuple(rows(t) for t in apply_rotary_pos_emb(rows(q), rows(k), cos, sin))}
    if liger:
        impls["liger"] = lambda q, k, cos, sin: tuple(rows(t) for t in liger.liger_rope(rows(q), rows(k), cos, sin))
    out.append(Case("rope", rope_inputs, impls, 1e-2))

    def loss_inputs():
        labels = torch.randint(0, shape.vocab, (T,), device=device)
        return randn(T, H), randn(shape.vocab, H, scale=0.02), labels

    impls = {"qforge": lambda h, w, y: fused_linear_cross_entropy(h, w, y, reduction="sum"),
             "hf": lambda h, w, y: F.cross_entropy((h @ w.T).float(), y, reduction="sum")}
    if liger:
        impls["liger"] = lambda h, w, y: liger.liger_fused_linear_cross_entropy(h, w, y, reduction="sum")
    out.append(Case("fused linear cross-entropy", loss_inputs, impls, 2e-2))
    return out


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_case(case: Case, impl: str, device: str, repeats: int) -> dict:
    torch.manual_seed(0)  # every impl gets the same inputs and upstream gradients
    inputs = case.inputs()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        for leaf in leaves:
            leaf.grad = None
        outputs = _as_tuple(case.impls[impl](*inputs))
        upstream = [torch.randn(o.shape, device=device).to(o.dtype) if o.dim() else None for o in outputs]
        torch.autograd.backward(outputs, upstream)
        return outputs

    outputs = step()  # warm-up, and the values to check
    result = ([o.detach() for o in outputs], [leaf.grad.detach().clone() for leaf in leaves])
    seconds = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() - baseline if device == "cuda" else None
    return {"case": case.name, "impl": impl, "seconds_median": statistics.median(seconds), "peak_extra_bytes": peak,
            "_values": result}


def run(shape: ModelShape, device: str, repeats: int = 10, impls=IMPLS) -> list[dict]:
    rows = []
    for case in cases(shape, device):
        measured = {impl: run_case(case, impl, device, repeats) for impl in impls if impl in case.impls}
        ref_outputs, ref_grads = measured["hf"].pop("_values")
        for impl, row in measured.items():
            if impl == "hf":
                row["max_relative_error_vs_hf"] = 0.0
            else:
                outputs, grads = row.pop("_values")
                row["max_relative_error_vs_hf"] = max(_relative_error(a, b) for a, b in
                                                      zip(outputs + grads, ref_outputs + ref_grads))
            row["equal_to_hf"] = row["max_relative_error_vs_hf"] <= case.tolerance
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'case':28s} {'impl':7s} {'ms':>9s} {'peak MiB':>9s} {'rel err vs HF':>13s} equal"]
    for r in rows:
        peak = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:9.1f}"
        lines.append(f"{r['case']:28s} {r['impl']:7s} {r['seconds_median'] * 1e3:9.3f} {peak:>9s} "
                     f"{r['max_relative_error_vs_hf']:13.2e} {'yes' if r['equal_to_hf'] else 'NO'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="8B", choices=[s.name for s in QWEN3_SHAPES])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, help="output rows (default: Qwen3's 151,936)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    base = next(s for s in QWEN3_SHAPES if s.name == args.model)
    shape = ModelShape(base.name, base.hidden, base.intermediate, base.q_heads, base.kv_heads, base.head_dim,
                       args.vocab or base.vocab, args.tokens)
    rows = run(shape, args.device, args.repeats)
    print(format_rows(rows))
    for row in rows:
        print(json.dumps({**row, "model": shape.name, "tokens": shape.tokens, "device": args.device}))
    return 0 if all(r["equal_to_hf"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
