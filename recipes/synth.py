"""Synthetic SFT data: syllabus × tasks → questions → responses → reasoning in Qwen3's thinking style → filters.

    python recipes/synth.py --config recipes/configs/synth.yaml output.dir=runs/synth [key=value ...]

Each stage asks a backend (a local checkpoint served on 127.0.0.1 by default, or any OpenAI-compatible API)
through the caching client and stores its output under `output.dir/stages/`; a rerun skips finished stages
and answers repeated requests from the cache, so an interrupted run resumes. Writes data.jsonl (OpenAI
`messages` with `reasoning_content`, plus task, topic and provenance), drops.jsonl (every dropped row with
its reason), report.json and report.md (kept/dropped per task and reason; tokens and cost per stage).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qforge.engine.client import ChatClient, ClientSettings
from qforge.engine.serve import EndpointSettings, open_endpoint
from qforge.recipes.cli import OutputSettings, run_from_argv
from qforge.recipes.files import write_json, write_jsonl, write_text
from qforge.recipes.sft_data.answers import numbers_in, reasoning_consistent, rejection_sample
from qforge.recipes.sft_data.dedup import Deduplicator
from qforge.recipes.sft_data.filters import Malformed, TextRules, parse_question_list, parse_text_reply
from qforge.recipes.sft_data.report import count_by_task, counts_markdown
from qforge.recipes.sft_data.stages import (StageResult, StageStore, Usage, ask_all, check_placeholders,
                                             conversation, fingerprint)
from qforge.recipes.sft_data.syllabus import Task, Topic, jobs, read_syllabus, read_tasks

TOPIC_FIELDS = {"level", "grade", "subject", "topic", "task", "instructions"}
STAGE_FIELDS = {"questions": TOPIC_FIELDS | {"count"}, "responses": TOPIC_FIELDS | {"question"},
                "reasoning": TOPIC_FIELDS | {"question", "response"}}


@dataclass
class Backend:
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


@dataclass
class StageSettings:
    backend: str = "local"
    prompt_version: str = "v1"  # recorded in every row's provenance; bump it when the prompts change
    system: str = ""
    user: str = ""
    retry: str = ""  # sent after a malformed reply ({error} says what was wrong); empty: just sample again
    retries: int = 2
    max_tokens: int = 2048
    params: dict = field(default_factory=dict)  # body fields over the backend's, e.g. temperature


@dataclass
class Stages:
    questions: StageSettings = field(default_factory=StageSettings)
    responses: StageSettings = field(default_factory=StageSettings)
    reasoning: StageSettings = field(default_factory=StageSettings)


@dataclass
class Filters:
    question: TextRules = field(default_factory=lambda: TextRules(min_chars=10, max_chars=3000))
    response: TextRules = field(default_factory=lambda: TextRules(min_chars=1, max_chars=12000))
    reasoning: TextRules = field(default_factory=lambda: TextRules(min_chars=20, max_chars=24000, language="any"))
    near_duplicate_threshold: float | None = 0.7  # estimated Jaccard of word 3-gram sets; null: exact only
    check_reasoning_answer: bool = True  # the reasoning's conclusion must mention the response's final number
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


@dataclass
class SynthConfig:
    syllabus: str = "recipes/data/syllabus_vi.yaml"
    tasks: str = "recipes/data/tasks_vi.yaml"
    topics_per_task: int | None = None  # only each task's first N topics (smoke runs)
    backends: list[Backend] = field(default_factory=list)
    stages: Stages = field(default_factory=Stages)
    filters: Filters = field(default_factory=Filters)
    client: ClientSettings = field(default_factory=ClientSettings)  # cache_dir default: output.dir/cache
    output: OutputSettings = field(default_factory=OutputSettings)

    def __post_init__(self):
        if not self.output.dir:
            raise ValueError("output.dir is required")
        names = [b.name for b in self.backends]
        for stage, fields in STAGE_FIELDS.items():
            settings = getattr(self.stages, stage)
            if settings.backend not in names:
                raise ValueError(f"stages.{stage}.backend {settings.backend!r} is not one of backends {names}")
            if not settings.user:
                raise ValueError(f"stages.{stage}.user (the prompt template) is required")
            for part in ("system", "user"):
                check_placeholders(getattr(settings, part), fields, f"stages.{stage}.{part}")
            check_placeholders(settings.retry, {"error"}, f"stages.{stage}.retry")


class Pipeline:
    """One run: the syllabus and tasks, a client per backend, and the stage store."""

    def __init__(self, config: SynthConfig, clients: dict[str, ChatClient]):
        self.config = config
        self.clients = clients
        self.tasks = {task.name: task for task in read_tasks(config.tasks)}
        self.pairs = jobs(list(self.tasks.values()), read_syllabus(config.syllabus), config.topics_per_task)
        self.topic_by_key = {topic.key: topic for _, topic in self.pairs}
        self.store = StageStore(config.output.dir)

    def backend(self, stage: str) -> Backend:
        name = getattr(self.config.stages, stage).backend
        return next(b for b in self.config.backends if b.name == name)

    def stage_key(self, stage: str, *inputs) -> str:
        backend = self.backend(stage)
        return fingerprint(stage, asdict(getattr(self.config.stages, stage)), asdict(backend.endpoint),
                           backend.params, *inputs)

    def ask(self, stage: str, prompt_fields: list[dict], tags: list[str], parse) -> tuple[list, dict]:
        settings, backend = getattr(self.config.stages, stage), self.backend(stage)
        conversations = [conversation(settings.system, settings.user, f) for f in prompt_fields]
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
                row = {"id": f"{job}-q{k}", "task": task.name, "topic_key": topic.key, "question": item["question"],
                       "reference_answer": item["answer"], "provenance": self.provenance("questions", answer.model)}
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
                                  lambda i, reply: parse_text_reply(reply.content, reply.finish_reason))
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
                reason = f"response_{answer.reason}" if answer.value is None else rules.check(answer.value, "response")
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

            reference = group[0][0]["reference_answer"] if task.answer_check == "numeric" else None
            verdicts = rejection_sample([a.value for _, _, a in valid], reference, task.keep, refuse)
            for index, ((question, sample_id, answer), verdict) in enumerate(zip(valid, verdicts)):
                if not verdict.keep:
                    detail = f"of {originals[index]}" if index in originals else ""
                    drops.append(_drop("responses", sample_id, task, verdict.reason, detail))
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
                kept.append(self.output_row(row))
        return StageResult(kept, drops)

    def output_row(self, row: dict) -> dict:
        topic = self.topic_by_key[row["topic_key"]]
        return {"id": row["id"], "messages": [
                    {"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": row["response"], "reasoning_content": row["reasoning"]}],
                "task": row["task"], "topic": asdict(topic), "reference_answer": row["reference_answer"],
                "provenance": row["provenance"]}

    def _fields(self, row: dict) -> dict:
        return _topic_fields(self.tasks[row["task"]], self.topic_by_key[row["topic_key"]])

    def run(self) -> dict:
        filters = self.config.filters
        topics = [(task.name, topic.key) for task, topic in self.pairs]
        tasks = {name: asdict(task) for name, task in self.tasks.items()}
        # a stage's key covers its settings and its input rows, so new upstream rows (a rerun that recovered
        # failed requests) are never matched with a stale downstream stage
        key = self.stage_key("questions", topics, tasks, asdict(filters.question), filters.near_duplicate_threshold)
        results = {"questions": self.store.run("questions", key, self.questions)}
        questions = results["questions"].rows
        key = self.stage_key("responses", questions, tasks, asdict(filters.response))
        results["responses"] = self.store.run("responses", key, lambda: self.responses(questions))
        responses = results["responses"].rows
        key = self.stage_key("reasoning", responses)
        results["reasoning"] = self.store.run("reasoning", key, lambda: self.reasoning(responses))
        results["validate"] = self.validate(results["reasoning"].rows)
        return self.write(results)

    def write(self, results: dict[str, StageResult]) -> dict:
        out = Path(self.config.output.dir)
        kept = results["validate"].rows
        drops = [drop for result in results.values() for drop in result.drops]
        requested = {name: 0 for name in self.tasks}
        for task, _ in self.pairs:
            requested[task.name] += task.count * task.samples
        counts = count_by_task(kept, drops)
        usage = {stage: {**result.usage, "reused_stored_output": result.skipped}
                 for stage, result in results.items() if stage != "validate"}
        report = {"requested_samples": requested, "counts": counts, "usage": usage,
                  "total_cost": sum(u.get("cost", 0.0) for u in usage.values()), "config": asdict(self.config)}
        write_jsonl(out / "data.jsonl", kept)
        write_jsonl(out / "drops.jsonl", drops)
        write_json(out / "report.json", report)
        write_text(out / "report.md", _markdown(report))
        return report


def _topic_fields(task: Task, topic: Topic) -> dict:
    return {**asdict(topic), "task": task.name, "instructions": task.instructions}


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
    lost = sum(u.get("transient_failures", 0) for u in report["usage"].values())
    if lost:
        lines += [f"**{lost} rows were lost to transient request failures (timeouts, 5xx, 429): run the same "
                  "command again to retry them; every reply already received comes from the cache.**", ""]
    return "\n".join(lines)


def run(config: SynthConfig) -> dict:
    client_options = asdict(config.client)
    client_options["cache_dir"] = client_options["cache_dir"] or str(Path(config.output.dir) / "cache")
    used = {getattr(config.stages, stage).backend for stage in STAGE_FIELDS}
    with ExitStack() as stack:
        clients = {}
        for backend in (b for b in config.backends if b.name in used):
            extra = {"cache_namespace": backend.cache_namespace} if backend.cache_namespace else {}
            clients[backend.name] = stack.enter_context(open_endpoint(backend.endpoint, **client_options, **extra))
        return Pipeline(config, clients).run()


def main(argv: list[str] | None = None) -> None:
    config, _ = run_from_argv(SynthConfig, run, argv, __doc__.split("\n\n")[0], "topics_per_task=2")
    print(Path(config.output.dir, "report.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
