"""One loss benchmark case in a fresh process: time of forward+backward and the process's peak memory.

    python benchmarks/loss_case.py --impl qforge --tokens 8192 --hidden 1024 --vocab 151936

Prints one JSON line. Peak memory on CPU is the RSS high-water mark (VmHWM) after the runs
minus the mark once the inputs exist (on CUDA: torch.cuda.max_memory_allocated, same subtraction), so it is measured, not estimated; `peak_extra_bytes` further subtracts the
gradients the loss must return (grad_hidden + grad_weight). A fresh process per case keeps one case's
allocator caches and peaks out of the next.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from qforge.engine.train.metrics import peak_memory_bytes

IMPLS = ("qforge", "naive", "compiled", "torch_lce", "liger")


def naive_loss(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")


def loss_fn(impl: str, chunk_bytes: int | None):
    if impl == "qforge":
        from qforge.kernels import fused_linear_cross_entropy
        budget = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
        return lambda h, w, y: fused_linear_cross_entropy(h, w, y, reduction="sum", **budget)
    if impl == "naive":
        return naive_loss
    if impl == "compiled":
        return torch.compile(naive_loss)
    if impl == "torch_lce":
        if not hasattr(F, "linear_cross_entropy"):
            raise SystemExit(json.dumps({"impl": impl, "skipped": "torch has no F.linear_cross_entropy"}))
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, reduction="sum")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        raise SystemExit(json.dumps({"impl": impl, "skipped": "liger-kernel is not installed"}))
    return lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y, reduction="sum")


def peak_bytes(device: str) -> int:
    """Kept under this name: benchmarks/test_bench_vocab.py imports it."""
    return peak_memory_bytes(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--chunk-bytes", type=int, help="qforge's logits budget (default: the library's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up run (0: time that run)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    fn = loss_fn(args.impl, args.chunk_bytes)
    torch.manual_seed(0)
    # filled in place: a temporary here would raise the RSS high-water mark that serves as the baseline
    hidden = torch.empty(args.tokens, args.hidden, dtype=dtype, device=args.device).normal_().requires_grad_()
    weight = torch.empty(args.vocab, args.hidden, dtype=dtype, device=args.device).normal_(0, 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), device=args.device)
    baseline = peak_bytes(args.device)

    seconds = []
    for _ in range(args.repeats + 1):  # the first run warms up (and compiles, for torch.compile)
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        fn(hidden, weight, labels).backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    grad_bytes = hidden.grad.nbytes + weight.grad.nbytes
    peak = peak_bytes(args.device) - baseline
    print(json.dumps({
        "impl": args.impl, "device": args.device, "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype,
        "seconds_median": statistics.median(seconds[1:] or seconds), "seconds_first": seconds[0],
        "peak_bytes": peak, "peak_extra_bytes": peak - grad_bytes, "logits_bytes": args.tokens * args.vocab * 4,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    sys.exit(main())
