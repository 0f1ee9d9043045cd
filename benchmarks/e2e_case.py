"""One system of the end-to-end benchmark in a fresh process: train the prepared workload, print one JSON line.

    python benchmarks/e2e_case.py --system qforge --workload DIR     # DIR written by e2e.py

A fresh process per system makes the peak memory its own: on CPU the process's RSS high-water mark
(VmHWM, which includes the Python runtime, torch, the weights, optimizer state and everything
the training step allocates), on CUDA torch.cuda.max_memory_allocated. The qforge system never imports
transformers. The matmul peak (the MFU denominator) is measured in this process before and after training.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e_workload import load, packed_micro_batches, padded_micro_batches, padding_free_inputs  # noqa: E402

from qforge.engine.config import Qwen3Config  # noqa: E402
from qforge.engine.train.config import OptimSettings  # noqa: E402
from qforge.engine.train.metrics import measure_matmul_peak, peak_memory_bytes, training_flops  # noqa: E402
from qforge.engine.train.optim import build_optimizer, build_scheduler  # noqa: E402

SYSTEMS = ("qforge", "qforge_lora", "hf_padded", "hf_padding_free", "hf_liger")


def useful_flops(config: Qwen3Config, lengths: list[int], loss_tokens: int) -> float:
    """Forward+backward FLOPs the step needs: the body on every real token (with causal attention per
    sequence) and the output layer only where a loss is taken — the same count for every system, so padding
    and logits nobody trains on show up as lost utilisation."""
    return training_flops(config, lengths, loss_tokens, config.vocab_size)


def hf_model(model_dir: Path, dtype: torch.dtype, device: torch.device, liger: bool):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    if liger:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen3
        except ImportError:
            raise SystemExit(json.dumps({"system": "hf_liger", "skipped": "liger-kernel is not installed"}))
        apply_liger_kernel_to_qwen3(model=model)
    return model


def hf_step(model, micro_batches: list[dict], loss_tokens: int, device: torch.device) -> float:
    """A plain HF loop over one optimizer step: each micro-batch's summed loss divided by the step's
    supervised-token count (`num_items_in_batch`, as the HF Trainer does), so the step's gradient is exact.
    use_cache=False: with the config's default (True) transformers 5.x builds a KV cache even in training,
    and then ignores packed position_ids, letting packed sequences attend to each other."""
    total = 0.0
    for batch in micro_batches:
        loss = model(**{k: v.to(device) for k, v in batch.items()}, num_items_in_batch=loss_tokens,
                     use_cache=False).loss
        loss.backward()
        total += float(loss.detach())
    return total


def packed_attention_check() -> dict:
    """Does transformers keep attention inside each sequence when a row packs several (position_ids restarting,
    no attention_mask)? Max |Δ logit| of a sequence packed behind another vs alone, on a tiny random model with
    a large init (so attention matters), per attention implementation, with use_cache=False (as the baseline
    runs) and with the config default."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    result = {}
    for implementation in ("sdpa", "eager"):
        torch.manual_seed(0)
        config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.5,
                             attn_implementation=implementation)
        model = Qwen3ForCausalLM(config).train()
        first, second = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 9))
        packed = torch.cat([first, second], 1)
        restarting = torch.cat([torch.arange(7), torch.arange(9)])[None]
        with torch.no_grad():
            alone = model(second).logits[0]
            for name, use_cache in (("use_cache_false", False), ("config_default", None)):
                logits = model(packed, position_ids=restarting, use_cache=use_cache).logits[0, 7:]
                result[f"{implementation}_{name}"] = float((logits - alone).abs().max())
    return result


def train(system: str, directory: Path, device: torch.device) -> dict:
    workload, examples, plan = load(directory)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = Qwen3Config.from_json(directory / "model" / "config.json")
    settings = OptimSettings(lr=workload.lr, weight_decay=workload.weight_decay, grad_clip=workload.grad_clip,
                             schedule="constant")
    packed = [packed_micro_batches(examples, step, workload.packed_tokens, seed=i) for i, step in enumerate(plan)]
    extra = {}
    if system in ("qforge", "qforge_lora"):
        from qforge.engine.checkpoint import load_model
        from qforge.engine.lora import LoRASettings, apply_lora
        from qforge.engine.train.sft import train_step
        from qforge.engine.train.parallel import Dist

        model = load_model(directory / "model", dtype=dtype, device=device)
        if system == "qforge_lora":  # train.method=lora with its defaults: r=16, α=32, every block linear
            apply_lora(model, LoRASettings(), seed=workload.seed)
        dist_ = Dist(device=device)
        steps = packed

        def run_step(micro_batches, loss_tokens):
            loss_sum, weight = train_step(model, micro_batches, dist_)
            return loss_sum / weight
    else:
        model = hf_model(directory / "model", dtype, device, liger=system == "hf_liger")
        if system == "hf_padded":
            steps = [padded_micro_batches(examples, step, workload.padded_rows) for step in plan]
        else:
            steps = [[padding_free_inputs(b) for b in step] for step in packed]
            extra["packed_attention_check"] = packed_attention_check()

        def run_step(micro_batches, loss_tokens):
            return hf_step(model, micro_batches, loss_tokens, device)

    model.train()
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    optimizer = build_optimizer(model, settings)
    scheduler = build_scheduler(optimizer, workload.steps, settings)
    peak_before = measure_matmul_peak(device, dtype, seconds=2.0)
    if device.type == "cuda":  # the peak measurement's matrices are not the training's memory
        torch.cuda.reset_peak_memory_stats(device)
    records = []
    for index, (step, micro_batches) in enumerate(zip(plan, steps)):
        lengths = [len(examples[i]) for i in step]
        loss_tokens = sum(int((examples[i].labels[1:] != -100).sum()) for i in step)  # a first token has no target
        computed = (sum(b["input_ids"].numel() for b in micro_batches) if system == "hf_padded" else sum(lengths))
        started = time.perf_counter()
        loss = run_step(micro_batches, loss_tokens)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        records.append({"step": index + 1, "loss": loss, "seconds": time.perf_counter() - started,
                        "tokens": sum(lengths), "computed_tokens": computed, "loss_tokens": loss_tokens,
                        "micro_batches": len(micro_batches), "flops": useful_flops(config, lengths, loss_tokens)})
    peak = max(peak_before, measure_matmul_peak(device, dtype, seconds=2.0))
    timed = records[workload.warmup_steps:]
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    budget = (sum(r["computed_tokens"] for r in records) if system == "hf_padded"
              else sum(len(b) for b in packed) * workload.packed_tokens)
    return {"system": system, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
            "tokens_per_s": tokens / seconds, "peak_mem_bytes": peak_memory_bytes(device),
            "mfu": sum(r["flops"] for r in timed) / seconds / peak, "matmul_peak_flops": peak,
            "packing_efficiency": sum(r["tokens"] for r in records) / budget,
            "padding_fraction": 1 - sum(r["tokens"] for r in records) / sum(r["computed_tokens"] for r in records),
            "steps": records, "torch_threads": torch.get_num_threads(),
            "load_average": [load_before, os.getloadavg()[0]], **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--workload", type=Path, required=True, help="directory written by e2e.py")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(json.dumps(train(args.system, args.workload, torch.device(args.device))))


if __name__ == "__main__":
    main()
