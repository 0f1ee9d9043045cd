"""CJK-free vocabulary: the fused loss over the full vs the kept vocabulary at Qwen3-8B's H = 4096 (time of
forward+backward, measured peak RSS), and the pruned checkpoint's size vs the original.

    python -m pytest benchmarks/test_bench_vocab.py --benchmark-enable -s -m 'not large'   # T=256 only

Each measurement runs in a fresh process (this file is also the script) so peaks do not mix:
    python benchmarks/test_bench_vocab.py loss --tokens 256 --hidden 4096 --mode full|vocab_index|pruned
    python benchmarks/test_bench_vocab.py prune SRC_DIR DST_DIR
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]
from loss_case import peak_bytes  # noqa: E402
from qwen3_fixtures import qwen3_tokenizer_dir  # noqa: E402

QWEN3_ROWS = 151_936
QWEN3_8B = dict(hidden=4096, layers=36, intermediate=12288, heads=32, kv_heads=8, head_dim=128, tied=False)


def measure_loss(tokens: int, hidden: int, mode: str, dtype: torch.dtype, repeats: int) -> dict:
    """mode: "full" (all rows), "vocab_index" (full head, kept rows scored), "pruned" (a pruned head)."""
    from qforge.engine.vocab import VocabMap
    from qforge.kernels import fused_linear_cross_entropy

    vocab = VocabMap.from_tokenizer(qwen3_tokenizer_dir(), QWEN3_ROWS)
    rows = vocab.new_size if mode == "pruned" else QWEN3_ROWS
    torch.manual_seed(0)
    x = torch.empty(tokens, hidden, dtype=dtype).normal_().requires_grad_()
    weight = torch.empty(rows, hidden, dtype=dtype).normal_(0, 0.02).requires_grad_()
    new_labels = torch.randint(0, vocab.new_size, (tokens,))  # the same targets in every mode
    labels = new_labels if mode == "pruned" else vocab.kept_ids[new_labels]
    index = vocab.kept_ids if mode == "vocab_index" else None
    baseline = peak_bytes("cpu")
    seconds, cpu_seconds = [], []
    for _ in range(repeats + 1):  # the first run warms up
        x.grad = weight.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        fused_linear_cross_entropy(x, weight, labels, vocab_index=index).backward()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)  # steadier than wall time on a shared machine
    return {"mode": mode, "rows_scored": rows if index is None else vocab.new_size, "tokens": tokens,
            "hidden": hidden, "dtype": str(dtype), "seconds_median": statistics.median(seconds[1:]),
            "cpu_seconds_median": statistics.median(cpu_seconds[1:]), "peak_bytes": peak_bytes("cpu") - baseline}


def measure_prune(src: Path, dst: Path) -> dict:
    from qforge.engine.vocab import VocabMap
    from qforge.engine.vocab_prune import prune_checkpoint

    start = time.perf_counter()
    vocab = VocabMap.from_tokenizer(qwen3_tokenizer_dir(), QWEN3_ROWS)
    prune_checkpoint(src, dst, vocab, qwen3_tokenizer_dir())
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_bytes("cpu"),
            "bytes_before": size(src), "bytes_after": size(dst), "kept_tokens": vocab.new_size}


def run(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def non_vocab_params(hidden, layers, intermediate, heads, kv_heads, head_dim, **_) -> int:
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads) + 2 * head_dim
    return layers * (attention + 3 * hidden * intermediate + 2 * hidden) + hidden


@pytest.mark.parametrize("tokens", [256, pytest.param(2048, marks=pytest.mark.large)])
def test_loss_full_vs_kept_vocabulary(benchmark, tokens):
    shape = ("--tokens", str(tokens), "--hidden", "4096")
    full = run("loss", *shape, "--mode", "full")
    restricted = run("loss", *shape, "--mode", "vocab_index")
    pruned = benchmark.pedantic(run, args=("loss", *shape, "--mode", "pruned"), rounds=1, iterations=1)
    ratios = {f"{case['mode']}_over_full": {key: case[key] / full[key]
                                             for key in ("seconds_median", "cpu_seconds_median", "peak_bytes")}
              for case in (restricted, pruned)}
    benchmark.extra_info.update(full=full, vocab_index=restricted, pruned=pruned, **ratios)
    print(json.dumps({"full": full, "vocab_index": restricted, "pruned": pruned, **ratios}, indent=2))
    assert restricted["rows_scored"] == pruned["rows_scored"] < 0.8 * full["rows_scored"]


def test_pruned_checkpoint_size(benchmark, tmp_path):
    """Measured on a checkpoint holding Qwen3-8B's embedding and output head (bf16, untied); the other
    weights are untouched by pruning, so the whole-model figure adds their size from the architecture."""
    from safetensors.torch import save_file

    hidden = QWEN3_8B["hidden"]
    src = tmp_path / "qwen3-8b-vocab-rows"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"vocab_size": QWEN3_ROWS, "hidden_size": hidden}))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        shard = {name: torch.empty(QWEN3_ROWS, hidden, dtype=torch.bfloat16).normal_(0, 0.02)}
        save_file(shard, src / f"{name.split('.')[-2]}.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "embed_tokens.safetensors",
                                            "lm_head.weight": "lm_head.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    result = benchmark.pedantic(run, args=("prune", str(src), str(tmp_path / "pruned")), rounds=1, iterations=1)
    rest = non_vocab_params(**QWEN3_8B) * 2  # bf16 bytes of every other weight
    result.update(model_bytes_before=result["bytes_before"] + rest, model_bytes_after=result["bytes_after"] + rest)
    result["model_size_ratio"] = result["model_bytes_after"] / result["model_bytes_before"]
    benchmark.extra_info.update(result)
    print(json.dumps(result, indent=2))
    assert result["bytes_after"] < result["bytes_before"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    loss = commands.add_parser("loss")
    loss.add_argument("--tokens", type=int, required=True)
    loss.add_argument("--hidden", type=int, required=True)
    loss.add_argument("--mode", choices=("full", "vocab_index", "pruned"), default="full",
                      help="all rows, the kept (CJK-free) rows of the full head, or a pruned head")
    loss.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    loss.add_argument("--repeats", type=int, default=2)
    prune = commands.add_parser("prune")
    prune.add_argument("src", type=Path)
    prune.add_argument("dst", type=Path)
    args = parser.parse_args()
    if args.command == "loss":
        result = measure_loss(args.tokens, args.hidden, args.mode, getattr(torch, args.dtype), args.repeats)
    else:
        result = measure_prune(args.src, args.dst)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
