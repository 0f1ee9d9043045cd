"""Full fine-tuning steps of a Qwen3-0.6B-shaped model (random weights, random packed data): tokens/s, MFU and
peak memory through qforge's own train step (fused kernels, fused loss, AdamW).

    python benchmarks/fft_smoke.py --steps 20                      # CUDA, bf16, 16,384 tokens per step
    python benchmarks/fft_smoke.py --tiny --steps 2 --device cpu   # a dry run of this script

Throughput and MFU are measured over the steps after the first `--warmup` (compilation and allocator warm-up);
MFU = training FLOPs (engine.train.metrics.training_flops) / time / the H100's 989 TFLOP/s bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qforge.engine.config import Qwen3Config
from qforge.engine.data import PackedBatch
from qforge.engine.model import Qwen3
from qforge.engine.train.config import OptimSettings
from qforge.engine.train.sft import train_step
from qforge.engine.train.metrics import peak_memory_bytes, training_flops
from qforge.engine.train.optim import build_optimizer
from qforge.engine.train.parallel import Dist

H100_BF16_FLOPS = 989e12
QWEN3_0_6B = dict(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


def random_batch(tokens: int, seq_len: int, vocab: int, device) -> PackedBatch:
    """Back-to-back sequences of seq_len tokens; the first quarter of each is an unlabelled prompt."""
    cu_seqlens = torch.arange(0, tokens + 1, seq_len, dtype=torch.int32)
    position_ids = torch.arange(tokens) % seq_len
    input_ids = torch.randint(0, vocab, (tokens,))
    labels = torch.roll(input_ids, -1)
    labels[(position_ids < seq_len // 4) | (position_ids == seq_len - 1)] = -100
    batch = PackedBatch(input_ids, position_ids, cu_seqlens, seq_len, labels, (labels != -100).float())
    return batch.to(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--tokens", type=int, default=16_384, help="tokens per optimizer step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (for a CPU dry run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Qwen3Config(**(TINY if args.tiny else QWEN3_0_6B), torch_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(0)
    model = Qwen3(config)
    model.init_weights(seed=0)
    model = model.to(device=device, dtype=dtype).train()
    optimizer = build_optimizer(model, OptimSettings(lr=1e-5))
    dist_ = Dist(device=device)
    batches = [random_batch(args.tokens, args.seq_len, config.vocab_size, device) for _ in range(2)]
    loss_tokens = int((batches[0].labels != -100).sum())
    flops = training_flops(config, [args.seq_len] * (args.tokens // args.seq_len), loss_tokens, config.vocab_size)

    timed, losses = [], []
    for step in range(args.steps):
        start = time.perf_counter()
        loss_sum, weight = train_step(model, [batches[step % 2]], dist_)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= min(args.warmup, args.steps - 1):
            timed.append(time.perf_counter() - start)
        losses.append(loss_sum / weight)
    seconds = sum(timed) / len(timed)
    result = {"model": "tiny" if args.tiny else "Qwen3-0.6B-shaped", "device": args.device, "dtype": str(dtype),
              "steps": args.steps, "tokens_per_step": args.tokens, "tokens_per_s": args.tokens / seconds,
              "mfu_vs_h100_bf16": flops / seconds / H100_BF16_FLOPS, "peak_memory_bytes": peak_memory_bytes(args.device),
              "first_loss": losses[0], "last_loss": losses[-1]}
    print(f"{result['model']} on {args.device}: {result['tokens_per_s']:,.0f} tokens/s, MFU "
          f"{result['mfu_vs_h100_bf16']:.1%} of 989 TFLOP/s, peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB, "
          f"loss {losses[0]:.3f} → {losses[-1]:.3f}")
    print(json.dumps(result))
    return 0 if all(map(lambda x: x == x and abs(x) < 1e4, losses)) else 1


if __name__ == "__main__":
    sys.exit(main())
