"""Plans a qforge full fine-tuning run before renting hardware: peak memory per device and step time.

    python -m qforge.tools.estimate --model qwen3-8b --tokens 16384 --gpus 8 --fsdp --activation-checkpointing
    python -m qforge.tools.estimate --model path/to/config.json --tokens 4096 --gpus 1 --kept-vocab 119115

--model is a built-in name (qwen3-0.6b … qwen3-32b) or an HF config.json (or a checkpoint directory holding
one). --tokens is the packed micro-batch budget per device. Memory is counted the way the qforge trainer
allocates it: weights, gradients and AdamW's two moments in the parameter dtype, or the moments in bf16 with
--optim-state-dtype bf16 (sharded over the devices with FSDP2), plus the largest transient phase — the end of
the forward (saved activations and the fused loss's logits chunk and finished weight gradient), the
embedding's dense gradient in the backward, or the optimizer step (the fused AdamW step needs no temporaries;
bf16 moments are upcast to fp32 one parameter at a time). Activations are counted tensor by tensor from what the model's autograd
graph saves (the CPU reference ops keep more than the fused CUDA kernels). Step time is FLOPs divided by
an assumed fraction (`--mfu`) of the device's peak; measure the real fraction with benchmarks/e2e.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from qforge.engine.config import Qwen3Config
from qforge.engine.train.metrics import training_flops
from qforge.kernels.fused_linear_cross_entropy import DEFAULT_CHUNK_BYTES  # the loss's CPU logits budget
from qforge.tools.twin.models import MODELS, resolve_config

GIB = 2**30
GPUS = {  # dense bf16 tensor-core peak (datasheets) and memory per device
    "a100-40gb": (312e12, 40), "a100": (312e12, 80), "h100": (989e12, 80), "h200": (989e12, 141),
    "l40s": (362e12, 48),
}
PRECISIONS = {  # train.precision → (parameter/gradient/moment bytes, compute bytes)
    "fp32": (4, 4), "bf16": (2, 2), "bf16-mixed": (4, 2),
}
RUNTIME_BYTES = {"cpu": 0.35 * GIB, "cuda": 1.0 * GIB}  # Python + torch (+ CUDA context, allocator slack)


@dataclass
class Plan:
    tokens: int  # packed micro-batch budget per device
    gpus: int = 1
    device: str = "cuda"
    precision: str = "bf16-mixed"
    fsdp: bool = False
    activation_checkpointing: bool = False
    kept_vocab: int | None = None  # rows of the output head (vocabulary pruning), default: all
    seq_len: int = 2048  # typical sequence length (attention cost grows with it)
    loss_fraction: float = 1.0  # share of tokens that carry a loss (SFT: the answers)
    grad_accum: int = 1
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    optim_state_dtype: str = "fp32"  # optim.state_dtype: fp32 = the parameter dtype (torch's fused AdamW), or bf16

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.optim_state_dtype not in ("fp32", "bf16"):
            raise ValueError(f"optim_state_dtype {self.optim_state_dtype!r}: expected fp32 or bf16")
        if self.device not in RUNTIME_BYTES:
            raise ValueError(f"device {self.device!r}: expected cpu or cuda")
        if self.tokens < 1 or self.gpus < 1 or self.grad_accum < 1 or self.seq_len < 1:
            raise ValueError("tokens, gpus, grad_accum and seq_len must be positive")
        if not 0 < self.loss_fraction <= 1:
            raise ValueError(f"loss_fraction must be in (0, 1], got {self.loss_fraction}")
        if self.gpus > 1:
            self.fsdp = True  # the trainer always shards with FSDP2 under torchrun


def parameter_counts(config: Qwen3Config) -> dict[str, int]:
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    block = h * (2 * q + 2 * kv) + 3 * h * config.intermediate_size + 2 * h + 2 * config.head_dim
    embedding = config.vocab_size * h
    head = 0 if config.tie_word_embeddings else embedding
    return {"embedding": embedding, "head": head, "block": block,
            "total": embedding + head + config.num_hidden_layers * block + h}


def activation_bytes_per_token(config: Qwen3Config, plan: Plan) -> dict[str, float]:
    """Bytes the autograd graph keeps per token: per block, and for the rest of the model.

    CPU reference ops: each RMSNorm keeps its input, the normalised value and the weighted output; q/k norms
    the raw and normalised heads; SwiGLU gate, up, silu(gate) and the product; the o_proj input is a fresh
    copy (segments concatenated). Fused CUDA kernels: RMSNorm keeps input and output, SwiGLU gate, up and
    the product, q/k norms their input, and o_proj reads the attention output in place. Both: attention
    keeps q, k, v (after RoPE), its output and the fp32 log-sum-exp."""
    _, compute = PRECISIONS[plan.precision]
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    q, kv = heads * d, kv_heads * d
    if plan.device == "cpu":
        elements, fp32 = 6 * h + 5 * q + 4 * kv + 4 * i, 2 + 2 * heads + kv_heads
        model = (2 * h) * compute + 4 + 2 * d * compute + 8  # final norm, RoPE tables, input ids
    else:
        elements, fp32 = 4 * h + 3 * q + 3 * kv + 3 * i, 2 + 2 * heads + kv_heads
        model = h * compute + 4 + 2 * d * compute + 8
    return {"block": elements * compute + fp32 * 4, "model": model}


def estimate_memory(config: Qwen3Config, plan: Plan) -> dict[str, float]:
    """Peak bytes per device, by component (see the module docstring for the phases)."""
    state, compute = PRECISIONS[plan.precision]
    counts = parameter_counts(config)
    shards = plan.gpus if plan.fsdp else 1
    vocab = plan.kept_vocab or config.vocab_size
    h, layers, tokens = config.hidden_size, config.num_hidden_layers, plan.tokens
    loss_tokens = max(1, round(tokens * plan.loss_fraction))
    per_token = activation_bytes_per_token(config, plan)
    moment = 2 if plan.optim_state_dtype == "bf16" else state
    out = {"weights": counts["total"] * state / shards, "gradients": counts["total"] * state / shards,
           "adamw_moments": 2 * counts["total"] * moment / shards}

    if plan.activation_checkpointing:  # block inputs, plus one block recomputed at a time in the backward
        activations = tokens * (layers * h * compute + per_token["block"] + per_token["model"])
    else:
        activations = tokens * (layers * per_token["block"] + per_token["model"])
    rows = min(loss_tokens, max(1, plan.chunk_bytes // (vocab * 4)))
    logits_chunk = rows * vocab * (4 if compute == 4 else 8)  # bf16: the product and the grad copy too
    loss = (logits_chunk + vocab * h * 4 + (vocab * h * compute if compute != 4 else 0)
            + loss_tokens * h * compute * (1 if loss_tokens == tokens else 2)
            + (vocab * h * compute if vocab < config.vocab_size else 0))
    unsharded = 0.0
    if plan.fsdp:  # FSDP2: the root unit (embedding, head) stays gathered; two blocks gathered at a time
        unsharded = (counts["embedding"] + counts["head"]) * compute + 2 * counts["block"] * compute
    elif plan.precision == "bf16-mixed":  # autocast keeps a bf16 copy of every matmul weight for the backward
        unsharded = (layers * counts["block"] + counts["embedding"]) * compute
    forward_end = activations + loss + unsharded
    root = (counts["embedding"] + counts["head"]) * compute if plan.fsdp else 0.0
    embedding_grad = config.vocab_size * h * (compute if plan.fsdp else state) + root
    phases = {"forward_end": forward_end, "embedding_backward": embedding_grad}  # fused AdamW: no temporaries
    if plan.optim_state_dtype == "bf16":  # the step upcasts the largest shard's two moments to fp32
        phases["optimizer_step"] = 8 * max(counts["embedding"], config.intermediate_size * h) / shards
    out |= {"activations": activations, "loss_buffers": loss, "unsharded_copies": unsharded}
    out["transient_phase"] = max(phases, key=phases.get)
    if plan.device == "cuda":  # gradients are set to None after each step: alive only in the backward phase
        for phase in ("embedding_backward", "optimizer_step"):
            if phase in phases:
                phases[phase] += out["gradients"]
        out["training"] = out["weights"] + out["adamw_moments"] + max(phases.values())
    else:
        out["training"] = out["weights"] + out["gradients"] + out["adamw_moments"] + max(phases.values())
    out["runtime"] = RUNTIME_BYTES[plan.device]
    out["peak"] = out["training"] + out["runtime"]
    return out


def estimate_step(config: Qwen3Config, plan: Plan, peak_flops: float, mfu: float) -> dict[str, float]:
    """FLOPs and time of one optimizer step (grad_accum micro-batches on every device)."""
    vocab = plan.kept_vocab or config.vocab_size
    sequences = [plan.seq_len] * (plan.tokens // plan.seq_len) + ([plan.tokens % plan.seq_len] if
                                                                  plan.tokens % plan.seq_len else [])
    flops = training_flops(config, sequences, plan.tokens * plan.loss_fraction, vocab)
    if plan.activation_checkpointing:
        flops += training_flops(config, sequences, 0, 0) / 3  # the blocks' forward runs twice
    seconds = plan.grad_accum * flops / (peak_flops * mfu)
    tokens = plan.tokens * plan.grad_accum * plan.gpus
    return {"flops_per_micro_batch": flops, "step_seconds": seconds, "tokens_per_step": tokens,
            "tokens_per_s": tokens / seconds}


def report(config: Qwen3Config, plan: Plan, memory: dict, step: dict, capacity_gib: float | None) -> str:
    counts = parameter_counts(config)
    lines = [f"model: {counts['total'] / 1e9:.2f}B parameters (hidden {config.hidden_size}, "
             f"{config.num_hidden_layers} layers, vocab {config.vocab_size}"
             f"{f', {plan.kept_vocab} kept' if plan.kept_vocab else ''}); {plan.gpus} × {plan.device}, "
             f"{plan.precision}{', FSDP2' if plan.fsdp else ''}"
             f"{', activation checkpointing' if plan.activation_checkpointing else ''}; "
             f"{plan.tokens} tokens per micro-batch",
             "memory per device:"]
    for key in ("weights", "gradients", "adamw_moments", "activations", "loss_buffers", "unsharded_copies",
                "runtime"):
        lines.append(f"  {key.replace('_', ' '):<18} {memory[key] / GIB:8.2f} GiB")
    verdict = ""
    if capacity_gib:
        verdict = " — fits" if memory["peak"] <= capacity_gib * GIB else f" — does NOT fit in {capacity_gib} GiB"
    lines.append(f"  {'peak':<18} {memory['peak'] / GIB:8.2f} GiB (largest transient: "
                 f"{memory['transient_phase'].replace('_', ' ')}){verdict}")
    lines.append(f"step: {step['tokens_per_step']} tokens, {step['step_seconds']:.2f} s, "
                 f"{step['tokens_per_s']:.0f} tokens/s overall (at the assumed MFU)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"{', '.join(MODELS)} or a config.json / checkpoint dir")
    parser.add_argument("--tokens", type=int, required=True, help="packed micro-batch tokens per device")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), help="default: bf16-mixed on cuda, fp32 on cpu")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 sharding (implied by --gpus > 1)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--kept-vocab", type=int, help="output rows kept by vocabulary pruning")
    parser.add_argument("--seq-len", type=int, default=2048, help="typical sequence length in a micro-batch")
    parser.add_argument("--loss-fraction", type=float, default=1.0, help="share of tokens with a loss")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--optim-state-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="AdamW's moments (optim.state_dtype)")
    parser.add_argument("--gpu", choices=tuple(GPUS), help="sets the peak FLOP/s and memory to check against")
    parser.add_argument("--peak-tflops", type=float, help="device peak (default: --gpu's, or measured on cpu)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of the peak reached")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)

    config = resolve_config(args.model)
    precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "fp32")
    try:
        plan = Plan(args.tokens, args.gpus, args.device, precision, args.fsdp, args.activation_checkpointing,
                    args.kept_vocab, min(args.seq_len, args.tokens), args.loss_fraction, args.grad_accum,
                    optim_state_dtype=args.optim_state_dtype)
    except ValueError as error:
        parser.error(str(error))
    if plan.kept_vocab is not None and not 0 < plan.kept_vocab <= config.vocab_size:
        parser.error(f"--kept-vocab must be in 1..{config.vocab_size}")
    capacity = GPUS[args.gpu][1] if args.gpu else None
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
    elif args.gpu:
        peak = GPUS[args.gpu][0]
    elif args.device == "cpu":
        import torch

        from qforge.engine.train.metrics import measure_matmul_peak
        peak = measure_matmul_peak(torch.device("cpu"), torch.float32 if precision == "fp32" else torch.bfloat16)
    else:
        parser.error("give --gpu or --peak-tflops for a step-time estimate on cuda")
    memory = estimate_memory(config, plan)
    step = estimate_step(config, plan, peak, args.mfu)
    if args.json:
        print(json.dumps({"plan": asdict(plan), "memory_bytes": memory, "step": step, "peak_flops": peak,
                          "mfu": args.mfu}, indent=1))
    else:
        print(report(config, plan, memory, step, capacity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
