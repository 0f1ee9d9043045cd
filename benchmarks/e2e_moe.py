"""End-to-end MoE training step: qforge vs HF `Qwen3MoeForCausalLM` on one tiny Qwen3-MoE, side by side in one
process, interleaved rounds.

    python benchmarks/e2e_moe.py [--layers 2 --hidden 512 --experts 16 --top-k 4 --width 256 --vocab 4096
                                  --step-tokens 4096 --rounds 5 --dtype fp32] [--out FILE]

The model: the MoE block at the issue's shape (16 experts, top-4, hidden 512, expert width 256) in every layer,
Qwen3 attention (8 query / 4 key-value heads of 64), a 4,096-token vocabulary by default (at this hidden size the
real 151,936 would make the output layer most of the FLOPs, and the MoE block would not be what is timed; the
shares are in docs/moe.md); saved once by transformers and loaded by both.
The data: random token sequences, lengths log-uniform in [50, 2000], the last 30-80% of each supervised; each
round is one optimizer step over ~step_tokens tokens, the same examples for every system.

Systems: `qforge` (the trainer's real step, engine/train/sft.py `train_step`: best-fit packing into
`--pack-tokens` micro-batches, varlen attention, fused linear cross-entropy, qforge's MoE block), and HF with
each experts implementation (`eager`, `grouped_mm`) on padded rows (`--padded-rows` per micro-batch, the HF
Trainer's collator) and on packed rows (position_ids restarting per sequence, TRL's padding-free collator).
Every system: clip_grad_norm + AdamW step; the load-balancing loss is off in all (coefficient 0: HF's is
summed over micro-batches, qforge's averaged, so with it on the losses would differ by design).
A round times every system once, in a rotating order; the first round is warm-up. Ratios are medians over rounds
of qforge's tokens/s over each system's within the round. Every round's losses are checked to agree.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e_case import hf_step  # noqa: E402
from e2e_workload import packed_micro_batches, padded_micro_batches, padding_free_inputs  # noqa: E402

from qforge.engine.data.example import make_example  # noqa: E402
from qforge.engine.moe import RouterBalance  # noqa: E402
from qforge.engine.train.config import OptimSettings  # noqa: E402
from qforge.engine.train.optim import build_optimizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOSS_TOLERANCE = {"fp32": 2e-3, "bf16": 5e-2}  # |Δ step loss| against qforge
PAD_ID = 0


def hf_config(args):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.width,
                          num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                          num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.width,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                          output_router_logits=False, router_aux_loss_coef=0.0, max_position_embeddings=4096,
                          pad_token_id=PAD_ID)


def make_examples(args, rng: np.random.Generator) -> list:
    """One round's examples: ≥ step_tokens tokens of random sequences, the last 30-80% of each supervised."""
    examples, total = [], 0
    while total < args.step_tokens:
        length = int(np.exp(rng.uniform(np.log(50), np.log(2000))))
        ids = rng.integers(1, args.vocab, length)
        supervised = np.arange(length) >= int(length * (1 - rng.uniform(0.3, 0.8)))
        examples.append(make_example(ids, supervised))
        total += length
    return examples


def build_systems(args, directory: Path, dtype: torch.dtype) -> dict:
    """name → (model, how it runs one step's examples)."""
    from transformers import Qwen3MoeForCausalLM

    from qforge.engine.checkpoint import load_model
    from qforge.engine.train.parallel import Dist
    from qforge.engine.train.sft import train_step

    torch.manual_seed(args.seed)
    Qwen3MoeForCausalLM(hf_config(args)).save_pretrained(directory)
    qforge = load_model(directory, dtype=dtype)
    qforge.router_balance = RouterBalance(0.0)  # configure_router with model.router_aux_loss_coef = 0
    dist_ = Dist(device=torch.device("cpu"))

    def qforge_step(model, examples, loss_tokens, seed):
        loss_sum, weight = train_step(model, packed_micro_batches(examples, list(range(len(examples))),
                                                                  args.pack_tokens, seed), dist_)
        return loss_sum / weight

    def padded(model, examples, loss_tokens, seed):
        batches = padded_micro_batches(examples, list(range(len(examples))), args.padded_rows, pad_id=PAD_ID)
        return hf_step(model, batches, loss_tokens, torch.device("cpu"))

    def padding_free(model, examples, loss_tokens, seed):
        packed = packed_micro_batches(examples, list(range(len(examples))), args.pack_tokens, seed)
        return hf_step(model, [padding_free_inputs(b) for b in packed], loss_tokens, torch.device("cpu"))

    systems = {"qforge": (qforge, qforge_step)}
    for experts in args.hf_experts:
        for layout, run in (("padded", padded), ("padding_free", padding_free)):
            model = Qwen3MoeForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa",
                                                        experts_implementation=experts)
            systems[f"hf_{layout}_{experts}"] = (model, run)
    return systems


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(args) -> dict:
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        systems = build_systems(args, Path(tmp), dtype)
    settings = OptimSettings(lr=1e-3, weight_decay=0.1, grad_clip=1.0, schedule="constant")
    optimizers = {name: build_optimizer(model.train(), settings) for name, (model, _) in systems.items()}
    rng = np.random.default_rng(args.seed)
    names = list(systems)
    rounds, before = [], uptime()
    for index in range(args.rounds + 1):  # round 0: warm-up
        examples = make_examples(args, rng)
        tokens = sum(len(e) for e in examples)
        loss_tokens = sum(int((e.labels[1:] != -100).sum()) for e in examples)  # a first token has no target
        record = {"tokens": tokens, "seconds": {}, "loss": {}}
        for name in names[index % len(names):] + names[:index % len(names)]:
            model, step = systems[name]
            started = time.perf_counter()
            loss = step(model, examples, loss_tokens, index)
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            record["seconds"][name] = time.perf_counter() - started
            record["loss"][name] = loss
        rounds.append(record)
        print(f"round {index}{' (warm-up)' if index == 0 else ''}: " + ", ".join(
            f"{n} {tokens / record['seconds'][n]:.0f} tok/s loss {record['loss'][n]:.4f}" for n in names), flush=True)
    timed = rounds[1:]
    gap = max(abs(r["loss"][n] - r["loss"]["qforge"]) for r in rounds for n in names)
    return {"case": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(), "uptime_before": before,
            "uptime_after": uptime(), "load_average_end": os.getloadavg(),
            "tokens_per_s": {n: statistics.median(r["tokens"] / r["seconds"][n] for r in timed) for n in names},
            "speedup_vs": {n: statistics.median(r["seconds"][n] / r["seconds"]["qforge"] for r in timed)
                           for n in names if n != "qforge"},
            "max_abs_loss_diff": gap, "losses_agree": gap <= LOSS_TOLERANCE[args.dtype], "rounds": rounds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--step-tokens", type=int, default=4096, help="tokens per optimizer step (one round)")
    parser.add_argument("--pack-tokens", type=int, default=4096, help="packed micro-batch budget (≥ 2000)")
    parser.add_argument("--padded-rows", type=int, default=4)
    parser.add_argument("--hf-experts", nargs="+", default=["eager", "grouped_mm"])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one warm-up round is added)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON summary here too")
    args = parser.parse_args(argv)
    summary = run(args)
    print(f"uptime before: {summary['uptime_before']}\nuptime after:  {summary['uptime_after']}")
    for name, value in summary["tokens_per_s"].items():
        ratio = summary["speedup_vs"].get(name)
        print(f"{name:26s} {value:9.0f} tokens/s" + (f"   qforge speed-up {ratio:5.2f}x" if ratio else ""))
    print(f"losses agree: {summary['losses_agree']} (max |Δ| {summary['max_abs_loss_diff']:.2e})")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}))
    return 0 if summary["losses_agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
