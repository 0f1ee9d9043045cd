"""Multiple-choice evaluation (VMLU format): accuracy overall, per category and per subject.

    python recipes/eval.py --config recipes/configs/eval.yaml model.path=CKPT data.path=FILE.jsonl \
        output.dir=runs/eval eval.mode=official|loglik|think

Modes:
- official: VMLU's zero-shot prompt, one greedy token, compared with the gold letter as VMLU's script does.
- loglik: the most likely option letter after the same prompt, among the question's valid letters only.
  Each letter is scored as the token the tokenizer really produces after the prompt (" A" after "là:").
- think: the prompt as a chat turn with thinking on; the letter is read after `</think>` (none → wrong).
`eval.chat_template=true` wraps the official/loglik prompt in the chat template (thinking off) for instruct
models. With `model.base_url` + `model.model` instead of `model.path`, official and think modes query an
OpenAI-compatible endpoint. Writes report.json, report.md, report.png and predictions.jsonl to `output.dir`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from qforge.engine.chat import ChatModel, read_token_ids
from qforge.engine.client import ClientSettings
from qforge.engine.generate import next_token_logits
from qforge.engine.thinking import join_think
from qforge.engine.serve import EndpointSettings, open_endpoint
from qforge.recipes.cli import OutputSettings, run_from_argv
from qforge.recipes.files import write_jsonl
from qforge.recipes.mcq import (DEFAULT_SUBJECTS, Question, answer_after_thinking, official_prompt, read_questions,
                                read_subjects, score)
from qforge.recipes.report import write_eval_report


@dataclass
class ModelSettings(EndpointSettings):
    """A local checkpoint (`path`, every mode) or an endpoint (`base_url` + `model`: official, think)."""

    name: str | None = None  # label in reports (default: the checkpoint directory name or the model id)


@dataclass
class DataSettings:
    path: str | None = None
    subjects: str = str(DEFAULT_SUBJECTS)  # CSV: id prefix, subject, category
    name: str | None = None  # benchmark name in reports (default: the file name without extension)
    limit: int | None = None  # first N questions only


@dataclass
class EvalSettings:
    mode: Literal["official", "loglik", "think"] = "official"
    chat_template: bool = False
    batch_size: int = 8
    max_new_tokens: int = 2048  # think mode
    request_params: dict = field(default_factory=dict)  # extra body fields for an endpoint


@dataclass
class EvalConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    client: ClientSettings = field(default_factory=ClientSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    def __post_init__(self):
        self.model.check("model")
        if self.model.base_url and self.eval.mode == "loglik":
            raise ValueError("eval.mode=loglik needs next-token logits: use model.path, not model.base_url")
        for key, value in (("data.path", self.data.path), ("output.dir", self.output.dir)):
            if not value:
                raise ValueError(f"{key} is required (e.g. {key}=...)")
        if self.eval.batch_size < 1 or self.eval.max_new_tokens < 1:
            raise ValueError("eval.batch_size and eval.max_new_tokens must be >= 1")


def letter_tokens(chat_model: ChatModel, prompt: str, question: Question) -> tuple[list[int], dict[str, int]]:
    """The context ids and, per option letter, the single token that follows the prompt text.

    Tokenising `prompt + letter` tells whether the letter merges with the prompt's trailing space; the
    context is everything before that token and must be the same for every letter.
    """
    context, ids = None, {}
    for letter in question.letters:
        full = chat_model.encode(prompt + letter)
        if context is None:
            context = full[:-1]
        if full[:-1] != context or chat_model.tokenizer.decode([full[-1]]).strip() != letter:
            raise ValueError(f"question {question.id}: option {letter!r} is not a single token after the prompt; "
                             f"loglik scoring cannot compare the options fairly")
        ids[letter] = full[-1]
    return context, ids


def predict_loglik(chat_model: ChatModel, questions: list[Question], prompts: list[str], batch_size: int):
    predictions, details = {}, {}
    for start in tqdm(range(0, len(questions), batch_size), desc="loglik", unit="batch"):
        batch = list(zip(questions[start:start + batch_size], prompts[start:start + batch_size]))
        scored = [letter_tokens(chat_model, prompt, question) for question, prompt in batch]
        logprobs = next_token_logits(chat_model.model, [context for context, _ in scored]).log_softmax(-1)
        for row, ((question, _), (_, ids)) in enumerate(zip(batch, scored)):
            scores = {letter: float(logprobs[row, token]) for letter, token in ids.items()}
            predictions[question.id] = max(scores, key=scores.get)
            details[question.id] = {"scores": scores}
    return predictions, details


def predict_local(config: EvalConfig, questions: list[Question]):
    settings = config.eval
    suppress = read_token_ids(config.model.suppress_ids) if config.model.suppress_ids else ()
    chat_model = ChatModel.load(config.model.path, dtype=config.model.dtype, device=config.model.device,
                                suppress_ids=suppress, batch_size=settings.batch_size)
    prompts = [official_prompt(q) for q in questions]
    if settings.mode == "think":
        prompts = [chat_model.render([{"role": "user", "content": p.rstrip()}], enable_thinking=True) for p in prompts]
    elif settings.chat_template:
        prompts = [chat_model.render([{"role": "user", "content": p.rstrip()}], enable_thinking=False)
                   for p in prompts]
    if settings.mode == "loglik":
        return predict_loglik(chat_model, questions, prompts, settings.batch_size)
    new_tokens = 1 if settings.mode == "official" else settings.max_new_tokens
    completions = chat_model.complete(prompts, max_new_tokens=new_tokens, progress=True)
    texts = [c.text for c in completions]
    return _predictions_from_texts(settings.mode, questions, texts)


def predict_endpoint(config: EvalConfig, questions: list[Question]):
    settings = config.eval
    conversations = [[{"role": "user", "content": official_prompt(q).rstrip()}] for q in questions]
    new_tokens = 1 if settings.mode == "official" else settings.max_new_tokens
    with open_endpoint(config.model, params=settings.request_params, **asdict(config.client)) as client:
        replies = client.chat_many(conversations, temperature=0.0, max_tokens=new_tokens, desc=settings.mode)
    # An endpoint may return reasoning separately (then content is the answer) or inline in content.
    texts = [join_think(r.reasoning_content, r.content) for r in replies] if settings.mode == "think" else [r.content for r in replies]
    return _predictions_from_texts(settings.mode, questions, texts)


def _predictions_from_texts(mode: str, questions: list[Question], texts: list[str]):
    predictions, details = {}, {}
    for question, text in zip(questions, texts):
        if mode == "official":  # VMLU's check: the generated token, stripped, equals the gold letter
            predictions[question.id] = text.strip() if text.strip() else None
        else:
            predictions[question.id] = answer_after_thinking(text, question.letters)
        details[question.id] = {"output": text}
    return predictions, details


def run(config: EvalConfig) -> dict:
    """Evaluates, writes the reports and predictions, and returns the report dict."""
    questions = read_questions(config.data.path, read_subjects(config.data.subjects))
    if config.data.limit is not None:
        questions = questions[:config.data.limit]
    predict = predict_local if config.model.path else predict_endpoint
    predictions, details = predict(config, questions)
    report = {
        "model": config.model.name or config.model.model or Path(config.model.path).name,
        "benchmark": config.data.name or Path(config.data.path).stem,
        "mode": config.eval.mode,
        "data": str(config.data.path),
        **score(questions, predictions),
        "config": asdict(config),
    }
    out = Path(config.output.dir)
    write_jsonl(out / "predictions.jsonl", [
        {"id": q.id, "pred": predictions[q.id], "gold": q.answer, "correct": predictions[q.id] == q.answer,
         "subject": q.subject, "category": q.category, **details[q.id]} for q in questions])
    write_eval_report(out, report)
    return report


def main(argv: list[str] | None = None) -> None:
    config, report = run_from_argv(EvalConfig, run, argv, __doc__.split("\n\n")[0], "eval.mode=loglik")
    overall = report["overall"]
    print(f"{report['benchmark']} [{report['mode']}] {report['model']}: accuracy {100 * overall['accuracy']:.2f}% "
          f"({overall['correct']}/{overall['total']}) → {Path(config.output.dir) / 'report.json'}")


if __name__ == "__main__":
    main()
