"""Before/after evaluation of a fine-tuning run (the fft recipe's `evaluate:` section): held-out loss and greedy
exact-match accuracy.

Rows of `evaluate.data` are chat conversations whose last message is the reference assistant answer and whose
top-level `answer` is the checkable final result (e.g. the demo's Vietnamese arithmetic problems). The model
answers each prompt greedily with the engine's KV-cache generation; the number after the last "Đáp án:" must
equal `answer`. When training restricts the output vocabulary, the loss is over the kept rows and generation
suppresses every other token, so both numbers measure the model that training shapes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qforge.engine import load_model
from qforge.engine.serve.chat import ChatModel
from qforge.engine.config_io import settings
from qforge.engine.data import ChatTemplate, pack
from qforge.engine.data.cache import load_examples
from qforge.engine.thinking import split_think
from qforge.engine.train import evaluate_loss
from qforge.engine.train.build import build_model, resolve_tokenizer_dir
from qforge.engine.train.config import cache_dir_of
from qforge.engine.train.parallel import Dist
from qforge.engine.vocab import VocabMap
from qforge.recipes.common.files import read_jsonl, write_json
from qforge.recipes.evals.exact_match import exact_match
from qforge.recipes.make_demo_data import extract_answer

if TYPE_CHECKING:
    from qforge.recipes.fft import FFTRecipeConfig


@settings
class BeforeAfterSettings:
    """The `evaluate:` section: greedy exact-match evaluation before and after training (rows with an `answer`)."""
    data: str | None = None
    max_new_tokens: int = 96
    enable_thinking: bool = True


def _read_rows(path: str) -> list[dict]:
    rows = []
    for where, row in read_jsonl(path):
        if "answer" not in row or "messages" not in row:
            raise ValueError(f"{where}: evaluate.data rows need 'messages' and a checkable 'answer'")
        rows.append(row)
    return rows


def evaluate_checkpoint(config: FFTRecipeConfig, trained: bool, batch_size: int = 32) -> dict:
    """Scores the run's starting model (trained=False) or its reloaded `output.dir/final` (trained=True), both
    with the kept vocabulary saved in `final/` (called after training) and the run's loss weighting."""
    tokenizer_dir = resolve_tokenizer_dir(config.model)
    template = ChatTemplate.from_pretrained(tokenizer_dir)
    final = Path(config.output.dir) / "final"
    data = dataclasses.replace(config.data, enable_thinking=config.evaluate.enable_thinking)
    held_out, _ = load_examples([config.evaluate.data], template, data, cache_dir=cache_dir_of(config),
                                progress=False)
    if trained:
        model = load_model(final, dtype=torch.float32)
    else:
        model = build_model(config.model, torch.float32, torch.device("cpu"))
    vocab = VocabMap.of_model(final)
    batches = pack(held_out, data.max_tokens, seed=0, overlong=data.overlong, loss_weighting=data.loss_weighting,
                   vocab=vocab)
    loss = evaluate_loss(model, batches, Dist(), vocab)
    chat_model = ChatModel(model, template, suppress_ids=vocab.suppress_tokens if vocab else (), batch_size=batch_size)
    scored = exact_match(chat_model, _read_rows(config.evaluate.data), extract=_final_answer,
                         max_new_tokens=config.evaluate.max_new_tokens, enable_thinking=config.evaluate.enable_thinking,
                         progress=config.output.progress)
    return {"model": "trained" if trained else "initial", "held_out_loss": loss, "exact_match": scored.accuracy,
            "num_questions": scored.total, "samples": scored.predictions[:3]}


def _final_answer(text: str) -> str | None:
    """The number after the last 'Đáp án:' of the answer (reasoning excluded)."""
    return extract_answer(split_think(text)[1])


def print_before_after(before: dict, after: dict, out_path: str | Path) -> None:
    print("\n=== evaluation on held-out problems ===")
    print(f"{'':24s}{'before':>12s}{'after':>12s}")
    print(f"{'held-out loss':24s}{before['held_out_loss']:12.4f}{after['held_out_loss']:12.4f}")
    print(f"{'exact-match accuracy':24s}{before['exact_match']:12.1%}{after['exact_match']:12.1%}")
    print(f"({after['num_questions']} questions, greedy decoding)")
    for sample in after["samples"][:2]:
        print(f"\nmodel: {sample['text'].strip()}\ngold: {sample['gold']}")
    write_json(out_path, {"before": before, "after": after})
