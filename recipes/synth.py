"""Synthetic SFT data: syllabus × tasks → questions → responses → reasoning in Qwen3's thinking style → filters.

    python recipes/synth.py --config recipes/configs/synth.yaml output.dir=runs/synth [key=value ...]

Starting points: the syllabus file (`syllabus`); or an outline (level → grade → subjects) whose topics an
LLM writes (`syllabus_outline`, stage `syllabus`, saved to output.dir/syllabus.yaml); or an existing question
set (`seeds.path`, e.g. crawled multiple-choice questions with answers), which skips question writing: only
the responses + reasoning are generated, and the known answer is the rejection-sampling check (the option
letter for multiple choice, the number for numeric answers). Tasks with `answer_check: constraints` get
verifiable constraints from the question writer and keep only responses meeting all of them (checked by
code). With `filters.min_quality`, an LLM rates every finished row 1–10 (stage `quality`) and rows below the
threshold are dropped. Answers are checked through the verifier registry (qforge.recipes.verifiers). With
`pairs.enabled`, kept rows (chosen) and responses that failed their verifier (rejected, their reasoning
reconstructed by the reasoning stage's prompt: stage `rejected_reasoning`) of one question become DPO pairs
(pairs.jsonl).

Or start from existing reasoning traces (`traces.path`, any SFT file; recipes/configs/reasoning-data.yaml): an
LLM rewrites each trace into a Qwen3 <think> block + the final answer its verifier reads (stage `reformat`,
kept only when the rewrite still passes against the original reference), length and repetition filters drop
looping traces, every row is verified (code by running its tests in a sandbox), passing rows become SFT data
and passing vs failing samples of one question become DPO pairs (pairs.jsonl). See docs/reasoning-data.md.

Each stage asks a backend (a local checkpoint served on 127.0.0.1 by default, or any OpenAI-compatible API)
through the caching client and stores its output under `output.dir/stages/`; a rerun skips finished stages
and answers repeated requests from the cache, so an interrupted run resumes. Writes data.jsonl (OpenAI
`messages` with `reasoning_content`, plus task, topic and provenance), drops.jsonl (every dropped row with
its reason), report.json and report.md (kept/dropped per task and reason; tokens and cost per stage).
"""
from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, field
from pathlib import Path

from qforge.engine.serve.client import ChatClient
from qforge.engine.thinking import split_think
from qforge.engine.data.render import tools_system_prompt
from qforge.recipes.evals import function_calling, instruction_following
from qforge.recipes.common.cli import OutputDirSettings, print_report_md, run_recipe
from qforge.recipes.common.endpoint import ClientSettings, EndpointSettings, open_endpoint, response_cache_dir
from qforge.recipes.common.files import read_jsonl, write_json, write_jsonl, write_text
from qforge.recipes.evals.mcq import DEFAULT_SUBJECTS, read_questions, read_subjects
from qforge.recipes.sft_data.answers import numbers_in, reasoning_consistent, rejection_sample
from qforge.recipes.evals.verdicts import parse_rating
from qforge.recipes.sft_data.dedup import Deduplicator
from qforge.recipes.sft_data.filters import (Malformed, TextRules, parse_question_list, parse_text_reply,
                                              strip_code_fence)
from qforge.recipes.sft_data.report import count_by_task, counts_markdown
from qforge.recipes.sft_data.stages import (StageResult, StageStore, Usage, ask_all, check_placeholders,
                                             conversation, fingerprint)
from qforge.recipes.sft_data.syllabus import Task, Topic, jobs, read_syllabus, read_tasks
from qforge.recipes.sft_data.traces import (TraceLength, assistant_message, make_pairs, pair_counts, pair_row,
                                            pair_up, pairs_markdown, pass_rates, read_traces, reference_of,
                                            repetition_ratio, traces_markdown, verdict_dict, verify_rows)
from qforge.recipes.verifiers import VERIFIERS, get_verifier
from qforge.engine.config_io import read_yaml, settings

TOPIC_FIELDS = {"level", "grade", "subject", "topic", "task", "instructions"}
STAGE_FIELDS = {"questions": TOPIC_FIELDS | {"count"}, "responses": TOPIC_FIELDS | {"question"},
                "reasoning": TOPIC_FIELDS | {"question", "response"},
                "quality": TOPIC_FIELDS | {"question", "response", "reasoning"},
                "syllabus": {"level", "grade", "subject", "count"},
                "reformat": {"question", "reasoning", "answer", "format", "verifier"}}
FAILED = {"wrong_answer": "fail", "no_final_answer": "unparseable"}  # rejection_sample's reasons → verdict status
ANSWER_FORMATS = {  # what reformat.user's {format} asks for, per verifier: the form that verifier reads
    "math": "End with the final answer as \\boxed{...}.",
    "numeric": "End with the final answer as \\boxed{...}.",
    "code": "End with the complete Python program in one ```python fenced code block (reading stdin and writing "
            "stdout, or defining the function the problem names).",
    "choice": "End with a line 'Answer: X' where X is the option letter.",
}


def matcher(check: str):
    """rejection_sample's match function for an answer_check, through the verifier registry: True/False, or
    None when the response has no answer in the form the verifier reads."""
    verifier = get_verifier(check)

    def matches(response: str, reference_answer: str) -> bool | None:
        verdict = verifier(response, reference_of(check, reference_answer))
        return None if verdict.status == "unparseable" else verdict.passed

    return matches


@settings
class BackendSettings:
    name: str
    endpoint: EndpointSettings = field(default_factory=EndpointSettings)
    params: dict = field(default_factory=dict)  # default body fields: temperature, chat_template_kwargs, ...
    price_per_million: dict = field(default_factory=dict)  # {"prompt": USD, "completion": USD} per 1M tokens
    cache_namespace: str | None = None  # cache key instead of the URL or checkpoint (e.g. for a moving port)

    def __post_init__(self):
        self.endpoint.check(f"backends[{self.name}].endpoint")
        unknown = set(self.price_per_million) - {"prompt", "completion"}
        if unknown:
            raise ValueError(f"backends[{self.name}].price_per_million: unknown keys {sorted(unknown)}; "
                             "use prompt and completion (USD per million tokens)")


@settings
class StageSettings:
    backend: str = "local"
    prompt_version: str = "v1"  # recorded in every row's provenance; bump it when the prompts change
    system: str = ""
    user: str = ""
    retry: str = ""  # sent after a malformed reply ({error} says what was wrong); empty: just sample again
    retries: int = 2
    max_tokens: int = 2048
    params: dict = field(default_factory=dict)  # body fields over the backend's, e.g. temperature


@settings
class Stages:
    questions: StageSettings = field(default_factory=StageSettings)
    responses: StageSettings = field(default_factory=StageSettings)
    reasoning: StageSettings = field(default_factory=StageSettings)
    quality: StageSettings = field(default_factory=StageSettings)  # with filters.min_quality
    syllabus: StageSettings = field(default_factory=StageSettings)  # with syllabus_outline
    reformat: StageSettings = field(default_factory=StageSettings)  # with traces.path and reformat.enabled


@settings
class SeedSettings:
    """An existing question set to answer instead of writing questions: JSONL rows in VMLU's multiple-choice
    format (`id`, `question`, `choices`, `answer`: checked by option letter) or free-form (`id`, `question`,
    optional `answer`: checked as a number when the task's answer_check is numeric). Optional `level`, `grade`,
    `subject`, `topic` fields fill the prompts' placeholders."""
    path: str | None = None
    task: str = "multiple_choice"  # the task (of the task list) whose instructions, samples and keep apply
    subjects: str = str(DEFAULT_SUBJECTS)  # VMLU's id prefix → subject table
    limit: int | None = None


@settings
class TraceSettings:
    """Existing reasoning traces (any SFT file whose rows end with the assistant's reasoning and answer) to
    reformat, verify and pair instead of synthesising (recipes/sft_data/traces.py describes the row)."""
    path: str | None = None
    verifier: str | None = None  # for rows without a `verifier` (or `answer_check`) field
    limit: int | None = None
    workers: int = 2  # rows verified at a time (code: sandboxed processes in parallel)


@settings
class ReformatSettings:
    """An LLM (stages.reformat) rewrites each trace into a Qwen3 <think> block + the final answer in the form
    its verifier reads; a rewrite that fails the verifier against the original reference is replaced by the
    original row (keep) or dropped with it (drop)."""
    enabled: bool = True
    on_fail: str = "keep"  # keep | drop
    formats: dict = field(default_factory=lambda: dict(ANSWER_FORMATS))  # verifier -> {format} text

    def __post_init__(self):
        if self.on_fail not in ("keep", "drop"):
            raise ValueError(f"reformat.on_fail must be 'keep' or 'drop', got {self.on_fail!r}")


@settings
class PairSettings:
    """Preference pairs from k samples per question: a passing one (chosen) and a failing one (rejected). In
    synthesis, chosen = a kept row, rejected = a response that failed its verifier in rejection sampling, whose
    reasoning the reasoning stage reconstructs too (stage rejected_reasoning, only for samples in a pair)."""
    enabled: bool = False
    per_question: int = 1  # at most this many pairs per question

    def __post_init__(self):
        if self.per_question < 1:
            raise ValueError(f"pairs.per_question must be at least 1, got {self.per_question}")


@settings
class Filters:
    question: TextRules = field(default_factory=lambda: TextRules(min_chars=10, max_chars=3000))
    response: TextRules = field(default_factory=lambda: TextRules(min_chars=1, max_chars=12000))
    reasoning: TextRules = field(default_factory=lambda: TextRules(min_chars=20, max_chars=24000, language="any"))
    near_duplicate_threshold: float | None = 0.7  # estimated Jaccard of word 3-gram sets; null: exact only
    min_quality: float | None = None  # LLM quality score (1–10, stage `quality`) a row needs; null: no rating
    check_reasoning_answer: bool = True  # the reasoning's conclusion must mention the response's final number
    # traces (traces.path): small-model traces loop, so a budget and a repetition bound
    max_trace_tokens: int | None = 16384  # trace length (reasoning) limit; null: none
    trace_tokenizer: str | None = None  # a local tokenizer to count trace tokens with; null: count words
    repetition_ngram: int = 8  # word n-grams the repetition ratio counts
    max_repetition: float | None = 0.5  # drop traces whose share of repeated n-grams is above this; null: none
    # reconstructed thinking must not give away that it was written knowing the answer (case-insensitive)
    reasoning_banned_phrases: list[str] = field(default_factory=lambda: [
        "given answer", "provided answer", "answer provided", "answer was given", "đáp án đã cho",
        "đáp án được cung cấp", "đáp án được cho"])

    def reasoning_problem(self, reasoning: str, response: str) -> str | None:
        """Why a reconstructed reasoning is dropped, or None."""
        problem = self.reasoning.check(reasoning, "reasoning")
        if problem:
            return problem
        lowered = reasoning.lower()
        if any(phrase.lower() in lowered for phrase in self.reasoning_banned_phrases):
            return "reasoning_leaks_answer"
        if self.check_reasoning_answer and not reasoning_consistent(reasoning, response):
            return "reasoning_answer_mismatch"
        return None


@settings
class SynthConfig:
    syllabus: str = "recipes/data/syllabus_vi.yaml"
    syllabus_outline: str | None = None  # level → grade → [subjects]: an LLM writes the topics (stage syllabus)
    topics_per_subject: int = 5  # with syllabus_outline
    seeds: SeedSettings = field(default_factory=SeedSettings)
    traces: TraceSettings = field(default_factory=TraceSettings)
    reformat: ReformatSettings = field(default_factory=ReformatSettings)
    pairs: PairSettings = field(default_factory=PairSettings)
    tasks: str = "recipes/data/tasks_vi.yaml"
    topics_per_task: int | None = None  # only each task's first N topics (smoke runs)
    backends: list[BackendSettings] = field(default_factory=list)
    stages: Stages = field(default_factory=Stages)
    filters: Filters = field(default_factory=Filters)
    client: ClientSettings = field(default_factory=ClientSettings)  # cache_dir default: output.dir/cache
    output: OutputDirSettings = field(default_factory=OutputDirSettings)

    def __post_init__(self):
        if not self.output.dir:
            raise ValueError("output.dir is required")
        names = [b.name for b in self.backends]
        if self.seeds.path is not None and not Path(self.seeds.path).is_file():
            raise ValueError(f"seeds.path: no such file {self.seeds.path!r}")
        if self.traces.path is not None and not Path(self.traces.path).is_file():
            raise ValueError(f"traces.path: no such file {self.traces.path!r}")
        if self.traces.verifier is not None:
            get_verifier(self.traces.verifier)
        for stage in self.used_stages():
            fields = STAGE_FIELDS[stage]
            settings = getattr(self.stages, stage)
            if settings.backend not in names:
                raise ValueError(f"stages.{stage}.backend {settings.backend!r} is not one of backends {names}")
            if not settings.user:
                raise ValueError(f"stages.{stage}.user (the prompt template) is required")
            for part in ("system", "user"):
                check_placeholders(getattr(settings, part), fields, f"stages.{stage}.{part}")
            check_placeholders(settings.retry, {"error"}, f"stages.{stage}.retry")

    def used_stages(self) -> list[str]:
        if self.traces.path:
            return ["reformat"] if self.reformat.enabled else []
        stages = ["syllabus"] if self.syllabus_outline and not self.seeds.path else []
        stages += [] if self.seeds.path else ["questions"]
        return stages + ["responses", "reasoning"] + (["quality"] if self.filters.min_quality is not None else [])


class Pipeline:
    """One run: the syllabus and tasks, a client per backend, and the stage store."""

    def __init__(self, config: SynthConfig, clients: dict[str, ChatClient]):
        self.config = config
        self.clients = clients
        self.tasks = {task.name: task for task in read_tasks(config.tasks)}
        self.store = StageStore(config.output.dir)
        self.pairs, self.topic_by_key = [], {}
        if config.seeds.path and config.seeds.task not in self.tasks:
            raise ValueError(f"seeds.task {config.seeds.task!r} is not in {config.tasks} ({sorted(self.tasks)})")

    def set_topics(self, topics: list[Topic]) -> None:
        self.pairs = [] if self.config.seeds.path else jobs(list(self.tasks.values()), topics,
                                                            self.config.topics_per_task)
        self.topic_by_key.update({topic.key: topic for topic in topics})

    def backend(self, stage: str) -> BackendSettings:
        name = getattr(self.config.stages, stage).backend
        return next(b for b in self.config.backends if b.name == name)

    def stage_key(self, stage: str, *inputs) -> str:
        backend = self.backend(stage)
        return fingerprint(stage, asdict(getattr(self.config.stages, stage)), asdict(backend.endpoint),
                           backend.params, *inputs)

    def ask(self, stage: str, prompt_fields: list[dict], tags: list[str], parse,
            tools: list | None = None) -> tuple[list, dict]:
        """`tools` (per conversation, or None) go into the system message as Qwen3's template writes them, so
        any backend sees the prompt a tool-calling request renders to."""
        settings, backend = getattr(self.config.stages, stage), self.backend(stage)
        conversations = [conversation(settings.system, settings.user, f) for f in prompt_fields]
        for messages, offered in zip(conversations, tools or []):
            if offered:
                system = messages[0]["content"] if messages[0]["role"] == "system" else None
                messages[:1 if system is not None else 0] = [
                    {"role": "system", "content": tools_system_prompt(offered, system)}]
        usage = Usage()
        answers = ask_all(self.clients[backend.name], conversations, tags, parse, retries=settings.retries,
                          retry_prompt=settings.retry, usage=usage, desc=stage,
                          params={**backend.params, "max_tokens": settings.max_tokens, **settings.params})
        summary = {**asdict(usage), "backend": backend.name, "model": self.clients[backend.name].model,
                   "cost": usage.cost(backend.price_per_million)}
        return answers, summary

    def provenance(self, stage: str, model: str) -> dict:
        return {"backend": self.backend(stage).name, "model": model,
                "prompt_version": getattr(self.config.stages, stage).prompt_version}

    # -- stage 0: topics per (level, grade, subject) from an outline --------------------------------------
    def syllabus(self) -> StageResult:
        outline = read_yaml(self.config.syllabus_outline)
        cells = []
        for level, grades in outline.items():
            for grade, subjects in (grades or {}).items():
                if not isinstance(subjects, list) or not subjects:
                    raise ValueError(f"{self.config.syllabus_outline}: {level} → {grade} must list subjects")
                cells += [{"level": str(level), "grade": str(grade), "subject": str(subject),
                           "count": self.config.topics_per_subject} for subject in subjects]

        def parse(i, reply):
            try:
                topics = json.loads(strip_code_fence(parse_text_reply(reply.content, reply.finish_reason)))
            except ValueError as error:
                raise Malformed(f"not JSON ({error})") from None
            if not isinstance(topics, list) or not topics or not all(isinstance(t, str) and t.strip() for t in topics):
                raise Malformed("expected a non-empty JSON list of topic strings")
            return [t.strip() for t in topics][:cells[i]["count"]]

        answers, usage = self.ask("syllabus", cells, [f"syllabus:{c['level']}:{c['grade']}:{c['subject']}"
                                                      for c in cells], parse)
        rows, drops = [], []
        for cell, answer in zip(cells, answers):
            where = f"{cell['level']} → {cell['grade']} → {cell['subject']}"
            if answer.value is None:
                drops.append({"stage": "syllabus", "id": where, "task": "", "reason": f"topics_{answer.reason}",
                              "detail": answer.detail, "items": 0})
            else:
                rows += [{"level": cell["level"], "grade": cell["grade"], "subject": cell["subject"], "topic": topic,
                          "provenance": self.provenance("syllabus", answer.model)} for topic in answer.value]
        return StageResult(rows, drops, usage)

    # -- stage 1 (seeds): an existing question set ---------------------------------------------------------
    def seed_questions(self) -> list[dict]:
        seeds, task = self.config.seeds, self.tasks[self.config.seeds.task]
        raw = [row for _, row in read_jsonl(seeds.path)][:seeds.limit]
        by_id = {str(row.get("id")): row for row in raw}
        if all("choices" in row for row in raw):
            questions = read_questions(seeds.path, read_subjects(seeds.subjects))[:seeds.limit]
            items = [(q.id, f"{q.question}\n" + "\n".join(q.choices), q.answer, "choice", q.subject)
                     for q in questions]
        else:
            items = []
            for index, row in enumerate(raw, start=1):
                if not isinstance(row.get("question"), str) or not row["question"].strip():
                    raise ValueError(f"{seeds.path}:{index}: 'question' must be a non-empty string")
                answer = None if row.get("answer") is None else str(row["answer"])
                check = task.answer_check if answer is not None and task.answer_check == "numeric" else "none"
                items.append((str(row.get("id", index)), row["question"].strip(), answer, check, row.get("subject")))
        rows = []
        for qid, question, answer, check, subject in items:
            row = by_id.get(qid, {})
            topic = Topic(str(row.get("level", "")), str(row.get("grade", "")), str(subject or row.get("subject", "")),
                          str(row.get("topic") or subject or ""))
            self.topic_by_key[topic.key] = topic
            rows.append({"id": f"seed-{qid}", "task": task.name, "topic_key": topic.key, "question": question,
                         "reference_answer": answer, "answer_check": check,
                         "provenance": {"seed": seeds.path, "id": qid}})
        return rows

    # -- stage 1: questions per (task, topic) ------------------------------------------------------------
    def questions(self) -> StageResult:
        pairs = self.pairs
        fields = [{**_topic_fields(task, topic), "count": task.count} for task, topic in pairs]

        def parse(i, reply):
            task = pairs[i][0]
            items = parse_question_list(parse_text_reply(reply.content, reply.finish_reason),
                                        task.answer_check == "numeric")
            if task.answer_check == "numeric" and not all(numbers_in(item["answer"]) for item in items):
                raise Malformed("every 'answer' must contain the final number")
            for k, item in enumerate(items):
                try:
                    if task.answer_check == "constraints":
                        instruction_following.validate_constraints(item.get("constraints"), f"item {k}")
                    elif task.answer_check == "tool_call":
                        function_calling.validate_tools(item.get("tools"), item.get("reference_calls"), f"item {k}")
                except ValueError as error:
                    raise Malformed(str(error)) from None
            return items[:task.count]  # extra questions were not asked for

        answers, usage = self.ask("questions", fields, [f"questions:{t.name}:{p.key}" for t, p in pairs], parse)
        rules, dedup = self.config.filters.question, Deduplicator(self.config.filters.near_duplicate_threshold)
        rows, drops = [], []
        for (task, topic), answer in zip(pairs, answers):
            job = f"{task.name}-{topic.key}"
            if answer.value is None:
                drops.append(_drop("questions", job, task, f"question_list_{answer.reason}", answer.detail,
                                   task.count * task.samples))
                continue
            if len(answer.value) < task.count:
                drops.append(_drop("questions", job, task, "question_list_short",
                                   f"{len(answer.value)} of {task.count} questions",
                                   (task.count - len(answer.value)) * task.samples))
            for k, item in enumerate(answer.value):
                reference = item["answer"]
                if task.answer_check == "constraints":
                    reference = json.dumps(item["constraints"], ensure_ascii=False)
                elif task.answer_check == "tool_call":
                    reference = json.dumps({"tools": item["tools"], "reference_calls": item["reference_calls"]},
                                           ensure_ascii=False)
                row = {"id": f"{job}-q{k}", "task": task.name, "topic_key": topic.key, "question": item["question"],
                       "reference_answer": reference, "answer_check": task.answer_check,
                       "provenance": self.provenance("questions", answer.model)}
                reason = rules.check(item["question"], "question")
                duplicate = None if reason else dedup.check(row["id"], item["question"])
                if reason or duplicate:
                    drops.append(_drop("questions", row["id"], task, reason or f"question_{duplicate[0]}",
                                       f"of {duplicate[1]}" if duplicate else "", task.samples))
                else:
                    rows.append(row)
        return StageResult(rows, drops, usage)

    # -- stage 2: responses (several samples per question for rejection sampling) --------------------------
    def responses(self, questions: list[dict]) -> StageResult:
        samples = [(q, j) for q in questions for j in range(self.tasks[q["task"]].samples)]
        fields = [{**self._fields(q), "question": q["question"]} for q, _ in samples]
        answers, usage = self.ask("responses", fields, [f"responses:{q['id']}:s{j}" for q, j in samples],
                                  lambda i, reply: parse_text_reply(reply.content, reply.finish_reason),
                                  [_offered_tools(q) for q, _ in samples])
        rules, dedup = self.config.filters.response, Deduplicator(self.config.filters.near_duplicate_threshold)
        by_question: dict[str, list] = {}
        for (question, j), answer in zip(samples, answers):
            by_question.setdefault(question["id"], []).append((question, j, answer))
        rows, drops = [], []
        for group in by_question.values():
            task = self.tasks[group[0][0]["task"]]
            valid = []
            for question, j, answer in group:
                sample_id = f"{question['id']}-s{j}"
                if answer.value is None:
                    reason = f"response_{answer.reason}"
                else:  # a tool call is JSON, not prose: the text rules look at the words around it
                    prose = _prose(answer.value) if task.answer_check == "tool_call" else answer.value
                    reason = rules.check(prose, "response") if prose else None
                if reason:
                    drops.append(_drop("responses", sample_id, task, reason, answer.detail))
                else:
                    valid.append((question, sample_id, answer))
            originals = {}  # sample -> the kept response it duplicates

            def refuse(index: int) -> str | None:
                duplicate = dedup.check(valid[index][1], valid[index][2].value)
                if duplicate:
                    originals[index] = duplicate[1]
                    return f"response_{duplicate[0]}"
                return None

            check = group[0][0].get("answer_check", task.answer_check)
            reference = group[0][0]["reference_answer"] if check in VERIFIERS else None
            matches = {} if reference is None else {"matches": matcher(check)}
            verdicts = rejection_sample([a.value for _, _, a in valid], reference, task.keep, refuse, **matches)
            for index, ((question, sample_id, answer), verdict) in enumerate(zip(valid, verdicts)):
                if not verdict.keep:
                    detail = f"of {originals[index]}" if index in originals else ""
                    drops.append(_drop("responses", sample_id, task, verdict.reason, detail))
                    if verdict.reason in FAILED:  # the rejected side of preference pairs
                        drops[-1].update(question_id=question["id"], response=answer.value)
                    continue
                provenance = {"questions": question["provenance"],
                              "responses": self.provenance("responses", answer.model)}
                rows.append({**question, "id": sample_id, "question_id": question["id"], "response": answer.value,
                             "provenance": provenance})
        return StageResult(rows, drops, usage)

    # -- stage 3: reasoning that leads to each kept response ----------------------------------------------
    def reasoning(self, responses: list[dict]) -> StageResult:
        fields = [{**self._fields(r), "question": r["question"], "response": r["response"]} for r in responses]
        answers, usage = self.ask("reasoning", fields, [f"reasoning:{r['id']}" for r in responses],
                                  lambda i, reply: parse_text_reply(reply.content, reply.finish_reason))
        rows, drops = [], []
        for row, answer in zip(responses, answers):
            if answer.value is None:
                drops.append(_drop("reasoning", row["id"], self.tasks[row["task"]], f"reasoning_{answer.reason}",
                                   answer.detail))
            else:
                provenance = {**row["provenance"], "reasoning": self.provenance("reasoning", answer.model)}
                rows.append({**row, "reasoning": answer.value, "provenance": provenance})
        return StageResult(rows, drops, usage)

    # -- stage 4: validate the complete rows ---------------------------------------------------------------
    def validate(self, rows: list[dict]) -> StageResult:
        kept, drops = [], []
        for row in rows:
            reason = self.config.filters.reasoning_problem(row["reasoning"], row["response"])
            if reason:
                drops.append(_drop("validate", row["id"], self.tasks[row["task"]], reason, ""))
            else:
                kept.append(row)
        return StageResult(kept, drops)

    # -- stage 5 (optional): an LLM's quality score, kept at or above filters.min_quality -----------------
    def quality(self, rows: list[dict]) -> StageResult:
        fields = [{**self._fields(r), "question": r["question"], "response": r["response"],
                   "reasoning": r["reasoning"]} for r in rows]

        def parse(i, reply):
            score = parse_rating(reply.content)
            if score is None:
                raise Malformed("no [[N]] rating")
            return score

        answers, usage = self.ask("quality", fields, [f"quality:{r['id']}" for r in rows], parse)
        kept, drops = [], []
        for row, answer in zip(rows, answers):
            task = self.tasks[row["task"]]
            if answer.value is None:
                drops.append(_drop("quality", row["id"], task, f"quality_{answer.reason}", answer.detail))
            elif answer.value < self.config.filters.min_quality:
                drops.append(_drop("quality", row["id"], task, "low_quality", f"score {answer.value:g}"))
            else:
                provenance = {**row["provenance"], "quality": self.provenance("quality", answer.model)}
                kept.append({**row, "quality": answer.value, "provenance": provenance})
        return StageResult(kept, drops, usage)

    def output_row(self, row: dict) -> dict:
        topic = self.topic_by_key[row["topic_key"]]
        assistant = {"role": "assistant", "content": row["response"], "reasoning_content": row["reasoning"]}
        tools = _offered_tools(row)
        if tools:  # the calls as structured tool_calls, which the Qwen3 template renders back to the same text
            assistant["content"] = row["response"].split("<tool_call>")[0].strip()
            assistant["tool_calls"] = [{"type": "function", "function": call}
                                       for call in function_calling.parse_calls(row["response"])]
        return {"id": row["id"], "messages": [{"role": "user", "content": row["question"]}, assistant],
                **({"tools": tools} if tools else {}),
                "task": row["task"], "topic": asdict(topic), "reference_answer": row["reference_answer"],
                **({"quality": row["quality"]} if "quality" in row else {}),
                **({"constraints": json.loads(row["reference_answer"])} if row.get("answer_check") == "constraints"
                   else {}),
                "provenance": row["provenance"]}

    def _fields(self, row: dict) -> dict:
        return _topic_fields(self.tasks[row["task"]], self.topic_by_key[row["topic_key"]])

    # -- existing traces: reformat → trace filters → verify → SFT rows + preference pairs -------------------
    def reformat(self, rows: list[dict]) -> StageResult:
        """Rewrites every trace; keeps a rewrite only when it passes the row's verifier against the original
        reference. Each output row records `reformat`: rewritten | kept_original | no_rewrite | no_trace (a row
        without reasoning is not sent); a kept original carries its failed rewrite (`rewrite`: reasoning,
        answer, verdict), the rejected side of its pairs."""
        settings = self.config.reformat
        untouched = [{**row, "reformat": "no_trace"} for row in rows if not row["reasoning"].strip()]
        rows = [row for row in rows if row["reasoning"].strip()]
        fields = [{"question": "\n\n".join(m["content"] for m in r["prompt"] if m["role"] == "user"),
                   "reasoning": r["reasoning"], "answer": r["answer"], "verifier": r["verifier"],
                   "format": settings.formats.get(r["verifier"], "")} for r in rows]

        def parse(i, reply):
            answer = parse_text_reply(reply.content, reply.finish_reason)
            reasoning = reply.reasoning_content
            if reasoning is None:
                reasoning, answer = split_think(answer)
            if not reasoning or not reasoning.strip() or not answer.strip():
                raise Malformed("expected a <think> block followed by the final answer")
            return reasoning.strip(), answer.strip()

        answers, usage = self.ask("reformat", fields, [f"reformat:{r['id']}" for r in rows], parse)
        candidates = [{**row, "reasoning": a.value[0], "answer": a.value[1]} for row, a in zip(rows, answers)
                      if a.value is not None]
        start = time.perf_counter()
        verdicts = iter(verify_rows(candidates, self.config.traces.workers, desc="verify rewrites"))
        usage["verification"] = {"programs": len(candidates), "seconds": time.perf_counter() - start}
        kept, drops = [], []
        for row, answer in zip(rows, answers):
            rewrite = None
            if answer.value is not None:
                verdict = next(verdicts)
                rewrite = {"reasoning": answer.value[0], "answer": answer.value[1], "verdict": verdict_dict(verdict)}
                if verdict.passed:
                    provenance = {"reformat": self.provenance("reformat", answer.model)}
                    kept.append({**row, "reasoning": answer.value[0], "answer": answer.value[1],
                                 "verdict": verdict_dict(verdict), "reformat": "rewritten", "provenance": provenance})
                    continue
                reason, detail = f"reformat_{verdict.status}", verdict.detail
            else:
                reason, detail = f"reformat_{answer.reason}", answer.detail
            if self.config.reformat.on_fail == "drop":
                drops.append(_trace_drop("reformat", row, reason, detail))
            elif rewrite is not None:
                kept.append({**row, "reformat": "kept_original", "rewrite": rewrite})
            else:
                kept.append({**row, "reformat": "no_rewrite"})
        return StageResult(kept + untouched, drops, usage)

    def trace_filters(self, rows: list[dict], length: TraceLength) -> StageResult:
        filters, kept, drops = self.config.filters, [], []
        for row in rows:
            if filters.max_trace_tokens is not None and length(row["reasoning"]) > filters.max_trace_tokens:
                drops.append(_trace_drop("filters", row, "trace_too_long", f"over {filters.max_trace_tokens}"))
            elif filters.max_repetition is not None and \
                    (ratio := repetition_ratio(row["reasoning"], filters.repetition_ngram)) > filters.max_repetition:
                drops.append(_trace_drop("filters", row, "trace_repetitive", f"repeated n-grams {ratio:.2f}"))
            else:
                kept.append(row)
        return StageResult(kept, drops)

    def verify(self, rows: list[dict]) -> StageResult:
        """Verdicts for the rows the reformat stage did not already verify; failing rows are drops (and the
        rejected side of pairs)."""
        todo = [row for row in rows if "verdict" not in row]
        start = time.perf_counter()
        fresh = iter(verify_rows(todo, self.config.traces.workers))
        seconds = time.perf_counter() - start
        rows = [row if "verdict" in row else {**row, "verdict": verdict_dict(next(fresh))} for row in rows]
        drops = [_trace_drop("verify", r, f"verify_{r['verdict']['status']}", r["verdict"]["detail"])
                 for r in rows if not r["verdict"]["passed"]]
        return StageResult(rows, drops, {"verification": {"programs": len(todo), "seconds": seconds}})

    def run_traces(self) -> dict:
        config = self.config
        rows = read_traces(config.traces.path, config.traces.verifier, config.traces.limit)
        length = TraceLength(config.filters.trace_tokenizer)
        stages, results = [], {}

        def record(name, rows_in, result):
            results[name] = result
            stages.append({"stage": name, "rows_in": rows_in, "rows_out": len(result.rows),
                           "dropped": dict(Counter(d["reason"] for d in result.drops))})
            return result.rows

        before = {r["id"]: length(r["reasoning"]) for r in rows}
        reformat_summary = None
        if config.reformat.enabled:
            key = self.stage_key("reformat", rows, asdict(config.reformat))
            read = len(rows)
            rows = record("reformat", read, self.store.run("reformat", key, lambda: self.reformat(rows)))
            reformat_summary = _reformat_summary(results["reformat"], read, before, length)
        rows = record("filters", len(rows), self.trace_filters(rows, length))
        key = fingerprint("verify", rows)
        verified = self.store.run("verify", key, lambda: self.verify(rows))
        record("verify", len(rows), StageResult([r for r in verified.rows if r["verdict"]["passed"]],
                                                verified.drops, verified.usage))
        pairs, pair_summary = make_pairs(verified.rows, config.pairs.per_question)
        if not config.pairs.enabled:  # the questions without a passing / failing sample are still reported
            pairs = []
            pair_summary.update(pairs=0, per_task={})
        kept = [{"id": r["id"], "messages": r["prompt"] + [assistant_message(r)], "task": r["verifier"],
                 "verifier": r["verifier"], "reference": r["reference"], "source": r["source"],
                 "question_id": r["question_id"], "verdict": r["verdict"], "reformat": r.get("reformat", "off"),
                 **({"provenance": r["provenance"]} if "provenance" in r else {})}
                for r in verified.rows if r["verdict"]["passed"]]
        drops = [d for result in results.values() for d in result.drops]
        work = {"programs": 0, "seconds": 0.0, "workers": config.traces.workers}
        for result in (results.get("reformat"), verified):
            if result is not None:
                work["programs"] += result.usage["verification"]["programs"]
                work["seconds"] += result.usage["verification"]["seconds"]
        usage = {name: {**r.usage, "reused_stored_output": r.skipped} for name, r in results.items()
                 if name == "reformat"}
        report = {"stages": stages, "length_unit": "tokens" if config.filters.trace_tokenizer else "words",
                  "reformat": reformat_summary, "pass_rates": pass_rates(verified.rows),
                  "pairs": {**pair_summary, "per_question": config.pairs.per_question},
                  "verification": {**work, "per_second": work["programs"] / work["seconds"] if work["seconds"]
                                   else 0.0},
                  "counts": count_by_task(kept, drops), "usage": usage,
                  "total_cost": sum(u.get("cost", 0.0) for u in usage.values()), "config": asdict(config)}
        out = Path(config.output.dir)
        write_jsonl(out / "data.jsonl", kept)
        write_jsonl(out / "drops.jsonl", drops)
        if config.pairs.enabled:
            write_jsonl(out / "pairs.jsonl", pairs)
        write_json(out / "report.json", report)
        write_text(out / "report.md", traces_markdown(report))
        return report

    def run(self) -> dict:
        config, filters = self.config, self.config.filters
        if config.traces.path:
            return self.run_traces()
        results = {}
        if config.seeds.path:
            seeds = self.seed_questions()
            results["questions"] = StageResult(seeds, [])
        else:
            if config.syllabus_outline:
                key = self.stage_key("syllabus", read_yaml(config.syllabus_outline), config.topics_per_subject)
                results["syllabus"] = self.store.run("syllabus", key, self.syllabus)
                topics = [Topic(r["level"], r["grade"], r["subject"], r["topic"]) for r in results["syllabus"].rows]
                write_text(Path(config.output.dir) / "syllabus.yaml", _syllabus_yaml(topics))
            else:
                topics = read_syllabus(config.syllabus)
            self.set_topics(topics)
        topics = [(task.name, topic.key) for task, topic in self.pairs]
        tasks = {name: asdict(task) for name, task in self.tasks.items()}
        # a stage's key covers its settings and its input rows, so new upstream rows (a rerun that recovered
        # failed requests) are never matched with a stale downstream stage
        if not config.seeds.path:
            key = self.stage_key("questions", topics, tasks, asdict(filters.question), filters.near_duplicate_threshold)
            results["questions"] = self.store.run("questions", key, self.questions)
        questions = results["questions"].rows
        key = self.stage_key("responses", questions, tasks, asdict(filters.response),
                             "failing responses kept")  # older stored stages lack them: redo (from the cache)
        results["responses"] = self.store.run("responses", key, lambda: self.responses(questions))
        responses = results["responses"].rows
        key = self.stage_key("reasoning", responses)
        results["reasoning"] = self.store.run("reasoning", key, lambda: self.reasoning(responses))
        results["validate"] = self.validate(results["reasoning"].rows)
        final = results["validate"]
        if filters.min_quality is not None:
            rows = final.rows
            key = self.stage_key("quality", rows, filters.min_quality)
            results["quality"] = final = self.store.run("quality", key, lambda: self.quality(rows))
        results["output"] = StageResult([self.output_row(row) for row in final.rows], [])
        pairs = self.preference_pairs(final.rows, questions, results["responses"].drops) if config.pairs.enabled \
            else None
        return self.write(results, pairs)

    # -- pairs (optional): kept rows (chosen) against responses that failed their verifier (rejected) --------
    def preference_pairs(self, kept: list[dict], questions: list[dict],
                         response_drops: list[dict]) -> tuple[list[dict], dict, dict]:
        """Pairs the kept rows of verified questions with failing samples of the same question (traces.pair_up);
        the rejected samples a pair uses get their reasoning from the reasoning stage's prompt and filters
        (stage rejected_reasoning, not part of the SFT counts); a pair whose rejected reasoning failed is lost.
        Returns the pair rows, the report's summary and the stage's usage."""
        verified = {q["id"]: q for q in questions
                    if q.get("answer_check") in VERIFIERS and q.get("reference_answer") is not None}
        chosen = [{**self.pair_side(row), "verdict": {"passed": True, "status": "pass"}}
                  for row in kept if row["question_id"] in verified]
        failing = [{**verified[d["question_id"]], "id": d["id"], "question_id": d["question_id"],
                    "response": d["response"], "provenance": {"questions": verified[d["question_id"]]["provenance"]},
                    "verdict": {"passed": False, "status": FAILED[d["reason"]]}}
                   for d in response_drops if d.get("question_id") in verified]
        matched, summary = pair_up(chosen + failing, self.config.pairs.per_question, verified)
        needed = list({bad["id"]: bad for _, _, bad in matched}.values())
        key = self.stage_key("reasoning", needed, "rejected")
        reasoned = self.store.run("rejected_reasoning", key, lambda: self.reasoning(needed))
        unusable = Counter(d["reason"] for d in reasoned.drops)
        usable = {}
        for row in reasoned.rows:
            problem = self.config.filters.reasoning_problem(row["reasoning"], row["response"])
            if problem:
                unusable[problem] += 1
            else:
                usable[row["id"]] = {**self.pair_side(row), "verdict": row["verdict"]}
        pairs = [pair_row(k, good, usable[bad["id"]]) for k, good, bad in matched if bad["id"] in usable]
        summary = {"pairs": len(pairs), "per_question": self.config.pairs.per_question, "per_task": pair_counts(pairs),
                   **summary, "rejected_reasoning": {"asked": len(needed), "usable": len(usable),
                                                     "unusable": dict(sorted(unusable.items()))},
                   "pairs_lost": len(matched) - len(pairs)}
        usage = {**reasoned.usage, "reused_stored_output": reasoned.skipped}
        return pairs, summary, usage

    def pair_side(self, row: dict) -> dict:
        """A synthesis sample as traces.pair_row reads it: the prompt as the model saw it (tools in the system
        message, since pairs have no `tools` field), the response and its reasoning."""
        tools = _offered_tools(row)
        prompt = ([{"role": "system", "content": tools_system_prompt(tools, None)}] if tools else []) + [
            {"role": "user", "content": row["question"]}]
        return {"id": row["id"], "question_id": row["question_id"], "prompt": prompt, "reasoning": row["reasoning"],
                "answer": row["response"], "task": row["task"], "verifier": row["answer_check"]}

    def write(self, results: dict[str, StageResult], pairs: tuple[list[dict], dict, dict] | None = None) -> dict:
        out = Path(self.config.output.dir)
        kept = results["output"].rows
        drops = [drop for result in results.values() for drop in result.drops]
        requested = {name: 0 for name in self.tasks}
        for task, _ in self.pairs:
            requested[task.name] += task.count * task.samples
        if self.config.seeds.path:
            task = self.tasks[self.config.seeds.task]
            requested[task.name] += len(results["questions"].rows) * task.samples
        counts = count_by_task(kept, drops)
        usage = {stage: {**result.usage, "reused_stored_output": result.skipped}
                 for stage, result in results.items() if result.usage}
        if pairs is not None:
            usage["rejected_reasoning"] = pairs[2]
        report = {"requested_samples": requested, "counts": counts, "usage": usage,
                  "total_cost": sum(u.get("cost", 0.0) for u in usage.values()),
                  **({"pairs": pairs[1]} if pairs is not None else {}), "config": asdict(self.config)}
        write_jsonl(out / "data.jsonl", kept)
        write_jsonl(out / "drops.jsonl", drops)
        if pairs is not None:
            write_jsonl(out / "pairs.jsonl", pairs[0])
        write_json(out / "report.json", report)
        write_text(out / "report.md", _markdown(report))
        return report


def _prose(response: str) -> str:
    return re.sub(r"<tool_call>.*?</tool_call>", "", response, flags=re.S).strip()


def _offered_tools(row: dict) -> list | None:
    return json.loads(row["reference_answer"])["tools"] if row.get("answer_check") == "tool_call" else None


def _syllabus_yaml(topics: list[Topic]) -> str:
    import yaml

    tree: dict = {}
    for t in topics:
        tree.setdefault(t.level, {}).setdefault(t.grade, {}).setdefault(t.subject, []).append(t.topic)
    return yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)


def _topic_fields(task: Task, topic: Topic) -> dict:
    return {**asdict(topic), "task": task.name, "instructions": task.instructions}


def _reformat_summary(result: StageResult, read: int, before: dict, length: TraceLength) -> dict:
    """Rows rewritten / kept as they were / dropped, the rewrites' verdicts, trace lengths of the same rows
    before and after."""
    rows, states = result.rows, Counter(r["reformat"] for r in result.rows)
    verdicts = Counter(r["rewrite"]["verdict"]["status"] for r in rows if "rewrite" in r)
    verdicts.update(d["reason"].removeprefix("reformat_") for d in result.drops)
    verdicts["pass"] += states["rewritten"]
    return {"rewritten": states["rewritten"], "kept_original": states["kept_original"],
            "no_rewrite": states["no_rewrite"], "no_trace": states["no_trace"], "dropped": read - len(rows),
            "rewrite_statuses": dict(sorted(verdicts.items())),
            "mean_trace_length_before": _mean(before[r["id"]] for r in rows),
            "mean_trace_length_after": _mean(length(r["reasoning"]) for r in rows)}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _trace_drop(stage: str, row: dict, reason: str, detail: str) -> dict:
    return {"stage": stage, "id": row["id"], "task": row["verifier"], "source": row["source"], "reason": reason,
            "detail": detail[:300]}


def _drop(stage: str, row_id: str, task: Task, reason: str, detail: str, items: int = 1) -> dict:
    """A dropped row; `items` is how many candidate samples it stands for (a failed question list stands
    for count × samples), so per task: kept + dropped items = requested samples."""
    return {"stage": stage, "id": row_id, "task": task.name, "reason": reason, "detail": detail, "items": items}


def _markdown(report: dict) -> str:
    lines = ["# Synthetic data report", "", "Candidate samples per task (questions × samples) kept or dropped, "
             "by reason:", "", counts_markdown(report["counts"]), "## Usage per stage", "",
             "| stage | backend | model | replies | sent | cache hits | failed | prompt tokens | completion tokens "
             "| cost | stored output reused |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage, u in report["usage"].items():
        lines.append(f"| {stage} | {u.get('backend', '')} | {u.get('model', '')} | {u.get('replies', 0)} | "
                     f"{u.get('requests_sent', 0)} | {u.get('cache_hits', 0)} | {u.get('failed_requests', 0)} | "
                     f"{u.get('prompt_tokens', 0)} | {u.get('completion_tokens', 0)} | {u.get('cost', 0.0):.4f} | "
                     f"{'yes (figures of the run that made it)' if u['reused_stored_output'] else 'no'} |")
    lines += ["", f"Total cost: {report['total_cost']:.4f} USD", ""]
    if "pairs" in report:
        lines += pairs_markdown(report["pairs"])
    lost = sum(u.get("transient_failures", 0) for u in report["usage"].values())
    if lost:
        lines += [f"**{lost} rows were lost to transient request failures (timeouts, 5xx, 429): run the same "
                  "command again to retry them; every reply already received comes from the cache.**", ""]
    return "\n".join(lines)


def run(config: SynthConfig) -> dict:
    client_options = asdict(config.client)
    client_options["cache_dir"] = response_cache_dir(config.client, config.output.dir)
    used = {getattr(config.stages, stage).backend for stage in config.used_stages()}
    with ExitStack() as stack:
        clients = {}
        for backend in (b for b in config.backends if b.name in used):
            extra = {"cache_namespace": backend.cache_namespace} if backend.cache_namespace else {}
            clients[backend.name] = stack.enter_context(open_endpoint(backend.endpoint, **client_options, **extra))
        return Pipeline(config, clients).run()


def main(argv: list[str] | None = None) -> int:
    return run_recipe(SynthConfig, run, argv, __doc__.split("\n\n")[0], "topics_per_task=2", report=print_report_md)


if __name__ == "__main__":
    sys.exit(main())
