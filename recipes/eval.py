"""Multiple-choice evaluation (VMLU format): accuracy overall, per category and per subject.

    python recipes/eval.py --config recipes/configs/eval.yaml model.path=CKPT data.path=FILE.jsonl \
        output.dir=runs/eval eval.mode=official|loglik|think

Modes:
- official: VMLU's zero-shot prompt, one greedy token, compared with the gold letter as VMLU's script does; a
  token that is not one of the question's letters (a digit, a word) counts wrong and as unparseable.
- loglik: the most likely option letter after the same prompt, among the question's valid letters only.
  Each letter is scored as the token the tokenizer really produces after the prompt (" A" after "là:").
- think: the prompt as a chat turn with thinking on, *sampled* (Qwen3's model card advises against greedy
  decoding in thinking mode); the letter is read after `</think>`. A reply cut by the token budget
  (unfinished reasoning) or without a readable letter counts wrong, and both are counted in the report.
`eval.chat_template=true` wraps the official/loglik prompt in the chat template (thinking off) for instruct
models. With `model.base_url` + `model.model` instead of `model.path`, official and think modes query an
OpenAI-compatible endpoint (qforge's server, vLLM, a hosted API) with the same sampling settings.

Sampling: `eval.temperature/top_p/top_k/presence_penalty/seed`, unset = the mode's default: think → Qwen3's
thinking settings (0.6 / 0.95 / 20); official with `eval.samples > 1` → Qwen3's non-thinking settings
(0.7 / 0.8 / 20); official with one sample → greedy, as VMLU's script; loglik is deterministic.
`eval.samples: k` draws k answers per question: the report gives the mean accuracy over all k × n answers with
a 95% bootstrap interval over questions, and the predictions are each question's majority letter.
`eval.max_new_tokens: null` (think mode's default) lets a reply run up to the model's context length.
Writes report.json, report.md, report.png, predictions.jsonl and submission.csv (`id,answer`, the form VMLU's
leaderboard takes for its answer-less test split) to `output.dir`.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from qforge.engine.serve.chat import ChatModel
from qforge.engine.config_io import settings
from qforge.engine.generate import next_token_logits
from qforge.engine.thinking import join_think
from qforge.engine.vocab import read_suppress_ids
from qforge.recipes.common.cli import OutputDirSettings, run_recipe
from qforge.recipes.common.endpoint import ClientSettings, EndpointSettings, open_endpoint
from qforge.recipes.common.files import write_json, write_jsonl
from qforge.recipes.evals.mcq import (DEFAULT_SUBJECTS, Question, answer_after_thinking, majority, official_prompt,
                                read_questions, read_subjects, score, score_samples, write_submission)
from qforge.recipes.report import write_eval_report


@settings
class EvalModelSettings(EndpointSettings):
    """A local checkpoint (`path`, every mode) or an endpoint (`base_url` + `model`: official, think)."""

    name: str | None = None  # label in reports (default: the checkpoint directory name or the model id)


@settings
class EvalDataSettings:
    path: str | None = None
    subjects: str = str(DEFAULT_SUBJECTS)  # CSV: id prefix, subject, category
    name: str | None = None  # benchmark name in reports (default: the file name without extension)
    limit: int | None = None  # first N questions only


# Qwen3's recommended decoding (model card, "Best Practices"): thinking mode must not decode greedily.
THINKING_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
NON_THINKING_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}


@settings
class EvalSettings:
    mode: Literal["official", "loglik", "think"] = "official"
    chat_template: bool = False
    batch_size: int = 8
    max_new_tokens: int | None = None  # think mode; null = up to the model's context length
    samples: int = 1  # k answers per question (sampled)
    temperature: float | None = None  # null = the mode's default (see the module docstring)
    top_p: float | None = None
    top_k: int | None = None  # 0 = off (then not sent to an endpoint)
    presence_penalty: float = 0.0
    seed: int | None = 0  # sample i uses seed + i (local engine; sent to endpoints that honour it)
    request_params: dict = field(default_factory=dict)  # extra body fields for an endpoint

    def sampling(self) -> dict:
        """The decoding settings this run uses: the mode's defaults, overridden by the keys that are set."""
        if self.mode == "think":
            base = THINKING_SAMPLING
        else:
            base = NON_THINKING_SAMPLING if self.samples > 1 else GREEDY
        chosen = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return {**base, **{k: v for k, v in chosen.items() if v is not None}, "presence_penalty": self.presence_penalty}


@settings
class EvalConfig:
    model: EvalModelSettings = field(default_factory=EvalModelSettings)
    data: EvalDataSettings = field(default_factory=EvalDataSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    client: ClientSettings = field(default_factory=ClientSettings)
    output: OutputDirSettings = field(default_factory=OutputDirSettings)

    def __post_init__(self):
        self.model.check("model")
        if self.model.base_url and self.eval.mode == "loglik":
            raise ValueError("eval.mode=loglik needs next-token logits: use model.path, not model.base_url")
        for key, value in (("data.path", self.data.path), ("output.dir", self.output.dir)):
            if not value:
                raise ValueError(f"{key} is required (e.g. {key}=...)")
        if self.eval.batch_size < 1 or self.eval.samples < 1 or (self.eval.max_new_tokens or 1) < 1:
            raise ValueError("eval.batch_size, eval.samples and eval.max_new_tokens must be >= 1")
        if self.eval.mode == "loglik" and self.eval.samples > 1:
            raise ValueError("eval.mode=loglik is deterministic: eval.samples must be 1")
        if self.eval.mode == "think" and self.eval.sampling()["temperature"] == 0 and self.eval.samples > 1:
            raise ValueError("eval.samples > 1 with eval.temperature=0 repeats one greedy answer; raise the temperature")


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


def load_chat_model(config: EvalConfig) -> ChatModel:
    suppress = read_suppress_ids(config.model.suppress_ids) if config.model.suppress_ids else ()
    return ChatModel.load(config.model.path, dtype=config.model.dtype, device=config.model.device,
                          suppress_ids=suppress, batch_size=config.eval.batch_size)


def predict_local(config: EvalConfig, questions: list[Question], chat_model: ChatModel):
    settings = config.eval
    prompts = [official_prompt(q) for q in questions]
    if settings.mode == "think":
        prompts = [chat_model.render([{"role": "user", "content": p.rstrip()}], enable_thinking=True) for p in prompts]
    elif settings.chat_template:
        prompts = [chat_model.render([{"role": "user", "content": p.rstrip()}], enable_thinking=False)
                   for p in prompts]
    if settings.mode == "loglik":
        predictions, details = predict_loglik(chat_model, questions, prompts, settings.batch_size)
        return [predictions], details
    if settings.mode == "official":
        new_tokens = 1
    else:  # the budget: what is left of the context after the longest prompt, unless set lower
        context = chat_model.model.config.max_position_embeddings  # the model's context length
        room = context - max(len(chat_model.encode(p)) for p in prompts)
        new_tokens = max(1, min(settings.max_new_tokens or room, room))
    sampling = settings.sampling()
    replies = []
    for sample in range(settings.samples):
        seed = None if settings.seed is None else settings.seed + sample
        completions = chat_model.complete(prompts, max_new_tokens=new_tokens, progress=True, seed=seed, **sampling)
        replies.append([(c.text, c.finish_reason) for c in completions])
    return _predictions_from_replies(settings.mode, questions, replies)


def predict_endpoint(config: EvalConfig, questions: list[Question]):
    settings = config.eval
    conversations = [[{"role": "user", "content": official_prompt(q).rstrip()}] for q in questions]
    params = {k: v for k, v in settings.sampling().items() if v or k == "temperature"}  # top_k 0 / no penalty: unsent
    if settings.mode == "official":
        params["max_tokens"] = 1
    elif settings.max_new_tokens:  # unset: the server's own limit (vLLM: the rest of the context)
        params["max_tokens"] = settings.max_new_tokens
    replies = []
    with open_endpoint(config.model, params=settings.request_params, **asdict(config.client)) as client:
        for sample in range(settings.samples):
            seed = {} if settings.seed is None else {"seed": settings.seed + sample}
            answers = client.chat_many(conversations, cache_tags=[f"sample{sample}"] * len(conversations),
                                       desc=f"{settings.mode} {sample + 1}/{settings.samples}", **params, **seed)
            # An endpoint may return reasoning separately (then content is the answer) or inline in content.
            if settings.mode == "think":
                replies.append([(r.content if r.reasoning_content is None else join_think(r.reasoning_content, r.content),
                                 r.finish_reason) for r in answers])
            else:
                replies.append([(r.content, r.finish_reason) for r in answers])
    return _predictions_from_replies(settings.mode, questions, replies)


def _predictions_from_replies(mode: str, questions: list[Question], replies: list[list[tuple[str, str | None]]]):
    """Per sample, each question's letter (None: nothing readable), plus per question its outputs and whether
    each reply was unfinished (cut by the token budget) or unparseable (finished, but no letter)."""
    samples, details = [], {q.id: {"outputs": [], "unfinished": 0, "unparseable": 0} for q in questions}
    for sample in replies:
        letters = {}
        for question, (text, finish_reason) in zip(questions, sample):
            if mode == "official":  # VMLU's check: the generated token, stripped, equals the gold letter;
                letter = text.strip()  # anything but one of the question's letters (a digit, "") is unparseable
                letter = letter if letter in set(question.letters) else None
            else:
                letter = answer_after_thinking(text, question.letters)
            detail = details[question.id]
            detail["outputs"].append(text)
            if letter is None and finish_reason == "length":
                detail["unfinished"] += 1
            elif letter is None:
                detail["unparseable"] += 1
            letters[question.id] = letter
        samples.append(letters)
    return samples, details


def run(config: EvalConfig, chat_model: ChatModel | None = None) -> dict:
    """Evaluates, writes the reports, predictions and submission CSV, and returns the report dict. A given
    `chat_model` (e.g. the weights being trained) is evaluated instead of loading `model.path`."""
    questions = read_questions(config.data.path, read_subjects(config.data.subjects))
    if config.data.limit is not None:
        questions = questions[:config.data.limit]
    if chat_model is not None or config.model.path:
        samples, details = predict_local(config, questions, chat_model or load_chat_model(config))
    else:
        samples, details = predict_endpoint(config, questions)
    predictions = {q.id: majority([sample[q.id] for sample in samples]) for q in questions}
    out = Path(config.output.dir)
    write_submission(out / "submission.csv", questions, predictions)
    report = {
        "model": config.model.name or config.model.model or Path(config.model.path).name,
        "benchmark": config.data.name or Path(config.data.path).stem,
        "mode": config.eval.mode,
        "data": str(config.data.path),
        "sampling": config.eval.sampling() if config.eval.mode != "loglik" else None,
        "unfinished": sum(d.get("unfinished", 0) for d in details.values()),
        "unparseable": sum(d.get("unparseable", 0) for d in details.values()),
        "answers": len(samples) * len(questions),
        "config": asdict(config),
    }
    labelled = questions[0].answer is not None
    if labelled:
        report.update(score(questions, predictions))
        report["sampled"] = score_samples(questions, samples)
    write_jsonl(out / "predictions.jsonl", [
        {"id": q.id, "pred": predictions[q.id], "gold": q.answer, "correct": labelled and predictions[q.id] == q.answer,
         "subject": q.subject, "category": q.category, "samples": [s[q.id] for s in samples], **details[q.id]}
        for q in questions])
    if labelled:
        write_eval_report(out, report)
    else:  # a test split: the leaderboard scores submission.csv
        write_json(out / "report.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    return run_recipe(EvalConfig, run, argv, __doc__.split("\n\n")[0], "eval.mode=loglik", report=_print_summary)


def _print_summary(config: EvalConfig, report: dict) -> None:
    out = Path(config.output.dir)
    counts = f"unfinished {report['unfinished']}, unparseable {report['unparseable']} of {report['answers']} answers"
    if "overall" not in report:
        print(f"{report['benchmark']}: no gold answers (a test split); {counts} → {out / 'submission.csv'}")
        return
    overall, sampled = report["overall"], report["sampled"]
    line = f"accuracy {100 * overall['accuracy']:.2f}% ({overall['correct']}/{overall['total']})"
    if sampled["samples"] > 1:
        low, high = sampled["ci"]
        line = (f"mean accuracy over {sampled['samples']} samples {100 * sampled['mean_accuracy']:.2f}% "
                f"(95% CI {100 * low:.2f}–{100 * high:.2f}); majority vote {line}")
    print(f"{report['benchmark']} [{report['mode']}] {report['model']}: {line}; {counts} → {out / 'report.json'}")


if __name__ == "__main__":
    sys.exit(main())
