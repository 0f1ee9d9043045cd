"""The Qwen3-MoE sparse block, forward + backward: qforge's against the installed transformers'
`Qwen3MoeSparseMoeBlock` on the same weights and input, measured side by side in one process.

    python benchmarks/moe_block.py [--experts 16 --top-k 4 --hidden 512 --width 256 --tokens 4096 --repeats 7]

transformers 5.x runs its experts through one of several implementations: `eager` (the per-expert loop, what a
standalone block runs) and `grouped_mm` (tokens sorted by expert + torch._grouped_mm, what `from_pretrained`
picks when it can). Both are measured, and so is `gemm_floor`: the block's six expert GEMMs alone
(torch._grouped_mm at the same routing), which every implementation runs on CPU, so an implementation's time over
the floor's bounds any speed-up over it. Runs are interleaved (every round times each implementation once, in a
rotating order) so load changes on a shared machine hit all of them alike; `uptime` is recorded before and
after. Outputs and gradients are checked against HF eager before timing. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from qforge.engine.config import Qwen3Config
from qforge.engine.moe import SparseMoeBlock
from qforge.kernels import moe_routing

IMPLS = ("qforge", "hf_eager", "hf_grouped_mm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # max |Δ| / max |HF eager| over the output and every gradient


def build(args):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    sizes = dict(vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.width, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=args.hidden // 4)
    moe = dict(num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.width,
               norm_topk_prob=True)
    torch.manual_seed(0)
    blocks = {}
    for impl in ("hf_eager", "hf_grouped_mm"):
        config = Qwen3MoeConfig(**sizes, **moe)
        config._experts_implementation = impl.removeprefix("hf_")
        blocks[impl] = Qwen3MoeSparseMoeBlock(config)
    blocks["qforge"] = SparseMoeBlock(Qwen3Config(**sizes, **moe))
    reference = blocks["hf_eager"]
    with torch.no_grad():  # one set of weights: router std 1 (a realistic spread), experts std 0.02
        reference.gate.weight.normal_(0.0, 1.0 / args.hidden ** 0.5)
        reference.experts.gate_up_proj.normal_(0.0, 0.02)
        reference.experts.down_proj.normal_(0.0, 0.02)
        for impl in ("qforge", "hf_grouped_mm"):
            blocks[impl].load_state_dict(reference.state_dict())
    return blocks


def step(block, x):
    """Forward + backward; returns the output and the input's and parameters' gradients (by name)."""
    x = x.detach().requires_grad_()
    out = block(x)
    out.backward(torch.ones_like(out))
    grads = [x.grad] + [p.grad for _, p in sorted(block.named_parameters())]
    block.zero_grad(set_to_none=True)
    return out.detach(), grads


def gemm_floor(block, x):
    """The block's six expert GEMMs alone (forward, input and weight gradients; torch._grouped_mm, the routing of
    x): what every implementation here runs on CPU, so HF's time over this one bounds any speed-up over HF."""
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        routing = moe_routing(block.gate(flat)[2], block.num_experts)
        rows = flat.index_select(0, routing.source_token)
    gate_up, down, ends = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach(), routing.offsets[1:]
    h = torch.randn(rows.shape[0], down.shape[2], dtype=x.dtype)
    grad_out, grad_gu = torch.randn_like(rows), torch.randn(rows.shape[0], gate_up.shape[1], dtype=x.dtype)

    def run(_block=None, _x=None):
        torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=ends)
        torch._grouped_mm(h, down.transpose(1, 2), offs=ends)
        torch._grouped_mm(grad_out, down, offs=ends)
        torch._grouped_mm(grad_out.t(), h, offs=ends)
        torch._grouped_mm(grad_gu, gate_up, offs=ends)
        torch._grouped_mm(grad_gu.t(), rows, offs=ends)
    return run


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="weights, input and compute dtype of every implementation (bf16: as training runs)")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    blocks = {impl: block.to(dtype) for impl, block in build(args).items()}
    x = torch.randn(1, args.tokens, args.hidden, dtype=dtype)

    expected, expected_grads = step(blocks["hf_eager"], x)
    for impl in ("qforge", "hf_grouped_mm"):
        out, grads = step(blocks[impl], x)
        error = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
                    for a, b in zip([out] + grads, [expected] + expected_grads))
        if error > TOLERANCE[args.dtype]:
            raise SystemExit(f"{impl} disagrees with HF eager: max relative error {error:.2e}")

    runs = {impl: step for impl in IMPLS} | {"gemm_floor": gemm_floor(blocks["qforge"], x)}
    timed = IMPLS + ("gemm_floor",)
    before = uptime()
    times = {impl: [] for impl in timed}
    for round_ in range(args.repeats):
        order = timed[round_ % len(timed):] + timed[:round_ % len(timed)]
        for impl in order:
            start = time.perf_counter()
            runs[impl](blocks.get(impl), x)
            times[impl].append(time.perf_counter() - start)
    after = uptime()
    median = {impl: statistics.median(t) for impl, t in times.items()}
    print(f"MoE block fwd+bwd, {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, width {args.width}, "
          f"{args.tokens} tokens, {args.dtype} CPU, {torch.get_num_threads()} threads, median of {args.repeats} interleaved")
    print(f"uptime before: {before}\nuptime after:  {after}")
    for impl in IMPLS:
        print(f"{impl:14s} {median[impl] * 1e3:9.1f} ms   qforge speed-up {median[impl] / median['qforge']:5.2f}x   "
              f"bound (its time / the GEMMs') {median[impl] / median['gemm_floor']:5.2f}x")
    print(f"{'gemm_floor':14s} {median['gemm_floor'] * 1e3:9.1f} ms   (the six expert GEMMs alone)")
    print(json.dumps({"case": vars(args), "median_s": median, "times_s": times,
                      "speedup_vs": {impl: median[impl] / median["qforge"] for impl in IMPLS[1:]},
                      "bound_vs": {impl: median[impl] / median["gemm_floor"] for impl in IMPLS[1:]},
                      "uptime_before": before, "uptime_after": after}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
